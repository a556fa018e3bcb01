//! Encrypted ("sealed") tar shards: the key file, the sealed member format, and opening sealed
//! members in place inside a worker's buffer, so plaintext exists only in the daemon's memory.
//!
//! # Brief overview
//!
//! - [`ShardKey`]: a 256-bit key read from a private key file (`ringfeed keygen`), held in
//!   memory that is zeroed on drop and known everywhere else only by its key id.
//! - [`CryptHeader`]: a sealed shard's first member, `__ringfeed-crypt__.json`, in plaintext:
//!   format version, algorithm, key id (never the key) and a random shard id.
//! - [`ShardSealer`]: seals members while `ringfeed pack --encrypt-key-file` writes a shard.
//! - [`ShardCipher`]: opens them again at serve time ([`Dataset`](super::Dataset) holds one
//!   per sealed shard).
//! - [`Manifest`]: a sealed shard's last member, `__ringfeed-manifest__.sealed`: every
//!   sample's member name and label, in pack order. Labels live only here.
//! - [`index_sealed`] and [`unseal_index`]: the sidecar index of a sealed shard (built without
//!   the key: offsets only) and its completion with the key (labels, order, missing members).
//!
//! A sealed member is `nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)` under AES-256-GCM, with
//! a fresh random nonce per member. Its associated data is
//! `"ringfeed-crypt/1\0" ‖ shard id ‖ member name`: a member copied under another name or into
//! another shard fails authentication, and the manifest (sealed the same way) lists what the
//! shard must hold, so a removed, added or truncated member is noticed too.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::{self, AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;
use rand::TryRngCore as _;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

use super::error::{IssueReason, SourceError};
use super::index::{split_member_name, IndexedSample, MemberIssue, ShardIndex};
use super::tar::{self, ReadAt};

/// Name of a sealed shard's first member: the plaintext [`CryptHeader`].
pub const HEADER_MEMBER: &str = "__ringfeed-crypt__.json";
/// Name of a sealed shard's last member: the sealed [`Manifest`].
pub const MANIFEST_MEMBER: &str = "__ringfeed-manifest__.sealed";
/// The `format` value of a [`CryptHeader`].
pub const HEADER_FORMAT: &str = "ringfeed-sealed-shard";
/// Version of the sealed shard format this build reads and writes.
pub const HEADER_VERSION: u32 = 1;
/// The AEAD every sealed member uses.
pub const ALGORITHM: &str = "aes-256-gcm";
/// Key length in bytes (256 bits).
pub const KEY_LEN: usize = 32;
/// Nonce length in bytes (GCM's 96-bit nonce, drawn at random for every member: one key may
/// seal up to 2^32 members, all packs together, before a collision becomes a concern).
pub const NONCE_LEN: usize = 12;
/// Authentication tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed member has beyond its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Length of a shard id in bytes.
pub const SHARD_ID_LEN: usize = 16;

type MemberNonce = aead::Nonce<Aes256Gcm>;
type MemberTag = aead::Tag<Aes256Gcm>;

/// The first part of every member's associated data: names the format, so a tag computed for
/// anything else never verifies here.
const AAD_DOMAIN: &[u8; 16] = b"ringfeed-crypt/1";
/// Associated data of the key id computation; see [`ShardKey::id`].
const KEY_ID_AAD: &[u8] = b"ringfeed key id v1";
/// Longest key file read: 64 hex digits and some whitespace.
const MAX_KEY_FILE: u64 = 256;
/// Longest header member read.
const MAX_HEADER: u64 = 4096;
/// Longest manifest member read (about 40 bytes per sample).
const MAX_MANIFEST: u64 = 1 << 30;

