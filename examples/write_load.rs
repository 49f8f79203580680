//! Load generator of `benches/replication-netns.sh`: the same client for confmesh and for etcd.
//!
//! `write_load write …` runs in peer 1's namespace. It runs `--writers` writers on peer 1, each
//! keeping `--depth` writes in flight (confmesh: one control-socket connection per writer, JSON
//! `config-set` requests pipelined one per line, answered in order; etcd: the gRPC gateway, which
//! serves one HTTP/1.1 keep-alive `POST /v3/kv/put` at a time per connection, so `--depth`
//! connections per writer), writes keys of exactly `--key-size` bytes with values of exactly
//! `--value-size` bytes for `--duration` seconds and counts the acknowledged writes. Alongside, one probe connection measures replication lag: it
//! writes a probe key of the same sizes, takes the wall-clock time of the acknowledgement and hands
//! key and time to a reader child (`write_load read …`, started with `ip netns exec` in peer 2's
//! namespace) that polls peer 2 for that key (confmesh: `config-get` on peer 2's control socket;
//! etcd: `POST /v3/kv/range` with `serializable: true` to member 2) until it is there and answers
//! the time elapsed since the acknowledgement; then the next probe starts. After the window, it
//! waits until every other peer holds every acknowledged write (confmesh: peer 1's replication
//! status shows no entry unacknowledged by any peer; etcd: members 2 and 3 reach the revision of
//! the last acknowledged put) and prints one JSON object with the figures; for confmesh it also
//! holds the deltas of peer 1's replication and dataplane counters over the run.
//!
//! The reader and the writer are separate processes in separate namespaces; they compare the host's
//! wall clock (CLOCK_REALTIME, one kernel), which is the same clock for both.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

/// Longest wait for one answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a probe key to appear on the other peer.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for every peer to hold every acknowledged write after the window.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser)]
#[command(about = "Replicated-write load for benches/replication-netns.sh (confmesh and etcd)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum System {
    Confmesh,
    Etcd,
}

/// What `write` does: which system, where, with what load.
#[derive(Args)]
struct WriteArgs {
    #[arg(long, value_enum)]
    system: System,
    /// Peer 1: a control socket path (confmesh) or ADDR:PORT of the client URL (etcd).
    #[arg(long)]
    target: String,
    /// The other members' client ADDR:PORT (etcd only), to wait until they hold every write.
    #[arg(long, value_delimiter = ',')]
    others: Vec<String>,
    /// Namespace of peer 2, where the reader runs.
    #[arg(long)]
    reader_netns: String,
    /// Peer 2, as --target.
    #[arg(long)]
    reader_target: String,
    /// Connections writing back to back (0: only the lag probe writes, about 100 writes/s).
    #[arg(long, default_value_t = 12)]
    writers: usize,
    /// Writes in flight per writer. confmesh pipelines them on the writer's control connection
    /// (the daemon answers in order); etcd's gateway serves one request at a time per HTTP/1.1
    /// connection, so an etcd writer opens this many connections. Either way both systems have
    /// writers × depth writes in flight.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Offered load, writes/s over all writers (0: as fast as the system answers). Writes are
    /// sent on a fixed schedule; a system that falls behind it gets them back to back, still at
    /// most writers × depth in flight.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    #[arg(long, default_value_t = 64)]
    key_size: usize,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Pause between two lag probes, ms.
    #[arg(long, default_value_t = 10)]
    probe_pause_ms: u64,
    /// Shortest pause between two reads of the reader, µs (it grows to a tenth of the time
    /// waited so far, at most 1 ms).
    #[arg(long, default_value_t = 100)]
    poll_us: u64,
    /// confmesh only: each write is acknowledged once this many other peers have it too.
    #[arg(long, default_value_t = 0)]
    wait_peers: usize,
}

#[derive(Subcommand)]
enum Mode {
    /// Write for a fixed time on peer 1 and measure lag to peer 2.
    Write(WriteArgs),
    /// (Started by `write`.) Reads "KEY ACK_NS" lines and answers the lag in ns once KEY is visible.
    Read {
        #[arg(long, value_enum)]
        system: System,
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 100)]
        poll_us: u64,
    },
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

