//! The task pool on CPU "devices" (the same location several times, each
//! slot with its own models): exactly-once execution in task order, failures
//! and panics as outcomes, init failures, dying workers, shutdown, managed
//! models sharing a budget, shards and resumable runs.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use proptest::prelude::*;
use sire::pool::{Pool, Rank, Tasks};
use sire::{Error, Location, ResourceUser, TensorSet};
use tch::Tensor;

const CPU3: [Location; 3] = [Location::Cpu, Location::Cpu, Location::Cpu];

#[test]
fn every_task_runs_once_in_task_order_from_one_queue() {
    let pool = Pool::builder()
        .devices(CPU3)
        .workers_per_device(2)
        .progress(false)
        .build(|_| Ok::<_, String>(3u64))
        .unwrap();
    let n = 300;
    let runs: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
    // The first 6 tasks meet at a barrier: a worker blocked in one cannot take
    // another, so each of the 6 workers (2 on each of 3 devices) takes one.
    let barrier = Barrier::new(6);
    let takers = Mutex::new(HashSet::new());
    let outcomes = pool
        .execute((0..n as u64).collect::<Vec<_>>(), |&t, device, &k| {
            assert_eq!(device, tch::Device::Cpu);
            runs[t as usize].fetch_add(1, Ordering::SeqCst);
            if t < 6 {
                takers.lock().unwrap().insert(std::thread::current().name().unwrap().to_string());
                barrier.wait();
            }
            Ok::<_, String>(t * k)
        })
        .unwrap();
    assert!(runs.iter().all(|r| r.load(Ordering::SeqCst) == 1), "every task exactly once");
    assert_eq!(outcomes.len(), n);
    for (i, o) in outcomes.iter().enumerate() {
        assert_eq!((o.index, o.key.as_str()), (i, i.to_string().as_str()));
        assert_eq!(*o.result.as_ref().unwrap(), 3 * i as u64);
        assert_eq!((o.device, o.attempts), (Location::Cpu, 1));
        assert!(o.slot < 3);
    }
    let takers = takers.into_inner().unwrap();
    assert_eq!(takers.len(), 6, "all six workers took from the shared queue: {takers:?}");
    let slots: HashSet<usize> = outcomes[..6].iter().map(|o| o.slot).collect();
    assert_eq!(slots.len(), 3, "every device worked");
}

#[test]
fn failing_and_panicking_tasks_are_reported_and_the_rest_succeed() {
    let pool =
        Pool::builder().devices([Location::Cpu; 2]).progress(false).build(|_| Ok::<_, String>(())).unwrap();
    let outcomes = pool
        .execute((0..20).collect::<Vec<u32>>(), |&t, _, _| match t {
            3 => Err(std::io::Error::other(format!("bad input {t}"))),
            5 => panic!("boom at task {t}"),
            _ => Ok(t + 1),
        })
        .unwrap();
    assert_eq!(outcomes.len(), 20);
    for o in &outcomes {
        match o.index {
            3 => {
                let e = o.result.as_ref().unwrap_err();
                assert!(matches!(e, Error::TaskFailed { attempts: 1, .. }), "{e:?}");
                let msg = e.to_string();
                assert!(msg.contains("task `3` failed on device #") && msg.contains("bad input 3"), "{msg}");
                let source = std::error::Error::source(e).unwrap();
                assert_eq!(source.to_string(), "bad input 3");
            }
            5 => {
                let e = o.result.as_ref().unwrap_err();
                let Error::TaskPanicked { message, panicked_at, task, backtrace, .. } = e else {
                    panic!("{e:?}")
                };
                assert_eq!(message, "boom at task 5");
                let backtrace = backtrace.as_ref().expect("a backtrace").to_string();
                assert!(backtrace.contains("pool::failing_and_panicking"), "{backtrace}");
                assert_eq!(task, "5");
                let at = panicked_at.as_deref().unwrap();
                assert!(at.starts_with("tests/pool.rs:"), "{at}");
                assert!(
                    e.to_string().contains(&format!(
                        "panicked on device #{} (cpu) after 1 attempt(s) at {at}: boom",
                        o.slot
                    )),
                    "{e}"
                );
            }
            i => assert_eq!(*o.result.as_ref().unwrap(), i as u32 + 1),
        }
    }
}

