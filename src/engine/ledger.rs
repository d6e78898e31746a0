//! The ledger: every pool's budget and exact byte count, and per model one
//! [`Residency`] value saying where its bytes are. [`Ledger::transition`] is
//! the only writer of a pool's `used` (and of the pinned total): it derives
//! the charges of the old and the new residency and moves the difference. In
//! debug builds every transition checks the invariants.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::model::ModelCore;
use crate::Location;

/// Where one model's bytes are. Every count in the ledger derives from these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Residency {
    /// The runtime copy is on the model's CUDA device.
    pub dev: bool,
    /// A host copy exists: the runtime copy of a CPU model, the home of a CUDA one.
    pub host: bool,
    /// A valid copy on disk, and what it costs the disk pool (0 for a source file).
    pub disk: Option<u64>,
    /// Bytes of commit patch buffers on the runtime location (while resident there).
    pub patch: u64,
    /// Bytes of the host copy held in pinned memory (0: pageable or absent).
    pub pinned: u64,
}

impl Residency {
    /// Whether the weights are on the runtime location of `core`.
    pub(crate) fn on_runtime(&self, core: &ModelCore) -> bool {
        match core.runtime() {
            Location::Cpu => self.host,
            _ => self.dev,
        }
    }

    /// Where the weights are: the runtime location if resident there, else host, else disk.
    pub(crate) fn location(&self, core: &ModelCore) -> Location {
        if self.on_runtime(core) {
            core.runtime()
        } else if self.host {
            Location::Cpu
        } else {
            Location::Disk
        }
    }

    /// Whether the model is present in `loc`'s pool (with or without bytes).
    pub(crate) fn present(&self, core: &ModelCore, loc: Location) -> bool {
        match loc {
            Location::Cuda(_) => self.dev && core.runtime() == loc,
            Location::Cpu => self.host,
            Location::Disk => self.disk.is_some(),
        }
    }

    /// Bytes this residency holds in `loc`'s pool.
    pub(crate) fn charge(&self, core: &ModelCore, loc: Location) -> u64 {
        let runtime = core.runtime();
        let on_runtime = core.bytes + core.reserve + self.patch;
        match loc {
            Location::Cuda(_) if self.dev && runtime == loc => on_runtime,
            Location::Cpu if self.host => {
                if runtime == Location::Cpu {
                    on_runtime
                } else {
                    core.bytes
                }
            }
            Location::Disk => self.disk.unwrap_or(0),
            _ => 0,
        }
    }
}

pub(crate) struct Pool {
    pub location: Location,
    pub budget: u64,
    used: u64,
}

impl Pool {
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    pub(crate) fn free(&self) -> u64 {
        self.budget.saturating_sub(self.used)
    }
}

/// One registered model in the ledger.
pub(crate) struct Entry {
    pub core: Arc<ModelCore>,
    res: Residency,
    /// A thread is moving the model's bytes (it holds the model's data lock
    /// for the move); nobody else may plan a move of it meanwhile.
    pub moving: bool,
}

impl Entry {
    pub(crate) fn res(&self) -> Residency {
        self.res
    }
}

pub(crate) struct Ledger {
    pools: Vec<Pool>,
    models: HashMap<u64, Entry>,
    /// Pinned host bytes allowed (home copies of CUDA models).
    pinned_cap: u64,
    pinned_used: u64,
    /// The names in use: one model, one name (stats, events and errors name models).
    names: HashSet<String>,
    /// Host buffers of evicted models kept for reuse, oldest first (see
    /// [`Ledger::cache_put`]); their bytes are part of the host pool's `used`.
    cache: Vec<Cached>,
}

/// A host buffer in the ledger's cache: a pageable `Uint8` CPU tensor that
/// owns its storage, and its size.
pub(crate) struct Cached {
    pub bytes: u64,
    pub buf: tch::Tensor,
}

/// Whether a cached buffer of `have` bytes fits a load of `want` bytes: large
/// enough, and not more than a quarter (plus one huge page) larger.
pub(crate) fn fits(have: u64, want: u64) -> bool {
    have >= want && have <= want + want / 4 + (2 << 20)
}

impl Ledger {
    pub(crate) fn new(pools: Vec<(Location, u64)>, pinned_cap: u64) -> Ledger {
        Ledger {
            pools: pools.into_iter().map(|(location, budget)| Pool { location, budget, used: 0 }).collect(),
            models: HashMap::new(),
            pinned_cap,
            pinned_used: 0,
            names: HashSet::new(),
            cache: Vec::new(),
        }
    }

