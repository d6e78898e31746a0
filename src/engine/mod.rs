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

pub(crate) mod ledger;
mod model;
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

/// A reservation's undo, applied by whoever holds the lock next.
pub(crate) struct Undo {
    core: Arc<ModelCore>,
    res: Residency,
    restore_ready: bool,
}

/// Work left by tokens dropped while their thread held the lock.
#[derive(Default)]
struct Deferred {
    undo: Vec<Undo>,
    /// Models whose last use was released under the lock (eager offload, wake-ups).
    idle: Vec<u64>,
}

thread_local! {
    /// The engine whose lock this thread holds (its address), or 0.
    static HELD: Cell<usize> = const { Cell::new(0) };
}

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

/// The engine's lock, held. Tokens dropped meanwhile leave their undo to it:
/// it applies them before releasing the lock, then wakes waiters if the
/// ledger changed, offloads eager models released meanwhile, and delivers
/// events.
pub(crate) struct Locked<'a> {
    engine: &'a Engine,
    st: Option<MutexGuard<'a, Ledger>>,
    changed: bool,
}

impl<'a> Locked<'a> {
    pub(crate) fn engine(&self) -> &'a Engine {
        self.engine
    }

    /// Applies what tokens left while this thread held the lock.
    fn drain(&mut self) {
        let undo = {
            let mut d = self.engine.deferred.lock();
            if !d.idle.is_empty() {
                self.changed = true; // a release: waiters look again
            }
            std::mem::take(&mut d.undo)
        };
        if !undo.is_empty() {
            self.changed = true;
        }
        for u in undo {
            self.apply(u);
        }
    }

    fn apply(&mut self, u: Undo) {
        let id = u.core.id;
        if self.get(id).is_none() {
            return;
        }
        self.transition(id, u.res);
        self.set_moving(id, false);
        if u.restore_ready && u.res.on_runtime(&u.core) {
            u.core.state.fetch_or(READY, SeqCst);
        }
    }

    /// Runs `f` without the lock.
    pub(crate) fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.flush();
        HELD.set(0);
        let r = MutexGuard::unlocked(self.st.as_mut().expect("held"), f);
        HELD.set(self.engine as *const Engine as usize);
        r
    }

    /// Applies deferred work and wakes waiters for changes made so far.
    fn flush(&mut self) {
        self.drain();
        if std::mem::take(&mut self.changed) {
            self.engine.signal.notify();
        }
    }

    /// Waits for a change (a release, a finished move) as `wait` allows.
    pub(crate) fn wait(&mut self, wait: Wait) -> std::result::Result<(), Gave> {
        self.flush();
        HELD.set(0);
        let r = self.engine.signal.wait(self.st.as_mut().expect("held"), wait);
        HELD.set(self.engine as *const Engine as usize);
        r
    }

    /// Waits for a change with no deadline (for moves, which always end).
    fn wait_forever(&mut self) {
        self.flush();
        HELD.set(0);
        self.engine.signal.wait_forever(self.st.as_mut().expect("held"));
        HELD.set(self.engine as *const Engine as usize);
    }
}

impl Deref for Locked<'_> {
    type Target = Ledger;
    fn deref(&self) -> &Ledger {
        self.st.as_ref().expect("held")
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Ledger {
        self.changed = true;
        self.st.as_mut().expect("held")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.drain();
        let idle: Vec<Arc<ModelCore>> = std::mem::take(&mut self.engine.deferred.lock().idle)
            .into_iter()
            .filter_map(|id| self.get(id).map(|e| e.core.clone()))
            .collect();
        drop(self.st.take());
        HELD.set(0);
        if self.changed {
            self.engine.signal.notify();
        }
        for core in idle {
            self.engine.on_idle(&core);
        }
        self.engine.deliver();
    }
}

/// The loads of one acquisition that are not in place, with their progress.
struct Loading<'a> {
    index: usize,
    job: LoadJob,
    reservation: Reservation<'a>,
    /// The host part completed (the model is whole in host memory).
    host_done: Cell<bool>,
    /// The home read from disk is pinned.
    pinned: Cell<bool>,
    /// Pinned bytes reserved for it.
    pin_reserved: u64,
}