#[test]
fn retries_run_a_task_again_and_count_attempts() {
    let pool = Pool::builder()
        .devices([Location::Cpu])
        .retries(2)
        .progress(false)
        .build(|_| Ok::<_, String>(()))
        .unwrap();
    let tries: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
    let outcomes = pool
        .execute(vec![0usize, 1, 2], |&t, _, _| {
            let k = tries[t].fetch_add(1, Ordering::SeqCst) + 1;
            match t {
                1 if k < 2 => panic!("flaky, try {k}"),
                2 => Err(format!("always fails, try {k}")),
                _ => Ok(k),
            }
        })
        .unwrap();
    assert_eq!((outcomes[0].attempts, *outcomes[0].result.as_ref().unwrap()), (1, 1));
    assert_eq!((outcomes[1].attempts, *outcomes[1].result.as_ref().unwrap()), (2, 2));
    assert_eq!(outcomes[2].attempts, 3);
    let e = outcomes[2].result.as_ref().unwrap_err().to_string();
    assert!(e.contains("after 3 attempt(s)") && e.contains("always fails, try 3"), "{e}");
}

#[test]
fn a_device_whose_init_fails_is_left_out_and_the_others_work() {
    let calls = AtomicUsize::new(0);
    let pool = Pool::builder()
        .devices(CPU3)
        .progress(false)
        .build(|_| {
            // Whichever init runs second fails.
            match calls.fetch_add(1, Ordering::SeqCst) {
                1 => Err("weights file missing".to_string()),
                _ => Ok(()),
            }
        })
        .unwrap();
    assert_eq!(pool.devices().len(), 2);
    assert_eq!(pool.init_failures().len(), 1);
    let Error::DeviceInit { slot: failed, message, .. } = &pool.init_failures()[0] else { panic!() };
    assert_eq!(message, "weights file missing");
    let failed = *failed;
    let outcomes = pool.execute((0..50).collect::<Vec<u8>>(), |&t, _, _| Ok::<_, String>(t)).unwrap();
    assert!(outcomes.iter().all(|o| o.result.is_ok() && o.slot != failed));

    // A panicking init is a failure too, with the panic's message and location.
    let pool = Pool::builder()
        .devices([Location::Cpu, Location::Cpu])
        .progress(false)
        .build(|_| -> Result<(), String> { panic!("cannot load the model") })
        .unwrap();
    assert!(pool.devices().is_empty());
    let e = pool.init_failures()[1].to_string();
    assert!(
        e.contains("init failed for device #1 (cpu): panicked: cannot load the model (at tests/pool.rs:"),
        "{e}"
    );
    // With no device left, execute says so.
    let e = pool.execute(vec![1], |_, _, _| Ok::<_, String>(())).unwrap_err();
    assert!(matches!(e, Error::NoWorkingDevice { devices: 2, .. }), "{e:?}");
    assert!(
        e.to_string().contains("init failed on all 2 device(s)")
            && e.to_string().contains("cannot load the model"),
        "{e}"
    );
}

/// A task whose `Drop` panics when `poisoned`: it kills the worker outside
/// the task's function (where the pool cannot catch it).
struct Task {
    id: usize,
    poisoned: bool,
}

impl Drop for Task {
    fn drop(&mut self) {
        if self.poisoned && !std::thread::panicking() {
            panic!("task {} poisoned its worker", self.id);
        }
    }
}

#[test]
fn a_worker_that_dies_is_reported_and_the_others_finish() {
    let pool = Pool::builder()
        .devices([Location::Cpu; 2])
        .workers_per_device(2)
        .progress(false)
        .build(|_| Ok::<_, String>(()))
        .unwrap();
    let ran = AtomicUsize::new(0);
    let tasks: Vec<Task> = (0..40).map(|id| Task { id, poisoned: id == 7 || id == 21 }).collect();
    let outcomes = pool
        .execute(tasks, |t, _, _| {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(t.id)
        })
        .unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 40);
    assert_eq!(outcomes.len(), 40);
    for o in &outcomes {
        if o.index == 7 || o.index == 21 {
            let e = o.result.as_ref().unwrap_err();
            let Error::WorkerDied { task, message, .. } = e else { panic!("{e:?}") };
            assert_eq!(task.as_deref(), Some(o.key.as_str()));
            assert_eq!(message, &format!("task {} poisoned its worker", o.index));
            assert!(e.to_string().contains("died while running task"), "{e}");
        } else {
            assert_eq!(*o.result.as_ref().unwrap(), o.index);
        }
    }
    // The pool still works: the next run starts fresh workers.
    let again = pool.execute(vec![1, 2], |t, _, _| Ok::<_, String>(*t)).unwrap();
    assert_eq!(again.len(), 2);
}

