//! A loom model of the protocol in `src/engine/` (module docs of `engine/mod.rs`):
//! - a guard on a ready model is a CAS on `state` (READY bit | use count), no lock;
//! - an evictor, under the lock, swaps `state` from exactly READY to 0;
//! - a thread that waits for room counts itself in `waiters` *before* it looks,
//!   reads the use count with a read-modify-write, and a guard that drops the
//!   last use notifies under the lock if anyone waits.
//!
//! Properties checked over every interleaving loom explores:
//! 1. a model is never evicted while a guard on it is alive;
//! 2. a waiter never misses the release it waits for (loom reports a deadlock if it does);
//! 3. after everything, the use count is zero.
//!
//! Run: `cd loom && RUSTFLAGS="--cfg loom" cargo test --release`

#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

const READY: u64 = 1 << 63;
const USES: u64 = READY - 1;

struct Model {
    state: AtomicU64,
    waiters: AtomicUsize,
    /// `true` while the weights are resident (the pool's accounting, under the lock).
    lock: Mutex<bool>,
    cond: Condvar,
    /// Set by a guard holder while it computes; must never be seen by an evictor.
    in_use: AtomicBool,
}

impl Model {
    fn new() -> Self {
        Model {
            state: AtomicU64::new(READY),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(true),
            cond: Condvar::new(),
            in_use: AtomicBool::new(false),
        }
    }

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

    /// Slow path: wait until the model is resident again (reloaded by someone), then hit.
    fn acquire(&self) {
        if self.try_hit() {
            return;
        }
        let mut resident = self.lock.lock().unwrap();
        self.waiters.fetch_add(1, SeqCst);
        loop {
            if self.try_hit() {
                break;
            }
            if !*resident {
                // Reload (the bytes move without the lock in the real code; here it is instant).
                *resident = true;
                self.state.store(READY | 1, SeqCst);
                break;
            }
            resident = self.cond.wait(resident).unwrap();
        }
        self.waiters.fetch_sub(1, SeqCst);
    }

    fn release(&self) {
        let prev = self.state.fetch_sub(1, SeqCst);
        assert!(prev & USES > 0);
        if prev & USES == 1 && self.waiters.load(SeqCst) > 0 {
            let _g = self.lock.lock().unwrap();
            self.cond.notify_all();
        }
    }

    /// An evictor that needs this model's room: waits until it is idle, then evicts it.
    fn evict_when_idle(&self) {
        let mut resident = self.lock.lock().unwrap();
        self.waiters.fetch_add(1, SeqCst);
        loop {
            if !*resident {
                break; // someone else evicted it
            }
            // Read with a read-modify-write (as `uses_for_waiter` does): a later
            // release reads from it and so sees `waiters`. A plain load or a failed
            // CAS would rely on SeqCst store-buffer ordering, which loom flags.
            let s = self.state.fetch_add(0, SeqCst);
            if s == READY && self.state.compare_exchange(READY, 0, SeqCst, SeqCst).is_ok() {
                assert!(!self.in_use.load(SeqCst), "evicted a model in use");
                *resident = false;
                break;
            }
            resident = self.cond.wait(resident).unwrap();
        }
        self.waiters.fetch_sub(1, SeqCst);
    }
}

fn use_once(m: &Model) {
    m.acquire();
    m.in_use.store(true, SeqCst);
    thread::yield_now();
    m.in_use.store(false, SeqCst);
    m.release();
}

#[test]
fn guard_and_evictor() {
    loom::model(|| {
        let m = Arc::new(Model::new());
        let m1 = m.clone();
        let user = thread::spawn(move || use_once(&m1));
        m.evict_when_idle();
        user.join().unwrap();
        assert_eq!(m.state.load(SeqCst) & USES, 0);
    });
}

#[test]
fn two_users_and_an_evictor() {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(|| {
        let m = Arc::new(Model::new());
        let users: Vec<_> = (0..2)
            .map(|_| {
                let m = m.clone();
                thread::spawn(move || use_once(&m))
            })
            .collect();
        m.evict_when_idle();
        for u in users {
            u.join().unwrap();
        }
        assert_eq!(m.state.load(SeqCst) & USES, 0);
    });
}