    pub(crate) fn name_taken(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// The first free name among `base`, `base#2`, `base#3`…
    pub(crate) fn free_name(&self, base: &str) -> String {
        if !self.name_taken(base) {
            return base.to_string();
        }
        (2..).map(|n| format!("{base}#{n}")).find(|n| !self.name_taken(n)).expect("a free name")
    }

    pub(crate) fn claim_name(&mut self, name: &str) {
        self.names.insert(name.to_string());
    }

    pub(crate) fn release_name(&mut self, name: &str) {
        self.names.remove(name);
    }

    pub(crate) fn set_pinned_cap(&mut self, cap: u64) {
        self.pinned_cap = cap;
    }

    pub(crate) fn pools(&self) -> &[Pool] {
        &self.pools
    }

    pub(crate) fn pool(&self, loc: Location) -> Option<&Pool> {
        self.pools.iter().find(|p| p.location == loc)
    }

    pub(crate) fn free(&self, loc: Location) -> u64 {
        self.pool(loc).map_or(0, Pool::free)
    }

    pub(crate) fn budget(&self, loc: Location) -> u64 {
        self.pool(loc).map_or(0, |p| p.budget)
    }

    pub(crate) fn pinned(&self) -> (u64, u64) {
        (self.pinned_used, self.pinned_cap)
    }

    /// Pinned bytes still allowed.
    pub(crate) fn pinned_free(&self) -> u64 {
        self.pinned_cap.saturating_sub(self.pinned_used)
    }

    pub(crate) fn get(&self, id: u64) -> Option<&Entry> {
        self.models.get(&id)
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.models.values()
    }

    pub(crate) fn res(&self, id: u64) -> Residency {
        self.models[&id].res
    }

    pub(crate) fn is_moving(&self, id: u64) -> bool {
        self.models.get(&id).is_some_and(|e| e.moving)
    }

    pub(crate) fn set_moving(&mut self, id: u64, moving: bool) {
        if let Some(e) = self.models.get_mut(&id) {
            e.moving = moving;
        }
    }

    /// Adds a model with residency `res` (charging it).
    pub(crate) fn insert(&mut self, core: Arc<ModelCore>, res: Residency, moving: bool) {
        let id = core.id;
        let prev = self.models.insert(id, Entry { core, res: Residency::default(), moving });
        debug_assert!(prev.is_none(), "model {id} registered twice");
        self.transition(id, res);
    }

    /// Removes a model (releasing everything it holds) and returns its entry
    /// with the residency it had.
    pub(crate) fn remove(&mut self, id: u64) -> Option<(Arc<ModelCore>, Residency)> {
        let res = self.models.get(&id)?.res;
        self.transition(id, Residency::default());
        let e = self.models.remove(&id).expect("present");
        self.check();
        Some((e.core, res))
    }

    /// Changes the runtime location of an automatically placed model that is on
    /// no device (its charges do not depend on which CUDA device it will use).
    pub(crate) fn place(&mut self, id: u64, loc: Location) {
        let e = &self.models[&id];
        debug_assert!(!e.res.dev && !e.moving, "placing a model that is on a device or moving");
        e.core.set_runtime(loc);
        self.check();
    }

    /// The one writer of the pools' counts: sets model `id`'s residency to
    /// `to` and moves every charge the change implies.
    pub(crate) fn transition(&mut self, id: u64, to: Residency) {
        let e = self.models.get_mut(&id).expect("transition of a registered model");
        let from = std::mem::replace(&mut e.res, to);
        let core = e.core.clone();
        for p in &mut self.pools {
            let (was, now) = (from.charge(&core, p.location), to.charge(&core, p.location));
            p.used = p.used - was + now;
        }
        self.pinned_used = self.pinned_used - from.pinned + to.pinned;
        if from.on_runtime(&core) != to.on_runtime(&core) || from.location(&core) != to.location(&core) {
            core.moves.fetch_add(1, Relaxed);
        }
        self.check();
    }

    /// Changes part of a residency (see [`Ledger::transition`]).
    pub(crate) fn update(&mut self, id: u64, f: impl FnOnce(&mut Residency)) {
        let mut r = self.res(id);
        f(&mut r);
        self.transition(id, r);
    }

    /// Bytes of the host pool held by cached buffers.
    pub(crate) fn cached(&self) -> u64 {
        self.cache.iter().map(|c| c.bytes).sum()
    }

    /// Keeps `buf` (`bytes` of pageable host memory that nothing else
    /// references) for reuse, charging it to the host pool, if there is room;
    /// else hands it back (to be freed by the caller, outside the lock).
    pub(crate) fn cache_put(&mut self, buf: tch::Tensor, bytes: u64) -> Option<tch::Tensor> {
        match self.pools.iter_mut().find(|p| p.location == Location::Cpu) {
            Some(p) if p.budget.saturating_sub(p.used) >= bytes => {
                p.used += bytes;
                self.cache.push(Cached { bytes, buf });
                self.check();
                None
            }
            _ => Some(buf),
        }
    }

    /// Chooses a cached buffer for each load in `wants` (a key and the bytes
    /// it needs), largest loads first, each the smallest that
    /// [`fits`]; returns (key, cache index) pairs.
    pub(crate) fn cache_match(&self, wants: &[(usize, u64)]) -> Vec<(usize, usize)> {
        let mut wants = wants.to_vec();
        wants.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
        let mut taken = vec![false; self.cache.len()];
        let mut out = Vec::new();
        for (key, want) in wants {
            let best = (0..self.cache.len())
                .filter(|&i| !taken[i] && fits(self.cache[i].bytes, want))
                .min_by_key(|&i| self.cache[i].bytes);
            if let Some(i) = best {
                taken[i] = true;
                out.push((key, i));
            }
        }
        out
    }

    /// Removes the cached buffers at `indices` (from [`Ledger::cache_match`]
    /// under the same hold of the lock), releasing their charge; returns them
    /// in the order of `indices`.
    pub(crate) fn cache_take(&mut self, indices: &[usize]) -> Vec<tch::Tensor> {
        let mut order: Vec<usize> = (0..indices.len()).collect();
        order.sort_by_key(|&k| std::cmp::Reverse(indices[k]));
        let mut out: Vec<Option<tch::Tensor>> = indices.iter().map(|_| None).collect();
        for k in order {
            let c = self.cache.remove(indices[k]);
            self.release_cpu(c.bytes);
            out[k] = Some(c.buf);
        }
        self.check();
        out.into_iter().map(|b| b.expect("each index taken once")).collect()
    }

    /// Gives back cached buffers, oldest first, sparing those at `keep`, until
    /// the host pool has `need` bytes free or none is left; returns them (to
    /// be freed outside the lock).
    pub(crate) fn cache_reclaim(&mut self, need: u64, keep: &[usize]) -> Vec<tch::Tensor> {
        let mut out = Vec::new();
        let mut i = 0;
        let mut index = 0; // the entry's index before any removal (what `keep` names)
        while i < self.cache.len() && self.free(Location::Cpu) < need {
            if keep.contains(&index) {
                i += 1;
            } else {
                let c = self.cache.remove(i);
                self.release_cpu(c.bytes);
                out.push(c.buf);
            }
            index += 1;
        }
        self.check();
        out
    }

    fn release_cpu(&mut self, bytes: u64) {
        if let Some(p) = self.pools.iter_mut().find(|p| p.location == Location::Cpu) {
            p.used -= bytes;
        }
    }

    /// The invariants, checked after every transition in debug builds: each
    /// pool's `used` is the sum of its residents' charges (plus the cached
    /// buffers, for the host pool) and within its
    /// budget; pinned bytes are the sum of pinned homes, within the cap, and
    /// only held by models with a host copy.
    #[inline]
    pub(crate) fn check(&self) {
        if cfg!(debug_assertions) {
            if let Err(e) = self.verify() {
                panic!("ledger invariant broken: {e}");
            }
        }
    }

    /// The invariants as a result (for tests).
    pub(crate) fn verify(&self) -> Result<(), String> {
        for p in &self.pools {
            let mut sum: u64 = self.models.values().map(|e| e.res.charge(&e.core, p.location)).sum();
            if p.location == Location::Cpu {
                sum += self.cached();
            }
            if p.used != sum {
                return Err(format!(
                    "{}: used {} != sum of charges {sum} (cached buffers included)",
                    p.location, p.used
                ));
            }
            if p.used > p.budget {
                return Err(format!("{}: used {} > budget {}", p.location, p.used, p.budget));
            }
        }
        let pinned: u64 = self.models.values().map(|e| e.res.pinned).sum();
        if self.pinned_used != pinned {
            return Err(format!("pinned {} != sum of pinned homes {pinned}", self.pinned_used));
        }
        if self.pinned_used > self.pinned_cap {
            return Err(format!("pinned {} > cap {}", self.pinned_used, self.pinned_cap));
        }
        for e in self.models.values() {
            if e.res.pinned > 0 && !e.res.host {
                return Err(format!("`{}` holds pinned bytes without a host copy", e.core.name));
            }
            if e.res.patch > 0 && !e.res.on_runtime(&e.core) {
                return Err(format!("`{}` holds patch bytes off its runtime location", e.core.name));
            }
        }
        Ok(())
    }
}
