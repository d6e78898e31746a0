//! The engine: plans under its lock, moves bytes without it, and publishes.
//!
//! # Layers
//!
//! - [`ledger`]: pools and per-model residency; one transition function writes
//!   every byte count and checks the invariants in debug builds.
//! - [`policy`]: room, victims and placement, as plain functions over a
//!   snapshot of the ledger.
//! - [`transfer`]: moving bytes (pack, pin, copy, spill, reload, streams); it
//!   never sees the ledger.
//! - [`signal`]: waiter counting and the wait-for-change primitive.
//! - [`token`]: uses and reservations, values that undo themselves on drop.
//!
//! # Protocol
//!
//! Every model has an atomic word `state`: a `READY` bit (the weights are on the
//! runtime location and may be used) and a use count (live guards). A guard on a
//! ready model is one compare-and-swap that increments the count, with no lock.
//!
//! Everything else happens under the engine's one mutex (the [`ledger::Ledger`]).
//! A thread that moves a model takes a [`token::Reservation`] under the lock
//! (the model is marked `moving` with the residency it will have), releases the
//! lock, moves the bytes, and takes the lock again to publish the residency it
//! ended with. To evict a model, the evictor swaps `state` from exactly `READY`
//! (ready, no guards) to 0 under the lock: that fails if any guard is alive,
//! and once it succeeds no new guard can start without going through the lock.
//!
//! Waiting follows [`signal`]'s rule (counted before looking, use counts read
//! with a read-modify-write, a last release notifies). `loom/` model-checks it.
//!
//! Events for the [listener](crate::Builder::listener) are queued under the lock,
//! in publication order, and delivered in that order after the lock is released.
//! Driver probes and the allocator's cache release (a device-wide
//! synchronisation) never run under the lock.

mod acquire;
mod admit;
mod evict;
pub(crate) mod ledger;
mod lock;
mod model;
mod observe;
mod patching;
pub(crate) mod policy;
pub(crate) mod signal;
mod token;
pub(crate) mod transfer;

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tch::Device;

use crate::events::{Event, EventKind, Listener};
use crate::options::{ManageOptions, OffloadPolicy};
use crate::stats::{Counters, PoolStats, Resident, Stats};
use crate::user::{self, ResourceUser};
use crate::{Error, Location, Result};

use ledger::{Ledger, Residency};
use lock::{Deferred, HELD};
pub(crate) use lock::{Locked, Undo};
use model::{CoreSpec, ModelData};
pub(crate) use model::{ModelCore, PatchHooks, READY};
use policy::{Candidate, PoolView, Room};
use signal::Signal;
pub(crate) use signal::{Gave, Wait};
pub(crate) use token::{OwnedUse, Reservation, Use};
#[cfg(test)]
pub(crate) use transfer::FailAt;
pub(crate) use transfer::Pinning;
use transfer::{unwind_safe, EvictJob, LoadJob, Transfer};

/// Reads a CUDA device's physical state: (driver free bytes, bytes the caching
/// allocator holds but no tensor uses). `None` when it cannot be read.
pub(crate) type CudaProbe = Arc<dyn Fn(usize) -> Option<(u64, u64)> + Send + Sync>;

/// Bytes kept physically free on a CUDA device beyond a load (CUDA context
/// growth, cuBLAS workspaces, the first activations).
pub(crate) const CUDA_HEADROOM: u64 = 256 << 20;

pub(crate) struct Engine {
    state: Mutex<Ledger>,
    deferred: Mutex<Deferred>,
    signal: Signal,
    pub(crate) transfer: Transfer,
    /// What the device really has free: budgets alone do not see other
    /// processes, activations, or the allocator's cache.
    cuda_probe: Option<CudaProbe>,
    cuda_headroom: u64,
    /// Releases the caching allocator's idle blocks to the driver.
    empty_cache: Option<Arc<dyn Fn() + Send + Sync>>,
    clock: AtomicU64,
    next_id: AtomicU64,
    pub(crate) spill_dir: Option<PathBuf>,
    pub(crate) wait_timeout: Duration,
    pub(crate) counters: Counters,
    /// The observer set by `Builder::listener`.
    pub(crate) listener: Option<Listener>,
    /// Events published but not yet delivered (pushed under `state`).
    events: Mutex<Vec<Event>>,
    /// Held by the thread delivering events (keeps them in order).
    delivering: Mutex<()>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(dir) = &self.spill_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Engine {
    pub(crate) fn new(pools: Vec<(Location, u64)>, spill_dir: Option<PathBuf>, wait: Duration) -> Self {
        Engine {
            state: Mutex::new(Ledger::new(pools, 0)),
            deferred: Mutex::new(Deferred::default()),
            signal: Signal::new(),
            transfer: Transfer::new(Pinning::Off),
            cuda_probe: None,
            cuda_headroom: CUDA_HEADROOM,
            empty_cache: None,
            clock: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            spill_dir,
            wait_timeout: wait,
            counters: Counters::default(),
            listener: None,
            events: Mutex::new(Vec::new()),
            delivering: Mutex::new(()),
        }
    }

    /// Sets how home copies of CUDA models are allocated, and the cap on pinned bytes.
    pub(crate) fn with_pinning(mut self, pin: Pinning, cap: u64) -> Self {
        self.transfer.pin = pin;
        self.state.get_mut().set_pinned_cap(cap);
        self
    }

    /// Makes room decisions on CUDA pools also check the device's physical
    /// free memory (`probe`), keeping `headroom` bytes free, and releases the
    /// allocator's cache (`empty_cache`) after evictions that left the driver short.
    pub(crate) fn with_cuda_probe(
        mut self,
        probe: CudaProbe,
        headroom: u64,
        empty_cache: Arc<dyn Fn() + Send + Sync>,
    ) -> Self {
        self.cuda_probe = Some(probe);
        self.cuda_headroom = headroom;
        self.empty_cache = Some(empty_cache);
        self
    }

    /// Takes the lock.
    pub(crate) fn lock(&self) -> Locked<'_> {
        debug_assert!(!self.held_here(), "the engine's lock is not reentrant");
        let st = self.state.lock();
        HELD.set(self as *const Engine as usize);
        Locked { engine: self, st: Some(st), changed: false, garbage: Vec::new() }
    }

    /// Whether the calling thread holds this engine's lock.
    pub(crate) fn held_here(&self) -> bool {
        HELD.get() == self as *const Engine as usize
    }

    /// Undoes a reservation dropped unpublished: at once, or, if this thread
    /// holds the lock, when it releases it.
    pub(crate) fn undo(&self, u: Undo) {
        if self.held_here() {
            self.deferred.lock().undo.push(u);
        } else {
            let mut lk = self.lock();
            lk.apply(u);
            lk.changed = true;
        }
    }

    #[cfg(test)]
    pub(crate) fn fail_next(&self, at: FailAt) {
        self.transfer.fail_next(at);
    }

    /// Reserves `n` consecutive values of the recency clock and returns the
    /// first: stamps no use will take, for a caller that orders the recency
    /// of its own models itself (see `parts.rs`).
    pub(crate) fn reserve_stamps(&self, n: u64) -> u64 {
        self.clock.fetch_add(n, Relaxed)
    }

    pub(crate) fn pools(&self) -> Vec<(Location, u64)> {
        self.lock().pools().iter().map(|p| (p.location, p.budget)).collect()
    }
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