#[test]
fn when_every_worker_dies_execute_returns_an_error() {
    let pool =
        Pool::builder().devices([Location::Cpu]).progress(false).build(|_| Ok::<_, String>(())).unwrap();
    let tasks: Vec<Task> = (0..10).map(|id| Task { id, poisoned: id == 2 }).collect();
    let mut seen = Vec::new();
    let e = pool
        .execute_streaming(tasks, |t, _, _| Ok::<_, String>(t.id), |o| seen.push((o.index, o.result.is_ok())))
        .unwrap_err();
    let Error::WorkersDied { workers: 1, tasks: 10, finished: 3, reasons } = &e else { panic!("{e:?}") };
    assert_eq!(reasons.len(), 1);
    assert!(
        e.to_string().contains("7 never run") && e.to_string().contains("task 2 poisoned its worker"),
        "{e}"
    );
    assert_eq!(seen, [(0, true), (1, true), (2, false)]);
}

/// Models whose drop is counted.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn shutdown_frees_the_models_once_and_later_use_is_an_error() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let pool = Pool::builder()
        .devices(CPU3)
        .progress(false)
        .build(|_| Ok::<_, String>(Counted(dropped.clone())))
        .unwrap();
    pool.execute(vec![1, 2, 3], |t, _, _| Ok::<_, String>(*t)).unwrap();
    assert_eq!(dropped.load(Ordering::SeqCst), 0);
    pool.shutdown();
    assert_eq!(dropped.load(Ordering::SeqCst), 3);
    pool.shutdown();
    assert_eq!(dropped.load(Ordering::SeqCst), 3);
    assert!(pool.devices().is_empty());
    let e = pool.execute(vec![1], |t, _, _| Ok::<_, String>(*t)).unwrap_err();
    assert!(matches!(e, Error::PoolShutDown { tasks: 0, .. }), "{e:?}");
    drop(pool);
    assert_eq!(dropped.load(Ordering::SeqCst), 3);

    // Dropping a pool shuts it down.
    let pool = Pool::builder()
        .devices(CPU3)
        .progress(false)
        .build(|_| Ok::<_, String>(Counted(dropped.clone())))
        .unwrap();
    drop(pool);
    assert_eq!(dropped.load(Ordering::SeqCst), 6);
}

#[test]
fn shutdown_from_a_task_stops_the_run() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let pool = Pool::builder()
        .devices([Location::Cpu])
        .progress(false)
        .build(|_| Ok::<_, String>(Counted(dropped.clone())))
        .unwrap();
    let e = pool
        .execute((0..10).collect::<Vec<u32>>(), |&t, _, _| {
            if t == 3 {
                pool.shutdown();
            }
            Ok::<_, String>(t)
        })
        .unwrap_err();
    assert!(matches!(e, Error::PoolShutDown { tasks: 10, finished: 4 }), "{e:?}");
    // The task could not wait for itself; the models go with the next shutdown.
    assert_eq!(dropped.load(Ordering::SeqCst), 0);
    pool.shutdown();
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
}

#[test]
fn managed_models_share_the_runtime_budget() {
    const MIB: u64 = common::MIB;
    // Room for one of the two 1 MiB models at a time.
    let (pools, _dir) = common::pools(3 * MIB / 2);
    let seed = AtomicUsize::new(0);
    let pool = Pool::builder()
        .devices([Location::Cpu; 2])
        .progress(false)
        .build(|_| pools.manage(common::model(seed.fetch_add(1, Ordering::SeqCst) as i64, MIB)))
        .unwrap();
    // The first two tasks meet at a barrier, so both devices use their model.
    let barrier = Barrier::new(2);
    let outcomes = pool
        .execute((0..8).collect::<Vec<u32>>(), |&t, device, model| {
            if t < 2 {
                barrier.wait();
            }
            let g = sire::auto_manage(model)?;
            assert_eq!(g.device(), device);
            let sum: f64 =
                g.tensors().iter().map(|(_, w)| w.abs().sum(tch::Kind::Double).double_value(&[])).sum();
            Ok::<_, Error>(sum)
        })
        .unwrap();
    assert!(outcomes.iter().all(|o| o.result.is_ok()), "{outcomes:?}");
    assert_eq!(outcomes.iter().map(|o| o.slot).collect::<HashSet<_>>().len(), 2);
    let stats = pools.stats();
    assert!(stats.evictions >= 1, "one device's model made room for the other's: {stats}");
    let cpu = stats.pools.iter().find(|p| p.location == Location::Cpu).unwrap();
    assert!(cpu.used <= cpu.budget, "{stats}");
    drop(pool);
    // The pool's models were the only ones: freed with it.
    assert_eq!(pools.stats().pools.iter().map(|p| p.used).sum::<u64>(), 0);
}

