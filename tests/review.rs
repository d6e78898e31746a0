//! Review repros: each test states the contract it checks and FAILS on the
//! current code when the defect is present.
//!
//! Copy to tests/review.rs (it uses tests/common), then run:
//! `cargo test --features tokio --test review`

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sire::{
    auto_manage, auto_manage_all, Commit, Error, Location, ResourcePoolManagement, ResourceUser,
    SharedModelManager, TensorSet,
};
use tch::{Device, Kind, Tensor};

fn pools_timeout(cpu: u64, timeout: Duration) -> (ResourcePoolManagement, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let p = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(cpu)
        .spill_dir(dir.path())
        .wait_timeout(timeout)
        .build()
        .unwrap();
    (p, dir)
}

fn ones(n: i64) -> TensorSet {
    TensorSet::new([("w", Tensor::ones([n], (Kind::Float, Device::Cpu)))]).unwrap()
}

/// Contract (`auto_manage_all` docs): "All or nothing: on an error no model is
/// held". With two commit-active models where the first one's commit path
/// fails (another variant holds it), the second keeps the plain use that
/// `acquire_many` took: it leaks, and the model can never be offloaded/evicted.
#[test]
fn auto_manage_all_leaks_a_use_when_a_commit_path_fails() {
    let (pools, _d) = pools_timeout(64 * MIB, Duration::from_millis(200));
    let a = pools.manage(ones(1024)).unwrap();
    let b = pools.manage(ones(1024)).unwrap();
    let a2 = a.variant(); // activates the commit path on `a`
    a2.commit(Commit::delta("w", Tensor::ones([1024], (Kind::Float, Device::Cpu)))).unwrap();
    let _b2 = b.variant(); // activates the commit path on `b`
    let held = auto_manage(&a2).unwrap(); // `a` is held with another stack than `a`'s
    let err = auto_manage_all(&[a.handle(), b.handle()]).unwrap_err();
    assert!(matches!(err, Error::InUse { .. }), "{err}");
    drop(held);
    assert_eq!(a.use_count(), 0);
    // The batch failed and was never returned: nothing may hold `b`.
    assert_eq!(b.use_count(), 0, "`b` keeps a leaked use after a failed auto_manage_all");
    b.offload().expect("`b` is idle and can be offloaded");
}

/// Contract (DESIGN, exclusive sharing): "at most one model on the shared GPU
/// at a time". Cancelling `fetch_model_async` while its load runs on the
/// blocking pool leaves the model loaded, but the turnstile believes the
/// device is empty (`resident = None`); the next fetch loads another model
/// beside it without offloading the first.
#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_async_fetch_leaves_two_models_on_the_shared_device() {
    use sire::EventKind;
    let loading_b = Arc::new(tokio::sync::Notify::new());
    let l = loading_b.clone();
    let dir = tempfile::tempdir().unwrap();
    let pools = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(64 * MIB)
        .spill_dir(dir.path())
        .wait_timeout(Duration::from_secs(10))
        // Holds B's loading attempt open (deterministically) until the test
        // has cancelled the future that started it.
        .listener(move |e| {
            if e.model == "B" && e.kind == EventKind::Loaded {
                l.notify_one();
                std::thread::sleep(Duration::from_millis(500));
            }
        })
        .build()
        .unwrap();
    let shared = SharedModelManager::with_pools(pools);
    for id in ["A", "B", "C"] {
        shared.add_with_id(id, ones(1024)).unwrap();
    }
    drop(shared.fetch_model::<TensorSet>("A").unwrap()); // A is the occupant
    tokio::select! {
        r = shared.fetch_model_async::<TensorSet>("B") => panic!("not cancelled: {:?}", r.map(|_| ())),
        _ = loading_b.notified() => {} // B's load is published; drop the fetch now
    }
    tokio::time::sleep(Duration::from_millis(1000)).await; // the blocking attempt ends
    let _c = shared.fetch_model::<TensorSet>("C").unwrap();
    let on_device: Vec<String> = shared
        .ids()
        .into_iter()
        .filter(|id| shared.model_location(id).unwrap() == shared.location())
        .collect();
    assert_eq!(on_device, ["C"], "several models on the shared device");
}

