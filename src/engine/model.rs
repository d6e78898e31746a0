//! A managed model's non-generic core: its identity and options, the lock-free
//! state word that the hit path reads (`READY` and the use count), and its
//! weights (the tensor groups and their home, device and disk bookkeeping).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, OnceLock};

use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};
use tch::{Device, Tensor};

use crate::options::OffloadPolicy;
use crate::tier::spill::{Source, SpillFile};
use crate::user::Group;
use crate::Location;

/// Set in `ModelCore::state` while the weights are usable on the runtime location.
pub(crate) const READY: u64 = 1 << 63;
pub(crate) const USES: u64 = READY - 1;

/// What the engine asks of a model's patches (the commit subsystem implements
/// it, so the engine never imports it): patches live on the runtime copy only.
pub(crate) trait PatchHooks: Send + Sync {
    /// Points every patched weight back at its base (the model leaves its
    /// runtime location). Called with the model's data lock held.
    fn unpatch(&self, groups: &mut [Group]);
    /// Drops the spare buffers (a cache), returning the bytes freed. Called
    /// with the model's data lock held.
    fn drop_spares(&self, groups: &[Group]) -> u64;
}

/// The non-generic part of a managed model, shared by its handles and the ledger.
pub(crate) struct ModelCore {
    pub id: u64,
    pub name: String,
    /// Bytes of the weights (each storage once).
    pub bytes: u64,
    /// Where the model runs, encoded (see `encode`); fixed unless `auto`, and
    /// then only changed by the ledger while the model is on no device.
    runtime: AtomicU32,
    /// Placed automatically: each load from host memory picks a CUDA pool.
    pub auto: bool,
    pub offload: Location,
    pub policy: OffloadPolicy,
    pub reserve: u64,
    /// `READY` and the use count (live guards).
    pub(crate) state: AtomicU64,
    pub(crate) last_used: AtomicU64,
    pub(crate) hits: AtomicU64,
    /// Counts the published moves of the weights (for `ResourceUser::on_moved`).
    pub(crate) moves: AtomicU64,
    /// Locked by the thread that moves the model (marked `moving` in the
    /// ledger), and by commit rebases while a use is held (so no move is under way).
    pub(crate) data: Mutex<ModelData>,
    /// The model's patches, once it has commits.
    pub(crate) patches: OnceLock<Arc<dyn PatchHooks>>,
}

pub(crate) struct ModelData {
    pub groups: Vec<Group>,
    /// Host copies while the model is on a CUDA device, one per group.
    pub homes: Vec<Tensor>,
    /// Version counters of the device copies when they were made (dirty check).
    pub dev_versions: Vec<i64>,
    /// Version counters of the host copies when the disk copy was last in sync.
    pub disk_versions: Vec<i64>,
    /// The model's spill file (none without a disk tier): its path and the
    /// identity of its last write, checked when it is read back.
    pub spill: Option<SpillFile>,
    /// A safetensors file the weights came from, as first read: a clean model
    /// reloads from it, if it has not changed.
    pub source: Option<Source>,
    /// The home copy of a CUDA model packed into one host buffer (pinned when
    /// the ledger says so), every group a view into it: a load is then one
    /// large copy. `None` for CPU models and while the weights are on disk.
    pub pack: Option<Tensor>,
    /// Whether the host copy points into a mapping of its file (made by a
    /// load from disk; not memory of the C allocator).
    pub mapped: bool,
}

impl ModelData {
    pub(crate) fn new(groups: Vec<Group>, spill: Option<SpillFile>, source: Option<Source>) -> Self {
        let disk_versions = groups.iter().map(Group::version).collect();
        ModelData {
            groups,
            homes: Vec::new(),
            dev_versions: Vec::new(),
            disk_versions,
            spill,
            source,
            pack: None,
            mapped: false,
        }
    }

    /// Whether the host copy changed since the disk copy was last in sync.
    pub(crate) fn dirty_since_disk(&self) -> bool {
        self.groups.iter().zip(&self.disk_versions).any(|(g, v)| g.version() != *v)
    }

    /// Runs the model's patch hooks on its groups, if it has patches.
    pub(crate) fn unpatch(&mut self, hooks: Option<&Arc<dyn PatchHooks>>) {
        if let Some(h) = hooks {
            h.unpatch(&mut self.groups);
        }
    }
}

const CPU_CODE: u32 = u32::MAX;

pub(crate) fn encode(loc: Location) -> u32 {
    match loc {
        Location::Cuda(i) => i as u32,
        _ => CPU_CODE,
    }
}

/// What `ModelCore::new` needs beyond the weights.
pub(crate) struct CoreSpec {
    pub id: u64,
    pub name: String,
    pub bytes: u64,
    pub runtime: Location,
    pub auto: bool,
    pub offload: Location,
    pub policy: OffloadPolicy,
    pub reserve: u64,
    pub clock: u64,
}

impl ModelCore {
    pub(crate) fn new(spec: CoreSpec, data: ModelData) -> ModelCore {
        ModelCore {
            id: spec.id,
            name: spec.name,
            bytes: spec.bytes,
            runtime: AtomicU32::new(encode(spec.runtime)),
            auto: spec.auto,
            offload: spec.offload,
            policy: spec.policy,
            reserve: spec.reserve,
            state: AtomicU64::new(0),
            last_used: AtomicU64::new(spec.clock),
            hits: AtomicU64::new(0),
            moves: AtomicU64::new(0),
            data: Mutex::new(data),
            patches: OnceLock::new(),
        }
    }

    /// Where the model runs while guarded (stable while any guard is alive).
    #[inline]
    pub(crate) fn runtime(&self) -> Location {
        match self.runtime.load(Acquire) {
            CPU_CODE => Location::Cpu,
            i => Location::Cuda(i as usize),
        }
    }

    /// Changes the runtime location. Only the ledger calls it, under its lock,
    /// while the model is on no device and not moving (no guard can exist).
    pub(crate) fn set_runtime(&self, loc: Location) {
        self.runtime.store(encode(loc), Release);
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
    /// the reader's earlier waiter count is visible to that release (no lost
    /// wake-up even under acquire/release alone; see `loom/`).
    pub(crate) fn uses_for_waiter(&self) -> u64 {
        self.state.fetch_add(0, SeqCst) & USES
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.state.load(SeqCst) & READY != 0
    }

    /// Runs `f` on the weights. Only while holding a use of the model (no move
    /// can be under way), or to read the inventory's names and shapes.
    pub(crate) fn with_groups<R>(&self, f: impl FnOnce(&mut [Group]) -> R) -> R {
        f(&mut self.data.lock().groups)
    }

    /// Locks the weights for a commit rebase, waiting at most as `wait` allows
    /// (`None`: the time ran out; `Wait::No` never waits). The caller holds a use.
    pub(crate) fn groups_within(&self, wait: super::Wait) -> Option<MappedMutexGuard<'_, Vec<Group>>> {
        let d = match wait.deadline() {
            Some(d) => match d.instant() {
                Some(at) => self.data.try_lock_until(at)?,
                None => self.data.lock(),
            },
            None => self.data.try_lock()?,
        };
        Some(MutexGuard::map(d, |d| &mut d.groups))
    }

    /// The patch hooks, if the model has patches.
    pub(crate) fn patch_hooks(&self) -> Option<&Arc<dyn PatchHooks>> {
        self.patches.get()
    }
}
