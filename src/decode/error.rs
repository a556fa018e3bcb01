//! The decode stage's error type.

/// Why encoded bytes could not be turned into pixels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is empty.
    #[error("empty input (0 bytes)")]
    Empty,
    /// The magic bytes match no supported format (JPEG, PNG, WebP).
    #[error("unknown image format (first bytes {head:02x?}); supported: JPEG, PNG, WebP")]
    UnknownFormat {
        /// Up to the first 8 bytes of the input.
        head: Vec<u8>,
    },
    /// The header declares more pixels than the configured limit (a decompression bomb?).
    #[error("image is {width}x{height} = {} pixels, over the limit of {limit} (max-pixels)", u64::from(*width) * u64::from(*height))]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The configured pixel limit.
        limit: u64,
    },
    /// The data is malformed or truncated.
    #[error("corrupt image data: {message}")]
    Corrupt {
        /// The codec's message.
        message: String,
    },
    /// A valid image of a kind this decoder does not handle.
    #[error("unsupported image: {what}")]
    Unsupported {
        /// What is unsupported.
        what: String,
    },
    /// libjpeg-turbo could not create a decompressor.
    #[error("could not initialise libjpeg-turbo")]
    Init,
    /// A broken internal invariant (a bug, reported instead of panicking).
    #[error("internal decode error: {message}")]
    Internal {
        /// What went wrong.
        message: String,
    },
}