/// A key file could not be created, or was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file could not be opened or read.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// `keygen` refuses to overwrite an existing file.
    #[error("key file {path} already exists; refusing to overwrite a key (pick a new name)")]
    Exists {
        /// The path that exists.
        path: PathBuf,
    },
    /// A symbolic link, directory, device or FIFO.
    #[error("key file {path} is not a regular file ({what})")]
    NotRegular {
        /// The key file.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// Owned by another user than the one running ringfeed.
    #[error("key file {path} is owned by uid {owner}, not by this user (uid {uid})")]
    Owner {
        /// The key file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The effective uid of this process.
        uid: u32,
    },
    /// Group or others may read or write it.
    #[error(
        "key file {path} has mode {mode:04o}: group/other permissions on a key are refused \
         (chmod 600 {path})"
    )]
    Mode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The contents are not 64 hex digits.
    #[error("key file {path} does not hold a key: {reason} (expected 64 hex digits, as `ringfeed keygen` writes)")]
    Format {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it (never the contents).
        reason: String,
    },
    /// The system random source failed.
    #[error("cannot draw random bytes: {0}")]
    Random(String),
    /// A member beyond the AEAD's length limit (256 GiB; members are at most 4 GiB).
    #[error("member {member} is too large to encrypt")]
    TooLarge {
        /// The member's name.
        member: String,
    },
}

/// A sealed dataset cannot be opened with the key given (or without one).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptError {
    /// The key file was refused.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A sealed shard and no key.
    #[error(
        "{shard} is encrypted (key id {key_id}); pass its key with --key-file FILE or \
         RINGFEED_KEY_FILE"
    )]
    NoKey {
        /// The shard.
        shard: PathBuf,
        /// The key id its header names.
        key_id: String,
    },
    /// The key does not match the one the shard was sealed with.
    #[error(
        "wrong key: key file {key_file} has key id {key_id}, but {shard} was encrypted with key \
         id {shard_key_id}"
    )]
    WrongKey {
        /// The key file given.
        key_file: PathBuf,
        /// Its key id.
        key_id: String,
        /// The shard.
        shard: PathBuf,
        /// The key id in the shard's header.
        shard_key_id: String,
    },
    /// A key was given but a shard is plaintext: mixing is refused, so that a plaintext shard
    /// slipped into an encrypted dataset is never served as if it were authenticated.
    #[error(
        "{shard} is not encrypted, but a key file ({key_file}) was given; refusing to mix \
         encrypted and plaintext shards"
    )]
    Plaintext {
        /// The plaintext shard.
        shard: PathBuf,
        /// The key file given.
        key_file: PathBuf,
    },
    /// The header member is malformed, of another version, or names an unknown algorithm.
    #[error("{shard}: bad encryption header {HEADER_MEMBER}: {reason}")]
    BadHeader {
        /// The shard.
        shard: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A 256-bit shard key. The key bytes live only inside the cipher state, which is zeroed on
/// drop; `Debug` shows the key id and the file, never the key.
pub struct ShardKey {
    cipher: Aes256Gcm,
    id: String,
    path: PathBuf,
}

impl fmt::Debug for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardKey")
            .field("id", &self.id)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ShardKey {
    /// Draws a new key from the operating system's random source and writes it to `path` as
    /// 64 hex digits, in a file created `0600` with `O_EXCL` (an existing file, or a symbolic
    /// link, is never overwritten or followed).
    pub fn generate(path: &Path) -> Result<ShardKey, KeyError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(&mut bytes[..])?;
        let mut text = Zeroizing::new(String::with_capacity(2 * KEY_LEN + 1));
        hex_into(&bytes[..], &mut text);
        text.push('\n');
        let io_err = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => KeyError::Exists {
                    path: path.to_path_buf(),
                },
                _ => io_err(e),
            })?;
        file.write_all(text.as_bytes()).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        Ok(ShardKey::from_bytes(&bytes, path))
    }

    /// Reads the key at `path`, refusing a file that is not a regular file (a symbolic link
    /// included), not owned by this process's effective uid, or open to group or others.
    pub fn load(path: &Path) -> Result<ShardKey, KeyError> {
        let io_err = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
            )
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                    KeyError::NotRegular {
                        path: path.to_path_buf(),
                        what: "a symbolic link",
                    }
                } else {
                    io_err(e)
                }
            })?;
        let meta = file.metadata().map_err(io_err)?;
        check_key_file(path, &meta)?;
        let mut text = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE as usize));
        file.take(MAX_KEY_FILE + 1)
            .read_to_end(&mut text)
            .map_err(io_err)?;
        let format_err = |reason: &str| KeyError::Format {
            path: path.to_path_buf(),
            reason: reason.to_owned(),
        };
        if text.len() as u64 > MAX_KEY_FILE {
            return Err(format_err("the file is too long"));
        }
        let digits = text.trim_ascii();
        if digits.len() != 2 * KEY_LEN {
            return Err(format_err(&format!(
                "{} characters instead of {}",
                digits.len(),
                2 * KEY_LEN
            )));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        unhex_into(digits, &mut bytes[..]).ok_or_else(|| format_err("not hexadecimal"))?;
        Ok(ShardKey::from_bytes(&bytes, path))
    }

    /// A key from its bytes (tests, and the two constructors above); `path` is only named in
    /// messages.
    pub fn from_bytes(bytes: &[u8; KEY_LEN], path: &Path) -> ShardKey {
        let mut key = aes_gcm::Key::<Aes256Gcm>::from(*bytes);
        let cipher = Aes256Gcm::new(&key);
        key.as_mut_slice().zeroize();
        // The key id is the tag of an empty message under the all-zero nonce: a pseudo-random
        // function of the key that reveals nothing about it. Data members never use that
        // nonce (theirs are random 96-bit values).
        let tag = cipher
            .encrypt_inout_detached(&MemberNonce::default(), KEY_ID_AAD, (&mut [][..]).into())
            .expect("an empty message is within the AEAD's length limit");
        let mut id = String::with_capacity(16);
        hex_into(&tag[..8], &mut id);
        ShardKey {
            cipher,
            id,
            path: path.to_path_buf(),
        }
    }

    /// The key id: 16 hex digits derived from the key, stored in shard headers so a wrong key
    /// is caught before serving. Safe to log.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key file this key came from (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn check_key_file(path: &Path, meta: &std::fs::Metadata) -> Result<(), KeyError> {
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_symlink() {
            "a symbolic link"
        } else {
            "a device, FIFO or socket"
        };
        return Err(KeyError::NotRegular {
            path: path.to_path_buf(),
            what,
        });
    }
    let uid = rustix::process::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(KeyError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn fill_random(out: &mut [u8]) -> Result<(), KeyError> {
    rand::rngs::OsRng
        .try_fill_bytes(out)
        .map_err(|e| KeyError::Random(e.to_string()))
}

fn hex_into(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    hex_into(bytes, &mut s);
    s
}

/// Decodes `digits` (exactly twice `out.len()` hex digits) into `out`.
fn unhex_into(digits: &[u8], out: &mut [u8]) -> Option<()> {
    if digits.len() != out.len() * 2 {
        return None;
    }
    let nibble = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(())
}

/// A sealed shard's first member (plaintext JSON): which format, algorithm and key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CryptHeader {
    /// [`HEADER_FORMAT`].
    pub format: String,
    /// [`HEADER_VERSION`] when written.
    pub version: u32,
    /// [`ALGORITHM`].
    pub algorithm: String,
    /// The [`ShardKey::id`] of the key the shard was sealed with.
    pub key_id: String,
    /// A random id (32 hex digits) bound into every member's associated data.
    pub shard_id: String,
    /// True when member names are random (`--hide-names`) rather than sample ordinals.
    pub hidden_names: bool,
}