/// Contract (DESIGN): "Size = bytes of parameters and buffers, with shared
/// storages counted once", and moves keep identity. A tensor and a view of
/// part of it share one storage, but the inventory groups only exact aliases:
/// the storage is counted twice and, after a round trip through the disk,
/// the two no longer share memory.
#[test]
fn overlapping_views_are_counted_twice_and_split_by_a_move() {
    let (pools, _d) = pools_timeout(64 * MIB, Duration::from_secs(5));
    let w = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
    let top = w.narrow(0, 0, 2); // a view: same storage
    let m = pools.manage(TensorSet::new([("w", w), ("top", top)]).unwrap()).unwrap();
    let size = m.size_bytes();
    m.offload().unwrap();
    let g = auto_manage(&m).unwrap();
    let _ = g.get("top").unwrap().fill_(7.0);
    let w_sum = g.get("w").unwrap().sum(Kind::Float).double_value(&[]);
    assert_eq!(
        (size, w_sum),
        (64, 56.0),
        "(bytes counted, sum of `w` after writing 7s through the view `top`)"
    );
}

/// Contract (`ResourceUser::on_moved` docs): "Hook called after `sire` moved
/// the weights to `device`". Nothing in the crate calls it.
#[test]
fn on_moved_is_never_called() {
    struct Counting(TensorSet, Arc<AtomicUsize>);
    impl ResourceUser for Counting {
        fn tensors(&self) -> Vec<(String, Tensor)> {
            self.0.tensors()
        }
        fn on_moved(&self, _device: Device) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }
    let (pools, _d) = pools_timeout(64 * MIB, Duration::from_secs(5));
    let calls = Arc::new(AtomicUsize::new(0));
    let m = pools.manage(Counting(ones(1024), calls.clone())).unwrap();
    m.offload().unwrap();
    assert_eq!(m.location(), Location::Disk);
    drop(auto_manage(&m).unwrap());
    assert_eq!(m.location(), Location::Cpu);
    assert!(calls.load(Ordering::SeqCst) > 0, "two moves, on_moved called 0 times");
}

/// Contract: every pool's `used` is the exact count of bytes managed models
/// hold there. A model loaded from a safetensors file is admitted with a disk
/// copy that costs 0 (`disk: Some(0)`, its source). Once written in place, its
/// eviction rewrites it to the spill directory (`d.source = None`), but the
/// eviction reserved no disk bytes (`write` is 0 because `disk.is_some()`):
/// the spill file is never charged to the disk pool (nor checked against its
/// budget), and `unregister` (which deletes only when the charge is > 0)
/// leaves the file behind.
#[test]
fn a_dirty_model_from_a_source_file_is_spilled_uncharged_and_never_deleted() {
    let (pools, dir) = pools_timeout(64 * MIB, Duration::from_secs(5));
    let src = dir.path().join("source.safetensors");
    Tensor::write_safetensors(&[("w", Tensor::ones([1024], (Kind::Float, Device::Cpu)))], &src).unwrap();
    let m = pools.manage(TensorSet::from_safetensors(&src).unwrap()).unwrap();
    {
        let g = auto_manage(&m).unwrap();
        let _ = g.get("w").unwrap().fill_(3.0); // dirty: must be written on eviction
    }
    m.offload().unwrap();
    let spill = pools.spill_dir().unwrap().to_path_buf();
    let files = || -> Vec<_> { std::fs::read_dir(&spill).unwrap().map(|e| e.unwrap().path()).collect() };
    let written: u64 = files().iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    let used = pools.stats().pool(Location::Disk).unwrap().used;
    // The weights come back right (the spill file is the reference now).
    assert_eq!(auto_manage(&m).unwrap().get("w").unwrap().sum(Kind::Float).double_value(&[]), 3072.0);
    drop(m);
    let left = files();
    assert!(
        used >= 4096 && left.is_empty(),
        "disk pool used {used} B while {written} B were spilled; after unregister: {left:?}"
    );
}