#[test]
fn a_tracing_event_per_task() {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("sire::pool=debug")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let pool =
        Pool::builder().devices([Location::Cpu; 2]).progress(false).build(|_| Ok::<_, String>(())).unwrap();
    tracing::subscriber::with_default(subscriber, || {
        pool.execute((0..12).collect::<Vec<u32>>(), |&t, _, _| if t == 4 { Err("nope") } else { Ok(t) })
            .unwrap();
    });
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert_eq!(log.matches("task done").count(), 11, "{log}");
    assert_eq!(log.matches("task failed").count(), 1, "{log}");
    assert!(log.contains("task=4") && log.contains("nope"), "{log}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Over 1..64 ranks, the shards of any set of keys tile the key order:
    /// every task exactly once, contiguous, sizes differing by at most one,
    /// the larger ones first.
    #[test]
    fn shards_cover_every_task_exactly_once(
        keys in prop::collection::hash_set("[a-c]{0,2}[0-9]{0,3}", 0..300),
        world in 1usize..=64,
    ) {
        let keys: Vec<String> = keys.into_iter().collect();
        let all: Vec<String> =
            Tasks::keyed(keys.clone(), |k| k.clone()).unwrap().shard(Rank::default()).keys().map(String::from).collect();
        let mut concat = Vec::new();
        let mut sizes = Vec::new();
        for rank in 0..world {
            let shard = Tasks::keyed(keys.clone(), |k| k.clone()).unwrap().shard(Rank::new(rank, world).unwrap());
            sizes.push(shard.len());
            concat.extend(shard.keys().map(String::from));
        }
        prop_assert_eq!(&concat, &all);
        let mut sorted = keys.clone();
        sorted.sort();
        let mut got = concat.clone();
        got.sort();
        prop_assert_eq!(got, sorted);
        let n = keys.len();
        for (rank, size) in sizes.iter().enumerate() {
            prop_assert_eq!(*size, n / world + usize::from(rank < n % world));
        }
    }
}

const CHILD: &str = "SIRE_POOL_TEST_CHILD";

/// Runs tasks `t00`..`t19` with completion records in `dir/results`, one
/// worker, logging each task's key to `dir/log`; `abort_at` kills the process
/// inside that task. Returns the outcomes' keys.
fn resumable_run(dir: &Path, abort_at: Option<&str>) -> (usize, Vec<String>) {
    let pool =
        Pool::builder().devices([Location::Cpu]).progress(false).build(|_| Ok::<_, String>(())).unwrap();
    let keys: Vec<String> = (0..20).map(|i| format!("t{i:02}")).collect();
    let tasks = Tasks::keyed(keys, |k| k.clone()).unwrap().resume(dir.join("results")).unwrap();
    let skipped = tasks.skipped();
    let outcomes = pool
        .execute(tasks, |key, _, _| {
            if Some(key.as_str()) == abort_at {
                std::process::abort();
            }
            let mut log = fs::OpenOptions::new().create(true).append(true).open(dir.join("log"))?;
            writeln!(log, "{key}")?;
            Ok::<_, std::io::Error>(())
        })
        .unwrap();
    assert!(outcomes.iter().all(|o| o.result.is_ok()));
    (skipped, outcomes.into_iter().map(|o| o.key).collect())
}

#[test]
fn a_run_killed_half_way_resumes_with_only_the_rest() {
    if let Ok(dir) = std::env::var(CHILD) {
        resumable_run(Path::new(&dir), Some("t08"));
        unreachable!("the child aborts inside task t08");
    }
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_run_killed_half_way_resumes_with_only_the_rest",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child was killed: {status}");
    let log = |dir: &Path| fs::read_to_string(dir.join("log")).unwrap_or_default();
    let first: Vec<String> = log(dir.path()).lines().map(String::from).collect();
    let expect_first: Vec<String> = (0..8).map(|i| format!("t{i:02}")).collect();
    assert_eq!(first, expect_first, "the killed run did t00..t07");
    assert_eq!(fs::read_dir(dir.path().join("results")).unwrap().count(), 8, "one record per finished task");

    let (skipped, rerun) = resumable_run(dir.path(), None);
    assert_eq!(skipped, 8);
    let expect_rest: Vec<String> = (8..20).map(|i| format!("t{i:02}")).collect();
    assert_eq!(rerun, expect_rest, "the rerun did only the rest");
    let mut counts = BTreeMap::new();
    for k in log(dir.path()).lines() {
        *counts.entry(k.to_string()).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 20);
    assert!(counts.values().all(|&c| c == 1), "every task exactly once overall: {counts:?}");

    // A third run has nothing left.
    let (skipped, none) = resumable_run(dir.path(), None);
    assert_eq!((skipped, none.len()), (20, 0));
}

