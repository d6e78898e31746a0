//! Registration: naming, admission to host memory (or straight to disk),
//! packing a CUDA model's home, and unregistration.

use super::*;

impl Engine {
    pub(crate) fn register<T: ResourceUser>(&self, model: &T, opts: ManageOptions) -> Result<Arc<ModelCore>> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let type_name = crate::error::short_type_name(std::any::type_name::<T>());
        let label = opts.name.clone().unwrap_or_else(|| type_name.to_string());
        // A model known from a file's header alone is registered from it, on
        // the disk tier: nothing is read until a guard needs it.
        let declared = user::declared_inventory(model as &dyn std::any::Any);
        let on_disk = declared.is_some();
        let mut inv = match declared {
            Some(inv) => inv,
            None => user::inventory(&label, model.tensors())?,
        };
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
        let spill = self.spill_dir.as_deref().map(|d| crate::tier::spill::SpillFile::new(d, id));
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
            ModelData::new(inv.groups, spill, source),
        ));
        if on_disk {
            self.admit_on_disk(&core);
        } else {
            self.admit(&core).map_err(release_name)?;
        }
        Ok(core)
    }

    /// Registers a model whose weights are only in its source file (opened
    /// from its header): no host bytes, its clean disk copy is that file.
    fn admit_on_disk(&self, core: &Arc<ModelCore>) {
        let mut lk = self.lock();
        lk.insert(core.clone(), Residency { disk: Some(0), ..Residency::default() }, false);
        self.emit(core, EventKind::Registered, None, Some(Location::Disk));
    }

    /// Accounts a new model's host bytes, making room (or spilling the model
    /// itself straight to disk) so that the host pool stays within budget. A
    /// CUDA model's home is packed into one buffer, pinned within the cap.
    pub(super) fn admit(&self, core: &Arc<ModelCore>) -> Result<()> {
        let cuda = core.runtime() != Location::Cpu;
        let has_source = core.data.lock().source.is_some();
        let mut lk = self.lock();
        let mut res = Residency { host: true, disk: has_source.then_some(0), ..Residency::default() };
        let need = res.charge(core, Location::Cpu);
        let mut failed = Vec::new();
        loop {
            self.reclaim_spares(&mut lk, Location::Cpu, need, &[]);
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
                    let claims = self.claim_victims(&mut lk, &victims, Location::Cpu, &mut failed);
                    failed.extend(self.run_evictions(&mut lk, claims, false).into_iter().map(|(id, _)| id));
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
                self.transfer.evict(core, &mut d, &job, &Cell::new(false), &self.counters, false)
            })
        });
        match res {
            Ok(_) => {
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
    pub(super) fn pack(&self, lk: &mut Locked<'_>, core: &Arc<ModelCore>, res: Residency) {
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
            if let Some(p) = core.data.lock().spill.as_ref().map(|f| f.path()) {
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
}

/// The CUDA pool with the most free budget (the lowest index on a tie).
pub(super) fn most_free_cuda(lk: &Ledger) -> Option<Location> {
    lk.pools()
        .iter()
        .filter(|p| matches!(p.location, Location::Cuda(_)))
        .max_by_key(|p| (p.free(), std::cmp::Reverse(p.location)))
        .map(|p| p.location)
}
