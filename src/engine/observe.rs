//! What the engine shows: events for the listener, statistics, locations,
//! and the ledger's invariants for tests.

use super::*;

impl Engine {
    /// Queues an event for the listener. Called under the lock, so the queue is
    /// in publication order (lock order: ledger, then `events`).
    pub(super) fn emit(
        &self,
        core: &ModelCore,
        kind: EventKind,
        from: Option<Location>,
        to: Option<Location>,
    ) {
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
    pub(super) fn deliver(&self) {
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
                let cached = if p.location == Location::Cpu { lk.cached() } else { 0 };
                PoolStats { location: p.location, budget: p.budget, used: p.used(), cached, residents }
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

    /// The ledger's invariants, checked now (see `Ledger::verify`).
    pub(crate) fn verify(&self) -> std::result::Result<(), String> {
        self.lock().verify()
    }

    /// The ledger's invariants (tests).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        if let Err(e) = self.verify() {
            panic!("{e}");
        }
    }
}
