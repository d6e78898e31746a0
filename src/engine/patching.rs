//! The narrow interface the patch layer uses: charging patch bytes to the
//! runtime pool (growing may make room or wait; never with the model's data
//! lock held), and reading what is charged.

use super::*;

impl Engine {
    /// Sets the bytes of commit patch buffers charged to the model's runtime pool,
    /// making room by evicting idle models, or waiting, when it grows. The caller
    /// holds a use of the model, so it is resident and stays. Never called with
    /// the model's data lock held. Returns early, short of `bytes`, when making
    /// room gave up the model's own spare buffers (which `bytes` counted): the
    /// caller counts what it needs again.
    pub(crate) fn set_patch_bytes(&self, core: &ModelCore, bytes: u64, wait: Wait) -> Result<()> {
        let wait = wait.start();
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
            self.reclaim_spares(&mut lk, loc, need, &[]);
            if lk.res(core.id).patch != have {
                // Its own spares were given up: `bytes` counted them, so the
                // caller must count again (it calls again if still short).
                return Ok(());
            }
            match self.room(&mut lk, loc, need, &[core.id], &failed, None) {
                Room::Free => {
                    lk.update(core.id, |r| r.patch = bytes);
                    return Ok(());
                }
                Room::Evict(victims) => {
                    let claims = self.claim_victims(&mut lk, &victims, loc, &mut failed);
                    failed.extend(self.run_evictions(&mut lk, claims, false).into_iter().map(|(id, _)| id));
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

    /// Gives back the host pool's cached buffers (sparing those at `keep`),
    /// then frees the spare patch buffers of models running on `loc` (least
    /// recently used first), until `need` bytes are free there or none are
    /// left: both are caches, given up before any model is evicted. A spare is
    /// never what a weight points at, so this is safe even while guards are
    /// alive; a model whose weights are locked (a rebase under way) is skipped.
    pub(super) fn reclaim_spares(&self, lk: &mut Locked<'_>, loc: Location, need: u64, keep: &[usize]) {
        if lk.free(loc) >= need {
            return;
        }
        if loc == Location::Cpu {
            let given = lk.cache_reclaim(need, keep);
            if !given.is_empty() {
                tracing::debug!(buffers = given.len(), "gave back cached host buffers to make room");
                lk.free_later(given);
            }
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
}
