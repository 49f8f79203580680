//! The sync protocol between two peers, sans-IO: bytes and time in, bytes, store requests and
//! events out. No sockets, threads or clocks in here; [`crate::service`] drives it over TCP and the
//! simulation test drives it over a virtual network.
//!
//! # Protocol
//! On connect each side sends `Hello { origin, vector, joining }`. Each side then sends the entries
//! the other lacks according to that vector (read from its store in bounded batches), and after that
//! streams new writes as they are committed: its own writes at once, other origins' writes only
//! if the peer still lacks them [`RELAY_HOLD`] later (in a full mesh their writer sends them; a
//! peer cut off from the writer gets them through us). A peer that is joining the cluster (see
//! [`crate::store::Store::join`]) gets a snapshot from a peer that is not, whatever its vector.
//! The receiver applies a batch durably, then acknowledges with its whole vector; acknowledgements drive "wait until k peers have it", tombstone collection and
//! lag status. If the peer's vector is older than what tombstone collection kept, the sender sends a
//! snapshot instead.
//!
//! # Frames
//! `len: u32 BE` (bytes that follow), `version: u8`, `type: u8`, payload, `crc32: u32 BE` over version,
//! type and payload. A frame longer than [`MAX_FRAME`] is malformed. A TCP stream cannot be
//! resynchronised after a bad frame, so any malformed frame ends the session (counted, never a
//! panic); the driver reconnects and the sync resumes from the vectors.
//!
//! Payloads are binary: a hello is `origin u32`, a vector, `joining u8`; a vector is `count: u16`
//! then per origin `origin u32, wall_ms u64, logical u32`; an entry is `ns u8, stamp (16 bytes), key_len u16, key, value_len u32
//! (0xFFFF_FFFF = tombstone), value as JSON`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::hlc::{HLC_BYTES, Hlc};
use crate::model::{Entry, MAX_KEY_BYTES, MAX_VALUE_BYTES, Namespace, VersionVector};
use crate::store::{ChangeSet, Snapshot};

/// Protocol version carried in every frame; a peer speaking another version is refused.
pub const PROTOCOL_VERSION: u8 = 2;
/// Largest frame (bytes after the length field). Bounds what a peer can make us buffer per frame
/// and keeps one frame well inside a TCP window.
pub const MAX_FRAME: usize = 1024 * 1024;
/// Entries asked from the store per pull: bounds the work and memory of one step.
pub const PULL_LIMIT: usize = 512;
/// Outbound bytes above which the session stops pulling from the store (backpressure): a slow peer
/// makes us read less, never buffer more.
pub const OUTBOUND_HIGH_WATER: usize = 1024 * 1024;
/// Largest snapshot a peer may send us, in frame bytes.
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;
/// Send a ping when nothing was sent for this long, so the peer's idle timer does not fire.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// Give up on a peer that sent nothing (not even a ping) for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long another origin's write may be missing at the peer before we send it ourselves. Its
/// writer normally does, and the peer's acknowledgement comes back well within this; relaying at
/// once would send most writes twice to every peer of a 3-peer mesh.
pub const RELAY_HOLD: Duration = Duration::from_millis(300);

const FRAME_OVERHEAD: usize = 1 + 1 + 4;
const MAX_PAYLOAD: usize = MAX_FRAME - FRAME_OVERHEAD;
const TOMBSTONE_LEN: u32 = u32::MAX;

const T_HELLO: u8 = 1;
const T_ENTRIES: u8 = 2;
const T_ACK: u8 = 3;
const T_SNAP_BEGIN: u8 = 4;
const T_SNAP_CHUNK: u8 = 5;
const T_SNAP_END: u8 = 6;
const T_PING: u8 = 7;

/// Why a session ended, and whose fault it is. After any error the session is dead: the driver
/// closes the connection and may reconnect later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The peer sent bytes that are not a valid frame or message (peer's fault, or a damaged link).
    #[error("peer sent a malformed sync frame: {0}")]
    Malformed(&'static str),
    /// The peer speaks another protocol version (incompatible software versions).
    #[error("peer speaks sync protocol version {0}, this peer speaks {PROTOCOL_VERSION}")]
    Incompatible(u8),
    /// The peer sent a valid message at the wrong time (peer misbehaved).
    #[error("peer broke the sync protocol: {0}")]
    Protocol(&'static str),
    /// The peer introduced itself with another origin id than the one we connected to
    /// (misconfigured peer list or address reuse).
    #[error("expected peer {expected}, but it introduced itself as {got}")]
    UnexpectedPeer {
        /// The origin id we expected.
        expected: u32,
        /// The origin id it announced.
        got: u32,
    },
    /// The peer sent nothing for [`IDLE_TIMEOUT`] (unreachable or hung).
    #[error("peer silent for {0:?}")]
    Timeout(Duration),
}

/// What the session needs from the store; the driver answers with [`Session::handle_changes`] or
/// [`Session::handle_snapshot`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Pull {
    /// Call `store.changes_since_of(&since, limit, origins.as_deref())`.
    Changes {
        /// What the peer is known to have.
        since: VersionVector,
        /// Most entries to return.
        limit: usize,
        /// Only these origins' writes (`None`: all, for the catch-up after connecting).
        origins: Option<Vec<u32>>,
    },
    /// Call `store.snapshot()`.
    Snapshot,
}

