//! The durable local store: one redb file per peer with a write-ahead journal in front of it,
//! written by one writer thread that makes many callers' writes durable together (group commit).
//!
//! Every mutation — local put/delete, entries received from a peer, a snapshot, a tombstone
//! collection — goes through the writer thread: it assigns the HLC stamps of local writes, applies
//! last-writer-wins, updates the version vector with the same changes, and answers the callers only
//! once those changes are durable. Because stamps are assigned in commit order, a reader always
//! sees a prefix of each origin's writes — the invariant that lets [`Store::changes_since`] compute
//! what a peer lacks from its version vector.
//!
//! A redb commit rewrites B-tree pages and syncs twice, which made every small group of writes
//! cost hundreds of microseconds. Ordinary writes (puts, deletes, remote entries) are instead
//! appended to a journal (module `journal`) and synced once, then kept in an in-memory layer
//! (module `overlay`) over the file; a checkpoint thread copies full layers into the file in one
//! large transaction, in key order, and deletes the journal segments they came from. The rare
//! operations that read or rewrite the whole content (snapshot merge, replacement, tombstone
//! collection) first wait until everything is in the file and then run as one redb transaction.
//! Opening the store replays what the journal holds beyond the file's last checkpoint.
//!
//! Reads look at the layers and a redb read transaction together, under a read lock that the
//! writer takes briefly to publish a durable group (never across a journal sync) and for the
//! whole of a rare whole-content operation; a long read (a snapshot) holds publication back
//! while it runs.
//!
//! Tables: `data` (namespace tag + key → stamp, flag, JSON), `by_origin` (origin + stamp → data key,
//! for every current entry), `tombstones` (the same, for deleted keys only, for collection), `meta`
//! (version vector, collection floor, clock high-water mark, joining mark, last journal frame held).

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::hlc::{DEFAULT_MAX_DRIFT_MS, HLC_BYTES, Hlc, HlcClock, HlcError};
use crate::journal::{self, Journal, JournalError};
use crate::model::{Entry, MAX_KEY_BYTES, MAX_VALUE_BYTES, Namespace, VersionVector};
use crate::overlay::{self, Layer, Table};

const DATA: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("data");
const BY_ORIGIN: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("by_origin");
const TOMBSTONES: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("tombstones");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

const META_VECTOR: &str = "vector";
const META_GC_FLOOR: &str = "gc_floor";
const META_CLOCK: &str = "clock";
/// Present while the peer is joining a cluster and has not yet merged a member's snapshot.
const META_JOINING: &str = "joining";
/// Sequence number of the last journal frame the file holds.
const META_WAL_SEQ: &str = "wal_seq";

/// Bytes in memory after which a checkpoint copies them into the file (see
/// [`StoreOptions::checkpoint_keys`] for the count).
const CHECKPOINT_BYTES: usize = 16 << 20;
/// Bytes of keys and values in each durable piece of a checkpoint: small enough that a journal
/// sync waiting behind its flush waits a few milliseconds at most (measured: 60 ms with one
/// piece per checkpoint of 16 Ki keys, about 10 with pieces of 128 KiB).
#[cfg(not(test))]
const CHECKPOINT_PIECE: usize = 128 << 10;
/// Unit tests take several pieces per checkpoint.
#[cfg(test)]
const CHECKPOINT_PIECE: usize = 512;
/// While a checkpoint runs, the newer layer grows up to this many times the checkpoint size;
/// then the writer waits for it, and refuses writes after [`FULL_WAIT`].
const MAX_LAYER_FACTOR: usize = 4;
/// How long a writer whose in-memory layer is full waits for the running checkpoint before it
/// refuses writes.
const FULL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long an operation on the whole content waits for failing checkpoints before it fails.
const CHECKPOINT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

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
    /// Changed keys (over all tables) held in memory before a checkpoint copies them into the
    /// file: large enough that the copy's B-tree work is done in bulk, small enough that replaying
    /// the journal after a crash takes well under a second.
    pub checkpoint_keys: usize,
    /// Bytes of database pages the store caches in memory. redb's own default, 1 GiB, is what a
    /// large store's daemon grew to (570 MB after 1.3 M writes); 64 MiB wrote as fast in the
    /// cluster benchmark, and the kernel's page cache holds the file as well.
    pub cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            max_batch: 1024,
            queue: 4096,
            max_drift_ms: DEFAULT_MAX_DRIFT_MS,
            checkpoint_keys: 16 * 1024,
            cache_bytes: 64 << 20,
        }
    }
}

/// What the store's write path has done since it was opened, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StoreStats {
    /// Groups of requests made durable together, each with one journal sync.
    pub journal_syncs: u64,
    /// Bytes appended to the journal.
    pub journal_bytes: u64,
    /// Checkpoints that copied journalled changes into the database file.
    pub checkpoints: u64,
    /// Checkpoint attempts that failed (each is retried; the journal keeps the changes).
    pub checkpoint_failures: u64,
    /// Changed keys held in memory and in the journal, not yet in the database file.
    pub unflushed_keys: usize,
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

/// A request the writer runs with others in a journal group.
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
    StopJoining,
}

/// A request on the whole content, run alone as one file transaction.
enum WholeOp {
    Snapshot {
        snapshot: Snapshot,
        wall_ms: u64,
    },
    ReplaceAll {
        snapshot: Snapshot,
        /// Joining a cluster: local writes wait for a member's snapshot.
        join: bool,
    },
    Gc {
        acked: Vec<VersionVector>,
    },
}

enum Reply {
    Stamp(Hlc),
    Count(usize),
}

struct Request {
    op: Work,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

/// What is durable in the journal but not (yet) in the file, and the meta values readers need.
struct Mem {
    /// Changes since the last checkpoint began.
    active: Layer,
    /// Changes the running checkpoint copies into the file.
    frozen: Option<Arc<Layer>>,
    /// Replicated changes whose journal sync is running. Readers see them already: they are
    /// durable at their origin, and a failed sync only hides them again until the origin sends
    /// them anew. Nothing sent to peers comes from here (the vector does not cover it yet).
    unsynced: Option<Layer>,
    vector: VersionVector,
    floor: VersionVector,
}

impl Mem {
    /// A copy of what is durable, for a long read that must not hold the writer back.
    fn durable_copy(&self) -> Mem {
        Mem {
            active: self.active.clone(),
            frozen: self.frozen.clone(),
            unsynced: None,
            vector: self.vector.clone(),
            floor: self.floor.clone(),
        }
    }

