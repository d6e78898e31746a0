//! Loom models of sire's engine protocols: see `tests/` and `README.md`.
//!
//! This library only holds [`explore`], which the newer models use to run a
//! model and print how many interleavings loom explored and how long it took
//! (the figures in `README.md`).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// Runs `f` under loom (every interleaving, or those within
/// `preemption_bound` preemptions when it is `Some`) and prints the number of
/// executions explored and the time taken, as `loom[name]: N interleavings in S s`
/// (shown with `cargo test -- --nocapture`).
pub fn explore<F>(name: &str, preemption_bound: Option<usize>, f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let mut b = loom::model::Builder::new();
    if preemption_bound.is_some() {
        b.preemption_bound = preemption_bound;
    }
    let start = Instant::now();
    b.check(move || {
        counted.fetch_add(1, Relaxed);
        f();
    });
    let bound = preemption_bound.map_or(String::new(), |p| format!(" (preemption bound {p})"));
    println!(
        "loom[{name}]: {} interleavings in {:.2} s{bound}",
        runs.load(Relaxed),
        start.elapsed().as_secs_f64()
    );
}
