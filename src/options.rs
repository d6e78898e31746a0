//! Per-model options.

use crate::Location;

/// When an idle model leaves its execution device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffloadPolicy {
    /// Stay resident after the last guard drops, until the room is needed
    /// (least recently used first). The default: a model used again soon costs nothing.
    #[default]
    Lazy,
    /// Offload as soon as the last guard drops.
    Eager,
}

/// Options for [`manage_with`](crate::manage_with) and
/// [`ResourcePoolManagement::manage_with`](crate::ResourcePoolManagement::manage_with).
///
/// ```
/// use sire::{Location, ManageOptions, OffloadPolicy};
/// let opts = ManageOptions::new()
///     .name("unet")
///     .offload(Location::Disk)
///     .policy(OffloadPolicy::Eager)
///     .reserve(512 << 20); // activations
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ManageOptions {
    pub(crate) name: Option<String>,
    pub(crate) runtime: Option<Location>,
    pub(crate) offload: Option<Location>,
    pub(crate) policy: OffloadPolicy,
    pub(crate) reserve: u64,
}

impl ManageOptions {
    /// Defaults: a generated name (the type's, made unique), automatic runtime location (a CUDA device if
    /// there is one, else the CPU), offload to host memory when running on a GPU
    /// and to disk when running on the CPU, lazy offload, nothing reserved.
    pub fn new() -> Self {
        Self::default()
    }

    /// A name for logs, statistics, events and errors, unique within the
    /// instance (registering a second model under a taken name is
    /// [`Error::InvalidOptions`](crate::Error::InvalidOptions)). Without it the
    /// model is named after its type: `TensorSet`, then `TensorSet#2`…
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Where the model executes: a specific `Location::Cuda(i)` or `Location::Cpu`.
    /// Without this, the runtime picks: the CUDA device where the model already is,
    /// else the one with the most free budget, else the CPU.
    pub fn runtime(mut self, location: Location) -> Self {
        self.runtime = Some(location);
        self
    }

    /// Where the model goes when evicted from its runtime location:
    /// `Location::Cpu` (host memory) or `Location::Disk` (the spill directory).
    pub fn offload(mut self, location: Location) -> Self {
        self.offload = Some(location);
        self
    }

    /// Lazy (default) or eager offload.
    pub fn policy(mut self, policy: OffloadPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Extra bytes reserved on the runtime location while the model is resident
    /// there, for activations and workspace during inference.
    pub fn reserve(mut self, bytes: u64) -> Self {
        self.reserve = bytes;
        self
    }
}
