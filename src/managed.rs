//! Managed models and the guards that put them to work.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::Device;

use crate::manager::{ModelCore, Wait};
use crate::runtime::global;
use crate::{Location, ManageOptions, ResourcePoolManagement, ResourceUser, Result};

/// A model registered with a [`ResourcePoolManagement`].
///
/// A cheap handle: clones share the model. Its weights move between tiers on
/// their own; use them inside a guard from [`auto_manage`]. When the last
/// handle is dropped the model is unregistered and its spill file deleted.
pub struct Managed<T> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    model: T,
    core: Arc<ModelCore>,
    pools: ResourcePoolManagement,
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        self.pools.inner.retire_hits(&self.core);
        self.pools.inner.unregister(&self.core);
    }
}

impl<T> Clone for Managed<T> {
    fn clone(&self) -> Self {
        Managed { shared: self.shared.clone() }
    }
}

impl<T> fmt::Debug for Managed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Managed")
            .field("name", &self.name())
            .field("bytes", &self.size_bytes())
            .field("runtime", &self.shared.core.runtime)
            .finish_non_exhaustive()
    }
}

impl<T> Managed<T> {
    pub(crate) fn new(model: T, core: Arc<ModelCore>, pools: ResourcePoolManagement) -> Self {
        Managed { shared: Arc::new(Shared { model, core, pools }) }
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.shared.core.name
    }

    /// Bytes of parameters and buffers (shared storage counted once).
    pub fn size_bytes(&self) -> u64 {
        self.shared.core.bytes
    }

    /// Where the model runs while guarded.
    pub fn runtime(&self) -> Location {
        self.shared.core.runtime
    }

    /// Where the weights are now: the runtime location if resident there, else
    /// `Cpu` if in host memory, else `Disk`.
    pub fn location(&self) -> Location {
        self.shared.pools.inner.location_of(&self.shared.core)
    }

    /// Live guards on the model.
    pub fn use_count(&self) -> u64 {
        self.shared.core.uses()
    }

    /// The instance the model is registered with.
    pub fn pools(&self) -> &ResourcePoolManagement {
        &self.shared.pools
    }

    /// Offloads the model now, to its offload location, if no guard is alive
    /// ([`Error::InUse`](crate::Error::InUse) otherwise).
    pub fn offload(&self) -> Result<()> {
        self.shared.pools.inner.offload_now(&self.shared.core)
    }

    /// Access to the wrapped model *without* a guard: its weights may be on any
    /// tier (or empty while spilled). Meant for inspection, not computation.
    pub fn get_unguarded(&self) -> &T {
        &self.shared.model
    }

    fn acquire(&self, wait: Wait) -> Result<()> {
        self.shared.pools.inner.acquire(&self.shared.core, wait)
    }

    fn deadline(&self, timeout: Duration) -> Wait<'static> {
        Wait::Until(Instant::now() + timeout, timeout)
    }
}

/// Puts the model on its runtime device and returns a guard; the model stays
/// there, and cannot be evicted, while any guard on it is alive.
///
/// If the model is already resident this moves nothing and takes no lock. If
/// the room is held by models in use, it waits for a guard to drop, up to the
/// instance's wait timeout (see [`Builder::wait_timeout`](crate::Builder::wait_timeout)),
/// then fails with [`Error::OutOfMemory`](crate::Error::OutOfMemory). A model
/// larger than the whole budget fails at once with
/// [`Error::TooLarge`](crate::Error::TooLarge).
pub fn auto_manage<T>(m: &Managed<T>) -> Result<Guard<'_, T>> {
    let timeout = m.shared.pools.inner.wait_timeout;
    auto_manage_timeout(m, timeout)
}

/// Like [`auto_manage`], waiting at most `timeout` for room.
pub fn auto_manage_timeout<T>(m: &Managed<T>, timeout: Duration) -> Result<Guard<'_, T>> {
    m.acquire(m.deadline(timeout))?;
    Ok(Guard { shared: &m.shared })
}

/// Like [`auto_manage`], but never waits: fails at once if room is held by models in use.
pub fn try_auto_manage<T>(m: &Managed<T>) -> Result<Guard<'_, T>> {
    m.acquire(Wait::No)?;
    Ok(Guard { shared: &m.shared })
}

/// Like [`auto_manage`], returning a guard that owns a handle on the model
/// (`'static`, can be moved to another thread or stored).
pub fn auto_manage_owned<T>(m: &Managed<T>) -> Result<OwnedGuard<T>> {
    let timeout = m.shared.pools.inner.wait_timeout;
    m.acquire(m.deadline(timeout))?;
    Ok(OwnedGuard { shared: m.shared.clone() })
}

/// Registers a model with the global instance (set up on first use), with default options.
pub fn manage<T: ResourceUser>(model: T) -> Result<Managed<T>> {
    global()?.manage(model)
}

/// Registers a model with the global instance, with options.
pub fn manage_with<T: ResourceUser>(model: T, opts: ManageOptions) -> Result<Managed<T>> {
    global()?.manage_with(model, opts)
}

/// Proof that a model is on its runtime device; dereferences to the model.
/// Dropping it (also by a panic unwinding) gives the use back.
#[must_use = "the model may be evicted as soon as the guard is dropped"]
pub struct Guard<'a, T> {
    shared: &'a Shared<T>,
}

impl<T> Guard<'_, T> {
    /// The device the model's weights are on: move inputs here.
    pub fn device(&self) -> Device {
        self.shared.core.device
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.shared.model
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.shared.pools.inner.release(&self.shared.core);
    }
}

impl<T> fmt::Debug for Guard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("model", &self.shared.core.name)
            .field("device", &self.device())
            .finish()
    }
}

/// A guard that owns a handle on its model; see [`auto_manage_owned`].
#[must_use = "the model may be evicted as soon as the guard is dropped"]
pub struct OwnedGuard<T> {
    shared: Arc<Shared<T>>,
}

impl<T> OwnedGuard<T> {
    /// The device the model's weights are on: move inputs here.
    pub fn device(&self) -> Device {
        self.shared.core.device
    }
}

impl<T> Deref for OwnedGuard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.shared.model
    }
}

impl<T> Drop for OwnedGuard<T> {
    fn drop(&mut self) {
        self.shared.pools.inner.release(&self.shared.core);
    }
}

impl<T> fmt::Debug for OwnedGuard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedGuard")
            .field("model", &self.shared.core.name)
            .field("device", &self.device())
            .finish()
    }
}

// Crate-internal access for the async layer.
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
impl<T> Managed<T> {
    pub(crate) fn core(&self) -> &Arc<ModelCore> {
        &self.shared.core
    }

    /// Wraps a use the caller already holds (taken by `Inner::hit` or
    /// `Inner::poll_acquire`) in an owned guard, which releases it on drop.
    pub(crate) fn adopt_use(&self) -> OwnedGuard<T> {
        OwnedGuard { shared: self.shared.clone() }
    }
}
