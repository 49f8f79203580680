//! The thin I/O layer: UDP and TCP sockets on port 5060 of each rendezvous address, feeding whole
//! messages to a sans-IO core through one bounded channel and sending what the core asks for.
//!
//! TCP connections, inbound (from the VCS) and outbound (to bridges with `;transport=tcp`), are
//! keyed by remote address so a response or in-dialog request reuses the connection the peer opened.
//! Each connection has a bounded read buffer (one [`MAX_MESSAGE`] plus a read) and a bounded write
//! queue; a stream that cannot be framed is answered 400 where possible and closed.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::framing::{next_frame, Frame};
use super::parse::{error_response, MAX_MESSAGE};
use super::transaction::Transmit;
use super::Transport;

/// Most simultaneous TCP connections; beyond it new ones are refused (closed at once).
pub const MAX_TCP_CONNECTIONS: usize = 1024;
/// Messages queued toward one TCP connection before further ones are dropped (the transaction
/// layer retransmits nothing over TCP, so this only guards against a peer that stops reading).
const TCP_WRITE_QUEUE: usize = 256;

/// One message received: the core parses `data` itself.
#[derive(Debug)]
pub struct Inbound {
    /// Sender.
    pub src: SocketAddr,
    /// Our address it arrived on.
    pub local: SocketAddr,
    /// UDP or TCP.
    pub transport: Transport,
    /// Exactly one message (a datagram, or one frame cut from a stream).
    pub data: Bytes,
}

/// Counters of the socket layer, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TransportStats {
    /// Stream bytes that could not be framed (connection closed).
    pub framing_errors: u64,
    /// Messages dropped because a queue was full or a connection could not be opened.
    pub send_failures: u64,
    /// TCP connections refused at [`MAX_TCP_CONNECTIONS`].
    pub refused_connections: u64,
}

type Conns = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>>;

/// The sockets of one B2BUA: bound once, used by the driver task.
pub struct SipSockets {
    udp: HashMap<SocketAddr, Arc<UdpSocket>>,
    conns: Conns,
    inbound: mpsc::Sender<Inbound>,
    stats: Arc<Mutex<TransportStats>>,
    tasks: JoinSet<()>,
}

impl SipSockets {
    /// Binds UDP and TCP on every address of `locals` and starts their readers; every message
    /// goes to `inbound`. Fails (naming the address) if any bind fails.
    pub async fn bind(locals: &[SocketAddr], inbound: mpsc::Sender<Inbound>) -> io::Result<SipSockets> {
        let mut s = SipSockets {
            udp: HashMap::new(),
            conns: Arc::new(Mutex::new(HashMap::new())),
            inbound,
            stats: Arc::new(Mutex::new(TransportStats::default())),
            tasks: JoinSet::new(),
        };
        for &local in locals {
            let udp = Arc::new(
                UdpSocket::bind(local).await.map_err(|e| io::Error::new(e.kind(), format!("SIP UDP {local}: {e}")))?,
            );
            let local = udp.local_addr()?;
            s.udp.insert(local, udp.clone());
            let tx = s.inbound.clone();
            s.tasks.spawn(async move {
                let mut buf = vec![0u8; MAX_MESSAGE + 1];
                loop {
                    let Ok((n, src)) = udp.recv_from(&mut buf).await else { continue };
                    let data = Bytes::copy_from_slice(buf.get(..n).unwrap_or(&[]));
                    if tx.send(Inbound { src, local, transport: Transport::Udp, data }).await.is_err() {
                        return;
                    }
                }
            });
            let sock = TcpSocket::new_v4()?;
            sock.set_reuseaddr(true)?;
            sock.bind(local).map_err(|e| io::Error::new(e.kind(), format!("SIP TCP {local}: {e}")))?;
            let listener: TcpListener = sock.listen(128)?;
            let (conns, tx, stats) = (s.conns.clone(), s.inbound.clone(), s.stats.clone());
            s.tasks.spawn(async move {
                loop {
                    let Ok((stream, src)) = listener.accept().await else { continue };
                    if conns.lock().map(|c| c.len()).unwrap_or(usize::MAX) >= MAX_TCP_CONNECTIONS {
                        if let Ok(mut st) = stats.lock() {
                            st.refused_connections += 1;
                        }
                        continue;
                    }
                    start_connection(stream, src, local, conns.clone(), tx.clone(), stats.clone());
                }
            });
        }
        Ok(s)
    }