#[test]
fn check_send_sync() {
    fn shared<T: Send + Sync>() {}
    fn sent<T: Send>() {}
    shared::<Pool<sire::Managed<TensorSet>>>();
    // Plain tensors are not `Sync`, so a pool of them can be built and moved, not shared.
    sent::<Pool<Tensor>>();
}

#[test]
fn a_panicking_callback_propagates_and_leaves_the_pool_usable() {
    let pool =
        Pool::builder().devices([Location::Cpu; 2]).progress(false).build(|_| Ok::<_, String>(())).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.execute_streaming(
            (0..1000).collect::<Vec<u32>>(),
            |&t, _, _| Ok::<_, String>(t),
            |_| panic!("the caller gave up"),
        )
    }));
    let payload = r.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"the caller gave up"));
    let again = pool.execute(vec![5u32, 6], |&t, _, _| Ok::<_, String>(t)).unwrap();
    assert_eq!(again.iter().map(|o| *o.result.as_ref().unwrap()).collect::<Vec<_>>(), [5, 6]);
}

#[test]
fn default_devices_are_every_gpu_else_the_cpu() {
    let pool = Pool::builder().progress(false).build(Ok::<_, String>).unwrap();
    let gpus = tch::Cuda::device_count() as usize;
    if gpus == 0 {
        assert_eq!(pool.devices(), [Location::Cpu], "no GPU: one CPU device, no crash");
    } else {
        assert_eq!(pool.devices(), (0..gpus).map(Location::Cuda).collect::<Vec<_>>());
    }
    let out = pool.execute(vec![()], |_, device, &model| Ok::<_, String>(device == model)).unwrap();
    assert!(out[0].result.as_ref().unwrap(), "f gets the device its models were built for");
}

const HOOK_CHILD: &str = "SIRE_POOL_TEST_HOOK_CHILD";

/// In a process of its own (the panic hook is global): a task's panic is
/// captured, not printed by the program's hook, and once the run is over the
/// program's hook is back.
#[test]
fn the_programs_panic_hook_is_left_alone_and_restored() {
    if std::env::var(HOOK_CHILD).is_ok() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        std::panic::set_hook(Box::new(move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
        }));
        let pool =
            Pool::builder().devices([Location::Cpu]).progress(false).build(|_| Ok::<_, String>(())).unwrap();
        let out = pool
            .execute(vec![0, 1], |&t, _, _| if t == 1 { panic!("task panic") } else { Ok::<_, String>(t) })
            .unwrap();
        assert!(out[1].result.is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "the task's panic went to the pool, not the program's hook"
        );
        let _ = std::panic::catch_unwind(|| panic!("the program's own panic"));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the program's hook is back");
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "the_programs_panic_hook_is_left_alone_and_restored", "--test-threads=1"])
        .env(HOOK_CHILD, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the child's checks failed: {status}");
}