    /// `key` of `t` as the layers show it, newest first; `None` if no layer knows it.
    fn get(&self, t: Table, key: &[u8]) -> Option<Option<&[u8]>> {
        self.active
            .get(t, key)
            .or_else(|| self.frozen.as_ref().and_then(|f| f.get(t, key)))
    }
}

/// A checkpoint for the checkpoint thread: `layer` holds the frames up to `seq`, all in segments
/// numbered up to `segment`.
struct Checkpoint {
    layer: Arc<Layer>,
    seq: u64,
    segment: u64,
}

struct Inner {
    db: Database,
    path: PathBuf,
    mem: RwLock<Mem>,
    /// With `checkpoint_done`: wakes a writer that waits for the running checkpoint (whose end
    /// shows as `mem.frozen` gone).
    checkpoint_lock: Mutex<()>,
    checkpoint_done: Condvar,
    /// Set when the store is dropped: a failing checkpoint stops retrying (the journal keeps
    /// its changes).
    closing: std::sync::atomic::AtomicBool,
    /// A checkpoint was given up on at close: its changes are only in the journal, which must
    /// therefore stay.
    checkpoint_abandoned: std::sync::atomic::AtomicBool,
    /// Tests make checkpoints fail with this.
    #[cfg(test)]
    fail_checkpoints: std::sync::atomic::AtomicBool,
    /// Tests hold journal syncs with this...
    #[cfg(test)]
    sync_gate: Mutex<()>,
    /// ...and make them fail with this.
    #[cfg(test)]
    fail_syncs: std::sync::atomic::AtomicBool,
    journal_syncs: AtomicU64,
    journal_bytes: AtomicU64,
    checkpoints_done: AtomicU64,
    checkpoint_failures: AtomicU64,
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
/// [`crate::service::Service::write`]). Reads (`get`, `list`, `snapshot`, …) never wait for a
/// journal sync and are fine anywhere.
pub struct Store {
    inner: Arc<Inner>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    checkpointer: Option<JoinHandle<()>>,
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
fn open_checked(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let attempt = std::panic::catch_unwind(|| {
        let mut db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)?;
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
        // Measured without building the JSON text, and only as far as the limit.
        let mut len = Counter(0);
        if serde_json::to_writer(&mut len, v).is_err() {
            return Err(format!(
                "value of {ns}/{key} is over the limit of {MAX_VALUE_BYTES} bytes"
            ));
        }
    }
    Ok(())
}

/// A writer that counts bytes and refuses to go past [`MAX_VALUE_BYTES`].
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        if self.0 > MAX_VALUE_BYTES {
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
        let existed = path.exists();
        let db = open_checked(path, options.cache_bytes)?;
        // Owner only: the content includes administrator accounts (password hashes).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            StoreError::Io {
                path: path.to_path_buf(),
                detail: format!("cannot make the file private to its owner: {e}"),
            }
        })?;
        if !existed {
            // Segments without their file (it was moved away so that the peer starts afresh)
            // must not be replayed into a new one.
            journal::set_aside(path).map_err(|e| journal_error(path, e))?;
        }
        let txn = db.begin_write().map_err(|e| classify(path, e.into()))?;
        let wal_seq = {
            for def in [DATA, BY_ORIGIN, TOMBSTONES] {
                txn.open_table(def).map_err(|e| classify(path, e.into()))?;
            }
            let meta = txn.open_table(META).map_err(|e| classify(path, e.into()))?;
            read_meta(path, &meta, META_WAL_SEQ)?
                .map(|b| {
                    b.try_into()
                        .map(u64::from_le_bytes)
                        .map_err(|_| corrupt(path, "bad journal position"))
                })
                .transpose()?
                .unwrap_or(0)
        };
        txn.commit().map_err(|e| classify(path, e.into()))?;

        // What the journal holds beyond the file's last checkpoint goes into the file first.
        let mut replayed = Layer::default();
        let last_seq = journal::replay(path, wal_seq, |t, k, v| match v {
            Some(v) => replayed.put(t, k, v),
            None => replayed.unset(t, k),
        })
        .map_err(|e| journal_error(path, e))?;
        if !replayed.is_empty() {
            tracing::info!(
                path = %path.display(),
                frames = last_seq - wal_seq,
                "replicated store: replayed the journal"
            );
            write_checkpoint(&db, path, &replayed, last_seq)?;
        }
        journal::remove_through(path, u64::MAX).map_err(|e| journal_error(path, e))?;
        let journal = Journal::create(path, 1, last_seq + 1).map_err(|e| journal_error(path, e))?;

