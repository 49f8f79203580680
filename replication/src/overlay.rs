//! The store's in-memory layers over its redb file: recent changes that are durable in the journal
//! but not yet checkpointed into the file.
//!
//! A [`Layer`] holds, per table, the latest value of every key it touched or a removal marker. A
//! read looks at the newest layer first, then older ones, then the file; range reads merge the
//! layers' ranges with the file's in key order ([`merge`]).

use std::collections::BTreeMap;
use std::ops::Bound;

/// The store's tables, as the journal and the layers name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Table {
    /// Data key → record.
    Data = 0,
    /// Origin key → data key, for every current entry.
    ByOrigin = 1,
    /// Origin key → data key, for deleted keys only.
    Tombstones = 2,
    /// Name → value (version vector, collection floor, clock, joining mark).
    Meta = 3,
}

impl Table {
    pub(crate) const ALL: [Table; 4] =
        [Table::Data, Table::ByOrigin, Table::Tombstones, Table::Meta];

    /// Whether the table is keyed by stamp. Outside operations on the whole content (which run on
    /// the file, with no layer), a stamp's row is put at most once and removed at most once after
    /// that (a superseded version never comes back), so a row put and removed within the layers
    /// never existed below them: the removal needs no marker.
    fn by_stamp(self) -> bool {
        matches!(self, Table::ByOrigin | Table::Tombstones)
    }

    pub(crate) fn from_tag(tag: u8) -> Option<Table> {
        Table::ALL.get(usize::from(tag)).copied()
    }
}

/// One table's changes: the new value, or `None` for a removed key.
pub(crate) type Changes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Changes to every table, newer than what lies beneath.
#[derive(Clone, Debug, Default)]
pub(crate) struct Layer {
    tables: [Changes; 4],
    /// Bytes of keys and values put into the layer (overwrites counted again): what it costs in
    /// memory, roughly, and when to checkpoint it.
    bytes: usize,
}

impl Layer {
    pub(crate) fn put(&mut self, t: Table, key: &[u8], value: &[u8]) {
        self.bytes += key.len() + value.len();
        self.tables[t as usize].insert(key.to_vec(), Some(value.to_vec()));
    }

    pub(crate) fn remove(&mut self, t: Table, key: &[u8]) {
        let table = &mut self.tables[t as usize];
        if t.by_stamp() && matches!(table.get(key), Some(Some(_))) {
            table.remove(key);
            return;
        }
        self.unset(t, key);
    }

    /// Record the removal of `key` even if the layer put it itself. A replayed journal needs this:
    /// a checkpoint cut short by a crash may have put a stamp's row into the file already.
    pub(crate) fn unset(&mut self, t: Table, key: &[u8]) {
        self.bytes += key.len();
        self.tables[t as usize].insert(key.to_vec(), None);
    }

    /// `Some(Some(value))` if the layer holds `key`, `Some(None)` if it removed it, `None` if it
    /// does not know.
    pub(crate) fn get(&self, t: Table, key: &[u8]) -> Option<Option<&[u8]>> {
        self.tables[t as usize].get(key).map(Option::as_deref)
    }

    pub(crate) fn table(&self, t: Table) -> &Changes {
        &self.tables[t as usize]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.tables.iter().all(BTreeMap::is_empty)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keys of every table the layer touched.
    pub(crate) fn len(&self) -> usize {
        self.tables.iter().map(BTreeMap::len).sum()
    }

    /// Take `newer`'s changes on top of this layer's.
    pub(crate) fn absorb(&mut self, newer: Layer) {
        self.bytes += newer.bytes;
        for (t, theirs) in Table::ALL.into_iter().zip(newer.tables) {
            let mine = &mut self.tables[t as usize];
            if mine.is_empty() {
                *mine = theirs;
            } else if t.by_stamp() {
                for (k, v) in theirs {
                    if v.is_none() && matches!(mine.get(&k), Some(Some(_))) {
                        mine.remove(&k);
                    } else {
                        mine.insert(k, v);
                    }
                }
            } else {
                mine.extend(theirs);
            }
        }
    }

    /// The layer's changes to `t` within `range`, in key order.
    pub(crate) fn range<'a>(
        &'a self,
        t: Table,
        range: (Bound<&'a [u8]>, Bound<&'a [u8]>),
    ) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a {
        self.tables[t as usize]
            .range::<[u8], _>(range)
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
    }
}

