//! The overlay driver: a TUN device for the overlay addresses and raw IP sockets for AH and ESP on
//! the management address, driving one [`Dataplane`] from two worker threads.
//!
//! - The **outbound** thread reads packets from the TUN in batches, has the core protect them,
//!   applies the fault injection and sends them with `sendmmsg`; ICMP answers go back to the TUN.
//! - The **inbound** thread receives AH and ESP with `recvmmsg`, has the core verify them and
//!   writes the inner packets to the TUN. It also reads the sockets' error queues (ICMP
//!   fragmentation-needed → path MTU), runs the core's timers, sends its probes, forwards its
//!   events and keeps the TUN MTU equal to what the core asks for.
//!
//! Threads, not tokio: each worker blocks in `poll` on two or three descriptors and processes a
//! batch under one lock, which keeps per-packet costs to the crypto and two copies; an async
//! runtime would add a wake-up per batch and buy nothing here. The daemon talks to the [`Overlay`]
//! handle from its tokio tasks and receives events on a tokio channel.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::fault::{FaultConfig, FaultCounters, FaultInjector, Verdict};
use crate::sa::{Protection, SaParams};
use crate::sys::{self, BATCH, RawSocket, RecvSlot, Tun, Waker};
use crate::table::{Action, ConfigError, Dataplane, Event, GlobalCounters, PeerAddrs, PeerStatus};

/// Socket buffer size of the raw sockets: a few milliseconds of a busy gigabit link.
const SOCKET_BUFFER: usize = 4 << 20;
/// Events queued for the daemon before further ones are counted as lost.
const EVENT_QUEUE: usize = 1024;
/// Delayed packets held by the fault injection before further ones are dropped and counted.
const MAX_DELAYED: usize = 8192;
/// Longest a worker sleeps without looking at the stop flag and the timers.
const MAX_SLEEP: Duration = Duration::from_millis(500);
/// Full batches read in a row before a worker looks at its timers again.
const BATCHES_PER_ROUND: usize = 8;

/// How to bring up the overlay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayConfig {
    /// Name of the TUN interface (1-15 bytes), e.g. `"confmesh0"`.
    pub tun_name: String,
    /// This host's management address (raw sockets bind to it) and overlay address (on the TUN).
    pub local: PeerAddrs,
    /// Prefix length of the overlay network routed into the TUN (e.g. 24).
    pub overlay_prefix_len: u8,
    /// Configured cluster-interface MTU, the upper bound of every path MTU.
    pub mtu: u16,
}

/// Why the overlay could not start or a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OverlayError {
    /// The caller's configuration or keys are wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TUN device could not be created or configured (needs CAP_NET_ADMIN and /dev/net/tun).
    #[error("TUN device {name}: {source} (needs CAP_NET_ADMIN and /dev/net/tun)")]
    Tun {
        /// The interface name.
        name: String,
        /// The system error.
        source: io::Error,
    },
    /// A raw socket could not be opened or bound (needs CAP_NET_RAW and the address on a link).
    #[error(
        "raw socket for protocol {protocol} on {addr}: {source} (needs CAP_NET_RAW; is the address configured?)"
    )]
    Socket {
        /// 51 or 50.
        protocol: u8,
        /// The management address.
        addr: Ipv4Addr,
        /// The system error.
        source: io::Error,
    },
    /// A worker thread could not be started.
    #[error("starting a worker thread: {0}")]
    Thread(io::Error),
}

/// Failures of the driver, as opposed to drops by the core.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverCounters {
    /// Events dropped because the daemon did not read the channel.
    pub events_lost: u64,
    /// Reads and writes on the TUN or the raw sockets that failed (e.g. ENOBUFS).
    pub io_errors: u64,
}

/// A peer's status plus what the fault injection did to its packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerReport {
    /// Addresses, path MTU, SAs and counters from the core.
    pub status: PeerStatus,
    /// Fault-injection counters (all zero unless faults were set).
    pub faults: FaultCounters,
}

