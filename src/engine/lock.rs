//! The engine's lock, held ([`Locked`]): tokens dropped while their thread
//! holds it leave their undo to it, and it applies them before letting go;
//! then it wakes waiters, runs eager offloads released meanwhile, and
//! delivers events.

use super::*;

/// A reservation's undo, applied by whoever holds the lock next.
pub(crate) struct Undo {
    pub(super) core: Arc<ModelCore>,
    pub(super) res: Residency,
    pub(super) restore_ready: bool,
}

/// Work left by tokens dropped while their thread held the lock.
#[derive(Default)]
pub(super) struct Deferred {
    pub(super) undo: Vec<Undo>,
    /// Models whose last use was released under the lock (eager offload, wake-ups).
    pub(super) idle: Vec<u64>,
}

thread_local! {
    /// The engine whose lock this thread holds (its address), or 0.
    pub(super) static HELD: Cell<usize> = const { Cell::new(0) };
}

/// The engine's lock, held. Tokens dropped meanwhile leave their undo to it:
/// it applies them before releasing the lock, then wakes waiters if the
/// ledger changed, offloads eager models released meanwhile, and delivers
/// events.
pub(crate) struct Locked<'a> {
    pub(super) engine: &'a Engine,
    pub(super) st: Option<MutexGuard<'a, Ledger>>,
    pub(super) changed: bool,
    /// Host buffers given back under the lock, freed once it is released.
    pub(super) garbage: Vec<tch::Tensor>,
}

impl<'a> Locked<'a> {
    pub(crate) fn engine(&self) -> &'a Engine {
        self.engine
    }

    /// Applies what tokens left while this thread held the lock.
    pub(super) fn drain(&mut self) {
        let undo = {
            let mut d = self.engine.deferred.lock();
            if !d.idle.is_empty() {
                self.changed = true; // a release: waiters look again
            }
            std::mem::take(&mut d.undo)
        };
        if !undo.is_empty() {
            self.changed = true;
        }
        for u in undo {
            self.apply(u);
        }
    }

    pub(super) fn apply(&mut self, u: Undo) {
        let id = u.core.id;
        if self.get(id).is_none() {
            return;
        }
        self.transition(id, u.res);
        self.set_moving(id, false);
        if u.restore_ready && u.res.on_runtime(&u.core) {
            u.core.state.fetch_or(READY, SeqCst);
        }
    }

    /// Frees `bufs` (host buffers given back) once the lock is released.
    pub(super) fn free_later(&mut self, bufs: Vec<tch::Tensor>) {
        self.garbage.extend(bufs);
    }

    /// Runs `f` without the lock.
    pub(crate) fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.flush();
        let garbage = std::mem::take(&mut self.garbage);
        let _relocked = Released::new(self.engine);
        MutexGuard::unlocked(self.st.as_mut().expect("held"), || {
            free_buffers(garbage);
            f()
        })
    }

    /// Applies deferred work and wakes waiters for changes made so far.
    pub(super) fn flush(&mut self) {
        self.drain();
        if std::mem::take(&mut self.changed) {
            self.engine.signal.notify();
        }
    }

    /// Waits for a change (a release, a finished move) as `wait` allows.
    pub(crate) fn wait(&mut self, wait: Wait) -> std::result::Result<(), Gave> {
        self.flush();
        let garbage = std::mem::take(&mut self.garbage);
        if !garbage.is_empty() {
            self.unlocked(|| free_buffers(garbage));
        }
        let _relocked = Released::new(self.engine);
        self.engine.signal.wait(self.st.as_mut().expect("held"), wait)
    }

    /// Waits for a change with no deadline (for moves, which always end).
    pub(super) fn wait_forever(&mut self) {
        self.flush();
        let _relocked = Released::new(self.engine);
        self.engine.signal.wait_forever(self.st.as_mut().expect("held"));
    }
}

/// Frees host buffers given back (outside the engine's lock) and returns
/// their memory to the system.
fn free_buffers(bufs: Vec<tch::Tensor>) {
    if !bufs.is_empty() {
        drop(bufs);
        crate::tier::ffi::release_free_memory();
    }
}

/// Marks the lock as not held by this thread while a `Locked` lets go of it
/// (to move bytes, or to wait), and as held again when it has it back, also
/// when unwinding from a panic in between (parking_lot relocks on unwind): a
/// token dropped then must defer its undo, not take the lock again.
struct Released(usize);

impl Released {
    fn new(engine: &Engine) -> Released {
        HELD.set(0);
        Released(engine as *const Engine as usize)
    }
}

impl Drop for Released {
    fn drop(&mut self) {
        HELD.set(self.0);
    }
}

impl Deref for Locked<'_> {
    type Target = Ledger;
    fn deref(&self) -> &Ledger {
        self.st.as_ref().expect("held")
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Ledger {
        self.changed = true;
        self.st.as_mut().expect("held")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.drain();
        let idle: Vec<Arc<ModelCore>> = std::mem::take(&mut self.engine.deferred.lock().idle)
            .into_iter()
            .filter_map(|id| self.get(id).map(|e| e.core.clone()))
            .collect();
        drop(self.st.take());
        HELD.set(0);
        free_buffers(std::mem::take(&mut self.garbage));
        if self.changed {
            self.engine.signal.notify();
        }
        for core in idle {
            self.engine.on_idle(&core);
        }
        self.engine.deliver();
    }
}