        let txn = db.begin_read().map_err(|e| classify(path, e.into()))?;
        let meta = txn.open_table(META).map_err(|e| classify(path, e.into()))?;
        let clock_mark = read_meta(path, &meta, META_CLOCK)?
            .map(|b| Hlc::from_bytes(&b).ok_or_else(|| corrupt(path, "bad clock record")))
            .transpose()?;
        let joining = read_meta(path, &meta, META_JOINING)?.is_some();
        let vector = read_vector(path, &meta, META_VECTOR)?;
        let floor = read_vector(path, &meta, META_GC_FLOOR)?;
        drop((meta, txn));

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
            mem: RwLock::new(Mem {
                active: Layer::default(),
                frozen: None,
                unsynced: None,
                vector: vector.clone(),
                floor: floor.clone(),
            }),
            checkpoint_lock: Mutex::new(()),
            checkpoint_done: Condvar::new(),
            closing: false.into(),
            checkpoint_abandoned: false.into(),
            #[cfg(test)]
            fail_checkpoints: false.into(),
            #[cfg(test)]
            sync_gate: Mutex::new(()),
            #[cfg(test)]
            fail_syncs: false.into(),
            journal_syncs: 0.into(),
            journal_bytes: 0.into(),
            checkpoints_done: 0.into(),
            checkpoint_failures: 0.into(),
            origin,
            changes,
            epoch: 0.into(),
            joining: joining.into(),
            replica: clock.last().origin.into(),
        });
        let spawn_err = |e: std::io::Error| StoreError::Io {
            path: path.to_path_buf(),
            detail: format!("spawn store thread: {e}"),
        };
        let (jobs, job_rx) = std::sync::mpsc::sync_channel(1);
        let c = Arc::clone(&inner);
        let checkpointer = std::thread::Builder::new()
            .name("confmesh-ckpt".into())
            .spawn(move || checkpoint_loop(&c, job_rx))
            .map_err(spawn_err)?;
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let max_batch = options.max_batch.max(1);
        let writer = Writer {
            inner: Arc::clone(&inner),
            checkpoint_keys: options.checkpoint_keys.max(1),
            state: State {
                clock,
                epoch: 0,
                joining,
                vector,
                floor,
            },
            journal,
            jobs,
        };
        let writer = std::thread::Builder::new()
            .name("confmesh-store".into())
            .spawn(move || writer_loop(writer, rx, max_batch))
            .map_err(spawn_err)?;
        Ok(Store {
            inner,
            tx: Some(tx),
            writer: Some(writer),
            checkpointer: Some(checkpointer),
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

    fn submit(
        &self,
        op: impl Into<Work>,
    ) -> Result<oneshot::Receiver<Result<Reply, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.blocking_send(Request {
            op: op.into(),
            reply,
        })
        .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    async fn submit_async(&self, op: impl Into<Work>) -> Result<Reply, StoreError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(Request {
            op: op.into(),
            reply,
        })
        .await
        .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn run(&self, op: impl Into<Work>) -> Result<Reply, StoreError> {
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
            op: Work::Group(Op::Remote {
                entries,
                seen,
                wall_ms,
            }),
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
        count(self.run(WholeOp::Snapshot { snapshot, wall_ms }))
    }

    /// [`Store::apply_snapshot`] for async code.
    pub async fn apply_snapshot_async(
        &self,
        snapshot: Snapshot,
        wall_ms: u64,
    ) -> Result<usize, StoreError> {
        count(
            self.submit_async(WholeOp::Snapshot { snapshot, wall_ms })
                .await,
        )
    }

    /// Replace the whole content by `snapshot` (restore from backup; joining a cluster with
    /// `Snapshot::default()` so the cluster's content replaces ours). The clock is kept, so later
    /// local writes still order after everything this peer ever stamped, and later local writes
    /// carry a fresh replica id in their stamps' `origin` (so they cannot hide writes of the old id
    /// that other peers still hold and will send back). Blocking.
    pub fn replace_all(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        count(self.run(WholeOp::ReplaceAll {
            snapshot,
            join: false,
        }))
        .map(drop)
    }

    /// [`Store::replace_all`] for async code (restore from the daemon).
    pub async fn replace_all_async(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        count(
            self.submit_async(WholeOp::ReplaceAll {
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
        count(self.run(WholeOp::ReplaceAll {
            snapshot: Snapshot::default(),
            join: true,
        }))
        .map(drop)
    }

    /// [`Store::join`] for async code.
    pub async fn join_async(&self) -> Result<(), StoreError> {
        count(
            self.submit_async(WholeOp::ReplaceAll {
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
        count(self.run(WholeOp::Gc { acked }))
    }

    /// [`Store::gc_tombstones`] for async code.
    pub async fn gc_tombstones_async(
        &self,
        acked: Vec<VersionVector>,
    ) -> Result<usize, StoreError> {
        count(self.submit_async(WholeOp::Gc { acked }).await)
    }

    /// What is durable, in layers and a file snapshot that go together: the writer cannot
    /// publish, nor a checkpoint retire its layer, while the guard is held.
    fn view(&self) -> Result<View<'_>, StoreError> {
        View::open(&self.inner, false)
    }

    /// The current value of `key`, `None` if absent or deleted.
    pub fn get(&self, ns: Namespace, key: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.get_entry(ns, key)?.and_then(|e| e.value))
    }

    /// The current version of `key` with its stamp, tombstone included: for showing who wrote it
    /// when, and for checks that a write ordered after what its writer had seen.
    pub fn get_entry(&self, ns: Namespace, key: &str) -> Result<Option<Entry>, StoreError> {
        let v = View::open(&self.inner, true)?;
        let data = v.table(DATA)?;
        let dk = data_key(ns, key);
        v.get(&data, Table::Data, &dk)?
            .map(|rec| decode_entry(v.path, &dk, &rec))
            .transpose()
    }

    /// All live `(key, value)` pairs of `ns` whose key starts with `prefix`, in key order.
    pub fn list(&self, ns: Namespace, prefix: &str) -> Result<Vec<(String, Value)>, StoreError> {
        let v = View::open(&self.inner, true)?;
        let data = v.table(DATA)?;
        let start = data_key(ns, prefix);
        let mut out = Vec::new();
        for item in v.range(
            &data,
            Table::Data,
            (Bound::Included(&start), Bound::Unbounded),
        )? {
            let (k, rec) = item?;
            if !k.starts_with(&start) {
                break;
            }
            let e = decode_entry(v.path, &k, &rec)?;
            if let Some(value) = e.value {
                out.push((e.key, value));
            }
        }
        Ok(out)
    }

    /// Counters of the write path (journal syncs, checkpoints) and what awaits a checkpoint.
    pub fn stats(&self) -> StoreStats {
        let i = &*self.inner;
        let unflushed_keys = {
            let mem = i.mem.read().unwrap_or_else(|p| p.into_inner());
            mem.active.len() + mem.frozen.as_ref().map_or(0, |f| f.len())
        };
        StoreStats {
            journal_syncs: i.journal_syncs.load(Ordering::Relaxed),
            journal_bytes: i.journal_bytes.load(Ordering::Relaxed),
            checkpoints: i.checkpoints_done.load(Ordering::Relaxed),
            checkpoint_failures: i.checkpoint_failures.load(Ordering::Relaxed),
            unflushed_keys,
        }
    }

    /// What this peer has seen from every origin.
    pub fn vector(&self) -> Result<VersionVector, StoreError> {
        Ok(self
            .inner
            .mem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .vector
            .clone())
    }

    /// Every current entry (tombstones included) and the vector, from one consistent read. The
    /// read works on a copy of the in-memory layers (and a file snapshot), so that the writer
    /// goes on meanwhile, however large the store.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let v = View::copied(&self.inner)?;
        let data = v.table(DATA)?;
        let mut entries = Vec::new();
        for item in v.range(&data, Table::Data, (Bound::Unbounded, Bound::Unbounded))? {
            let (k, rec) = item?;
            entries.push(decode_entry(v.path, &k, &rec)?);
        }
        Ok(Snapshot {
            entries,
            vector: v.mem.vector.clone(),
        })
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
        let v = self.view()?;
        if !since.dominates(&v.mem.floor) {
            return Ok(ChangeSet::SnapshotNeeded);
        }
        let data = v.table(DATA)?;
        let by_origin = v.table(BY_ORIGIN)?;
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut truncated = false;
        'origins: for (origin, _) in v.mem.vector.iter() {
            if origins.is_some_and(|o| !o.contains(&origin)) {
                continue;
            }
            let (start, end) = origin_range(origin, since.get(origin));
            let range = (Bound::Excluded(&start[..]), Bound::Included(&end[..]));
            for item in v.range(&by_origin, Table::ByOrigin, range)? {
                if entries.len() >= limit || bytes >= CHANGESET_MAX_BYTES {
                    truncated = true;
                    break 'origins;
                }
                let (_, dk) = item?;
                let rec = v
                    .get(&data, Table::Data, &dk)?
                    .ok_or_else(|| corrupt(v.path, "index points to a missing entry"))?;
                bytes += dk.len() + rec.len();
                entries.push(decode_entry(v.path, &dk, &rec)?);
            }
        }
        Ok(ChangeSet::Entries {
            entries,
            complete: (!truncated).then(|| v.mem.vector.clone()),
        })
    }

    /// How many current entries a peer whose vector is `since` lacks, counting at most `cap` (the
    /// replication lag shown in status; capped so that status stays cheap).
    pub fn lag(&self, since: &VersionVector, cap: usize) -> Result<usize, StoreError> {
        let v = self.view()?;
        let by_origin = v.table(BY_ORIGIN)?;
        let mut n = 0;
        for (origin, _) in v.mem.vector.iter() {
            let (start, end) = origin_range(origin, since.get(origin));
            let range = (Bound::Excluded(&start[..]), Bound::Included(&end[..]));
            for item in v
                .range(&by_origin, Table::ByOrigin, range)?
                .take(cap.saturating_sub(n))
            {
                item?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// A consistent read: the in-memory layers (locked) over a redb read transaction.
struct View<'s> {
    mem: Layers<'s>,
    /// Whether the view shows replicated changes whose journal sync is running.
    unsynced: bool,
    txn: redb::ReadTransaction,
    path: &'s Path,
}

/// The in-memory part of a view: held under the lock (the writer cannot publish meanwhile), or
/// copied (a long read).
enum Layers<'s> {
    Held(RwLockReadGuard<'s, Mem>),
    Copied(Box<Mem>),
}

impl std::ops::Deref for Layers<'_> {
    type Target = Mem;

    fn deref(&self) -> &Mem {
        match self {
            Layers::Held(guard) => guard,
            Layers::Copied(mem) => mem,
        }
    }
}

type FileTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;
/// A live key and its value.
type Row = (Vec<u8>, Vec<u8>);

impl View<'_> {
    fn open(inner: &Inner, unsynced: bool) -> Result<View<'_>, StoreError> {
        let mem = inner.mem.read().unwrap_or_else(|p| p.into_inner());
        let txn = inner
            .db
            .begin_read()
            .map_err(|e| classify(&inner.path, e.into()))?;
        Ok(View {
            mem: Layers::Held(mem),
            unsynced,
            txn,
            path: &inner.path,
        })
    }

    /// A durable view that holds no lock: the file snapshot is taken under the lock, so that it
    /// matches the layers copied with it, and kept by redb however the file changes afterwards.
    fn copied(inner: &Inner) -> Result<View<'_>, StoreError> {
        let View { mem, txn, .. } = View::open(inner, false)?;
        Ok(View {
            mem: Layers::Copied(Box::new(mem.durable_copy())),
            unsynced: false,
            txn,
            path: &inner.path,
        })
    }

    fn table(&self, def: TableDefinition<'_, &[u8], &[u8]>) -> Result<FileTable, StoreError> {
        self.txn
            .open_table(def)
            .map_err(|e| classify(self.path, e.into()))
    }

    /// `key` of `t`, whose file table is `file`.
    fn get(&self, file: &FileTable, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let unsynced = self.shown_unsynced().and_then(|u| u.get(t, key));
        match unsynced.or_else(|| self.mem.get(t, key)) {
            Some(v) => Ok(v.map(<[u8]>::to_vec)),
            None => Ok(file
                .get(key)
                .map_err(|e| classify(self.path, e.into()))?
                .map(|g| g.value().to_vec())),
        }
    }

    /// The layer of replicated changes whose sync is running, if the view shows it.
    fn shown_unsynced(&self) -> Option<&Layer> {
        self.mem.unsynced.as_ref().filter(|_| self.unsynced)
    }

    /// The live rows of `t` in `range`, in key order: the layers merged over the file.
    fn range<'a>(
        &'a self,
        file: &'a FileTable,
        t: Table,
        range: (Bound<&'a [u8]>, Bound<&'a [u8]>),
    ) -> Result<impl Iterator<Item = Result<Row, StoreError>> + 'a, StoreError> {
        let path = self.path;
        let owned = |(k, v): (&[u8], Option<&[u8]>)| Ok((k.to_vec(), v.map(<[u8]>::to_vec)));
        let frozen = self.mem.frozen.iter().flat_map(move |f| f.range(t, range));
        let unsynced = self
            .shown_unsynced()
            .into_iter()
            .flat_map(move |u| u.range(t, range));
        let layers = overlay::merge(
            unsynced.map(owned),
            overlay::merge(
                self.mem.active.range(t, range).map(owned),
                frozen.map(owned),
            ),
        );
        let stored = file
            .range::<&[u8]>(range)
            .map_err(|e| classify(path, e.into()))?
            .map(move |item| {
                item.map(|(k, v)| (k.value().to_vec(), Some(v.value().to_vec())))
                    .map_err(|e| classify(path, e.into()))
            });
        Ok(
            overlay::merge(layers, stored).filter_map(|item| match item {
                Ok((k, Some(v))) => Some(Ok((k, v))),
                Ok((_, None)) => None,
                Err(e) => Some(Err(e)),
            }),
        )
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

fn read_meta(
    path: &Path,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(meta
        .get(name)
        .map_err(|e| classify(path, e.into()))?
        .map(|g| g.value().to_vec()))
}

fn read_vector(
    path: &Path,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<VersionVector, StoreError> {
    match read_meta(path, meta, name)? {
        None => Ok(VersionVector::new()),
        Some(b) => serde_json::from_slice(&b).map_err(|e| corrupt(path, format!("{name}: {e}"))),
    }
}

fn journal_error(path: &Path, e: JournalError) -> StoreError {
    match e {
        JournalError::Io(file, e) => StoreError::Io {
            path: path.to_path_buf(),
            detail: format!("journal {}: {e}", file.display()),
        },
        JournalError::Corrupt(file, detail) => corrupt(
            path,
            format!("its journal {} is damaged: {detail}", file.display()),
        ),
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the queue stops the writer after it has made durable what is queued and
        // checkpointed it; joining the threads means the files are closed when `drop` returns, so
        // the store can be reopened at once.
        self.inner.closing.store(true, Ordering::Release);
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if let Some(c) = self.checkpointer.take() {
            let _ = c.join();
        }
    }
}

/// The record head of a `data` value: its stamp and whether it is a tombstone.
fn record_head(path: &Path, rec: &[u8]) -> Result<(Hlc, bool), StoreError> {
    Ok((
        record_stamp(path, rec)?,
        rec.get(HLC_BYTES) == Some(&FLAG_TOMBSTONE),
    ))
}

/// Where a request's changes go: a redb write transaction ([`FileTables`]) or the journal and the
/// group's pending layer ([`Staged`]). Last-writer-wins and the indexes are the same for both.
trait Tables {
    /// The stamp of `dk`'s current record and whether it is a tombstone.
    fn current(&self, dk: &[u8]) -> Result<Option<(Hlc, bool)>, StoreError>;
    fn set(&mut self, t: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn unset(&mut self, t: Table, key: &[u8]) -> Result<(), StoreError>;

    /// Apply one entry by last-writer-wins; true if it replaced the stored version.
    fn apply(&mut self, e: &Entry) -> Result<bool, StoreError> {
        let dk = data_key(e.ns, &e.key);
        if let Some((cur, tombstone)) = self.current(&dk)? {
            if !e.supersedes(cur) {
                return Ok(false);
            }
            self.unindex(cur, tombstone)?;
        }
        let ok = origin_key(e.stamp);
        self.set(Table::Data, &dk, &encode_record(e.stamp, e.value.as_ref()))?;
        self.set(Table::ByOrigin, &ok, &dk)?;
        if e.value.is_none() {
            self.set(Table::Tombstones, &ok, &dk)?;
        }
        Ok(true)
    }

    /// Drop the index rows of the version stamped `stamp`.
    fn unindex(&mut self, stamp: Hlc, tombstone: bool) -> Result<(), StoreError> {
        let ok = origin_key(stamp);
        self.unset(Table::ByOrigin, &ok)?;
        if tombstone {
            self.unset(Table::Tombstones, &ok)?;
        }
        Ok(())
    }

    /// Remove the data record and index rows of `dk` (whose version is `stamp`).
    fn remove(&mut self, dk: &[u8], stamp: Hlc, tombstone: bool) -> Result<(), StoreError> {
        self.unset(Table::Data, dk)?;
        self.unindex(stamp, tombstone)
    }
}

/// The open tables of one redb write transaction.
struct FileTables<'t> {
    data: redb::Table<'t, &'static [u8], &'static [u8]>,
    by_origin: redb::Table<'t, &'static [u8], &'static [u8]>,
    tombstones: redb::Table<'t, &'static [u8], &'static [u8]>,
    meta: redb::Table<'t, &'static str, &'static [u8]>,
    path: &'t Path,
}

impl<'t> FileTables<'t> {
    fn open(txn: &'t redb::WriteTransaction, path: &'t Path) -> Result<FileTables<'t>, StoreError> {
        let e = |x: redb::TableError| classify(path, x.into());
        Ok(FileTables {
            data: txn.open_table(DATA).map_err(e)?,
            by_origin: txn.open_table(BY_ORIGIN).map_err(e)?,
            tombstones: txn.open_table(TOMBSTONES).map_err(e)?,
            meta: txn.open_table(META).map_err(e)?,
            path,
        })
    }

    fn bytes(&mut self, t: Table) -> &mut redb::Table<'t, &'static [u8], &'static [u8]> {
        match t {
            Table::Data => &mut self.data,
            Table::ByOrigin => &mut self.by_origin,
            // Meta is keyed by name and handled before this is called.
            Table::Tombstones | Table::Meta => &mut self.tombstones,
        }
    }

    fn meta_name<'k>(&self, key: &'k [u8]) -> Result<&'k str, StoreError> {
        std::str::from_utf8(key).map_err(|_| corrupt(self.path, "meta name is not UTF-8"))
    }

    /// Put `value` at `key` of `t`, or remove the key (`None`).
    fn change(&mut self, t: Table, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        let path = self.path;
        let r = match (t, value) {
            (Table::Meta, Some(v)) => self.meta.insert(self.meta_name(key)?, v).map(drop),
            (Table::Meta, None) => self.meta.remove(self.meta_name(key)?).map(drop),
            (_, Some(v)) => self.bytes(t).insert(key, v).map(drop),
            (_, None) => self.bytes(t).remove(key).map(drop),
        };
        r.map_err(|x| classify(path, x.into()))
    }
}