impl CryptHeader {
    /// Parses and checks a header member's bytes.
    fn parse(bytes: &[u8]) -> Result<CryptHeader, String> {
        let header: CryptHeader = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        header.check()?;
        Ok(header)
    }

    /// Checks the format, version and algorithm; returns the shard id's bytes.
    fn check(&self) -> Result<[u8; SHARD_ID_LEN], String> {
        let header = self;
        if header.format != HEADER_FORMAT {
            return Err(format!("format {:?}, not {HEADER_FORMAT:?}", header.format));
        }
        if header.version != HEADER_VERSION {
            return Err(format!(
                "version {} (this build reads version {HEADER_VERSION})",
                header.version
            ));
        }
        if header.algorithm != ALGORITHM {
            return Err(format!(
                "algorithm {:?} (this build knows {ALGORITHM:?})",
                header.algorithm
            ));
        }
        let mut id = [0u8; SHARD_ID_LEN];
        unhex_into(header.shard_id.as_bytes(), &mut id)
            .ok_or_else(|| format!("shard-id {:?} is not 32 hex digits", header.shard_id))?;
        Ok(id)
    }
}

/// A sealed shard's last member, sealed: the samples it holds, in pack order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// One entry per sample.
    pub samples: Vec<ManifestEntry>,
}

