//! sire: run more libtorch models than fit in GPU memory.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod error;
mod location;

pub use error::{Error, Result};
pub use location::Location;
