//! The durable local store: one redb file per peer, written by one writer thread that commits many
//! callers' writes together (group commit).
//!
//! Every mutation — local put/delete, entries received from a peer, a snapshot, a tombstone
//! collection — goes through the writer thread: it assigns the HLC stamps of local writes, applies
//! last-writer-wins, updates the version vector in the same transaction, commits with redb's default
//! durability (fsync before the commit returns) and only then answers the callers. Because stamps
//! are assigned in commit order, a reader always sees a prefix of each origin's writes — the
//! invariant that lets [`Store::changes_since`] compute what a peer lacks from its version vector.
//!
//! Reads use redb read transactions directly from the caller's thread (MVCC: they never wait for the
//! writer).
//!
//! Tables: `data` (namespace tag + key → stamp, flag, JSON), `by_origin` (origin + stamp → data key,
//! for every current entry), `tombstones` (the same, for deleted keys only, for collection), `meta`
//! (version vector, collection floor, clock high-water mark, joining mark).

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::hlc::{DEFAULT_MAX_DRIFT_MS, HLC_BYTES, Hlc, HlcClock, HlcError};
use crate::model::{Entry, MAX_KEY_BYTES, MAX_VALUE_BYTES, Namespace, VersionVector};

const DATA: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("data");
const BY_ORIGIN: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("by_origin");
const TOMBSTONES: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("tombstones");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

const META_VECTOR: &str = "vector";
const META_GC_FLOOR: &str = "gc_floor";
const META_CLOCK: &str = "clock";
/// Present while the peer is joining a cluster and has not yet merged a member's snapshot.
const META_JOINING: &str = "joining";

/// Most origins (replica ids) a store tracks: a few per peer over the cluster's life (a new one per
/// join or restore). Bounds what a misbehaving peer can make the version vector — written with
/// every commit and sent in every hello — grow to.
pub const MAX_ORIGINS: usize = 1024;

/// Size of the records one [`Store::changes_since`] returns at most (plus one entry): one pull
/// fills about one sync frame, so a session's outbound queue stays near its high-water mark.
pub const CHANGESET_MAX_BYTES: usize = 1024 * 1024;

/// Flag byte after the stamp in a `data` record.
const FLAG_TOMBSTONE: u8 = 0;
const FLAG_VALUE: u8 = 1;

/// Why a store operation failed, and whose fault it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database file is damaged (bit rot, truncation, a foreign file). It is never used in
    /// that state: the operator restores a backup or removes the file so the peer resyncs.
    #[error(
        "replicated store {path} is damaged: {detail}. It was not used. Restore it from a backup \
         (confmesh restore) or move it away so that this peer takes a fresh copy from the cluster"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What redb (or our record decoder) found wrong.
        detail: String,
    },
    /// Another process holds the database open.
    #[error(
        "replicated store {path} is already open by another process (is another confmesh running?)"
    )]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// The operating system refused a read or write (disk full, permissions, I/O error).
    #[error("replicated store {path}: I/O error: {detail}")]
    Io {
        /// The database file.
        path: PathBuf,
        /// The error from the OS, as redb reported it.
        detail: String,
    },
    /// The caller asked for something the store does not accept (empty or over-long key, value too
    /// large). Local misuse; nothing was written.
    #[error("invalid write: {0}")]
    Invalid(String),
    /// A peer sent entries that break the store's limits. The peer is at fault; nothing of the batch
    /// was applied.
    #[error("peer sent an invalid entry: {0}")]
    InvalidRemote(String),
    /// A peer's stamps are too far in the future; nothing of the batch was applied.
    #[error(transparent)]
    ClockSkew(#[from] HlcError),
    /// This peer is joining a cluster and has not yet received the cluster's content. A write now
    /// could be stamped below a deletion the cluster has already forgotten (collected tombstone)
    /// and bring the deleted key back everywhere, so local writes wait for the first snapshot.
    #[error(
        "this peer is joining the cluster and has not yet received the cluster's shared data; \
         writes are refused until it has (check with `confmesh status` that another peer is Active)"
    )]
    Joining,
    /// The store was closed (its writer thread has stopped) while the request was pending.
    #[error("replicated store is closed")]
    Closed,
}

/// Tuning of a [`Store`]; the defaults are what the daemon uses.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most requests committed in one transaction. 1 disables group commit (for benchmarks).
    pub max_batch: usize,
    /// Requests that may wait for the writer before callers block (bounded queue).
    pub queue: usize,
    /// Remote stamps further ahead of local wall time than this are refused.
    pub max_drift_ms: u64,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            max_batch: 1024,
            queue: 4096,
            max_drift_ms: DEFAULT_MAX_DRIFT_MS,
        }
    }
}

/// The whole replicated content at one moment: for joining, catching up after tombstones were
/// collected, and backups.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Every current entry, tombstones included, in key order.
    pub entries: Vec<Entry>,
    /// What the snapshot's source had seen when it was taken.
    pub vector: VersionVector,
}

/// A sender's claim, carried by the last batch of a catch-up ([`ChangeSet::Entries::complete`]),
/// that after these entries this peer holds everything `vector` summarises. The sender computed
/// it from what this peer held when the session began, so it is honoured only if this store's
/// content was not replaced since then.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    /// The sender's vector.
    pub vector: VersionVector,
    /// [`Store::epoch`] when the session began (read before the hello's vector).
    pub epoch: u64,
}

/// What a peer lacks, as computed by [`Store::changes_since`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ChangeSet {
    /// Entries the peer lacks, per origin in stamp order.
    Entries {
        /// The entries (at most the requested limit).
        entries: Vec<Entry>,
        /// `Some(vector)` when these are ALL the entries the peer lacks: after applying them the
        /// peer has seen everything `vector` summarises and may merge it into its own. `None` when
        /// the limit cut the list short.
        complete: Option<VersionVector>,
    },
    /// Tombstones the peer has not seen were already collected: incremental sync could resurrect
    /// deleted keys, so the peer needs a [`Snapshot`].
    SnapshotNeeded,
}

enum Op {
    Put {
        ns: Namespace,
        key: String,
        value: Option<Value>,
        wall_ms: u64,
    },
    Remote {
        entries: Vec<Entry>,
        seen: Option<Seen>,
        wall_ms: u64,
    },
    Snapshot {
        snapshot: Snapshot,
        wall_ms: u64,
    },
    ReplaceAll {
        snapshot: Snapshot,
        /// Joining a cluster: local writes wait for a member's snapshot.
        join: bool,
    },
    StopJoining,
    Gc {
        acked: Vec<VersionVector>,
    },
}

enum Reply {
    Stamp(Hlc),
    Count(usize),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    origin: u32,
    changes: watch::Sender<u64>,
    /// Number of committed [`Store::replace_all`] calls since open (see [`Seen`]).
    epoch: std::sync::atomic::AtomicU64,
    /// Whether a committed join still waits for a member's snapshot (see [`StoreError::Joining`]).
    joining: std::sync::atomic::AtomicBool,
    /// The replica id local writes are stamped with (see [`Store::replica`]).
    replica: std::sync::atomic::AtomicU32,
}

/// A batch of remote entries queued by [`Store::queue_remote`]: resolves to how many entries
/// replaced local versions once the batch is durable.
pub struct Applying(oneshot::Receiver<Result<Reply, StoreError>>);

impl std::future::Future for Applying {
    type Output = Result<usize, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| count(r.map_err(|_| StoreError::Closed).and_then(|r| r)))
    }
}