/// One sample of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// The image member's name (`<key>.<ext>`).
    pub member: String,
    /// The sample's label.
    pub label: i64,
}

/// Where a member's bytes lie in its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSpan {
    /// Offset of the member's data.
    pub offset: u64,
    /// Length of the member's data.
    pub size: u64,
}

/// What a shard index records about a sealed shard (no secret: the header is plaintext).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SealedInfo {
    /// The shard's header.
    pub header: CryptHeader,
    /// The manifest member, if the shard still has one (a truncated shard does not).
    pub manifest: Option<MemberSpan>,
}

/// Opens the members of one sealed shard.
#[derive(Debug)]
pub struct ShardCipher {
    key: Arc<ShardKey>,
    shard_id: [u8; SHARD_ID_LEN],
}

impl ShardCipher {
    fn new(key: Arc<ShardKey>, shard_id: [u8; SHARD_ID_LEN]) -> ShardCipher {
        ShardCipher { key, shard_id }
    }

    /// Length of the associated data of member `name`: the prefix [`open_in_place`]
    /// expects in front of the sealed bytes.
    ///
    /// [`open_in_place`]: ShardCipher::open_in_place
    pub fn aad_len(&self, name: &str) -> usize {
        AAD_DOMAIN.len() + SHARD_ID_LEN + name.len()
    }

    /// Writes member `name`'s associated data into `out` (exactly [`aad_len`] bytes).
    ///
    /// [`aad_len`]: ShardCipher::aad_len
    pub fn write_aad(&self, name: &str, out: &mut [u8]) {
        write_aad(&self.shard_id, name, out);
    }

    /// Opens a sealed member in place: `buf` holds `aad_len` bytes of associated data (see
    /// [`write_aad`](ShardCipher::write_aad)) followed by the member's sealed bytes; on
    /// success it holds the plaintext alone, in the same allocation. On failure `buf` is
    /// cleared and `false` returned: the member was altered, truncated, moved to another name
    /// or shard, or sealed with another key.
    pub fn open_in_place(&self, buf: &mut Vec<u8>, aad_len: usize) -> bool {
        let ok = buf.len() >= aad_len + OVERHEAD && {
            let (aad, sealed) = buf.split_at_mut(aad_len);
            let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
            let (text, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
            let nonce = MemberNonce::try_from(&nonce[..]).expect("split at NONCE_LEN");
            let tag = MemberTag::try_from(&tag[..]).expect("split at TAG_LEN");
            self.key
                .cipher
                .decrypt_inout_detached(&nonce, aad, text.into(), &tag)
                .is_ok()
        };
        if ok {
            let end = buf.len() - TAG_LEN;
            buf.copy_within(aad_len + NONCE_LEN..end, 0);
            buf.truncate(end - aad_len - NONCE_LEN);
        } else {
            buf.clear();
        }
        ok
    }

    /// Opens a whole sealed member read from `src` (the manifest).
    fn open_member<R: ReadAt + ?Sized>(
        &self,
        src: &R,
        name: &str,
        span: MemberSpan,
    ) -> Result<Vec<u8>, String> {
        if span.size > MAX_MANIFEST {
            return Err(format!("{} bytes (limit {MAX_MANIFEST})", span.size));
        }
        let aad_len = self.aad_len(name);
        let mut buf = vec![0u8; aad_len + span.size as usize];
        src.read_exact_at(&mut buf[aad_len..], span.offset)
            .map_err(|e| format!("cannot read it: {e}"))?;
        self.write_aad(name, &mut buf[..aad_len]);
        if self.open_in_place(&mut buf, aad_len) {
            Ok(buf)
        } else {
            Err("it failed authentication (altered, or from another shard)".to_owned())
        }
    }
}

fn write_aad(shard_id: &[u8; SHARD_ID_LEN], name: &str, out: &mut [u8]) {
    let (domain, rest) = out.split_at_mut(AAD_DOMAIN.len());
    let (id, tail) = rest.split_at_mut(SHARD_ID_LEN);
    domain.copy_from_slice(AAD_DOMAIN);
    id.copy_from_slice(shard_id);
    tail.copy_from_slice(name.as_bytes());
}

/// Seals the members of one shard as `ringfeed pack` writes it.
#[derive(Debug)]
pub struct ShardSealer<'a> {
    key: &'a ShardKey,
    shard_id: [u8; SHARD_ID_LEN],
    hidden_names: bool,
}

