//! The shared-memory ring (docs/ring-format.md): layout, slots, waiting, handshake, and the
//! producer and consumer built on them. The only module with `unsafe` code.

pub mod layout;

pub use layout::{
    plan, validate_header, DType, FormatError, Layout, RingSpec, SpecError, TensorLayout,
    TensorSpec,
};