/// The durable replicated store of one peer.
///
/// Mutations return only once committed durably. Blocking mutations (`put`, `delete`,
/// `apply_remote`, `replace_all`, …) are for plain threads: called from an async task they would
/// panic (tokio forbids blocking there), so async code uses the `*_async` variants (or
/// [`crate::service::Service::write`]). Reads (`get`, `list`, `snapshot`, …) never wait for the
/// writer and are fine anywhere.
pub struct Store {
    inner: Arc<Inner>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("origin", &self.inner.origin)
            .finish()
    }
}

fn classify(path: &Path, e: redb::Error) -> StoreError {
    let path = path.to_path_buf();
    match e {
        redb::Error::Corrupted(detail) => StoreError::Corrupt { path, detail },
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked { path },
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            StoreError::Corrupt {
                path,
                detail: io.to_string(),
            }
        }
        redb::Error::UpgradeRequired(v) => StoreError::Corrupt {
            path,
            detail: format!("file format version {v} is not the one this build writes"),
        },
        redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_) => StoreError::Corrupt {
            path,
            detail: e.to_string(),
        },
        other => StoreError::Io {
            path,
            detail: other.to_string(),
        },
    }
}

/// Open the file and verify every page checksum now, rather than meeting damage in the middle of a
/// sync. redb asserts on some kinds of damage (a mangled region header) instead of returning an
/// error; such a panic is caught here and reported as [`StoreError::Corrupt`] like the others.
fn open_checked(path: &Path) -> Result<Database, StoreError> {
    let attempt = std::panic::catch_unwind(|| {
        let mut db = Database::create(path)?;
        if !db.check_integrity()? {
            // redb found inconsistent allocator state and rebuilt it from the checksummed trees;
            // no committed data was lost, but the operator should know the file was not clean.
            tracing::warn!(path = %path.display(), "replicated store: file was repaired on open");
        }
        Ok::<_, redb::DatabaseError>(db)
    });
    match attempt {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(classify(path, e.into())),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("internal consistency check failed");
            Err(corrupt(
                path,
                format!("the database engine rejected the file: {what}"),
            ))
        }
    }
}

fn data_key(ns: Namespace, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(ns.tag());
    k.extend_from_slice(key.as_bytes());
    k
}

/// Index key: origin first, so one origin's entries are contiguous and in stamp order.
fn origin_key(s: Hlc) -> [u8; HLC_BYTES] {
    let mut k = [0u8; HLC_BYTES];
    k[..4].copy_from_slice(&s.origin.to_be_bytes());
    k[4..12].copy_from_slice(&s.wall_ms.to_be_bytes());
    k[12..].copy_from_slice(&s.logical.to_be_bytes());
    k
}

fn encode_record(stamp: Hlc, value: Option<&Value>) -> Vec<u8> {
    let mut v = Vec::with_capacity(HLC_BYTES + 1 + 32);
    v.extend_from_slice(&stamp.to_bytes());
    match value {
        None => v.push(FLAG_TOMBSTONE),
        Some(val) => {
            v.push(FLAG_VALUE);
            // Serialising a `Value` into a Vec cannot fail (no I/O, string keys only).
            serde_json::to_writer(&mut v, val).unwrap_or_default();
        }
    }
    v
}

fn corrupt(path: &Path, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn record_stamp(path: &Path, rec: &[u8]) -> Result<Hlc, StoreError> {
    rec.get(..HLC_BYTES)
        .and_then(Hlc::from_bytes)
        .ok_or_else(|| corrupt(path, "short data record"))
}

fn decode_entry(path: &Path, key: &[u8], rec: &[u8]) -> Result<Entry, StoreError> {
    let (&tag, name) = key
        .split_first()
        .ok_or_else(|| corrupt(path, "empty data key"))?;
    let ns = Namespace::from_tag(tag)
        .ok_or_else(|| corrupt(path, format!("unknown namespace tag {tag}")))?;
    let key = std::str::from_utf8(name)
        .map_err(|_| corrupt(path, "key is not UTF-8"))?
        .to_owned();
    let stamp = record_stamp(path, rec)?;
    let value = match rec.get(HLC_BYTES) {
        Some(&FLAG_TOMBSTONE) => None,
        Some(&FLAG_VALUE) => Some(
            serde_json::from_slice(rec.get(HLC_BYTES + 1..).unwrap_or_default())
                .map_err(|e| corrupt(path, format!("value of {ns}/{key}: {e}")))?,
        ),
        _ => return Err(corrupt(path, format!("bad record flag for {ns}/{key}"))),
    };
    Ok(Entry {
        ns,
        key,
        value,
        stamp,
    })
}

fn validate(ns: Namespace, key: &str, value: Option<&Value>) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "key length {} not in 1..={MAX_KEY_BYTES} bytes ({ns})",
            key.len()
        ));
    }
    if let Some(v) = value {
        let len = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
        if len > MAX_VALUE_BYTES {
            return Err(format!(
                "value of {ns}/{key} is {len} bytes, limit {MAX_VALUE_BYTES}"
            ));
        }
    }
    Ok(())
}

impl Store {
    /// Open (or create) the store at `path` for the peer whose origin id is `origin` (the low 32 bits
    /// of its management IPv4 address, `u32::from(Ipv4Addr)`), with default options.
    ///
    /// The file is checked in full before use: a damaged file is reported as
    /// [`StoreError::Corrupt`], never silently used.
    pub fn open(path: &Path, origin: u32) -> Result<Store, StoreError> {
        Store::open_with(path, origin, StoreOptions::default())
    }