/// The head of `dk`'s record as the file holds it.
fn stored_head(
    path: &Path,
    data: &impl ReadableTable<&'static [u8], &'static [u8]>,
    dk: &[u8],
) -> Result<Option<(Hlc, bool)>, StoreError> {
    match data.get(dk).map_err(|x| classify(path, x.into()))? {
        Some(g) => record_head(path, g.value()).map(Some),
        None => Ok(None),
    }
}

impl Tables for FileTables<'_> {
    fn current(&self, dk: &[u8]) -> Result<Option<(Hlc, bool)>, StoreError> {
        stored_head(self.path, &self.data, dk)
    }

    fn set(&mut self, t: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.change(t, key, Some(value))
    }

    fn unset(&mut self, t: Table, key: &[u8]) -> Result<(), StoreError> {
        self.change(t, key, None)
    }
}

/// A group's changes on their way to the journal: recorded in the open frame and in the pending
/// layer, which lookups see before the published layers and the file.
struct Staged<'a> {
    pending: Layer,
    mem: &'a Mem,
    file: &'a FileTable,
    journal: &'a mut Journal,
    path: &'a Path,
}

impl Tables for Staged<'_> {
    fn current(&self, dk: &[u8]) -> Result<Option<(Hlc, bool)>, StoreError> {
        match self
            .pending
            .get(Table::Data, dk)
            .or_else(|| self.mem.get(Table::Data, dk))
        {
            Some(rec) => rec.map(|r| record_head(self.path, r)).transpose(),
            None => stored_head(self.path, self.file, dk),
        }
    }

    fn set(&mut self, t: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.journal.put(t, key, value);
        self.pending.put(t, key, value);
        Ok(())
    }

    fn unset(&mut self, t: Table, key: &[u8]) -> Result<(), StoreError> {
        self.journal.remove(t, key);
        self.pending.remove(t, key);
        Ok(())
    }
}