/// On a GPU machine (`cuda-tests`): the default devices are the GPUs, and the
/// shutdown gives the models' memory back to the driver.
#[cfg(feature = "cuda-tests")]
#[test]
fn gpu_shutdown_releases_device_memory() {
    let gpus = tch::Cuda::device_count() as usize;
    assert!(gpus > 0, "cuda-tests asked for, but libtorch sees no CUDA device");
    const BYTES: i64 = 256 << 20;
    let before = sire::device_memory(0).unwrap().reserved;
    let pool = Pool::builder()
        .progress(false)
        .build(|device| Ok::<_, String>(Mutex::new(Tensor::zeros([BYTES / 4], (tch::Kind::Float, device)))))
        .unwrap();
    assert_eq!(pool.devices(), (0..gpus).map(Location::Cuda).collect::<Vec<_>>());
    let out = pool
        .execute((0..8).collect::<Vec<i64>>(), |&t, device, w| {
            let w = w.lock().unwrap();
            assert_eq!(w.device(), device);
            Ok::<_, String>((&*w + t).sum(tch::Kind::Double).double_value(&[]))
        })
        .unwrap();
    assert!(out.iter().all(|o| o.result.is_ok()));
    let held = sire::device_memory(0).unwrap().reserved;
    assert!(held >= before + BYTES as u64, "the model is on cuda:0: {held} >= {before} + {BYTES}");
    pool.shutdown();
    let after = sire::device_memory(0).unwrap().reserved;
    assert!(
        after + BYTES as u64 <= held,
        "the shutdown released the cached memory: {after} after, {held} held"
    );
}

#[test]
fn a_record_that_cannot_be_written_fails_its_task() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let e = Tasks::from(vec![1]).resume(&file).unwrap_err();
    assert!(matches!(e, Error::Record { task: None, .. }), "{e:?}");

    let results = dir.path().join("results");
    let tasks = Tasks::from(vec![1, 2]).resume(&results).unwrap();
    fs::remove_dir_all(&results).unwrap(); // the records have nowhere to go
    let pool =
        Pool::builder().devices([Location::Cpu]).progress(false).build(|_| Ok::<_, String>(())).unwrap();
    let outcomes = pool.execute(tasks, |t, _, _| Ok::<_, String>(*t)).unwrap();
    for o in &outcomes {
        let e = o.result.as_ref().unwrap_err();
        let Error::Record { task, path, .. } = e else { panic!("{e:?}") };
        assert_eq!(task.as_deref(), Some(o.key.as_str()));
        assert_eq!(path, &results.join(format!("{}.done", o.key)));
        assert!(e.to_string().contains(&format!("of task `{}`", o.key)), "{e}");
    }
}

#[test]
fn a_failed_task_gets_no_record_and_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let pool =
        Pool::builder().devices([Location::Cpu]).progress(false).build(|_| Ok::<_, String>(())).unwrap();
    let run = |fail: bool| {
        let tasks = Tasks::from((0..5).collect::<Vec<u32>>()).resume(dir.path()).unwrap();
        pool.execute(tasks, |&t, _, _| if fail && t == 2 { Err("not yet") } else { Ok(t) }).unwrap()
    };
    let first = run(true);
    assert_eq!(first.iter().filter(|o| o.result.is_err()).count(), 1);
    assert!(!dir.path().join("2.done").exists());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 4);
    let second = run(false);
    assert_eq!(second.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["2"]);
    assert!(second[0].result.is_ok() && dir.path().join("2.done").exists());
}

#[test]
fn shutdown_from_another_thread_stops_a_run_then_frees_the_models() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let pool = Pool::builder()
        .devices([Location::Cpu])
        .progress(false)
        .build(|_| Ok::<_, String>(Counted(dropped.clone())))
        .unwrap();
    let (started, running) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let run = s.spawn(|| {
            pool.execute((0..10).collect::<Vec<u32>>(), |&t, _, _| {
                if t == 0 {
                    started.send(()).unwrap();
                    // Task 0 runs until the shutdown has begun.
                    while !pool.is_shut_down() {
                        std::thread::yield_now();
                    }
                }
                Ok::<_, String>(t)
            })
        });
        running.recv().unwrap();
        pool.shutdown(); // waits for the run to stop
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "the models were freed");
        let e = run.join().unwrap().unwrap_err();
        assert!(matches!(e, Error::PoolShutDown { tasks: 10, finished: 1 }), "{e:?}");
        assert!(e.to_string().contains("1 of 10 task(s) reported"), "{e}");
    });
}
