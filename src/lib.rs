#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "tokio")]
mod asyncs;
mod engine;
mod error;
mod events;
mod exclusive;
#[cfg(feature = "faults")]
#[doc(hidden)]
pub mod faults;
#[cfg(not(feature = "faults"))]
mod faults;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod hook;
mod location;
mod managed;
mod options;
mod parts;
mod patch;
#[cfg(feature = "pool")]
pub mod pool;
#[cfg(feature = "registry")]
pub mod registry;
mod runtime;
mod stats;
mod tier;
mod user;

#[cfg(feature = "tokio")]
pub use asyncs::{auto_manage_async, auto_manage_async_timeout};
pub use error::{Error, Result};
pub use events::{Event, EventKind};
pub use exclusive::{ExclusiveGuard, SharedModelManager};
pub use hook::{hook, hook_t, Hooked, HookedT};
pub use location::Location;
pub use managed::{
    auto_manage, auto_manage_all, auto_manage_owned, auto_manage_timeout, manage, manage_with, prefetch,
    try_auto_manage, Batch, Guard, Managed, ModelHandle, OwnedGuard, Prefetch,
};
pub use options::{ManageOptions, OffloadPolicy};
pub use parts::{hook_parts, HookedParts, Parted, ScriptParts, Sequential, Split, Stream};
pub use patch::commit::{BoxError, Commit, CommitId, CommitInfo};
pub use patch::lora::Lora;
pub use runtime::{setup_default_pools, stats, Builder, ResourcePoolManagement};
pub use stats::{PoolStats, Resident, Stats};
pub use tier::cuda::{device_memory, empty_cache, DeviceMemory};
pub use user::{ResourceUser, TensorSet};
