//! The store's write-ahead journal: what makes a write durable with one small append and one
//! `fdatasync`, instead of a redb commit per group of writes.
//!
//! The writer appends the changes of each group of requests as checksummed frames to the current
//! segment file (`<store>.wal.<n>`, next to the redb file), syncs it, and only then makes the
//! changes visible and answers. Checkpoints copy older changes into the redb file in one large
//! transaction and then delete the segments they cover; the file records the last frame it
//! holds (`wal_seq` in its meta table), so a crash between the two replays nothing twice.
//!
//! A frame is `len: u32 LE | crc32(payload): u32 LE | payload`, the payload `seq: u64 LE` and then
//! changes, each `tag: u8` (table number, `| 0x80` for a removal), `key_len: u32 LE`, key and, for
//! a put, `value_len: u32 LE` and value. Sequence numbers increase by one from frame to frame over
//! all segments.
//!
//! Recovery accepts one damaged frame only at the very end of the last segment — the frame a crash
//! interrupted, which was never acknowledged. Damage anywhere else is reported, never skipped.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::overlay::Table;

/// Longest frame recovery accepts. The writer ends a frame at a request boundary once it passes
/// [`FRAME_TARGET`]; one request adds at most a sync frame's worth of entries (1 MiB) or one value.
const MAX_FRAME: usize = 64 << 20;
/// Size after which the writer starts a new frame.
pub(crate) const FRAME_TARGET: usize = 4 << 20;
const HEADER: usize = 8;
const SEQ: usize = 8;
const REMOVE: u8 = 0x80;

/// Why a journal could not be read back.
#[derive(Debug)]
pub(crate) enum JournalError {
    /// The OS refused a read, write or sync.
    Io(PathBuf, std::io::Error),
    /// A frame is damaged where a crash cannot have left it.
    Corrupt(PathBuf, String),
}

/// The segment being appended to, and the frames of the group being built.
pub(crate) struct Journal {
    store: PathBuf,
    segment: u64,
    file: File,
    /// Length of the segment up to the last synced frame.
    synced: u64,
    /// Frames of the current group, not yet written.
    buf: Vec<u8>,
    /// Offset in `buf` of the frame being built, if one is open.
    open: Option<usize>,
    next_seq: u64,
    /// `next_seq` at the start of the current group, to take back on failure.
    group_seq: u64,
}

fn segment_path(store: &Path, n: u64) -> PathBuf {
    let mut name = store.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".wal.{n:010}"));
    store.with_file_name(name)
}

