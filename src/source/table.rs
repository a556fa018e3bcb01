//! [`SampleTable`]: the per-sample columns a [`super::Dataset`] keeps in memory, laid out so
//! that a 100-million-sample dataset stays within a few gigabytes.
//!
//! Brief overview: one column per field instead of one record per sample (struct of arrays),
//! each in the narrowest width that holds it:
//! - offsets as tar block numbers (`u32`, 512-byte blocks: shards up to 2 TiB), or bytes
//!   (`u64`) once one offset is not block-aligned or larger ([`Offsets`]);
//! - sizes as `u32` (the dataset refuses larger members);
//! - labels interned: each distinct label once, each sample a `u16` (or `u32` past 65,536
//!   distinct labels) index into them ([`Labels`]);
//! - member names front- and back-coded ([`NameTable`]): each name stored as what differs from
//!   the previous one (`img_000123.jpg` after `img_000122.jpg` is 4 bytes), with a full name
//!   every [`RESTART`] entries so one name is decoded from at most that many.
//!
//! The shard of a sample is not stored: it follows from the dataset's shard starts.
//! Typical cost: 4 + 4 + 2 + 4–6 bytes a sample (measured by `benches/index_scale/`).

use std::collections::HashMap;

/// Tar block: tar member data starts on a multiple of it.
const BLOCK: u64 = 512;

/// Names between two full (restart) names of a [`NameTable`].
pub(crate) const RESTART: u64 = 32;

/// The per-sample columns of a dataset, indexed by sample id.
#[derive(Debug)]
pub(crate) struct SampleTable {
    offsets: Offsets,
    sizes: Vec<u32>,
    labels: Labels,
    names: NameTable,
}

/// Sample offsets: block numbers while every offset is a block multiple below 2^41, else bytes.
#[derive(Debug)]
enum Offsets {
    /// `offset / 512` of every sample.
    Blocks(Vec<u32>),
    /// The offsets themselves.
    Bytes(Vec<u64>),
}

/// Interned labels: `values[ids[i]]` is sample `i`'s label.
#[derive(Debug, Default)]
struct Labels {
    values: Vec<i64>,
    ids: LabelIds,
    /// Label → its index in `values`, while the table is built (dropped by `finish`), for
    /// labels outside `0..DENSE_LABELS`.
    lookup: HashMap<i64, u32>,
    /// The same for labels in `0..DENSE_LABELS`, by label (`u32::MAX`: not seen): class
    /// indices, the usual labels, skip the hashing.
    dense: Vec<u32>,
}

/// Labels below this are looked up in [`Labels::dense`] while building.
const DENSE_LABELS: usize = 1 << 16;

/// Per-sample label indices: `u16` while there are at most 65,536 distinct labels.
#[derive(Debug)]
enum LabelIds {
    Small(Vec<u16>),
    Large(Vec<u32>),
}

impl Default for LabelIds {
    fn default() -> Self {
        LabelIds::Small(Vec::new())
    }
}

/// Member names, front- and back-coded against the previous name.
///
/// Entry `i` is `varint(prefix) varint(suffix) varint(len) bytes[len]`: name `i` is the first
/// `prefix` bytes of name `i - 1`, then `bytes`, then its last `suffix` bytes. Every
/// [`RESTART`]-th entry has `prefix = suffix = 0` (the whole name), and `restarts` holds
/// where each such entry starts, so name `i` is decoded from entry `i - i % RESTART` on.
#[derive(Debug, Default)]
pub(crate) struct NameTable {
    bytes: Vec<u8>,
    restarts: Vec<u64>,
    count: u64,
    /// The last name pushed (building only).
    last: Vec<u8>,
}

impl Default for SampleTable {
    fn default() -> Self {
        SampleTable {
            offsets: Offsets::Blocks(Vec::new()),
            sizes: Vec::new(),
            labels: Labels::default(),
            names: NameTable::default(),
        }
    }
}

impl SampleTable {
    /// Appends a sample; its id is the previous [`len`](Self::len).
    pub(crate) fn push(&mut self, name: &str, offset: u64, size: u32, label: i64) {
        self.offsets.push(offset);
        self.sizes.push(size);
        self.labels.push(label);
        self.names.push(name.as_bytes());
    }

    /// Releases what only building needed and the columns' spare capacity.
    pub(crate) fn finish(&mut self) {
        match &mut self.offsets {
            Offsets::Blocks(v) => v.shrink_to_fit(),
            Offsets::Bytes(v) => v.shrink_to_fit(),
        }
        self.sizes.shrink_to_fit();
        self.labels.lookup = HashMap::new();
        self.labels.dense = Vec::new();
        self.labels.values.shrink_to_fit();
        match &mut self.labels.ids {
            LabelIds::Small(v) => v.shrink_to_fit(),
            LabelIds::Large(v) => v.shrink_to_fit(),
        }
        self.names.finish();
    }