/// Something the driver must act on.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SyncEvent {
    /// The peer introduced itself. Followed by [`SyncEvent::PeerAcked`] with the same vector.
    Connected {
        /// Its origin id.
        peer: u32,
        /// What it had when it connected.
        vector: VersionVector,
    },
    /// Entries to apply with `store.apply_remote(entries, seen, …)`, then call
    /// [`Session::handle_applied`] so the peer gets an acknowledgement.
    EntriesReceived {
        /// The entries, per origin in stamp order.
        entries: Vec<Entry>,
        /// Set on the last batch of a catch-up: after applying, this peer has seen all of it.
        seen: Option<VersionVector>,
    },
    /// A full snapshot to merge with `store.apply_snapshot`, then call [`Session::handle_applied`].
    SnapshotReceived(Snapshot),
    /// The peer durably holds everything this vector summarises.
    PeerAcked(VersionVector),
}

/// Counters of one session, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Bytes handed to the driver for sending.
    pub bytes_sent: u64,
    /// Bytes received from the peer.
    pub bytes_received: u64,
    /// Entries queued to the peer (including snapshot entries).
    pub entries_sent: u64,
    /// Entries received from the peer (including snapshot entries).
    pub entries_received: u64,
    /// Malformed frames (each one ends the session).
    pub malformed: u64,
}

/// What a session needs to know of the local store when it starts.
#[derive(Debug, Clone)]
pub struct Local {
    /// This peer's origin id, sent in the hello.
    pub origin: u32,
    /// The id the store stamps its own writes with ([`crate::store::Store::replica`]).
    pub replica: u32,
    /// The store's vector.
    pub vector: VersionVector,
    /// Whether the store is joining ([`crate::store::Store::joining`]).
    pub joining: bool,
}

/// One sync session with one peer over one connection.
///
/// Driver loop, in this order: feed received bytes with [`Session::handle_bytes`]; act on every
/// [`Session::poll_event`] (apply, then [`Session::handle_applied`]); answer every
/// [`Session::poll_pull`] from the store; call [`Session::notify_store_changed`] with the store's
/// vector when the store committed something; send what [`Session::poll_transmit`] gives; sleep until the next read,
/// store change or [`Session::poll_timeout`], then call [`Session::handle_timeout`].
#[derive(Debug)]
pub struct Session {
    expected_peer: Option<u32>,
    peer: Option<u32>,
    /// What the peer has, as far as we know: its hello vector, plus what we sent, plus its acks.
    estimate: VersionVector,
    acked: Option<VersionVector>,
    /// The store changed, or the last pull was cut short: pull again.
    dirty: bool,
    pull_outstanding: bool,
    want_snapshot: bool,
    /// Our store is joining: never serve a snapshot (we do not hold the cluster's content yet).
    local_joining: bool,
    /// The peer is joining and waits for a snapshot we have not sent yet.
    peer_joining: bool,
    /// Our own writes' id: streamed at once.
    replica: u32,
    /// The store's vector, as last told.
    local: VersionVector,
    /// The catch-up after the hello (all origins) is done; from then on other origins are relayed
    /// only when the peer lacks them for [`RELAY_HOLD`].
    caught_up: bool,
    /// Per other origin: since when the peer lacks its writes up to this stamp.
    missing: BTreeMap<u32, (Instant, Hlc)>,
    /// Other origins whose writes the peer lacked for [`RELAY_HOLD`]: pulled until complete.
    relay: BTreeSet<u32>,
    /// The origins of the outstanding pull (`None`: all).
    pulled: Option<Vec<u32>>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    ack_pending: Option<VersionVector>,
    last_ack: Option<VersionVector>,
    ping_pending: bool,
    snapshot_rx: Option<(Snapshot, usize)>,
    events: VecDeque<SyncEvent>,
    last_rx: Instant,
    last_tx: Instant,
    dead: Option<SyncError>,
    stats: SessionStats,
}

impl Session {
    /// A session of this peer, whose store is described by `local`. `expected_peer` is the origin id
    /// of the peer we dialled (`None` for an accepted connection: any peer may introduce itself;
    /// the driver checks it against the peer list on [`SyncEvent::Connected`]).
    pub fn new(local: Local, expected_peer: Option<u32>, now: Instant) -> Session {
        let mut s = Session {
            expected_peer,
            peer: None,
            estimate: VersionVector::new(),
            acked: None,
            dirty: true,
            pull_outstanding: false,
            want_snapshot: false,
            local_joining: local.joining,
            peer_joining: false,
            replica: local.replica,
            local: VersionVector::new(),
            caught_up: false,
            missing: BTreeMap::new(),
            relay: BTreeSet::new(),
            pulled: None,
            inbuf: Vec::new(),
            out: Vec::new(),
            ack_pending: None,
            last_ack: None,
            ping_pending: false,
            snapshot_rx: None,
            events: VecDeque::new(),
            last_rx: now,
            last_tx: now,
            dead: None,
            stats: SessionStats::default(),
        };
        let mut f = FrameWriter::start(&mut s.out, T_HELLO);
        f.u32(local.origin);
        f.vector(&local.vector);
        f.u8(u8::from(local.joining));
        f.finish();
        s.local = local.vector;
        s
    }

    /// Our store stopped (or started) joining: once it holds the cluster's content it serves the
    /// snapshot a joining peer is waiting for.
    pub fn set_joining(&mut self, joining: bool) {
        self.local_joining = joining;
        self.offer_snapshot();
    }