    /// [`Store::open`] with explicit tuning.
    pub fn open_with(path: &Path, origin: u32, options: StoreOptions) -> Result<Store, StoreError> {
        let db = open_checked(path)?;
        let txn = db.begin_write().map_err(|e| classify(path, e.into()))?;
        let (clock_mark, joining) = {
            for def in [DATA, BY_ORIGIN, TOMBSTONES] {
                txn.open_table(def).map_err(|e| classify(path, e.into()))?;
            }
            let meta = txn.open_table(META).map_err(|e| classify(path, e.into()))?;
            let mark = meta.get(META_CLOCK).map_err(|e| classify(path, e.into()))?;
            let mark = match mark {
                Some(g) => Some(
                    Hlc::from_bytes(g.value()).ok_or_else(|| corrupt(path, "bad clock record"))?,
                ),
                None => None,
            };
            let joining = meta
                .get(META_JOINING)
                .map_err(|e| classify(path, e.into()))?
                .is_some();
            (mark, joining)
        };
        txn.commit().map_err(|e| classify(path, e.into()))?;

        let mut clock = HlcClock::new(origin, options.max_drift_ms);
        if let Some(mark) = clock_mark {
            // Never issue a stamp below one issued before the restart, whatever the wall clock says,
            // and keep the replica id (it differs from `origin` after a replace_all).
            clock.rebase(mark.origin);
            clock.observe(mark, mark.wall_ms)?;
        }
        let (changes, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            db,
            path: path.to_path_buf(),
            origin,
            changes,
            epoch: 0.into(),
            joining: joining.into(),
            replica: clock.last().origin.into(),
        });
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let w = Arc::clone(&inner);
        let max_batch = options.max_batch.max(1);
        let writer = std::thread::Builder::new()
            .name("confmesh-store".into())
            .spawn(move || writer_loop(&w, rx, clock, max_batch))
            .map_err(|e| StoreError::Io {
                path: path.to_path_buf(),
                detail: format!("spawn writer: {e}"),
            })?;
        Ok(Store {
            inner,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// This peer's origin id.
    pub fn origin(&self) -> u32 {
        self.inner.origin
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A receiver that changes whenever a commit changed the content: sync sessions wait on it to
    /// stream new writes without polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn submit(&self, op: Op) -> Result<oneshot::Receiver<Result<Reply, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.blocking_send(Request { op, reply })
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    async fn submit_async(&self, op: Op) -> Result<Reply, StoreError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(Request { op, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn run(&self, op: Op) -> Result<Reply, StoreError> {
        self.submit(op)?
            .blocking_recv()
            .map_err(|_| StoreError::Closed)?
    }

    /// Write `value` at `key`; returns its stamp once durable. `wall_ms` is the current Unix time in
    /// ms (passed in so that simulations control time). Blocking: not for async code.
    pub fn put(
        &self,
        ns: Namespace,
        key: &str,
        value: Value,
        wall_ms: u64,
    ) -> Result<Hlc, StoreError> {
        validate(ns, key, Some(&value)).map_err(StoreError::Invalid)?;
        stamp(self.run(Op::Put {
            ns,
            key: key.to_owned(),
            value: Some(value),
            wall_ms,
        }))
    }

    /// Delete `key` (writes a tombstone); returns its stamp once durable. Blocking.
    pub fn delete(&self, ns: Namespace, key: &str, wall_ms: u64) -> Result<Hlc, StoreError> {
        validate(ns, key, None).map_err(StoreError::Invalid)?;
        stamp(self.run(Op::Put {
            ns,
            key: key.to_owned(),
            value: None,
            wall_ms,
        }))
    }

    /// [`Store::put`] (`value: Some`) or [`Store::delete`] (`None`) for async code.
    pub async fn write_async(
        &self,
        ns: Namespace,
        key: &str,
        value: Option<Value>,
        wall_ms: u64,
    ) -> Result<Hlc, StoreError> {
        validate(ns, key, value.as_ref()).map_err(StoreError::Invalid)?;
        stamp(
            self.submit_async(Op::Put {
                ns,
                key: key.to_owned(),
                value,
                wall_ms,
            })
            .await,
        )
    }

    /// Which content generation this store is in: changes with every [`Store::replace_all`].
    /// A sync session reads it (before the vector it sends in its hello) and hands it back in
    /// [`Seen`]; a driver ends sessions whose epoch is no longer current.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The id in the stamps of this store's local writes: the origin id until the content is
    /// replaced, a fresh one after. Sync sessions stream these writes at once and leave other
    /// origins' writes to their writers (see [`crate::sync`]).
    pub fn replica(&self) -> u32 {
        self.inner
            .replica
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether this peer is joining a cluster and still waits for a member's snapshot: its sync
    /// sessions ask for one, and local writes are refused ([`StoreError::Joining`]).
    pub fn joining(&self) -> bool {
        self.inner
            .joining
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Apply entries received from a peer (last writer wins); returns how many replaced local
    /// versions. `seen` comes with the last batch of a catch-up: its vector is merged into ours in
    /// the same transaction (unless its epoch is stale). All or nothing: a batch with an invalid or
    /// too-far-future entry is refused whole. Blocking.
    pub fn apply_remote(
        &self,
        entries: Vec<Entry>,
        seen: Option<Seen>,
        wall_ms: u64,
    ) -> Result<usize, StoreError> {
        count(self.run(Op::Remote {
            entries,
            seen,
            wall_ms,
        }))
    }

    /// [`Store::apply_remote`] for async code.
    pub async fn apply_remote_async(
        &self,
        entries: Vec<Entry>,
        seen: Option<Seen>,
        wall_ms: u64,
    ) -> Result<usize, StoreError> {
        self.queue_remote(entries, seen, wall_ms).await?.await
    }

    /// Queue [`Store::apply_remote`] behind what is already queued and return at once (after
    /// waiting only for room in the writer's queue); the returned future resolves when it is
    /// committed. Batches queued one after the other are applied in that order, so a receiver
    /// can keep reading its peer while earlier batches are being committed — and the writer
    /// commits what queued up meanwhile together.
    pub async fn queue_remote(
        &self,
        entries: Vec<Entry>,
        seen: Option<Seen>,
        wall_ms: u64,
    ) -> Result<Applying, StoreError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(Request {
            op: Op::Remote {
                entries,
                seen,
                wall_ms,
            },
            reply,
        })
        .await
        .map_err(|_| StoreError::Closed)?;
        Ok(Applying(rx))
    }

    /// Merge a peer's snapshot: apply its entries (last writer wins) and drop local entries the
    /// snapshot's source had seen but no longer holds (their tombstones were collected there).
    /// Local writes the source had not seen survive. Blocking.
    pub fn apply_snapshot(&self, snapshot: Snapshot, wall_ms: u64) -> Result<usize, StoreError> {
        count(self.run(Op::Snapshot { snapshot, wall_ms }))
    }

    /// [`Store::apply_snapshot`] for async code.
    pub async fn apply_snapshot_async(
        &self,
        snapshot: Snapshot,
        wall_ms: u64,
    ) -> Result<usize, StoreError> {
        count(self.submit_async(Op::Snapshot { snapshot, wall_ms }).await)
    }

    /// Replace the whole content by `snapshot` (restore from backup; joining a cluster with
    /// `Snapshot::default()` so the cluster's content replaces ours). The clock is kept, so later
    /// local writes still order after everything this peer ever stamped, and later local writes
    /// carry a fresh replica id in their stamps' `origin` (so they cannot hide writes of the old id
    /// that other peers still hold and will send back). Blocking.
    pub fn replace_all(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        count(self.run(Op::ReplaceAll {
            snapshot,
            join: false,
        }))
        .map(drop)
    }

    /// [`Store::replace_all`] for async code (restore from the daemon).
    pub async fn replace_all_async(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        count(
            self.submit_async(Op::ReplaceAll {
                snapshot,
                join: false,
            })
            .await,
        )
        .map(drop)
    }

    /// Join a cluster (SPEC §2 rule 6): drop the content, as [`Store::replace_all`] with an empty
    /// snapshot, and refuse local writes until a member's snapshot has been merged. The members
    /// may have collected tombstones this peer never saw; a write stamped before this peer learns
    /// of them could order below such a deletion and resurrect the key. Survives a restart.
    /// Blocking.
    pub fn join(&self) -> Result<(), StoreError> {
        count(self.run(Op::ReplaceAll {
            snapshot: Snapshot::default(),
            join: true,
        }))
        .map(drop)
    }

    /// [`Store::join`] for async code.
    pub async fn join_async(&self) -> Result<(), StoreError> {
        count(
            self.submit_async(Op::ReplaceAll {
                snapshot: Snapshot::default(),
                join: true,
            })
            .await,
        )
        .map(drop)
    }

    /// Give up waiting for the cluster's content (the peer went standalone or is alone in its
    /// list): local writes are accepted again.
    pub async fn stop_joining_async(&self) -> Result<(), StoreError> {
        count(self.submit_async(Op::StopJoining).await).map(drop)
    }

    /// Collect tombstones that every peer has seen. `acked` holds the latest acknowledged vector
    /// of EVERY current peer (not this one); with no peers nothing is collected (a later join must
    /// still learn of the deletions). Returns how many were collected. Blocking.
    ///
    /// A peer left out of `acked` (removed from the peer list) must, when it comes back, rejoin
    /// with [`Store::replace_all`] (SPEC §2 rule 6): merging its own content instead could bring
    /// back keys whose deletion it never saw and whose tombstone was collected meanwhile.
    pub fn gc_tombstones(&self, acked: Vec<VersionVector>) -> Result<usize, StoreError> {
        count(self.run(Op::Gc { acked }))
    }

    /// [`Store::gc_tombstones`] for async code.
    pub async fn gc_tombstones_async(
        &self,
        acked: Vec<VersionVector>,
    ) -> Result<usize, StoreError> {
        count(self.submit_async(Op::Gc { acked }).await)
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.inner.db.begin_read().map_err(|e| self.err(e))
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        classify(&self.inner.path, e.into())
    }

    /// The current value of `key`, `None` if absent or deleted.
    pub fn get(&self, ns: Namespace, key: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.get_entry(ns, key)?.and_then(|e| e.value))
    }

    /// The current version of `key` with its stamp, tombstone included: for showing who wrote it
    /// when, and for checks that a write ordered after what its writer had seen.
    pub fn get_entry(&self, ns: Namespace, key: &str) -> Result<Option<Entry>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(DATA).map_err(|e| self.err(e))?;
        let dk = data_key(ns, key);
        let rec = t.get(dk.as_slice()).map_err(|e| self.err(e))?;
        rec.map(|g| decode_entry(&self.inner.path, &dk, g.value()))
            .transpose()
    }

    /// All live `(key, value)` pairs of `ns` whose key starts with `prefix`, in key order.
    pub fn list(&self, ns: Namespace, prefix: &str) -> Result<Vec<(String, Value)>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(DATA).map_err(|e| self.err(e))?;
        let start = data_key(ns, prefix);
        let mut out = Vec::new();
        for item in t
            .range::<&[u8]>(start.as_slice()..)
            .map_err(|e| self.err(e))?
        {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.value().starts_with(&start) {
                break;
            }
            let e = decode_entry(&self.inner.path, k.value(), v.value())?;
            if let Some(value) = e.value {
                out.push((e.key, value));
            }
        }
        Ok(out)
    }

    /// What this peer has seen from every origin.
    pub fn vector(&self) -> Result<VersionVector, StoreError> {
        let txn = self.read()?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        read_vector(&self.inner.path, &meta, META_VECTOR)
    }

    /// Every current entry (tombstones included) and the vector, from one consistent read.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let txn = self.read()?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let vector = read_vector(&self.inner.path, &meta, META_VECTOR)?;
        let t = txn.open_table(DATA).map_err(|e| self.err(e))?;
        let mut entries = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            entries.push(decode_entry(&self.inner.path, k.value(), v.value())?);
        }
        Ok(Snapshot { entries, vector })
    }

    /// What a peer whose vector is `since` lacks: at most `limit` entries and about
    /// [`CHANGESET_MAX_BYTES`] of records, per origin in stamp order, or
    /// [`ChangeSet::SnapshotNeeded`] if tombstones it has not seen were collected.
    pub fn changes_since(
        &self,
        since: &VersionVector,
        limit: usize,
    ) -> Result<ChangeSet, StoreError> {
        self.changes_since_of(since, limit, None)
    }

    /// [`Store::changes_since`] restricted to the writes of `origins` (all if `None`); `complete`
    /// is still the whole vector — the caller knows which part of it the entries cover.
    pub fn changes_since_of(
        &self,
        since: &VersionVector,
        limit: usize,
        origins: Option<&[u32]>,
    ) -> Result<ChangeSet, StoreError> {
        let txn = self.read()?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let floor = read_vector(&self.inner.path, &meta, META_GC_FLOOR)?;
        if !since.dominates(&floor) {
            return Ok(ChangeSet::SnapshotNeeded);
        }
        let vector = read_vector(&self.inner.path, &meta, META_VECTOR)?;
        let data = txn.open_table(DATA).map_err(|e| self.err(e))?;
        let by_origin = txn.open_table(BY_ORIGIN).map_err(|e| self.err(e))?;
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut truncated = false;
        'origins: for (origin, _) in vector.iter() {
            if origins.is_some_and(|o| !o.contains(&origin)) {
                continue;
            }
            let (start, end) = origin_range(origin, since.get(origin));
            for item in by_origin
                .range::<&[u8]>((Bound::Excluded(&start[..]), Bound::Included(&end[..])))
                .map_err(|e| self.err(e))?
            {
                if entries.len() >= limit || bytes >= CHANGESET_MAX_BYTES {
                    truncated = true;
                    break 'origins;
                }
                let (_, dk) = item.map_err(|e| self.err(e))?;
                let rec = data.get(dk.value()).map_err(|e| self.err(e))?;
                let rec = rec
                    .ok_or_else(|| corrupt(&self.inner.path, "index points to a missing entry"))?;
                bytes += dk.value().len() + rec.value().len();
                entries.push(decode_entry(&self.inner.path, dk.value(), rec.value())?);
            }
        }
        Ok(ChangeSet::Entries {
            entries,
            complete: (!truncated).then_some(vector),
        })
    }

