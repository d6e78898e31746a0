//! A loom model of waiting for room against a guard dropping, as the engine
//! does it (`src/engine/`):
//! - `Engine::acquire_slow` (acquire.rs) counts the caller as a waiter
//!   (`Signal::count`, signal.rs) *before* it takes the lock and looks for
//!   room; under the lock it tries a hit, waits if the model is moving, asks
//!   `Engine::room` (evict.rs), which reads other models' use counts with a
//!   read-modify-write (`ModelCore::uses_for_waiter`, model.rs): `Free` loads,
//!   `Evict` claims the idle victim (`Engine::claim`: CAS of `state` from exactly
//!   `READY` to 0) and runs the eviction without the lock
//!   (`Engine::run_evictions`, `Locked::unlocked`), `Wait` sleeps on the
//!   condition variable (`Locked::wait` → `Signal::wait`);
//! - `Engine::release` (acquire.rs) decrements the use count and, if it was the
//!   last use and `Signal::waiting() > 0`, calls `on_idle_id`: at once
//!   (`on_idle` takes the lock and marks it changed) or, when the releasing
//!   thread holds the lock (engine code dropping a `Use`, as the error path of
//!   `acquire_slow` does), by pushing the model to `Deferred::idle`, which
//!   `Locked::drain` turns into a change when the lock is released;
//! - `Locked::drop` (lock.rs) releases the mutex *first* and notifies after,
//!   if anything changed; `Locked::unlocked` and `Locked::wait` notify for the
//!   changes made so far (`flush`) before they let go of the lock.
//!
//! One pool with room for one model; every model costs 1. A user holds the
//! only resident model (`A`) and drops its guard; waiters need room for other
//! models. Properties checked over every interleaving loom explores:
//! 1. no lost wake-up: each waiter ends with a use of its model (loom reports a
//!    deadlock if one sleeps for ever);
//! 2. a model is never evicted while a guard on it is alive;
//! 3. the pool never holds more than its budget, and at the end holds exactly
//!    the last model loaded.
//!
//! Broken variants loom catches (checked by hand, not committed): count the
//! waiter *after* looking, i.e. in `acquire` move `let _counted = self.count();`
//! into the `Room::Wait` arm (`Room::Wait => { let _c = self.count(); lk.wait() }`).
//! The release then reads
//! `waiting() == 0` between the waiter's look and its count, does not notify,
//! and loom reports a deadlock (`guard_drop_wakes_a_waiter_for_room`).
//! Notifying from `Locked::drop` without `Deferred::idle` counting as a
//! change (`drain` not setting `changed`) is caught the same way by
//! `a_release_under_the_lock_wakes_a_waiter_for_room`. Reading the use count
//! with a plain load in `uses_for_waiter` (`self.state.load(SeqCst)` instead
//! of `fetch_add(0, SeqCst)`) is caught too: loom's `SeqCst` does not give the
//! store-buffer ordering a plain load would rely on, which is why the real
//! code uses a read-modify-write.
//!
//! Run: `cd loom && RUSTFLAGS="--cfg loom" cargo test --release --test room -- --nocapture`

#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
use loom::thread;
use std::cell::Cell;

use sire_loom::explore;

const READY: u64 = 1 << 63;
const USES: u64 = READY - 1;

/// `ModelCore`: the lock-free state word, and a flag the model's user sets
/// while it computes (must never be seen by an eviction).
struct Core {
    state: AtomicU64,
    in_use: AtomicBool,
}

impl Core {
    /// `ModelCore::try_hit`.
    fn try_hit(&self) -> bool {
        let mut s = self.state.load(Acquire);
        while s & READY != 0 {
            match self.state.compare_exchange(s, s + 1, SeqCst, Acquire) {
                Ok(_) => return true,
                Err(x) => s = x,
            }
        }
        false
    }

    /// `ModelCore::uses_for_waiter`: a read-modify-write, so that a later
    /// release reads from it and sees the reader's earlier waiter count.
    fn uses_for_waiter(&self) -> u64 {
        self.state.fetch_add(0, SeqCst) & USES
    }
}

/// One model in the `Ledger`: resident on the runtime pool, being moved.
#[derive(Clone, Copy, Default)]
struct Entry {
    resident: bool,
    moving: bool,
}

struct Ledger {
    used: u64,
    budget: u64,
    models: Vec<Entry>,
}

impl Ledger {
    /// `Ledger::transition`, reduced to residency on the one pool.
    fn transition(&mut self, i: usize, resident: bool) {
        let was = std::mem::replace(&mut self.models[i].resident, resident);
        self.used = self.used - was as u64 + resident as u64;
        assert!(self.used <= self.budget, "the pool holds more than its budget");
    }
}

