//! Async use (`--features tokio`): waiting for room never blocks the executor,
//! cancellation leaves nothing behind, and many tasks over few models compute
//! the right outputs within the budget.

mod common;
mod nets;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nets::*;
use sire::{
    auto_manage_async, auto_manage_async_timeout, hook, Error, Event, Location, ManageOptions, Managed,
    ResourcePoolManagement, SharedModelManager, TensorSet,
};
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

fn named(name: &str) -> ManageOptions {
    ManageOptions::new().name(name)
}

/// Polls `fut` (for 5 ms at a time) until `ready()` holds, asserting that `fut` is still pending.
async fn pend_until<F: std::future::Future + Unpin>(fut: &mut F, what: &str, ready: impl Fn() -> bool) {
    for _ in 0..2000 {
        assert!(
            tokio::time::timeout(Duration::from_millis(5), &mut *fut).await.is_err(),
            "{what}: finished early"
        );
        if ready() {
            return;
        }
    }
    panic!("{what}: condition never held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_over_few_models_within_a_small_budget() {
    // Four models, host room for two and a half: tasks keep evicting each other's
    // models, and wait whenever the room is held by guards.
    let (pools, _dir) = pools(NET_BYTES * 5 / 2);
    let x = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
    let mut models = Vec::new();
    let mut expected = Vec::new();
    for i in 0..4 {
        let n = net(i);
        expected.push(bits(&n.forward(&x)));
        models.push(pools.manage_with(n, named(&format!("m{i}"))).unwrap());
    }
    let models: Arc<Vec<Managed<Net>>> = Arc::new(models);
    let expected = Arc::new(expected);

    // A monitor checks the pool invariant all along.
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (pools, done) = (pools.clone(), done.clone());
        tokio::spawn(async move {
            let (mut samples, mut most_waiting) = (0, 0);
            while !done.load(Ordering::SeqCst) {
                let s = pools.stats();
                check_invariants(&s);
                most_waiting = most_waiting.max(s.waiting);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (samples, most_waiting)
        })
    };

    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let (models, expected, x) = (models.clone(), expected.clone(), x.shallow_clone());
            tokio::spawn(async move {
                for round in 0..4 {
                    let i = (t + round) % 4;
                    let y = if t % 2 == 0 {
                        // A guard held across await points: others must wait for its room.
                        let g = auto_manage_async(&models[i]).await.unwrap();
                        tokio::task::yield_now().await;
                        let y = g.forward(&x.to_device(g.device()));
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        y
                    } else {
                        hook(models[i].clone()).forward_async(&x).await.unwrap()
                    };
                    assert_eq!(bits(&y), expected[i], "task {t}: m{i} computed a wrong output");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let (samples, most_waiting) = monitor.await.unwrap();
    assert!(samples > 0);
    eprintln!("{samples} samples, at most {most_waiting} callers in the slow path at once");

    let s = pools.stats();
    check_invariants(&s);
    let cpu = s.pool(Location::Cpu).unwrap();
    assert!(cpu.used <= cpu.budget);
    assert_eq!(s.waiting, 0, "no waiter left behind");
    assert!(models.iter().all(|m| m.use_count() == 0), "no use left behind");
    assert!(s.evictions > 0 && s.misses > 4, "the budget forced models to take turns:\n{s}");
}

#[tokio::test(flavor = "current_thread")]
async fn waiting_for_room_does_not_block_the_executor() {
    // One thread runs everything: if the waiter blocked it, the holder could never
    // drop its guard and the wait would time out.
    let (pools, _dir) = pools_with_timeout(NET_BYTES * 3 / 2, Duration::from_secs(20));
    let a = pools.manage_with(net(1), named("a")).unwrap();
    let b = pools.manage_with(net(2), named("b")).unwrap();
    let ga = auto_manage_async(&a).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        rx.await.unwrap();
        drop(ga);
    });
    let mut wait_b = std::pin::pin!(auto_manage_async(&b));
    pend_until(&mut wait_b, "b waits for a's room", || pools.stats().waiting == 1).await;
    tx.send(()).unwrap();
    // Woken by the release, not by the 20 s deadline (a lost wake-up would wait it out).
    let gb = tokio::time::timeout(Duration::from_secs(5), wait_b)
        .await
        .expect("the release woke the waiter")
        .expect("room once a's guard dropped");
    holder.await.unwrap();
    assert_eq!((a.location(), b.location()), (Location::Disk, Location::Cpu));
    drop(gb);
    check_invariants(&pools.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_waiting_future_leaves_no_reservation() {
    let (pools, _dir) = pools(NET_BYTES * 3 / 2);
    let a = pools.manage_with(net(1), named("a")).unwrap();
    let b = pools.manage_with(net(2), named("b")).unwrap();
    let ga = auto_manage_async(&a).await.unwrap(); // b evicted to disk; a holds the room
    assert_eq!(b.location(), Location::Disk);
    {
        let mut wait_b = Box::pin(auto_manage_async(&b));
        pend_until(&mut wait_b, "b is waiting", || pools.stats().waiting == 1).await;
    } // dropped while waiting
      // An attempt it had started on the blocking pool may still be finishing.
    settle(|| pools.stats().waiting == 0).await;
    let s = pools.stats();
    assert_eq!(s.waiting, 0, "the cancelled waiter is no longer counted");
    let cpu = s.pool(Location::Cpu).unwrap();
    assert_eq!(cpu.used, NET_BYTES, "only a's bytes are held:\n{s}");
    assert_eq!(residents(&s, Location::Cpu), ["a"]);
    assert!(cpu.residents.iter().all(|r| !r.moving));
    assert_eq!((b.use_count(), b.location()), (0, Location::Disk));
    check_invariants(&s);

    // The room is whole: once a's guard drops, b loads.
    drop(ga);
    let gb = auto_manage_async_timeout(&b, Duration::from_secs(5)).await.unwrap();
    assert_eq!(gb.device(), Device::Cpu);
    drop(gb);
    check_invariants(&pools.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_cancelled_while_loading_releases_its_use() {
    let (pools, _dir) = pools(64 * MIB);
    let m = pools.manage(model(1, 8 * MIB)).unwrap();
    m.offload().unwrap();
    {
        let mut fut = Box::pin(auto_manage_async(&m));
        // One poll starts the attempt on the blocking pool; then the future is dropped.
        let _ = futures_poll_once(&mut fut).await;
    }
    // An attempt that had not started takes nothing; one that had runs to its
    // end, and the use it took is released at once. Either way nothing is held.
    settle(|| {
        m.use_count() == 0
            && pools.stats().waiting == 0
            && !pools.stats().pools.iter().any(|p| p.residents.iter().any(|r| r.moving))
    })
    .await;
    assert_eq!(m.use_count(), 0, "{}", pools.stats());
    assert!(matches!(m.location(), Location::Cpu | Location::Disk));
    m.offload().expect("idle: no use was leaked");
    assert_eq!(m.location(), Location::Disk);
    check_invariants(&pools.stats());
}

/// Waits (up to 10 s) for `done()`, which background work will make true.
async fn settle(done: impl Fn() -> bool) {
    for _ in 0..2000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls a future once.
async fn futures_poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_after_the_timeout_is_out_of_memory_with_the_wait() {
    let (pools, _dir) = pools(NET_BYTES * 3 / 2);
    let a = pools.manage_with(net(1), named("a")).unwrap();
    let b = pools.manage_with(net(2), named("b")).unwrap();
    let _ga = auto_manage_async(&a).await.unwrap();
    match auto_manage_async_timeout(&b, Duration::from_millis(50)).await {
        Err(Error::OutOfMemory { model, waited: Some(w), location: Location::Cpu, .. }) => {
            assert_eq!((model.as_str(), w), ("b", Duration::from_millis(50)))
        }
        other => panic!("expected OutOfMemory after waiting, got {other:?}"),
    }
    assert_eq!(pools.stats().waiting, 0);
    // Too large fails at once, without waiting.
    let (small, _d2) = common::pools(NET_BYTES / 2);
    let too_big = small.manage(net(3)).unwrap();
    assert!(matches!(auto_manage_async(&too_big).await, Err(Error::TooLarge { .. })));
}

fn pools_with_timeout(cpu: u64, wait: Duration) -> (ResourcePoolManagement, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let p = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(cpu)
        .spill_dir(dir.path())
        .wait_timeout(wait)
        .build()
        .unwrap();
    (p, dir)
}

// ------------------------------------------------------------------ exclusive, async

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_tasks_alternate_two_models_never_resident_together() {
    let resident = Arc::new(Mutex::new((HashMap::<String, bool>::new(), 0usize, Vec::<String>::new())));
    let r = resident.clone();
    let dir = tempfile::tempdir().unwrap();
    let pools = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(64 * MIB)
        .spill_dir(dir.path())
        .listener(move |e: &Event| {
            let mut r = r.lock().unwrap();
            r.0.insert(e.model.clone(), e.resident());
            let n = r.0.values().filter(|v| **v).count();
            r.1 = r.1.max(n);
            if n > 1 {
                let msg = format!("after `{e}`: {:?}", r.0);
                r.2.push(msg);
            }
        })
        .build()
        .unwrap();
    let shared = SharedModelManager::with_pools(pools.clone());
    let x = Tensor::randn([4, 16], (Kind::Float, Device::Cpu));
    let (d, c) = (net(1), net(2));
    let expected = Arc::new([bits(&d.forward(&x)), bits(&c.forward(&x))]);
    shared.add_with_id("detector", d).unwrap();
    shared.add_with_id("captioner", c).unwrap();
    let active = Arc::new(Mutex::new(HashMap::<&'static str, usize>::new()));
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let (shared, x, expected, active) =
                (shared.clone(), x.shallow_clone(), expected.clone(), active.clone());
            tokio::spawn(async move {
                for i in 0..6 {
                    let k = (t + i) % 2;
                    let id = ["detector", "captioner"][k];
                    let g = shared.fetch_model_async::<Net>(id).await.unwrap();
                    {
                        let mut a = active.lock().unwrap();
                        assert!(a.iter().all(|(m, n)| *m == id || *n == 0), "{id} fetched while {a:?}");
                        *a.entry(id).or_default() += 1;
                    }
                    tokio::task::yield_now().await;
                    let y = g.forward(&x.to_device(g.device()));
                    assert_eq!(bits(&y), expected[k]);
                    *active.lock().unwrap().get_mut(id).unwrap() -= 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let r = resident.lock().unwrap();
    assert!(r.2.is_empty(), "{:#?}", r.2);
    assert_eq!(r.1, 1);
    check_invariants(&pools.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_fetch_gives_its_turn_back() {
    let (pools, _dir) = pools(64 * MIB);
    let shared = SharedModelManager::with_pools(pools);
    let a = shared.add(TensorSet::new([("w", Tensor::ones([4], tch::kind::FLOAT_CPU))]).unwrap()).unwrap();
    let b = shared.add(TensorSet::new([("w", Tensor::zeros([4], tch::kind::FLOAT_CPU))]).unwrap()).unwrap();
    let ga = shared.fetch_model_async::<TensorSet>(&a).await.unwrap();
    {
        // b queues behind a's guard, then gives up.
        let mut fetch_b = Box::pin(shared.fetch_model_async::<TensorSet>(&b));
        assert!(futures_poll_once(&mut fetch_b).await.is_none());
    }
    drop(ga);
    // Had b's turn stayed in the queue, this fetch would wait behind it forever.
    let g = tokio::time::timeout(Duration::from_secs(10), shared.fetch_model_async::<TensorSet>(&a))
        .await
        .expect("a cancelled fetch must not keep its place")
        .unwrap();
    assert_eq!(g.get("w").unwrap().sum(Kind::Float).double_value(&[]), 4.0);
    assert_eq!(shared.model_location(&b).unwrap(), Location::Disk);
    drop(g);
    let g = shared.fetch_model_async::<TensorSet>(&b).await.unwrap();
    assert_eq!(shared.model_location(&a).unwrap(), Location::Disk);
    assert_eq!(g.get("w").unwrap().sum(Kind::Float).double_value(&[]), 0.0);
}

/// Variants used from async tasks take turns on the one base and each sees its own stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_guards_bring_variants_to_their_stacks() {
    let (p, _d) = pools(8 * MIB);
    let w = Tensor::randn([32, 32], (Kind::Float, Device::Cpu));
    let base = p.manage_with(TensorSet::new([("w", w.copy())]).unwrap(), named("base")).unwrap();
    let (a, b) = (base.variant(), base.variant());
    a.commit(sire::Commit::delta("w", Tensor::ones([32, 32], (Kind::Float, Device::Cpu)))).unwrap();
    b.commit(sire::Commit::delta("w", Tensor::full([32, 32], -2.0, (Kind::Float, Device::Cpu)))).unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (m, add) = if i % 2 == 0 { (a.clone(), 1.0) } else { (b.clone(), -2.0) };
        let want = &w + add;
        tasks.push(tokio::spawn(async move {
            let g = auto_manage_async(&m).await.unwrap();
            assert!(g.get("w").unwrap().equal(&want), "task {i} saw another variant's weights");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let g = auto_manage_async(&base).await.unwrap();
    assert!(g.get("w").unwrap().equal(&w), "the base, bit for bit");
}
