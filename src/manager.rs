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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use tch::{Device, Tensor};

use crate::options::{ManageOptions, OffloadPolicy};
use crate::stats::{Counters, PoolStats, Resident, Stats};
use crate::user::{self, Group, ResourceUser};
use crate::{spill, Error, Location, Result};

/// Set in `ModelCore::state` while the weights are usable on the runtime location.
pub(crate) const READY: u64 = 1 << 63;
const USES: u64 = READY - 1;

/// The non-generic part of a managed model, shared by its handles and the registry.
pub(crate) struct ModelCore {
    pub id: u64,
    pub name: String,
    /// Bytes of the weights (each aliased storage once).
    pub bytes: u64,
    pub runtime: Location,
    pub device: Device,
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
    /// Commit patches on the runtime copy (`commit.rs`).
    patches: crate::commit::Patches,
}

impl ModelCore {
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
        f: impl FnOnce(&mut [Group], &mut crate::commit::Patches) -> R,
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
}

impl Entry {
    fn runtime_resident(&self) -> bool {
        match self.core.runtime {
            Location::Cpu => self.host,
            _ => self.dev,
        }
    }

    /// Bytes this model holds in `loc`'s pool.
    fn charge(&self, loc: Location) -> u64 {
        let c = &self.core;
        match loc {
            Location::Cuda(_) if self.dev && c.runtime == loc => c.bytes + c.reserve + c.patch_bytes(),
            Location::Cpu if self.host => {
                if c.runtime == Location::Cpu {
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
}

impl State {
    fn pool(&mut self, loc: Location) -> &mut Pool {
        self.pools.iter_mut().find(|p| p.location == loc).expect("pool exists")
    }

    fn pool_ref(&self, loc: Location) -> Option<&Pool> {
        self.pools.iter().find(|p| p.location == loc)
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
        self.drop_dev || (self.core.runtime == Location::Cpu && self.spill)
    }
}

/// What a load must do.
struct Load {
    host: bool,
    dev: bool,
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
pub(crate) enum Wait {
    No,
    Until(Instant, Duration),
}

/// Fault-injection points (only armed by unit tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum FailAt {
    /// While copying weights toward the runtime location (after some groups).
    Load,
    /// While writing a spill file.
    Spill,
}

pub(crate) struct Inner {
    state: Mutex<State>,
    cond: Condvar,
    waiters: AtomicUsize,
    clock: AtomicU64,
    next_id: AtomicU64,
    pub(crate) spill_dir: Option<PathBuf>,
    pub(crate) wait_timeout: Duration,
    pub(crate) counters: Counters,
    #[cfg(test)]
    fail: Mutex<Option<FailAt>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(dir) = &self.spill_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Model registration result for the generic layer.
pub(crate) struct Registered {
    pub core: Arc<ModelCore>,
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
            }),
            cond: Condvar::new(),
            waiters: AtomicUsize::new(0),
            clock: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            spill_dir,
            wait_timeout: wait,
            counters: Counters::default(),
            #[cfg(test)]
            fail: Mutex::new(None),
        }
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

    // ----------------------------------------------------------------- registration

    pub(crate) fn register<T: ResourceUser>(&self, model: &T, opts: ManageOptions) -> Result<Registered> {
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
                None => cudas
                    .iter()
                    .max_by_key(|p| (p.budget - p.used, std::cmp::Reverse(p.location)))
                    .map_or(Location::Cpu, |p| p.location),
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
            runtime,
            device: runtime.device().expect("runtime is a device"),
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
                patches: Default::default(),
            }),
        });
        {
            let mut d = core.data.lock();
            d.disk_versions = d.groups.iter().map(|g| g.current().internal_version()).collect();
        }
        self.admit(&core)?;
        Ok(Registered { core })
    }

    /// Accounts a new model's host bytes, making room (or spilling the model
    /// itself straight to disk) so that the host pool stays within budget.
    fn admit(&self, core: &Arc<ModelCore>) -> Result<()> {
        let need = if core.runtime == Location::Cpu { core.bytes + core.reserve } else { core.bytes };
        // A model read from a safetensors file already has a clean copy on disk.
        let disk = core.data.lock().source.as_ref().map(|_| 0);
        let mut st = self.state.lock();
        loop {
            match self.room(&st, Location::Cpu, need, core.id) {
                Room::Free => {
                    st.add(Location::Cpu, need);
                    st.models.insert(
                        core.id,
                        Entry { core: core.clone(), dev: false, host: true, disk, moving: false },
                    );
                    if core.runtime == Location::Cpu {
                        core.state.store(READY, SeqCst);
                    }
                    return Ok(());
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
            Entry { core: core.clone(), dev: false, host: false, disk: Some(write), moving: true },
        );
        st.add(Location::Disk, write);
        // The host bytes are outside the pool until the write completes, then gone.
        let job = Eviction { core: core.clone(), drop_dev: false, spill: true, write, cause: "admit" };
        drop(st);
        let res = self.evict_bytes(&job);
        let mut st = self.state.lock();
        let e = st.models.get_mut(&core.id).expect("registered");
        e.moving = false;
        match res {
            Ok(()) => {
                drop(st);
                self.cond.notify_all();
                Ok(())
            }
            Err(err) => {
                st.models.remove(&core.id);
                st.sub(Location::Disk, write);
                drop(st);
                self.cond.notify_all();
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
            let mut locs = vec![Location::Cpu, Location::Disk];
            if core.runtime != Location::Cpu {
                locs.push(core.runtime);
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
        self.cond.notify_all();
    }

    // ----------------------------------------------------------------- acquire

    /// Takes one use of the model, loading it first if needed. On `Ok` the
    /// caller owns one use and must call `release`.
    pub(crate) fn acquire(&self, core: &Arc<ModelCore>, wait: Wait) -> Result<()> {
        if core.try_hit(&self.clock) {
            return Ok(());
        }
        let mut st = self.state.lock();
        // Counted before looking for room: see the module docs.
        self.waiters.fetch_add(1, SeqCst);
        let res = self.acquire_slow(&mut st, core, wait);
        self.waiters.fetch_sub(1, SeqCst);
        res
    }

    fn acquire_slow(&self, st: &mut MutexGuard<'_, State>, core: &Arc<ModelCore>, wait: Wait) -> Result<()> {
        let id = core.id;
        loop {
            if core.try_hit(&self.clock) {
                return Ok(());
            }
            let e = st.models.get(&id).ok_or_else(|| Error::ForeignModel { model: core.name.clone() })?;
            if e.moving {
                self.wait(st, wait, core, core.runtime, core.bytes)?;
                continue;
            }
            debug_assert!(!e.runtime_resident() || core.is_ready() || core.runtime != Location::Cpu);
            let load = Load { host: !e.host, dev: core.runtime != Location::Cpu && !e.dev };
            // Room, pool by pool: host first (a CUDA model needs its home), then device.
            let mut needs: Vec<(Location, u64)> = Vec::new();
            if load.host {
                let n = if core.runtime == Location::Cpu { core.bytes + core.reserve } else { core.bytes };
                needs.push((Location::Cpu, n));
            }
            if load.dev {
                needs.push((core.runtime, core.bytes + core.reserve));
            }
            let mut retry = false;
            for &(loc, n) in &needs {
                match self.room(st, loc, n, id) {
                    Room::Free => continue,
                    Room::Evict(victims) => {
                        let jobs = self.claim_all(st, &victims, loc);
                        self.run_evictions_in(st, jobs)?;
                    }
                    Room::Wait => self.wait(st, wait, core, loc, n)?,
                    Room::TooLarge => {
                        let budget = st.pool_ref(loc).expect("pool").budget;
                        return Err(Error::TooLarge {
                            model: core.name.clone(),
                            location: loc,
                            requested: n,
                            budget,
                        });
                    }
                    Room::Full => return Err(self.oom(st, core, loc, n, None)),
                }
                retry = true;
                break;
            }
            if retry {
                continue;
            }
            // Reserve everything, then move without the lock.
            for &(loc, n) in &needs {
                st.add(loc, n);
            }
            let e = st.models.get_mut(&id).expect("registered");
            e.moving = true;
            e.host = true;
            if load.dev {
                e.dev = true;
            }
            let res = MutexGuard::unlocked(st, || self.load_bytes(core, &load));
            let e = st.models.get_mut(&id).expect("registered");
            e.moving = false;
            self.counters.misses.fetch_add(1, Relaxed);
            match res {
                Ok(()) => {
                    core.last_used.store(self.clock.fetch_add(1, Relaxed), Relaxed);
                    core.state.store(READY | 1, SeqCst);
                    self.cond.notify_all();
                    return Ok(());
                }
                Err((host_done, err)) => {
                    // Undo what did not happen; a completed host load stays (the model is whole there).
                    if load.dev {
                        e.dev = false;
                        st.sub(core.runtime, core.bytes + core.reserve);
                    }
                    if load.host && !host_done {
                        let e = st.models.get_mut(&id).expect("registered");
                        e.host = false;
                        st.sub(Location::Cpu, needs[0].1);
                    }
                    self.cond.notify_all();
                    return Err(err);
                }
            }
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
            Wait::Until(deadline, total) => {
                if self.cond.wait_until(st, deadline).timed_out() && !core.is_ready() {
                    return Err(self.oom(st, core, loc, n, Some(total)));
                }
                Ok(())
            }
        }
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
            let jobs = self.claim_all(&mut st, &[core.id], core.runtime);
            if let Err(e) = self.run_evictions_in(&mut st, jobs) {
                tracing::warn!(model = %core.name, error = %e, "eager offload failed; the model stays resident");
            }
        }
        drop(st);
        self.cond.notify_all();
    }

    /// Offloads an idle model now (`Managed::offload`).
    pub(crate) fn offload_now(&self, core: &ModelCore) -> Result<()> {
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
                core.runtime
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
            Location::Cuda(_) => (e.dev && c.runtime == loc).then_some(0),
            Location::Cpu if e.host => Some(if e.disk.is_some() { 0 } else { c.bytes }),
            _ => None,
        }
    }

    /// Looks for `need` bytes in `loc`, choosing idle victims least recently used first.
    fn room(&self, st: &State, loc: Location, need: u64, exclude: u64) -> Room {
        let Some(p) = st.pool_ref(loc) else { return Room::Full };
        if need > p.budget {
            return Room::TooLarge;
        }
        let mut have = p.budget - p.used;
        if have >= need {
            return Room::Free;
        }
        let mut disk_free = st.free(Location::Disk);
        let mut cands: Vec<(u64, u64, u64, u64)> = st
            .models
            .values()
            .filter(|e| e.core.id != exclude)
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
            .filter(|e| e.core.id != exclude && (e.moving || e.core.uses_for_waiter() > 0))
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
            let from_runtime = from == c.runtime;
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
            let leaves_runtime = e.runtime_resident() && (drop_dev || (c.runtime == Location::Cpu && spill));
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
        let results: Vec<Result<()>> =
            MutexGuard::unlocked(st, || jobs.iter().map(|j| self.evict_bytes(j)).collect());
        let mut first_err = None;
        for (job, res) in jobs.iter().zip(results) {
            let c = &job.core;
            if job.leaves_runtime() {
                // `evict_bytes` dropped the commit patch buffers first, whatever followed.
                let patched = c.patch_bytes.swap(0, Relaxed);
                if patched > 0 {
                    st.sub(c.runtime, patched);
                }
            }
            let e = st.models.get_mut(&c.id).expect("victims stay registered while moving");
            e.moving = false;
            let was_dev = e.dev;
            let dev_charge = e.charge(c.runtime);
            let host_charge = e.charge(Location::Cpu);
            match res {
                Ok(()) => {
                    self.counters.evictions.fetch_add(1, Relaxed);
                    if job.drop_dev {
                        e.dev = false;
                    }
                    if job.spill {
                        e.host = false;
                    }
                    let (d, h) = (job.drop_dev && was_dev, job.spill);
                    if d {
                        st.sub(c.runtime, dev_charge);
                    }
                    if h {
                        st.sub(Location::Cpu, host_charge);
                    }
                }
                Err(err) => {
                    // Only the disk write can fail, and it comes after the device copy was
                    // dropped: the model is whole in host memory. Undo the disk reservation.
                    if job.write > 0 {
                        e.disk = None;
                        st.sub(Location::Disk, job.write);
                    }
                    let e = st.models.get_mut(&c.id).expect("present");
                    if job.drop_dev && was_dev {
                        e.dev = false;
                        st.sub(c.runtime, dev_charge);
                    } else if c.runtime == Location::Cpu {
                        c.state.store(READY, SeqCst); // still resident on its runtime location
                    }
                    tracing::warn!(model = %c.name, error = %err, "eviction failed; the model stays where it was");
                    first_err.get_or_insert(err);
                }
            }
        }
        self.cond.notify_all();
        first_err.map_or(Ok(()), Err)
    }

    // ----------------------------------------------------------------- moving bytes

    /// Performs an eviction's moves. Called without the lock, on a model marked moving.
    fn evict_bytes(&self, job: &Eviction) -> Result<()> {
        let c = &job.core;
        let span = tracing::debug_span!("sire.evict", model = %c.name, bytes = c.bytes, from = %c.runtime, to = %c.offload, cause = job.cause);
        let _evict = span.enter();
        let mut data = c.data.lock();
        let start = Instant::now();
        if job.leaves_runtime() {
            // Back to the base weights: patches never reach the home copy or the disk.
            let d = &mut *data;
            crate::commit::unpatch(&mut d.groups, &mut d.patches);
        }
        if job.drop_dev && !data.homes.is_empty() {
            let span = tracing::debug_span!("sire.offload", model = %c.name, bytes = c.bytes, from = %c.runtime, to = "cpu", cause = job.cause);
            let _g = span.enter();
            let d = &mut *data;
            let mut copied = 0;
            for (i, g) in d.groups.iter_mut().enumerate() {
                let home = &mut d.homes[i];
                if g.current().internal_version() != d.dev_versions[i] {
                    // Written on the device: the home copy must follow.
                    *home = g.current().to_device(Device::Cpu);
                    copied += g.bytes;
                }
                g.set_data(home);
            }
            d.homes.clear();
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
            tracing::debug!(elapsed = ?start.elapsed(), "spilled");
        }
        self.counters.move_nanos.fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
        Ok(())
    }

    /// Brings a model to its runtime location. On failure, reports whether the
    /// host part completed (the model is then whole in host memory).
    fn load_bytes(&self, c: &ModelCore, load: &Load) -> Result<(), (bool, Error)> {
        let mut data = c.data.lock();
        let d = &mut *data;
        let start = Instant::now();
        if load.host {
            let span = tracing::debug_span!("sire.load", model = %c.name, bytes = c.bytes, from = "disk", to = "cpu");
            let _g = span.enter();
            let read = || -> Result<Vec<Tensor>> {
                let keys: Vec<String> = d.groups.iter().map(|g| g.key.clone()).collect();
                let (path, checked) = match (&d.source, &d.spill_path) {
                    (Some(src), _) => (src.as_path(), false),
                    (None, Some(p)) => (p.as_path(), true),
                    (None, None) => unreachable!("a model off the host has a disk copy"),
                };
                let ts = spill::read(path, &keys, checked)?;
                self.failpoint(FailAt::Load)?;
                check_shapes(&c.name, path, &d.groups, &ts)?;
                Ok(ts)
            };
            let ts = read().map_err(|e| (false, e))?;
            for (g, t) in d.groups.iter_mut().zip(&ts) {
                g.set_data(t);
            }
            d.disk_versions = d.groups.iter().map(|g| g.current().internal_version()).collect();
            self.counters.bytes_from_disk.fetch_add(c.bytes, Relaxed);
            tracing::debug!(elapsed = ?start.elapsed(), "loaded from disk");
        }
        if load.dev {
            let span = tracing::debug_span!("sire.load", model = %c.name, bytes = c.bytes, from = "cpu", to = %c.runtime);
            let _g = span.enter();
            let t0 = Instant::now();
            let copy = || -> Result<Vec<Tensor>> {
                let mut out = Vec::with_capacity(d.groups.len());
                for g in &d.groups {
                    self.failpoint(FailAt::Load)?;
                    out.push(g.current().f_to_device_(c.device, g.kind, true, false)?);
                }
                if let Device::Cuda(i) = c.device {
                    tch::Cuda::synchronize(i as i64);
                }
                Ok(out)
            };
            let copies = copy().map_err(|e| (load.host, e))?;
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
        let res = loop {
            let have = core.patch_bytes();
            if bytes <= have {
                st.sub(core.runtime, have - bytes);
                core.patch_bytes.store(bytes, Relaxed);
                break Ok(());
            }
            let need = bytes - have;
            match self.room(&st, core.runtime, need, core.id) {
                Room::Free => {
                    st.add(core.runtime, need);
                    core.patch_bytes.store(bytes, Relaxed);
                    break Ok(());
                }
                Room::Evict(victims) => {
                    let jobs = self.claim_all(&mut st, &victims, core.runtime);
                    if let Err(e) = self.run_evictions_in(&mut st, jobs) {
                        break Err(e);
                    }
                }
                Room::Wait => {
                    let waited = match wait {
                        Wait::No => None,
                        Wait::Until(deadline, total) => {
                            if !self.cond.wait_until(&mut st, deadline).timed_out() {
                                continue;
                            }
                            Some(total)
                        }
                    };
                    break Err(self.oom(&st, core, core.runtime, need, waited));
                }
                Room::TooLarge | Room::Full => break Err(self.oom(&st, core, core.runtime, need, None)),
            }
        };
        self.waiters.fetch_sub(1, SeqCst);
        res
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
                            Location::Cuda(_) => e.dev && e.core.runtime == p.location,
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
        drop(st);
        self.counters.snapshot(pools, hits)
    }

    pub(crate) fn retire_hits(&self, core: &ModelCore) {
        self.counters.retired_hits.fetch_add(core.hits.load(Relaxed), Relaxed);
    }

    /// Where a model's weights are now: its runtime location if resident, else host, else disk.
    pub(crate) fn location_of(&self, core: &ModelCore) -> Location {
        let st = self.state.lock();
        match st.models.get(&core.id) {
            Some(e) if e.runtime_resident() => core.runtime,
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
