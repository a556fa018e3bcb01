//! A small tar reader: walks the member headers of a tar archive and reports, for every
//! regular file, its path and where its bytes lie. It never reads member data except the
//! GNU long-name and pax records that rename the next member.
//!
//! It is a pure function of the bytes it is given (through [`ReadAt`]), so it can be fuzzed
//! over a byte slice and run over a file with positioned reads alike. It understands ustar
//! (with its `prefix` field), GNU long names (`L`) and base-256 sizes, and pax extended headers
//! (`x`, keys `path` and `size`); directories, links, devices and global pax headers (`g`) are
//! stepped over. A bad checksum, a malformed field or a truncated archive ends the walk with a
//! [`TarError`] after the members before it were yielded.
//!
//! # Why not the `tar` crate
//!
//! `tar` (alexcrichton/tar-rs) is well kept and reads pax and GNU long names too, and
//! `Archive::entries_with_seek` with `Entry::raw_file_position` could build the sidecar
//! index. It is not used because what this reader is for does not fit its shape:
//!
//! - Serving reads one member's bytes at an offset from the index, with `pread` on a file
//!   shared by every worker thread; that needs no tar code at all. What remains is the index
//!   walk, where `tar` reads a `Read` stream (with `Seek` to skip member data): it moves a
//!   file cursor, needs a `Cursor` around the byte slice the fuzzer hands over, and pays a
//!   seek plus a read per header where this walk does one 512-byte positioned read.
//! - Hostile input: this walk caps every extended record (`MAX_EXTENDED_HEADER`, 1 MiB) and
//!   stops at the first bad header, keeping the members before it (the index records the
//!   issue); with `tar` the cap and that rule would be re-implemented around its entry
//!   iterator. The walk is fuzzed as a pure function of a byte slice (`fuzz/`, replayed by
//!   `tests/fuzz_replay.rs`).
//! - Speed: the walk is already bound by one `pread` per header; `tar` cannot do fewer
//!   reads, so there is nothing to win; a tested reader would be traded for a wrapper that
//!   re-implements its rules.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Size of a tar block; headers and the padding after member data are block-aligned.
pub const BLOCK: u64 = 512;

/// Longest GNU long name or pax header accepted; anything larger is treated as a bad header
/// rather than read into memory.
const MAX_EXTENDED_HEADER: u64 = 1 << 20;

/// Positioned reads over a byte source: a file or an in-memory slice.
pub trait ReadAt {
    /// Fills `buf` with the bytes at `offset`, or fails (with `UnexpectedEof` past the end).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&end| end <= self.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

/// One regular file found in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// Member path as stored (raw bytes: tar names need not be UTF-8).
    pub path: Vec<u8>,
    /// Byte offset of the member's data from the start of the archive.
    pub data_offset: u64,
    /// Length of the member's data in bytes.
    pub size: u64,
    /// Offset of the member's (first) header, for error messages.
    pub header_offset: u64,
}

/// Why the walk over an archive stopped early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TarError {
    /// The archive ends inside a header or inside a member's data.
    #[error("truncated tar: {what} at byte {offset} runs past the end ({len} bytes)")]
    Truncated {
        /// What was cut off ("header", "member data", …).
        what: &'static str,
        /// Offset of the header or data that is cut off.
        offset: u64,
        /// Length of the archive.
        len: u64,
    },
    /// A header whose checksum does not match its bytes.
    #[error("bad tar header checksum at byte {offset} (stored {stored}, computed {computed})")]
    BadChecksum {
        /// Offset of the header.
        offset: u64,
        /// Checksum stored in the header.
        stored: u64,
        /// Checksum of the header's bytes.
        computed: u64,
    },
    /// A header field that cannot be parsed.
    #[error("bad tar header at byte {offset}: {field} {reason}")]
    BadField {
        /// Offset of the header.
        offset: u64,
        /// Name of the field (`size`, `pax path`, …).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The underlying source failed to read.
    #[error("cannot read tar data at byte {offset}: {message}")]
    Io {
        /// Offset of the failed read.
        offset: u64,
        /// The I/O error, rendered (kept as text so the error stays `Clone + Eq`).
        message: String,
    },
}

impl TarError {
    /// The archive offset the error is about (the header, data or read that failed), for
    /// naming the spot in a skipped-member report.
    pub fn offset(&self) -> u64 {
        match self {
            TarError::Truncated { offset, .. }
            | TarError::BadChecksum { offset, .. }
            | TarError::BadField { offset, .. }
            | TarError::Io { offset, .. } => *offset,
        }
    }
}

