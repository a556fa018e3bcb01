//! The augment stage's error types: one for building the plan, one per sample.

use crate::decode::DecodeError;

/// A configuration value the plan cannot use; names the key and what is allowed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AugmentConfigError {
    /// A key holds a value outside its allowed range or set.
    #[error("augment.{key}: {problem}")]
    Invalid {
        /// The offending key, e.g. `random-resized-crop.scale`.
        key: &'static str,
        /// What is wrong and what is allowed.
        problem: String,
    },
    /// The geometric operations do not fix the output size.
    #[error("the output size is not fixed: configure random-resized-crop, center-crop, or resize with size = [height, width]")]
    NoFixedSize,
    /// Two operations that cannot be combined.
    #[error("{first} cannot be combined with {second}")]
    Conflict {
        /// One key.
        first: &'static str,
        /// The other key.
        second: &'static str,
    },
}

/// Why one sample could not be produced (the pipeline reports it with the sample's identity).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SampleError {
    /// The bytes could not be decoded.
    #[error(transparent)]
    Decode(DecodeError),
    /// The header declares more pixels than `augment.max-pixels`.
    #[error("image is {width}x{height} pixels, over augment.max-pixels = {limit}")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        limit: u64,
    },
    /// The output slice does not have exactly one sample's bytes.
    #[error("output slice holds {got} bytes, one sample needs {expected}")]
    OutputSize {
        /// Bytes one sample needs.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// The resampler refused its arguments (a bug, reported instead of panicking).
    #[error("resize failed: {message}")]
    Resize {
        /// The resampler's message.
        message: String,
    },
}

impl From<DecodeError> for SampleError {
    fn from(err: DecodeError) -> Self {
        match err {
            DecodeError::TooLarge {
                width,
                height,
                limit,
            } => SampleError::TooLarge {
                width,
                height,
                limit,
            },
            other => SampleError::Decode(other),
        }
    }
}