/// An eviction claimed under the lock.
struct Claim<'a> {
    reservation: Reservation<'a>,
    job: EvictJob,
    /// The disk residency once written.
    disk: Option<u64>,
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
        Locked { engine: self, st: Some(st), changed: false }
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

    pub(crate) fn pools(&self) -> Vec<(Location, u64)> {
        self.lock().pools().iter().map(|p| (p.location, p.budget)).collect()
    }

    // ----------------------------------------------------------------- the CUDA driver

    /// What each CUDA pool can take physically now. Called without the lock.
    fn probe(&self, pools: &[Location]) -> HashMap<Location, u64> {
        debug_assert!(!self.held_here(), "driver probes never run under the engine's lock");
        let Some(probe) = &self.cuda_probe else { return HashMap::new() };
        pools
            .iter()
            .filter_map(|&loc| match loc {
                Location::Cuda(i) => {
                    probe(i).map(|(free, idle)| (loc, (free + idle).saturating_sub(self.cuda_headroom)))
                }
                _ => None,
            })
            .collect()
    }

    /// After evictions from a CUDA pool: if the driver itself is short of
    /// `need` (the freed blocks sit in the caching allocator, where other
    /// processes cannot use them and a large packed allocation may not fit),
    /// gives the allocator's idle blocks back to the driver. Called without
    /// the lock (it synchronises the device).
    fn release_cache_if_short(&self, loc: Location, need: u64) {
        debug_assert!(!self.held_here(), "the allocator's cache is never emptied under the engine's lock");
        let (Location::Cuda(i), Some(probe), Some(empty)) = (loc, &self.cuda_probe, &self.empty_cache) else {
            return;
        };
        if probe(i).is_some_and(|(free, idle)| idle > 0 && free < need + self.cuda_headroom) {
            empty();
            self.counters.cache_releases.fetch_add(1, Relaxed);
        }
    }

    // ----------------------------------------------------------------- registration

    pub(crate) fn register<T: ResourceUser>(&self, model: &T, opts: ManageOptions) -> Result<Arc<ModelCore>> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let type_name = crate::error::short_type_name(std::any::type_name::<T>());
        let label = opts.name.clone().unwrap_or_else(|| type_name.to_string());
        let mut inv = user::inventory(&label, model.tensors())?;
        let invalid = |reason: String| Error::InvalidOptions { model: label.clone(), reason };
        let (runtime, offload, name) = {
            let mut lk = self.lock();
            let runtime = match opts.runtime {
                None => most_free_cuda(&lk).unwrap_or(Location::Cpu),
                Some(Location::Disk) => {
                    return Err(invalid("the runtime location cannot be the disk".into()))
                }
                Some(loc @ Location::Cuda(_)) if lk.pool(loc).is_none() => {
                    let available =
                        lk.pools().iter().filter(|p| matches!(p.location, Location::Cuda(_))).count();
                    return Err(Error::UnknownDevice { location: loc, available });
                }
                Some(loc) => loc,
            };
            let offload =
                opts.offload.unwrap_or(if runtime == Location::Cpu { Location::Disk } else { Location::Cpu });
            match offload {
                Location::Cuda(_) => {
                    return Err(invalid("the offload location must be the CPU or the disk".into()))
                }
                Location::Cpu if runtime == Location::Cpu => {
                    return Err(invalid("a model running on the CPU must offload to the disk".into()))
                }
                Location::Disk if lk.pool(Location::Disk).is_none() => {
                    return Err(invalid(
                        "offload to disk needs a spill directory (none is configured)".into(),
                    ))
                }
                _ => {}
            }
            // One name per model: an explicit name must be free; a generated one
            // is the type's short name, then `#2`, `#3`…
            let name = match &opts.name {
                Some(n) if lk.name_taken(n) => {
                    return Err(invalid("another model of this instance already has this name".into()))
                }
                Some(n) => n.clone(),
                None => lk.free_name(type_name),
            };
            lk.claim_name(&name);
            (runtime, offload, name)
        };
        let release_name = |e: Error| {
            self.lock().release_name(&name);
            e
        };
        // Weights start in host memory: that copy is the model's home.
        if inv.device != Device::Cpu {
            if Location::from_device(inv.device).is_none() {
                return Err(release_name(invalid(format!("unsupported device {:?}", inv.device))));
            }
            for g in &mut inv.groups {
                let host = g.current().to_device(Device::Cpu);
                g.set_data(&host);
            }
        }
        let source = user::source_of(model as &dyn std::any::Any);
        let spill_path = self.spill_dir.as_ref().map(|d| d.join(format!("{id}.safetensors")));
        let core = Arc::new(ModelCore::new(
            CoreSpec {
                id,
                name: name.clone(),
                bytes: inv.bytes,
                runtime,
                auto: opts.runtime.is_none(),
                offload,
                policy: opts.policy,
                reserve: opts.reserve,
                clock: self.clock.fetch_add(1, Relaxed),
            },
            ModelData::new(inv.groups, spill_path, source),
        ));
        self.admit(&core).map_err(release_name)?;
        Ok(core)
    }

    /// Accounts a new model's host bytes, making room (or spilling the model
    /// itself straight to disk) so that the host pool stays within budget. A
    /// CUDA model's home is packed into one buffer, pinned within the cap.
    fn admit(&self, core: &Arc<ModelCore>) -> Result<()> {
        let cuda = core.runtime() != Location::Cpu;
        let has_source = core.data.lock().source.is_some();
        let mut lk = self.lock();
        let mut res = Residency { host: true, disk: has_source.then_some(0), ..Residency::default() };
        let need = res.charge(core, Location::Cpu);
        let mut failed = Vec::new();
        loop {
            self.reclaim_spares(&mut lk, Location::Cpu, need);
            let room = self.room(&mut lk, Location::Cpu, need, &[core.id], &failed, None);
            match room {
                Room::Free => {
                    if cuda
                        && self.transfer.pin != Pinning::Off
                        && core.bytes > 0
                        && core.bytes <= lk.pinned_free()
                    {
                        res.pinned = core.bytes;
                    }
                    lk.insert(core.clone(), res, cuda);
                    if !cuda {
                        core.state.store(READY, SeqCst);
                    }
                    self.emit(core, EventKind::Registered, None, Some(Location::Cpu));
                    if cuda {
                        self.pack(&mut lk, core, res);
                    }
                    return Ok(());
                }
                Room::Evict(victims) => {
                    let claims = self.claim(&mut lk, &victims, Location::Cpu);
                    failed.extend(self.run_evictions(&mut lk, claims).into_iter().map(|(id, _)| id));
                }
                _ => break,
            }
        }
        // No room in host memory: the new model goes straight to disk.
        let write = if has_source { 0 } else { core.bytes };
        if lk.pool(Location::Disk).is_none() || write > lk.free(Location::Disk) {
            return Err(self.oom(&lk, core, Location::Cpu, need, None));
        }
        // Not counted in the host pool: it leaves host memory as soon as it is written.
        lk.insert(core.clone(), Residency { disk: Some(write), ..Residency::default() }, true);
        let job = EvictJob {
            drop_dev: false,
            spill: true,
            write: write > 0,
            leaves_runtime: false,
            cause: "admit",
        };
        let res = lk.unlocked(|| {
            let mut d = core.data.lock();
            unwind_safe(&core.name, || {
                self.transfer.evict(core, &mut d, &job, &Cell::new(false), &self.counters)
            })
        });
        match res {
            Ok(()) => {
                lk.set_moving(core.id, false);
                self.emit(core, EventKind::Registered, None, Some(Location::Disk));
                Ok(())
            }
            Err(err) => {
                lk.remove(core.id);
                Err(err)
            }
        }
    }

    /// Packs a newly admitted CUDA model's home (marked moving) and publishes it.
    fn pack(&self, lk: &mut Locked<'_>, core: &Arc<ModelCore>, res: Residency) {
        let packed = lk.unlocked(|| {
            let mut d = core.data.lock();
            unwind_safe(&core.name, || self.transfer.pack_home(&mut d, res.pinned > 0))
        });
        if let Err(e) = &packed {
            tracing::warn!(model = %core.name, error = %e, "could not pack the home copy; it stays as it was");
        }
        if res.pinned > 0 && !matches!(packed, Ok(true)) {
            lk.update(core.id, |r| r.pinned = 0);
        }
        lk.set_moving(core.id, false);
    }

    /// Removes a model whose last handle was dropped.
    pub(crate) fn unregister(&self, core: &ModelCore) {
        let mut lk = self.lock();
        while lk.is_moving(core.id) {
            lk.wait_forever();
        }
        if let Some((core, res)) = lk.remove(core.id) {
            lk.release_name(&core.name);
            self.emit(&core, EventKind::Unregistered, Some(res.location(&core)), None);
            if let Some(p) = &core.data.lock().spill_path {
                // Whether a spill file was ever written or not: it is this model's alone.
                match std::fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(model = %core.name, path = %p.display(), error = %e, "could not delete the spill file")
                    }
                }
            }
            self.counters.retired_hits.fetch_add(core.hits.load(Relaxed), Relaxed);
        }
    }

    // ----------------------------------------------------------------- acquire

    /// Takes one use of the model, loading it first if needed.
    #[inline]
    pub(crate) fn acquire<'a>(&'a self, core: &'a Arc<ModelCore>, wait: Wait) -> Result<Use<'a>> {
        if core.try_hit(&self.clock) {
            return Ok(Use::new(self, core));
        }
        let mut uses = self.acquire_slow(std::slice::from_ref(core), wait)?;
        Ok(uses.pop().expect("one use per model"))
    }

    /// Takes one use of each model (distinct models), loading together those
    /// that are not in place: room for all is made first, then every copy is
    /// issued and each device synchronised once. All or nothing.
    pub(crate) fn acquire_many<'a>(
        &'a self,
        cores: &'a [Arc<ModelCore>],
        wait: Wait,
    ) -> Result<Vec<Use<'a>>> {
        let mut held = Vec::with_capacity(cores.len());
        for c in cores {
            if !c.try_hit(&self.clock) {
                break;
            }
            held.push(Use::new(self, c));
        }
        if held.len() == cores.len() {
            return Ok(held);
        }
        // Holding some uses while waiting for room for the others could deadlock
        // two batches: give them back and take all of them under the lock.
        drop(held);
        self.acquire_slow(cores, wait)
    }

    /// One use if the model is ready (the hit path: no lock, no move).
    #[inline]
    #[cfg(feature = "tokio")]
    pub(crate) fn hit<'a>(&'a self, core: &'a ModelCore) -> Option<Use<'a>> {
        core.try_hit(&self.clock).then(|| Use::new(self, core))
    }

    /// One attempt that never blocks on the condition variable (the async
    /// layer's): `Ok(Ok(use))`, `Ok(Err(e))` when it would have to wait (`e` is
    /// what giving up would report), `Err` for a failure that waiting cannot
    /// cure. It may move bytes: call it off the async executor. The caller
    /// stays counted as a waiter across its attempts and its waits.
    #[cfg(feature = "tokio")]
    pub(crate) fn poll_acquire<'a>(
        &'a self,
        core: &'a Arc<ModelCore>,
    ) -> Result<std::result::Result<Use<'a>, Error>> {
        let would_wait = Cell::new(false);
        match self.acquire(core, Wait::Poll(&would_wait)) {
            Ok(u) => Ok(Ok(u)),
            Err(e) if would_wait.get() => Ok(Err(e)),
            Err(e) => Err(e),
        }
    }

    /// Counts the caller as a waiter (the async layer, across its attempts).
    #[cfg(feature = "tokio")]
    pub(crate) fn count_waiter(&self) -> signal::Counted<'_> {
        self.signal.count()
    }

    /// A future resolved by the next change.
    #[cfg(feature = "tokio")]
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.signal.notified()
    }

    fn acquire_slow<'a>(&'a self, cores: &'a [Arc<ModelCore>], wait: Wait) -> Result<Vec<Use<'a>>> {
        // Counted before looking for room: see `signal`.
        let _counted = self.signal.count();
        let mut lk = self.lock();
        let mut failed: Vec<u64> = Vec::new();
        let mut evict_err: Option<Error> = None;
        let cuda_pools: Vec<Location> =
            lk.pools().iter().map(|p| p.location).filter(|l| matches!(l, Location::Cuda(_))).collect();
        'retry: loop {
            if let [core] = cores {
                if core.try_hit(&self.clock) {
                    return Ok(vec![Use::new(self, core)]);
                }
            }
            let phys = if self.cuda_probe.is_some() && !cuda_pools.is_empty() {
                lk.unlocked(|| self.probe(&cuda_pools))
            } else {
                HashMap::new()
            };
            // Which models must load; a model being moved is waited for.
            let mut pending: Vec<usize> = Vec::new();
            for (i, core) in cores.iter().enumerate() {
                let e = lk.get(core.id).ok_or_else(|| Error::ForeignModel { model: core.name.clone() })?;
                if e.moving {
                    if let Err(g) = lk.wait(wait) {
                        return Err(self.gave_up(&lk, g, core, core.runtime(), core.bytes));
                    }
                    continue 'retry;
                }
                if !core.is_ready() {
                    pending.push(i);
                }
            }
            // Placement of the automatic ones, for the whole batch at once.
            let autos: Vec<Option<u64>> = pending
                .iter()
                .map(|&i| {
                    let c = &cores[i];
                    let movable = c.auto && c.runtime() != Location::Cpu && !lk.res(c.id).dev;
                    movable.then_some(c.bytes + c.reserve)
                })
                .collect();
            if autos.iter().any(Option::is_some) {
                let free: Vec<(Location, u64)> = cuda_pools
                    .iter()
                    .map(|&l| (l, phys.get(&l).map_or(lk.free(l), |&p| p.min(lk.free(l)))))
                    .collect();
                for (&i, place) in pending.iter().zip(policy::place_batch(&free, &autos)) {
                    if let Some(loc) = place.filter(|&l| l != cores[i].runtime()) {
                        lk.place(cores[i].id, loc);
                    }
                }
            }
            // Room, pool by pool: host first (a CUDA model needs its home), then devices.
            let jobs: Vec<(usize, LoadJob)> = pending
                .iter()
                .map(|&i| {
                    let c = &cores[i];
                    let r = lk.res(c.id);
                    (i, LoadJob { host: !r.host, dev: c.runtime() != Location::Cpu && !r.dev, pin: false })
                })
                .collect();
            let mut needs: Vec<(Location, u64)> = Vec::new();
            for (i, job) in &jobs {
                let c = &cores[*i];
                let mut to = lk.res(c.id);
                to.host = true;
                to.dev |= job.dev;
                let before = lk.res(c.id);
                let locs: &[Location] = if c.runtime() == Location::Cpu {
                    &[Location::Cpu]
                } else {
                    &[Location::Cpu, c.runtime()]
                };
                for &loc in locs {
                    let n = to.charge(c, loc).saturating_sub(before.charge(c, loc));
                    if n == 0 {
                        continue;
                    }
                    match needs.iter_mut().find(|(l, _)| *l == loc) {
                        Some((_, t)) => *t += n,
                        None => needs.push((loc, n)),
                    }
                }
            }
            needs.sort_by_key(|(loc, _)| *loc != Location::Cpu);
            let ids: Vec<u64> = cores.iter().map(|c| c.id).collect();
            let first = &cores[jobs.first().map_or(0, |(i, _)| *i)];
            for &(loc, n) in &needs {
                // The batch as a whole must fit: what its members already hold here counts.
                let held: u64 = cores
                    .iter()
                    .filter(|c| !jobs.iter().any(|(i, _)| cores[*i].id == c.id))
                    .map(|c| lk.res(c.id).charge(c, loc))
                    .sum();
                let budget = lk.budget(loc);
                if cores.len() > 1 && n + held > budget {
                    return Err(Error::TooLarge {
                        model: batch_name(cores),
                        location: loc,
                        requested: n + held,
                        budget,
                    });
                }
                self.reclaim_spares(&mut lk, loc, n);
                match self.room(&mut lk, loc, n, &ids, &failed, phys.get(&loc).copied()) {
                    Room::Free => continue,
                    Room::Evict(victims) => {
                        let claims = self.claim(&mut lk, &victims, loc);
                        for (id, e) in self.run_evictions(&mut lk, claims) {
                            // A victim that cannot leave is passed over from now on.
                            failed.push(id);
                            evict_err.get_or_insert(e);
                        }
                        if matches!(loc, Location::Cuda(_)) {
                            lk.unlocked(|| self.release_cache_if_short(loc, n));
                        }
                    }
                    Room::Wait => {
                        if let Err(g) = lk.wait(wait) {
                            if let ([core], Gave::TimedOut(_)) = (cores, &g) {
                                if core.try_hit(&self.clock) {
                                    return Ok(vec![Use::new(self, core)]);
                                }
                            }
                            return Err(self.gave_up(&lk, g, first, loc, n).named(batch_name(cores)));
                        }
                    }
                    Room::TooLarge => {
                        return Err(Error::TooLarge {
                            model: batch_name(cores),
                            location: loc,
                            requested: n,
                            budget: lk.budget(loc),
                        });
                    }
                    Room::Full => {
                        // A victim whose eviction failed may be why: report that failure.
                        if let Some(e) = evict_err {
                            return Err(e);
                        }
                        return Err(self.oom(&lk, first, loc, n, None).named(batch_name(cores)));
                    }
                }
                continue 'retry;
            }
            // Reserve everything, hold the models already in place, then move without the lock.
            let mut loading: Vec<Loading<'a>> = Vec::with_capacity(jobs.len());
            for (i, mut job) in jobs {
                let c = &cores[i];
                let before = lk.res(c.id);
                let mut to = before;
                to.host = true;
                to.dev |= job.dev;
                let pin_reserved = if job.host
                    && self.transfer.pin != Pinning::Off
                    && c.runtime() != Location::Cpu
                    && c.bytes > 0
                    && c.bytes <= lk.pinned_free()
                {
                    c.bytes
                } else {
                    0
                };
                to.pinned += pin_reserved;
                job.pin = pin_reserved > 0;
                let reservation = Reservation::take(&mut lk, c.clone(), to, false);
                loading.push(Loading {
                    index: i,
                    job,
                    reservation,
                    host_done: Cell::new(false),
                    pinned: Cell::new(false),
                    pin_reserved,
                });
            }
            let mut uses: Vec<Option<Use<'a>>> = Vec::with_capacity(cores.len());
            for (i, core) in cores.iter().enumerate() {
                if loading.iter().any(|l| l.index == i) {
                    uses.push(None);
                } else {
                    let ok = core.try_hit(&self.clock);
                    debug_assert!(ok, "a ready model stays ready under the lock");
                    uses.push(Some(Use::new(self, core)));
                }
            }
            let results = lk.unlocked(|| self.move_in(cores, &loading));
            // Publish.
            let mut first_err = None;
            for (l, res) in loading.into_iter().zip(results) {
                let core = &cores[l.index];
                self.counters.misses.fetch_add(1, Relaxed);
                let mut to = l.reservation.before;
                let host_done = l.host_done.get() || !l.job.host;
                if host_done {
                    to.host = true;
                    to.pinned = if l.job.host {
                        if l.pinned.get() {
                            l.pin_reserved
                        } else {
                            0
                        }
                    } else {
                        to.pinned
                    };
                }
                match res {
                    Ok(()) => {
                        to.dev |= l.job.dev;
                        l.reservation.publish(&mut lk, to);
                        core.last_used.store(self.clock.fetch_add(1, Relaxed), Relaxed);
                        core.state.store(READY | 1, SeqCst);
                        uses[l.index] = Some(Use::new(self, core));
                        let from = if l.job.host { Location::Disk } else { Location::Cpu };
                        self.emit(core, EventKind::Loaded, Some(from), Some(core.runtime()));
                    }
                    Err(err) => {
                        l.reservation.publish(&mut lk, to);
                        if l.job.host && host_done && l.job.dev {
                            self.emit(core, EventKind::Loaded, Some(Location::Disk), Some(Location::Cpu));
                        }
                        first_err.get_or_insert(err);
                    }
                }
            }
            if let Some(e) = first_err {
                // All or nothing: the uses taken are given back (by drop).
                return Err(e);
            }
            return Ok(uses.into_iter().map(|u| u.expect("every model held")).collect());
        }
    }

    /// Moves the bytes of reserved loads (without the lock): host parts, device
    /// copies, one synchronisation per device, then the swap to the copies.
    fn move_in(&self, cores: &[Arc<ModelCore>], loading: &[Loading<'_>]) -> Vec<Result<()>> {
        let mut datas: Vec<_> = loading.iter().map(|l| cores[l.index].data.lock()).collect();
        let mut staged: Vec<Result<Option<transfer::Staged>>> = loading
            .iter()
            .zip(&mut datas)
            .map(|(l, d)| {
                let c = &cores[l.index];
                unwind_safe(&c.name, || {
                    let (s, pinned) = self.transfer.stage(c, d, &l.job, &l.host_done, &self.counters)?;
                    l.pinned.set(pinned);
                    Ok(s)
                })
            })
            .collect();
        // One synchronisation per device for the whole batch; a failed one
        // fails every load to that device (their copies are dropped unseen).
        let mut synced: Vec<(Device, Option<String>)> = Vec::new();
        for (l, s) in loading.iter().zip(&mut staged) {
            let c = &cores[l.index];
            let d = c.device();
            if !matches!(s, Ok(Some(_))) {
                continue;
            }
            let outcome = match synced.iter().find(|(dev, _)| *dev == d) {
                Some((_, o)) => o.clone(),
                None => {
                    let o = unwind_safe(&c.name, || self.transfer.sync(d)).err().map(|e| e.to_string());
                    synced.push((d, o.clone()));
                    o
                }
            };
            if let Some(msg) = outcome {
                *s = Err(Error::Io(std::io::Error::other(format!(
                    "synchronising {} after the copies failed: {msg}",
                    c.runtime()
                ))));
            }
        }
        loading
            .iter()
            .zip(&mut datas)
            .zip(staged)
            .map(|((l, d), s)| {
                if let Some(staged) = s? {
                    self.transfer.finish(&cores[l.index], d, staged, &self.counters);
                }
                Ok(())
            })
            .collect()
    }

    fn oom(&self, lk: &Ledger, core: &ModelCore, loc: Location, n: u64, waited: Option<Duration>) -> Error {
        Error::OutOfMemory {
            model: core.name.clone(),
            location: loc,
            requested: n,
            budget: lk.budget(loc),
            in_use: lk.pool(loc).map_or(0, |p| p.used()),
            waited,
        }
    }

    /// The error of a wait that ended without the change it waited for.
    fn gave_up(&self, lk: &Ledger, g: Gave, core: &ModelCore, loc: Location, n: u64) -> Error {
        let waited = match g {
            Gave::Up => None,
            Gave::TimedOut(d) => Some(d),
        };
        self.oom(lk, core, loc, n, waited)
    }

    /// Gives one use back.
    #[inline]
    pub(crate) fn release(&self, core: &ModelCore) {
        let prev = core.state.fetch_sub(1, SeqCst);
        debug_assert!(prev & model::USES > 0, "release without acquire");
        if prev & model::USES == 1 && (core.policy == OffloadPolicy::Eager || self.signal.waiting() > 0) {
            self.on_idle_id(core);
        }
    }

    #[cold]
    fn on_idle_id(&self, core: &ModelCore) {
        if self.held_here() {
            // Released by engine code under the lock: handled when it lets go.
            self.deferred.lock().idle.push(core.id);
            return;
        }
        self.on_idle(core);
    }

    #[cold]
    fn on_idle(&self, core: &ModelCore) {
        let mut lk = self.lock();
        lk.changed = true; // waiters look again
        if core.policy == OffloadPolicy::Eager {
            let claims = self.claim(&mut lk, &[core.id], core.runtime());
            for (_, e) in self.run_evictions(&mut lk, claims) {
                tracing::warn!(model = %core.name, error = %e, "eager offload failed; the model stays resident");
            }
        }
    }

    /// Offloads an idle model now (`Managed::offload`).
    pub(crate) fn offload_now(&self, core: &ModelCore) -> Result<()> {
        let mut lk = self.lock();
        loop {
            let e = lk.get(core.id).ok_or_else(|| Error::ForeignModel { model: core.name.clone() })?;
            if e.moving {
                lk.wait_forever();
                continue;
            }
            if core.uses() > 0 {
                return Err(Error::InUse { model: core.name.clone(), guards: core.uses() });
            }
            let r = e.res();
            let from = if r.on_runtime(core) {
                core.runtime()
            } else if r.host && core.offload == Location::Disk {
                Location::Cpu
            } else {
                return Ok(());
            };
            let claims = self.claim(&mut lk, &[core.id], from);
            if claims.is_empty() {
                if core.uses() > 0 {
                    continue; // a guard slipped in: reported as InUse above
                }
                return Err(self.oom(&lk, core, Location::Disk, core.bytes, None));
            }
            return match self.run_evictions(&mut lk, claims).into_iter().next() {
                Some((_, e)) => Err(e),
                None => Ok(()),
            };
        }
    }

    // ----------------------------------------------------------------- eviction

    /// The idle models that could leave `loc` now, for the policy.
    fn candidates(&self, lk: &Ledger, loc: Location, exclude: &[u64], failed: &[u64]) -> Vec<Candidate> {
        lk.entries()
            .filter(|e| !exclude.contains(&e.core.id) && !failed.contains(&e.core.id))
            .filter_map(|e| {
                let (c, r) = (&e.core, e.res());
                if e.moving || c.uses_for_waiter() > 0 {
                    return None;
                }
                let present = match loc {
                    Location::Cuda(_) => r.dev && c.runtime() == loc,
                    Location::Cpu => r.host,
                    Location::Disk => false,
                };
                if !present {
                    return None;
                }
                let spill =
                    loc == Location::Cpu || (c.offload == Location::Disk && c.runtime() == Location::Cpu);
                let write = if spill { disk_write(c, r).1 } else { 0 };
                Some(Candidate {
                    id: c.id,
                    last_used: c.last_used.load(Relaxed),
                    charge: r.charge(c, loc),
                    write,
                })
            })
            .collect()
    }

    /// Looks for `need` bytes in `loc` (see [`policy::room`]).
    fn room(
        &self,
        lk: &mut Locked<'_>,
        loc: Location,
        need: u64,
        exclude: &[u64],
        failed: &[u64],
        physical: Option<u64>,
    ) -> Room {
        let Some(p) = lk.pool(loc) else { return Room::Full };
        let busy = lk
            .entries()
            .filter(|e| !exclude.contains(&e.core.id) && (e.moving || e.core.uses_for_waiter() > 0))
            .map(|e| e.res().charge(&e.core, loc))
            .sum();
        let view =
            PoolView { budget: p.budget, used: p.used(), physical, busy, disk_free: lk.free(Location::Disk) };
        policy::room(view, need, self.candidates(lk, loc, exclude, failed))
    }

    /// Claims victims for eviction from `from`: each is marked moving with the
    /// disk bytes its write needs reserved; any that stopped being evictable
    /// (a guard arrived first) is skipped.
    fn claim<'a>(&'a self, lk: &mut Locked<'a>, ids: &[u64], from: Location) -> Vec<Claim<'a>> {
        let mut claims = Vec::new();
        for &id in ids {
            let Some(e) = lk.get(id) else { continue };
            let (c, r) = (e.core.clone(), e.res());
            if e.moving || c.uses_for_waiter() > 0 {
                continue;
            }
            let present = match from {
                Location::Cuda(_) => r.dev && c.runtime() == from,
                Location::Cpu => r.host,
                Location::Disk => false,
            };
            if !present {
                continue;
            }
            let from_runtime = from == c.runtime();
            let drop_dev = r.dev;
            let mut spill = from == Location::Cpu || c.offload == Location::Disk;
            let (mut rewrite, mut write) = if spill { disk_write(&c, r) } else { (false, 0) };
            if from_runtime && from != Location::Cpu && spill && write > lk.free(Location::Disk) {
                // Optional second step of a GPU eviction: only if the disk has room.
                (spill, rewrite, write) = (false, false, 0);
            }
            if write > lk.free(Location::Disk) || (spill && lk.pool(Location::Disk).is_none()) {
                continue; // nowhere to put it (the policy filters these; direct callers may not)
            }
            // Leaving the runtime location: no guard may exist or start (see the module docs).
            let leaves_runtime = r.on_runtime(&c) && (drop_dev || (c.runtime() == Location::Cpu && spill));
            if leaves_runtime && c.state.compare_exchange(READY, 0, SeqCst, SeqCst).is_err() {
                continue; // a guard arrived first
            }
            // The disk bytes of the write are reserved while it runs.
            let disk = if rewrite { Some(r.disk.unwrap_or(0) + write) } else { r.disk };
            let mut to = r;
            to.disk = disk;
            let reservation = Reservation::take(lk, c, to, leaves_runtime);
            claims.push(Claim {
                reservation,
                job: EvictJob {
                    drop_dev,
                    spill,
                    write: rewrite,
                    leaves_runtime,
                    cause: if from_runtime { "evict" } else { "spill" },
                },
                disk,
            });
        }
        claims
    }

    /// Runs claimed evictions without the lock, then publishes their results.
    /// Returns the victims that could not leave, with why.
    fn run_evictions<'a>(&'a self, lk: &mut Locked<'a>, claims: Vec<Claim<'a>>) -> Vec<(u64, Error)> {
        if claims.is_empty() {
            return Vec::new();
        }
        let results: Vec<(Result<()>, bool)> = lk.unlocked(|| {
            claims
                .iter()
                .map(|cl| {
                    let c = &cl.reservation.core;
                    let dropped = Cell::new(false);
                    let mut d = c.data.lock();
                    let r = unwind_safe(&c.name, || {
                        self.transfer.evict(c, &mut d, &cl.job, &dropped, &self.counters)
                    });
                    (r, dropped.get())
                })
                .collect()
        });
        let mut failed = Vec::new();
        for (cl, (res, dropped)) in claims.into_iter().zip(results) {
            let c = cl.reservation.core.clone();
            let before = cl.reservation.before;
            let was_runtime = before.on_runtime(&c);
            let mut to = before;
            if cl.job.leaves_runtime {
                to.patch = 0; // the patches were dropped first, whatever followed
            }
            match res {
                Ok(()) => {
                    self.counters.evictions.fetch_add(1, Relaxed);
                    if cl.job.drop_dev {
                        to.dev = false;
                    }
                    if cl.job.spill {
                        to.host = false;
                        to.pinned = 0;
                        to.disk = cl.disk;
                    }
                    cl.reservation.publish(lk, to);
                    let (kind, from) = if was_runtime {
                        (EventKind::Offloaded, c.runtime())
                    } else {
                        (EventKind::Spilled, Location::Cpu)
                    };
                    let dest = if cl.job.spill { Location::Disk } else { Location::Cpu };
                    self.emit(&c, kind, Some(from), Some(dest));
                }
                Err(err) => {
                    // Either the device copy is intact (the failure came first) or it was
                    // dropped and the model is whole in host memory; the disk write did not
                    // complete (the previous file, if any, is intact).
                    if cl.job.drop_dev && before.dev && dropped {
                        to.dev = false;
                        self.emit(&c, EventKind::Offloaded, Some(c.runtime()), Some(Location::Cpu));
                    }
                    cl.reservation.publish(lk, to);
                    if to.on_runtime(&c) && cl.job.leaves_runtime {
                        c.state.fetch_or(READY, SeqCst); // still resident on its runtime location
                    }
                    tracing::warn!(model = %c.name, error = %err, "eviction failed; the model stays where it was");
                    failed.push((c.id, err));
                }
            }
        }
        failed
    }

    // ----------------------------------------------------------------- commits

    /// Sets the bytes of commit patch buffers charged to the model's runtime pool,
    /// making room by evicting idle models, or waiting, when it grows. The caller
    /// holds a use of the model, so it is resident and stays. Never called with
    /// the model's data lock held.
    pub(crate) fn set_patch_bytes(&self, core: &ModelCore, bytes: u64, wait: Wait) -> Result<()> {
        let _counted = self.signal.count();
        let mut lk = self.lock();
        let loc = core.runtime();
        let mut failed = Vec::new();
        loop {
            let have = lk.res(core.id).patch;
            if bytes <= have {
                lk.update(core.id, |r| r.patch = bytes);
                return Ok(());
            }
            let need = bytes - have;
            self.reclaim_spares(&mut lk, loc, need);
            match self.room(&mut lk, loc, need, &[core.id], &failed, None) {
                Room::Free => {
                    lk.update(core.id, |r| r.patch = bytes);
                    return Ok(());
                }
                Room::Evict(victims) => {
                    let claims = self.claim(&mut lk, &victims, loc);
                    failed.extend(self.run_evictions(&mut lk, claims).into_iter().map(|(id, _)| id));
                }
                Room::Wait => {
                    if let Err(g) = lk.wait(wait) {
                        return Err(self.gave_up(&lk, g, core, loc, need));
                    }
                }
                Room::TooLarge | Room::Full => return Err(self.oom(&lk, core, loc, need, None)),
            }
        }
    }

    /// Grows the patch bytes charged for `core` to `bytes` only if the pool
    /// has that room free now (no eviction, no wait): for optional buffers.
    /// Safe to call with the model's data lock held (it never waits).
    pub(crate) fn try_grow_patch_bytes(&self, core: &ModelCore, bytes: u64) -> bool {
        let mut lk = self.lock();
        let have = lk.res(core.id).patch;
        if bytes <= have {
            return true;
        }
        if lk.free(core.runtime()) >= bytes - have {
            lk.update(core.id, |r| r.patch = bytes);
            true
        } else {
            false
        }
    }

    /// Shrinks (or keeps) the patch bytes charged for `core` to `bytes`.
    /// Never waits; safe with the model's data lock held.
    pub(crate) fn shrink_patch_bytes(&self, core: &ModelCore, bytes: u64) {
        let mut lk = self.lock();
        if bytes < lk.res(core.id).patch {
            lk.update(core.id, |r| r.patch = bytes);
        }
    }

    /// The patch bytes charged for `core`.
    pub(crate) fn patch_bytes(&self, core: &ModelCore) -> u64 {
        self.lock().get(core.id).map_or(0, |e| e.res().patch)
    }

    /// Frees the spare patch buffers of models running on `loc` (least recently
    /// used first) until `need` bytes are free there or none are left: spares
    /// are a cache, given up before any model is evicted. A spare is never what
    /// a weight points at, so this is safe even while guards are alive; a model
    /// whose weights are locked (a rebase under way) is skipped.
    fn reclaim_spares(&self, lk: &mut Locked<'_>, loc: Location, need: u64) {
        if lk.free(loc) >= need {
            return;
        }
        let mut cands: Vec<(u64, Arc<ModelCore>)> = lk
            .entries()
            .filter(|e| e.res().patch > 0 && e.res().on_runtime(&e.core) && e.core.runtime() == loc)
            .map(|e| (e.core.last_used.load(Relaxed), e.core.clone()))
            .collect();
        cands.sort_unstable_by_key(|(t, _)| *t);
        for (_, c) in cands {
            if lk.free(loc) >= need {
                break;
            }
            let Some(hooks) = c.patch_hooks() else { continue };
            let Some(d) = c.data.try_lock() else { continue };
            let freed = hooks.drop_spares(&d.groups);
            drop(d);
            if freed > 0 {
                lk.update(c.id, |r| r.patch -= freed.min(r.patch));
                tracing::debug!(model = %c.name, freed, "dropped spare patch buffers to make room");
            }
        }
    }

    // ----------------------------------------------------------------- notification and events

    /// Queues an event for the listener. Called under the lock, so the queue is
    /// in publication order (lock order: ledger, then `events`).
    fn emit(&self, core: &ModelCore, kind: EventKind, from: Option<Location>, to: Option<Location>) {
        if self.listener.is_some() {
            self.events.lock().push(Event {
                model: core.name.clone(),
                kind,
                from,
                to,
                bytes: core.bytes,
                runtime: core.runtime(),
            });
        }
    }

    /// Hands queued events to the listener, in order. Called without the lock.
    /// If another thread is delivering, it also delivers ours (it checks the
    /// queue again after giving up its turn); a listener that calls back into
    /// the engine queues its events behind the current batch. A panicking
    /// listener is logged, not propagated.
    fn deliver(&self) {
        let Some(listener) = &self.listener else { return };
        loop {
            let Some(turn) = self.delivering.try_lock() else { return };
            let batch = std::mem::take(&mut *self.events.lock());
            for e in &batch {
                let call = std::panic::AssertUnwindSafe(|| (listener.0)(e));
                if std::panic::catch_unwind(call).is_err() {
                    tracing::warn!(event = %e, "the event listener panicked");
                }
            }
            drop(turn);
            if self.events.lock().is_empty() {
                return;
            }
        }
    }

    /// Callers in the slow path now: loading, or waiting for room or for a move.
    pub(crate) fn waiting(&self) -> usize {
        self.signal.waiting()
    }

    // ----------------------------------------------------------------- observation

    pub(crate) fn stats(&self) -> Stats {
        let lk = self.lock();
        let pools = lk
            .pools()
            .iter()
            .map(|p| {
                let mut residents: Vec<Resident> = lk
                    .entries()
                    .filter(|e| e.res().present(&e.core, p.location))
                    .map(|e| Resident {
                        name: e.core.name.clone(),
                        bytes: e.res().charge(&e.core, p.location),
                        in_use: e.core.uses(),
                        moving: e.moving,
                        last_used: e.core.last_used.load(Relaxed),
                    })
                    .collect();
                residents.sort_by_key(|r| std::cmp::Reverse(r.last_used));
                PoolStats { location: p.location, budget: p.budget, used: p.used(), residents }
            })
            .collect();
        let hits = lk.entries().map(|e| e.core.hits.load(Relaxed)).sum::<u64>()
            + self.counters.retired_hits.load(Relaxed);
        let pinned = lk.pinned();
        drop(lk);
        let mut stats = self.counters.snapshot(pools, hits, pinned);
        stats.waiting = self.waiting() as u64;
        stats
    }

    /// Where a model's weights are now: its runtime location if resident, else host, else disk.
    pub(crate) fn location_of(&self, core: &ModelCore) -> Location {
        self.lock().get(core.id).map_or(Location::Disk, |e| e.res().location(core))
    }

    /// The ledger's invariants (tests).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        if let Err(e) = self.lock().verify() {
            panic!("{e}");
        }
    }
}