struct Shared {
    core: Mutex<Dataplane>,
    faults: Mutex<HashMap<Ipv4Addr, FaultInjector>>,
    any_faults: AtomicBool,
    stop: AtomicBool,
    tun: Tun,
    ah: RawSocket,
    esp: RawSocket,
    wake_inbound: Waker,
    wake_outbound: Waker,
    events: mpsc::Sender<Event>,
    events_lost: AtomicU64,
    io_errors: AtomicU64,
    tun_mtu: std::sync::atomic::AtomicU16,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Dataplane> {
        // A worker that panicked leaves a consistent core behind (no invariant spans a panic
        // point), so a poisoned lock is still usable.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn faults(&self) -> MutexGuard<'_, HashMap<Ipv4Addr, FaultInjector>> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn socket(&self, protection: Protection) -> &RawSocket {
        match protection {
            Protection::Ah => &self.ah,
            Protection::EspGcm => &self.esp,
        }
    }

    /// Forwards the core's events, applies its TUN MTU. Called with the core locked.
    fn after_core(&self, core: &mut Dataplane) {
        while let Some(event) = core.poll_event() {
            if self.events.try_send(event).is_err() {
                self.events_lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        let wanted = core.tun_mtu();
        if self.tun_mtu.load(Ordering::Relaxed) != wanted {
            match sys::set_mtu(self.tun.name(), wanted) {
                Ok(()) => {
                    self.tun_mtu.store(wanted, Ordering::Relaxed);
                    tracing::info!(
                        tun = self.tun.name(),
                        mtu = wanted,
                        "TUN MTU follows the path MTU"
                    );
                }
                Err(e) => {
                    self.io_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(tun = self.tun.name(), mtu = wanted, error = %e, "cannot set TUN MTU");
                }
            }
        }
    }

    /// Sends packets of one protocol; a packet the kernel refuses is retried once alone (the
    /// first refusal may report an earlier ICMP error), then counted and skipped.
    fn send(&self, protection: Protection, packets: &[(Ipv4Addr, &[u8])]) {
        let socket = self.socket(protection);
        let mut rest = packets;
        while !rest.is_empty() {
            let (sent, err) = socket.send_batch(rest);
            rest = &rest[sent..];
            let Some(err) = err else {
                if sent == 0 {
                    break;
                }
                continue;
            };
            let Some(&(dst, packet)) = rest.first() else {
                break;
            };
            let (retried, again) = socket.send_batch(&[(dst, packet)]);
            if retried == 0 {
                let err = again.unwrap_or(err);
                if err.raw_os_error() == Some(libc::EMSGSIZE) {
                    self.core().handle_fragmentation_attempt(dst);
                    // The kernel queued the MTU it holds for the path: learn it now rather than
                    // when the inbound worker next wakes, so that the next packets fit.
                    drain_errors(self, socket);
                } else {
                    self.io_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%dst, error = %err, "raw send failed");
                }
            }
            rest = &rest[1..];
        }
    }
}

/// The running overlay: owns the TUN device, the raw sockets and the two worker threads, which
/// stop when it is dropped. Every method takes `&self` and may be called from any thread.
pub struct Overlay {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("tun", &self.shared.tun.name())
            .finish_non_exhaustive()
    }
}