    fn offer_snapshot(&mut self) {
        if self.peer_joining && !self.local_joining {
            self.peer_joining = false;
            self.want_snapshot = true;
        }
    }

    /// The peer's origin id, once it introduced itself.
    pub fn peer(&self) -> Option<u32> {
        self.peer
    }

    /// The peer said it is joining and we, joining too, have no snapshot for it. When every peer
    /// of a cluster waits like this, none ever will have one (see the daemon's founding rule).
    pub fn peer_waits_for_snapshot(&self) -> bool {
        self.peer_joining
    }

    /// The peer's latest acknowledged vector.
    pub fn acked(&self) -> Option<&VersionVector> {
        self.acked.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Bytes waiting to be sent.
    pub fn queue_depth(&self) -> usize {
        self.out.len()
    }

    /// Feed bytes received from the peer. An error ends the session.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) -> Result<(), SyncError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        self.last_rx = now;
        self.stats.bytes_received += data.len() as u64;
        // Taken out while frames are parsed so that they can be read in place (no copy per frame).
        let mut inbuf = std::mem::take(&mut self.inbuf);
        inbuf.extend_from_slice(data);
        let mut pos = 0;
        let result = loop {
            let Some(rest) = inbuf.get(pos..) else {
                break Ok(());
            };
            let Some(len_bytes) = rest.get(..4) else {
                break Ok(());
            };
            let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]])
                as usize;
            if !(FRAME_OVERHEAD..=MAX_FRAME).contains(&len) {
                break Err(SyncError::Malformed("frame length out of range"));
            }
            let Some(body) = rest.get(4..4 + len) else {
                break Ok(());
            };
            pos += 4 + len;
            if let Err(e) = self.frame(body) {
                break Err(e);
            }
        };
        inbuf.drain(..pos.min(inbuf.len()));
        self.inbuf = inbuf;
        self.note_missing(now);
        if let Err(e) = &result {
            if matches!(e, SyncError::Malformed(_)) {
                self.stats.malformed += 1;
            }
            self.dead = Some(e.clone());
        }
        result
    }

    fn frame(&mut self, body: &[u8]) -> Result<(), SyncError> {
        let (content, crc) = body.split_at(body.len().saturating_sub(4));
        let crc = u32::from_be_bytes(
            crc.try_into()
                .map_err(|_| SyncError::Malformed("short frame"))?,
        );
        if crc32fast::hash(content) != crc {
            return Err(SyncError::Malformed("checksum mismatch"));
        }
        let mut r = Reader(content);
        let version = r.u8()?;
        if version != PROTOCOL_VERSION {
            return Err(SyncError::Incompatible(version));
        }
        let ty = r.u8()?;
        if ty != T_HELLO && self.peer.is_none() {
            return Err(SyncError::Protocol("message before hello"));
        }
        match ty {
            T_HELLO => {
                if self.peer.is_some() {
                    return Err(SyncError::Protocol("second hello"));
                }
                let origin = r.u32()?;
                let vector = r.vector()?;
                let joining = r.flag()?;
                r.end()?;
                if let Some(expected) = self.expected_peer {
                    if expected != origin {
                        return Err(SyncError::UnexpectedPeer {
                            expected,
                            got: origin,
                        });
                    }
                }
                self.peer = Some(origin);
                self.peer_joining = joining;
                self.offer_snapshot();
                self.estimate = vector.clone();
                // A hello vector is read from the peer's committed store: it is an
                // acknowledgement too (a writer waiting for "k peers have it" may be waiting for
                // exactly this, when the write reached the peer through a third one).
                self.acked = Some(vector.clone());
                self.events.push_back(SyncEvent::Connected {
                    peer: origin,
                    vector: vector.clone(),
                });
                self.events.push_back(SyncEvent::PeerAcked(vector));
            }
            T_ENTRIES => {
                if self.snapshot_rx.is_some() {
                    return Err(SyncError::Protocol("entries inside a snapshot"));
                }
                let entries = r.entries()?;
                let seen = if r.flag()? { Some(r.vector()?) } else { None };
                r.end()?;
                self.stats.entries_received += entries.len() as u64;
                // The peer had these (and what it saw): do not echo them back.
                for e in &entries {
                    self.estimate.observe(e.stamp);
                }
                if let Some(v) = &seen {
                    self.estimate.merge(v);
                }
                self.events
                    .push_back(SyncEvent::EntriesReceived { entries, seen });
            }
            T_ACK => {
                let v = r.vector()?;
                r.end()?;
                self.estimate.merge(&v);
                self.acked = Some(v.clone());
                self.events.push_back(SyncEvent::PeerAcked(v));
            }
            T_SNAP_BEGIN => {
                if self.snapshot_rx.is_some() {
                    return Err(SyncError::Protocol("nested snapshot"));
                }
                let vector = r.vector()?;
                r.end()?;
                self.snapshot_rx = Some((
                    Snapshot {
                        entries: Vec::new(),
                        vector,
                    },
                    body.len(),
                ));
            }
            T_SNAP_CHUNK => {
                let entries = r.entries()?;
                r.end()?;
                let (snap, size) = self
                    .snapshot_rx
                    .as_mut()
                    .ok_or(SyncError::Protocol("chunk outside a snapshot"))?;
                *size = size.saturating_add(body.len());
                if *size > MAX_SNAPSHOT_BYTES {
                    return Err(SyncError::Protocol("snapshot larger than the limit"));
                }
                self.stats.entries_received += entries.len() as u64;
                snap.entries.extend(entries);
            }
            T_SNAP_END => {
                r.end()?;
                let (snap, _) = self
                    .snapshot_rx
                    .take()
                    .ok_or(SyncError::Protocol("end outside a snapshot"))?;
                self.events.push_back(SyncEvent::SnapshotReceived(snap));
            }
            T_PING => r.end()?,
            _ => return Err(SyncError::Malformed("unknown message type")),
        }
        Ok(())
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<SyncEvent> {
        self.events.pop_front()
    }

    /// The driver applied the received entries or snapshot durably; `local` is the store's vector
    /// now. Queues an acknowledgement (coalesced: only the latest vector is sent, and not twice).
    pub fn handle_applied(&mut self, local: VersionVector) {
        if self.last_ack.as_ref() != Some(&local) {
            self.ack_pending = Some(local);
        }
    }

    /// The store committed something and its vector is now `local`: new writes may have to be
    /// streamed to the peer, and the peer is told what we hold — it may have reached us through a
    /// third peer, and a writer waiting for "k peers have it" counts on this acknowledgement.
    pub fn notify_store_changed(&mut self, now: Instant, local: VersionVector) {
        self.dirty = true;
        self.local = local.clone();
        self.handle_applied(local);
        self.note_missing(now);
    }

    /// Start the relay clock of every other origin whose writes the peer lacks, and stop those of
    /// origins it has caught up with (from their writer, or from us).
    fn note_missing(&mut self, now: Instant) {
        if !self.caught_up {
            return;
        }
        let estimate = &self.estimate;
        self.missing
            .retain(|&origin, (_, upto)| estimate.get(origin) < *upto);
        for (origin, upto) in self.local.iter() {
            if origin != self.replica && self.estimate.get(origin) < upto {
                self.missing.entry(origin).or_insert((now, upto));
            }
        }
    }

    /// What to read from the store next, if anything. `None` while the outbound queue is above
    /// [`OUTBOUND_HIGH_WATER`] (backpressure), before the peer's hello, or when the peer is up to date.
    pub fn poll_pull(&mut self) -> Option<Pull> {
        if self.dead.is_some()
            || self.peer.is_none()
            || self.pull_outstanding
            || self.out.len() > OUTBOUND_HIGH_WATER
        {
            return None;
        }
        if self.want_snapshot {
            self.pull_outstanding = true;
            return Some(Pull::Snapshot);
        }
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        self.pull_outstanding = true;
        self.pulled = self.caught_up.then(|| {
            std::iter::once(self.replica)
                .chain(self.relay.iter().copied())
                .collect()
        });
        Some(Pull::Changes {
            since: self.estimate.clone(),
            limit: PULL_LIMIT,
            origins: self.pulled.clone(),
        })
    }

    /// The store's answer to [`Pull::Changes`]: queue the entries for the peer.
    pub fn handle_changes(&mut self, changes: ChangeSet) {
        self.pull_outstanding = false;
        match changes {
            ChangeSet::SnapshotNeeded => self.want_snapshot = true,
            ChangeSet::Entries { entries, complete } => {
                let pulled = self.pulled.take();
                // A pull of some origins completes only their part of the vector.
                let complete = match (&pulled, complete) {
                    (Some(only), Some(v)) => {
                        let mut part = VersionVector::new();
                        for (_, upto) in v.iter().filter(|(o, _)| only.contains(o)) {
                            part.observe(upto);
                        }
                        self.relay.retain(|o| !only.contains(o));
                        Some(part)
                    }
                    (None, Some(v)) => {
                        self.caught_up = true;
                        Some(v)
                    }
                    (_, None) => None,
                };
                // An empty batch is worth sending only to tell the peer a vector it has not seen.
                let news = complete
                    .as_ref()
                    .is_some_and(|v| !self.estimate.dominates(v));
                for e in &entries {
                    self.estimate.observe(e.stamp);
                }
                self.stats.entries_sent += entries.len() as u64;
                match &complete {
                    Some(v) => self.estimate.merge(v),
                    // Cut short by the limit: more to pull.
                    None => self.dirty = true,
                }
                if entries.is_empty() && !news {
                    return;
                }
                write_entries(&mut self.out, T_ENTRIES, &entries, Some(complete.as_ref()));
            }
        }
    }

    /// The store's answer to [`Pull::Snapshot`]: queue it for the peer.
    pub fn handle_snapshot(&mut self, snapshot: &Snapshot) {
        self.pull_outstanding = false;
        self.want_snapshot = false;
        let mut f = FrameWriter::start(&mut self.out, T_SNAP_BEGIN);
        f.vector(&snapshot.vector);
        f.finish();
        write_entries(&mut self.out, T_SNAP_CHUNK, &snapshot.entries, None);
        FrameWriter::start(&mut self.out, T_SNAP_END).finish();
        self.stats.entries_sent += snapshot.entries.len() as u64;
        self.estimate.merge(&snapshot.vector);
        // Writes committed after the snapshot was taken still have to follow.
        self.dirty = true;
    }

    /// Move queued bytes into `buf` (appending). Returns how many were added. The driver calls it
    /// when its previous bytes were written, so at most one batch sits outside the session.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> usize {
        if self.dead.is_some() {
            return 0;
        }
        if let Some(v) = self.ack_pending.take() {
            let mut f = FrameWriter::start(&mut self.out, T_ACK);
            f.vector(&v);
            f.finish();
            self.last_ack = Some(v);
        }
        if std::mem::take(&mut self.ping_pending) && self.out.is_empty() {
            FrameWriter::start(&mut self.out, T_PING).finish();
        }
        let n = self.out.len();
        if n == 0 {
            return 0;
        }
        buf.extend_from_slice(&self.out);
        self.out.clear();
        self.last_tx = now;
        self.stats.bytes_sent += n as u64;
        n
    }

    /// When [`Session::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.dead.is_some() {
            return None;
        }
        let keepalive = (self.last_tx + KEEPALIVE).min(self.last_rx + IDLE_TIMEOUT);
        Some(
            self.missing
                .values()
                .map(|(since, _)| *since + RELAY_HOLD)
                .fold(keepalive, Instant::min),
        )
    }

    /// Timers: queue a keepalive when idle; end the session when the peer is silent too long.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SyncError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        let silent = now.saturating_duration_since(self.last_rx);
        if silent >= IDLE_TIMEOUT {
            let e = SyncError::Timeout(silent);
            self.dead = Some(e.clone());
            return Err(e);
        }
        if now.saturating_duration_since(self.last_tx) >= KEEPALIVE {
            self.ping_pending = true;
        }
        let (relay, dirty) = (&mut self.relay, &mut self.dirty);
        self.missing.retain(|&origin, (since, _)| {
            let due = now.saturating_duration_since(*since) >= RELAY_HOLD;
            if due {
                relay.insert(origin);
                *dirty = true;
            }
            !due
        });
        Ok(())
    }
}