/// Copy `layer`, which holds the journal up to frame `seq`, into the file, in durable pieces of
/// about [`CHECKPOINT_PIECE`] bytes. One big transaction would end in one big flush, and the
/// journal's syncs (the same file system, the same disk) would wait tens of milliseconds behind
/// it. Only the last piece records `seq`: a restart before it replays the journal from the
/// previous checkpoint over the pieces that made it, which needs the replay to keep every
/// removal (see `Layer::unset`).
fn write_checkpoint(db: &Database, path: &Path, layer: &Layer, seq: u64) -> Result<(), StoreError> {
    let mut rows = Table::ALL.into_iter().flat_map(|t| {
        layer
            .table(t)
            .iter()
            .map(move |(k, v)| (t, k, v.as_deref()))
    });
    loop {
        let txn = db.begin_write().map_err(|e| classify(path, e.into()))?;
        let mut last = true;
        {
            let mut file = FileTables::open(&txn, path)?;
            let mut bytes = 0;
            for (t, key, value) in rows.by_ref() {
                file.change(t, key, value)?;
                bytes += key.len() + value.map_or(0, <[u8]>::len);
                if bytes >= CHECKPOINT_PIECE {
                    last = false;
                    break;
                }
            }
            if last {
                file.set(Table::Meta, META_WAL_SEQ.as_bytes(), &seq.to_le_bytes())?;
            }
        }
        txn.commit().map_err(|e| classify(path, e.into()))?;
        if last {
            return Ok(());
        }
    }
}

