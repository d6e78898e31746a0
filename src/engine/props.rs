//! Property test of the ledger and its self-undoing tokens: random sequences of
//! reservations (published, dropped with or without the lock, or unwound by a
//! panic), patch updates and engine-level loads and offloads keep the ledger's
//! invariants, leave no model moving, and an unpublished reservation puts back
//! exactly the residency it replaced. Nothing here touches a GPU: the CUDA pool
//! is configured by budget and pinning is simulated.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use tch::Tensor;

use super::*;
use crate::TensorSet;

/// One KiB.
const KIB: u64 = 1 << 10;

/// The patch sizes an operation may choose from.
const PATCHES: [u64; 3] = [0, KIB, 4 * KIB];

/// Models driven by the engine as well as by the ledger operations: CPU
/// runtime, offload to disk (the second one offloads eagerly).
const MANAGED: usize = 2;

/// Models driven only through the ledger: one on the CPU, two on `Cuda(0)`.
const LEDGER_ONLY: usize = 3;

/// A residency drawn at random, made valid for a given model by [`Shape::residency`].
#[derive(Debug, Clone)]
struct Shape {
    /// On the CUDA device (CUDA models only).
    dev: bool,
    /// A host copy.
    host: bool,
    /// 0: no disk copy, 1: a source file (no disk bytes), 2: a spill file.
    disk: u8,
    /// Index into [`PATCHES`] (only while on the runtime location).
    patch: u8,
    /// The host copy pinned (CUDA models with a host copy only).
    pinned: bool,
}

impl Shape {
    /// The residency this shape stands for on `core`: no device copy for a CPU
    /// model, patches only on the runtime location, pinned bytes only for the
    /// host copy of a CUDA model.
    fn residency(&self, core: &ModelCore) -> Residency {
        let cuda = core.runtime() != Location::Cpu;
        let mut r = Residency {
            dev: cuda && self.dev,
            host: self.host,
            disk: match self.disk % 3 {
                0 => None,
                1 => Some(0),
                _ => Some(core.bytes),
            },
            patch: 0,
            pinned: 0,
        };
        if r.on_runtime(core) {
            r.patch = PATCHES[self.patch as usize % PATCHES.len()];
        }
        if cuda && r.host && self.pinned {
            r.pinned = core.bytes;
        }
        r
    }
}

/// How a reservation ends.
#[derive(Debug, Clone)]
enum End {
    /// Published with this residency (for a managed model: the one it had,
    /// with this shape's patch; the move "ended where it started").
    Publish(Shape),
    /// Dropped unpublished while its thread holds the lock (undo deferred).
    DropLocked,
    /// Dropped unpublished after the lock was released (undo at once).
    DropUnlocked,
    /// Dropped unpublished inside `Locked::unlocked` (undo at once, lock re-taken after).
    DropInUnlocked,
    /// A panic while the lock is held (the reservation unwinds first).
    PanicLocked,
    /// A panic after the lock was released (the lock unwinds first).
    PanicUnlocked,
}

/// One step of a sequence.
#[derive(Debug, Clone)]
enum Op {
    /// A reservation of model `model` (any of them) with target `to`, ended as `end`.
    Move { model: usize, to: Shape, end: End, restore_ready: bool },
    /// `lk.update(id, |r| r.patch = n)` within budget.
    Patch { model: usize, patch: u8 },
    /// `acquire(Wait::No)` of a managed model, then drop the use.
    Acquire { model: usize },
    /// `offload_now` of a managed model.
    Offload { model: usize },
}

/// A random [`Shape`].
fn shape() -> impl Strategy<Value = Shape> {
    (any::<bool>(), any::<bool>(), 0u8..3, 0u8..3, any::<bool>())
        .prop_map(|(dev, host, disk, patch, pinned)| Shape { dev, host, disk, patch, pinned })
}

/// A random [`End`].
fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        3 => shape().prop_map(End::Publish),
        1 => Just(End::DropLocked),
        1 => Just(End::DropUnlocked),
        1 => Just(End::DropInUnlocked),
        1 => Just(End::PanicLocked),
        1 => Just(End::PanicUnlocked),
    ]
}

/// A random [`Op`].
fn op() -> impl Strategy<Value = Op> {
    let n = MANAGED + LEDGER_ONLY;
    prop_oneof![
        6 => (0..n, shape(), end(), any::<bool>())
            .prop_map(|(model, to, end, restore_ready)| Op::Move { model, to, end, restore_ready }),
        2 => (0..n, 0u8..3).prop_map(|(model, patch)| Op::Patch { model, patch }),
        2 => (0..MANAGED).prop_map(|model| Op::Acquire { model }),
        1 => (0..MANAGED).prop_map(|model| Op::Offload { model }),
    ]
}