// ---------------------------------------------------------------------------------------------
// Clients

/// One persistent connection to confmesh's control socket.
struct ControlConn {
    path: PathBuf,
    io: Option<(
        BufReader<tokio::net::unix::OwnedReadHalf>,
        tokio::net::unix::OwnedWriteHalf,
    )>,
    reconnects: u64,
}

impl ControlConn {
    async fn connect(path: PathBuf) -> Result<ControlConn, String> {
        let mut c = ControlConn {
            path,
            io: None,
            reconnects: 0,
        };
        c.reopen().await?;
        c.reconnects = 0;
        Ok(c)
    }

    async fn reopen(&mut self) -> Result<(), String> {
        self.io = None;
        let s = UnixStream::connect(&self.path)
            .await
            .map_err(|e| format!("connect {}: {e}", self.path.display()))?;
        let (r, w) = s.into_split();
        self.io = Some((BufReader::new(r), w));
        self.reconnects += 1;
        Ok(())
    }

    /// Sends one request and returns `Ok(answer)` or `Err(daemon's error message)`; transport
    /// failures are `Err` too, prefixed with "transport:".
    async fn call(&mut self, request: &Value) -> Result<Value, String> {
        let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        line.push(b'\n');
        if self.io.is_none() {
            self.reopen().await.map_err(|e| format!("transport: {e}"))?;
        }
        let (r, w) = self.io.as_mut().expect("connected");
        let exchange = async {
            w.write_all(&line).await?;
            let mut answer = String::new();
            r.read_line(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
            Ok(Ok(a)) if !a.is_empty() => a,
            Ok(Ok(_)) => {
                self.io = None;
                return Err("transport: the daemon closed the connection".into());
            }
            Ok(Err(e)) => {
                self.io = None;
                return Err(format!("transport: {e}"));
            }
            Err(_) => {
                self.io = None;
                return Err("transport: no answer in time".into());
            }
        };
        control_answer(&answer)
    }
}

/// A control-socket answer line: `Ok(value)`, `Err(the daemon's error message)`, or `Err` prefixed
/// with "transport:" if it is not an answer.
fn control_answer(line: &str) -> Result<Value, String> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| format!("transport: unreadable answer: {e}"))?;
    match (v.get("ok"), v.get("error")) {
        (_, Some(e)) => Err(e.as_str().unwrap_or("?").to_owned()),
        (Some(ok), None) => Ok(ok.clone()),
        (None, None) => Ok(Value::Null),
    }
}

/// One HTTP/1.1 keep-alive connection to an etcd member's gRPC gateway.
struct HttpConn {
    addr: SocketAddr,
    io: Option<(
        BufReader<tokio::net::tcp::OwnedReadHalf>,
        tokio::net::tcp::OwnedWriteHalf,
    )>,
    reconnects: u64,
}

impl HttpConn {
    async fn connect(addr: SocketAddr) -> Result<HttpConn, String> {
        let mut c = HttpConn {
            addr,
            io: None,
            reconnects: 0,
        };
        c.reopen().await?;
        c.reconnects = 0;
        Ok(c)
    }

    async fn reopen(&mut self) -> Result<(), String> {
        self.io = None;
        let s = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = s.set_nodelay(true);
        let (r, w) = s.into_split();
        self.io = Some((BufReader::new(r), w));
        self.reconnects += 1;
        Ok(())
    }

    /// POSTs `body` to `path`; returns the status code and the response body.
    async fn post(&mut self, path: &str, body: &Value) -> Result<(u16, Value), String> {
        if self.io.is_none() {
            self.reopen().await.map_err(|e| format!("transport: {e}"))?;
        }
        let body = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let (r, w) = self.io.as_mut().expect("connected");
        let exchange = async {
            w.write_all(&req).await?;
            read_response(r).await
        };
        match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
            Ok(Ok((status, close, body))) => {
                if close {
                    self.io = None;
                }
                let v = serde_json::from_slice(&body)
                    .map_err(|e| format!("transport: unreadable body: {e}"))?;
                Ok((status, v))
            }
            Ok(Err(e)) => {
                self.io = None;
                Err(format!("transport: {e}"))
            }
            Err(_) => {
                self.io = None;
                Err("transport: no answer in time".into())
            }
        }
    }
}