    /// How many current entries a peer whose vector is `since` lacks, counting at most `cap` (the
    /// replication lag shown in status; capped so that status stays cheap).
    pub fn lag(&self, since: &VersionVector, cap: usize) -> Result<usize, StoreError> {
        let txn = self.read()?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let vector = read_vector(&self.inner.path, &meta, META_VECTOR)?;
        let by_origin = txn.open_table(BY_ORIGIN).map_err(|e| self.err(e))?;
        let mut n = 0;
        for (origin, _) in vector.iter() {
            let (start, end) = origin_range(origin, since.get(origin));
            let range = by_origin
                .range::<&[u8]>((Bound::Excluded(&start[..]), Bound::Included(&end[..])))
                .map_err(|e| self.err(e))?;
            n += range.take(cap.saturating_sub(n)).count();
        }
        Ok(n)
    }
}

/// Keys of `origin`'s index rows after `after` (exclusive start, inclusive end).
fn origin_range(origin: u32, after: Hlc) -> ([u8; HLC_BYTES], [u8; HLC_BYTES]) {
    let end = Hlc {
        wall_ms: u64::MAX,
        logical: u32::MAX,
        origin,
    };
    (origin_key(after), origin_key(end))
}

fn stamp(r: Result<Reply, StoreError>) -> Result<Hlc, StoreError> {
    match r? {
        Reply::Stamp(s) => Ok(s),
        Reply::Count(_) => Err(StoreError::Closed),
    }
}

fn count(r: Result<Reply, StoreError>) -> Result<usize, StoreError> {
    match r? {
        Reply::Count(n) => Ok(n),
        Reply::Stamp(_) => Err(StoreError::Closed),
    }
}