impl<'a> ShardSealer<'a> {
    /// A sealer for a new shard (a fresh random shard id).
    pub fn new(key: &'a ShardKey, hidden_names: bool) -> Result<ShardSealer<'a>, KeyError> {
        let mut shard_id = [0u8; SHARD_ID_LEN];
        fill_random(&mut shard_id)?;
        Ok(ShardSealer {
            key,
            shard_id,
            hidden_names,
        })
    }

    /// The header member's bytes.
    pub fn header(&self) -> Vec<u8> {
        let header = CryptHeader {
            format: HEADER_FORMAT.to_owned(),
            version: HEADER_VERSION,
            algorithm: ALGORITHM.to_owned(),
            key_id: self.key.id.clone(),
            shard_id: hex(&self.shard_id),
            hidden_names: self.hidden_names,
        };
        let mut bytes = serde_json::to_vec(&header).expect("a header always serialises");
        bytes.push(b'\n');
        bytes
    }

    /// Seals `plaintext` as member `name`: `nonce ‖ ciphertext ‖ tag`, a fresh random nonce.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        let mut nonce = MemberNonce::default();
        fill_random(&mut nonce)?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let mut aad = vec![0u8; AAD_DOMAIN.len() + SHARD_ID_LEN + name.len()];
        write_aad(&self.shard_id, name, &mut aad);
        let tag = self
            .key
            .cipher
            .encrypt_inout_detached(&nonce, &aad, (&mut out[NONCE_LEN..]).into())
            .map_err(|_| KeyError::TooLarge {
                member: name.to_owned(),
            })?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// The sealed manifest member's bytes.
    pub fn manifest(&self, manifest: &Manifest) -> Result<Vec<u8>, KeyError> {
        let json = Zeroizing::new(serde_json::to_vec(manifest).expect("manifests serialise"));
        self.seal(MANIFEST_MEMBER, &json)
    }

    /// A random opaque member key (32 hex digits) for `--hide-names`.
    pub fn opaque_key() -> Result<String, KeyError> {
        let mut bytes = [0u8; 16];
        fill_random(&mut bytes)?;
        Ok(hex(&bytes))
    }
}

/// What indexing a sealed shard finds: its samples (label 0), the members skipped, and its
/// header and manifest location.
pub type SealedWalk = (Vec<IndexedSample>, Vec<MemberIssue>, SealedInfo);

/// Indexes a sealed shard without its key, if `src` is one (its first member is
/// [`HEADER_MEMBER`]): every other member but the manifest is one sample's image (label 0
/// until [`unseal_index`] fills it in). `Ok(None)` for a plaintext shard.
pub fn index_sealed<R: ReadAt + ?Sized>(src: &R, len: u64) -> Result<Option<SealedWalk>, String> {
    let mut walk = tar::entries(src, len);
    let Some(Ok(first)) = walk.next() else {
        return Ok(None);
    };
    if first.path != HEADER_MEMBER.as_bytes() {
        return Ok(None);
    }
    if first.size > MAX_HEADER {
        return Err(format!("{} bytes (limit {MAX_HEADER})", first.size));
    }
    let mut bytes = vec![0u8; first.size as usize];
    src.read_exact_at(&mut bytes, first.data_offset)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let header = CryptHeader::parse(&bytes)?;
    let mut info = SealedInfo {
        header,
        manifest: None,
    };
    let mut samples = Vec::new();
    let mut issues = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in walk {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                issues.push(MemberIssue {
                    member: format!("<header at byte {}>", e.offset()),
                    reason: IssueReason::from(&e),
                });
                break;
            }
        };
        let Ok(name) = String::from_utf8(entry.path) else {
            issues.push(MemberIssue {
                member: format!("<member at byte {}>", entry.header_offset),
                reason: IssueReason::NonUtf8Name,
            });
            continue;
        };
        if name == MANIFEST_MEMBER {
            info.manifest = Some(MemberSpan {
                offset: entry.data_offset,
                size: entry.size,
            });
            continue;
        }
        let (key, ext) = match split_member_name(&name) {
            Ok(parts) => parts,
            Err(reason) => {
                issues.push(MemberIssue {
                    member: name,
                    reason,
                });
                continue;
            }
        };
        let reason = if entry.size > u64::from(u32::MAX) {
            Some(IssueReason::TooLarge { size: entry.size })
        } else if !seen.insert(name.clone()) {
            Some(IssueReason::DuplicateMember)
        } else {
            None
        };
        if let Some(reason) = reason {
            issues.push(MemberIssue {
                member: name,
                reason,
            });
            continue;
        }
        samples.push(IndexedSample {
            key: key.to_owned(),
            ext: ext.to_owned(),
            offset: entry.data_offset,
            size: entry.size,
            label: 0,
        });
    }
    Ok(Some((samples, issues, info)))
}

