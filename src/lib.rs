#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod budget;
mod commit;
mod error;
mod ffi;
mod location;
mod lora;
mod managed;
mod manager;
mod options;
mod runtime;
mod spill;
mod stats;
mod user;

pub use commit::{BoxError, Commit, CommitId, CommitInfo};
pub use error::{Error, Result};
pub use location::Location;
pub use lora::Lora;
pub use managed::{
    auto_manage, auto_manage_owned, auto_manage_timeout, manage, manage_with, try_auto_manage, Guard,
    Managed, OwnedGuard,
};
pub use options::{ManageOptions, OffloadPolicy};
pub use runtime::{setup_default_pools, stats, Builder, ResourcePoolManagement};
pub use stats::{PoolStats, Resident, Stats};
pub use user::{ResourceUser, TensorSet};
