//! The engine: pools, the model registry, LRU eviction and the moves themselves.
//!
//! # Protocol
//!
//! Every model has an atomic word `state`: a `READY` bit (the weights are on the
//! runtime location and may be used) and a use count (live guards). A guard on a
//! ready model is one compare-and-swap that increments the count, with no lock.
//!
//! Everything else happens under the manager's one mutex (`State`): pool
//! accounting, the per-model residency flags and the `moving` flag. A thread that
//! wants to move a model marks it `moving` under the lock, releases the lock,
//! moves the bytes, and takes the lock again to publish the result. To evict a
//! model, the evictor swaps `state` from exactly `READY` (ready, no guards) to 0
//! under the lock: that fails if any guard is alive, and once it succeeds no new
//! guard can start without going through the lock.
//!
//! Threads in the slow path count themselves in `waiters` *before* they look
//! for room, and read each model's use count with a read-modify-write; a guard
//! that drops the last use of a model checks `waiters` after its decrement and,
//! if anyone is there, notifies under the lock. The release's decrement reads
//! from the waiter's read-modify-write, so the waiter's increment is visible to
//! it: a waiter cannot miss the release it waits for. `loom/` model-checks this.
//!
//! Async waiters (the `tokio` feature) follow the same rule: they stay counted
//! in `waiters` (`Waiting`) from before their first attempt until they give up,
//! create their wake-up listener before each attempt, and run each attempt
//! (`Inner::poll_acquire`, which never blocks on the condition variable) on the
//! blocking pool. Every `notify` wakes both kinds of waiters.
//!
//! Events for the [listener](crate::Builder::listener) are queued under the lock,
//! in publication order, and delivered in that order after the lock is released
//! (`Inner::deliver`, called by each entry point that can move bytes).

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use tch::{Device, Kind, Tensor};

use crate::error::panic_message;
use crate::events::{Event, EventKind, Listener};
use crate::options::{ManageOptions, OffloadPolicy};
use crate::stats::{Counters, PoolStats, Resident, Stats};
use crate::user::{self, Group, ResourceUser};
use crate::tier::{cuda, spill};
use crate::{Error, Location, Result};

/// Set in `ModelCore::state` while the weights are usable on the runtime location.
pub(crate) const READY: u64 = 1 << 63;
const USES: u64 = READY - 1;

/// The non-generic part of a managed model, shared by its handles and the registry.
pub(crate) struct ModelCore {
    pub id: u64,
    pub name: String,
    /// Bytes of the weights (each aliased storage once).
    pub bytes: u64,
    /// Where the model runs, encoded (see `encode`); fixed unless `auto`, and
    /// then only changed by a load, under the lock, while the model is on no device.
    runtime: AtomicU32,
    /// Placed automatically: each load from host memory picks a CUDA pool.
    pub auto: bool,
    pub offload: Location,
    pub policy: OffloadPolicy,
    pub reserve: u64,
    state: AtomicU64,
    last_used: AtomicU64,
    hits: AtomicU64,
    /// Bytes of commit patch buffers charged to the runtime pool (`commit.rs`);
    /// changed only under the manager's lock.
    patch_bytes: AtomicU64,
    /// Locked by the thread that marked the model `moving`, and by commit rebases
    /// while a guard holds the model (so no move is under way).
    data: Mutex<ModelData>,
}

struct ModelData {
    groups: Vec<Group>,
    /// Host copies while the model is on a CUDA device, one per group.
    homes: Vec<Tensor>,
    /// Version counters of the device copies when they were made (dirty check).
    dev_versions: Vec<i64>,
    /// Version counters of the host copies when the disk copy was last in sync.
    disk_versions: Vec<i64>,
    spill_path: Option<PathBuf>,
    /// A safetensors file the weights came from: a clean model reloads from it.
    source: Option<PathBuf>,
    /// The home copy of a CUDA model packed into one host buffer (pinned when
    /// `Entry::pinned` is set), every group a view into it: a load is then one
    /// large copy. `None` for CPU models and while the weights are on disk.
    pack: Option<Tensor>,
    /// Commit patches on the runtime copy (`commit.rs`).
    patches: crate::patch::commit::Patches,
}

const CPU_CODE: u32 = u32::MAX;

fn encode(loc: Location) -> u32 {
    match loc {
        Location::Cuda(i) => i as u32,
        _ => CPU_CODE,
    }
}

impl ModelCore {
    /// Where the model runs while guarded (stable while any guard is alive).
    #[inline]
    pub(crate) fn runtime(&self) -> Location {
        match self.runtime.load(Acquire) {
            CPU_CODE => Location::Cpu,
            i => Location::Cuda(i as usize),
        }
    }

    /// The `tch` device of [`ModelCore::runtime`].
    #[inline]
    pub(crate) fn device(&self) -> Device {
        match self.runtime.load(Acquire) {
            CPU_CODE => Device::Cpu,
            i => Device::Cuda(i as usize),
        }
    }

    /// The hit path: one use more if the model is ready.
    #[inline]
    pub(crate) fn try_hit(&self, clock: &AtomicU64) -> bool {
        let mut s = self.state.load(Acquire);
        while s & READY != 0 {
            match self.state.compare_exchange_weak(s, s + 1, SeqCst, Acquire) {
                Ok(_) => {
                    self.last_used.store(clock.fetch_add(1, Relaxed), Relaxed);
                    self.hits.fetch_add(1, Relaxed);
                    return true;
                }
                Err(x) => s = x,
            }
        }
        false
    }

    pub(crate) fn uses(&self) -> u64 {
        self.state.load(SeqCst) & USES
    }

    /// The use count, read by a thread that may wait for this model's release.
    /// A read-modify-write, not a load: a later `release` then reads from it, so
    /// the reader's earlier `waiters` increment is visible to that release
    /// (no lost wake-up even under acquire/release alone; see `loom/`).
    fn uses_for_waiter(&self) -> u64 {
        self.state.fetch_add(0, SeqCst) & USES
    }

    fn is_ready(&self) -> bool {
        self.state.load(SeqCst) & READY != 0
    }

    /// Bytes of commit patch buffers charged to the runtime pool.
    fn patch_bytes(&self) -> u64 {
        self.patch_bytes.load(Relaxed)
    }

    /// Runs `f` on the weights and their commit patches (`commit.rs`). Only
    /// while holding a use of the model (no move can be under way), or to read
    /// the inventory's names and shapes.
    pub(crate) fn with_weights<R>(
        &self,
        f: impl FnOnce(&mut [Group], &mut crate::patch::commit::Patches) -> R,
    ) -> R {
        let mut d = self.data.lock();
        let d = &mut *d;
        f(&mut d.groups, &mut d.patches)
    }
}

/// Residency of one model, guarded by the manager's lock.
struct Entry {
    core: Arc<ModelCore>,
    /// Weights on the runtime CUDA device.
    dev: bool,
    /// Weights (or, for a CUDA model, its home copy) in host memory.
    host: bool,
    /// A valid copy on disk, and what it costs the disk pool (0 for a source file).
    disk: Option<u64>,
    moving: bool,
    /// Bytes of the host copy held in pinned memory (0: pageable or absent).
    pinned: u64,
}

impl Entry {
    fn runtime_resident(&self) -> bool {
        match self.core.runtime() {
            Location::Cpu => self.host,
            _ => self.dev,
        }
    }

    /// Where the weights are: the runtime location if resident there, else host, else disk.
    fn location(&self) -> Location {
        if self.runtime_resident() {
            self.core.runtime()
        } else if self.host {
            Location::Cpu
        } else {
            Location::Disk
        }
    }

    /// Bytes this model holds in `loc`'s pool.
    fn charge(&self, loc: Location) -> u64 {
        let c = &self.core;
        match loc {
            Location::Cuda(_) if self.dev && c.runtime() == loc => c.bytes + c.reserve + c.patch_bytes(),
            Location::Cpu if self.host => {
                if c.runtime() == Location::Cpu {
                    c.bytes + c.reserve + c.patch_bytes()
                } else {
                    c.bytes
                }
            }
            Location::Disk => self.disk.unwrap_or(0),
            _ => 0,
        }
    }
}

struct Pool {
    location: Location,
    budget: u64,
    used: u64,
}

struct State {
    pools: Vec<Pool>,
    models: HashMap<u64, Entry>,
    /// Pinned host bytes allowed and held (home copies of CUDA models).
    pinned_cap: u64,
    pinned_used: u64,
}

impl State {
    fn pool(&mut self, loc: Location) -> &mut Pool {
        self.pools.iter_mut().find(|p| p.location == loc).expect("pool exists")
    }

    fn pool_ref(&self, loc: Location) -> Option<&Pool> {
        self.pools.iter().find(|p| p.location == loc)
    }

    /// Pinned bytes to reserve for a home copy of `core` about to enter host
    /// memory: all of it if the cap allows, else none (it stays pageable).
    fn reserve_pinned(&mut self, pin: Pinning, core: &ModelCore) -> u64 {
        if pin == Pinning::Off || core.runtime() == Location::Cpu || core.bytes == 0 {
            return 0;
        }
        if self.pinned_used + core.bytes > self.pinned_cap {
            return 0;
        }
        self.pinned_used += core.bytes;
        core.bytes
    }

    /// The CUDA pool with the most free budget (the lowest index on a tie).
    fn most_free_cuda(&self) -> Option<Location> {
        self.pools
            .iter()
            .filter(|p| matches!(p.location, Location::Cuda(_)))
            .max_by_key(|p| (p.budget - p.used, std::cmp::Reverse(p.location)))
            .map(|p| p.location)
    }

    /// Where a model placed automatically runs next: the device it is
    /// resident on, else the CUDA pool with the most free budget.
    fn place(&self, e: &Entry) -> Location {
        let now = e.core.runtime();
        if !e.core.auto || now == Location::Cpu || e.dev || e.moving {
            return now;
        }
        self.most_free_cuda().unwrap_or(now)
    }

    fn free(&self, loc: Location) -> u64 {
        self.pool_ref(loc).map_or(0, |p| p.budget - p.used)
    }

    fn add(&mut self, loc: Location, bytes: u64) {
        let p = self.pool(loc);
        p.used += bytes;
        debug_assert!(p.used <= p.budget, "{loc} over budget");
    }

    fn sub(&mut self, loc: Location, bytes: u64) {
        let p = self.pool(loc);
        p.used -= bytes;
    }
}