impl Overlay {
    /// Creates the TUN device with the local overlay address, opens the raw sockets on the
    /// management address and starts the workers. Events (rekey requests, expiries, path-MTU
    /// changes) arrive on the returned receiver.
    pub fn start(config: OverlayConfig) -> Result<(Self, mpsc::Receiver<Event>), OverlayError> {
        let core = Dataplane::new(config.local, config.mtu)?;
        let tun_err = |source| OverlayError::Tun {
            name: config.tun_name.clone(),
            source,
        };
        let tun = Tun::open(&config.tun_name).map_err(tun_err)?;
        let tun_mtu = core.tun_mtu();
        // The overlay is IPv4 only: keep the kernel's IPv6 neighbour discovery off the TUN, from
        // before it comes up. A kernel without IPv6 has no such file, which is as good.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tun.name()),
            "1",
        );
        sys::configure_interface(
            tun.name(),
            config.local.overlay,
            config.overlay_prefix_len,
            tun_mtu,
        )
        .map_err(tun_err)?;
        let raw = |p: Protection| {
            RawSocket::open(p.ip_protocol(), config.local.mgmt, SOCKET_BUFFER).map_err(|source| {
                OverlayError::Socket {
                    protocol: p.ip_protocol(),
                    addr: config.local.mgmt,
                    source,
                }
            })
        };
        let (events, receiver) = mpsc::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            faults: Mutex::new(HashMap::new()),
            any_faults: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ah: raw(Protection::Ah)?,
            esp: raw(Protection::EspGcm)?,
            tun,
            wake_inbound: Waker::new().map_err(OverlayError::Thread)?,
            wake_outbound: Waker::new().map_err(OverlayError::Thread)?,
            events,
            events_lost: AtomicU64::new(0),
            io_errors: AtomicU64::new(0),
            tun_mtu: std::sync::atomic::AtomicU16::new(tun_mtu),
        });
        let buf_len = usize::from(config.mtu).max(2048);
        let mut overlay = Self {
            shared,
            workers: Vec::new(),
        };
        let s = Arc::clone(&overlay.shared);
        overlay.workers.push(
            std::thread::Builder::new()
                .name("confmesh-dp-in".into())
                .spawn(move || inbound_worker(&s, buf_len))
                .map_err(OverlayError::Thread)?,
        );
        let s = Arc::clone(&overlay.shared);
        overlay.workers.push(
            std::thread::Builder::new()
                .name("confmesh-dp-out".into())
                .spawn(move || outbound_worker(&s, buf_len))
                .map_err(OverlayError::Thread)?,
        );
        Ok((overlay, receiver))
    }

    /// The TUN interface's name.
    pub fn tun_name(&self) -> &str {
        self.shared.tun.name()
    }

    /// Installs an SA pair from IKE for `peer` (see [`Dataplane::install_sa_pair`]: the outbound
    /// SA replaces the old one at once, the inbound one joins the old ones until they expire).
    pub fn install_sa_pair(
        &self,
        peer: PeerAddrs,
        outbound: &SaParams<'_>,
        inbound: &SaParams<'_>,
    ) -> Result<(), OverlayError> {
        let mut core = self.shared.core();
        core.install_sa_pair(Instant::now(), peer, outbound, inbound)?;
        self.shared.after_core(&mut core);
        drop(core);
        // The new peer's probe and SA timers change the inbound worker's deadline.
        self.shared.wake_inbound.wake();
        Ok(())
    }

    /// Removes one inbound SA (IKE received a DELETE). Returns whether it existed.
    pub fn remove_inbound_sa(&self, protection: Protection, spi: u32) -> bool {
        self.shared.core().remove_inbound_sa(protection, spi)
    }

    /// Removes a peer and all its SAs and faults. Returns whether it existed.
    pub fn remove_peer(&self, mgmt: Ipv4Addr) -> bool {
        self.set_faults(mgmt, FaultConfig::default());
        let mut core = self.shared.core();
        let existed = core.remove_peer(mgmt);
        self.shared.after_core(&mut core);
        existed
    }

    /// Status, counters and fault counters of one peer.
    pub fn peer_report(&self, mgmt: Ipv4Addr) -> Option<PeerReport> {
        let status = self.shared.core().peer_status(mgmt)?;
        let faults = self
            .shared
            .faults()
            .get(&mgmt)
            .map(FaultInjector::counters)
            .unwrap_or_default();
        Some(PeerReport { status, faults })
    }

    /// The current path MTU to a peer.
    pub fn path_mtu(&self, mgmt: Ipv4Addr) -> Option<u16> {
        self.shared.core().peer_status(mgmt).map(|s| s.path_mtu)
    }

    /// The TUN MTU in force.
    pub fn tun_mtu(&self) -> u16 {
        self.shared.tun_mtu.load(Ordering::Relaxed)
    }

    /// Drops no peer can be blamed for.
    pub fn global_counters(&self) -> GlobalCounters {
        self.shared.core().counters()
    }

    /// What went wrong in the driver itself since start.
    pub fn driver_counters(&self) -> DriverCounters {
        DriverCounters {
            events_lost: self.shared.events_lost.load(Ordering::Relaxed),
            io_errors: self.shared.io_errors.load(Ordering::Relaxed),
        }
    }

    /// Sets (or, with the default configuration, clears) the fault injection on the outbound
    /// path to one peer. Takes effect for the next packet; counters restart.
    pub fn set_faults(&self, mgmt: Ipv4Addr, config: FaultConfig) {
        let mut faults = self.shared.faults();
        if config.is_active() {
            faults.insert(mgmt, FaultInjector::new(config));
        } else {
            faults.remove(&mgmt);
        }
        self.shared
            .any_faults
            .store(!faults.is_empty(), Ordering::Relaxed);
        drop(faults);
        self.shared.wake_outbound.wake();
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake_inbound.wake();
        self.shared.wake_outbound.wake();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn until(deadline: Option<Instant>, now: Instant) -> Duration {
    deadline.map_or(MAX_SLEEP, |d| {
        d.saturating_duration_since(now).min(MAX_SLEEP)
    })
}

fn inbound_worker(s: &Shared, buf_len: usize) {
    let mut slots: Vec<RecvSlot> = (0..BATCH)
        .map(|_| RecvSlot {
            buf: vec![0; buf_len],
            len: 0,
        })
        .collect();
    let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0; buf_len]).collect();
    let mut accepted = [None::<usize>; BATCH];
    let mut probe = vec![0u8; buf_len];
    while !s.stop.load(Ordering::Relaxed) {
        let deadline = s.core().poll_timeout();
        let fds = [
            s.ah.as_raw_fd(),
            s.esp.as_raw_fd(),
            s.wake_inbound.as_raw_fd(),
        ];
        let ready = match sys::poll(fds, Some(until(deadline, Instant::now()))) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "poll failed; inbound worker stops");
                return;
            }
        };
        if ready[2].readable {
            s.wake_inbound.reset();
        }
        for (socket, r) in [(&s.ah, ready[0]), (&s.esp, ready[1])] {
            if r.error {
                drain_errors(s, socket);
            }
            if r.readable {
                receive(s, socket, &mut slots, &mut outs, &mut accepted);
            }
        }
        loop {
            let mut core = s.core();
            let now = Instant::now();
            if core.poll_timeout().is_some_and(|t| t <= now) {
                core.handle_timeout(now);
            }
            let probe_action = core.poll_probe(now, &mut probe);
            s.after_core(&mut core);
            drop(core);
            let Some(Action::WriteToNetwork {
                dst,
                protection,
                len,
            }) = probe_action
            else {
                break;
            };
            s.send(protection, &[(dst, &probe[..len])]);
        }
    }
}

