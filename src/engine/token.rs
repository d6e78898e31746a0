//! What a caller takes from the engine, as values that give it back on drop:
//! a [`Use`] of a model (one guard's worth), and a [`Reservation`] of a
//! model's bytes while they move. An early return or a panic anywhere then
//! releases what was taken. Dropping one while holding the engine's lock is
//! safe: the undo is deferred to the lock's release (see `Engine::undo`).

use std::sync::Arc;

use super::ledger::Residency;
use super::model::ModelCore;
use super::{Engine, Locked, Undo};

/// One use of a model: it stays on its runtime location while any use lives.
#[must_use = "dropping a use releases it at once"]
pub(crate) struct Use<'a> {
    engine: &'a Engine,
    core: &'a ModelCore,
}

impl<'a> Use<'a> {
    /// Wraps a use the caller has just taken (a successful `try_hit`, or a load).
    pub(crate) fn new(engine: &'a Engine, core: &'a ModelCore) -> Use<'a> {
        Use { engine, core }
    }

    /// Hands the use over to a guard that releases it itself.
    pub(crate) fn forget(self) {
        std::mem::forget(self);
    }
}

impl Drop for Use<'_> {
    fn drop(&mut self) {
        self.engine.release(self.core);
    }
}

/// A use that owns handles on its engine and model (crosses threads and tasks).
#[must_use = "dropping a use releases it at once"]
pub(crate) struct OwnedUse {
    engine: Arc<Engine>,
    core: Arc<ModelCore>,
}

#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
impl OwnedUse {
    /// Takes over a borrowed use.
    pub(crate) fn from_use(u: Use<'_>, engine: Arc<Engine>, core: Arc<ModelCore>) -> OwnedUse {
        debug_assert!(std::ptr::eq(u.core, &*core) && std::ptr::eq(u.engine, &*engine));
        u.forget();
        OwnedUse { engine, core }
    }

    /// Hands the use over to a guard that releases it itself.
    pub(crate) fn forget(self) {
        std::mem::forget(self);
    }
}

impl Drop for OwnedUse {
    fn drop(&mut self) {
        self.engine.release(&self.core);
    }
}

/// A model's bytes reserved in the ledger while they move: the model is
/// marked moving with the residency it will have. [`Reservation::publish`]
/// sets the residency it ended with; dropping it unpublished (an early
/// return, a panic) puts back the residency it had.
#[must_use = "dropping a reservation undoes it"]
pub(crate) struct Reservation<'a> {
    engine: &'a Engine,
    pub(crate) core: Arc<ModelCore>,
    pub(crate) before: Residency,
    /// Set `READY` again on undo (an eviction claim took it from an idle resident model).
    restore_ready: bool,
    armed: bool,
}

impl<'a> Reservation<'a> {
    /// Marks `core` moving with residency `to`, remembering the one it had.
    pub(crate) fn take(
        lk: &mut Locked<'a>,
        core: Arc<ModelCore>,
        to: Residency,
        restore_ready: bool,
    ) -> Reservation<'a> {
        let before = lk.res(core.id);
        lk.transition(core.id, to);
        lk.set_moving(core.id, true);
        Reservation { engine: lk.engine(), core, before, restore_ready, armed: true }
    }

    /// The move ended with residency `to`: publish it and clear `moving`.
    pub(crate) fn publish(mut self, lk: &mut Locked<'_>, to: Residency) {
        self.armed = false;
        lk.transition(self.core.id, to);
        lk.set_moving(self.core.id, false);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::debug!(model = %self.core.name, "a reservation was dropped unpublished: undone");
            self.engine.undo(Undo {
                core: self.core.clone(),
                res: self.before,
                restore_ready: self.restore_ready,
            });
        }
    }
}