/// Encode entries into as many frames of type `ty` as needed. For `T_ENTRIES`, `complete` is
/// `Some(vector option)` and the last frame carries it.
fn write_entries(
    out: &mut Vec<u8>,
    ty: u8,
    entries: &[Entry],
    complete: Option<Option<&VersionVector>>,
) {
    let mut rest = entries;
    loop {
        let mut f = FrameWriter::start(out, ty);
        let count_at = f.placeholder_u16();
        let mut n: u16 = 0;
        while let Some((e, tail)) = rest.split_first() {
            if n == u16::MAX {
                break;
            }
            // Encode in place (the value's JSON is produced once), and take it back if the frame
            // overflowed. An entry alone always fits: keys and values are bounded far below.
            let mark = f.out.len();
            f.entry(e);
            if n > 0 && f.payload_len() + vector_size_bound(complete) > MAX_PAYLOAD {
                f.out.truncate(mark);
                break;
            }
            n += 1;
            rest = tail;
        }
        f.patch_u16(count_at, n);
        let last = rest.is_empty();
        if let Some(c) = complete {
            match (last, c) {
                (true, Some(v)) => {
                    f.u8(1);
                    f.vector(v);
                }
                _ => f.u8(0),
            }
        }
        f.finish();
        if last {
            return;
        }
    }
}

