//! A loom model of the hand-over from the plain guard path to the commit path
//! (`src/patch/commit.rs` module docs, `Managed::acquire`):
//! - a plain guard checks `active` (relaxed), increments the use count, then
//!   checks `active` again (`SeqCst`) and backs off if it is now set;
//! - `commit` stores `active` (`SeqCst`); the rebase that follows, holding a use
//!   of its own counted in `engaged`, changes the weights only when the use count
//!   equals `engaged` (no plain guard alive), else it waits.
//!
//! Property checked over every interleaving: the rebase never writes the weights
//! while a plain guard reads them. (Removing either the back-off or the wait
//! makes it fail. Loom does not explore store-buffer reordering, so it does not
//! catch weakening the `SeqCst` pair to release/relaxed: that requirement is
//! argued in `src/commit.rs`, not checked here.)
//!
//! Run: `cd loom && RUSTFLAGS="--cfg loom" cargo test --release`

#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use loom::sync::Arc;
use loom::thread;

#[derive(Default)]
struct Model {
    uses: AtomicU64,
    active: AtomicBool,
    engaged: AtomicU64,
    reading: AtomicBool,
    writing: AtomicBool,
}

impl Model {
    /// A plain guard: returns whether it used the model (else it took the commit path).
    fn plain_guard(&self) -> bool {
        if self.active.load(Relaxed) {
            return false;
        }
        self.uses.fetch_add(1, SeqCst);
        if self.active.load(SeqCst) {
            self.uses.fetch_sub(1, SeqCst); // back off
            return false;
        }
        self.reading.store(true, SeqCst);
        assert!(!self.writing.load(SeqCst), "a rebase wrote the weights under a plain guard");
        self.reading.store(false, SeqCst);
        self.uses.fetch_sub(1, SeqCst);
        true
    }

    /// `commit`, then a guard on the commit path that rebases.
    fn commit_and_rebase(&self) {
        self.active.store(true, SeqCst);
        self.uses.fetch_add(1, SeqCst);
        self.engaged.fetch_add(1, SeqCst);
        while self.uses.load(SeqCst) > self.engaged.load(SeqCst) {
            thread::yield_now(); // a plain guard is alive: wait for it
        }
        self.writing.store(true, SeqCst);
        assert!(!self.reading.load(SeqCst), "a plain guard read the weights during a rebase");
        self.writing.store(false, SeqCst);
        self.engaged.fetch_sub(1, SeqCst);
        self.uses.fetch_sub(1, SeqCst);
    }
}

#[test]
fn a_rebase_never_overlaps_a_plain_guard() {
    loom::model(|| {
        let m = Arc::new(Model::default());
        let plain = {
            let m = m.clone();
            thread::spawn(move || m.plain_guard())
        };
        m.commit_and_rebase();
        plain.join().unwrap();
        assert_eq!(m.uses.load(SeqCst), 0);
    });
}