/// One item of a merged range: a key and its value, `None` where a newer layer removed it.
pub(crate) type Item = (Vec<u8>, Option<Vec<u8>>);

/// Merge two key-ordered streams; where both hold a key, `newer`'s item wins. Errors (from the
/// file) pass through.
pub(crate) fn merge<E>(
    newer: impl Iterator<Item = Result<Item, E>>,
    older: impl Iterator<Item = Result<Item, E>>,
) -> impl Iterator<Item = Result<Item, E>> {
    let mut newer = newer.peekable();
    let mut older = older.peekable();
    std::iter::from_fn(move || {
        use std::cmp::Ordering;
        // Which stream's head comes first (Equal: the same key in both).
        let first = match (newer.peek(), older.peek()) {
            (None, None) => return None,
            (Some(_), None) | (Some(Err(_)), _) => Ordering::Less,
            (None, Some(_)) | (_, Some(Err(_))) => Ordering::Greater,
            (Some(Ok((a, _))), Some(Ok((b, _)))) => a.cmp(b),
        };
        match first {
            Ordering::Less => newer.next(),
            Ordering::Greater => older.next(),
            Ordering::Equal => {
                older.next();
                newer.next()
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(v: &[(&str, Option<&str>)]) -> Vec<Result<Item, ()>> {
        v.iter()
            .map(|(k, x)| Ok((k.as_bytes().to_vec(), x.map(|s| s.as_bytes().to_vec()))))
            .collect()
    }

    #[test]
    fn newer_wins_and_order_is_kept() {
        let newer = items(&[("b", Some("B2")), ("c", None), ("e", Some("E"))]);
        let older = items(&[
            ("a", Some("A")),
            ("b", Some("B1")),
            ("c", Some("C")),
            ("d", Some("D")),
        ]);
        let got: Vec<_> = merge(newer.into_iter(), older.into_iter())
            .map(Result::unwrap)
            .map(|(k, v)| {
                (
                    String::from_utf8(k).unwrap(),
                    v.map(|v| String::from_utf8(v).unwrap()),
                )
            })
            .collect();
        let want = [
            ("a", Some("A")),
            ("b", Some("B2")),
            ("c", None),
            ("d", Some("D")),
            ("e", Some("E")),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn absorb_keeps_the_newer_change() {
        let mut old = Layer::default();
        old.put(Table::Data, b"k", b"1");
        old.put(Table::Data, b"j", b"1");
        let mut new = Layer::default();
        new.remove(Table::Data, b"k");
        new.put(Table::Meta, b"m", b"x");
        old.absorb(new);
        assert_eq!(old.get(Table::Data, b"k"), Some(None));
        assert_eq!(old.get(Table::Data, b"j"), Some(Some(&b"1"[..])));
        assert_eq!(old.get(Table::Meta, b"m"), Some(Some(&b"x"[..])));
        assert_eq!(old.get(Table::ByOrigin, b"k"), None);
        assert_eq!(old.len(), 3);
    }

    #[test]
    fn a_stamp_row_put_and_removed_within_the_layers_leaves_nothing() {
        let mut old = Layer::default();
        old.put(Table::ByOrigin, b"s1", b"k");
        old.remove(Table::ByOrigin, b"s0");
        let mut new = Layer::default();
        new.remove(Table::ByOrigin, b"s1");
        new.put(Table::Tombstones, b"s2", b"k");
        new.remove(Table::Tombstones, b"s2");
        assert_eq!(new.get(Table::Tombstones, b"s2"), None);
        old.absorb(new);
        // s1 never reached what lies below; s0 did, and its removal stays.
        assert_eq!(old.get(Table::ByOrigin, b"s1"), None);
        assert_eq!(old.get(Table::ByOrigin, b"s0"), Some(None));
        // Data rows keep their markers: a key comes back after a delete.
        old.put(Table::Data, b"k", b"v");
        old.remove(Table::Data, b"k");
        assert_eq!(old.get(Table::Data, b"k"), Some(None));
    }
}