fn read_vector(
    path: &Path,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<VersionVector, StoreError> {
    match meta.get(name).map_err(|e| classify(path, e.into()))? {
        None => Ok(VersionVector::new()),
        Some(g) => {
            serde_json::from_slice(g.value()).map_err(|e| corrupt(path, format!("{name}: {e}")))
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the queue stops the writer after it has committed what is queued; joining it
        // means the file is closed when `drop` returns, so it can be reopened at once.
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// The open tables of one write transaction.
struct Tables<'t> {
    data: redb::Table<'t, &'static [u8], &'static [u8]>,
    by_origin: redb::Table<'t, &'static [u8], &'static [u8]>,
    tombstones: redb::Table<'t, &'static [u8], &'static [u8]>,
}

impl Tables<'_> {
    /// Apply one entry by last-writer-wins; true if it replaced the stored version.
    fn apply(&mut self, e: &Entry, path: &Path) -> Result<bool, StoreError> {
        let dk = data_key(e.ns, &e.key);
        let current = match self
            .data
            .get(dk.as_slice())
            .map_err(|x| classify(path, x.into()))?
        {
            Some(g) => Some(record_stamp(path, g.value())?),
            None => None,
        };
        if let Some(cur) = current {
            if !e.supersedes(cur) {
                return Ok(false);
            }
            self.unindex(cur, path)?;
        }
        let ok = origin_key(e.stamp);
        let rec = encode_record(e.stamp, e.value.as_ref());
        self.data
            .insert(dk.as_slice(), rec.as_slice())
            .map_err(|x| classify(path, x.into()))?;
        self.by_origin
            .insert(&ok[..], dk.as_slice())
            .map_err(|x| classify(path, x.into()))?;
        if e.value.is_none() {
            self.tombstones
                .insert(&ok[..], dk.as_slice())
                .map_err(|x| classify(path, x.into()))?;
        }
        Ok(true)
    }

    fn unindex(&mut self, stamp: Hlc, path: &Path) -> Result<(), StoreError> {
        let ok = origin_key(stamp);
        self.by_origin
            .remove(&ok[..])
            .map_err(|x| classify(path, x.into()))?;
        self.tombstones
            .remove(&ok[..])
            .map_err(|x| classify(path, x.into()))?;
        Ok(())
    }

    /// Remove the data record and index rows of `dk` (whose stamp is `stamp`).
    fn remove(&mut self, dk: &[u8], stamp: Hlc, path: &Path) -> Result<(), StoreError> {
        self.data.remove(dk).map_err(|x| classify(path, x.into()))?;
        self.unindex(stamp, path)
    }
}

/// State the writer carries from one batch to the next.
struct Writer<'a> {
    inner: &'a Inner,
    clock: HlcClock,
    /// The epoch including replacements in the batch being built; published after commit.
    epoch: u64,
    /// Joining state including the batch being built; persisted and published after commit.
    joining: bool,
}

/// Outcome of executing one request inside the batch transaction.
type OpResult = Result<Reply, StoreError>;

impl Writer<'_> {
    fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Execute a batch in one transaction. Per-request validation errors go to that request only;
    /// a storage error fails the whole batch.
    fn batch(&mut self, ops: &mut [(Op, Option<OpResult>)]) -> Result<bool, StoreError> {
        let path = self.inner.path.clone();
        let joining_before = self.joining;
        let txn = self
            .inner
            .db
            .begin_write()
            .map_err(|e| classify(&path, e.into()))?;
        let mut changed = false;
        {
            let e = |x: redb::TableError| classify(&path, x.into());
            let mut t = Tables {
                data: txn.open_table(DATA).map_err(e)?,
                by_origin: txn.open_table(BY_ORIGIN).map_err(e)?,
                tombstones: txn.open_table(TOMBSTONES).map_err(e)?,
            };
            let mut meta = txn.open_table(META).map_err(e)?;
            let mut vector = read_vector(&path, &meta, META_VECTOR)?;
            let mut floor = read_vector(&path, &meta, META_GC_FLOOR)?;
            for (op, result) in ops.iter_mut() {
                let r = self.one(op, &mut t, &mut vector, &mut floor)?;
                // Remote batches count even when every entry lost: the vector moved, and peers
                // are told (acknowledgements). Collecting nothing changes nothing.
                changed |= r.is_ok() && !matches!((&*op, &r), (Op::Gc { .. }, Ok(Reply::Count(0))));
                *result = Some(r);
            }
            let put =
                |meta: &mut redb::Table<'_, &'static str, &'static [u8]>, name: &str, v: &[u8]| {
                    meta.insert(name, v)
                        .map(drop)
                        .map_err(|x| classify(&path, x.into()))
                };
            put(
                &mut meta,
                META_VECTOR,
                &serde_json::to_vec(&vector).unwrap_or_default(),
            )?;
            put(
                &mut meta,
                META_GC_FLOOR,
                &serde_json::to_vec(&floor).unwrap_or_default(),
            )?;
            put(&mut meta, META_CLOCK, &self.clock.last().to_bytes())?;
            // Only a join or its end touches the mark: ordinary commits skip it.
            match (joining_before, self.joining) {
                (false, true) => put(&mut meta, META_JOINING, &[1])?,
                (true, false) => {
                    meta.remove(META_JOINING)
                        .map_err(|x| classify(&path, x.into()))?;
                }
                _ => {}
            }
        }
        txn.commit().map_err(|e| classify(&path, e.into()))?;
        Ok(changed)
    }

    fn one(
        &mut self,
        op: &mut Op,
        t: &mut Tables<'_>,
        vector: &mut VersionVector,
        floor: &mut VersionVector,
    ) -> Result<OpResult, StoreError> {
        let path = self.path().to_path_buf();
        match op {
            Op::Put {
                ns,
                key,
                value,
                wall_ms,
            } => {
                if self.joining {
                    return Ok(Err(StoreError::Joining));
                }
                let stamp = self.clock.tick(*wall_ms);
                let e = Entry {
                    ns: *ns,
                    key: std::mem::take(key),
                    value: value.take(),
                    stamp,
                };
                t.apply(&e, &path)?;
                vector.observe(stamp);
                Ok(Ok(Reply::Stamp(stamp)))
            }
            Op::Remote {
                entries,
                seen,
                wall_ms,
            } => {
                // The sender's claim rests on what it believed we held when the session began:
                // void if our content was replaced since.
                let seen = seen
                    .as_ref()
                    .filter(|s| s.epoch == self.epoch)
                    .map(|s| &s.vector);
                if let Err(err) = self.check_remote(entries, seen, vector, *wall_ms) {
                    return Ok(Err(err));
                }
                let mut n = 0;
                for e in entries.iter() {
                    self.clock.observe(e.stamp, *wall_ms)?;
                    vector.observe(e.stamp);
                    n += usize::from(t.apply(e, &path)?);
                }
                if let Some(seen) = seen {
                    for (_, s) in seen.iter() {
                        self.clock.observe(s, *wall_ms)?;
                    }
                    vector.merge(seen);
                }
                Ok(Ok(Reply::Count(n)))
            }
            Op::Snapshot { snapshot, wall_ms } => {
                if let Err(err) =
                    self.check_remote(&snapshot.entries, Some(&snapshot.vector), vector, *wall_ms)
                {
                    return Ok(Err(err));
                }
                let keep: std::collections::HashSet<Vec<u8>> = snapshot
                    .entries
                    .iter()
                    .map(|e| data_key(e.ns, &e.key))
                    .collect();
                let mut doomed = Vec::new();
                for item in t.data.iter().map_err(|x| classify(&path, x.into()))? {
                    let (k, v) = item.map_err(|x| classify(&path, x.into()))?;
                    let s = record_stamp(&path, v.value())?;
                    if !keep.contains(k.value()) && snapshot.vector.covers(s) {
                        doomed.push((k.value().to_vec(), s));
                    }
                }
                let mut n = doomed.len();
                for (k, s) in doomed {
                    t.remove(&k, s, &path)?;
                }
                for e in &snapshot.entries {
                    self.clock.observe(e.stamp, *wall_ms)?;
                    n += usize::from(t.apply(e, &path)?);
                }
                vector.merge(&snapshot.vector);
                for (_, s) in snapshot.vector.iter() {
                    self.clock.observe(s, *wall_ms)?;
                }
                // The clock is now past everything the source ever saw, collected deletions
                // included: local writes order correctly again.
                self.joining = false;
                Ok(Ok(Reply::Count(n)))
            }
            Op::StopJoining => {
                self.joining = false;
                Ok(Ok(Reply::Count(0)))
            }
            Op::ReplaceAll { snapshot, join } => {
                if let Some(e) = snapshot
                    .entries
                    .iter()
                    .find_map(|e| validate(e.ns, &e.key, e.value.as_ref()).err())
                {
                    return Ok(Err(StoreError::Invalid(e)));
                }
                t.data
                    .retain(|_, _| false)
                    .map_err(|x| classify(&path, x.into()))?;
                t.by_origin
                    .retain(|_, _| false)
                    .map_err(|x| classify(&path, x.into()))?;
                t.tombstones
                    .retain(|_, _| false)
                    .map_err(|x| classify(&path, x.into()))?;
                for e in &snapshot.entries {
                    // A backup may carry stamps from any time: the clock only moves forward.
                    self.clock.observe(e.stamp, e.stamp.wall_ms)?;
                    t.apply(e, &path)?;
                }
                let old = std::mem::replace(vector, snapshot.vector.clone());
                for e in &snapshot.entries {
                    vector.observe(e.stamp);
                }
                *floor = VersionVector::new();
                // Writes this peer made and no longer holds may live on at other peers. New writes
                // stamped with the old id would claim (by the vector invariant) to include them, so
                // that peers would never send them back: continue under a fresh replica id.
                let last = self.clock.last();
                let mut replica = (self.inner.origin ^ last.wall_ms as u32 ^ last.logical)
                    .wrapping_mul(0x9E37_79B9);
                let taken = |r: u32| {
                    r == self.inner.origin
                        || r == last.origin
                        || old.iter().any(|(o, _)| o == r)
                        || vector.iter().any(|(o, _)| o == r)
                };
                while taken(replica) {
                    replica = replica.wrapping_add(1);
                }
                self.clock.rebase(replica);
                self.epoch += 1;
                self.joining = *join;
                Ok(Ok(Reply::Count(snapshot.entries.len())))
            }
            Op::Gc { acked } => {
                // A joining peer holds nothing worth collecting yet, and an empty collection
                // floor keeps it from ever asking its peers for a snapshot.
                if self.joining {
                    return Ok(Ok(Reply::Count(0)));
                }
                let Some(seen_by_all) = VersionVector::meet(acked.iter()) else {
                    return Ok(Ok(Reply::Count(0)));
                };
                let mut doomed = Vec::new();
                for (origin, upto) in seen_by_all.iter() {
                    let (start, _) = origin_range(origin, Hlc::zero(origin));
                    let end = origin_key(upto);
                    for item in t
                        .tombstones
                        .range::<&[u8]>((Bound::Included(&start[..]), Bound::Included(&end[..])))
                        .map_err(|x| classify(&path, x.into()))?
                    {
                        let (ok, dk) = item.map_err(|x| classify(&path, x.into()))?;
                        let s = origin_stamp(ok.value())
                            .ok_or_else(|| corrupt(&path, "bad tombstone index key"))?;
                        doomed.push((dk.value().to_vec(), s));
                    }
                }
                let n = doomed.len();
                for (dk, s) in doomed {
                    t.remove(&dk, s, &path)?;
                    floor.observe(s);
                }
                Ok(Ok(Reply::Count(n)))
            }
        }
    }

    /// Refuse a remote batch whole if any entry breaks the limits, is too far in the future, or
    /// would make the version vector track more than [`MAX_ORIGINS`] origins.
    fn check_remote(
        &self,
        entries: &[Entry],
        seen: Option<&VersionVector>,
        vector: &VersionVector,
        wall_ms: u64,
    ) -> Result<(), StoreError> {
        let mut new_origins = std::collections::BTreeSet::new();
        let stamps = entries
            .iter()
            .map(|e| e.stamp)
            .chain(seen.iter().flat_map(|v| v.iter().map(|(_, s)| s)));
        for s in stamps {
            self.clock.check(s, wall_ms)?;
            if vector.get(s.origin) == Hlc::zero(s.origin) {
                new_origins.insert(s.origin);
            }
        }
        if vector.len() + new_origins.len() > MAX_ORIGINS {
            return Err(StoreError::InvalidRemote(format!(
                "{} new origins would exceed the limit of {MAX_ORIGINS}",
                new_origins.len()
            )));
        }
        for e in entries {
            validate(e.ns, &e.key, e.value.as_ref()).map_err(StoreError::InvalidRemote)?;
        }
        Ok(())
    }
}