    /// Number of samples.
    pub(crate) fn len(&self) -> u64 {
        self.sizes.len() as u64
    }

    /// Where sample `id`'s bytes start in its shard (`id` < `len`).
    pub(crate) fn offset(&self, id: usize) -> u64 {
        match &self.offsets {
            Offsets::Blocks(v) => u64::from(v[id]) * BLOCK,
            Offsets::Bytes(v) => v[id],
        }
    }

    /// Sample `id`'s size in bytes.
    pub(crate) fn size(&self, id: usize) -> u32 {
        self.sizes[id]
    }

    /// Sample `id`'s label.
    pub(crate) fn label(&self, id: usize) -> i64 {
        let index = match &self.labels.ids {
            LabelIds::Small(v) => usize::from(v[id]),
            LabelIds::Large(v) => v[id] as usize,
        };
        self.labels.values[index]
    }

    /// Sample `id`'s member name (tar) or root-relative path (ImageFolder).
    pub(crate) fn name(&self, id: usize) -> String {
        self.names.get(id as u64)
    }

    /// Calls `f(name, size, label)` for every sample in id order (names decoded once each).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&str, u32, i64)) {
        let mut id = 0;
        self.names.for_each(|name| {
            f(name, self.size(id), self.label(id));
            id += 1;
        });
    }

    /// Heap bytes held by the columns (capacity, not length): what the table costs.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        let offsets = match &self.offsets {
            Offsets::Blocks(v) => v.capacity() * 4,
            Offsets::Bytes(v) => v.capacity() * 8,
        };
        let ids = match &self.labels.ids {
            LabelIds::Small(v) => v.capacity() * 2,
            LabelIds::Large(v) => v.capacity() * 4,
        };
        offsets
            + self.sizes.capacity() * 4
            + self.labels.values.capacity() * 8
            + ids
            + self.names.bytes.capacity()
            + self.names.restarts.capacity() * 8
            + self.names.last.capacity()
    }
}

impl Offsets {
    fn push(&mut self, offset: u64) {
        if let Offsets::Blocks(blocks) = self {
            match u32::try_from(offset / BLOCK) {
                Ok(block) if offset.is_multiple_of(BLOCK) => return blocks.push(block),
                // Widen once, for good: every offset as bytes.
                _ => *self = Offsets::Bytes(blocks.iter().map(|&b| u64::from(b) * BLOCK).collect()),
            }
        }
        if let Offsets::Bytes(bytes) = self {
            bytes.push(offset);
        }
    }
}