/// Reads one HTTP/1.1 response: status, whether the server closes the connection, body.
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(u16, bool, Vec<u8>)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(bad("connection closed"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let (mut length, mut chunked, mut close) = (None, false, false);
    for _ in 0..100 {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(bad("connection closed in headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            let (name, value) = (
                name.trim().to_ascii_lowercase(),
                value.trim().to_ascii_lowercase(),
            );
            match name.as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.contains("chunked"),
                "connection" => close = value.contains("close"),
                _ => {}
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        for _ in 0..10_000 {
            line.clear();
            r.read_line(&mut line).await?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("bad chunk size"))?;
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).await?;
            line.clear();
            r.read_line(&mut line).await?;
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = length {
        if n > 16 << 20 {
            return Err(bad("body too large"));
        }
        body.resize(n, 0);
        r.read_exact(&mut body).await?;
    } else {
        return Err(bad("no length"));
    }
    Ok((status, close, body))
}

/// A connection to one peer of either system, with the two operations the benchmark uses.
enum Conn {
    /// With the `wait_peers` of its writes.
    Confmesh(ControlConn, usize),
    Etcd(HttpConn),
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Conn {
    async fn open(system: System, target: &str) -> Result<Conn, String> {
        match system {
            System::Confmesh => Ok(Conn::Confmesh(
                ControlConn::connect(PathBuf::from(target)).await?,
                0,
            )),
            System::Etcd => {
                let addr = target.parse().map_err(|e| format!("{target}: {e}"))?;
                Ok(Conn::Etcd(HttpConn::connect(addr).await?))
            }
        }
    }

    fn reconnects(&self) -> u64 {
        match self {
            Conn::Confmesh(c, _) => c.reconnects,
            Conn::Etcd(c) => c.reconnects,
        }
    }

    /// Writes `key`; on success returns the etcd revision of the write (0 for confmesh).
    async fn put(&mut self, key: &str, value: &str) -> Result<u64, String> {
        match self {
            Conn::Confmesh(c, 0) => c
                .call(&json!({"cmd": "config-set", "key": key, "value": value}))
                .await
                .map(|_| 0),
            Conn::Confmesh(c, wait) => c
                .call(&json!({"cmd": "config-set", "key": key, "value": value, "wait_peers": wait}))
                .await
                .map(|_| 0),
            Conn::Etcd(c) => {
                let (status, v) = c
                    .post("/v3/kv/put", &json!({"key": b64(key), "value": b64(value)}))
                    .await?;
                if status != 200 {
                    return Err(format!("HTTP {status}: {v}"));
                }
                Ok(revision(&v))
            }
        }
    }

    /// Whether `key` is visible on this peer (etcd: serializable read, i.e. the member's own state).
    async fn exists(&mut self, key: &str) -> Result<bool, String> {
        match self {
            Conn::Confmesh(c, _) => match c.call(&json!({"cmd": "config-get", "key": key})).await {
                Ok(_) => Ok(true),
                Err(e) if e.starts_with("not found") => Ok(false),
                Err(e) => Err(e),
            },
            Conn::Etcd(c) => {
                let (status, v) = c
                    .post(
                        "/v3/kv/range",
                        &json!({"key": b64(key), "serializable": true}),
                    )
                    .await?;
                if status != 200 {
                    return Err(format!("HTTP {status}: {v}"));
                }
                Ok(v["kvs"].as_array().is_some_and(|a| !a.is_empty()))
            }
        }
    }
}

/// The revision in an etcd response header (JSON string of an int64).
fn revision(v: &Value) -> u64 {
    let r = &v["header"]["revision"];
    r.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| r.as_u64())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Keys and values

/// `prefix/NNNN…` padded with '.' to exactly `size` bytes.
fn key(prefix: &str, n: u64, size: usize) -> String {
    let mut k = format!("{prefix}/{n:010}");
    assert!(k.len() <= size, "key size {size} too small for {k}");
    while k.len() < size {
        k.push('.');
    }
    k
}

/// `size` pseudo-random letters and digits (xorshift seeded by `seed`).
fn value(seed: u64, size: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

// ---------------------------------------------------------------------------------------------
// confmesh counters

/// Peer 1's counters that the benchmark reports as deltas: (name, value).
async fn confmesh_counters(c: &mut Conn) -> Result<Vec<(String, f64)>, String> {
    let Conn::Confmesh(ctl, _) = c else {
        return Ok(Vec::new());
    };
    let status = ctl.call(&json!({"cmd": "status"})).await?;
    let mut out = Vec::new();
    let peers = status["replication"]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for field in [
        "bytes_sent",
        "bytes_received",
        "entries_sent",
        "entries_received",
    ] {
        let sum: f64 = peers.iter().filter_map(|p| p[field].as_f64()).sum();
        out.push((format!("sync_{field}"), sum));
    }
    let metrics = ctl.call(&json!({"cmd": "metrics"})).await?;
    let text = metrics.as_str().unwrap_or_default();
    for family in [
        "confmesh_dataplane_tx_packets_total",
        "confmesh_dataplane_rx_packets_total",
        "confmesh_dataplane_tx_bytes_total",
        "confmesh_dataplane_rx_bytes_total",
        "confmesh_dataplane_fragmentation_attempts_total",
        "confmesh_dataplane_oversize_total",
    ] {
        let sum: f64 = text
            .lines()
            .filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        out.push((family.trim_start_matches("confmesh_").to_owned(), sum));
    }
    Ok(out)
}

/// Whether every other peer has acknowledged every entry peer 1 holds.
async fn confmesh_drained(c: &mut Conn) -> Result<bool, String> {
    let Conn::Confmesh(ctl, _) = c else {
        return Ok(true);
    };
    let status = ctl.call(&json!({"cmd": "status"})).await?;
    let peers = status["replication"]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(!peers.is_empty()
        && peers
            .iter()
            .all(|p| p["connected"] == true && p["lag_entries"].as_u64() == Some(0)))
}

// ---------------------------------------------------------------------------------------------
// Modes

async fn write(args: WriteArgs) -> Result<Value, String> {
    let WriteArgs {
        system,
        target,
        others,
        reader_netns,
        reader_target,
        writers,
        depth,
        rate,
        duration,
        key_size,
        value_size,
        probe_pause_ms,
        poll_us,
        wait_peers,
    } = args;
    let sys = match system {
        System::Confmesh => "confmesh",
        System::Etcd => "etcd",
    };
    // The reader, in peer 2's namespace.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &reader_netns])
        .arg(&exe)
        .args([
            "read",
            "--system",
            sys,
            "--target",
            &reader_target,
            "--poll-us",
            &poll_us.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("start the reader: {e}"))?;
    let mut to_reader = child.stdin.take().expect("piped");
    let mut from_reader = BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), from_reader.next_line()).await;
    if !matches!(&ready, Ok(Ok(Some(l))) if l == "ready") {
        return Err(format!("the reader did not start: {ready:?}"));
    }

    // The probe's connection (and, for etcd, the writers' connections), warmed with one write.
    let mut probe = Conn::open(system, &target).await?;
    if let Conn::Confmesh(_, wait) = &mut probe {
        *wait = wait_peers;
    }
    probe
        .put(&key("warm/probe", 0, key_size), &value(0, value_size))
        .await?;
    let mut etcd_conns = Vec::new();
    if system == System::Etcd {
        for c in 0..writers * depth {
            let mut conn = Conn::open(system, &target).await?;
            conn.put(
                &key(&format!("warm/{c:03}"), 0, key_size),
                &value(c as u64, value_size),
            )
            .await?;
            etcd_conns.push(conn);
        }
    }
    let mut ctl = Conn::open(system, &target).await?;
    let before = confmesh_counters(&mut ctl).await?;

    let max_revision = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(duration);
    let sizes = (key_size, value_size);
    let pacer = Arc::new(Pacer {
        start,
        rate,
        next: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    match system {
        System::Confmesh => {
            for w in 0..writers {
                let path = PathBuf::from(&target);
                tasks.push(tokio::spawn(confmesh_writer(
                    path,
                    w,
                    depth,
                    wait_peers,
                    sizes,
                    end,
                    pacer.clone(),
                )));
            }
        }
        System::Etcd => {
            for (c, conn) in etcd_conns.into_iter().enumerate() {
                tasks.push(tokio::spawn(one_at_a_time_writer(
                    conn,
                    c,
                    sizes,
                    end,
                    max_revision.clone(),
                    pacer.clone(),
                )));
            }
        }
    }

    // Lag probes, one at a time, while the writers run.
    let (mut lags, mut timeouts, mut probe_writes, mut probe_errors) =
        (Vec::new(), 0u64, 0u64, 0u64);
    let mut probe_latencies = Vec::new();
    let mut n = 0u64;
    while Instant::now() < end && probe_errors < 100 {
        let k = key("lag", n, key_size);
        let v = value(u64::MAX - n, value_size);
        n += 1;
        let t = Instant::now();
        match probe.put(&k, &v).await {
            Ok(rev) => {
                let acked = now_ns();
                probe_latencies.push(t.elapsed().as_secs_f64() * 1e3);
                probe_writes += 1;
                max_revision.fetch_max(rev, Ordering::Relaxed);
                to_reader
                    .write_all(format!("{k} {acked}\n").as_bytes())
                    .await
                    .map_err(|e| format!("reader: {e}"))?;
                match tokio::time::timeout(
                    VISIBLE_TIMEOUT + Duration::from_secs(2),
                    from_reader.next_line(),
                )
                .await
                {
                    Ok(Ok(Some(l))) => match l.parse::<i128>() {
                        Ok(ns) => lags.push(ns as f64 / 1e6),
                        Err(_) => timeouts += 1,
                    },
                    other => return Err(format!("reader stopped answering: {other:?}")),
                }
            }
            Err(_) => probe_errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(probe_pause_ms)).await;
    }

    let (mut acked, mut errors, mut latencies, mut last_ack, mut reconnects, mut last_error) = (
        probe_writes,
        probe_errors,
        probe_latencies,
        Instant::now(),
        probe.reconnects(),
        None,
    );
    for t in tasks {
        let w = t.await.map_err(|e| e.to_string())?;
        acked += w.ok;
        errors += w.errors;
        latencies.extend(w.latencies);
        last_ack = last_ack.max(w.done);
        reconnects += w.reconnects;
        last_error = last_error.or(w.last_error);
    }
    let window = last_ack.duration_since(start).as_secs_f64();

    // Until every other peer holds every acknowledged write.
    let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
    let drained = match system {
        System::Confmesh => loop {
            if confmesh_drained(&mut ctl).await? {
                break Some(Instant::now());
            }
            if Instant::now() > drain_deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        },
        System::Etcd => {
            let want = max_revision.load(Ordering::Relaxed);
            let mut members = Vec::new();
            for o in &others {
                members.push(Conn::open(system, o).await?);
            }
            'outer: loop {
                let mut all = true;
                for m in members.iter_mut() {
                    let Conn::Etcd(h) = m else { unreachable!() };
                    let (_, v) = h
                        .post(
                            "/v3/kv/range",
                            &json!({"key": b64("rb/"), "serializable": true, "count_only": true}),
                        )
                        .await?;
                    all &= revision(&v) >= want;
                }
                if all {
                    break 'outer Some(Instant::now());
                }
                if Instant::now() > drain_deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let after = confmesh_counters(&mut ctl).await?;
    drop(to_reader);
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;

    lags.sort_by(f64::total_cmp);
    latencies.sort_by(f64::total_cmp);
    let counters: serde_json::Map<String, Value> = after
        .iter()
        .zip(&before)
        .map(|((name, a), (_, b))| (name.clone(), json!(a - b)))
        .collect();
    Ok(json!({
        "system": sys,
        "writers": writers,
        "depth": depth,
        "rate": rate,
        "wait_peers": wait_peers,
        "key_size": key_size,
        "value_size": value_size,
        "acked": acked,
        "errors": errors,
        "last_error": last_error,
        "window_s": window,
        "writes_per_s": acked as f64 / window,
        "replicated_s": drained.map(|t| t.duration_since(start).as_secs_f64()),
        "replicated_writes_per_s": drained.map(|t| acked as f64 / t.duration_since(start).as_secs_f64()),
        "ack_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99), "max": latencies.last()},
        "lag_ms": {"p50": percentile(&lags, 0.5), "p90": percentile(&lags, 0.9), "p99": percentile(&lags, 0.99),
                   "max": lags.last(), "samples": lags.len(), "timeouts": timeouts},
        "reconnects": reconnects,
        "counters": counters,
    }))
}

/// What one writer did over the window.
struct WriterStats {
    ok: u64,
    errors: u64,
    last_error: Option<String>,
    /// Acknowledgement latency of every acknowledged write, ms.
    latencies: Vec<f64>,
    /// When its last answer came.
    done: Instant,
    reconnects: u64,
}

impl WriterStats {
    fn new() -> WriterStats {
        WriterStats {
            ok: 0,
            errors: 0,
            last_error: None,
            latencies: Vec::with_capacity(1 << 16),
            done: Instant::now(),
            reconnects: 0,
        }
    }
}

/// The schedule of `--rate`: write number i is due at start + i / rate, whichever writer sends it.
struct Pacer {
    start: Instant,
    /// Writes/s; 0 = no schedule.
    rate: u64,
    next: AtomicU64,
}

impl Pacer {
    /// Takes the next slot of the schedule and waits until it is due (at once without a rate).
    async fn wait(&self) {
        if self.rate == 0 {
            return;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let due = self.start + Duration::from_nanos(i.saturating_mul(1_000_000_000) / self.rate);
        tokio::time::sleep_until(due.into()).await;
    }
}

/// A writer stops after this many failed writes in a row.
const MAX_CONSECUTIVE_ERRORS: u32 = 100;

/// One confmesh writer: up to `depth` `config-set` requests in flight on one control connection
/// (pipelined: the next request goes out before the previous is answered; answers come in order).
/// A transport failure counts every unanswered request as failed and reconnects.
async fn confmesh_writer(
    path: PathBuf,
    w: usize,
    depth: usize,
    wait_peers: usize,
    (key_size, value_size): (usize, usize),
    end: Instant,
    pacer: Arc<Pacer>,
) -> WriterStats {
    let mut st = WriterStats::new();
    let prefix = format!("rb/w{w:02}");
    let mut n = 0u64;
    let mut consecutive = 0u32;
    let mut first = true;
    while Instant::now() < end && consecutive < MAX_CONSECUTIVE_ERRORS {
        if !std::mem::take(&mut first) {
            st.reconnects += 1;
        }
        let stream = match UnixStream::connect(&path).await {
            Ok(s) => s,
            Err(e) => {
                st.errors += 1;
                consecutive += 1;
                st.last_error = Some(format!("transport: connect: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (r, mut wr) = stream.into_split();
        let window = tokio::sync::Semaphore::new(depth.max(1));
        let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let send = async {
            let mut lines = Vec::with_capacity(depth * (key_size + value_size + 100));
            while Instant::now() < end {
                // Every free slot of the window is filled at once, in one write.
                let Ok(permit) = window.acquire().await else {
                    break;
                };
                permit.forget();
                let mut batch = 1;
                if pacer.rate > 0 {
                    // One write per slot of the schedule.
                    pacer.wait().await;
                } else {
                    while let Ok(p) = window.try_acquire() {
                        p.forget();
                        batch += 1;
                    }
                }
                lines.clear();
                for _ in 0..batch {
                    let (k, v) = (
                        key(&prefix, n, key_size),
                        value((w as u64) << 40 | n, value_size),
                    );
                    n += 1;
                    let request = if wait_peers == 0 {
                        json!({"cmd": "config-set", "key": k, "value": v})
                    } else {
                        json!({"cmd": "config-set", "key": k, "value": v, "wait_peers": wait_peers})
                    };
                    serde_json::to_writer(&mut lines, &request).expect("JSON");
                    lines.push(b'\n');
                }
                let t = Instant::now();
                if wr.write_all(&lines).await.is_err() {
                    break;
                }
                for _ in 0..batch {
                    let _ = sent_tx.send(t);
                }
            }
            drop(sent_tx);
            wr
        };
        let receive = async {
            let mut r = BufReader::new(r);
            let mut answer = String::new();
            while let Some(t) = sent_rx.recv().await {
                answer.clear();
                let outcome =
                    match tokio::time::timeout(CALL_TIMEOUT, r.read_line(&mut answer)).await {
                        Ok(Ok(n)) if n > 0 => control_answer(&answer),
                        Ok(Ok(_)) => Err("transport: the daemon closed the connection".to_owned()),
                        Ok(Err(e)) => Err(format!("transport: {e}")),
                        Err(_) => Err("transport: no answer in time".to_owned()),
                    };
                match outcome {
                    Ok(_) => {
                        st.latencies.push(t.elapsed().as_secs_f64() * 1e3);
                        st.ok += 1;
                        st.done = Instant::now();
                        consecutive = 0;
                        window.add_permits(1);
                    }
                    Err(e) if e.starts_with("transport:") => {
                        // This one and every request sent after it are lost with the connection.
                        window.close();
                        st.errors += 1 + sent_rx.len() as u64;
                        consecutive += 1;
                        st.last_error = Some(e);
                        return;
                    }
                    Err(e) => {
                        st.errors += 1;
                        consecutive += 1;
                        st.last_error = Some(e);
                        if consecutive >= MAX_CONSECUTIVE_ERRORS {
                            window.close();
                            return;
                        }
                        window.add_permits(1);
                    }
                }
            }
        };
        // The receiver ends once the sender has stopped and every answer is in, or on a transport
        // failure (then the sender is dropped with the connection).
        let mut send = std::pin::pin!(send);
        let mut receive = std::pin::pin!(receive);
        let mut sending = true;
        loop {
            tokio::select! {
                _ = &mut send, if sending => sending = false,
                () = &mut receive => break,
            }
        }
    }
    st
}

/// One writer that waits for each answer before the next write (etcd: one HTTP/1.1 connection).
async fn one_at_a_time_writer(
    mut c: Conn,
    w: usize,
    (key_size, value_size): (usize, usize),
    end: Instant,
    max_revision: Arc<AtomicU64>,
    pacer: Arc<Pacer>,
) -> WriterStats {
    let mut st = WriterStats::new();
    let prefix = format!("rb/w{w:03}");
    let (mut n, mut consecutive) = (0u64, 0u32);
    while Instant::now() < end && consecutive < MAX_CONSECUTIVE_ERRORS {
        let (k, v) = (
            key(&prefix, n, key_size),
            value((w as u64) << 40 | n, value_size),
        );
        n += 1;
        pacer.wait().await;
        let t = Instant::now();
        match c.put(&k, &v).await {
            Ok(rev) => {
                st.latencies.push(t.elapsed().as_secs_f64() * 1e3);
                st.ok += 1;
                st.done = Instant::now();
                consecutive = 0;
                max_revision.fetch_max(rev, Ordering::Relaxed);
            }
            Err(e) => {
                st.errors += 1;
                consecutive += 1;
                st.last_error = Some(e);
            }
        }
    }
    st.reconnects = c.reconnects();
    st
}

async fn read(system: System, target: String, poll_us: u64) -> Result<(), String> {
    let mut conn = Conn::open(system, &target).await?;
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(b"ready\n")
        .await
        .map_err(|e| e.to_string())?;
    stdout.flush().await.map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        let Some((k, acked)) = line.split_once(' ') else {
            continue;
        };
        let acked: i128 = acked.parse().map_err(|e| format!("{line}: {e}"))?;
        let start = Instant::now();
        let answer = loop {
            if conn.exists(k).await? {
                break (now_ns() - acked).to_string();
            }
            if start.elapsed() > VISIBLE_TIMEOUT {
                break "timeout".to_owned();
            }
            // Every `poll_us` at first, then a tenth of the time waited so far (at most 1 ms): a
            // resolution of about 10 % without a read storm on the peer while it lags behind.
            // (tokio's timer has 1 ms granularity; this process does nothing else meanwhile.)
            let pause = (start.elapsed() / 10)
                .min(Duration::from_millis(1))
                .max(Duration::from_micros(poll_us));
            std::thread::sleep(pause);
        };
        stdout
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        stdout.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Write(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async { write(args).await.map(|v| println!("{v}")) }),
        Mode::Read {
            system,
            target,
            poll_us,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(read(system, target, poll_us)),
    };
    if let Err(e) = result {
        eprintln!("write_load: {e}");
        std::process::exit(1);
    }
}