    /// The bound addresses (useful when a port 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp.keys().copied().collect()
    }

    /// Current counters.
    pub fn stats(&self) -> TransportStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Sends one message; never blocks the caller on a slow TCP peer.
    pub fn send(&self, t: Transmit) {
        match t.transport {
            Transport::Udp => {
                let sock = self.udp.get(&t.local).or_else(|| self.udp.values().next());
                let sent = sock.is_some_and(|s| s.try_send_to(&t.data, t.dest).is_ok());
                if !sent {
                    self.count_failure();
                }
            }
            Transport::Tcp => {
                let existing = self.conns.lock().ok().and_then(|c| c.get(&t.dest).cloned());
                match existing {
                    Some(q) => {
                        if q.try_send(t.data).is_err() {
                            self.count_failure();
                        }
                    }
                    None => {
                        let (conns, tx, stats) = (self.conns.clone(), self.inbound.clone(), self.stats.clone());
                        tokio::spawn(async move {
                            let connected = async {
                                let sock = TcpSocket::new_v4()?;
                                sock.bind(SocketAddr::new(t.local.ip(), 0))?;
                                sock.connect(t.dest).await
                            };
                            match tokio::time::timeout(std::time::Duration::from_secs(5), connected).await {
                                Ok(Ok(stream)) => {
                                    let q = start_connection(stream, t.dest, t.local, conns, tx, stats);
                                    let _ = q.try_send(t.data);
                                }
                                _ => {
                                    if let Ok(mut s) = stats.lock() {
                                        s.send_failures += 1;
                                    }
                                }
                            }
                        });
                    }
                }
            }
        }
    }

    fn count_failure(&self) {
        if let Ok(mut s) = self.stats.lock() {
            s.send_failures += 1;
        }
    }
}

impl Drop for SipSockets {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Registers a connection and spawns its reader and writer; returns its write queue.
fn start_connection(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    conns: Conns,
    inbound: mpsc::Sender<Inbound>,
    stats: Arc<Mutex<TransportStats>>,
) -> mpsc::Sender<Bytes> {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (qtx, mut qrx) = mpsc::channel::<Bytes>(TCP_WRITE_QUEUE);
    if let Ok(mut c) = conns.lock() {
        c.insert(peer, qtx.clone());
    }
    tokio::spawn(async move {
        while let Some(b) = qrx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let writer = qtx.clone();
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(8192);
        'conn: loop {
            loop {
                match next_frame(&buf) {
                    Ok(Frame::Incomplete) => break,
                    Ok(Frame::KeepAlive { consumed, pong }) => {
                        let _ = buf.split_to(consumed.min(buf.len()));
                        if pong {
                            let _ = writer.try_send(Bytes::from_static(b"\r\n"));
                        }
                    }
                    Ok(Frame::Message(n)) => {
                        let data = buf.split_to(n.min(buf.len())).freeze();
                        let msg = Inbound { src: peer, local, transport: Transport::Tcp, data };
                        if inbound.send(msg).await.is_err() {
                            break 'conn;
                        }
                    }
                    Err(e) => {
                        let mut out = Vec::new();
                        if error_response(&buf, e, &mut out) {
                            let _ = writer.try_send(Bytes::from(out));
                        }
                        if let Ok(mut s) = stats.lock() {
                            s.framing_errors += 1;
                        }
                        break 'conn;
                    }
                }
            }
            // The buffer holds less than one message (else it was framed or refused above).
            buf.reserve(8192);
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if let Ok(mut c) = conns.lock() {
            if c.get(&peer).is_some_and(|q| q.same_channel(&writer)) {
                c.remove(&peer);
            }
        }
    });
    qtx
}