fn checkpoint_loop(inner: &Inner, jobs: std::sync::mpsc::Receiver<Checkpoint>) {
    while let Ok(job) = jobs.recv() {
        let mut retry = std::time::Duration::from_millis(100);
        loop {
            #[cfg(test)]
            let written = if inner.fail_checkpoints.load(Ordering::Acquire) {
                Err(StoreError::Io {
                    path: inner.path.clone(),
                    detail: "injected failure".into(),
                })
            } else {
                write_checkpoint(&inner.db, &inner.path, &job.layer, job.seq)
            };
            #[cfg(not(test))]
            let written = write_checkpoint(&inner.db, &inner.path, &job.layer, job.seq);
            match written {
                Ok(()) => {
                    inner.mem.write().unwrap_or_else(|p| p.into_inner()).frozen = None;
                    inner.checkpoints_done.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = journal::remove_through(&inner.path, job.segment) {
                        let e = journal_error(&inner.path, e);
                        tracing::warn!(error = %e, "replicated store: could not delete a checkpointed journal segment");
                    }
                    break;
                }
                Err(e) => {
                    // The changes stay in the journal (and in memory): nothing is lost, but the
                    // writer will wait once the newer layer is full.
                    tracing::error!(error = %e, "replicated store: checkpoint failed; retrying");
                    inner.checkpoint_failures.fetch_add(1, Ordering::Relaxed);
                    if inner.closing.load(Ordering::Acquire) {
                        // The store is being dropped, so no reader is left to miss the layer;
                        // the journal keeps it for the next open.
                        inner.checkpoint_abandoned.store(true, Ordering::Release);
                        inner.mem.write().unwrap_or_else(|p| p.into_inner()).frozen = None;
                        break;
                    }
                    std::thread::sleep(retry);
                    retry = (retry * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
        // Taking the lock orders the wake-up after a waiter's check of `frozen`.
        drop(
            inner
                .checkpoint_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        inner.checkpoint_done.notify_all();
    }
}

/// What the writer decides with: its clock and the meta values, including the group being built
/// (taken back whole if the group fails).
#[derive(Clone)]
struct State {
    clock: HlcClock,
    /// The epoch including replacements in the group being built; published after commit.
    epoch: u64,
    /// Joining state including the group being built; persisted and published after commit.
    joining: bool,
    vector: VersionVector,
    floor: VersionVector,
}

/// The writer thread's state.
struct Writer {
    inner: Arc<Inner>,
    /// [`StoreOptions::checkpoint_keys`].
    checkpoint_keys: usize,
    state: State,
    journal: Journal,
    jobs: std::sync::mpsc::SyncSender<Checkpoint>,
}

/// Outcome of executing one request.
type OpResult = Result<Reply, StoreError>;

impl State {
    /// Execute an ordinary request: a put, remote entries, the end of a join.
    fn apply(&mut self, op: &mut Op, t: &mut impl Tables) -> Result<OpResult, StoreError> {
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
                t.apply(&e)?;
                self.vector.observe(stamp);
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
                if let Err(err) = self.check_remote(entries, seen, *wall_ms) {
                    return Ok(Err(err));
                }
                let mut n = 0;
                for e in entries.iter() {
                    self.clock.observe(e.stamp, *wall_ms)?;
                    self.vector.observe(e.stamp);
                    n += usize::from(t.apply(e)?);
                }
                if let Some(seen) = seen {
                    for (_, s) in seen.iter() {
                        self.clock.observe(s, *wall_ms)?;
                    }
                    self.vector.merge(seen);
                }
                Ok(Ok(Reply::Count(n)))
            }
            Op::StopJoining => {
                if self.joining {
                    t.unset(Table::Meta, META_JOINING.as_bytes())?;
                }
                self.joining = false;
                Ok(Ok(Reply::Count(0)))
            }
        }
    }

    /// Record the meta values that go with the changes so far (a frame's or a transaction's end).
    fn record_meta(&self, t: &mut impl Tables) -> Result<(), StoreError> {
        t.set(
            Table::Meta,
            META_VECTOR.as_bytes(),
            &serde_json::to_vec(&self.vector).unwrap_or_default(),
        )?;
        t.set(
            Table::Meta,
            META_CLOCK.as_bytes(),
            &self.clock.last().to_bytes(),
        )
    }

    /// Execute a request on the whole content, in a file transaction.
    fn apply_whole(
        &mut self,
        inner: &Inner,
        op: &mut WholeOp,
        t: &mut FileTables<'_>,
    ) -> Result<OpResult, StoreError> {
        let path = t.path;
        match op {
            WholeOp::Snapshot { snapshot, wall_ms } => {
                if let Err(err) =
                    self.check_remote(&snapshot.entries, Some(&snapshot.vector), *wall_ms)
                {
                    return Ok(Err(err));
                }
                let keep: std::collections::HashSet<Vec<u8>> = snapshot
                    .entries
                    .iter()
                    .map(|e| data_key(e.ns, &e.key))
                    .collect();
                let mut doomed = Vec::new();
                for item in t.data.iter().map_err(|x| classify(path, x.into()))? {
                    let (k, v) = item.map_err(|x| classify(path, x.into()))?;
                    let (s, tombstone) = record_head(path, v.value())?;
                    if !keep.contains(k.value()) && snapshot.vector.covers(s) {
                        doomed.push((k.value().to_vec(), s, tombstone));
                    }
                }
                let mut n = doomed.len();
                for (k, s, tombstone) in doomed {
                    t.remove(&k, s, tombstone)?;
                }
                for e in &snapshot.entries {
                    self.clock.observe(e.stamp, *wall_ms)?;
                    n += usize::from(t.apply(e)?);
                }
                self.vector.merge(&snapshot.vector);
                for (_, s) in snapshot.vector.iter() {
                    self.clock.observe(s, *wall_ms)?;
                }
                // The clock is now past everything the source ever saw, collected deletions
                // included: local writes order correctly again.
                self.joining = false;
                Ok(Ok(Reply::Count(n)))
            }
            WholeOp::ReplaceAll { snapshot, join } => {
                if let Some(e) = snapshot
                    .entries
                    .iter()
                    .find_map(|e| validate(e.ns, &e.key, e.value.as_ref()).err())
                {
                    return Ok(Err(StoreError::Invalid(e)));
                }
                for table in [&mut t.data, &mut t.by_origin, &mut t.tombstones] {
                    table
                        .retain(|_, _| false)
                        .map_err(|x| classify(path, x.into()))?;
                }
                for e in &snapshot.entries {
                    // A backup may carry stamps from any time: the clock only moves forward.
                    self.clock.observe(e.stamp, e.stamp.wall_ms)?;
                    t.apply(e)?;
                }
                let old = std::mem::replace(&mut self.vector, snapshot.vector.clone());
                for e in &snapshot.entries {
                    self.vector.observe(e.stamp);
                }
                self.floor = VersionVector::new();
                // Writes this peer made and no longer holds may live on at other peers. New writes
                // stamped with the old id would claim (by the vector invariant) to include them, so
                // that peers would never send them back: continue under a fresh replica id.
                let last = self.clock.last();
                let mut replica =
                    (inner.origin ^ last.wall_ms as u32 ^ last.logical).wrapping_mul(0x9E37_79B9);
                let taken = |r: u32| {
                    r == inner.origin
                        || r == last.origin
                        || old.iter().any(|(o, _)| o == r)
                        || self.vector.iter().any(|(o, _)| o == r)
                };
                while taken(replica) {
                    replica = replica.wrapping_add(1);
                }
                self.clock.rebase(replica);
                self.epoch += 1;
                self.joining = *join;
                Ok(Ok(Reply::Count(snapshot.entries.len())))
            }
            WholeOp::Gc { acked } => {
                let Some(seen_by_all) = collectable(self, acked) else {
                    return Ok(Ok(Reply::Count(0)));
                };
                let mut doomed = Vec::new();
                for (origin, upto) in seen_by_all.iter() {
                    let (start, _) = origin_range(origin, Hlc::zero(origin));
                    let end = origin_key(upto);
                    for item in t
                        .tombstones
                        .range::<&[u8]>((Bound::Included(&start[..]), Bound::Included(&end[..])))
                        .map_err(|x| classify(path, x.into()))?
                    {
                        let (ok, dk) = item.map_err(|x| classify(path, x.into()))?;
                        let s = origin_stamp(ok.value())
                            .ok_or_else(|| corrupt(path, "bad tombstone index key"))?;
                        doomed.push((dk.value().to_vec(), s));
                    }
                }
                let n = doomed.len();
                for (dk, s) in doomed {
                    t.remove(&dk, s, true)?;
                    self.floor.observe(s);
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
        wall_ms: u64,
    ) -> Result<(), StoreError> {
        let mut new_origins = std::collections::BTreeSet::new();
        let stamps = entries
            .iter()
            .map(|e| e.stamp)
            .chain(seen.iter().flat_map(|v| v.iter().map(|(_, s)| s)));
        for s in stamps {
            self.clock.check(s, wall_ms)?;
            if self.vector.get(s.origin) == Hlc::zero(s.origin) {
                new_origins.insert(s.origin);
            }
        }
        if self.vector.len() + new_origins.len() > MAX_ORIGINS {
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

/// What every peer has seen, below which tombstones may be collected; `None` when nothing may
/// be: a joining peer holds nothing worth collecting yet (and an empty collection floor keeps it
/// asking its peers for a snapshot), and with no peers a later join must still learn of the
/// deletions.
fn collectable(state: &State, acked: &[VersionVector]) -> Option<VersionVector> {
    if state.joining {
        return None;
    }
    VersionVector::meet(acked.iter())
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

impl Writer {
    /// Execute ordinary requests as one group: their changes go into the journal, which is
    /// synced, and only then into the published layer. Per-request validation errors go to that
    /// request only; a storage error fails the whole group. A group of replicated changes only
    /// is shown to readers during the sync already (see `Mem::unsynced`): that is most of the
    /// replication lag a reader on this peer sees. Local writes are shown only once durable,
    /// since a failed sync loses them.
    fn group(&mut self, ops: &mut [(Op, Option<OpResult>)]) -> Result<bool, StoreError> {
        let inner = &*self.inner;
        let path = inner.path.as_path();
        let mut changed = false;
        let replicated_only = ops.iter().all(|(op, _)| matches!(op, Op::Remote { .. }));
        let pending = {
            let mem = inner.mem.read().unwrap_or_else(|p| p.into_inner());
            let txn = inner
                .db
                .begin_read()
                .map_err(|e| classify(path, e.into()))?;
            let file = txn.open_table(DATA).map_err(|e| classify(path, e.into()))?;
            let mut st = Staged {
                pending: Layer::default(),
                mem: &mem,
                file: &file,
                journal: &mut self.journal,
                path,
            };
            let state = &mut self.state;
            let mut run = || -> Result<(), StoreError> {
                for (op, result) in ops.iter_mut() {
                    let r = state.apply(op, &mut st)?;
                    // Remote batches count even when every entry lost: the vector moved, and
                    // peers are told (acknowledgements).
                    changed |= r.is_ok();
                    *result = Some(r);
                    if st.journal.open_bytes() >= journal::FRAME_TARGET {
                        state.record_meta(&mut st)?;
                        st.journal.end_frame();
                    }
                }
                state.record_meta(&mut st)
            };
            if let Err(e) = run() {
                st.journal.abort();
                return Err(e);
            }
            st.pending
        };
        let mut pending = Some(pending);
        if replicated_only {
            inner
                .mem
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .unsynced = pending.take();
        }
        let committed = commit_journal(&mut self.journal, inner);
        let mut mem = inner.mem.write().unwrap_or_else(|p| p.into_inner());
        let pending = pending.or_else(|| mem.unsynced.take()).unwrap_or_default();
        let bytes = committed?;
        inner.journal_syncs.fetch_add(1, Ordering::Relaxed);
        inner
            .journal_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        mem.active.absorb(pending);
        mem.vector.clone_from(&self.state.vector);
        Ok(changed)
    }

    /// Execute a request on the whole content: everything is checkpointed first, then the
    /// request runs as one file transaction, during which readers wait.
    fn whole(&mut self, op: &mut WholeOp) -> Result<OpResult, StoreError> {
        if let WholeOp::Gc { acked } = op {
            if !self.anything_to_collect(acked)? {
                return Ok(Ok(Reply::Count(0)));
            }
        }
        self.checkpoint_all()?;
        let inner = &*self.inner;
        let path = inner.path.as_path();
        let joining_before = self.state.joining;
        let mut mem = inner.mem.write().unwrap_or_else(|p| p.into_inner());
        let txn = inner
            .db
            .begin_write()
            .map_err(|e| classify(path, e.into()))?;
        let r = {
            let mut t = FileTables::open(&txn, path)?;
            let r = self.state.apply_whole(inner, op, &mut t)?;
            self.state.record_meta(&mut t)?;
            t.set(
                Table::Meta,
                META_GC_FLOOR.as_bytes(),
                &serde_json::to_vec(&self.state.floor).unwrap_or_default(),
            )?;
            // Only a join or its end touches the mark.
            match (joining_before, self.state.joining) {
                (false, true) => t.set(Table::Meta, META_JOINING.as_bytes(), &[1])?,
                (true, false) => t.unset(Table::Meta, META_JOINING.as_bytes())?,
                _ => {}
            }
            r
        };
        txn.commit().map_err(|e| classify(path, e.into()))?;
        mem.vector.clone_from(&self.state.vector);
        mem.floor.clone_from(&self.state.floor);
        Ok(r)
    }

    /// Whether any tombstone is old enough to collect (most collections find none, and need
    /// not wait for a checkpoint to learn it).
    fn anything_to_collect(&self, acked: &[VersionVector]) -> Result<bool, StoreError> {
        let Some(seen_by_all) = collectable(&self.state, acked) else {
            return Ok(false);
        };
        let v = View::open(&self.inner, false)?;
        let tombstones = v.table(TOMBSTONES)?;
        for (origin, upto) in seen_by_all.iter() {
            let (start, _) = origin_range(origin, Hlc::zero(origin));
            let end = origin_key(upto);
            let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
            if let Some(item) = v.range(&tombstones, Table::Tombstones, range)?.next() {
                item?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether a checkpoint is running.
    fn checkpointing(&self) -> bool {
        self.inner
            .mem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .frozen
            .is_some()
    }

    /// Wait for the running checkpoint, if any, at most until `deadline`. A failing one retries
    /// until the store closes.
    fn wait_checkpoint(&self, deadline: Option<std::time::Instant>) {
        let inner = &*self.inner;
        let mut done = inner
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while self.checkpointing() && deadline.is_none_or(|d| std::time::Instant::now() < d) {
            done = inner
                .checkpoint_done
                .wait_timeout(done, std::time::Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Hand the published layer to the checkpoint thread; new frames go to a new segment.
    fn start_checkpoint(&mut self) -> Result<(), StoreError> {
        let path = self.inner.path.as_path();
        let seq = self.journal.last_seq();
        let segment = self.journal.rotate().map_err(|e| journal_error(path, e))?;
        let layer = {
            let mut mem = self.inner.mem.write().unwrap_or_else(|p| p.into_inner());
            let layer = Arc::new(std::mem::take(&mut mem.active));
            mem.frozen = Some(Arc::clone(&layer));
            layer
        };
        self.jobs
            .send(Checkpoint {
                layer,
                seq,
                segment,
            })
            .map_err(|_| StoreError::Closed)
    }

    /// Start a checkpoint when the published layer is large enough and none is running; wait
    /// for the running one first if the layer has grown to its limit.
    fn maybe_checkpoint(&mut self) {
        let (keys, bytes) = {
            let mem = self.inner.mem.read().unwrap_or_else(|p| p.into_inner());
            (mem.active.len(), mem.active.bytes())
        };
        if keys < self.checkpoint_keys && bytes < CHECKPOINT_BYTES {
            return;
        }
        if self.checkpointing() {
            if !self.full() {
                return;
            }
            // Backpressure: the layer is full, so the writer waits for the running checkpoint
            // (a healthy one takes well under a second); see `full` if it keeps failing.
            self.wait_checkpoint(Some(std::time::Instant::now() + FULL_WAIT));
            if self.checkpointing() {
                return;
            }
        }
        if let Err(e) = self.start_checkpoint() {
            tracing::error!(error = %e, "replicated store: could not start a checkpoint");
        }
    }

    /// Whether the published layer is at its limit while the checkpoint that would empty it has
    /// not completed: new writes are refused then, so that memory stays bounded.
    fn full(&self) -> bool {
        let mem = self.inner.mem.read().unwrap_or_else(|p| p.into_inner());
        mem.frozen.is_some()
            && (mem.active.len() >= MAX_LAYER_FACTOR * self.checkpoint_keys
                || mem.active.bytes() >= MAX_LAYER_FACTOR * CHECKPOINT_BYTES)
    }

    /// Put everything published into the file and wait until it is there; give up (an error for
    /// the request that needed it) if the checkpoints keep failing for [`CHECKPOINT_WAIT`].
    fn checkpoint_all(&mut self) -> Result<(), StoreError> {
        let deadline = Some(std::time::Instant::now() + CHECKPOINT_WAIT);
        self.wait_checkpoint(deadline);
        let empty = self
            .inner
            .mem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .active
            .is_empty();
        if !empty && !self.checkpointing() {
            self.start_checkpoint()?;
            self.wait_checkpoint(deadline);
        }
        if self.checkpointing() || self.inner.checkpoint_abandoned.load(Ordering::Acquire) {
            return Err(StoreError::Io {
                path: self.inner.path.clone(),
                detail: "checkpoint did not complete (see the log)".into(),
            });
        }
        Ok(())
    }

    /// Publish what a committed group or transaction changed, then answer its callers.
    fn publish(&self, changed: bool) {
        let inner = &*self.inner;
        // Published only now that the replacement is durable: a session that reads the new epoch
        // then reads the new content.
        inner.epoch.store(self.state.epoch, Ordering::Release);
        inner.joining.store(self.state.joining, Ordering::Release);
        inner
            .replica
            .store(self.state.clock.last().origin, Ordering::Release);
        // Announce the change before answering, so that a caller who sees its write acknowledged
        // also sees the notification (the simulation relies on this order).
        if changed {
            inner.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The error each caller of a failed group gets.
    fn failure(&self, err: &StoreError) -> StoreError {
        let detail = err.to_string();
        match err {
            StoreError::Corrupt { path, .. } => StoreError::Corrupt {
                path: path.clone(),
                detail,
            },
            _ => StoreError::Io {
                path: self.inner.path.clone(),
                detail,
            },
        }
    }
}

/// Write and sync a group's journal frames; returns their bytes.
fn commit_journal(journal: &mut Journal, inner: &Inner) -> Result<usize, StoreError> {
    let path = inner.path.as_path();
    #[cfg(test)]
    {
        drop(inner.sync_gate.lock());
        if inner.fail_syncs.load(Ordering::Acquire) {
            journal.abort();
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                detail: "injected sync failure".into(),
            });
        }
    }
    journal.commit().map_err(|e| journal_error(path, e))
}

/// A request that the writer runs with others in a journal group, or alone on the whole file.
enum Work {
    Group(Op),
    Whole(WholeOp),
}

impl From<Op> for Work {
    fn from(op: Op) -> Work {
        Work::Group(op)
    }
}

impl From<WholeOp> for Work {
    fn from(op: WholeOp) -> Work {
        Work::Whole(op)
    }
}

fn writer_loop(mut w: Writer, mut rx: mpsc::Receiver<Request>, max_batch: usize) {
    let mut ops = Vec::with_capacity(max_batch);
    let mut replies = Vec::with_capacity(max_batch);
    let mut held: Option<Request> = None;
    loop {
        let Some(first) = held.take().or_else(|| rx.blocking_recv()) else {
            break;
        };
        let mut op = match first.op {
            Work::Whole(op) => op,
            Work::Group(op) => {
                ops.push((op, None));
                replies.push(first.reply);
                while ops.len() < max_batch {
                    match rx.try_recv() {
                        Ok(Request {
                            op: Work::Group(op),
                            reply,
                        }) => {
                            ops.push((op, None));
                            replies.push(reply);
                        }
                        Ok(whole) => {
                            held = Some(whole);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                w.maybe_checkpoint();
                if w.full() {
                    let err = StoreError::Io {
                        path: w.inner.path.clone(),
                        detail: "the database file takes no checkpoint (see the log); writes are \
                                 refused until it does, nothing acknowledged is lost"
                            .into(),
                    };
                    tracing::error!(error = %err, "replicated store: write refused");
                    for reply in replies.drain(..) {
                        let _ = reply.send(Err(w.failure(&err)));
                    }
                    ops.clear();
                    continue;
                }
                let before = w.state.clone();
                match w.group(&mut ops) {
                    Ok(changed) => {
                        w.publish(changed);
                        for ((_, result), reply) in ops.drain(..).zip(replies.drain(..)) {
                            let _ = reply.send(result.unwrap_or(Err(StoreError::Closed)));
                        }
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "replicated store: commit failed");
                        // Nothing of the group is durable: forget the stamps it issued.
                        w.state = before;
                        for reply in replies.drain(..) {
                            let _ = reply.send(Err(w.failure(&err)));
                        }
                        ops.clear();
                    }
                }
                continue;
            }
        };
        let before = w.state.clone();
        match w.whole(&mut op) {
            Ok(result) => {
                // Collecting nothing changes nothing.
                let changed = result.is_ok()
                    && !matches!((&op, &result), (WholeOp::Gc { .. }, Ok(Reply::Count(0))));
                w.publish(changed);
                let _ = first.reply.send(result);
            }
            Err(err) => {
                tracing::error!(error = %err, "replicated store: commit failed");
                w.state = before;
                let _ = first.reply.send(Err(w.failure(&err)));
            }
        }
    }
    // A clean close leaves everything in the file and no journal behind (the current segment
    // holds no frame the file lacks once everything is checkpointed).
    let closed = w.checkpoint_all().and_then(|()| {
        journal::remove_through(&w.inner.path, u64::MAX)
            .map_err(|e| journal_error(&w.inner.path, e))
    });
    if let Err(e) = closed {
        tracing::warn!(error = %e, "replicated store: final checkpoint failed; the journal keeps the changes");
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
        // Exactly the limit, quotes included, is accepted.
        let fits = "x".repeat(MAX_VALUE_BYTES - 2);
        assert!(s.put(Namespace::Config, "k", json!(fits), T).is_ok());
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
    fn reads_see_every_durable_write_while_checkpoints_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let options = StoreOptions {
            checkpoint_keys: 16,
            ..StoreOptions::default()
        };
        let s = Arc::new(Store::open_with(&path, 1, options.clone()).unwrap());
        let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        const N: usize = 800;
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (s, acked) = (Arc::clone(&s), Arc::clone(&acked));
                std::thread::spawn(move || {
                    let mut reads = 0;
                    loop {
                        let before = acked.load(std::sync::atomic::Ordering::Acquire);
                        // One writer, in order: every read shows a gapless prefix of its writes,
                        // at least as long as what was acknowledged before the read began.
                        let keys: Vec<String> = s
                            .list(Namespace::Conference, "k")
                            .unwrap()
                            .into_iter()
                            .map(|(k, _)| k)
                            .collect();
                        assert!(keys.len() >= before, "{} < {before}", keys.len());
                        for (i, k) in keys.iter().enumerate() {
                            assert_eq!(k, &format!("k{i:05}"));
                        }
                        let ChangeSet::Entries { entries, .. } =
                            s.changes_since(&VersionVector::new(), usize::MAX).unwrap()
                        else {
                            panic!("snapshot needed");
                        };
                        // Every key once (hot is overwritten in place), at least what was acked.
                        assert!(entries.len() >= before, "{} < {before}", entries.len());
                        reads += 1;
                        if before == N {
                            return reads;
                        }
                    }
                })
            })
            .collect();
        for i in 0..N {
            s.put(Namespace::Conference, &format!("k{i:05}"), json!(i), T)
                .unwrap();
            s.put(Namespace::Conference, "hot", json!(i), T).unwrap();
            acked.store(i + 1, std::sync::atomic::Ordering::Release);
        }
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
        use std::os::unix::fs::PermissionsExt;
        for (_, seg) in journal::segments(&path).unwrap() {
            assert_eq!(
                std::fs::metadata(seg).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let st = s.stats();
        assert!(
            st.journal_syncs >= 2 * N as u64 && st.journal_bytes > 0,
            "{st:?}"
        );
        assert!(st.checkpoints > 10 && st.checkpoint_failures == 0, "{st:?}");
        drop(s);
        // A clean close leaves no journal behind, and everything in the file.
        assert!(journal::segments(&path).unwrap().is_empty());
        let s = Store::open_with(&path, 1, options).unwrap();
        assert_eq!(s.list(Namespace::Conference, "k").unwrap().len(), N);
        assert_eq!(
            s.get(Namespace::Conference, "hot").unwrap(),
            Some(json!(N - 1))
        );
    }

    #[test]
    fn failing_checkpoints_refuse_writes_and_lose_nothing_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let options = StoreOptions {
            checkpoint_keys: 8,
            ..StoreOptions::default()
        };
        let s = Store::open_with(&path, 1, options.clone()).unwrap();
        s.inner.fail_checkpoints.store(true, Ordering::Release);
        let mut acked = Vec::new();
        let mut refused = None;
        for i in 0..100 {
            match s.put(Namespace::Config, &format!("k{i:02}"), json!(i), T) {
                Ok(_) => acked.push(i),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        // Memory stays bounded: once the layer is full, writes are refused with a reason.
        let refused = refused.expect("writes never refused");
        assert!(
            matches!(&refused, StoreError::Io { detail, .. } if detail.contains("checkpoint")),
            "{refused}"
        );
        assert!(acked.len() >= 8 && s.stats().checkpoint_failures > 0);
        assert_eq!(s.list(Namespace::Config, "k").unwrap().len(), acked.len());
        // Closing gives up on the checkpoint and keeps the journal: nothing acknowledged is lost.
        drop(s);
        assert!(!journal::segments(&path).unwrap().is_empty());
        let s = Store::open_with(&path, 1, options).unwrap();
        assert_eq!(s.list(Namespace::Config, "k").unwrap().len(), acked.len());
        s.put(Namespace::Config, "after", json!(1), T).unwrap();
    }

    #[test]
    fn a_checkpoint_cut_short_between_pieces_leaves_no_stale_index_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let s = Store::open(&path, 1).unwrap();
        let first = s.put(Namespace::Config, "k", json!(1), T).unwrap();
        s.put(Namespace::Config, "k", json!(2), T).unwrap();
        // The image a crash leaves: the file as opened (no checkpoint yet), the journal holding
        // both writes (the second removes the first's index row)...
        let image = dir.path().join("image.redb");
        std::fs::copy(&path, &image).unwrap();
        for (n, segment) in journal::segments(&path).unwrap() {
            let mut name = image.file_name().unwrap().to_os_string();
            name.push(format!(".wal.{n:010}"));
            std::fs::copy(&segment, image.with_file_name(name)).unwrap();
        }
        drop(s);
        // ...and a first piece of a checkpoint of the first write, which made it to the file.
        {
            let db = Database::open(&image).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut file = FileTables::open(&txn, &image).unwrap();
                let dk = data_key(Namespace::Config, "k");
                file.set(Table::Data, &dk, &encode_record(first, Some(&json!(1))))
                    .unwrap();
                file.set(Table::ByOrigin, &origin_key(first), &dk).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = Store::open(&image, 1).unwrap();
        assert_eq!(s.get(Namespace::Config, "k").unwrap(), Some(json!(2)));
        let ChangeSet::Entries { entries, .. } =
            s.changes_since(&VersionVector::default(), 100).unwrap()
        else {
            panic!("snapshot needed");
        };
        let values: Vec<_> = entries.iter().map(|e| e.value.clone()).collect();
        assert_eq!(
            values,
            [Some(json!(2))],
            "the first write's index row survived the replay"
        );
    }

    #[test]
    fn replicated_changes_are_shown_during_their_sync_and_hidden_if_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open(&dir, 1));
        let entry = |key: &str| Entry {
            ns: Namespace::Config,
            key: key.into(),
            value: Some(json!(key)),
            stamp: Hlc {
                wall_ms: T,
                logical: 0,
                origin: 2,
            },
        };
        let nothing_to_send = |s: &Store| {
            matches!(
                s.changes_since(&VersionVector::default(), 100).unwrap(),
                ChangeSet::Entries { entries, .. } if entries.is_empty()
            )
        };
        let gate = s.inner.sync_gate.lock().unwrap();
        let applying = {
            let (s, e) = (Arc::clone(&s), entry("shown"));
            std::thread::spawn(move || s.apply_remote(vec![e], None, T))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.get(Namespace::Config, "shown").unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "not shown during its sync"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(s.list(Namespace::Config, "").unwrap().len(), 1);
        // Shown, but neither claimed as seen nor sent on before it is durable here.
        assert_eq!(s.vector().unwrap().get(2), Hlc::zero(2));
        assert!(nothing_to_send(&s));
        drop(gate);
        applying.join().unwrap().unwrap();
        assert_eq!(s.vector().unwrap().get(2), entry("shown").stamp);
        assert!(!nothing_to_send(&s));

        // A failed sync hides the changes again; the origin's next attempt shows them.
        s.inner.fail_syncs.store(true, Ordering::Release);
        let mut failed = entry("failed");
        failed.stamp.logical = 1;
        assert!(s.apply_remote(vec![failed.clone()], None, T).is_err());
        assert_eq!(s.get(Namespace::Config, "failed").unwrap(), None);
        assert_eq!(s.vector().unwrap().get(2), entry("shown").stamp);
        s.inner.fail_syncs.store(false, Ordering::Release);
        s.apply_remote(vec![failed.clone()], None, T).unwrap();
        assert_eq!(
            s.get(Namespace::Config, "failed").unwrap(),
            Some(json!("failed"))
        );
        assert_eq!(s.vector().unwrap().get(2), failed.stamp);
    }

    #[test]
    fn a_snapshot_read_does_not_hold_back_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open(&dir, 1));
        s.put(Namespace::Config, "before", json!(1), T).unwrap();
        let v = View::copied(&s.inner).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        {
            let s = Arc::clone(&s);
            std::thread::spawn(move || done.send(s.put(Namespace::Config, "after", json!(2), T)));
        }
        let after = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the write waited for the read")
            .unwrap();
        // The read still sees what it started with.
        let data = v.table(DATA).unwrap();
        let keys: Vec<_> = v
            .range(&data, Table::Data, (Bound::Unbounded, Bound::Unbounded))
            .unwrap()
            .map(|row| row.unwrap().0)
            .collect();
        assert_eq!(keys, [data_key(Namespace::Config, "before")]);
        assert!(v.mem.vector.get(1) < after);
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