fn vector_size_bound(complete: Option<Option<&VersionVector>>) -> usize {
    match complete {
        Some(Some(v)) => 1 + 2 + v.len() * HLC_BYTES,
        Some(None) => 1,
        None => 0,
    }
}

/// Builds one frame at the end of the outbound queue.
struct FrameWriter<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> FrameWriter<'a> {
    fn start(out: &'a mut Vec<u8>, ty: u8) -> FrameWriter<'a> {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0, PROTOCOL_VERSION, ty]);
        FrameWriter { out, start }
    }
    fn payload_len(&self) -> usize {
        self.out.len() - self.start - 6
    }
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }
    fn placeholder_u16(&mut self) -> usize {
        let at = self.out.len();
        self.bytes(&[0, 0]);
        at
    }
    fn patch_u16(&mut self, at: usize, v: u16) {
        if let Some(slot) = self.out.get_mut(at..at + 2) {
            slot.copy_from_slice(&v.to_be_bytes());
        }
    }
    fn vector(&mut self, v: &VersionVector) {
        let n = v.len().min(usize::from(u16::MAX));
        self.bytes(&(n as u16).to_be_bytes());
        for (_, s) in v.iter().take(n) {
            self.u32(s.origin);
            self.bytes(&s.wall_ms.to_be_bytes());
            self.u32(s.logical);
        }
    }
    fn entry(&mut self, e: &Entry) {
        self.u8(e.ns.tag());
        self.bytes(&e.stamp.to_bytes());
        // Keys are at most MAX_KEY_BYTES (checked by the store), far below u16::MAX.
        self.bytes(&(e.key.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        self.bytes(e.key.as_bytes());
        match &e.value {
            None => self.u32(TOMBSTONE_LEN),
            Some(v) => {
                let at = self.out.len();
                self.u32(0);
                // Writing JSON into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *self.out, v);
                // Values are at most MAX_VALUE_BYTES (checked by the store).
                let len = (self.out.len() - at - 4) as u32;
                if let Some(slot) = self.out.get_mut(at..at + 4) {
                    slot.copy_from_slice(&len.to_be_bytes());
                }
            }
        }
    }
    fn finish(self) {
        let crc = crc32fast::hash(self.out.get(self.start + 4..).unwrap_or_default());
        self.out.extend_from_slice(&crc.to_be_bytes());
        // Frames are at most MAX_FRAME long (the writers check), so the length fits in u32.
        let len = (self.out.len() - self.start - 4) as u32;
        if let Some(slot) = self.out.get_mut(self.start..self.start + 4) {
            slot.copy_from_slice(&len.to_be_bytes());
        }
    }
}

/// Checked reader over one frame's content: every read is bounds-checked and fails as malformed.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SyncError> {
        if self.0.len() < n {
            return Err(SyncError::Malformed("truncated message"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, SyncError> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self) -> Result<bool, SyncError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(SyncError::Malformed("bad flag")),
        }
    }
    fn u16(&mut self) -> Result<u16, SyncError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, SyncError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, SyncError> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }
    fn end(&self) -> Result<(), SyncError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(SyncError::Malformed("trailing bytes"))
        }
    }
    fn vector(&mut self) -> Result<VersionVector, SyncError> {
        let n = self.u16()?;
        let mut v = VersionVector::new();
        for _ in 0..n {
            let origin = self.u32()?;
            let wall_ms = self.u64()?;
            let logical = self.u32()?;
            v.observe(Hlc {
                wall_ms,
                logical,
                origin,
            });
        }
        Ok(v)
    }
    fn entries(&mut self) -> Result<Vec<Entry>, SyncError> {
        let n = self.u16()?;
        // Each entry takes at least 23 bytes: never reserve more than the input can hold.
        let mut out = Vec::with_capacity(usize::from(n).min(self.0.len() / 23));
        for _ in 0..n {
            let ns =
                Namespace::from_tag(self.u8()?).ok_or(SyncError::Malformed("unknown namespace"))?;
            let stamp =
                Hlc::from_bytes(self.take(HLC_BYTES)?).ok_or(SyncError::Malformed("bad stamp"))?;
            let klen = usize::from(self.u16()?);
            if klen == 0 || klen > MAX_KEY_BYTES {
                return Err(SyncError::Malformed("key length out of range"));
            }
            let key = std::str::from_utf8(self.take(klen)?)
                .map_err(|_| SyncError::Malformed("key not UTF-8"))?;
            let vlen = self.u32()?;
            let value = if vlen == TOMBSTONE_LEN {
                None
            } else {
                let vlen = vlen as usize;
                if vlen > MAX_VALUE_BYTES {
                    return Err(SyncError::Malformed("value too large"));
                }
                let raw = self.take(vlen)?;
                Some(
                    serde_json::from_slice(raw)
                        .map_err(|_| SyncError::Malformed("value is not JSON"))?,
                )
            };
            out.push(Entry {
                ns,
                key: key.to_owned(),
                value,
                stamp,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use serde_json::{Value, json};

    fn stamp(wall_ms: u64, origin: u32) -> Hlc {
        Hlc {
            wall_ms,
            logical: 0,
            origin,
        }
    }

    fn entry(key: &str, wall_ms: u64, origin: u32, value: Option<Value>) -> Entry {
        Entry {
            ns: Namespace::Config,
            key: key.into(),
            value,
            stamp: stamp(wall_ms, origin),
        }
    }

    /// A store with nothing in it, whose writes are stamped with its origin id.
    fn local(origin: u32, joining: bool) -> Local {
        Local {
            origin,
            replica: origin,
            vector: VersionVector::new(),
            joining,
        }
    }

    /// Move everything `from` has to send into `to`.
    fn pump(now: Instant, from: &mut Session, to: &mut Session) -> Result<usize, SyncError> {
        let mut buf = Vec::new();
        let n = from.poll_transmit(now, &mut buf);
        to.handle_bytes(now, &buf)?;
        Ok(n)
    }

    fn connected_pair(now: Instant) -> (Session, Session) {
        let mut a = Session::new(local(1, false), Some(2), now);
        let mut b = Session::new(local(2, false), None, now);
        pump(now, &mut a, &mut b).unwrap();
        pump(now, &mut b, &mut a).unwrap();
        assert!(matches!(
            a.poll_event(),
            Some(SyncEvent::Connected { peer: 2, .. })
        ));
        assert!(matches!(
            b.poll_event(),
            Some(SyncEvent::Connected { peer: 1, .. })
        ));
        let empty = Some(SyncEvent::PeerAcked(VersionVector::new()));
        assert_eq!((a.poll_event(), b.poll_event()), (empty.clone(), empty));
        (a, b)
    }

    /// Hello from `a` (joining or not) to `b`; returns `b`'s first pull.
    fn hello_then_pull(a_joining: bool, b_joining: bool) -> (Session, Option<Pull>) {
        let now = Instant::now();
        let mut a = Session::new(local(1, a_joining), Some(2), now);
        let mut b = Session::new(local(2, b_joining), None, now);
        pump(now, &mut a, &mut b).unwrap();
        let pull = b.poll_pull();
        (b, pull)
    }

    #[test]
    fn a_joining_peer_gets_a_snapshot_only_from_a_peer_that_is_not_joining() {
        assert_eq!(hello_then_pull(true, false).1, Some(Pull::Snapshot));
        assert!(matches!(
            hello_then_pull(false, false).1,
            Some(Pull::Changes { .. })
        ));
        let (mut b, pull) = hello_then_pull(true, true);
        assert!(matches!(pull, Some(Pull::Changes { .. })));
        b.handle_changes(ChangeSet::Entries {
            entries: vec![],
            complete: Some(VersionVector::new()),
        });
        // Once `b` has the cluster's content it serves the snapshot `a` still waits for, once.
        b.set_joining(false);
        assert_eq!(b.poll_pull(), Some(Pull::Snapshot));
        b.handle_snapshot(&Snapshot::default());
        b.set_joining(false);
        assert!(!matches!(b.poll_pull(), Some(Pull::Snapshot)));
    }

    #[test]
    fn entries_flow_and_acks_come_back() {
        let now = Instant::now();
        let (mut a, mut b) = connected_pair(now);
        let Some(Pull::Changes { since, limit, .. }) = a.poll_pull() else {
            panic!("no pull")
        };
        assert!(since.is_empty() && limit == PULL_LIMIT);
        assert_eq!(a.poll_pull(), None, "one pull at a time");
        let entries = vec![
            entry("a", 10, 1, Some(json!({"x": 1}))),
            entry("b", 11, 1, None),
        ];
        let mut v = VersionVector::new();
        v.observe(stamp(11, 1));
        a.handle_changes(ChangeSet::Entries {
            entries: entries.clone(),
            complete: Some(v.clone()),
        });
        pump(now, &mut a, &mut b).unwrap();
        assert_eq!(
            b.poll_event(),
            Some(SyncEvent::EntriesReceived {
                entries,
                seen: Some(v.clone())
            })
        );
        b.handle_applied(v.clone());
        pump(now, &mut b, &mut a).unwrap();
        assert_eq!(a.poll_event(), Some(SyncEvent::PeerAcked(v.clone())));
        assert_eq!(a.acked(), Some(&v));
        // Caught up: nothing to pull until the store changes.
        assert_eq!(a.poll_pull(), None);
        // The store changed (say a third peer's write arrived): a tells b what it holds now.
        let mut v2 = v.clone();
        v2.observe(stamp(50, 3));
        a.notify_store_changed(now, v2.clone());
        let Some(Pull::Changes { since, .. }) = a.poll_pull() else {
            panic!()
        };
        assert_eq!(since, v);
        // b already had that write: no entries, and no vector news either.
        a.handle_changes(ChangeSet::Entries {
            entries: vec![],
            complete: Some(v.clone()),
        });
        pump(now, &mut a, &mut b).unwrap();
        assert_eq!(b.poll_event(), Some(SyncEvent::PeerAcked(v2.clone())));
        // The same vector again: no frame at all.
        a.notify_store_changed(now, v2);
        a.poll_pull().unwrap();
        a.handle_changes(ChangeSet::Entries {
            entries: vec![],
            complete: Some(v),
        });
        assert_eq!(a.poll_transmit(now, &mut Vec::new()), 0);
        assert_eq!(a.stats().entries_sent, 2);
        assert_eq!(b.stats().entries_received, 2);
    }

    #[test]
    fn byte_at_a_time_and_large_batches_split_into_frames() {
        let now = Instant::now();
        let (mut a, mut b) = connected_pair(now);
        a.poll_pull().unwrap();
        let big = "v".repeat(60_000);
        let entries: Vec<_> = (0..40)
            .map(|i| entry(&format!("k{i}"), 100 + i, 1, Some(json!(big))))
            .collect();
        a.handle_changes(ChangeSet::Entries {
            entries: entries.clone(),
            complete: None,
        });
        let mut buf = Vec::new();
        a.poll_transmit(now, &mut buf);
        assert!(buf.len() > 2 * MAX_FRAME, "needs several frames");
        // Cut short: the session pulls again.
        assert!(a.poll_pull().is_some());
        for chunk in buf.chunks(7919) {
            b.handle_bytes(now, chunk).unwrap();
        }
        let mut got = Vec::new();
        while let Some(ev) = b.poll_event() {
            let SyncEvent::EntriesReceived { entries, seen } = ev else {
                panic!("{ev:?}")
            };
            assert_eq!(seen, None);
            got.extend(entries);
        }
        assert_eq!(got, entries);
    }

    #[test]
    fn backpressure_stops_pulling_until_the_queue_drains() {
        let now = Instant::now();
        let (mut a, _b) = connected_pair(now);
        a.poll_pull().unwrap();
        let big = "v".repeat(60_000);
        let entries: Vec<_> = (0..30)
            .map(|i| entry(&format!("k{i}"), 100 + i, 1, Some(json!(big))))
            .collect();
        a.handle_changes(ChangeSet::Entries {
            entries,
            complete: None,
        });
        assert!(a.queue_depth() > OUTBOUND_HIGH_WATER);
        assert_eq!(a.poll_pull(), None);
        a.poll_transmit(now, &mut Vec::new());
        assert_eq!(a.queue_depth(), 0);
        assert!(a.poll_pull().is_some());
    }

    #[test]
    fn snapshot_when_the_store_says_so() {
        let now = Instant::now();
        let (mut a, mut b) = connected_pair(now);
        a.poll_pull().unwrap();
        a.handle_changes(ChangeSet::SnapshotNeeded);
        assert_eq!(a.poll_pull(), Some(Pull::Snapshot));
        let mut vector = VersionVector::new();
        vector.observe(stamp(500, 1));
        let snap = Snapshot {
            entries: (0..3000)
                .map(|i| entry(&format!("key/{i}"), 1 + i, 1, Some(json!("x".repeat(500)))))
                .collect(),
            vector,
        };
        a.handle_snapshot(&snap);
        pump(now, &mut a, &mut b).unwrap();
        assert_eq!(b.poll_event(), Some(SyncEvent::SnapshotReceived(snap)));
        // After a snapshot the live stream resumes.
        assert!(matches!(a.poll_pull(), Some(Pull::Changes { .. })));
    }

    fn frame(version: u8, ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![version, ty];
        body.extend_from_slice(payload);
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend(body);
        f
    }

    fn hello(origin: u32) -> Vec<u8> {
        let mut p = origin.to_be_bytes().to_vec();
        p.extend([0, 0, 0]);
        frame(PROTOCOL_VERSION, T_HELLO, &p)
    }

    #[test]
    fn malformed_frames_end_the_session_with_a_reason() {
        let now = Instant::now();
        let new = || Session::new(local(1, false), Some(2), now);
        let cases: Vec<(Vec<u8>, SyncError)> = vec![
            (
                (MAX_FRAME as u32 + 1).to_be_bytes().to_vec(),
                SyncError::Malformed("frame length out of range"),
            ),
            (
                vec![0, 0, 0, 1, 9],
                SyncError::Malformed("frame length out of range"),
            ),
            (frame(1, T_HELLO, &[]), SyncError::Incompatible(1)),
            (
                frame(PROTOCOL_VERSION, T_PING, &[]),
                SyncError::Protocol("message before hello"),
            ),
            (
                hello(3),
                SyncError::UnexpectedPeer {
                    expected: 2,
                    got: 3,
                },
            ),
            (
                frame(PROTOCOL_VERSION, T_HELLO, &[0, 0, 0, 2, 0]),
                SyncError::Malformed("truncated message"),
            ),
            (
                frame(PROTOCOL_VERSION, T_HELLO, &[0, 0, 0, 2, 0, 0, 2]),
                SyncError::Malformed("bad flag"),
            ),
            (
                [hello(2), hello(2)].concat(),
                SyncError::Protocol("second hello"),
            ),
            (
                [hello(2), frame(PROTOCOL_VERSION, 99, &[])].concat(),
                SyncError::Malformed("unknown message type"),
            ),
            (
                [hello(2), frame(PROTOCOL_VERSION, T_SNAP_END, &[])].concat(),
                SyncError::Protocol("end outside a snapshot"),
            ),
            // An entry claiming a 4 GB value.
            (
                [
                    hello(2),
                    frame(
                        PROTOCOL_VERSION,
                        T_ENTRIES,
                        &[
                            0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, b'k',
                            0x7f, 0, 0, 0,
                        ],
                    ),
                ]
                .concat(),
                SyncError::Malformed("value too large"),
            ),
        ];
        for (bytes, want) in cases {
            let mut s = new();
            assert_eq!(s.handle_bytes(now, &bytes), Err(want.clone()), "{bytes:?}");
            // Dead for good.
            assert_eq!(s.handle_bytes(now, &hello(2)), Err(want));
            assert_eq!(s.poll_pull(), None);
        }
        let mut bad_crc = hello(2);
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 1;
        let mut s = new();
        assert_eq!(
            s.handle_bytes(now, &bad_crc),
            Err(SyncError::Malformed("checksum mismatch"))
        );
        assert_eq!(s.stats().malformed, 1);
    }

    /// Random bytes, and valid frames with random corruption, never panic and never allocate
    /// beyond the input. Seeded; the seed is printed on failure.
    #[test]
    fn garbage_never_panics() {
        let seed: u64 = std::env::var("SYNC_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let now = Instant::now();
        let mut valid = Session::new(local(2, false), None, now);
        valid.dirty = false;
        let mut template = Vec::new();
        valid.poll_transmit(now, &mut template);
        let mut w = Vec::new();
        write_entries(
            &mut w,
            T_ENTRIES,
            &[
                entry("k", 1, 2, Some(json!([1, 2]))),
                entry("l", 2, 2, None),
            ],
            Some(None),
        );
        template.extend(w);
        for i in 0..2000 {
            let mut bytes = if i % 2 == 0 {
                (0..rng.random_range(0..64))
                    .map(|_| rng.random())
                    .collect::<Vec<u8>>()
            } else {
                let mut t = template.clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..t.len());
                    t[at] = rng.random();
                }
                t
            };
            bytes.truncate(rng.random_range(0..=bytes.len()));
            let mut s = Session::new(local(1, false), None, now);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                s.handle_bytes(now, &bytes)
            }));
            assert!(
                r.is_ok(),
                "panic with seed {seed}, iteration {i}, input {bytes:?}"
            );
        }
    }

    #[test]
    fn keepalive_and_idle_timeout() {
        let t0 = Instant::now();
        let (mut a, mut b) = connected_pair(t0);
        let t1 = a.poll_timeout().unwrap();
        assert_eq!(t1, t0 + KEEPALIVE);
        a.handle_timeout(t1).unwrap();
        assert!(pump(t1, &mut a, &mut b).unwrap() > 0, "ping sent");
        let dead = t0 + IDLE_TIMEOUT;
        assert_eq!(b.poll_timeout(), Some(t0 + KEEPALIVE));
        assert!(a.handle_timeout(dead).is_err());
        // b heard the ping at t1, so it waits longer.
        b.handle_timeout(dead).unwrap();
        assert!(matches!(
            b.handle_timeout(t1 + IDLE_TIMEOUT),
            Err(SyncError::Timeout(_))
        ));
    }
}