impl Labels {
    fn push(&mut self, label: i64) {
        // 2^32 distinct labels would take over 4 billion samples: beyond what this supports.
        let next = u32::try_from(self.values.len()).unwrap_or(u32::MAX);
        let index = match usize::try_from(label).ok().filter(|&l| l < DENSE_LABELS) {
            Some(dense) => {
                if self.dense.len() <= dense {
                    self.dense.resize(dense + 1, u32::MAX);
                }
                if self.dense[dense] == u32::MAX {
                    self.dense[dense] = next;
                    self.values.push(label);
                }
                self.dense[dense]
            }
            None => *self.lookup.entry(label).or_insert_with(|| {
                self.values.push(label);
                next
            }),
        };
        if let LabelIds::Small(small) = &mut self.ids {
            match u16::try_from(index) {
                Ok(index) => return small.push(index),
                Err(_) => self.ids = LabelIds::Large(small.iter().map(|&i| u32::from(i)).collect()),
            }
        }
        if let LabelIds::Large(large) = &mut self.ids {
            large.push(index);
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint at `*pos` (advancing it); the table wrote it, so it is well formed.
fn get_varint(bytes: &[u8], pos: &mut usize) -> usize {
    let mut v = 0usize;
    let mut shift = 0;
    loop {
        let b = bytes[*pos];
        *pos += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

impl NameTable {
    /// Appends `name`.
    pub(crate) fn push(&mut self, name: &[u8]) {
        let (prefix, suffix) = if self.count.is_multiple_of(RESTART) {
            self.restarts.push(self.bytes.len() as u64);
            (0, 0)
        } else {
            let prefix = common_prefix(&self.last, name);
            let suffix = common_prefix_rev(&self.last[prefix..], &name[prefix..]);
            (prefix, suffix)
        };
        let middle = &name[prefix..name.len() - suffix];
        put_varint(&mut self.bytes, prefix as u64);
        put_varint(&mut self.bytes, suffix as u64);
        put_varint(&mut self.bytes, middle.len() as u64);
        self.bytes.extend_from_slice(middle);
        self.last.clear();
        self.last.extend_from_slice(name);
        self.count += 1;
    }

    fn finish(&mut self) {
        self.bytes.shrink_to_fit();
        self.restarts.shrink_to_fit();
        self.last = Vec::new();
    }

    /// Decodes the entry at `*pos` into `name` (which holds the previous name).
    fn decode_next(&self, pos: &mut usize, name: &mut Vec<u8>, scratch: &mut Vec<u8>) {
        let prefix = get_varint(&self.bytes, pos);
        let suffix = get_varint(&self.bytes, pos);
        let len = get_varint(&self.bytes, pos);
        scratch.clear();
        scratch.extend_from_slice(&name[name.len() - suffix..]);
        name.truncate(prefix);
        name.extend_from_slice(&self.bytes[*pos..*pos + len]);
        name.extend_from_slice(scratch);
        *pos += len;
    }

    /// Name `i` (`i` < the number pushed).
    pub(crate) fn get(&self, i: u64) -> String {
        let restart = i / RESTART;
        let mut pos = self.restarts[restart as usize] as usize;
        let (mut name, mut scratch) = (Vec::new(), Vec::new());
        for _ in restart * RESTART..=i {
            self.decode_next(&mut pos, &mut name, &mut scratch);
        }
        // Names were pushed as UTF-8 and are rebuilt byte for byte.
        String::from_utf8(name)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// Calls `f` with every name in order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&str)) {
        let (mut pos, mut name, mut scratch) = (0, Vec::new(), Vec::new());
        for _ in 0..self.count {
            self.decode_next(&mut pos, &mut name, &mut scratch);
            f(&String::from_utf8_lossy(&name));
        }
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn common_prefix_rev(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_back_byte_for_byte_at_every_position() {
        let names = [
            "s0/img_000009.jpg",
            "s0/img_000010.jpg",
            "s0/img_000010.seg.png",
            "",
            "a",
            "aa",
            "été/ç.JPEG",
            "été/çç.JPEG",
            "s0/img_000011.jpg",
        ];
        let mut table = NameTable::default();
        let all: Vec<String> = (0..100)
            .map(|i| names[i % names.len()].to_owned() + &"x".repeat(i % 3))
            .collect();
        for name in &all {
            table.push(name.as_bytes());
        }
        table.finish();
        for (i, name) in all.iter().enumerate() {
            assert_eq!(&table.get(i as u64), name, "name {i}");
        }
        let mut seen = Vec::new();
        table.for_each(|n| seen.push(n.to_owned()));
        assert_eq!(seen, all);
    }

    #[test]
    fn columns_widen_when_a_value_does_not_fit_and_keep_earlier_values() {
        let mut table = SampleTable::default();
        table.push("a.jpg", 512, 10, -1);
        table.push("b.jpg", 1024, 20, 7);
        assert!(matches!(table.offsets, Offsets::Blocks(_)));
        table.push("c.jpg", 1025, 30, 7); // not block-aligned: bytes from now on
        assert!(matches!(table.offsets, Offsets::Bytes(_)));
        table.push("d.jpg", 1 << 45, 40, i64::MAX);
        for label in 0..70_000 {
            table.push("e.jpg", 0, 1, label);
        }
        assert!(matches!(table.labels.ids, LabelIds::Large(_)));
        table.finish();
        let got: Vec<_> = (0..4)
            .map(|i| {
                (
                    table.name(i),
                    table.offset(i),
                    table.size(i),
                    table.label(i),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a.jpg".to_owned(), 512, 10, -1),
                ("b.jpg".to_owned(), 1024, 20, 7),
                ("c.jpg".to_owned(), 1025, 30, 7),
                ("d.jpg".to_owned(), 1 << 45, 40, i64::MAX),
            ]
        );
        assert_eq!(table.label(4 + 69_999), 69_999);
        assert_eq!(table.len(), 70_004);
    }

    #[test]
    fn a_large_table_costs_well_under_the_budget() {
        // 100,000 samples named like a real shard set, 1000 classes: the index budget (with
        // two cached 4-byte epoch orders) is 32 bytes a sample.
        let mut table = SampleTable::default();
        let n = 100_000u64;
        for i in 0..n {
            let name = format!("shard-{:06}/sample_{i:09}.jpg", i / 1000);
            table.push(
                &name,
                1024 + (i % 1000) * 2048,
                1500,
                (i * 7919 % 1000) as i64,
            );
        }
        table.finish();
        let per_sample = table.heap_bytes() as f64 / n as f64;
        assert!(per_sample + 8.0 <= 32.0, "{per_sample} bytes a sample");
        assert_eq!(table.name(54_321), "shard-000054/sample_000054321.jpg");
        assert_eq!(table.offset(54_321), 1024 + 321 * 2048);
        assert_eq!(table.label(54_321), (54_321 * 7919 % 1000) as i64);
    }
}