/// Receives, verifies and delivers batches from one raw socket until it is drained (or for a
/// bounded number of batches, so timers are not starved).
fn receive(
    s: &Shared,
    socket: &RawSocket,
    slots: &mut [RecvSlot],
    outs: &mut [Vec<u8>],
    accepted: &mut [Option<usize>; BATCH],
) {
    for _ in 0..BATCHES_PER_ROUND {
        let n = match socket.recv_batch(slots) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            // A pending socket error (from an ICMP report) surfaces once here.
            Err(_) => {
                drain_errors(s, socket);
                continue;
            }
        };
        {
            let mut core = s.core();
            let now = Instant::now();
            for ((slot, out), result) in slots
                .iter()
                .zip(outs.iter_mut())
                .zip(accepted.iter_mut())
                .take(n)
            {
                let packet = slot.buf.get(..slot.len).unwrap_or_default();
                *result = match core.handle_network_packet(now, packet, out) {
                    Action::WriteToTun { len } => Some(len),
                    _ => None,
                };
            }
            s.after_core(&mut core);
        }
        for (out, result) in outs.iter().zip(accepted.iter()).take(n) {
            if let Some(len) = *result {
                if s.tun.write(&out[..len]).is_err() {
                    s.io_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if n < BATCH {
            return;
        }
    }
}

/// Reads a raw socket's error queue: fragmentation-needed reports lower the path MTU.
fn drain_errors(s: &Shared, socket: &RawSocket) {
    // Bounded: the kernel caps the queue by the socket buffer; this caps our time on it.
    for _ in 0..64 {
        match socket.recv_error() {
            Ok(report) => {
                if let Some(mtu) = report.mtu {
                    let mut core = s.core();
                    core.handle_path_mtu(Instant::now(), report.dst, mtu);
                    s.after_core(&mut core);
                }
            }
            Err(_) => return,
        }
    }
}

/// One delayed packet of the fault injection.
struct Delayed {
    dst: Ipv4Addr,
    protection: Protection,
    len: usize,
    buf: Vec<u8>,
}

/// Packets held back by the fault injection, released in time order. Buffers are recycled, and
/// at most [`MAX_DELAYED`] are held.
#[derive(Default)]
struct DelayQueue {
    heap: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    slots: Vec<Delayed>,
    free: Vec<usize>,
    seq: u64,
}

impl DelayQueue {
    fn push(&mut self, at: Instant, dst: Ipv4Addr, protection: Protection, packet: &[u8]) -> bool {
        let index = match self.free.pop() {
            Some(i) => i,
            None if self.slots.len() < MAX_DELAYED => {
                self.slots.push(Delayed {
                    dst,
                    protection,
                    len: 0,
                    buf: Vec::new(),
                });
                self.slots.len() - 1
            }
            None => return false,
        };
        let slot = &mut self.slots[index];
        slot.dst = dst;
        slot.protection = protection;
        slot.len = packet.len();
        slot.buf.clear();
        slot.buf.extend_from_slice(packet);
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, index)));
        true
    }

    fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Sends every packet due at `now`.
    fn release(&mut self, s: &Shared, now: Instant) {
        while let Some(Reverse((at, _, index))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            let d = &self.slots[index];
            s.send(d.protection, &[(d.dst, &d.buf[..d.len])]);
            self.free.push(index);
        }
    }
}