/// Whether spilling `c` must write its file (it has no disk copy, or its
/// weights were written since), and the disk bytes that write newly takes: its
/// size, unless it rewrites a spill file of its own in place (a source file is
/// never overwritten: the new copy goes to the spill directory).
fn disk_write(c: &ModelCore, r: Residency) -> (bool, u64) {
    let stale = match r.disk {
        None => true,
        // A model whose data is locked right now counts as written.
        Some(_) => c.data.try_lock().is_none_or(|d| d.dirty_since_disk()),
    };
    match r.disk {
        _ if !stale => (false, 0),
        None | Some(0) => (true, c.bytes),
        Some(_) => (true, 0),
    }
}

/// The CUDA pool with the most free budget (the lowest index on a tie).
fn most_free_cuda(lk: &Ledger) -> Option<Location> {
    lk.pools()
        .iter()
        .filter(|p| matches!(p.location, Location::Cuda(_)))
        .max_by_key(|p| (p.free(), std::cmp::Reverse(p.location)))
        .map(|p| p.location)
}

/// The name of a batch of models, for errors.
fn batch_name(cores: &[Arc<ModelCore>]) -> String {
    cores.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(" + ")
}

impl Error {
    /// Renames the model an `OutOfMemory` error is about (a batch's name).
    fn named(mut self, name: String) -> Error {
        if let Error::OutOfMemory { model, .. } = &mut self {
            *model = name;
        }
        self
    }
}

#[cfg(test)]
mod tests;