/// The journal segments of `store`, oldest first.
pub(crate) fn segments(store: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let dir = match store.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!(
        "{}.wal.",
        store.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut out = Vec::new();
    let entries = std::fs::read_dir(&dir).map_err(|e| JournalError::Io(dir.clone(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::Io(dir.clone(), e))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix(&prefix))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// Delete the segments numbered up to `last`: a checkpoint holds their changes.
pub(crate) fn remove_through(store: &Path, last: u64) -> Result<(), JournalError> {
    for (n, path) in segments(store)? {
        if n <= last {
            std::fs::remove_file(&path).map_err(|e| JournalError::Io(path.clone(), e))?;
        }
    }
    Ok(())
}

/// Rename the segments of a store whose file is gone to `….orphaned`: they are kept for the
/// operator, never replayed into a new file.
pub(crate) fn set_aside(store: &Path) -> Result<(), JournalError> {
    for (_, path) in segments(store)? {
        let mut to = path.clone().into_os_string();
        to.push(".orphaned");
        std::fs::rename(&path, &to).map_err(|e| JournalError::Io(path.clone(), e))?;
        tracing::warn!(
            segment = %path.display(),
            "replicated store: journal segment without its database file set aside"
        );
    }
    Ok(())
}

fn sync_dir(store: &Path) -> std::io::Result<()> {
    match store.parent() {
        Some(d) if !d.as_os_str().is_empty() => File::open(d)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Read back every frame after `after_seq`, oldest first, handing each change to `apply`
/// (`None`: removal). Returns the last sequence number seen (`after_seq` if none is newer).
pub(crate) fn replay(
    store: &Path,
    after_seq: u64,
    mut apply: impl FnMut(Table, &[u8], Option<&[u8]>),
) -> Result<u64, JournalError> {
    let segs = segments(store)?;
    let mut last = after_seq;
    for (i, (_, path)) in segs.iter().enumerate() {
        let is_last = i + 1 == segs.len();
        let bytes = std::fs::read(path).map_err(|e| JournalError::Io(path.clone(), e))?;
        let bad = |detail: String| JournalError::Corrupt(path.clone(), detail);
        let mut at = 0;
        while at < bytes.len() {
            let rest = &bytes[at..];
            let Some(payload) = frame_at(rest) else {
                // Only the frame a crash interrupted may be damaged: the last one of the last
                // segment, reaching to its end (cut short, or garbage or zeros up to the end), with
                // no whole frame after it (a damaged length must not hide the frames behind it).
                let claimed = u32_at(rest, 0).map_or(usize::MAX, |l| HEADER + l as usize);
                let to_end = claimed >= rest.len() || rest.iter().all(|&b| b == 0);
                let later = (1..rest.len()).any(|j| later_frame_at(&rest[j..]));
                if is_last && to_end && !later {
                    tracing::warn!(
                        path = %path.display(),
                        offset = at,
                        "replicated store: dropped an incomplete journal frame (a write interrupted by a crash, never acknowledged)"
                    );
                    break;
                }
                return Err(bad(format!("damaged frame at offset {at}")));
            };
            // Frames the file already holds are skipped (a segment whose deletion a crash undid
            // may still hold some); after them, not one frame may be missing.
            let seq = seq_of(payload);
            if seq > after_seq {
                if seq != last + 1 {
                    return Err(bad(format!(
                        "frame at offset {at} has sequence number {seq}, expected {}",
                        last + 1
                    )));
                }
                decode(&payload[SEQ..], &mut apply)
                    .ok_or_else(|| bad(format!("malformed change in the frame at offset {at}")))?;
                last = seq;
            }
            at += HEADER + payload.len();
        }
    }
    Ok(last)
}

/// The payload of the whole, checksummed frame at the start of `b`, if there is one.
fn frame_at(b: &[u8]) -> Option<&[u8]> {
    let len = u32_at(b, 0)? as usize;
    let crc = u32_at(b, 4)?;
    let payload = b.get(HEADER..HEADER.checked_add(len)?)?;
    ((SEQ..=MAX_FRAME).contains(&len) && crc32fast::hash(payload) == crc).then_some(payload)
}

/// Whether a whole frame starts at `b`, as one after a damaged frame would. The sequence number
/// must be plausible (below 2^40) before the checksum is computed, so that scanning garbage stays
/// cheap.
fn later_frame_at(b: &[u8]) -> bool {
    let plausible = b
        .get(HEADER..HEADER + SEQ)
        .map(seq_of)
        .is_some_and(|s| s < 1 << 40);
    plausible && frame_at(b).is_some()
}

fn seq_of(payload: &[u8]) -> u64 {
    u64::from_le_bytes(payload[..SEQ].try_into().unwrap_or_default())
}

fn decode(mut b: &[u8], apply: &mut impl FnMut(Table, &[u8], Option<&[u8]>)) -> Option<()> {
    fn take<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32_at(b, 0)? as usize;
        let v = b.get(4..4usize.checked_add(len)?)?;
        *b = &b[4 + len..];
        Some(v)
    }
    while let Some((&tag, rest)) = b.split_first() {
        b = rest;
        let table = Table::from_tag(tag & !REMOVE)?;
        let key = take(&mut b)?;
        let value = if tag & REMOVE == 0 {
            Some(take(&mut b)?)
        } else {
            None
        };
        apply(table, key, value);
    }
    Some(())
}

impl Journal {
    /// Start segment number `segment` (a new, empty file) whose first frame is `next_seq`.
    pub(crate) fn create(
        store: &Path,
        segment: u64,
        next_seq: u64,
    ) -> Result<Journal, JournalError> {
        let path = segment_path(store, segment);
        let io = |e| JournalError::Io(path.clone(), e);
        // Owner only, like the database file: the changes include administrator accounts.
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        // The new name must survive a crash as well as the frames synced into it.
        sync_dir(store).map_err(io)?;
        Ok(Journal {
            store: store.to_path_buf(),
            segment,
            file,
            synced: 0,
            buf: Vec::new(),
            open: None,
            next_seq,
            group_seq: next_seq,
        })
    }

    /// The sequence number of the last frame written.
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    fn frame(&mut self) -> &mut Vec<u8> {
        if self.open.is_none() {
            self.open = Some(self.buf.len());
            self.buf.extend_from_slice(&[0; HEADER]);
            self.buf.extend_from_slice(&self.next_seq.to_le_bytes());
        }
        &mut self.buf
    }

    fn field(buf: &mut Vec<u8>, b: &[u8]) {
        // Keys and values are far below 4 GiB (the store's limits), frames below MAX_FRAME.
        buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        buf.extend_from_slice(b);
    }

    /// Record a put in the open frame (opening one if needed).
    pub(crate) fn put(&mut self, t: Table, key: &[u8], value: &[u8]) {
        let buf = self.frame();
        buf.push(t as u8);
        Journal::field(buf, key);
        Journal::field(buf, value);
    }

    /// Record a removal in the open frame.
    pub(crate) fn remove(&mut self, t: Table, key: &[u8]) {
        let buf = self.frame();
        buf.push(t as u8 | REMOVE);
        Journal::field(buf, key);
    }

    /// Bytes of the open frame so far (0 if none is open).
    pub(crate) fn open_bytes(&self) -> usize {
        self.open.map_or(0, |start| self.buf.len() - start)
    }

    /// Close the open frame: fill in its length and checksum.
    pub(crate) fn end_frame(&mut self) {
        let Some(start) = self.open.take() else {
            return;
        };
        let payload_len = self.buf.len() - start - HEADER;
        let crc = crc32fast::hash(&self.buf[start + HEADER..]);
        self.buf[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        self.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.next_seq += 1;
    }

    /// Write the group's frames and sync them: once this returns (the bytes written), they
    /// survive a crash. On failure the segment is cut back to its last synced length, so that a
    /// later group does not follow a damaged frame.
    pub(crate) fn commit(&mut self) -> Result<usize, JournalError> {
        self.end_frame();
        let path = segment_path(&self.store, self.segment);
        let written = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                let n = self.buf.len();
                self.synced += n as u64;
                self.buf.clear();
                self.group_seq = self.next_seq;
                Ok(n)
            }
            Err(e) => {
                self.abort();
                let undone = self
                    .file
                    .set_len(self.synced)
                    .and_then(|()| self.file.sync_data());
                if let Err(e2) = undone {
                    tracing::error!(path = %path.display(), error = %e2, "replicated store: could not cut a failed journal write back");
                }
                Err(JournalError::Io(path, e))
            }
        }
    }

    /// Forget the group being built (its requests failed before anything was written).
    pub(crate) fn abort(&mut self) {
        self.buf.clear();
        self.open = None;
        self.next_seq = self.group_seq;
    }

    /// Continue in a new segment; the old one (and those before it) can be deleted once a
    /// checkpoint holds what they hold. Returns the old segment's number.
    pub(crate) fn rotate(&mut self) -> Result<u64, JournalError> {
        let next = Journal::create(&self.store, self.segment + 1, self.next_seq)?;
        let old = std::mem::replace(self, next);
        Ok(old.segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Seen = Vec<(u8, Vec<u8>, Option<Vec<u8>>)>;

    fn read(store: &Path, after: u64) -> Result<(u64, Seen), JournalError> {
        let mut seen = Vec::new();
        let last = replay(store, after, |t, k, v| {
            seen.push((t as u8, k.to_vec(), v.map(<[u8]>::to_vec)));
        })?;
        Ok((last, seen))
    }

    fn write_groups(store: &Path, groups: usize) -> Journal {
        let mut j = Journal::create(store, 1, 1).unwrap();
        for g in 0..groups {
            j.put(Table::Data, format!("k{g}").as_bytes(), b"value");
            j.remove(Table::ByOrigin, b"old");
            j.commit().unwrap();
        }
        j
    }

    /// A store path in `dir` whose journal is one segment of `groups` groups: (store, segment,
    /// the segment's bytes).
    fn one_segment(dir: &tempfile::TempDir, groups: usize) -> (PathBuf, PathBuf, Vec<u8>) {
        let store = dir.path().join("s.redb");
        drop(write_groups(&store, groups));
        let (_, seg) = segments(&store).unwrap().remove(0);
        let whole = std::fs::read(&seg).unwrap();
        (store, seg, whole)
    }

    #[test]
    fn frames_come_back_in_order_after_a_given_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        let mut j = write_groups(&store, 3);
        assert_eq!(j.last_seq(), 3);
        assert_eq!(j.rotate().unwrap(), 1);
        j.put(Table::Meta, b"m", b"x");
        j.commit().unwrap();
        let (last, seen) = read(&store, 0).unwrap();
        assert_eq!(last, 4);
        assert_eq!(seen.len(), 7);
        assert_eq!(seen[0], (0, b"k0".to_vec(), Some(b"value".to_vec())));
        assert_eq!(seen[1], (1, b"old".to_vec(), None));
        assert_eq!(seen[6], (3, b"m".to_vec(), Some(b"x".to_vec())));
        let (last, seen) = read(&store, 3).unwrap();
        assert_eq!((last, seen.len()), (4, 1));
        // Frames 1-3 are in the file: segment 1 is skipped whole. Past it, none may be missing.
        assert!(matches!(read(&store, 1), Ok((4, _))));
        remove_through(&store, 1).unwrap();
        assert_eq!(segments(&store).unwrap().len(), 1);
    }

    #[test]
    fn a_missing_frame_is_damage_but_checkpointed_ones_may_linger() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        drop(write_groups(&store, 3));
        let mut j = Journal::create(&store, 3, 7).unwrap();
        j.put(Table::Data, b"k", b"v");
        j.commit().unwrap();
        // Frames 4-6 are gone: whatever the file holds, something acknowledged would be lost.
        assert!(matches!(read(&store, 3), Err(JournalError::Corrupt(..))));
        // If the file holds up to 6, segment 1 is only a leftover.
        assert!(matches!(read(&store, 6), Ok((7, ref seen)) if seen.len() == 1));
    }

    #[test]
    fn garbage_segments_never_panic() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let (store, seg, whole) = one_segment(&dir, 4);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let mut bytes = whole.clone();
            match rng.random_range(0..3) {
                0 => {
                    let i = rng.random_range(0..bytes.len());
                    bytes[i] = rng.random();
                }
                1 => bytes.truncate(rng.random_range(0..bytes.len())),
                _ => {
                    let n = rng.random_range(0..64);
                    bytes = (0..n).map(|_| rng.random()).collect();
                }
            }
            std::fs::write(&seg, &bytes).unwrap();
            // Whatever it finds, an answer: frames, or damage reported.
            let _ = read(&store, 0);
        }
    }

    #[test]
    fn a_torn_last_frame_is_dropped_and_damage_elsewhere_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (store, seg, whole) = one_segment(&dir, 3);
        let frame = whole.len() / 3;
        // Cut inside the last frame, or garbage / zeros after the last whole frame: the last
        // frame is dropped, the first two stay.
        for tail in [
            whole[..whole.len() - 3].to_vec(),
            [&whole[..2 * frame], &[0xAB; 5][..]].concat(),
            [&whole[..], &[0u8; 4096][..]].concat(),
        ] {
            std::fs::write(&seg, &tail).unwrap();
            let (last, seen) = read(&store, 0).unwrap();
            assert!(last >= 2 && seen.len() >= 4, "{last} {}", seen.len());
        }
        // A flipped byte in the first frame, with whole frames after it: damage, reported — also
        // when it is in the length, making the frame seem to reach the end.
        for (at, bits) in [(12, 1), (2, 0x40)] {
            let mut bad = whole.clone();
            bad[at] ^= bits;
            std::fs::write(&seg, &bad).unwrap();
            assert!(
                matches!(read(&store, 0), Err(JournalError::Corrupt(..))),
                "byte {at}"
            );
        }
        // A torn frame is accepted only in the last segment.
        std::fs::write(&seg, &whole[..whole.len() - 3]).unwrap();
        let mut j = Journal::create(&store, 2, 4).unwrap();
        j.put(Table::Data, b"x", b"y");
        j.commit().unwrap();
        assert!(matches!(read(&store, 0), Err(JournalError::Corrupt(..))));
    }
}
