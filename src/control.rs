//! The control socket between the CLI and the running daemon.
//!
//! One JSON request per line, one JSON response per line, over a Unix socket that only root can
//! open (it can change the cluster). Requests are bounded in size and connections in number, so a
//! stuck client cannot hold the daemon.
//!
//! A client may pipeline: send further requests before it has read the answers. The daemon works
//! on up to [`MAX_IN_FLIGHT`] requests of a connection at once (at most [`MAX_IN_FLIGHT_BYTES`] of
//! them) and answers them in the order they
//! were sent; because they run concurrently, a client that needs one write to land after another
//! waits for the first answer before sending the second (as the CLI does: one request per
//! connection).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::eventlog::LogKind;

/// Largest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Requests of one connection in progress at once (pipelining): a client may send more before
/// reading the answers, but the daemon reads the next one only once the oldest is answered. With
/// [`MAX_REQUEST`] and [`MAX_CONNECTIONS`] this bounds what clients can make the daemon hold.
pub const MAX_IN_FLIGHT: usize = 64;
/// Bytes of the requests of one connection in progress at once: large requests get fewer than
/// [`MAX_IN_FLIGHT`] slots, so a connection holds about this much however it fills its requests.
pub const MAX_IN_FLIGHT_BYTES: usize = 1024 * 1024;
/// How long the CLI waits for an answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What the CLI asks of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Request {
    /// The status document of SPEC.md §7.
    Status,
    /// The raised alarms.
    Alarms,
    /// The stored entries of a log.
    Log {
        /// Which log.
        kind: LogKind,
    },
    /// Add a peer to this peer's list, live.
    PeersAdd {
        /// Management address of the new peer.
        addr: std::net::Ipv4Addr,
    },
    /// Remove a peer from this peer's list, live (it may be dead).
    PeersRemove {
        /// Management address of the peer.
        addr: std::net::Ipv4Addr,
    },
    /// Leave the cluster: empty peer list, no pre-shared key.
    Standalone,
    /// Re-read the configuration file and the pre-shared key and apply changes live.
    Reload,
    /// Prometheus text for `/metrics`.
    Metrics,
    /// The Argon2id hash of an administrator account (admin API only: refused on the socket).
    AdminHash {
        /// Account name.
        name: String,
    },
    /// Shared configuration: one value.
    ConfigGet {
        /// The key, e.g. `bridge/b1`.
        key: String,
    },
    /// Shared configuration: set a value; answered once durable locally.
    ConfigSet {
        /// The key.
        key: String,
        /// The value as JSON.
        value: Value,
        /// Also wait until this many other peers have the write (0: durable locally is enough).
        #[serde(default)]
        wait_peers: usize,
    },
    /// Shared configuration: delete a key; answered once durable locally (and on `wait_peers`
    /// other peers).
    ConfigDelete {
        /// The key.
        key: String,
        /// As for [`Request::ConfigSet`].
        #[serde(default)]
        wait_peers: usize,
    },
    /// Shared configuration: every key under a prefix.
    ConfigList {
        /// Key prefix ("" for all).
        prefix: String,
    },
    /// Create or replace an administrator account. The CLI hashes the password (Argon2id), so
    /// the password itself never crosses the socket or reaches the daemon's memory.
    AdminAdd {
        /// Account name.
        name: String,
        /// The PHC string of the password's Argon2id hash.
        hash: String,
    },
    /// Remove an administrator account.
    AdminRemove {
        /// Account name.
        name: String,
    },
    /// The administrator account names.
    AdminList,
    /// Take a backup of this peer (configuration file and store, no logs) into `dir`.
    Backup {
        /// Where to write it (default: `<state_dir>/backups`).
        dir: Option<std::path::PathBuf>,
        /// A file holding the password that encrypts the backup; none = not encrypted.
        password_file: Option<std::path::PathBuf>,
    },
    /// Restore a backup taken on this peer: configuration file and store, applied live.
    Restore {
        /// The backup file.
        file: std::path::PathBuf,
        /// A file holding its password, if it is encrypted.
        password_file: Option<std::path::PathBuf>,
    },
    /// Test and diagnosis: inject faults on the outbound path to a peer (all zero clears them).
    Faults {
        /// The peer's management address.
        peer: std::net::Ipv4Addr,
        /// Added one-way delay, ms.
        delay_ms: u32,
        /// Added random jitter, ms.
        jitter_ms: u32,
        /// Loss probability, percent.
        loss_pct: f64,
        /// Duplication probability, percent.
        #[serde(default)]
        duplicate_pct: f64,
        /// Reordering probability, percent: such a packet is held back so later ones overtake it.
        #[serde(default)]
        reorder_pct: f64,
    },
}