/// Iterator over the regular files of an archive of `len` bytes read from `src`.
///
/// Yields `Ok(entry)` for each regular file, then either ends (end-of-archive marker or the end
/// of the bytes on a block boundary) or yields one `Err` and ends.
pub fn entries<R: ReadAt + ?Sized>(src: &R, len: u64) -> Entries<'_, R> {
    Entries {
        src,
        len,
        offset: 0,
        done: false,
    }
}

/// Iterator returned by [`entries`].
#[derive(Debug)]
pub struct Entries<'a, R: ?Sized> {
    src: &'a R,
    len: u64,
    offset: u64,
    done: bool,
}

/// Overrides that extended headers (`L`, `x`) set for the next member.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_size: Option<u64>,
    first_header: Option<u64>,
}

impl<R: ReadAt + ?Sized> Iterator for Entries<'_, R> {
    type Item = Result<TarEntry, TarError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let result = self.next_entry();
        if !matches!(result, Some(Ok(_))) {
            self.done = true;
        }
        result
    }
}

impl<R: ReadAt + ?Sized> Entries<'_, R> {
    fn next_entry(&mut self) -> Option<Result<TarEntry, TarError>> {
        let mut pending = Pending::default();
        loop {
            let header_offset = self.offset;
            if header_offset > self.len {
                return Some(Err(TarError::Truncated {
                    what: "padding after member data",
                    offset: self.len,
                    len: self.len,
                }));
            }
            if header_offset == self.len {
                // End of the bytes on a block boundary without an end-of-archive marker: accepted
                // (some writers omit it), unless an extended header promised another member.
                return pending.first_header.map(|offset| {
                    Err(TarError::Truncated {
                        what: "member after extended header",
                        offset,
                        len: self.len,
                    })
                });
            }
            if header_offset + BLOCK > self.len {
                return Some(Err(TarError::Truncated {
                    what: "header",
                    offset: header_offset,
                    len: self.len,
                }));
            }
            let mut block = [0u8; BLOCK as usize];
            if let Err(e) = self.src.read_exact_at(&mut block, header_offset) {
                return Some(Err(io_error(header_offset, &e)));
            }
            if block.iter().all(|&b| b == 0) {
                return pending.first_header.map(|offset| {
                    Err(TarError::Truncated {
                        what: "member after extended header",
                        offset,
                        len: self.len,
                    })
                });
            }
            let header = match parse_header(&block, header_offset) {
                Ok(header) => header,
                Err(e) => return Some(Err(e)),
            };
            let data_offset = header_offset + BLOCK;
            let size = match (header.kind, pending.pax_size) {
                (HeaderKind::File, Some(pax_size)) => pax_size,
                _ => header.size,
            };
            let data_len = if header.kind.has_data() { size } else { 0 };
            let data_end = match data_offset.checked_add(data_len) {
                Some(end) if end <= self.len => end,
                _ => {
                    return Some(Err(TarError::Truncated {
                        what: "member data",
                        offset: data_offset,
                        len: self.len,
                    }))
                }
            };
            self.offset = data_end.div_ceil(BLOCK) * BLOCK;
            pending.first_header.get_or_insert(header_offset);
            match header.kind {
                HeaderKind::GnuLongName => {
                    match self.read_extended(data_offset, size, "GNU long name") {
                        Ok(mut name) => {
                            while name.last() == Some(&0) {
                                name.pop();
                            }
                            pending.path = Some(name);
                        }
                        Err(e) => return Some(Err(e)),
                    }
                }
                HeaderKind::Pax => {
                    let records = match self.read_extended(data_offset, size, "pax header") {
                        Ok(records) => records,
                        Err(e) => return Some(Err(e)),
                    };
                    if let Err(e) = apply_pax(&records, header_offset, &mut pending) {
                        return Some(Err(e));
                    }
                }
                HeaderKind::File => {
                    let path = pending
                        .pax_path
                        .take()
                        .or(pending.path.take())
                        .unwrap_or(header.path);
                    return Some(Ok(TarEntry {
                        path,
                        data_offset,
                        size,
                        header_offset: pending.first_header.unwrap_or(header_offset),
                    }));
                }
                HeaderKind::Other => pending = Pending::default(),
            }
        }
    }

    fn read_extended(
        &self,
        offset: u64,
        size: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, TarError> {
        if size > MAX_EXTENDED_HEADER {
            return Err(TarError::BadField {
                offset: offset - BLOCK,
                field: what,
                reason: format!("is {size} bytes long (limit {MAX_EXTENDED_HEADER})"),
            });
        }
        // Bounded by MAX_EXTENDED_HEADER above, so the cast cannot truncate.
        let mut data = vec![0u8; size as usize];
        self.src
            .read_exact_at(&mut data, offset)
            .map_err(|e| io_error(offset, &e))?;
        Ok(data)
    }
}