/// Checks `index` (of the shard at `shard`) against `key` and completes it: for a sealed
/// shard, the key must be the one it was sealed with; its manifest is opened, and the samples
/// are put in manifest order with their labels. Members the manifest does not list, and
/// listed members the shard lacks, become issues (skipped and counted, like any corrupt
/// sample); a shard whose manifest is missing (truncated) or fails authentication has all its
/// samples skipped. Returns the cipher that opens the shard's members, `None` for a plaintext
/// shard (which a key refuses).
pub fn unseal_index(
    index: &mut ShardIndex,
    shard: &Path,
    key: Option<&Arc<ShardKey>>,
) -> Result<Option<ShardCipher>, SourceError> {
    let (info, key) = match (&index.sealed, key) {
        (None, None) => return Ok(None),
        (None, Some(key)) => {
            return Err(CryptError::Plaintext {
                shard: shard.to_path_buf(),
                key_file: key.path.clone(),
            }
            .into())
        }
        (Some(info), None) => {
            return Err(CryptError::NoKey {
                shard: shard.to_path_buf(),
                key_id: info.header.key_id.clone(),
            }
            .into())
        }
        (Some(info), Some(key)) => (info, key),
    };
    let shard_id = info
        .header
        .check()
        .map_err(|reason| CryptError::BadHeader {
            shard: shard.to_path_buf(),
            reason,
        })?;
    if info.header.key_id != key.id {
        return Err(CryptError::WrongKey {
            key_file: key.path.clone(),
            key_id: key.id.clone(),
            shard: shard.to_path_buf(),
            shard_key_id: info.header.key_id.clone(),
        }
        .into());
    }
    let cipher = ShardCipher::new(Arc::clone(key), shard_id);
    let manifest = match info.manifest {
        None => Err("the sealed manifest is missing (truncated shard)".to_owned()),
        Some(span) => File::open(shard)
            .map_err(|e| format!("cannot open the shard: {e}"))
            .and_then(|file| cipher.open_member(&file, MANIFEST_MEMBER, span))
            .and_then(|json| {
                let json = Zeroizing::new(json);
                serde_json::from_slice::<Manifest>(&json)
                    .map_err(|e| format!("the manifest is not valid: {e}"))
            })
            .map_err(|e| format!("{MANIFEST_MEMBER}: {e}")),
    };
    let manifest = match manifest {
        Ok(manifest) => manifest,
        Err(message) => {
            let samples = std::mem::take(&mut index.samples);
            index
                .issues
                .extend(samples.into_iter().map(|sample| MemberIssue {
                    member: sample.member(),
                    reason: IssueReason::ManifestUnusable {
                        message: message.clone(),
                    },
                }));
            return Ok(Some(cipher));
        }
    };
    let mut by_name: HashMap<String, IndexedSample> = std::mem::take(&mut index.samples)
        .into_iter()
        .map(|sample| (sample.member(), sample))
        .collect();
    for entry in manifest.samples {
        match by_name.remove(&entry.member) {
            Some(mut sample) => {
                sample.label = entry.label;
                index.samples.push(sample);
            }
            None => index.issues.push(MemberIssue {
                member: entry.member,
                reason: IssueReason::MissingMember,
            }),
        }
    }
    let mut unlisted: Vec<_> = by_name.into_values().collect();
    unlisted.sort_by_key(|sample| sample.offset);
    index
        .issues
        .extend(unlisted.into_iter().map(|sample| MemberIssue {
            member: sample.member(),
            reason: IssueReason::NotInManifest,
        }));
    Ok(Some(cipher))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::tar::tests::TarBuilder;

    fn key(byte: u8) -> Arc<ShardKey> {
        Arc::new(ShardKey::from_bytes(&[byte; KEY_LEN], Path::new("k")))
    }

    fn sealed_shard(key: &ShardKey, members: &[(&str, &[u8], i64)]) -> Vec<u8> {
        let sealer = ShardSealer::new(key, false).unwrap();
        let mut b = TarBuilder::default();
        b.file(HEADER_MEMBER, &sealer.header());
        let mut manifest = Manifest {
            samples: Vec::new(),
        };
        for (name, data, label) in members {
            b.file(name, &sealer.seal(name, data).unwrap());
            manifest.samples.push(ManifestEntry {
                member: (*name).to_owned(),
                label: *label,
            });
        }
        b.file(MANIFEST_MEMBER, &sealer.manifest(&manifest).unwrap());
        b.finish()
    }

    fn index_of(bytes: &[u8]) -> ShardIndex {
        let (samples, issues, info) = index_sealed(bytes, bytes.len() as u64).unwrap().unwrap();
        ShardIndex {
            version: 0,
            shard_size: 0,
            shard_mtime_ns: 0,
            samples,
            issues,
            sealed: Some(info),
        }
    }

    fn open(cipher: &ShardCipher, bytes: &[u8], sample: &IndexedSample) -> Option<Vec<u8>> {
        let span = MemberSpan {
            offset: sample.offset,
            size: sample.size,
        };
        cipher.open_member(bytes, &sample.member(), span).ok()
    }

    #[test]
    fn sealed_members_round_trip_and_hide_their_bytes() {
        let k = key(7);
        let shard = sealed_shard(
            &k,
            &[("000.jpg", b"secret image one", 3), ("001.png", b"two", 5)],
        );
        assert!(!shard.windows(16).any(|w| w == b"secret image one"));
        let mut index = index_of(&shard);
        assert!(index.issues.is_empty(), "{:?}", index.issues);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar");
        std::fs::write(&path, &shard).unwrap();
        let cipher = unseal_index(&mut index, &path, Some(&k)).unwrap().unwrap();
        let got: Vec<_> = index
            .samples
            .iter()
            .map(|s| (s.member(), s.label, open(&cipher, &shard, s).unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("000.jpg".to_owned(), 3, b"secret image one".to_vec()),
                ("001.png".to_owned(), 5, b"two".to_vec())
            ]
        );
    }

    #[test]
    fn altered_swapped_or_foreign_members_fail_authentication() {
        let k = key(1);
        let a = sealed_shard(&k, &[("a.jpg", b"AAAAAAAA", 0), ("b.jpg", b"BBBBBBBB", 1)]);
        let other = sealed_shard(&k, &[("a.jpg", b"CCCCCCCC", 0)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        std::fs::write(&path, &a).unwrap();
        let mut index = index_of(&a);
        let cipher = unseal_index(&mut index, &path, Some(&k)).unwrap().unwrap();
        let (sa, sb) = (&index.samples[0], &index.samples[1]);

        // One flipped bit anywhere in the member: nonce, ciphertext or tag.
        for at in [0, NONCE_LEN + 3, sa.size as usize - 1] {
            let mut flipped = a.clone();
            flipped[sa.offset as usize + at] ^= 1;
            assert_eq!(open(&cipher, &flipped, sa), None, "bit flipped at {at}");
        }
        // b's bytes under a's name (a swap inside the shard).
        let mut swapped = a.clone();
        let (ao, bo, n) = (sa.offset as usize, sb.offset as usize, sa.size as usize);
        let b_bytes = a[bo..bo + n].to_vec();
        swapped[ao..ao + n].copy_from_slice(&b_bytes);
        assert_eq!(open(&cipher, &swapped, sa), None);
        // The same name from another shard sealed with the same key.
        let oi = index_of(&other);
        let mut foreign = a.clone();
        let o = &oi.samples[0];
        foreign[ao..ao + n].copy_from_slice(&other[o.offset as usize..o.offset as usize + n]);
        assert_eq!(open(&cipher, &foreign, sa), None);
        // The untouched shard still opens.
        assert_eq!(open(&cipher, &a, sa).unwrap(), b"AAAAAAAA");
    }

    #[test]
    fn wrong_missing_or_unneeded_keys_are_refused_by_name() {
        let shard = sealed_shard(&key(1), &[("a.jpg", b"A", 0)]);
        let plain = TarBuilder::default()
            .file("a.jpg", b"A")
            .file("a.cls", b"0")
            .finish();
        let path = Path::new("/data/s.tar");
        let err = unseal_index(&mut index_of(&shard), path, Some(&key(2))).unwrap_err();
        assert!(
            matches!(&err, SourceError::Crypt(CryptError::WrongKey { key_file, .. }) if key_file == Path::new("k")),
            "{err}"
        );
        let err = unseal_index(&mut index_of(&shard), path, None).unwrap_err();
        assert!(err.to_string().contains("--key-file"), "{err}");
        assert_eq!(index_sealed(&plain[..], plain.len() as u64).unwrap(), None);
        let mut plain_index = ShardIndex {
            version: 0,
            shard_size: 0,
            shard_mtime_ns: 0,
            samples: Vec::new(),
            issues: Vec::new(),
            sealed: None,
        };
        let err = unseal_index(&mut plain_index, path, Some(&key(1))).unwrap_err();
        assert!(
            matches!(err, SourceError::Crypt(CryptError::Plaintext { .. })),
            "{err}"
        );
        assert!(unseal_index(&mut plain_index, path, None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn truncated_shards_and_removed_members_are_noticed() {
        let k = key(3);
        let shard = sealed_shard(
            &k,
            &[("a.jpg", b"A", 0), ("b.jpg", b"B", 1), ("c.jpg", b"C", 2)],
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar");
        std::fs::write(&path, &shard).unwrap();
        let full = index_of(&shard);

        // Cut after the last image member, on a block boundary: the manifest is gone.
        let last = &full.samples[2];
        let cut = (last.offset + last.size).div_ceil(512) * 512;
        let mut truncated = index_of(&shard[..cut as usize]);
        assert_eq!(truncated.samples.len(), 3);
        unseal_index(&mut truncated, &path, Some(&k)).unwrap();
        assert!(truncated.samples.is_empty());
        assert_eq!(truncated.issues.len(), 3);
        assert!(truncated.issues.iter().all(|i| matches!(
            &i.reason, IssueReason::ManifestUnusable { message } if message.contains("truncated")
        )));

        // A member dropped from the index (removed from the shard) and one added.
        let mut edited = full.clone();
        let removed = edited.samples.remove(1);
        edited.samples.push(IndexedSample {
            key: "z".to_owned(),
            ..removed.clone()
        });
        unseal_index(&mut edited, &path, Some(&k)).unwrap();
        let kept: Vec<_> = edited
            .samples
            .iter()
            .map(|s| (s.member(), s.label))
            .collect();
        assert_eq!(kept, [("a.jpg".to_owned(), 0), ("c.jpg".to_owned(), 2)]);
        let issues: Vec<_> = edited
            .issues
            .iter()
            .map(|i| (i.member.as_str(), &i.reason))
            .collect();
        assert_eq!(
            issues,
            [
                ("b.jpg", &IssueReason::MissingMember),
                ("z.jpg", &IssueReason::NotInManifest)
            ]
        );
    }

    #[test]
    fn key_files_are_created_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let made = ShardKey::generate(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(ShardKey::load(&path).unwrap().id(), made.id());
        assert!(!format!("{made:?}").contains(&std::fs::read_to_string(&path).unwrap()[..64]));
        assert!(matches!(
            ShardKey::generate(&path),
            Err(KeyError::Exists { .. })
        ));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = ShardKey::load(&path).unwrap_err();
        assert!(matches!(err, KeyError::Mode { mode: 0o640, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            ShardKey::load(&link),
            Err(KeyError::NotRegular { .. })
        ));
        assert!(matches!(
            ShardKey::generate(&link),
            Err(KeyError::Exists { .. })
        ));
        assert!(matches!(
            ShardKey::load(dir.path()),
            Err(KeyError::NotRegular { .. } | KeyError::Mode { .. })
        ));

        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "not a key\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(ShardKey::load(&bad), Err(KeyError::Format { .. })));
    }

    #[test]
    fn key_ids_differ_per_key_and_never_show_the_key() {
        let (a, b) = (key(1), key(2));
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id(), key(1).id());
        assert_eq!(a.id().len(), 16);
        assert!(!format!("{a:?}").contains("0101"));
    }
}