/// Contract (DESIGN): "Panics and errors inside a guarded region release the
/// guard"; `Commit::closure`: on failure "the model is left as it was before".
/// A closure commit that panics (an `unwrap` in user code) unwinds out of
/// `commit::sync` past `commit::acquire`, which has already taken a use,
/// bumped `engaged` and been admitted by the variant lock, and past the
/// rebase, which has already rewritten a patch buffer in place (`Extend`)
/// while `Patches::{ops, synced}` still describe the old state. Afterwards
/// the use is leaked forever and the next rebase applies the delta twice.
#[test]
fn a_panicking_closure_commit_leaks_a_use_and_corrupts_the_applied_state() {
    use std::sync::atomic::AtomicBool;
    let (pools, _d) = pools_timeout(64 * MIB, Duration::from_secs(2));
    let m = pools.manage(ones(4)).unwrap();
    let d = || Tensor::ones([4], (Kind::Float, Device::Cpu));
    m.commit(Commit::delta("w", d())).unwrap();
    drop(auto_manage(&m).unwrap()); // w = 1 + 1 = 2 applied; synced = [c1]
    let armed = Arc::new(AtomicBool::new(true));
    let a = armed.clone();
    m.commit(Commit::squash([
        Commit::delta("w", d()),
        Commit::closure(
            "panics once",
            move || -> Result<(), std::io::Error> {
                if a.swap(false, Ordering::SeqCst) {
                    panic!("user bug in a closure commit");
                }
                Ok(())
            },
            || -> Result<(), std::io::Error> { Ok(()) },
        ),
    ]))
    .unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| auto_manage(&m).map(|_| ())));
    assert!(r.is_err(), "the closure panicked through auto_manage");
    let leaked = m.use_count();
    // Same stack again (the closure no longer panics): expected w = 1 + 1 + 1 = 3 everywhere.
    let w = auto_manage(&m).unwrap().get("w").unwrap().sum(Kind::Float).double_value(&[]) / 4.0;
    assert_eq!((leaked, w), (0, 3.0), "(uses left by the panic, each weight after the rebase)");
}

