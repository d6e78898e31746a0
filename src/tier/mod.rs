//! The tiers below the engine: byte budgets of the machine, the disk tier's
//! file format, the CUDA primitives of the C++ shim, and every raw FFI call.
//! Nothing here knows about models or the ledger.

pub(crate) mod budget;
pub(crate) mod cuda;
pub(crate) mod ffi;
pub(crate) mod spill;