/// What an eviction does to one victim.
struct Eviction {
    core: Arc<ModelCore>,
    /// Drop the CUDA copy (pointing the tensors back at the home copy).
    drop_dev: bool,
    /// Release the host copy, writing it to disk first unless the disk copy is valid.
    spill: bool,
    /// Disk bytes reserved for a write (0: no write needed).
    write: u64,
    /// Why, for logs.
    cause: &'static str,
}

impl Eviction {
    /// Whether the model leaves its runtime location (its commit patches are dropped).
    fn leaves_runtime(&self) -> bool {
        self.drop_dev || (self.core.runtime() == Location::Cpu && self.spill)
    }
}

/// What a load must do.
struct Load {
    host: bool,
    dev: bool,
    /// The home copy read from disk goes to pinned memory.
    pin: bool,
}

/// Outcome of looking for room in one pool.
enum Room {
    Free,
    Evict(Vec<u64>),
    Wait,
    TooLarge,
    Full,
}

/// How long a call may wait for room.
#[derive(Clone, Copy)]
pub(crate) enum Wait<'a> {
    No,
    Until(Instant, Duration),
    /// Never wait; set the flag when the call fails because it would have to
    /// (the async layer then awaits a notification instead).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Poll(&'a Cell<bool>),
}

/// Fault-injection points (only armed by unit tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum FailAt {
    /// While copying weights toward the runtime location (after some groups).
    Load,
    /// While writing a spill file.
    Spill,
    /// While copying device-written weights back to the home copy.
    CopyBack,
    /// A panic (as tch raises them) while loading weights.
    PanicInLoad,
}

/// How home copies of CUDA models are allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pinning {
    /// Pageable memory (no CUDA device).
    Off,
    /// Page-locked memory, for asynchronous copies at full bandwidth.
    Cuda,
    /// Pageable memory accounted as pinned: tests of the cap without a GPU.
    #[cfg_attr(not(test), allow(dead_code))]
    Simulated,
}

/// Reads a CUDA device's physical state: (driver free bytes, bytes the caching
/// allocator holds but no tensor uses). `None` when it cannot be read.
pub(crate) type CudaProbe = Arc<dyn Fn(usize) -> Option<(u64, u64)> + Send + Sync>;

/// Bytes kept physically free on a CUDA device beyond a load (CUDA context
/// growth, cuBLAS workspaces, the first activations).
pub(crate) const CUDA_HEADROOM: u64 = 256 << 20;