/// `Room` (policy.rs).
enum Room {
    Free,
    Evict(usize),
    Wait,
}

struct Engine {
    state: Mutex<Ledger>,
    /// `Deferred::idle`: models whose last use was released under the lock.
    deferred_idle: Mutex<Vec<usize>>,
    /// `Signal`: the condition variable and the waiter count.
    cond: Condvar,
    waiters: AtomicUsize,
    cores: Vec<Core>,
}

/// One thread's `HELD` (lock.rs): whether it holds the engine's lock.
#[derive(Default)]
struct Me {
    held: Cell<bool>,
}

/// `Locked`.
struct Locked<'a> {
    e: &'a Engine,
    me: &'a Me,
    st: Option<MutexGuard<'a, Ledger>>,
    changed: bool,
}

/// `signal::Counted`.
struct Counted<'a>(&'a Engine);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, SeqCst);
    }
}

impl Engine {
    /// `n` models, the first resident and held by one guard; room for one.
    fn new(n: usize) -> Engine {
        let mut models = vec![Entry::default(); n];
        models[0].resident = true;
        let cores = (0..n)
            .map(|i| Core {
                state: AtomicU64::new(if i == 0 { READY | 1 } else { 0 }),
                in_use: AtomicBool::new(i == 0),
            })
            .collect();
        Engine {
            state: Mutex::new(Ledger { used: 1, budget: 1, models }),
            deferred_idle: Mutex::new(Vec::new()),
            cond: Condvar::new(),
            waiters: AtomicUsize::new(0),
            cores,
        }
    }

    /// `Engine::lock`.
    fn lock<'a>(&'a self, me: &'a Me) -> Locked<'a> {
        assert!(!me.held.get(), "the engine's lock is not reentrant");
        let st = self.state.lock().unwrap();
        me.held.set(true);
        Locked { e: self, me, st: Some(st), changed: false }
    }

    /// `Signal::count`.
    fn count(&self) -> Counted<'_> {
        self.waiters.fetch_add(1, SeqCst);
        Counted(self)
    }

    /// `Engine::room` with `policy::room`: free room, else the idle victim, else wait.
    fn room(&self, lk: &Locked<'_>, want: usize) -> Room {
        let st = lk.read();
        if st.budget - st.used >= 1 {
            return Room::Free;
        }
        let victim = (0..st.models.len()).find(|&j| {
            j != want && st.models[j].resident && !st.models[j].moving && self.cores[j].uses_for_waiter() == 0
        });
        match victim {
            Some(j) => Room::Evict(j),
            None => Room::Wait,
        }
    }

    /// `Engine::acquire` → `acquire_slow` for one model: returns holding a use.
    fn acquire(&self, me: &Me, i: usize) {
        let core = &self.cores[i];
        if core.try_hit() {
            return;
        }
        // Counted before looking for room: see `signal`.
        let _counted = self.count();
        let mut lk = self.lock(me);
        loop {
            if core.try_hit() {
                return;
            }
            if lk.read().models[i].moving {
                lk.wait();
                continue;
            }
            match self.room(&lk, i) {
                Room::Free => break,
                Room::Evict(j) => {
                    // `claim`: no guard may exist or start (the CAS fails if one does).
                    if self.cores[j].state.compare_exchange(READY, 0, SeqCst, SeqCst).is_err() {
                        continue; // a guard arrived first
                    }
                    assert!(!self.cores[j].in_use.load(SeqCst), "evicted a model in use");
                    lk.st().models[j].moving = true; // `Reservation::take`
                    lk.unlocked(thread::yield_now); // `run_evictions`: the bytes move
                    let st = lk.st(); // `Reservation::publish`
                    st.transition(j, false);
                    st.models[j].moving = false;
                }
                Room::Wait => lk.wait(),
            }
        }
        // Reserve, move without the lock, publish.
        {
            let st = lk.st();
            st.transition(i, true);
            st.models[i].moving = true;
        }
        lk.unlocked(thread::yield_now);
        lk.st().models[i].moving = false;
        core.state.store(READY | 1, SeqCst);
    }

    /// `Engine::release`.
    fn release(&self, me: &Me, i: usize) {
        let prev = self.cores[i].state.fetch_sub(1, SeqCst);
        assert!(prev & USES > 0, "release without acquire");
        if prev & USES == 1 && self.waiters.load(SeqCst) > 0 {
            // `on_idle_id`
            if me.held.get() {
                self.deferred_idle.lock().unwrap().push(i);
            } else {
                // `on_idle` (lazy policy: no eager offload).
                let mut lk = self.lock(me);
                lk.changed = true;
            }
        }
    }
}

