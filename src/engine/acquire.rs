//! Taking uses: the hit path, the slow path that plans room and placement
//! under the lock and moves bytes without it, batches, releases.

use super::*;

/// The loads of one acquisition that are not in place, with their progress.
pub(super) struct Loading<'a> {
    index: usize,
    job: LoadJob,
    reservation: Reservation<'a>,
    /// The host part completed (the model is whole in host memory).
    host_done: Cell<bool>,
    /// The home read from disk is pinned.
    pinned: Cell<bool>,
    /// Pinned bytes reserved for it.
    pin_reserved: u64,
    /// A cached host buffer to read the model into (taken from the ledger).
    reuse: Cell<Option<tch::Tensor>>,
}

impl Engine {
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

    pub(super) fn acquire_slow<'a>(
        &'a self,
        cores: &'a [Arc<ModelCore>],
        wait: Wait,
    ) -> Result<Vec<Use<'a>>> {
        let wait = wait.start();
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
            // Loads that will copy into pageable host memory reuse cached
            // buffers where one fits: those bytes are already charged.
            let wants: Vec<(usize, u64)> = jobs
                .iter()
                .filter(|(i, job)| self.copies_to_pageable(&lk, &cores[*i], job))
                .map(|(i, _)| (*i, cores[*i].bytes))
                .collect();
            let mut matched = if wants.is_empty() { Vec::new() } else { lk.cache_match(&wants) };
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
                let n = if loc == Location::Cpu {
                    let keep: Vec<usize> = matched.iter().map(|&(_, c)| c).collect();
                    let reused: u64 = matched.iter().map(|&(i, _)| cores[i].bytes).sum();
                    let n = n.saturating_sub(reused);
                    self.reclaim_spares(&mut lk, loc, n, &keep);
                    matched = if wants.is_empty() { Vec::new() } else { lk.cache_match(&wants) };
                    n
                } else {
                    self.reclaim_spares(&mut lk, loc, n, &[]);
                    n
                };
                match self.room(&mut lk, loc, n, &ids, &failed, phys.get(&loc).copied()) {
                    Room::Free => continue,
                    Room::Evict(victims) => {
                        let claims = self.claim_victims(&mut lk, &victims, loc, &mut failed);
                        for (id, e) in self.run_evictions(&mut lk, claims, true) {
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
            let indices: Vec<usize> = matched.iter().map(|&(_, c)| c).collect();
            let mut reused: HashMap<usize, tch::Tensor> =
                matched.iter().map(|&(i, _)| i).zip(lk.cache_take(&indices)).collect();
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
                    reuse: Cell::new(reused.remove(&i)),
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
    pub(super) fn move_in(&self, cores: &[Arc<ModelCore>], loading: &[Loading<'_>]) -> Vec<Result<()>> {
        let mut datas: Vec<_> = loading.iter().map(|l| cores[l.index].data.lock()).collect();
        let mut staged: Vec<Result<Option<transfer::Staged>>> = loading
            .iter()
            .zip(&mut datas)
            .map(|(l, d)| {
                let c = &cores[l.index];
                unwind_safe(&c.name, || {
                    let reuse = l.reuse.take();
                    let (s, pinned) =
                        self.transfer.stage(c, d, &l.job, &l.host_done, &self.counters, reuse)?;
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
            .map(|((l, d), s)| match s? {
                Some(staged) => self.transfer.finish(&cores[l.index], d, staged, &self.counters),
                None => Ok(()),
            })
            .collect()
    }

    pub(super) fn oom(
        &self,
        lk: &Ledger,
        core: &ModelCore,
        loc: Location,
        n: u64,
        waited: Option<Duration>,
    ) -> Error {
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
    pub(super) fn gave_up(&self, lk: &Ledger, g: Gave, core: &ModelCore, loc: Location, n: u64) -> Error {
        let waited = match g {
            Gave::Up => None,
            Gave::TimedOut(d) => Some(d),
        };
        self.oom(lk, core, loc, n, waited)
    }

    /// Whether loading `c` as `job` copies it into pageable host memory (not
    /// mapped, not pinned): such a load can reuse a cached buffer.
    fn copies_to_pageable(&self, lk: &Locked<'_>, c: &ModelCore, job: &LoadJob) -> bool {
        let cpu = c.runtime() == Location::Cpu;
        let pins = !cpu && self.transfer.pin != Pinning::Off && c.bytes > 0 && c.bytes <= lk.pinned_free();
        job.host && c.bytes > 0 && !(cpu && self.transfer.map_files) && !pins
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
    pub(super) fn on_idle_id(&self, core: &ModelCore) {
        if self.held_here() {
            // Released by engine code under the lock: handled when it lets go.
            self.deferred.lock().idle.push(core.id);
            return;
        }
        self.on_idle(core);
    }

    #[cold]
    pub(super) fn on_idle(&self, core: &ModelCore) {
        let mut lk = self.lock();
        lk.changed = true; // waiters look again
        if core.policy == OffloadPolicy::Eager {
            let claims = self.claim(&mut lk, &[core.id], core.runtime());
            for (_, e) in self.run_evictions(&mut lk, claims, false) {
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
            return match self.run_evictions(&mut lk, claims, false).into_iter().next() {
                Some((_, e)) => Err(e),
                None => Ok(()),
            };
        }
    }
}

/// The name of a batch of models, for errors.
pub(super) fn batch_name(cores: &[Arc<ModelCore>]) -> String {
    cores.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(" + ")
}

impl Error {
    /// Renames the model an `OutOfMemory` error is about (a batch's name).
    pub(super) fn named(mut self, name: String) -> Error {
        if let Error::OutOfMemory { model, .. } = &mut self {
            *model = name;
        }
        self
    }
}