pub(crate) struct Inner {
    state: Mutex<State>,
    pin: Pinning,
    /// What the device really has free: budgets alone do not see other
    /// processes, activations, or the allocator's cache.
    cuda_probe: Option<CudaProbe>,
    cuda_headroom: u64,
    /// Releases the caching allocator's idle blocks to the driver.
    empty_cache: Option<Arc<dyn Fn() + Send + Sync>>,
    cond: Condvar,
    waiters: AtomicUsize,
    clock: AtomicU64,
    next_id: AtomicU64,
    pub(crate) spill_dir: Option<PathBuf>,
    pub(crate) wait_timeout: Duration,
    pub(crate) counters: Counters,
    #[cfg(test)]
    fail: Mutex<Option<FailAt>>,
    /// Wakes async waiters; fired with the condition variable (`notify`).
    #[cfg(feature = "tokio")]
    pub(crate) notify_async: tokio::sync::Notify,
    /// The observer set by `Builder::listener`.
    pub(crate) listener: Option<Listener>,
    /// Events published but not yet delivered (pushed under `state`).
    events: Mutex<Vec<Event>>,
    /// Held by the thread delivering events (keeps them in order).
    delivering: Mutex<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(dir) = &self.spill_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Inner {
    pub(crate) fn new(pools: Vec<(Location, u64)>, spill_dir: Option<PathBuf>, wait: Duration) -> Self {
        Inner {
            state: Mutex::new(State {
                pools: pools
                    .into_iter()
                    .map(|(location, budget)| Pool { location, budget, used: 0 })
                    .collect(),
                models: HashMap::new(),
                pinned_cap: 0,
                pinned_used: 0,
            }),
            pin: Pinning::Off,
            cuda_probe: None,
            cuda_headroom: CUDA_HEADROOM,
            empty_cache: None,
            cond: Condvar::new(),
            waiters: AtomicUsize::new(0),
            clock: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            spill_dir,
            wait_timeout: wait,
            counters: Counters::default(),
            #[cfg(test)]
            fail: Mutex::new(None),
            #[cfg(feature = "tokio")]
            notify_async: tokio::sync::Notify::new(),
            listener: None,
            events: Mutex::new(Vec::new()),
            delivering: Mutex::new(()),
        }
    }

    /// Sets how home copies of CUDA models are allocated, and the cap on pinned bytes.
    pub(crate) fn with_pinning(mut self, pin: Pinning, cap: u64) -> Self {
        self.pin = pin;
        self.state.get_mut().pinned_cap = cap;
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

    /// After evictions from a CUDA pool: if the driver itself is short of
    /// `need` (the freed blocks sit in the caching allocator, where other
    /// processes cannot use them and a large packed allocation may not fit),
    /// gives the allocator's idle blocks back to the driver.
    fn release_cache_if_short(&self, loc: Location, need: u64) {
        let (Location::Cuda(i), Some(probe), Some(empty)) = (loc, &self.cuda_probe, &self.empty_cache) else {
            return;
        };
        if probe(i).is_some_and(|(free, idle)| idle > 0 && free < need + self.cuda_headroom) {
            empty();
            self.counters.cache_releases.fetch_add(1, Relaxed);
        }
    }

    /// Bytes a load may still take in `loc` physically, if that can be known.
    fn physical_free(&self, loc: Location) -> Option<u64> {
        let (Location::Cuda(i), Some(probe)) = (loc, &self.cuda_probe) else { return None };
        let (free, idle) = probe(i)?;
        Some((free + idle).saturating_sub(self.cuda_headroom))
    }

    pub(crate) fn pools(&self) -> Vec<(Location, u64)> {
        self.state.lock().pools.iter().map(|p| (p.location, p.budget)).collect()
    }

    #[cfg(test)]
    pub(crate) fn fail_next(&self, at: FailAt) {
        *self.fail.lock() = Some(at);
    }

    #[cfg(test)]
    fn failpoint(&self, at: FailAt) -> Result<()> {
        let mut f = self.fail.lock();
        if *f == Some(at) {
            *f = None;
            return Err(Error::Io(std::io::Error::other(format!("injected failure at {at:?}"))));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn failpoint(&self, _: FailAt) -> Result<()> {
        Ok(())
    }

    // ----------------------------------------------------------------- host memory

    /// A byte buffer in host memory, pinned if asked and possible; tells
    /// whether it is pinned (pinning can fail, e.g. under a memlock limit:
    /// the buffer is then pageable and still correct).
    fn alloc_host(&self, bytes: usize, pin: bool) -> Result<(Tensor, bool)> {
        if pin && self.pin == Pinning::Cuda {
            match cuda::empty_pinned(&[bytes as i64], Kind::Uint8) {
                Ok(p) => return Ok((p, true)),
                Err(e) => tracing::warn!(bytes, error = %e, "pinning failed; the home copy stays pageable"),
            }
        }
        let t = Tensor::f_empty([bytes as i64], (Kind::Uint8, Device::Cpu))?;
        Ok((t, pin && self.pin == Pinning::Simulated))
    }

    /// Copies the model's weights into one packed host buffer (pinned if
    /// asked and possible) and points the tensors at it. Tells whether it is pinned.
    fn pack_home(&self, d: &mut ModelData, pin: bool) -> Result<bool> {
        let (offsets, total) = pack_layout(&d.groups);
        let (flat, pinned) = self.alloc_host(total, pin)?;
        let views = d
            .groups
            .iter()
            .zip(offsets)
            .map(|(g, o)| {
                let mut v = pack_view(&flat, o, g.kind, &g.shape, g.bytes)?;
                if g.bytes > 0 {
                    v.f_copy_(g.current())?;
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>>>()?;
        for (g, v) in d.groups.iter_mut().zip(&views) {
            g.set_data(v);
        }
        d.pack = Some(flat);
        Ok(pinned)
    }

    // ----------------------------------------------------------------- registration

    pub(crate) fn register<T: ResourceUser>(&self, model: &T, opts: ManageOptions) -> Result<Arc<ModelCore>> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let name = opts.name.clone().unwrap_or_else(|| {
            let t = std::any::type_name::<T>();
            format!("{}#{id}", t.rsplit("::").next().unwrap_or(t))
        });
        let mut inv = user::inventory(&name, model.tensors())?;
        let invalid = |reason: String| Error::InvalidOptions { model: name.clone(), reason };
        let (runtime, offload) = {
            let st = self.state.lock();
            let cudas: Vec<&Pool> =
                st.pools.iter().filter(|p| matches!(p.location, Location::Cuda(_))).collect();
            let runtime = match opts.runtime {
                None => st.most_free_cuda().unwrap_or(Location::Cpu),
                Some(Location::Disk) => {
                    return Err(invalid("the runtime location cannot be the disk".into()))
                }
                Some(loc @ Location::Cuda(_)) if st.pool_ref(loc).is_none() => {
                    return Err(Error::UnknownDevice { location: loc, available: cudas.len() })
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
                Location::Disk if st.pool_ref(Location::Disk).is_none() => {
                    return Err(invalid(
                        "offload to disk needs a spill directory (none is configured)".into(),
                    ))
                }
                _ => {}
            }
            (runtime, offload)
        };
        // Weights start in host memory: that copy is the model's home.
        if inv.device != Device::Cpu {
            let _ = Location::from_device(inv.device)
                .ok_or_else(|| invalid(format!("unsupported device {:?}", inv.device)))?;
            for g in &mut inv.groups {
                let host = g.current().to_device(Device::Cpu);
                g.set_data(&host);
            }
        }
        let source = user::source_of(model as &dyn std::any::Any);
        let n = inv.groups.len();
        let core = Arc::new(ModelCore {
            id,
            name,
            bytes: inv.bytes,
            runtime: AtomicU32::new(encode(runtime)),
            auto: opts.runtime.is_none(),
            offload,
            policy: opts.policy,
            reserve: opts.reserve,
            state: AtomicU64::new(0),
            last_used: AtomicU64::new(self.clock.fetch_add(1, Relaxed)),
            hits: AtomicU64::new(0),
            patch_bytes: AtomicU64::new(0),
            data: Mutex::new(ModelData {
                groups: inv.groups,
                homes: Vec::new(),
                dev_versions: Vec::new(),
                disk_versions: vec![0; n],
                spill_path: self.spill_dir.as_ref().map(|d| d.join(format!("{id}.safetensors"))),
                source,
                pack: None,
                patches: Default::default(),
            }),
        });
        {
            let mut d = core.data.lock();
            d.disk_versions = d.groups.iter().map(|g| g.current().internal_version()).collect();
        }
        let admitted = self.admit(&core);
        self.deliver();
        if let Some(pinned) = admitted? {
            // A CUDA model's home is packed into one buffer, pinned within the
            // cap, while the model is marked moving.
            let mut d = core.data.lock();
            let res = unwind_safe(&core.name, || self.pack_home(&mut d, pinned > 0));
            if let Err(e) = &res {
                tracing::warn!(model = %core.name, error = %e, "could not pack the home copy; it stays as it was");
            }
            d.disk_versions = d.groups.iter().map(|g| g.current().internal_version()).collect();
            drop(d);
            let mut st = self.state.lock();
            let e = st.models.get_mut(&core.id).expect("registered");
            e.moving = false;
            if pinned > 0 && !matches!(res, Ok(true)) {
                e.pinned = 0;
                st.pinned_used -= pinned;
            }
            drop(st);
            self.notify();
        }
        Ok(core)
    }

    /// Accounts a new model's host bytes, making room (or spilling the model
    /// itself straight to disk) so that the host pool stays within budget.
    /// For a CUDA model admitted to host memory, returns the pinned bytes
    /// reserved for its home copy, with the model marked moving: the caller
    /// packs the home and clears the flag.
    fn admit(&self, core: &Arc<ModelCore>) -> Result<Option<u64>> {
        let need = if core.runtime() == Location::Cpu { core.bytes + core.reserve } else { core.bytes };
        // A model read from a safetensors file already has a clean copy on disk.
        let disk = core.data.lock().source.as_ref().map(|_| 0);
        let mut st = self.state.lock();
        loop {
            self.reclaim_spares(&mut st, Location::Cpu, need);
            match self.room(&st, Location::Cpu, need, &[core.id]) {
                Room::Free => {
                    st.add(Location::Cpu, need);
                    let pinned = st.reserve_pinned(self.pin, core);
                    let cuda = core.runtime() != Location::Cpu;
                    st.models.insert(
                        core.id,
                        Entry { core: core.clone(), dev: false, host: true, disk, moving: cuda, pinned },
                    );
                    if !cuda {
                        core.state.store(READY, SeqCst);
                    }
                    self.emit(core, EventKind::Registered, None, Some(Location::Cpu));
                    return Ok(cuda.then_some(pinned));
                }
                Room::Evict(victims) => {
                    let jobs = self.claim_all(&mut st, &victims, Location::Cpu);
                    st = self.run_evictions(st, jobs)?;
                }
                _ => break,
            }
        }
        // No room in host memory: the new model goes straight to disk.
        let write = if disk.is_some() { 0 } else { core.bytes };
        if write > st.free(Location::Disk) || st.pool_ref(Location::Disk).is_none() {
            let p = st.pool_ref(Location::Cpu).expect("cpu pool");
            return Err(Error::OutOfMemory {
                model: core.name.clone(),
                location: Location::Cpu,
                requested: need,
                budget: p.budget,
                in_use: p.used,
                waited: None,
            });
        }
        // Not counted in the host pool: it leaves host memory as soon as it is written.
        st.models.insert(
            core.id,
            Entry { core: core.clone(), dev: false, host: false, disk: Some(write), moving: true, pinned: 0 },
        );
        st.add(Location::Disk, write);
        // The host bytes are outside the pool until the write completes, then gone.
        let job = Eviction { core: core.clone(), drop_dev: false, spill: true, write, cause: "admit" };
        drop(st);
        let res = unwind_safe(&core.name, || self.evict_bytes(&job, &Cell::new(false)));
        let mut st = self.state.lock();
        let e = st.models.get_mut(&core.id).expect("registered");
        e.moving = false;
        match res {
            Ok(()) => {
                self.emit(core, EventKind::Registered, None, Some(Location::Disk));
                drop(st);
                self.notify();
                Ok(None)
            }
            Err(err) => {
                st.models.remove(&core.id);
                st.sub(Location::Disk, write);
                drop(st);
                self.notify();
                Err(err)
            }
        }
    }

    /// Removes a model whose last handle was dropped.
    pub(crate) fn unregister(&self, core: &ModelCore) {
        let mut st = self.state.lock();
        while st.models.get(&core.id).is_some_and(|e| e.moving) {
            self.cond.wait(&mut st);
        }
        if let Some(e) = st.models.remove(&core.id) {
            self.emit(core, EventKind::Unregistered, Some(e.location()), None);
            st.pinned_used -= e.pinned;
            let mut locs = vec![Location::Cpu, Location::Disk];
            if core.runtime() != Location::Cpu {
                locs.push(core.runtime());
            }
            for loc in locs {
                let c = e.charge(loc);
                if c > 0 {
                    st.sub(loc, c);
                }
            }
            if e.disk.is_some_and(|c| c > 0) {
                if let Some(p) = &core.data.lock().spill_path {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        drop(st);
        self.notify();
        self.deliver();
    }

    // ----------------------------------------------------------------- acquire

    /// Takes one use of the model, loading it first if needed. On `Ok` the
    /// caller owns one use and must call `release`.
    pub(crate) fn acquire(&self, core: &Arc<ModelCore>, wait: Wait) -> Result<()> {
        if core.try_hit(&self.clock) {
            return Ok(());
        }
        self.acquire_slow(std::slice::from_ref(core), wait)
    }

    /// Takes one use of each model (distinct models), loading together those
    /// that are not in place: room for all is made first, then every copy is
    /// issued and each device synchronised once. All or nothing: on `Err` no
    /// use is held.
    pub(crate) fn acquire_many(&self, cores: &[Arc<ModelCore>], wait: Wait) -> Result<()> {
        let mut hit = 0;
        while hit < cores.len() && cores[hit].try_hit(&self.clock) {
            hit += 1;
        }
        if hit == cores.len() {
            return Ok(());
        }
        // Holding some uses while waiting for room for the others could deadlock
        // two batches: give them back and take all of them under the lock.
        for c in &cores[..hit] {
            self.release(c);
        }
        self.acquire_slow(cores, wait)
    }

    fn acquire_slow(&self, cores: &[Arc<ModelCore>], wait: Wait) -> Result<()> {
        let mut st = self.state.lock();
        // Counted before looking for room: see the module docs.
        self.waiters.fetch_add(1, SeqCst);
        let res = self.acquire_locked(&mut st, cores, wait);
        self.waiters.fetch_sub(1, SeqCst);
        drop(st);
        self.deliver();
        res
    }

    /// One use if the model is ready (the hit path: no lock, no move).
    #[inline]
    #[cfg(feature = "tokio")]
    pub(crate) fn hit(&self, core: &ModelCore) -> bool {
        core.try_hit(&self.clock)
    }

    /// One attempt that never blocks on the condition variable (the async
    /// layer's): `Ok(None)` with one use taken (the caller must `release` it),
    /// `Ok(Some(err))` when it would have to wait (`err` is what giving up would
    /// report), `Err` for a failure that waiting cannot cure. It may move bytes:
    /// call it off the async executor. The caller stays counted in `waiters`
    /// (`Waiting`) across its attempts and its waits.
    #[cfg(feature = "tokio")]
    pub(crate) fn poll_acquire(&self, core: &Arc<ModelCore>) -> Result<Option<Error>> {
        let would_wait = Cell::new(false);
        match self.acquire(core, Wait::Poll(&would_wait)) {
            Ok(()) => Ok(None),
            Err(e) if would_wait.get() => Ok(Some(e)),
            Err(e) => Err(e),
        }
    }

    fn acquire_locked(
        &self,
        st: &mut MutexGuard<'_, State>,
        cores: &[Arc<ModelCore>],
        wait: Wait,
    ) -> Result<()> {
        let ids: Vec<u64> = cores.iter().map(|c| c.id).collect();
        'retry: loop {
            if let [core] = cores {
                if core.try_hit(&self.clock) {
                    return Ok(());
                }
            }
            // Under the lock a ready model stays ready (eviction needs the lock).
            let mut loads: Vec<(usize, Load)> = Vec::new();
            for (i, core) in cores.iter().enumerate() {
                let e = st
                    .models
                    .get(&core.id)
                    .ok_or_else(|| Error::ForeignModel { model: core.name.clone() })?;
                if e.moving {
                    self.wait(st, wait, core, core.runtime(), core.bytes)?;
                    continue 'retry;
                }
                if core.is_ready() {
                    continue;
                }
                debug_assert!(!e.runtime_resident() || core.runtime() != Location::Cpu);
                let place = st.place(e);
                if place != core.runtime() {
                    // On no device and not moving: no guard exists and none can start.
                    core.runtime.store(encode(place), Release);
                }
                let e = st.models.get(&core.id).expect("registered");
                let load = Load { host: !e.host, dev: core.runtime() != Location::Cpu && !e.dev, pin: false };
                loads.push((i, load));
            }
            // Room, pool by pool: host first (a CUDA model needs its home), then devices.
            let mut needs: Vec<(Location, u64)> = Vec::new();
            let mut need = |loc: Location, n: u64| match needs.iter_mut().find(|(l, _)| *l == loc) {
                Some((_, t)) => *t += n,
                None => needs.push((loc, n)),
            };
            for (i, load) in &loads {
                let c = &cores[*i];
                if load.host {
                    need(
                        Location::Cpu,
                        if c.runtime() == Location::Cpu { c.bytes + c.reserve } else { c.bytes },
                    );
                }
                if load.dev {
                    need(c.runtime(), c.bytes + c.reserve);
                }
            }
            needs.sort_by_key(|(loc, _)| *loc != Location::Cpu);
            let first = &cores[loads.first().map_or(0, |(i, _)| *i)];
            for &(loc, n) in &needs {
                // The batch as a whole must fit: what its members already hold here counts.
                let held: u64 = cores
                    .iter()
                    .filter(|c| !loads.iter().any(|(i, _)| cores[*i].id == c.id))
                    .map(|c| st.models.get(&c.id).map_or(0, |e| e.charge(loc)))
                    .sum();
                let budget = st.pool_ref(loc).map_or(0, |p| p.budget);
                self.reclaim_spares(st, loc, n);
                if cores.len() > 1 && n + held > budget {
                    return Err(Error::TooLarge {
                        model: batch_name(cores),
                        location: loc,
                        requested: n + held,
                        budget,
                    });
                }
                match self.room(st, loc, n, &ids) {
                    Room::Free => continue,
                    Room::Evict(victims) => {
                        let jobs = self.claim_all(st, &victims, loc);
                        self.run_evictions_in(st, jobs)?;
                        self.release_cache_if_short(loc, n);
                    }
                    Room::Wait => self.wait(st, wait, first, loc, n)?,
                    Room::TooLarge => {
                        let budget = st.pool_ref(loc).expect("pool").budget;
                        return Err(Error::TooLarge {
                            model: batch_name(cores),
                            location: loc,
                            requested: n,
                            budget,
                        });
                    }
                    Room::Full => {
                        let mut err = self.oom(st, first, loc, n, None);
                        if let Error::OutOfMemory { model, .. } = &mut err {
                            *model = batch_name(cores);
                        }
                        return Err(err);
                    }
                }
                continue 'retry;
            }
            // Reserve everything, hold the models already in place, then move without the lock.
            for &(loc, n) in &needs {
                st.add(loc, n);
            }
            let mut held = Vec::new();
            for (i, core) in cores.iter().enumerate() {
                if !loads.iter().any(|(j, _)| *j == i) {
                    let ok = core.try_hit(&self.clock);
                    debug_assert!(ok, "a ready model stays ready under the lock");
                    held.push(core);
                }
            }
            let mut pinned = Vec::with_capacity(loads.len());
            for (i, load) in &mut loads {
                let core = &cores[*i];
                let p = if load.host { st.reserve_pinned(self.pin, core) } else { 0 };
                load.pin = p > 0;
                pinned.push(p);
                let e = st.models.get_mut(&core.id).expect("registered");
                e.pinned += p;
                e.moving = true;
                e.host = true;
                if load.dev {
                    e.dev = true;
                }
            }
            let progress: Vec<(Cell<bool>, Cell<bool>)> =
                loads.iter().map(|_| (Cell::new(false), Cell::new(false))).collect();
            let results: Vec<Result<(), (bool, Error)>> = MutexGuard::unlocked(st, || {
                let mut results: Vec<Result<(), (bool, Error)>> = loads
                    .iter()
                    .zip(&progress)
                    .map(|((i, load), (host_done, pin_failed))| {
                        let c = &cores[*i];
                        unwind_safe(&c.name, || self.load_bytes(c, load, host_done, pin_failed))
                            .map_err(|e| (host_done.get(), e))
                    })
                    .collect();
                // One synchronisation per device for the whole batch.
                let mut synced: Vec<Device> = Vec::new();
                for ((i, load), res) in loads.iter().zip(&mut results) {
                    let d = cores[*i].device();
                    if !load.dev || res.is_err() || synced.contains(&d) {
                        continue;
                    }
                    synced.push(d);
                    if let Err(e) = unwind_safe(&cores[*i].name, || sync_device(d)) {
                        *res = Err((true, e));
                    }
                }
                results
            });
            let mut first_err = None;
            let mut loaded = Vec::new();
            for (((i, load), res), (p, (_, pin_failed))) in
                loads.iter().zip(results).zip(pinned.into_iter().zip(&progress))
            {
                let core = &cores[*i];
                self.counters.misses.fetch_add(1, Relaxed);
                let host_done = res.as_ref().err().is_none_or(|(h, _)| *h);
                if pin_failed.get() || !host_done {
                    // The home copy is pageable after all, or not there.
                    st.pinned_used -= p;
                    st.models.get_mut(&core.id).expect("registered").pinned -= p;
                }
                let e = st.models.get_mut(&core.id).expect("registered");
                e.moving = false;
                match res {
                    Ok(()) => loaded.push((core, if load.host { Location::Disk } else { Location::Cpu })),
                    Err((host_done, err)) => {
                        // Undo what did not happen; a completed host load stays (the model is whole there).
                        if load.dev {
                            e.dev = false;
                            st.sub(core.runtime(), core.bytes + core.reserve);
                        }
                        if load.host && !host_done {
                            let e = st.models.get_mut(&core.id).expect("registered");
                            e.host = false;
                            let n = if core.runtime() == Location::Cpu {
                                core.bytes + core.reserve
                            } else {
                                core.bytes
                            };
                            st.sub(Location::Cpu, n);
                        }
                        if load.host && host_done && load.dev {
                            self.emit(core, EventKind::Loaded, Some(Location::Disk), Some(Location::Cpu));
                        }
                        first_err.get_or_insert(err);
                    }
                }
            }
            let uses = if first_err.is_some() { 0 } else { 1 };
            for (core, from) in &loaded {
                core.last_used.store(self.clock.fetch_add(1, Relaxed), Relaxed);
                core.state.store(READY | uses, SeqCst);
                self.emit(core, EventKind::Loaded, Some(*from), Some(core.runtime()));
            }
            if first_err.is_some() {
                // All or nothing: give back the uses taken on models already in place
                // (under the lock; waiters are woken below).
                for core in held {
                    core.state.fetch_sub(1, SeqCst);
                }
            }
            self.notify();
            return first_err.map_or(Ok(()), Err);
        }
    }

    fn oom(&self, st: &State, core: &ModelCore, loc: Location, n: u64, waited: Option<Duration>) -> Error {
        let p = st.pool_ref(loc).expect("pool");
        Error::OutOfMemory {
            model: core.name.clone(),
            location: loc,
            requested: n,
            budget: p.budget,
            in_use: p.used,
            waited,
        }
    }

    /// Waits for a change (a release, a finished move) or fails at the deadline.
    fn wait(
        &self,
        st: &mut MutexGuard<'_, State>,
        wait: Wait,
        core: &ModelCore,
        loc: Location,
        n: u64,
    ) -> Result<()> {
        match wait {
            Wait::No => Err(self.oom(st, core, loc, n, None)),
            Wait::Poll(would_wait) => {
                would_wait.set(true);
                Err(self.oom(st, core, loc, n, None))
            }
            Wait::Until(deadline, total) => {
                if self.cond.wait_until(st, deadline).timed_out() && !core.is_ready() {
                    return Err(self.oom(st, core, loc, n, Some(total)));
                }
                Ok(())
            }
        }
    }

    /// Runs `f` (which takes a use of `core`, loading it if needed) with the
    /// current CUDA stream set to a side stream, so its copies and commit
    /// patches overlap work queued on the caller's stream; waits for the side
    /// stream before returning. Without CUDA it just runs `f`.
    pub(crate) fn on_side_stream<R>(&self, core: &ModelCore, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let Location::Cuda(i) = core.runtime() else { return f() };
        let consumer = cuda::Stream::current(i)?;
        let side = cuda::Stream::new(i)?;
        PREFETCH_CONSUMER.set(Some(consumer));
        let res = side.scope(|| {
            let r = f();
            sync_device(Device::Cuda(i)).and(r)
        });
        PREFETCH_CONSUMER.set(None);
        res?
    }

    /// Gives one use back.
    #[inline]
    pub(crate) fn release(&self, core: &ModelCore) {
        let prev = core.state.fetch_sub(1, SeqCst);
        debug_assert!(prev & USES > 0, "release without acquire");
        if prev & USES == 1 && (core.policy == OffloadPolicy::Eager || self.waiters.load(SeqCst) > 0) {
            self.on_idle(core);
        }
    }

    #[cold]
    fn on_idle(&self, core: &ModelCore) {
        let mut st = self.state.lock();
        if core.policy == OffloadPolicy::Eager {
            let jobs = self.claim_all(&mut st, &[core.id], core.runtime());
            if let Err(e) = self.run_evictions_in(&mut st, jobs) {
                tracing::warn!(model = %core.name, error = %e, "eager offload failed; the model stays resident");
            }
        }
        drop(st);
        self.notify();
        self.deliver();
    }

    /// Offloads an idle model now (`Managed::offload`).
    pub(crate) fn offload_now(&self, core: &ModelCore) -> Result<()> {
        let res = self.offload_idle(core);
        self.deliver();
        res
    }

    fn offload_idle(&self, core: &ModelCore) -> Result<()> {
        let mut st = self.state.lock();
        loop {
            let e =
                st.models.get(&core.id).ok_or_else(|| Error::ForeignModel { model: core.name.clone() })?;
            if e.moving {
                self.cond.wait(&mut st);
                continue;
            }
            if core.uses() > 0 {
                return Err(Error::InUse { model: core.name.clone(), guards: core.uses() });
            }
            let from = if e.runtime_resident() {
                core.runtime()
            } else if e.host && core.offload == Location::Disk {
                Location::Cpu
            } else {
                return Ok(());
            };
            let jobs = self.claim_all(&mut st, &[core.id], from);
            if jobs.is_empty() {
                if core.uses() > 0 {
                    continue; // a guard slipped in: reported as InUse above
                }
                return Err(self.oom(&st, core, Location::Disk, core.bytes, None));
            }
            return self.run_evictions_in(&mut st, jobs);
        }
    }

    // ----------------------------------------------------------------- eviction

    /// Whether `e` could leave `loc` now, and the disk bytes that would take.
    fn evictable(&self, e: &Entry, loc: Location) -> Option<u64> {
        let c = &e.core;
        if e.moving || c.uses_for_waiter() > 0 {
            return None;
        }
        match loc {
            Location::Cuda(_) => (e.dev && c.runtime() == loc).then_some(0),
            Location::Cpu if e.host => Some(if e.disk.is_some() { 0 } else { c.bytes }),
            _ => None,
        }
    }

    /// Looks for `need` bytes in `loc`, choosing idle victims least recently used first.
    fn room(&self, st: &State, loc: Location, need: u64, exclude: &[u64]) -> Room {
        let Some(p) = st.pool_ref(loc) else { return Room::Full };
        if need > p.budget {
            return Room::TooLarge;
        }
        let mut have = p.budget - p.used;
        if let Some(phys) = self.physical_free(loc) {
            // Evicting a model frees its bytes in both senses, so the smaller one rules.
            have = have.min(phys);
        }
        if have >= need {
            return Room::Free;
        }
        let mut disk_free = st.free(Location::Disk);
        let mut cands: Vec<(u64, u64, u64, u64)> = st
            .models
            .values()
            .filter(|e| !exclude.contains(&e.core.id))
            .filter_map(|e| {
                self.evictable(e, loc).map(|w| (e.core.last_used.load(Relaxed), e.core.id, e.charge(loc), w))
            })
            .collect();
        cands.sort_unstable();
        let mut victims = Vec::new();
        for (_, id, charge, write) in cands {
            if have >= need {
                break;
            }
            if charge == 0 {
                continue; // frees nothing
            }
            if write > 0 {
                if write > disk_free {
                    continue; // nowhere to put it
                }
                disk_free -= write;
            }
            victims.push(id);
            have += charge;
        }
        if have >= need {
            return Room::Evict(victims);
        }
        let busy: u64 = st
            .models
            .values()
            .filter(|e| !exclude.contains(&e.core.id) && (e.moving || e.core.uses_for_waiter() > 0))
            .map(|e| e.charge(loc))
            .sum();
        if have + busy >= need {
            Room::Wait
        } else {
            Room::Full
        }
    }

    /// Marks victims as moving and reserves their disk bytes; skips any that
    /// stopped being evictable (a guard arrived first).
    fn claim_all(&self, st: &mut State, ids: &[u64], from: Location) -> Vec<Eviction> {
        let mut jobs = Vec::new();
        for &id in ids {
            let Some(e) = st.models.get(&id) else { continue };
            let Some(mut write) = self.evictable(e, from) else { continue };
            let c = e.core.clone();
            let from_runtime = from == c.runtime();
            let drop_dev = e.dev;
            let mut spill = from == Location::Cpu || c.offload == Location::Disk;
            if from_runtime && from != Location::Cpu && spill {
                // Optional second step of a GPU eviction: only if the disk has room.
                write = if e.disk.is_some() { 0 } else { c.bytes };
                if write > st.free(Location::Disk) {
                    spill = false;
                    write = 0;
                }
            }
            if write > st.free(Location::Disk) {
                continue; // nowhere to put it (room() filters these; direct callers may not)
            }
            // Leaving the runtime location: no guard may exist or start (see module docs).
            let leaves_runtime =
                e.runtime_resident() && (drop_dev || (c.runtime() == Location::Cpu && spill));
            if leaves_runtime && c.state.compare_exchange(READY, 0, SeqCst, SeqCst).is_err() {
                continue; // a guard arrived first
            }
            let e = st.models.get_mut(&id).expect("present");
            e.moving = true;
            if write > 0 {
                e.disk = Some(write);
                st.add(Location::Disk, write);
            }
            jobs.push(Eviction {
                core: c,
                drop_dev,
                spill,
                write,
                cause: if from_runtime { "evict" } else { "spill" },
            });
        }
        jobs
    }

    fn run_evictions<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        jobs: Vec<Eviction>,
    ) -> Result<MutexGuard<'a, State>> {
        self.run_evictions_in(&mut st, jobs)?;
        Ok(st)
    }

    /// Runs claimed evictions without the lock, then publishes their results.
    fn run_evictions_in(&self, st: &mut MutexGuard<'_, State>, jobs: Vec<Eviction>) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let results: Vec<Result<(), (bool, Error)>> = MutexGuard::unlocked(st, || {
            jobs.iter()
                .map(|j| {
                    let dropped = Cell::new(false);
                    unwind_safe(&j.core.name, || self.evict_bytes(j, &dropped))
                        .map_err(|e| (dropped.get(), e))
                })
                .collect()
        });
        let mut first_err = None;
        for (job, res) in jobs.iter().zip(results) {
            let c = &job.core;
            if job.leaves_runtime() {
                // `evict_bytes` dropped the commit patch buffers first, whatever followed.
                let patched = c.patch_bytes.swap(0, Relaxed);
                if patched > 0 {
                    st.sub(c.runtime(), patched);
                }
            }
            let e = st.models.get_mut(&c.id).expect("victims stay registered while moving");
            e.moving = false;
            let was_dev = e.dev;
            let was_runtime = e.runtime_resident();
            let dev_charge = e.charge(c.runtime());
            let host_charge = e.charge(Location::Cpu);
            match res {
                Ok(()) => {
                    self.counters.evictions.fetch_add(1, Relaxed);
                    if job.drop_dev {
                        e.dev = false;
                    }
                    let unpinned = if job.spill {
                        e.host = false;
                        std::mem::take(&mut e.pinned)
                    } else {
                        0
                    };
                    st.pinned_used -= unpinned;
                    let (d, h) = (job.drop_dev && was_dev, job.spill);
                    if d {
                        st.sub(c.runtime(), dev_charge);
                    }
                    if h {
                        st.sub(Location::Cpu, host_charge);
                    }
                    let (kind, from) = if was_runtime {
                        (EventKind::Offloaded, c.runtime())
                    } else {
                        (EventKind::Spilled, Location::Cpu)
                    };
                    let to = if job.spill { Location::Disk } else { Location::Cpu };
                    self.emit(c, kind, Some(from), Some(to));
                }
                Err((dropped, err)) => {
                    // Either the device copy is intact (the failure came first) or it was
                    // dropped and the model is whole in host memory; the disk write did not
                    // complete. Undo the disk reservation.
                    if job.write > 0 {
                        e.disk = None;
                        st.sub(Location::Disk, job.write);
                    }
                    let e = st.models.get_mut(&c.id).expect("present");
                    if job.drop_dev && was_dev && dropped {
                        e.dev = false;
                        st.sub(c.runtime(), dev_charge);
                        self.emit(c, EventKind::Offloaded, Some(c.runtime()), Some(Location::Cpu));
                    } else if e.runtime_resident() {
                        c.state.store(READY, SeqCst); // still resident on its runtime location
                    }
                    tracing::warn!(model = %c.name, error = %err, "eviction failed; the model stays where it was");
                    first_err.get_or_insert(err);
                }
            }
        }
        self.notify();
        first_err.map_or(Ok(()), Err)
    }

    // ----------------------------------------------------------------- moving bytes

    /// Performs an eviction's moves. Called without the lock, on a model marked moving.
    fn evict_bytes(&self, job: &Eviction, dev_dropped: &Cell<bool>) -> Result<()> {
        let c = &job.core;
        let span = tracing::debug_span!("sire.evict", model = %c.name, bytes = c.bytes, from = %c.runtime(), to = %c.offload, cause = job.cause);
        let _evict = span.enter();
        let mut data = c.data.lock();
        let start = Instant::now();
        if job.leaves_runtime() {
            // Back to the base weights: patches never reach the home copy or the disk.
            let d = &mut *data;
            crate::patch::commit::unpatch(&mut d.groups, &mut d.patches);
        }
        if job.drop_dev && !data.homes.is_empty() {
            let span = tracing::debug_span!("sire.offload", model = %c.name, bytes = c.bytes, from = %c.runtime(), to = "cpu", cause = job.cause);
            let _g = span.enter();
            let d = &mut *data;
            let mut copied = 0;
            // Two phases: copy back what was written on the device, then swap.
            // (Copying into a packed home in place is safe: until the swap the
            // device copy is the reference, and a failure retries the copy.)
            let mut fresh = Vec::new();
            for (i, g) in d.groups.iter().enumerate() {
                if g.current().internal_version() != d.dev_versions[i] {
                    // Written on the device: the home copy must follow.
                    self.failpoint(FailAt::CopyBack)?;
                    if d.pack.is_some() {
                        d.homes[i].shallow_clone().f_copy_(g.current())?;
                    } else {
                        fresh.push((i, g.current().f_to_device(Device::Cpu)?));
                    }
                    copied += g.bytes;
                }
            }
            for (i, t) in fresh {
                d.homes[i] = t;
            }
            for (g, home) in d.groups.iter_mut().zip(&d.homes) {
                g.set_data(home);
            }
            d.homes.clear();
            dev_dropped.set(true);
            self.counters.bytes_d2h.fetch_add(copied, Relaxed);
            tracing::debug!(copied, elapsed = ?start.elapsed(), "offloaded");
        }
        if job.spill {
            let span = tracing::debug_span!("sire.spill", model = %c.name, bytes = c.bytes, from = "cpu", to = "disk", cause = job.cause);
            let _g = span.enter();
            let d = &mut *data;
            if job.write > 0
                || d.groups.iter().zip(&d.disk_versions).any(|(g, v)| g.current().internal_version() != *v)
            {
                let path = d.spill_path.clone().ok_or_else(|| Error::InvalidOptions {
                    model: c.name.clone(),
                    reason: "no spill directory".into(),
                })?;
                self.failpoint(FailAt::Spill)?;
                let named: Vec<(String, Tensor)> =
                    d.groups.iter().map(|g| (g.key.clone(), g.current().shallow_clone())).collect();
                spill::write(&path, &named)?;
                d.source = None; // the spill file is now the reference copy
                self.counters.bytes_to_disk.fetch_add(c.bytes, Relaxed);
            }
            for g in d.groups.iter_mut() {
                let empty = Tensor::empty([0i64], (g.kind, Device::Cpu));
                g.set_data(&empty);
            }
            d.pack = None;
            tracing::debug!(elapsed = ?start.elapsed(), "spilled");
        }
        self.counters.move_nanos.fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
        Ok(())
    }

    /// Brings a model to its runtime location. On failure, reports whether the
    /// host part completed (the model is then whole in host memory).
    fn load_bytes(
        &self,
        c: &ModelCore,
        load: &Load,
        host_done: &Cell<bool>,
        pin_failed: &Cell<bool>,
    ) -> Result<()> {
        let mut data = c.data.lock();
        let d = &mut *data;
        let start = Instant::now();
        if load.host {
            let span = tracing::debug_span!("sire.load", model = %c.name, bytes = c.bytes, from = "disk", to = "cpu");
            let _g = span.enter();
            let read = || -> Result<(Vec<Tensor>, Option<Tensor>)> {
                let keys: Vec<String> = d.groups.iter().map(|g| g.key.clone()).collect();
                let (path, checked) = match (&d.source, &d.spill_path) {
                    (Some(src), _) => (src.as_path(), false),
                    (None, Some(p)) => (p.as_path(), true),
                    (None, None) => unreachable!("a model off the host has a disk copy"),
                };
                // A CUDA model's home is read straight into one packed (pinned) buffer.
                let (ts, pack) = if c.runtime() == Location::Cpu {
                    (spill::read(path, &keys, checked)?, None)
                } else {
                    let (offsets, total) = pack_layout(&d.groups);
                    let (flat, pinned) = self.alloc_host(total, load.pin)?;
                    pin_failed.set(load.pin && !pinned);
                    let metas: Vec<(Kind, Vec<i64>, u64)> =
                        d.groups.iter().map(|g| (g.kind, g.shape.clone(), g.bytes)).collect();
                    let mut dest = |slot: usize| {
                        let (kind, shape, bytes) = &metas[slot];
                        pack_view(&flat, offsets[slot], *kind, shape, *bytes)
                    };
                    let ts = spill::read_into(path, &keys, checked, Some(&mut dest))?;
                    (ts, Some(flat))
                };
                self.failpoint(FailAt::Load)?;
                if self.failpoint(FailAt::PanicInLoad).is_err() {
                    panic!("injected panic in a load");
                }
                check_shapes(&c.name, path, &d.groups, &ts)?;
                Ok((ts, pack))
            };
            let (ts, pack) = read()?;
            d.pack = pack;
            for (g, t) in d.groups.iter_mut().zip(&ts) {
                g.set_data(t);
            }
            host_done.set(true);
            d.disk_versions = d.groups.iter().map(|g| g.current().internal_version()).collect();
            self.counters.bytes_from_disk.fetch_add(c.bytes, Relaxed);
            tracing::debug!(elapsed = ?start.elapsed(), "loaded from disk");
        }
        if load.dev {
            let span = tracing::debug_span!("sire.load", model = %c.name, bytes = c.bytes, from = "cpu", to = %c.runtime());
            let _g = span.enter();
            let t0 = Instant::now();
            let copy = || -> Result<Vec<Tensor>> {
                self.failpoint(FailAt::Load)?;
                let out = match &d.pack {
                    // One copy of the whole packed home, then views.
                    Some(flat) => {
                        let dev = flat.f_to_device_(c.device(), Kind::Uint8, true, false)?;
                        if let Some(consumer) = PREFETCH_CONSUMER.get() {
                            // Allocated on the side stream, used on the consumer's:
                            // its memory must not be reused before the consumer is done.
                            cuda::record_stream(&dev, &consumer)?;
                        }
                        let (offsets, _) = pack_layout(&d.groups);
                        d.groups
                            .iter()
                            .zip(offsets)
                            .map(|(g, o)| pack_view(&dev, o, g.kind, &g.shape, g.bytes))
                            .collect::<Result<Vec<_>>>()?
                    }
                    None => d
                        .groups
                        .iter()
                        .map(|g| Ok(g.current().f_to_device_(c.device(), g.kind, true, false)?))
                        .collect::<Result<Vec<_>>>()?,
                };
                Ok(out)
            };
            let copies = copy()?;
            d.homes = d.groups.iter().map(|g| g.current().detach()).collect();
            for (g, t) in d.groups.iter_mut().zip(&copies) {
                g.set_data(t);
            }
            d.dev_versions = d.groups.iter().map(|g| g.current().internal_version()).collect();
            self.counters.bytes_h2d.fetch_add(c.bytes, Relaxed);
            tracing::debug!(elapsed = ?t0.elapsed(), "loaded to device");
        }
        self.counters.move_nanos.fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
        Ok(())
    }

    // ----------------------------------------------------------------- commits

    /// Sets the bytes of commit patch buffers charged to the model's runtime pool
    /// (`commit.rs`), making room by evicting idle models, or waiting, when it
    /// grows. The caller holds a use of the model, so it is resident and stays.
    pub(crate) fn set_patch_bytes(&self, core: &ModelCore, bytes: u64, wait: Wait) -> Result<()> {
        let mut st = self.state.lock();
        self.waiters.fetch_add(1, SeqCst);
        let loc = core.runtime();
        let res = loop {
            let have = core.patch_bytes();
            if bytes <= have {
                st.sub(loc, have - bytes);
                core.patch_bytes.store(bytes, Relaxed);
                break Ok(());
            }
            let need = bytes - have;
            self.reclaim_spares(&mut st, loc, need);
            match self.room(&st, loc, need, &[core.id]) {
                Room::Free => {
                    st.add(loc, need);
                    core.patch_bytes.store(bytes, Relaxed);
                    break Ok(());
                }
                Room::Evict(victims) => {
                    let jobs = self.claim_all(&mut st, &victims, loc);
                    if let Err(e) = self.run_evictions_in(&mut st, jobs) {
                        break Err(e);
                    }
                }
                Room::Wait => {
                    let waited = match wait {
                        Wait::No => None,
                        Wait::Poll(would_wait) => {
                            would_wait.set(true);
                            None
                        }
                        Wait::Until(deadline, total) => {
                            if !self.cond.wait_until(&mut st, deadline).timed_out() {
                                continue;
                            }
                            Some(total)
                        }
                    };
                    break Err(self.oom(&st, core, loc, need, waited));
                }
                Room::TooLarge | Room::Full => break Err(self.oom(&st, core, loc, need, None)),
            }
        };
        self.waiters.fetch_sub(1, SeqCst);
        drop(st);
        // A shrink frees room that others may wait for.
        self.notify();
        self.deliver();
        res
    }

    /// Frees the spare patch buffers of models running on `loc` (least recently
    /// used first) until `need` bytes are free there or none are left: spares
    /// are a cache, given up before any model is evicted. A spare is never what
    /// a weight points at, so this is safe even while guards are alive; a model
    /// whose weights are locked (a rebase under way) is skipped.
    fn reclaim_spares(&self, st: &mut State, loc: Location, need: u64) {
        if st.free(loc) >= need {
            return;
        }
        let mut cands: Vec<(u64, Arc<ModelCore>)> = st
            .models
            .values()
            .filter(|e| e.core.patch_bytes() > 0 && e.runtime_resident() && e.core.runtime() == loc)
            .map(|e| (e.core.last_used.load(Relaxed), e.core.clone()))
            .collect();
        cands.sort_unstable_by_key(|(t, _)| *t);
        for (_, c) in cands {
            if st.free(loc) >= need {
                break;
            }
            let Some(mut d) = c.data.try_lock() else { continue };
            let d = &mut *d;
            let freed = crate::patch::commit::drop_spares(&d.groups, &mut d.patches);
            if freed > 0 {
                c.patch_bytes.fetch_sub(freed, Relaxed);
                st.sub(loc, freed);
                tracing::debug!(model = %c.name, freed, "dropped spare patch buffers to make room");
            }
        }
    }

    /// Grows the patch bytes charged for `core` to `bytes` only if the pool
    /// has that room free now (no eviction, no wait): for optional buffers.
    pub(crate) fn try_grow_patch_bytes(&self, core: &ModelCore, bytes: u64) -> bool {
        let mut st = self.state.lock();
        let have = core.patch_bytes();
        if bytes <= have {
            return true;
        }
        let loc = core.runtime();
        let need = bytes - have;
        if matches!(self.room(&st, loc, need, &[core.id]), Room::Free) {
            st.add(loc, need);
            core.patch_bytes.store(bytes, Relaxed);
            true
        } else {
            false
        }
    }

    // ----------------------------------------------------------------- notification and events

    /// Wakes every waiter, blocked (condition variable) or async.
    fn notify(&self) {
        self.cond.notify_all();
        #[cfg(feature = "tokio")]
        self.notify_async.notify_waiters();
    }

    /// Queues an event for the listener. Called under the `state` lock, so the
    /// queue is in publication order (lock order: `state`, then `events`).
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

    /// Hands queued events to the listener, in order. Called without the
    /// `state` lock. If another thread is delivering, it also delivers ours
    /// (it checks the queue again after giving up its turn); a listener that
    /// calls back into the engine queues its events behind the current batch.
    /// A panicking listener is logged, not propagated.
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
        self.waiters.load(SeqCst)
    }

    // ----------------------------------------------------------------- observation

    pub(crate) fn stats(&self) -> Stats {
        let st = self.state.lock();
        let pools = st
            .pools
            .iter()
            .map(|p| {
                let mut residents: Vec<Resident> = st
                    .models
                    .values()
                    .filter_map(|e| {
                        let bytes = e.charge(p.location);
                        let present = match p.location {
                            Location::Cuda(_) => e.dev && e.core.runtime() == p.location,
                            Location::Cpu => e.host,
                            Location::Disk => e.disk.is_some(),
                        };
                        present.then(|| Resident {
                            name: e.core.name.clone(),
                            bytes,
                            in_use: e.core.uses(),
                            moving: e.moving,
                            last_used: e.core.last_used.load(Relaxed),
                        })
                    })
                    .collect();
                residents.sort_by_key(|r| std::cmp::Reverse(r.last_used));
                PoolStats { location: p.location, budget: p.budget, used: p.used, residents }
            })
            .collect();
        let hits = st.models.values().map(|e| e.core.hits.load(Relaxed)).sum::<u64>()
            + self.counters.retired_hits.load(Relaxed);
        let pinned = (st.pinned_used, st.pinned_cap);
        drop(st);
        let mut stats = self.counters.snapshot(pools, hits, pinned);
        stats.waiting = self.waiting() as u64;
        stats
    }

    pub(crate) fn retire_hits(&self, core: &ModelCore) {
        self.counters.retired_hits.fetch_add(core.hits.load(Relaxed), Relaxed);
    }

    /// Where a model's weights are now: its runtime location if resident, else host, else disk.
    pub(crate) fn location_of(&self, core: &ModelCore) -> Location {
        let st = self.state.lock();
        match st.models.get(&core.id) {
            Some(e) if e.runtime_resident() => core.runtime(),
            Some(e) if e.host => Location::Cpu,
            _ => Location::Disk,
        }
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let st = self.state.lock();
        for p in &st.pools {
            let sum: u64 = st.models.values().map(|e| e.charge(p.location)).sum();
            assert!(p.used <= p.budget, "{}: used {} > budget {}", p.location, p.used, p.budget);
            assert_eq!(p.used, sum, "{}: used differs from the sum of residents", p.location);
        }
        let pinned: u64 = st.models.values().map(|e| e.pinned).sum();
        assert_eq!(st.pinned_used, pinned, "pinned bytes differ from the sum of pinned homes");
        assert!(st.pinned_used <= st.pinned_cap, "pinned {} > cap {}", st.pinned_used, st.pinned_cap);
        for e in st.models.values() {
            assert!(e.pinned == 0 || e.host, "`{}` holds pinned bytes without a host copy", e.core.name);
        }
    }
}

/// Waits for the copies issued to `device` on the current stream (only
/// those: kernels queued on other streams keep running).
fn sync_device(device: Device) -> Result<()> {
    if let Device::Cuda(i) = device {
        let mut done = cuda::Event::new()?;
        done.record_current(i)?;
        done.synchronize()?;
    }
    Ok(())
}

thread_local! {
    /// While a prefetch runs on a side stream: the stream its caller computes on.
    static PREFETCH_CONSUMER: Cell<Option<cuda::Stream>> = const { Cell::new(None) };
}

/// The name of a batch of models, for errors.
fn batch_name(cores: &[Arc<ModelCore>]) -> String {
    cores.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(" + ")
}

/// Alignment of each tensor in a packed buffer (the CUDA allocator's own).
const PACK_ALIGN: usize = 512;

/// Byte offsets of each group in a packed home copy, and the buffer's length.
fn pack_layout(groups: &[Group]) -> (Vec<usize>, usize) {
    let mut end = 0;
    let offsets = groups
        .iter()
        .map(|g| {
            let at = end;
            end += (g.bytes as usize).next_multiple_of(PACK_ALIGN);
            at
        })
        .collect();
    (offsets, end)
}

/// The tensor of one group inside a packed byte buffer.
fn pack_view(flat: &Tensor, offset: usize, kind: Kind, shape: &[i64], bytes: u64) -> Result<Tensor> {
    if bytes == 0 {
        return Ok(Tensor::f_empty(shape, (kind, flat.device()))?);
    }
    Ok(flat.f_narrow(0, offset as i64, bytes as i64)?.f_view_dtype(kind)?.f_view(shape)?)
}

/// Counts an async caller in `waiters` for as long as it lives, from before its
/// first attempt until it has its use or gives up (dropping it, also by
/// cancellation, uncounts it). See the module docs.
#[cfg(feature = "tokio")]
pub(crate) struct Waiting<'a>(&'a Inner);

#[cfg(feature = "tokio")]
impl<'a> Waiting<'a> {
    pub(crate) fn new(inner: &'a Inner) -> Self {
        inner.waiters.fetch_add(1, SeqCst);
        Waiting(inner)
    }
}

#[cfg(feature = "tokio")]
impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, SeqCst);
    }
}

