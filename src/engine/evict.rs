//! Making room: what the driver says is free, eviction candidates for the
//! policy, claiming victims and running their evictions, direct offloads,
//! and giving up spare patch buffers first.

use super::*;

/// An eviction claimed under the lock.
pub(super) struct Claim<'a> {
    reservation: Reservation<'a>,
    job: EvictJob,
    /// The disk residency once written.
    disk: Option<u64>,
}

impl Engine {
    /// What each CUDA pool can take physically now. Called without the lock.
    pub(super) fn probe(&self, pools: &[Location]) -> HashMap<Location, u64> {
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
    pub(super) fn release_cache_if_short(&self, loc: Location, need: u64) {
        debug_assert!(!self.held_here(), "the allocator's cache is never emptied under the engine's lock");
        let (Location::Cuda(i), Some(probe), Some(empty)) = (loc, &self.cuda_probe, &self.empty_cache) else {
            return;
        };
        if probe(i).is_some_and(|(free, idle)| idle > 0 && free < need + self.cuda_headroom) {
            empty();
            self.counters.cache_releases.fetch_add(1, Relaxed);
        }
    }

    /// The idle models that could leave `loc` now, for the policy, and the
    /// bytes in `loc` held by models in use or moving (waiting may free
    /// them). One reading of each model's use count decides which it is: a
    /// guard taken or dropped without the lock between two readings would
    /// otherwise count a model as neither, and a wait that would succeed
    /// fail at once as [`Room::Full`].
    fn candidates(
        &self,
        lk: &Ledger,
        loc: Location,
        exclude: &[u64],
        failed: &[u64],
    ) -> (Vec<Candidate>, u64) {
        let mut busy = 0;
        let mut cands = Vec::new();
        for e in lk.entries().filter(|e| !exclude.contains(&e.core.id)) {
            let (c, r) = (&e.core, e.res());
            if e.moving || c.uses_for_waiter() > 0 {
                busy += r.charge(c, loc);
                continue;
            }
            if failed.contains(&c.id) {
                continue;
            }
            // Nothing is evicted from the disk.
            if loc == Location::Disk || !r.present(c, loc) {
                continue;
            }
            let spill = loc == Location::Cpu || (c.offload == Location::Disk && c.runtime() == Location::Cpu);
            if spill && lk.pool(Location::Disk).is_none() {
                continue; // nowhere to put it (as `claim` decides)
            }
            let write = if spill { disk_write(c, r).1 } else { 0 };
            cands.push(Candidate {
                id: c.id,
                last_used: c.last_used.load(Relaxed),
                charge: r.charge(c, loc),
                write,
            });
        }
        (cands, busy)
    }

    /// Looks for `need` bytes in `loc` (see [`policy::room`]).
    pub(super) fn room(
        &self,
        lk: &mut Locked<'_>,
        loc: Location,
        need: u64,
        exclude: &[u64],
        failed: &[u64],
        physical: Option<u64>,
    ) -> Room {
        let Some(p) = lk.pool(loc) else { return Room::Full };
        let (cands, busy) = self.candidates(lk, loc, exclude, failed);
        let view =
            PoolView { budget: p.budget, used: p.used(), physical, busy, disk_free: lk.free(Location::Disk) };
        policy::room(view, need, cands)
    }

    /// Claims the policy's victims (see [`Engine::claim`]). A victim refused
    /// for another reason than a guard arriving first is added to `failed`,
    /// so that no plan repeats for ever under the lock.
    pub(super) fn claim_victims<'a>(
        &'a self,
        lk: &mut Locked<'a>,
        victims: &[u64],
        from: Location,
        failed: &mut Vec<u64>,
    ) -> Vec<Claim<'a>> {
        let mut raced = Vec::new();
        let claims = self.claim_racing(lk, victims, from, &mut raced);
        for &v in victims {
            let claimed = claims.iter().any(|c| c.reservation.core.id == v);
            // One that a guard took first is not failed: it is busy, or was
            // and is idle again (evictable, and waited for, the next time).
            if !claimed && !raced.contains(&v) {
                failed.push(v);
            }
        }
        claims
    }

    /// Claims victims for eviction from `from`: each is marked moving with the
    /// disk bytes its write needs reserved; any that stopped being evictable
    /// (a guard arrived first) is skipped.
    pub(super) fn claim<'a>(&'a self, lk: &mut Locked<'a>, ids: &[u64], from: Location) -> Vec<Claim<'a>> {
        self.claim_racing(lk, ids, from, &mut Vec::new())
    }

    /// [`Engine::claim`], adding to `raced` the models skipped because they
    /// were in use or moving (a guard arrived first).
    fn claim_racing<'a>(
        &'a self,
        lk: &mut Locked<'a>,
        ids: &[u64],
        from: Location,
        raced: &mut Vec<u64>,
    ) -> Vec<Claim<'a>> {
        let mut claims = Vec::new();
        for &id in ids {
            let Some(e) = lk.get(id) else { continue };
            let (c, r) = (e.core.clone(), e.res());
            if e.moving || c.uses_for_waiter() > 0 {
                raced.push(id);
                continue;
            }
            if from == Location::Disk || !r.present(&c, from) {
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
                raced.push(id);
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
    /// Returns the victims that could not leave, with why. With `keep`, the
    /// host buffers they release are kept in the ledger's cache where they
    /// can be (room is being made for a load that may reuse them).
    pub(super) fn run_evictions<'a>(
        &'a self,
        lk: &mut Locked<'a>,
        claims: Vec<Claim<'a>>,
        keep: bool,
    ) -> Vec<(u64, Error)> {
        if claims.is_empty() {
            return Vec::new();
        }
        let results: Vec<(Result<Option<tch::Tensor>>, bool)> = lk.unlocked(|| {
            let mut frees_heap = false;
            let results: Vec<(Result<Option<tch::Tensor>>, bool)> = claims
                .iter()
                .map(|cl| {
                    let c = &cl.reservation.core;
                    let dropped = Cell::new(false);
                    let mut d = c.data.lock();
                    // Patched weights and spares are the allocator's, even over a mapping.
                    let heap = cl.job.spill && (!d.mapped || cl.reservation.before.patch > 0);
                    let r = unwind_safe(&c.name, || {
                        self.transfer.evict(c, &mut d, &cl.job, &dropped, &self.counters, keep)
                    });
                    frees_heap |= heap && !matches!(r, Ok(Some(_)));
                    (r, dropped.get())
                })
                .collect();
            if frees_heap {
                // Host memory given up must leave the process, not linger in the
                // C allocator's free lists: the host budget is about the RSS.
                // (Weights that pointed into a mapping of their file left with
                // it: trimming the allocator then costs time for nothing.)
                crate::tier::ffi::release_free_memory();
            }
            results
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
                Ok(kept) => {
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
                    if let Some(buf) = kept {
                        let bytes = buf.numel() as u64;
                        if let Some(back) = lk.cache_put(buf, bytes) {
                            lk.free_later(vec![back]);
                        }
                    }
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
}

/// Whether spilling `c` must write its file (it has no disk copy, or its
/// weights were written since), and the disk bytes that write newly takes: its
/// size, unless it rewrites a spill file of its own in place (a source file is
/// never overwritten: the new copy goes to the spill directory).
pub(super) fn disk_write(c: &ModelCore, r: Residency) -> (bool, u64) {
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