/// Whether moving `core` from residency `from` to `to` keeps every pool within
/// its budget and the pinned bytes within the cap.
fn fits(lk: &Ledger, core: &ModelCore, from: Residency, to: Residency) -> bool {
    lk.pools().iter().all(|p| to.charge(core, p.location) <= from.charge(core, p.location) + p.free())
        && to.pinned <= from.pinned + lk.pinned_free()
}

/// The engine under test, its spill directory, the tensor sets it manages
/// (kept alive), and their cores: managed models first, then ledger-only ones.
struct Fixture {
    engine: Engine,
    cores: Vec<Arc<ModelCore>>,
    _sets: Vec<TensorSet>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// A 12 KiB CUDA pool (configured by budget, never touched), a 24 KiB host
    /// pool, a 1 MiB disk pool, simulated pinning capped at 6 KiB, and five
    /// 4 KiB models.
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new(
            vec![(Location::Cuda(0), 12 * KIB), (Location::Cpu, 24 * KIB), (Location::Disk, 1 << 20)],
            Some(dir.path().to_path_buf()),
            Duration::from_secs(1),
        )
        .with_pinning(Pinning::Simulated, 6 * KIB);
        let sets: Vec<TensorSet> = (0..MANAGED + LEDGER_ONLY)
            .map(|i| TensorSet::new([("w", Tensor::full([1024], i as f64, tch::kind::FLOAT_CPU))]).unwrap())
            .collect();
        let opts = |i: usize| {
            let o = ManageOptions::new().name(format!("m{i}"));
            match i {
                0 => o.runtime(Location::Cpu),
                1 => o.runtime(Location::Cpu).policy(OffloadPolicy::Eager),
                2 => o.runtime(Location::Cpu),
                _ => o.runtime(Location::Cuda(0)),
            }
        };
        let cores = sets.iter().enumerate().map(|(i, s)| engine.register(s, opts(i)).unwrap()).collect();
        Fixture { engine, cores, _sets: sets, _dir: dir }
    }

    /// Whether model `i` is also driven by the engine (its ledger residency
    /// must then match where its weights really are).
    fn managed(i: usize) -> bool {
        i < MANAGED
    }

    /// The checks after every step: the invariants hold, no model is left
    /// moving, and a managed model is ready only while on its runtime location.
    fn check(&self) -> Result<(), TestCaseError> {
        let lk = self.engine.lock();
        if let Err(e) = lk.verify() {
            return Err(TestCaseError::fail(format!("ledger invariant broken: {e}")));
        }
        for e in lk.entries() {
            prop_assert!(!e.moving, "`{}` left moving", e.core.name);
        }
        for c in &self.cores[..MANAGED] {
            prop_assert_eq!(c.uses(), 0, "`{}` still in use", &c.name);
            prop_assert!(
                !c.is_ready() || lk.res(c.id).on_runtime(c),
                "`{}` is ready but not on its runtime location",
                &c.name
            );
        }
        Ok(())
    }

    /// Applies one operation and checks its own postconditions.
    fn apply(&self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Move { model, to, end, restore_ready } => self.reserve(*model, to, end, *restore_ready),
            Op::Patch { model, patch } => {
                let core = &self.cores[*model];
                let mut lk = self.engine.lock();
                let r = lk.res(core.id);
                let n = PATCHES[*patch as usize % PATCHES.len()];
                let grows = n.saturating_sub(r.patch);
                if (n > 0 && !r.on_runtime(core)) || grows > lk.free(core.runtime()) {
                    return Ok(()); // not a valid update: skipped
                }
                lk.update(core.id, |r| r.patch = n);
                prop_assert_eq!(lk.res(core.id), Residency { patch: n, ..r });
                Ok(())
            }
            Op::Acquire { model } => {
                let core = &self.cores[*model];
                if let Ok(u) = self.engine.acquire(core, Wait::No) {
                    prop_assert!(
                        self.engine.lock().res(core.id).on_runtime(core),
                        "a use of a model not loaded"
                    );
                    drop(u);
                }
                Ok(())
            }
            Op::Offload { model } => {
                let core = &self.cores[*model];
                if self.engine.offload_now(core).is_ok() {
                    prop_assert!(!self.engine.lock().res(core.id).host, "offloaded yet still in host memory");
                }
                Ok(())
            }
        }
    }

    /// Takes a reservation of model `i` with the residency `to` stands for
    /// (skipped when it does not fit), then ends it as `end` says.
    fn reserve(&self, i: usize, to: &Shape, end: &End, rr: bool) -> Result<(), TestCaseError> {
        let core = &self.cores[i];
        let id = core.id;
        let mut lk = self.engine.lock();
        let before = lk.res(id);
        let target = to.residency(core);
        if !fits(&lk, core, before, target) {
            return Ok(()); // no room for that target: skipped
        }
        // A managed model leaving its runtime location is claimed first, as
        // `Engine::claim` does: READY is taken, and an undo gives it back.
        let leaves = before.on_runtime(core) && !target.on_runtime(core);
        let restore_ready = if Fixture::managed(i) { leaves } else { rr };
        if Fixture::managed(i) && leaves {
            let claimed = core.state.compare_exchange(READY, 0, SeqCst, SeqCst).is_ok();
            prop_assert!(claimed, "an idle model on its runtime location is ready");
        }
        let r = Reservation::take(&mut lk, core.clone(), target, restore_ready);
        prop_assert_eq!(lk.res(id), target);
        prop_assert!(lk.is_moving(id));
        let expect = match end {
            End::Publish(shape) => {
                let mut fin = if Fixture::managed(i) {
                    let mut f = before;
                    if before.on_runtime(core) {
                        f.patch = PATCHES[shape.patch as usize % PATCHES.len()];
                    }
                    f
                } else {
                    shape.residency(core)
                };
                if !fits(&lk, core, target, fin) {
                    fin = before; // always fits: nothing else changed meanwhile
                }
                r.publish(&mut lk, fin);
                if Fixture::managed(i) && leaves {
                    core.state.fetch_or(READY, SeqCst); // back where it was, as a failed eviction does
                }
                prop_assert!(!lk.is_moving(id));
                drop(lk);
                fin
            }
            End::DropLocked => {
                drop(r);
                prop_assert_eq!(lk.res(id), target, "deferred until the lock is released");
                prop_assert!(lk.is_moving(id));
                drop(lk);
                before
            }
            End::DropUnlocked => {
                drop(lk);
                drop(r);
                before
            }
            End::DropInUnlocked => {
                lk.unlocked(|| drop(r));
                prop_assert_eq!(lk.res(id), before, "undone at once without the lock");
                prop_assert!(!lk.is_moving(id));
                drop(lk);
                before
            }
            End::PanicLocked | End::PanicUnlocked => {
                let lock_first = matches!(end, End::PanicUnlocked);
                let caught = catch_unwind(AssertUnwindSafe(move || {
                    // Locals unwind in reverse order: the later one is dropped first.
                    if lock_first {
                        let _r = r;
                        let _lk = lk;
                        resume_unwind(Box::new("injected panic between take and publish"));
                    } else {
                        let _lk = lk;
                        let _r = r;
                        resume_unwind(Box::new("injected panic between take and publish"));
                    }
                }));
                prop_assert!(caught.is_err());
                before
            }
        };
        prop_assert!(!self.engine.held_here(), "the lock was released");
        let lk = self.engine.lock();
        prop_assert_eq!(lk.res(id), expect, "`{}` after {:?}", &core.name, end);
        prop_assert!(!lk.is_moving(id));
        let published = matches!(end, End::Publish(_));
        if !published && restore_ready && before.on_runtime(core) {
            prop_assert!(core.is_ready(), "an undone claim gives READY back");
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random sequences of up to 30 ledger and engine operations keep the
    /// ledger consistent after every step.
    #[test]
    fn tokens_keep_the_ledger_consistent(ops in vec(op(), 1..=30)) {
        let f = Fixture::new();
        f.check()?;
        for op in &ops {
            f.apply(op)?;
            f.check()?;
        }
    }
}

/// Regression: a panic inside `Locked::unlocked` while a reservation is alive
/// (e.g. from `Transfer::finish` in `move_in`, which no `unwind_safe` covers)
/// used to hang the thread: the mutex is re-taken while unwinding, and `HELD`
/// was left at 0, so the reservation's drop undid "at once" and locked the
/// mutex its own thread holds. Runs the scenario on a helper thread and fails
/// after 5 s instead of hanging.
#[test]
fn a_panic_while_unlocked_with_a_live_reservation_is_undone() {
    let f = Arc::new(Fixture::new());
    let (tx, rx) = std::sync::mpsc::channel();
    let f2 = f.clone();
    std::thread::spawn(move || {
        let (e, core) = (&f2.engine, f2.cores[2].clone());
        let caught = catch_unwind(AssertUnwindSafe(|| {
            let mut lk = e.lock();
            let to = Residency { disk: Some(core.bytes), ..lk.res(core.id) };
            let _r = Reservation::take(&mut lk, core.clone(), to, false);
            lk.unlocked(|| resume_unwind(Box::new("injected panic while moving")));
        }));
        tx.send(caught.is_err()).unwrap();
    });
    let caught = rx.recv_timeout(Duration::from_secs(5)).expect("the unwinding thread deadlocked");
    assert!(caught);
    f.check().unwrap();
}