/// Runs a move, turning a panic (tch panics where libtorch throws) into an
/// error, so the caller's undo path runs and the model is never left `moving`.
fn unwind_safe<R>(model: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::MovePanicked { model: model.to_string(), message: panic_message(&*p) }),
    }
}

fn check_shapes(model: &str, path: &Path, groups: &[Group], ts: &[Tensor]) -> Result<()> {
    for (g, t) in groups.iter().zip(ts) {
        if t.size() != g.shape || t.kind() != g.kind {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                detail: format!(
                    "model `{model}`: tensor `{}` is {:?} {:?} on disk but {:?} {:?} in the model",
                    g.key,
                    t.kind(),
                    t.size(),
                    g.kind,
                    g.shape
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ResourcePoolManagement, TensorSet};

    fn pools(cpu: u64) -> (ResourcePoolManagement, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let p = ResourcePoolManagement::builder()
            .cuda(false)
            .env(false)
            .cpu_budget(cpu)
            .spill_dir(dir.path())
            .build()
            .unwrap();
        (p, dir)
    }

    fn set(v: f32) -> TensorSet {
        TensorSet::new([("w", Tensor::full([1024], v as f64, tch::kind::FLOAT_CPU))]).unwrap()
    }

    #[test]
    fn a_failed_load_leaves_the_model_whole_on_disk() {
        let (p, _d) = pools(1 << 20);
        let m = p.manage(set(2.0)).unwrap();
        m.offload().unwrap();
        p.inner.fail_next(FailAt::Load);
        let err = crate::auto_manage(&m).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        p.inner.check_invariants();
        assert_eq!(m.location(), Location::Disk);
        assert_eq!(p.stats().pool(Location::Cpu).unwrap().used, 0, "the reservation was released");
        // Still whole: the next load succeeds with the right weights.
        let g = crate::auto_manage(&m).unwrap();
        assert_eq!(g.get("w").unwrap().sum(tch::Kind::Float).double_value(&[]), 2048.0);
    }

    #[test]
    fn a_panic_inside_a_load_is_an_error_and_undoes_the_reservation() {
        let (p, _d) = pools(1 << 20);
        let m = p.manage(set(6.0)).unwrap();
        m.offload().unwrap();
        p.inner.fail_next(FailAt::PanicInLoad);
        match crate::auto_manage(&m) {
            Err(Error::MovePanicked { message, .. }) => assert!(message.contains("injected"), "{message}"),
            other => panic!("expected MovePanicked, got {:?}", other.map(|_| ())),
        }
        p.inner.check_invariants();
        assert_eq!(m.location(), Location::Disk);
        assert!(!p.stats().pools.iter().any(|p| p.residents.iter().any(|r| r.moving)), "not left moving");
        assert_eq!(p.stats().pool(Location::Cpu).unwrap().used, 0);
        // Not stuck: a later guard loads it (a stuck `moving` flag would make this wait forever).
        let g = crate::auto_manage_timeout(&m, Duration::from_secs(5)).unwrap();
        assert_eq!(g.get("w").unwrap().sum(tch::Kind::Float).double_value(&[]), 6144.0);
    }

    #[test]
    fn a_failed_spill_leaves_the_model_whole_in_memory() {
        let (p, _d) = pools(1 << 20);
        let m = p.manage(set(3.0)).unwrap();
        p.inner.fail_next(FailAt::Spill);
        assert!(m.offload().is_err());
        p.inner.check_invariants();
        assert_eq!(m.location(), Location::Cpu);
        assert_eq!(p.stats().pool(Location::Disk).unwrap().used, 0, "the disk reservation was released");
        let tmp: Vec<_> = std::fs::read_dir(p.spill_dir().unwrap()).unwrap().collect();
        assert!(tmp.is_empty(), "no file left behind");
        // Usable in place, and a later spill works.
        drop(crate::try_auto_manage(&m).unwrap());
        m.offload().unwrap();
        assert_eq!(m.location(), Location::Disk);
    }

    #[test]
    fn offload_without_disk_room_is_an_error_and_the_model_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let p = ResourcePoolManagement::builder()
            .cuda(false)
            .env(false)
            .cpu_budget(1 << 20)
            .disk_budget(1024) // less than the 4 KiB model
            .spill_dir(dir.path())
            .build()
            .unwrap();
        let m = p.manage(set(4.0)).unwrap();
        match m.offload() {
            Err(Error::OutOfMemory { location: Location::Disk, .. }) => {}
            other => panic!("expected OutOfMemory on disk, got {other:?}"),
        }
        p.inner.check_invariants();
        assert_eq!(m.location(), Location::Cpu);
        let g = crate::try_auto_manage(&m).unwrap();
        assert_eq!(g.get("w").unwrap().sum(tch::Kind::Float).double_value(&[]), 4096.0);
    }

    #[test]
    fn a_failed_eviction_fails_the_load_that_needed_it_and_leaves_both_models_whole() {
        let (p, _d) = pools(4096);
        let a = p.manage(set(1.0)).unwrap();
        let b = p.manage(set(5.0)).unwrap(); // a spilled to make room
        assert_eq!(a.location(), Location::Disk);
        p.inner.fail_next(FailAt::Spill); // b's eviction will fail
        assert!(crate::auto_manage(&a).is_err());
        p.inner.check_invariants();
        assert_eq!((a.location(), b.location()), (Location::Disk, Location::Cpu));
        let g = crate::auto_manage(&a).unwrap();
        assert_eq!(g.get("w").unwrap().sum(tch::Kind::Float).double_value(&[]), 1024.0);
        drop(g);
        let g = crate::auto_manage(&b).unwrap();
        assert_eq!(g.get("w").unwrap().sum(tch::Kind::Float).double_value(&[]), 5120.0);
    }
}

#[cfg(test)]
mod placement {
    use super::*;
    use crate::TensorSet;

    const MIB: u64 = 1 << 20;

    fn inner() -> Inner {
        // Two CUDA pools configured by budget: nothing here touches a GPU.
        Inner::new(
            vec![(Location::Cuda(0), 100 * MIB), (Location::Cuda(1), 200 * MIB), (Location::Cpu, 1 << 40)],
            None,
            Duration::from_secs(1),
        )
    }

    fn model() -> TensorSet {
        TensorSet::new([("w", Tensor::zeros([256], tch::kind::FLOAT_CPU))]).unwrap()
    }

    fn place(inner: &Inner, core: &ModelCore) -> Location {
        let st = inner.state.lock();
        st.place(&st.models[&core.id])
    }

    /// Pretends the model was loaded onto `loc` (accounting only).
    fn mark_resident(inner: &Inner, core: &ModelCore, loc: Location) {
        let mut st = inner.state.lock();
        core.runtime.store(encode(loc), Release);
        st.add(loc, core.bytes);
        st.models.get_mut(&core.id).unwrap().dev = true;
    }

    #[test]
    fn automatic_models_go_where_the_most_budget_is_free_unless_already_resident() {
        let inner = inner();
        let a = inner.register(&model(), ManageOptions::default()).unwrap();
        assert!(a.auto);
        // Cuda(1) has 200 MiB free, Cuda(0) 100 MiB.
        assert_eq!(place(&inner, &a), Location::Cuda(1));
        // Resident on Cuda(0): it stays there although Cuda(1) has more room.
        mark_resident(&inner, &a, Location::Cuda(0));
        assert_eq!(place(&inner, &a), Location::Cuda(0));
        // Something else fills Cuda(1) to 150 MiB: a new model now prefers Cuda(0) (100 - 1 KiB free vs 50).
        inner.state.lock().add(Location::Cuda(1), 150 * MIB);
        let b = inner.register(&model(), ManageOptions::default()).unwrap();
        assert_eq!(place(&inner, &b), Location::Cuda(0));
        // Equal free budgets: the lowest index wins.
        inner.state.lock().sub(Location::Cuda(1), 150 * MIB);
        inner.state.lock().add(Location::Cuda(1), 100 * MIB + a.bytes);
        assert_eq!(place(&inner, &b), Location::Cuda(0));
    }

    #[test]
    fn an_explicit_device_is_honoured() {
        let inner = inner();
        let opts = ManageOptions::new().runtime(Location::Cuda(0));
        let a = inner.register(&model(), opts).unwrap();
        assert!(!a.auto);
        assert_eq!(place(&inner, &a), Location::Cuda(0), "pinned to cuda:0 although cuda:1 has more room");
        let cpu =
            inner.register(&model(), ManageOptions::new().runtime(Location::Cpu).offload(Location::Disk));
        assert!(cpu.is_err(), "offload to disk without a spill directory is refused");
        match inner.register(&model(), ManageOptions::new().runtime(Location::Cuda(2))) {
            Err(Error::UnknownDevice { location: Location::Cuda(2), available: 2 }) => {}
            other => panic!("expected UnknownDevice, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn stats_show_residency_per_device() {
        let inner = inner();
        let a = inner.register(&model(), ManageOptions::new().name("a")).unwrap();
        let b = inner.register(&model(), ManageOptions::new().name("b")).unwrap();
        mark_resident(&inner, &a, Location::Cuda(0));
        mark_resident(&inner, &b, Location::Cuda(1));
        let s = inner.stats();
        let names =
            |loc| -> Vec<String> { s.pool(loc).unwrap().residents.iter().map(|r| r.name.clone()).collect() };
        assert_eq!(names(Location::Cuda(0)), ["a"]);
        assert_eq!(names(Location::Cuda(1)), ["b"]);
        inner.check_invariants();
    }
}

#[cfg(test)]
mod pinning {
    use super::*;
    use crate::TensorSet;

    const KIB: u64 = 1 << 10;

    /// A CUDA pool configured by budget (never touched: nothing here loads to
    /// the device), a 16 KiB host pool, and pinning simulated with a 10 KiB cap.
    fn inner(dir: &Path) -> Inner {
        Inner::new(
            vec![(Location::Cuda(0), 1 << 30), (Location::Cpu, 16 * KIB), (Location::Disk, 1 << 20)],
            Some(dir.to_path_buf()),
            Duration::from_secs(1),
        )
        .with_pinning(Pinning::Simulated, 10 * KIB)
    }

    /// 4 KiB of distinct values, in two tensors (so the home is packed from two groups).
    fn model(seed: f64) -> TensorSet {
        let a = Tensor::arange(768, tch::kind::FLOAT_CPU) + seed;
        let b = Tensor::arange(256, tch::kind::FLOAT_CPU) * seed;
        TensorSet::new([("a", a), ("b", b)]).unwrap()
    }

    fn pinned_of(inner: &Inner, core: &ModelCore) -> u64 {
        inner.state.lock().models[&core.id].pinned
    }

    #[test]
    fn home_copies_are_pinned_up_to_the_cap_and_released_with_the_host_copy() {
        let dir = tempfile::tempdir().unwrap();
        let inner = inner(dir.path());
        let sets: Vec<TensorSet> = (1..=5).map(|i| model(i as f64)).collect();
        let want: Vec<(Tensor, Tensor)> =
            sets.iter().map(|s| (s.get("a").unwrap().copy(), s.get("b").unwrap().copy())).collect();
        let reg = |i: usize| inner.register(&sets[i], ManageOptions::new().name(format!("m{i}"))).unwrap();
        let m0 = reg(0);
        let m1 = reg(1);
        let m2 = reg(2);
        // 4 + 4 KiB pinned; a third 4 KiB would pass the 10 KiB cap: m2 stays pageable.
        assert_eq!(
            (pinned_of(&inner, &m0), pinned_of(&inner, &m1), pinned_of(&inner, &m2)),
            (4 * KIB, 4 * KIB, 0)
        );
        assert_eq!(inner.stats().pinned, 8 * KIB);
        inner.check_invariants();
        // The packed home holds the same values (both groups are views into one buffer).
        for i in 0..3 {
            assert!(
                sets[i].get("a").unwrap().equal(&want[i].0) && sets[i].get("b").unwrap().equal(&want[i].1)
            );
        }
        let (pa, pb) =
            (sets[0].get("a").unwrap().data_ptr() as usize, sets[0].get("b").unwrap().data_ptr() as usize);
        assert_eq!(pb - pa, 3 * KIB as usize, "b follows a in the packed buffer (3 KiB, 512-aligned)");
        // m3 fills the host pool (16 KiB); m4 makes room by spilling the LRU, m0,
        // whose pinned bytes go back to the cap, so m4 is pinned in its place.
        let m3 = reg(3);
        let m4 = reg(4);
        assert_eq!(inner.location_of(&m0), Location::Disk);
        assert_eq!(pinned_of(&inner, &m0), 0);
        assert_eq!((pinned_of(&inner, &m3), pinned_of(&inner, &m4)), (0, 4 * KIB));
        assert_eq!(inner.stats().pinned, 8 * KIB);
        inner.check_invariants();
        // Loading m0 again reads its home from disk straight into a packed buffer
        // (pageable now: 12 KiB would pass the cap); the device step then fails
        // here (no GPU) but the home copy stays whole in host memory.
        let res = inner.acquire(&m0, Wait::No);
        assert!(res.is_err(), "no CUDA device on this machine");
        inner.check_invariants();
        assert_eq!(inner.location_of(&m0), Location::Cpu);
        assert!(sets[0].get("a").unwrap().equal(&want[0].0) && sets[0].get("b").unwrap().equal(&want[0].1));
        assert!(inner.stats().pinned <= 10 * KIB);
        // Unregistering releases pinned bytes.
        let before = inner.stats().pinned;
        let p4 = pinned_of(&inner, &m4);
        inner.unregister(&m4);
        assert_eq!(inner.stats().pinned, before - p4);
        inner.check_invariants();
        drop((m1, m2, m3));
    }

    #[test]
    fn cpu_models_are_never_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let inner = inner(dir.path());
        let s = model(1.0);
        let c = inner.register(&s, ManageOptions::new().runtime(Location::Cpu)).unwrap();
        assert_eq!(pinned_of(&inner, &c), 0);
        assert_eq!(inner.stats().pinned, 0);
        inner.check_invariants();
    }
}

#[cfg(test)]
mod physical {
    use super::*;
    use crate::TensorSet;
    use std::sync::atomic::AtomicBool;

    const MIB: u64 = 1 << 20;

    /// A CUDA pool of 100 MiB holding two idle 20 MiB models (accounting only),
    /// with the device's physical state given by `phys` (free, idle cache).
    fn setup(phys: Arc<Mutex<(u64, u64)>>) -> (Inner, Vec<Arc<ModelCore>>, Arc<AtomicBool>) {
        let emptied = Arc::new(AtomicBool::new(false));
        let e2 = emptied.clone();
        let inner = Inner::new(
            vec![(Location::Cuda(0), 100 * MIB), (Location::Cpu, 1 << 40)],
            None,
            Duration::from_secs(1),
        )
        .with_cuda_probe(
            Arc::new(move |_| Some(*phys.lock())),
            0,
            Arc::new(move || e2.store(true, SeqCst)),
        );
        let mut cores = Vec::new();
        for name in ["old", "new"] {
            let set = TensorSet::new([("w", Tensor::zeros([5 * MIB as i64], tch::kind::FLOAT_CPU))]).unwrap();
            let core = inner.register(&set, ManageOptions::new().name(name)).unwrap();
            let mut st = inner.state.lock();
            st.add(Location::Cuda(0), core.bytes);
            st.models.get_mut(&core.id).unwrap().dev = true;
            core.state.store(READY, SeqCst);
            core.last_used.store(inner.clock.fetch_add(1, Relaxed), Relaxed);
            drop(st);
            cores.push(core);
        }
        (inner, cores, emptied)
    }

    #[test]
    fn room_on_a_cuda_pool_sees_memory_other_processes_hold() {
        let phys = Arc::new(Mutex::new((100 * MIB, 0)));
        let (inner, cores, _) = setup(phys.clone());
        let room = |need| {
            let st = inner.state.lock();
            match inner.room(&st, Location::Cuda(0), need, &[]) {
                Room::Free => "free".to_string(),
                Room::Evict(v) => format!("evict {v:?}"),
                Room::Wait => "wait".into(),
                Room::TooLarge => "too large".into(),
                Room::Full => "full".into(),
            }
        };
        // The budget has 60 MiB free and so does the device.
        assert_eq!(room(30 * MIB), "free");
        // Another process took all but 15 MiB: the budget alone would say "free",
        // but 15 MiB more must be freed, so the least recently used model goes.
        *phys.lock() = (15 * MIB, 0);
        assert_eq!(room(30 * MIB), format!("evict [{}]", cores[0].id));
        // The allocator's idle cache counts as free for our own loads.
        *phys.lock() = (5 * MIB, 10 * MIB);
        assert_eq!(room(30 * MIB), format!("evict [{}]", cores[0].id));
        // Even evicting both idle models cannot make 50 MiB here: full.
        *phys.lock() = (5 * MIB, 0);
        assert_eq!(room(50 * MIB), "full");
        // The budget still rules when it is the smaller one.
        *phys.lock() = (1 << 40, 0);
        assert_eq!(room(70 * MIB), format!("evict [{}]", cores[0].id));
    }

    #[test]
    fn the_allocator_cache_is_released_only_when_the_driver_is_short() {
        let phys = Arc::new(Mutex::new((100 * MIB, 40 * MIB)));
        let (inner, _cores, emptied) = setup(phys.clone());
        inner.release_cache_if_short(Location::Cuda(0), 30 * MIB);
        assert!(!emptied.load(SeqCst), "the driver has room: the cache is kept for reuse");
        *phys.lock() = (10 * MIB, 40 * MIB);
        inner.release_cache_if_short(Location::Cuda(0), 30 * MIB);
        assert!(emptied.load(SeqCst), "the driver is short: the idle cache goes back to it");
        assert_eq!(inner.counters.cache_releases.load(Relaxed), 1);
    }
}