/// The daemon's answer: a JSON value or an error message for the operator.
pub type Reply = Result<Value, String>;

/// A request with the channel its answer goes back on.
pub type Call = (Request, oneshot::Sender<Reply>);

#[derive(Serialize, Deserialize)]
struct Wire {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    ok: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    error: Option<String>,
}

/// Serves the control socket at `path` until `shutdown` fires, passing each request to `calls`.
pub async fn serve(
    path: &Path,
    calls: mpsc::Sender<Call>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    if path.exists() {
        // A socket left by a crashed daemon; a live daemon would still answer on it.
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: another confmesh daemon is running with this state_dir",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.changed() => break,
        };
        let stream = tokio::select! {
            s = listener.accept() => s?.0,
            _ = shutdown.changed() => break,
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, calls).await {
                tracing::debug!("control connection: {e}");
            }
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// A request of one connection in the order it arrived: answered already (refused before it
/// reached the daemon) or waiting for the daemon's answer.
enum Pending {
    Ready(Reply),
    Waiting(oneshot::Receiver<Reply>),
}

impl Pending {
    /// Whether the answer is there (without waiting for it).
    fn is_ready(&mut self) -> bool {
        if let Pending::Waiting(rx) = self {
            match rx.try_recv() {
                Ok(reply) => *self = Pending::Ready(reply),
                Err(oneshot::error::TryRecvError::Empty) => return false,
                Err(oneshot::error::TryRecvError::Closed) => {
                    *self = Pending::Ready(Err(DROPPED.to_owned()))
                }
            }
        }
        true
    }

    async fn answer(self) -> Reply {
        match self {
            Pending::Ready(reply) => reply,
            Pending::Waiting(rx) => rx.await.unwrap_or_else(|_| Err(DROPPED.to_owned())),
        }
    }
}

/// A request between reader and writer: its answer, whether it is the connection's last, and its
/// share of [`MAX_IN_FLIGHT`] and [`MAX_IN_FLIGHT_BYTES`] (released once the answer is there).
type InFlight = (Pending, bool, (OwnedSemaphorePermit, OwnedSemaphorePermit));

const DROPPED: &str = "the daemon dropped the request";

/// Answers are written once this many bytes are waiting, even if more are ready.
const WRITE_CHUNK: usize = 64 * 1024;

/// One connection: a reader that parses requests and hands them to the daemon without waiting for
/// the answers, and a writer that sends the answers in request order. At most [`MAX_IN_FLIGHT`]
/// requests are between the two; the reader stops reading (and the kernel's socket buffer then
/// stops the client) until the oldest is answered. A request longer than [`MAX_REQUEST`] is
/// answered with an error and ends the connection.
async fn serve_one(stream: UnixStream, calls: mpsc::Sender<Call>) -> std::io::Result<()> {
    let (read, write) = stream.into_split();
    let (pending_tx, pending_rx) = mpsc::channel::<InFlight>(MAX_IN_FLIGHT);
    tokio::try_join!(
        read_requests(read, calls, pending_tx),
        write_answers(write, pending_rx)
    )?;
    Ok(())
}

async fn read_requests(
    read: tokio::net::unix::OwnedReadHalf,
    calls: mpsc::Sender<Call>,
    pending: mpsc::Sender<InFlight>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let in_flight_bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
    loop {
        // Wait for room before reading: the bounds on requests in flight are what bound memory.
        let count = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        // The bound is per request: a connection may carry any number of them.
        line.clear();
        if (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?
            == 0
        {
            return Ok(());
        }
        let too_long = line.len() > MAX_REQUEST;
        // At most MAX_REQUEST + 1 bytes, less than MAX_IN_FLIGHT_BYTES: always granted in the end.
        let bytes = in_flight_bytes
            .clone()
            .acquire_many_owned(line.len() as u32)
            .await
            .expect("semaphore never closed");
        let permit = (count, bytes);
        let next = match serde_json::from_slice::<Request>(&line) {
            _ if too_long => {
                Pending::Ready(Err(format!("request longer than {MAX_REQUEST} bytes")))
            }
            Err(e) => Pending::Ready(Err(format!("bad request: {e}"))),
            Ok(Request::AdminHash { .. }) => Pending::Ready(Err(
                "password hashes are not served on the control socket".to_owned(),
            )),
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                if calls.send((req, tx)).await.is_err() {
                    Pending::Ready(Err("the daemon is shutting down".to_owned()))
                } else {
                    Pending::Waiting(rx)
                }
            }
        };
        if pending.send((next, too_long, permit)).await.is_err() {
            return Ok(());
        }
        if too_long {
            return Ok(());
        }
    }
}

async fn write_answers(
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut pending: mpsc::Receiver<InFlight>,
) -> std::io::Result<()> {
    let mut out = Vec::new();
    loop {
        // Answers that are ready go out together in one write; the client never waits for one
        // behind a request that is still running. The answers of one group commit arrive one
        // after the other: before writing, let the tasks that carry them run once.
        let next = if out.is_empty() {
            pending.recv().await
        } else {
            match pending.try_recv() {
                Ok(p) => Some(p),
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::task::yield_now().await;
                    match pending.try_recv() {
                        Ok(p) => Some(p),
                        Err(mpsc::error::TryRecvError::Empty) => {
                            write.write_all(&out).await?;
                            out.clear();
                            pending.recv().await
                        }
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            }
        };
        let Some((mut p, last, permit)) = next else {
            break;
        };
        if !out.is_empty() && !p.is_ready() {
            tokio::task::yield_now().await;
            if !p.is_ready() {
                write.write_all(&out).await?;
                out.clear();
            }
        }
        let reply = p.answer().await;
        drop(permit);
        let wire = match reply {
            Ok(v) => Wire {
                ok: Some(v),
                error: None,
            },
            Err(e) => Wire {
                ok: None,
                error: Some(e),
            },
        };
        serde_json::to_writer(&mut out, &wire).map_err(std::io::Error::other)?;
        out.push(b'\n');
        if last {
            break;
        }
        if out.len() >= WRITE_CHUNK {
            write.write_all(&out).await?;
            out.clear();
        }
    }
    write.write_all(&out).await
}

/// Sends one request to the daemon at `socket` and returns its answer.
pub async fn call(socket: &Path, request: &Request) -> Reply {
    let attempt = async {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            format!(
                "cannot reach the daemon at {}: {e}; is `confmesh run` running? (use --socket or --config to point at it)",
                socket.display()
            )
        })?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        line.push(b'\n');
        write.write_all(&line).await.map_err(|e| e.to_string())?;
        let mut lines = BufReader::new(read).lines();
        let answer = lines
            .next_line()
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the daemon closed the connection without answering".to_owned())?;
        let wire: Wire = serde_json::from_str(&answer)
            .map_err(|e| format!("unreadable answer from the daemon: {e}"))?;
        match (wire.ok, wire.error) {
            (_, Some(e)) => Err(e),
            (Some(v), None) => Ok(v),
            (None, None) => Ok(Value::Null),
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the daemon did not answer within {}s",
                CALL_TIMEOUT.as_secs()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control socket served in a temporary directory, ready for connections: the daemon's end
    /// of the calls (`rx`), the stop switch and the server task.
    struct Served {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        rx: mpsc::Receiver<Call>,
        stop_tx: tokio::sync::watch::Sender<bool>,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Served {
        async fn start() -> Served {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.sock");
            let (tx, rx) = mpsc::channel::<Call>(4);
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let p = path.clone();
            let server = tokio::spawn(async move { serve(&p, tx, stop_rx).await });
            for _ in 0..100 {
                if path.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Served {
                _dir: dir,
                path,
                rx,
                stop_tx,
                server,
            }
        }
    }

    /// The first `n` requests the daemon passes on, after checking that no more follow while
    /// they are unanswered (`bound` names the limit, for the message).
    async fn held(rx: &mut mpsc::Receiver<Call>, n: usize, bound: &str) -> Vec<Call> {
        let mut held = Vec::new();
        while held.len() < n {
            held.push(rx.recv().await.unwrap());
        }
        let more = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        assert!(
            more.is_err(),
            "more than {bound} of requests reached the daemon"
        );
        held
    }

    /// Answers every further request with `answer`, until aborted.
    fn answer_the_rest(
        mut rx: mpsc::Receiver<Call>,
        answer: fn(Call),
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                answer(call);
            }
        })
    }

    #[test]
    fn requests_have_stable_json() {
        let r = Request::PeersAdd {
            addr: "10.96.0.3".parse().unwrap(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"cmd":"peers-add","addr":"10.96.0.3"}"#
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"log","kind":"config"}"#).unwrap();
        assert_eq!(
            r,
            Request::Log {
                kind: LogKind::Config
            }
        );
    }

    #[tokio::test]
    async fn round_trip_over_a_socket() {
        let Served {
            _dir,
            path,
            mut rx,
            stop_tx,
            server,
        } = Served::start().await;
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(match req {
                    Request::Status => Ok(serde_json::json!({"mode": "standalone"})),
                    _ => Err("no".into()),
                });
            }
        });
        assert_eq!(
            call(&path, &Request::Status).await.unwrap()["mode"],
            "standalone"
        );
        assert_eq!(call(&path, &Request::Standalone).await.unwrap_err(), "no");
        // One connection carries far more than MAX_REQUEST in all; only one request is bounded.
        let stream = UnixStream::connect(&path).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut answers = BufReader::new(read).lines();
        let request = format!(
            "{}\n",
            serde_json::to_string(&Request::ConfigGet {
                key: "k".repeat(300)
            })
            .unwrap()
        );
        for _ in 0..2 * MAX_REQUEST / request.len() {
            write.write_all(request.as_bytes()).await.unwrap();
            assert!(answers.next_line().await.unwrap().unwrap().contains("no"));
        }
        write
            .write_all(&vec![b' '; MAX_REQUEST + 10])
            .await
            .unwrap();
        write.write_all(b"\n").await.unwrap();
        assert!(
            answers
                .next_line()
                .await
                .unwrap()
                .unwrap()
                .contains("longer than")
        );
        stop_tx.send(true).unwrap();
        server.await.unwrap().unwrap();
        assert!(!path.exists());
        assert!(
            call(&path, &Request::Status)
                .await
                .unwrap_err()
                .contains("cannot reach the daemon")
        );
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_and_bounded() {
        let Served {
            _dir,
            path,
            mut rx,
            stop_tx,
            server,
        } = Served::start().await;
        let total = 3 * MAX_IN_FLIGHT;
        let stream = UnixStream::connect(&path).await.unwrap();
        let (read, mut write) = stream.into_split();
        // The client sends everything at once, without reading an answer.
        let sender = tokio::spawn(async move {
            let mut all = Vec::new();
            for i in 0..total {
                all.extend(
                    serde_json::to_vec(&Request::ConfigGet {
                        key: format!("k{i}"),
                    })
                    .unwrap(),
                );
                all.push(b'\n');
            }
            write.write_all(&all).await.unwrap();
            write
        });
        // The daemon sees at most MAX_IN_FLIGHT of them before it answers any.
        let held = held(&mut rx, MAX_IN_FLIGHT, "MAX_IN_FLIGHT").await;
        // Answered newest first; the client still gets them in request order.
        let answer = |(req, reply): Call| {
            let Request::ConfigGet { key } = req else {
                panic!("{req:?}")
            };
            let _ = reply.send(Ok(Value::String(key)));
        };
        for call in held.into_iter().rev() {
            answer(call);
        }
        let answering = answer_the_rest(rx, answer);
        let mut answers = BufReader::new(read).lines();
        for i in 0..total {
            let line = answers.next_line().await.unwrap().unwrap();
            let wire: Wire = serde_json::from_str(&line).unwrap();
            assert_eq!(wire.ok, Some(Value::String(format!("k{i}"))));
        }
        drop(sender.await.unwrap());
        assert!(
            answers.next_line().await.unwrap().is_none(),
            "closed after the client closed"
        );
        stop_tx.send(true).unwrap();
        server.await.unwrap().unwrap();
        answering.abort();
    }

    #[tokio::test]
    async fn large_pipelined_requests_are_bounded_in_bytes() {
        let Served {
            _dir,
            path,
            mut rx,
            stop_tx,
            server,
        } = Served::start().await;
        let request = |i: usize| {
            let mut line = serde_json::to_vec(&Request::ConfigGet {
                key: format!("{i:04}{}", "k".repeat(MAX_REQUEST - 100)),
            })
            .unwrap();
            line.push(b'\n');
            line
        };
        let per_request = request(0).len();
        let fit = MAX_IN_FLIGHT_BYTES / per_request;
        assert!(
            fit < MAX_IN_FLIGHT,
            "the byte bound is the one that holds here"
        );
        let total = 3 * fit;
        let stream = UnixStream::connect(&path).await.unwrap();
        let (read, mut write) = stream.into_split();
        let sender = tokio::spawn(async move {
            for i in 0..total {
                write.write_all(&request(i)).await.unwrap();
            }
            write
        });
        let held = held(&mut rx, fit, "MAX_IN_FLIGHT_BYTES").await;
        let answer = |(req, reply): Call| {
            let Request::ConfigGet { key } = req else {
                panic!("{req:?}")
            };
            let _ = reply.send(Ok(Value::String(key[..4].to_owned())));
        };
        for call in held {
            answer(call);
        }
        let answering = answer_the_rest(rx, answer);
        let mut answers = BufReader::new(read).lines();
        for i in 0..total {
            let wire: Wire =
                serde_json::from_str(&answers.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(wire.ok, Some(Value::String(format!("{i:04}"))));
        }
        drop(sender.await.unwrap());
        stop_tx.send(true).unwrap();
        server.await.unwrap().unwrap();
        answering.abort();
    }
}