/// Contract (`SharedModelManager` docs): "Several guards on the *same* model
/// may be alive together." A thread that holds a guard on A and fetches A
/// again (nested use) deadlocks as soon as another thread is queued for B:
/// the turnstile admits only the head of its FIFO queue, B (at the head)
/// waits for A's holders, and A's second fetch waits behind B. There is no
/// timeout (unlike `auto_manage`), so this hangs forever.
#[test]
fn a_nested_fetch_of_the_held_model_deadlocks_behind_a_queued_fetch() {
    let (pools, _d) = pools_timeout(64 * MIB, Duration::from_secs(1));
    let shared = SharedModelManager::with_pools(pools);
    for id in ["A", "B"] {
        shared.add_with_id(id, ones(1024)).unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let s1 = shared.clone();
    // The thread that uses A, and uses it again inside (a nested call).
    std::thread::spawn(move || {
        let outer = s1.fetch_model::<TensorSet>("A").unwrap();
        std::thread::sleep(Duration::from_millis(300)); // meanwhile B queues up
        let inner = s1.fetch_model::<TensorSet>("A");
        tx.send(inner.is_ok()).unwrap();
        drop((inner, outer));
    });
    std::thread::sleep(Duration::from_millis(100));
    let s2 = shared.clone();
    std::thread::spawn(move || drop(s2.fetch_model::<TensorSet>("B")));
    let got = rx.recv_timeout(Duration::from_secs(5));
    assert!(got.is_ok(), "the nested fetch of the held model A did not return in 5 s (wait_timeout 1 s)");
}

/// Contract (`try_auto_manage` docs): "never waits: fails at once if room is
/// held by models in use" (and `auto_manage_timeout` waits at most its
/// timeout). On the commit path a guard that joins a rebase in progress blocks
/// on the model's data lock (`ModelCore::with_weights`, no deadline) for as
/// long as the rebasing guard waits for patch room in `set_patch_bytes`,
/// which it does while holding that lock: here ~2.5 s.
#[test]
fn try_auto_manage_blocks_behind_a_rebase_waiting_for_patch_room() {
    let (pools, _d) = pools_timeout(13 * 1024, Duration::from_secs(3));
    let m = pools.manage(ones(1024)).unwrap(); // 4 KiB
    let x = pools.manage(ones(2048)).unwrap(); // 8 KiB: 1 KiB left
    let busy = auto_manage(&x).unwrap(); // holds the room a 4 KiB patch needs
    m.commit(Commit::delta("w", Tensor::ones([1024], (Kind::Float, Device::Cpu)))).unwrap();
    let m1 = m.clone();
    let rebasing = std::thread::spawn(move || auto_manage(&m1).map(|_| ()).is_err());
    std::thread::sleep(Duration::from_millis(500)); // the rebase now waits for room, data lock held
    let t = std::time::Instant::now();
    let r = sire::try_auto_manage(&m).map(|_| ());
    let took = t.elapsed();
    assert!(rebasing.join().unwrap(), "the rebase timed out for lack of room");
    drop(busy);
    assert!(r.is_err());
    assert!(took < Duration::from_millis(500), "try_auto_manage took {took:?}");
}

// ---------------------------------------------------------------------------
// Regression tests for the remaining defects of the engine rebuild (issue 10).

/// Defect 14: guards wanting the applied stack must not starve a queued
/// variant: once another stack is queued, a newcomer for the current stack
/// waits its turn (a thread already holding the model still nests).
#[test]
fn same_stack_newcomers_do_not_starve_a_queued_variant() {
    let (pools, _d) = pools_timeout(64 * MIB, Duration::from_secs(2));
    let base = pools.manage(ones(4)).unwrap();
    let a = base.variant();
    a.commit(Commit::delta("w", Tensor::ones([4], (Kind::Float, Device::Cpu)))).unwrap();
    let b = base.variant();
    b.commit(Commit::delta("w", Tensor::full([4], 2.0, (Kind::Float, Device::Cpu)))).unwrap();
    let held = auto_manage(&a).unwrap();
    let b2 = b.clone();
    let waiting_b = std::thread::spawn(move || {
        let g = sire::auto_manage_timeout(&b2, Duration::from_secs(5)).unwrap();
        g.get("w").unwrap().sum(Kind::Float).double_value(&[])
    });
    std::thread::sleep(Duration::from_millis(200)); // b is queued now
                                                    // This thread already holds `a`: a nested guard is admitted at once.
    let nested = sire::try_auto_manage(&a);
    assert!(nested.is_ok(), "a nested guard of the held stack: {:?}", nested.map(|_| ()));
    drop(nested);
    // Another thread wanting `a` must queue behind `b`.
    let a2 = a.clone();
    let newcomer = std::thread::spawn(move || sire::try_auto_manage(&a2).map(|_| ()).is_err());
    assert!(newcomer.join().unwrap(), "a same-stack newcomer joined ahead of the queued variant");
    drop(held);
    assert_eq!(waiting_b.join().unwrap(), 12.0, "b got the model with its own stack (1 + 2 per weight)");
}

/// Defect 16: one name per model, whether registered by `manage` or by a
/// `SharedModelManager` on the same pools.
#[test]
fn every_model_of_an_instance_has_its_own_name() {
    let (pools, _d) = pools_timeout(64 * MIB, Duration::from_secs(1));
    let plain = pools.manage(ones(4)).unwrap();
    let shared = SharedModelManager::with_pools(pools.clone());
    let id1 = shared.add(ones(4)).unwrap();
    let id2 = shared.add(ones(4)).unwrap();
    let plain2 = pools.manage(ones(4)).unwrap();
    let mut names = vec![plain.name().to_string(), id1.clone(), id2.clone(), plain2.name().to_string()];
    assert_eq!(names, ["TensorSet", "TensorSet#2", "TensorSet#3", "TensorSet#4"]);
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 4);
    let err = shared.add_with_id("TensorSet", ones(4)).unwrap_err();
    assert!(matches!(err, Error::InvalidOptions { .. }), "{err}");
}

/// Defect 18: a wrong type names short types; a missing spill file names the
/// model and the file.
#[test]
fn messages_name_short_types_models_and_files() {
    let (pools, _d) = pools_timeout(64 * MIB, Duration::from_secs(1));
    let shared = SharedModelManager::with_pools(pools.clone());
    shared.add_with_id("A", ones(4)).unwrap();
    let err = shared.fetch_model::<tch::CModule>("A").unwrap_err();
    assert_eq!(err.to_string(), "model `A` is a TensorSet, not a CModule");
    let (pools, _d) = pools_timeout(64 * MIB, Duration::from_secs(1));
    let m = pools.manage_with(ones(1024), sire::ManageOptions::new().name("lost")).unwrap();
    m.offload().unwrap();
    let file = std::fs::read_dir(pools.spill_dir().unwrap()).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_file(&file).unwrap();
    let err = auto_manage(&m).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::File { .. }), "{msg}");
    assert!(msg.contains("`lost`") && msg.contains(&*file.to_string_lossy()), "{msg}");
    assert_eq!(m.location(), Location::Disk, "the model stays where it was");
}