fn io_error(offset: u64, e: &io::Error) -> TarError {
    TarError::Io {
        offset,
        message: e.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderKind {
    File,
    GnuLongName,
    Pax,
    Other,
}

impl HeaderKind {
    fn from_typeflag(flag: u8) -> (HeaderKind, bool) {
        match flag {
            b'0' | b'\0' | b'7' => (HeaderKind::File, true),
            b'L' => (HeaderKind::GnuLongName, true),
            b'x' => (HeaderKind::Pax, true),
            // Hard and symbolic links, devices, directories and FIFOs carry no data blocks
            // whatever their size field says (POSIX; Python's tarfile reads them the same way).
            b'1'..=b'6' => (HeaderKind::Other, false),
            // Global pax headers, GNU long link names, GNU dumpdirs and unknown types: their
            // data is stepped over.
            _ => (HeaderKind::Other, true),
        }
    }

    fn has_data(self) -> bool {
        self != HeaderKind::Other
    }
}

struct Header {
    kind: HeaderKind,
    path: Vec<u8>,
    size: u64,
}

/// Parses one 512-byte header block (not all zero) found at `offset`.
fn parse_header(block: &[u8; BLOCK as usize], offset: u64) -> Result<Header, TarError> {
    let stored = parse_number(&block[148..156]).map_err(|reason| TarError::BadField {
        offset,
        field: "checksum",
        reason,
    })?;
    let (unsigned, signed) = checksums(block);
    if stored != unsigned && Some(stored) != u64::try_from(signed).ok() {
        return Err(TarError::BadChecksum {
            offset,
            stored,
            computed: unsigned,
        });
    }
    let (kind, has_data) = HeaderKind::from_typeflag(block[156]);
    let size = parse_number(&block[124..136]).map_err(|reason| TarError::BadField {
        offset,
        field: "size",
        reason,
    })?;
    let mut path = Vec::new();
    // POSIX ustar ("ustar\0") splits long paths into prefix + name; GNU ("ustar  \0") uses the
    // prefix bytes for other fields, so it must not be read there.
    if &block[257..263] == b"ustar\0" {
        let prefix = until_nul(&block[345..500]);
        if !prefix.is_empty() {
            path.extend_from_slice(prefix);
            path.push(b'/');
        }
    }
    path.extend_from_slice(until_nul(&block[0..100]));
    let kind = if has_data { kind } else { HeaderKind::Other };
    Ok(Header { kind, path, size })
}

/// Sums of the header bytes with the checksum field read as spaces: unsigned (POSIX) and
/// signed (some historic writers).
fn checksums(block: &[u8; BLOCK as usize]) -> (u64, i64) {
    let mut unsigned = 0u64;
    let mut signed = 0i64;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    (unsigned, signed)
}

fn until_nul(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Parses a numeric header field: octal ASCII padded with spaces/NULs, or GNU base-256
/// (first byte 0x80, big-endian value in the remaining bytes).
fn parse_number(field: &[u8]) -> Result<u64, String> {
    if let Some((&first, rest)) = field.split_first() {
        if first & 0x80 != 0 {
            if first != 0x80 {
                return Err("is a negative base-256 number".to_owned());
            }
            return rest.iter().try_fold(0u64, |acc, &b| {
                acc.checked_mul(256)
                    .map(|v| v + u64::from(b))
                    .ok_or_else(|| "overflows 64 bits".to_owned())
            });
        }
    }
    let trimmed: &[u8] = {
        let start = field
            .iter()
            .position(|&b| b != b' ' && b != 0)
            .unwrap_or(field.len());
        let rest = &field[start..];
        let end = rest
            .iter()
            .position(|&b| b == b' ' || b == 0)
            .unwrap_or(rest.len());
        if rest[end..].iter().any(|&b| b != b' ' && b != 0) {
            return Err(format!(
                "is not an octal number ({:?})",
                String::from_utf8_lossy(field)
            ));
        }
        &rest[..end]
    };
    trimmed.iter().try_fold(0u64, |acc, &b| {
        if !(b'0'..=b'7').contains(&b) {
            return Err(format!(
                "is not an octal number ({:?})",
                String::from_utf8_lossy(field)
            ));
        }
        acc.checked_mul(8)
            .map(|v| v + u64::from(b - b'0'))
            .ok_or_else(|| "overflows 64 bits".to_owned())
    })
}

/// Applies the `path` and `size` records of a pax extended header ("LEN key=value\n" each).
fn apply_pax(mut records: &[u8], offset: u64, pending: &mut Pending) -> Result<(), TarError> {
    let bad = |reason: String| TarError::BadField {
        offset,
        field: "pax record",
        reason,
    };
    while !records.is_empty() {
        // Some writers pad the record area with NULs.
        if records.iter().all(|&b| b == 0) {
            break;
        }
        let space = records
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("has no length".to_owned()))?;
        let len: usize = std::str::from_utf8(&records[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                bad(format!(
                    "has a bad length {:?}",
                    String::from_utf8_lossy(&records[..space])
                ))
            })?;
        if len <= space + 1 || len > records.len() || records[len - 1] != b'\n' {
            return Err(bad(format!("length {len} does not frame a record")));
        }
        let record = &records[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("has no '='".to_owned()))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => pending.pax_path = Some(value.to_vec()),
            b"size" => {
                let size = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "size {:?} is not a number",
                            String::from_utf8_lossy(value)
                        ))
                    })?;
                pending.pax_size = Some(size);
            }
            _ => {}
        }
        records = &records[len..];
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds tar archives in memory for tests (ustar headers, optional GNU long names and pax).
    #[derive(Default)]
    pub(crate) struct TarBuilder {
        pub(crate) bytes: Vec<u8>,
    }

    impl TarBuilder {
        pub(crate) fn header(name: &[u8], size: u64, typeflag: u8, magic: &[u8; 8]) -> [u8; 512] {
            let mut h = [0u8; 512];
            h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
            h[100..107].copy_from_slice(b"0000644");
            h[108..115].copy_from_slice(b"0000000");
            h[116..123].copy_from_slice(b"0000000");
            h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
            h[136..147].copy_from_slice(b"00000000000");
            h[156] = typeflag;
            h[257..265].copy_from_slice(magic);
            Self::set_checksum(&mut h);
            h
        }

        pub(crate) fn set_checksum(h: &mut [u8; 512]) {
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
            h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        }

        pub(crate) fn raw(&mut self, header: [u8; 512], data: &[u8]) -> &mut Self {
            self.bytes.extend_from_slice(&header);
            self.bytes.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            self.bytes.extend(std::iter::repeat_n(0u8, pad));
            self
        }

        pub(crate) fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
            let h = Self::header(name.as_bytes(), data.len() as u64, b'0', b"ustar\x0000");
            self.raw(h, data)
        }

        pub(crate) fn dir(&mut self, name: &str) -> &mut Self {
            let h = Self::header(name.as_bytes(), 0, b'5', b"ustar\x0000");
            self.raw(h, &[])
        }

        pub(crate) fn gnu_long(&mut self, name: &str, data: &[u8]) -> &mut Self {
            let mut long = name.as_bytes().to_vec();
            long.push(0);
            let h = Self::header(b"././@LongLink", long.len() as u64, b'L', b"ustar  \0");
            self.raw(h, &long);
            let h = Self::header(
                &name.as_bytes()[..100],
                data.len() as u64,
                b'0',
                b"ustar  \0",
            );
            self.raw(h, data)
        }

        pub(crate) fn pax(
            &mut self,
            records: &[(&str, &str)],
            name: &str,
            data: &[u8],
        ) -> &mut Self {
            let mut body = Vec::new();
            for (k, v) in records {
                let inner = format!(" {k}={v}\n");
                // The length counts its own digits.
                let mut len = inner.len() + 1;
                while format!("{len}").len() + inner.len() != len {
                    len += 1;
                }
                body.extend_from_slice(format!("{len}{inner}").as_bytes());
            }
            let h = Self::header(b"PaxHeaders/x", body.len() as u64, b'x', b"ustar\x0000");
            self.raw(h, &body);
            let h = Self::header(name.as_bytes(), data.len() as u64, b'0', b"ustar\x0000");
            self.raw(h, data)
        }

        pub(crate) fn finish(&mut self) -> Vec<u8> {
            self.bytes.extend(std::iter::repeat_n(0u8, 1024));
            std::mem::take(&mut self.bytes)
        }
    }

    fn walk(bytes: &[u8]) -> (Vec<(String, Vec<u8>)>, Option<TarError>) {
        let mut files = Vec::new();
        let mut error = None;
        for entry in entries(bytes, bytes.len() as u64) {
            match entry {
                Ok(e) => {
                    let start = e.data_offset as usize;
                    files.push((
                        String::from_utf8(e.path).unwrap(),
                        bytes[start..start + e.size as usize].to_vec(),
                    ));
                }
                Err(e) => error = Some(e),
            }
        }
        (files, error)
    }

    #[test]
    fn reads_ustar_members_and_skips_directories() {
        let tar = TarBuilder::default()
            .dir("a/")
            .file("a/img_01.jpg", b"jpegbytes")
            .file("a/img_01.cls", b"7\n")
            .file("empty.txt", b"")
            .finish();
        let (files, error) = walk(&tar);
        assert_eq!(error, None);
        assert_eq!(
            files,
            vec![
                ("a/img_01.jpg".to_owned(), b"jpegbytes".to_vec()),
                ("a/img_01.cls".to_owned(), b"7\n".to_vec()),
                ("empty.txt".to_owned(), Vec::new()),
            ]
        );
    }

    #[test]
    fn data_spanning_several_blocks_is_located() {
        let big: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
        let tar = TarBuilder::default()
            .file("big.bin", &big)
            .file("next.cls", b"1")
            .finish();
        let (files, error) = walk(&tar);
        assert_eq!(error, None);
        assert_eq!(files[0].1, big);
        assert_eq!(files[1], ("next.cls".to_owned(), b"1".to_vec()));
    }

    #[test]
    fn ustar_prefix_is_joined_to_name() {
        let mut h = TarBuilder::header(b"img.jpg", 3, b'0', b"ustar\x0000");
        h[345..353].copy_from_slice(b"deep/dir");
        TarBuilder::set_checksum(&mut h);
        let tar = TarBuilder::default().raw(h, b"abc").finish();
        let (files, error) = walk(&tar);
        assert_eq!(error, None);
        assert_eq!(
            files,
            vec![("deep/dir/img.jpg".to_owned(), b"abc".to_vec())]
        );
    }

    #[test]
    fn gnu_long_names_rename_the_next_member() {
        let long = format!("{}/img_01.jpg", "d".repeat(150));
        let tar = TarBuilder::default()
            .gnu_long(&long, b"xyz")
            .file("short.cls", b"3")
            .finish();
        let (files, error) = walk(&tar);
        assert_eq!(error, None);
        assert_eq!(files[0], (long, b"xyz".to_vec()));
        assert_eq!(files[1].0, "short.cls");
    }

    #[test]
    fn pax_path_and_size_override_the_header() {
        let long = format!("{}/photo.jpeg", "p".repeat(200));
        let tar = TarBuilder::default()
            .pax(&[("mtime", "1.5"), ("path", &long)], "trunc", b"0123456789")
            .file("after.cls", b"4")
            .finish();
        let (files, error) = walk(&tar);
        assert_eq!(error, None);
        assert_eq!(files[0], (long, b"0123456789".to_vec()));
        assert_eq!(files[1].0, "after.cls");

        // A pax size overrides the (here wrong) ustar size field.
        let mut b = TarBuilder::default();
        let body = b"12 size=700\n";
        b.raw(
            TarBuilder::header(b"PaxHeaders/y", body.len() as u64, b'x', b"ustar\x0000"),
            body,
        );
        b.raw(
            TarBuilder::header(b"big.bin", 0, b'0', b"ustar\x0000"),
            &[9u8; 700],
        );
        let tar = b.file("z.cls", b"5").finish();
        let (files, error) = walk(&tar);
        assert_eq!(error, None);
        assert_eq!(files[0], ("big.bin".to_owned(), vec![9u8; 700]));
        assert_eq!(files[1].0, "z.cls");
    }

    #[test]
    fn bad_checksum_ends_the_walk_after_earlier_members() {
        let mut tar = TarBuilder::default()
            .file("a.jpg", b"a")
            .file("b.jpg", b"b")
            .finish();
        tar[1024] ^= 0x20; // second header's name byte
        let (files, error) = walk(&tar);
        assert_eq!(files.len(), 1);
        assert!(
            matches!(error, Some(TarError::BadChecksum { offset: 1024, .. })),
            "{error:?}"
        );
    }

    #[test]
    fn truncated_archives_are_reported() {
        let tar = TarBuilder::default()
            .file("a.jpg", b"a")
            .file("b.jpg", &[1u8; 2000])
            .finish();
        // Cut inside the second member's data.
        let cut = &tar[..1024 + 512 + 100];
        let (files, error) = walk(cut);
        assert_eq!(files.len(), 1);
        assert!(
            matches!(
                error,
                Some(TarError::Truncated {
                    what: "member data",
                    offset: 1536,
                    ..
                })
            ),
            "{error:?}"
        );
        // Cut inside a header.
        let (files, error) = walk(&tar[..1024 + 200]);
        assert_eq!(files.len(), 1);
        assert!(
            matches!(error, Some(TarError::Truncated { what: "header", .. })),
            "{error:?}"
        );
        // An extended header with no member after it.
        let mut b = TarBuilder::default();
        let body = b"12 path=a.b\n";
        b.raw(
            TarBuilder::header(b"PaxHeaders/y", body.len() as u64, b'x', b"ustar\x0000"),
            body,
        );
        let (files, error) = walk(&b.bytes);
        assert!(files.is_empty());
        assert!(
            matches!(error, Some(TarError::Truncated { offset: 0, .. })),
            "{error:?}"
        );
    }

    #[test]
    fn missing_end_marker_on_block_boundary_is_accepted() {
        let mut b = TarBuilder::default();
        b.file("a.jpg", b"a");
        let (files, error) = walk(&b.bytes);
        assert_eq!(files.len(), 1);
        assert_eq!(error, None);
        // Ending inside the padding after the data is a truncation, though the member is whole.
        let (files, error) = walk(&b.bytes[..600]);
        assert_eq!(files.len(), 1);
        assert!(
            matches!(
                error,
                Some(TarError::Truncated {
                    what: "padding after member data",
                    ..
                })
            ),
            "{error:?}"
        );
    }

    #[test]
    fn numbers_parse_octal_and_base256() {
        assert_eq!(parse_number(b"00000000017\0"), Ok(15));
        assert_eq!(parse_number(b"   17 \0\0"), Ok(15));
        assert_eq!(parse_number(b"\0\0\0\0"), Ok(0));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[7..12].copy_from_slice(&[0x02, 0x00, 0x00, 0x00, 0x01]);
        assert_eq!(parse_number(&big), Ok(0x02_0000_0001));
        assert!(parse_number(b"0000009\0").is_err());
        assert!(parse_number(b"12 34\0").is_err());
        assert!(parse_number(&[0xff; 12]).is_err());
        assert!(parse_number(&[
            0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
        ])
        .is_err());
    }

    #[test]
    fn malformed_pax_records_are_errors() {
        for body in [
            &b"zz path=x\n"[..],
            b"99 path=x\n",
            b"10 pathx\n\n",
            b"13 size=abc\n",
        ] {
            let mut b = TarBuilder::default();
            b.raw(
                TarBuilder::header(b"PaxHeaders/y", body.len() as u64, b'x', b"ustar\x0000"),
                body,
            );
            let tar = b.file("a.jpg", b"a").finish();
            let (files, error) = walk(&tar);
            assert!(files.is_empty());
            assert!(
                matches!(error, Some(TarError::BadField { .. })),
                "{body:?}: {error:?}"
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic stand-in for the fuzzer: mutate a valid archive byte by byte.
        let tar = TarBuilder::default()
            .pax(&[("path", "p/x.jpg")], "x", b"data")
            .gnu_long(&"l".repeat(120), b"long")
            .file("c.cls", b"1")
            .finish();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut bytes = tar.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state % bytes.len() as u64) as usize;
                bytes[at] = (state >> 32) as u8;
            }
            let cut = (state >> 40) as usize % (bytes.len() + 1);
            for slice in [&bytes[..], &bytes[..cut]] {
                for e in entries(slice, slice.len() as u64).flatten() {
                    assert!(e.data_offset + e.size <= slice.len() as u64);
                }
            }
        }
    }
}