fn outbound_worker(s: &Shared, buf_len: usize) {
    let mut ins: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0; buf_len]).collect();
    let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0; buf_len]).collect();
    let mut actions = [Action::Done; BATCH];
    let mut delayed = DelayQueue::default();
    while !s.stop.load(Ordering::Relaxed) {
        let fds = [s.tun.as_raw_fd(), s.wake_outbound.as_raw_fd()];
        let ready = match sys::poll(fds, Some(until(delayed.next_at(), Instant::now()))) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "poll failed; outbound worker stops");
                return;
            }
        };
        if ready[1].readable {
            s.wake_outbound.reset();
        }
        delayed.release(s, Instant::now());
        if !ready[0].readable {
            continue;
        }
        for _ in 0..BATCHES_PER_ROUND {
            let mut n = 0;
            while n < BATCH {
                match s.tun.read(&mut ins[n]) {
                    Ok(len) => {
                        // Reuse the action slot to remember the read length until processed.
                        actions[n] = Action::WriteToTun { len };
                        n += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        s.io_errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            if n == 0 {
                break;
            }
            let now = Instant::now();
            {
                let mut core = s.core();
                for ((input, out), action) in ins
                    .iter()
                    .zip(outs.iter_mut())
                    .zip(actions.iter_mut())
                    .take(n)
                {
                    let Action::WriteToTun { len } = *action else {
                        continue;
                    };
                    *action = core.handle_tun_packet(now, &input[..len], out);
                }
                s.after_core(&mut core);
            }
            transmit(s, &outs[..n], &actions[..n], &mut delayed, now);
            if n < BATCH {
                break;
            }
        }
    }
}

/// Sends a processed batch: ICMP answers to the TUN, the rest through the fault injection (when
/// set) and `sendmmsg`, grouped by protocol.
fn transmit(
    s: &Shared,
    outs: &[Vec<u8>],
    actions: &[Action],
    delayed: &mut DelayQueue,
    now: Instant,
) {
    let mut faults = s.any_faults.load(Ordering::Relaxed).then(|| s.faults());
    for protection in [Protection::Ah, Protection::EspGcm] {
        let mut batch: [(Ipv4Addr, &[u8]); BATCH] = [(Ipv4Addr::UNSPECIFIED, &[]); BATCH];
        let mut k = 0;
        for (out, action) in outs.iter().zip(actions) {
            let Action::WriteToNetwork {
                dst,
                protection: p,
                len,
            } = *action
            else {
                continue;
            };
            if p != protection {
                continue;
            }
            let packet = &out[..len];
            if let Some(injector) = faults.as_mut().and_then(|f| f.get_mut(&dst)) {
                match injector.handle_packet(now) {
                    Verdict::Drop => continue,
                    Verdict::Send { at, duplicate_at } => {
                        let mut hold = |t: Instant| {
                            if !delayed.push(t, dst, p, packet) {
                                injector.handle_queue_overflow();
                            }
                        };
                        if let Some(t) = duplicate_at {
                            hold(t);
                        }
                        if at > now {
                            hold(at);
                            continue;
                        }
                    }
                }
            }
            batch[k] = (dst, packet);
            k += 1;
        }
        drop(faults.take());
        if k > 0 {
            s.send(protection, &batch[..k]);
        }
        faults = s.any_faults.load(Ordering::Relaxed).then(|| s.faults());
    }
    drop(faults);
    for (out, action) in outs.iter().zip(actions) {
        if let Action::WriteToTun { len } = *action {
            if s.tun.write(&out[..len]).is_err() {
                s.io_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