/// Inverse of [`origin_key`].
fn origin_stamp(k: &[u8]) -> Option<Hlc> {
    let origin = u32::from_be_bytes(k.get(..4)?.try_into().ok()?);
    let wall_ms = u64::from_be_bytes(k.get(4..12)?.try_into().ok()?);
    let logical = u32::from_be_bytes(k.get(12..16)?.try_into().ok()?);
    Some(Hlc {
        wall_ms,
        logical,
        origin,
    })
}

fn writer_loop(inner: &Inner, mut rx: mpsc::Receiver<Request>, clock: HlcClock, max_batch: usize) {
    let mut w = Writer {
        inner,
        clock,
        epoch: 0,
        joining: inner.joining.load(std::sync::atomic::Ordering::Acquire),
    };
    let mut ops = Vec::with_capacity(max_batch);
    let mut replies = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        ops.push((first.op, None));
        replies.push(first.reply);
        while ops.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => {
                    ops.push((r.op, None));
                    replies.push(r.reply);
                }
                Err(_) => break,
            }
        }
        let clock_before = w.clock.clone();
        let epoch_before = w.epoch;
        let joining_before = w.joining;
        match w.batch(&mut ops) {
            Ok(changed) => {
                // Published only now that the replacement is durable: a session that reads the
                // new epoch then reads the new content.
                inner
                    .epoch
                    .store(w.epoch, std::sync::atomic::Ordering::Release);
                inner
                    .joining
                    .store(w.joining, std::sync::atomic::Ordering::Release);
                inner
                    .replica
                    .store(w.clock.last().origin, std::sync::atomic::Ordering::Release);
                // Announce the change before answering, so that a caller who sees its write
                // acknowledged also sees the notification (the simulation relies on this order).
                if changed {
                    inner.changes.send_modify(|n| *n = n.wrapping_add(1));
                }
                for ((_, result), reply) in ops.drain(..).zip(replies.drain(..)) {
                    let _ = reply.send(result.unwrap_or(Err(StoreError::Closed)));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "replicated store: commit failed");
                // Nothing of the batch is durable: forget the stamps it issued.
                w.clock = clock_before;
                w.epoch = epoch_before;
                w.joining = joining_before;
                let detail = err.to_string();
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(match &err {
                        StoreError::Corrupt { path, .. } => StoreError::Corrupt {
                            path: path.clone(),
                            detail: detail.clone(),
                        },
                        _ => StoreError::Io {
                            path: inner.path.clone(),
                            detail: detail.clone(),
                        },
                    }));
                }
                ops.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: u64 = 1_700_000_000_000;

    fn open(dir: &tempfile::TempDir, origin: u32) -> Store {
        Store::open(&dir.path().join("store.redb"), origin).unwrap()
    }

    #[test]
    fn put_get_list_delete_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1);
        let a = s
            .put(Namespace::Config, "bridge/b1", json!({"capacity": 20}), T)
            .unwrap();
        let b = s
            .put(Namespace::Config, "bridge/b2", json!({"capacity": 5}), T)
            .unwrap();
        s.put(Namespace::Conference, "bridge/b1", json!("other ns"), T)
            .unwrap();
        let d = s.delete(Namespace::Config, "bridge/b2", T).unwrap();
        assert!(a < b && b < d);
        assert_eq!(
            s.get(Namespace::Config, "bridge/b1").unwrap(),
            Some(json!({"capacity": 20}))
        );
        assert_eq!(s.get(Namespace::Config, "bridge/b2").unwrap(), None);
        assert_eq!(s.list(Namespace::Config, "bridge/").unwrap().len(), 1);
        drop(s);
        let s = open(&dir, 1);
        assert_eq!(
            s.list(Namespace::Config, "").unwrap(),
            vec![("bridge/b1".into(), json!({"capacity": 20}))]
        );
        assert_eq!(s.vector().unwrap().get(1), d);
        // The clock resumes after the last stamp even if the wall clock went back.
        assert!(s.put(Namespace::Config, "x", json!(1), T - 10_000).unwrap() > d);
    }

    #[test]
    fn rejects_bad_keys_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1);
        assert!(matches!(
            s.put(Namespace::Config, "", json!(1), T),
            Err(StoreError::Invalid(_))
        ));
        let big = "x".repeat(MAX_VALUE_BYTES);
        assert!(matches!(
            s.put(Namespace::Config, "k", json!(big), T),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn remote_entries_merge_last_writer_wins() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1);
        let mine = s.put(Namespace::Config, "k", json!("mine"), T).unwrap();
        let older = Entry {
            ns: Namespace::Config,
            key: "k".into(),
            value: Some(json!("old")),
            stamp: Hlc {
                wall_ms: T - 1,
                logical: 0,
                origin: 2,
            },
        };
        assert_eq!(s.apply_remote(vec![older.clone()], None, T).unwrap(), 0);
        assert_eq!(s.get(Namespace::Config, "k").unwrap(), Some(json!("mine")));
        let newer = Entry {
            value: None,
            stamp: Hlc {
                wall_ms: T + 5,
                logical: 0,
                origin: 2,
            },
            ..older
        };
        assert_eq!(s.apply_remote(vec![newer.clone()], None, T).unwrap(), 1);
        assert_eq!(s.get(Namespace::Config, "k").unwrap(), None);
        let v = s.vector().unwrap();
        assert_eq!((v.get(1), v.get(2)), (mine, newer.stamp));
        // Next local write orders after the remote one although the local wall clock is behind.
        assert!(s.put(Namespace::Config, "k", json!(3), T).unwrap() > newer.stamp);
        // Far-future entries are refused, whole batch.
        let future = Entry {
            ns: Namespace::Config,
            key: "f".into(),
            value: Some(json!(1)),
            stamp: Hlc {
                wall_ms: T + 3_600_000,
                logical: 0,
                origin: 2,
            },
        };
        let ok = Entry {
            key: "g".into(),
            stamp: Hlc {
                wall_ms: T,
                logical: 9,
                origin: 2,
            },
            ..future.clone()
        };
        assert!(matches!(
            s.apply_remote(vec![ok, future], None, T),
            Err(StoreError::ClockSkew(_))
        ));
        assert_eq!(s.get(Namespace::Config, "g").unwrap(), None);
    }

    /// Last-writer-wins is order-independent and idempotent: the same entries applied in different
    /// orders, batchings and with duplicates give identical stores. Seeded; prints the seed.
    #[test]
    fn merge_order_does_not_matter() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        for seed in 0..20u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let entries: Vec<Entry> = (0..80u32)
                .map(|i| Entry {
                    ns: if rng.random_bool(0.5) {
                        Namespace::Config
                    } else {
                        Namespace::Conference
                    },
                    key: format!("k{}", rng.random_range(0..6)),
                    value: rng.random_bool(0.8).then(|| json!(i)),
                    stamp: Hlc {
                        wall_ms: T + rng.random_range(0..20),
                        logical: i, // a replica never issues a stamp twice
                        origin: rng.random_range(1..4),
                    },
                })
                .collect();
            let mut snaps = Vec::new();
            for _ in 0..3 {
                let dir = tempfile::tempdir().unwrap();
                let s = open(&dir, 9);
                let mut order = entries.clone();
                order.extend(entries.iter().take(rng.random_range(0..20)).cloned());
                order.shuffle(&mut rng);
                while !order.is_empty() {
                    let n = rng.random_range(1..=order.len());
                    s.apply_remote(order.drain(..n).collect(), None, T).unwrap();
                }
                snaps.push(s.snapshot().unwrap());
            }
            assert_eq!(snaps[0], snaps[1], "seed {seed}");
            assert_eq!(snaps[0], snaps[2], "seed {seed}");
        }
    }

    #[test]
    fn change_sets_are_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1);
        for i in 0..40 {
            s.put(
                Namespace::Config,
                &format!("big/{i}"),
                json!("v".repeat(60_000)),
                T,
            )
            .unwrap();
        }
        let ChangeSet::Entries { entries, complete } =
            s.changes_since(&VersionVector::new(), 512).unwrap()
        else {
            panic!("no snapshot expected")
        };
        assert!(
            entries.len() > 10 && entries.len() < 40,
            "{}",
            entries.len()
        );
        assert_eq!(complete, None);
    }

    #[test]
    fn a_claim_from_before_a_replacement_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1);
        let before = s.epoch();
        s.replace_all(Snapshot::default()).unwrap();
        assert_eq!(s.epoch(), before + 1);
        let mut v = VersionVector::new();
        v.observe(Hlc {
            wall_ms: T,
            logical: 0,
            origin: 7,
        });
        let stale = Seen {
            vector: v.clone(),
            epoch: before,
        };
        s.apply_remote(vec![], Some(stale), T).unwrap();
        assert!(!s.vector().unwrap().dominates(&v));
        let fresh = Seen {
            vector: v.clone(),
            epoch: s.epoch(),
        };
        s.apply_remote(vec![], Some(fresh), T).unwrap();
        assert!(s.vector().unwrap().dominates(&v));
    }

    #[test]
    fn a_joining_peer_refuses_writes_until_a_members_snapshot_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1);
        s.put(Namespace::Config, "own", json!(1), T).unwrap();
        s.join().unwrap();
        assert!(s.joining());
        assert!(s.get(Namespace::Config, "own").unwrap().is_none());
        assert!(matches!(
            s.put(Namespace::Config, "a", json!(1), T),
            Err(StoreError::Joining)
        ));
        assert!(matches!(
            s.delete(Namespace::Conference, "a", T),
            Err(StoreError::Joining)
        ));
        // Nothing to collect while joining; entries from peers are welcome.
        assert_eq!(s.gc_tombstones(vec![VersionVector::new()]).unwrap(), 0);
        let remote = Entry {
            ns: Namespace::Config,
            key: "b".into(),
            value: Some(json!(2)),
            stamp: Hlc {
                wall_ms: T + 5,
                logical: 0,
                origin: 9,
            },
        };
        s.apply_remote(vec![remote], None, T).unwrap();
        assert!(s.joining());
        drop(s);
        let s = open(&dir, 1);
        assert!(s.joining(), "the join must survive a restart");
        // A member's snapshot carries every deletion it collected: the clock passes them.
        let mut vector = VersionVector::new();
        let collected = Hlc {
            wall_ms: T + 60_000,
            logical: 0,
            origin: 9,
        };
        vector.observe(collected);
        s.apply_snapshot(
            Snapshot {
                entries: vec![],
                vector,
            },
            T + 60_000,
        )
        .unwrap();
        assert!(!s.joining());
        let stamp = s.put(Namespace::Config, "a", json!(1), T).unwrap();
        assert!(stamp > collected, "{stamp} must order after {collected}");
        drop(s);
        assert!(!open(&dir, 1).joining());
    }

    #[test]
    fn a_peer_that_gives_up_joining_accepts_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1);
        s.join().unwrap();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(s.stop_joining_async())
            .unwrap();
        assert!(!s.joining());
        s.put(Namespace::Config, "a", json!(1), T).unwrap();
    }

    #[test]
    fn refuses_a_flood_of_origins() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1);
        let flood: Vec<Entry> = (0..=MAX_ORIGINS as u32)
            .map(|o| Entry {
                ns: Namespace::Config,
                key: format!("k{o}"),
                value: None,
                stamp: Hlc {
                    wall_ms: T,
                    logical: 0,
                    origin: o + 100,
                },
            })
            .collect();
        assert!(matches!(
            s.apply_remote(flood.clone(), None, T),
            Err(StoreError::InvalidRemote(_))
        ));
        assert!(s.vector().unwrap().is_empty());
        assert_eq!(s.apply_remote(flood[..10].to_vec(), None, T).unwrap(), 10);
    }

    #[test]
    fn changes_since_returns_what_the_peer_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1);
        let mut stamps = Vec::new();
        for i in 0..10 {
            stamps.push(
                s.put(Namespace::Config, &format!("k{i}"), json!(i), T + i)
                    .unwrap(),
            );
        }
        // k0 is overwritten: its old version is not sent.
        s.put(Namespace::Config, "k0", json!("new"), T + 20)
            .unwrap();
        let mut peer = VersionVector::new();
        peer.observe(stamps[4]);
        let ChangeSet::Entries { entries, complete } = s.changes_since(&peer, 100).unwrap() else {
            panic!()
        };
        let keys: Vec<_> = entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["k5", "k6", "k7", "k8", "k9", "k0"]);
        assert_eq!(complete, Some(s.vector().unwrap()));
        let ChangeSet::Entries { entries, complete } = s.changes_since(&peer, 2).unwrap() else {
            panic!()
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(complete, None);
        assert_eq!(s.lag(&peer, 100).unwrap(), 6);
        assert_eq!(s.lag(&peer, 3).unwrap(), 3);
    }

    #[test]
    fn tombstones_collected_only_when_all_peers_saw_them_then_snapshot_needed() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1);
        s.put(Namespace::Config, "a", json!(1), T).unwrap();
        let del = s.delete(Namespace::Config, "a", T + 1).unwrap();
        let mut saw = VersionVector::new();
        saw.observe(del);
        let behind = VersionVector::new();
        assert_eq!(s.gc_tombstones(vec![]).unwrap(), 0);
        assert_eq!(
            s.gc_tombstones(vec![saw.clone(), behind.clone()]).unwrap(),
            0
        );
        assert_eq!(s.snapshot().unwrap().entries.len(), 1);
        assert_eq!(s.gc_tombstones(vec![saw.clone(), saw.clone()]).unwrap(), 1);
        assert!(s.snapshot().unwrap().entries.is_empty());
        assert_eq!(
            s.changes_since(&behind, 10).unwrap(),
            ChangeSet::SnapshotNeeded
        );
        assert!(matches!(
            s.changes_since(&saw, 10).unwrap(),
            ChangeSet::Entries { .. }
        ));
    }

    #[test]
    fn snapshot_merge_drops_collected_deletions_and_keeps_unseen_writes() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let src = open(&d1, 1);
        let dst = open(&d2, 2);
        let a = src.put(Namespace::Config, "a", json!(1), T).unwrap();
        dst.apply_remote(
            vec![Entry {
                ns: Namespace::Config,
                key: "a".into(),
                value: Some(json!(1)),
                stamp: a,
            }],
            None,
            T,
        )
        .unwrap();
        dst.put(Namespace::Config, "mine", json!(2), T + 1).unwrap();
        src.delete(Namespace::Config, "a", T + 2).unwrap();
        let mut all = src.vector().unwrap();
        all.merge(&VersionVector::new());
        src.gc_tombstones(vec![all]).unwrap();
        let snap = src.snapshot().unwrap();
        assert!(snap.entries.is_empty());
        dst.apply_snapshot(snap.clone(), T + 3).unwrap();
        assert_eq!(dst.get(Namespace::Config, "a").unwrap(), None);
        assert_eq!(dst.get(Namespace::Config, "mine").unwrap(), Some(json!(2)));
        assert!(dst.vector().unwrap().dominates(&snap.vector));
        // replace_all: the content becomes exactly the snapshot's.
        dst.replace_all(snap).unwrap();
        assert!(dst.snapshot().unwrap().entries.is_empty());
        assert!(
            dst.put(Namespace::Config, "z", json!(0), 0)
                .unwrap()
                .wall_ms
                > T
        );
    }

    #[test]
    fn concurrent_writers_are_group_committed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open(&dir, 1));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        s.put(Namespace::Conference, &format!("t{t}/{i}"), json!(i), T)
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.list(Namespace::Conference, "").unwrap().len(), 400);
    }

    #[test]
    fn damaged_file_is_reported_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let s = Store::open(&path, 1).unwrap();
            for i in 0..300 {
                s.put(
                    Namespace::Config,
                    &format!("key/{i}"),
                    json!({"pad": "x".repeat(100), "i": i}),
                    T,
                )
                .unwrap();
            }
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        let pristine = bytes.clone();
        // Damage of several shapes: bytes flipped all through the file, in the data pages only, and
        // the file cut short.
        for i in (4096..len).step_by(97) {
            bytes[i] ^= 0x5a;
        }
        let mut data_only = pristine.clone();
        for i in (len / 4..len * 3 / 4).step_by(61) {
            data_only[i] ^= 0xff;
        }
        let truncated = pristine[..len / 2].to_vec();
        for damaged in [bytes, data_only, truncated] {
            std::fs::write(&path, &damaged).unwrap();
            let err = Store::open(&path, 1).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains("damaged") && msg.contains("store.redb"),
                "{msg}"
            );
        }
        // The undamaged file still opens with its content.
        std::fs::write(&path, &pristine).unwrap();
        assert_eq!(
            Store::open(&path, 1)
                .unwrap()
                .list(Namespace::Config, "key/")
                .unwrap()
                .len(),
            300
        );
        // A file that is not a database at all.
        std::fs::write(
            &path,
            b"this is not a redb file, it is a text file of some length",
        )
        .unwrap();
        let err = Store::open(&path, 1).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }
}