impl<'a> Locked<'a> {
    /// The ledger, for writing (`DerefMut`: counts as a change).
    fn st(&mut self) -> &mut Ledger {
        self.changed = true;
        self.st.as_mut().expect("held")
    }

    fn read(&self) -> &Ledger {
        self.st.as_ref().expect("held")
    }

    /// `Locked::drain`: a release deferred to this lock is a change.
    fn drain(&mut self) {
        if !std::mem::take(&mut *self.e.deferred_idle.lock().unwrap()).is_empty() {
            self.changed = true;
        }
    }

    /// `Locked::flush`.
    fn flush(&mut self) {
        self.drain();
        if std::mem::take(&mut self.changed) {
            self.e.cond.notify_all();
        }
    }

    /// `Locked::unlocked`.
    fn unlocked(&mut self, f: impl FnOnce()) {
        self.flush();
        drop(self.st.take());
        self.me.held.set(false);
        f();
        self.st = Some(self.e.state.lock().unwrap());
        self.me.held.set(true);
    }

    /// `Locked::wait` → `Signal::wait` with no deadline.
    fn wait(&mut self) {
        self.flush();
        let st = self.st.take().expect("held");
        self.me.held.set(false);
        self.st = Some(self.e.cond.wait(st).unwrap());
        self.me.held.set(true);
    }
}

impl Drop for Locked<'_> {
    /// `Locked::drop`: drain, release the mutex, then notify if anything changed.
    fn drop(&mut self) {
        self.drain();
        drop(self.st.take());
        self.me.held.set(false);
        if self.changed {
            self.e.cond.notify_all();
        }
    }
}

/// The user of model 0: computes, then drops its guard (plainly, or, with
/// `under_lock`, from engine code holding the lock).
fn drop_guard(e: &Engine, under_lock: bool) {
    let me = Me::default();
    thread::yield_now(); // computing
    e.cores[0].in_use.store(false, SeqCst);
    if under_lock {
        let lk = e.lock(&me);
        e.release(&me, 0);
        drop(lk);
    } else {
        e.release(&me, 0);
    }
}

/// A caller that needs room for model `i`: takes a use, computes, drops it.
fn use_model(e: &Engine, i: usize) {
    let me = Me::default();
    e.acquire(&me, i);
    e.cores[i].in_use.store(true, SeqCst);
    thread::yield_now(); // computing
    e.cores[i].in_use.store(false, SeqCst);
    e.release(&me, i);
}

/// Model 0 held and dropped on one thread, a waiter for model 1 on the main
/// thread; at the end model 1 is the one resident.
fn one_waiter(under_lock: bool) {
    let e = Arc::new(Engine::new(2));
    let u = {
        let e = e.clone();
        thread::spawn(move || drop_guard(&e, under_lock))
    };
    use_model(&e, 1);
    u.join().unwrap();
    let st = e.state.lock().unwrap();
    assert_eq!(st.used, 1);
    assert!(st.models[1].resident && !st.models[0].resident);
    assert_eq!(e.cores[0].state.load(SeqCst), 0);
    assert_eq!(e.cores[1].state.load(SeqCst), READY);
    assert_eq!(e.waiters.load(SeqCst), 0);
}

#[test]
fn guard_drop_wakes_a_waiter_for_room() {
    explore("room: guard drop vs one waiter", None, || one_waiter(false));
}

#[test]
fn a_release_under_the_lock_wakes_a_waiter_for_room() {
    explore("room: release under the lock vs one waiter", None, || one_waiter(true));
}

/// Two waiters for two other models: the second is woken by the first one's
/// release (its own last use), not only by the original guard's.
#[test]
fn two_waiters_are_each_woken() {
    explore("room: guard drop vs two waiters", Some(2), || {
        let e = Arc::new(Engine::new(3));
        let u = {
            let e = e.clone();
            thread::spawn(move || drop_guard(&e, false))
        };
        let w = {
            let e = e.clone();
            thread::spawn(move || use_model(&e, 2))
        };
        use_model(&e, 1);
        u.join().unwrap();
        w.join().unwrap();
        let st = e.state.lock().unwrap();
        assert_eq!(st.used, 1);
        assert!(!st.models[0].resident && st.models[1].resident != st.models[2].resident);
        assert_eq!(e.waiters.load(SeqCst), 0);
    });
}
