//! The transfer engine on the CPU + disk tiers: batched loads, prefetch, and
//! offloads that move nothing when nothing changed.

mod common;

use std::time::Duration;

use common::{check_invariants, model, pools, snapshot, MIB};
use sire::{auto_manage, auto_manage_all, prefetch, try_auto_manage, Error, Location, ManageOptions};
use tch::{Kind, Tensor};

fn named(name: &str) -> ManageOptions {
    ManageOptions::new().name(name)
}

#[test]
fn models_needed_together_load_together_and_stay_while_the_batch_lives() {
    let (p, _d) = pools(8 * MIB);
    let a = p.manage_with(model(1, 2 * MIB), named("a")).unwrap();
    let b = p.manage_with(model(2, 2 * MIB), named("b")).unwrap();
    let c = p.manage_with(model(3, 2 * MIB), named("c")).unwrap();
    let (sa, sb) = (snapshot(a.get_unguarded()), snapshot(b.get_unguarded()));
    for m in [&a, &b, &c] {
        m.offload().unwrap();
    }
    let misses = p.stats().misses;
    let batch = auto_manage_all(&[a.handle(), b.handle(), a.handle()]).unwrap();
    assert_eq!(batch.len(), 2, "a named twice counts once");
    assert_eq!((a.location(), b.location()), (Location::Cpu, Location::Cpu));
    assert_eq!(p.stats().misses, misses + 2, "one load each");
    assert_eq!((a.use_count(), b.use_count()), (1, 1), "held by the batch");
    // Guards are hits now.
    let (ga, gb) = (auto_manage(&a).unwrap(), auto_manage(&b).unwrap());
    assert_eq!(p.stats().misses, misses + 2);
    assert_eq!((snapshot(&ga), snapshot(&gb)), (sa, sb), "bit-identical after the batched load");
    drop((ga, gb));
    // c (2 MiB) plus a 4 MiB model need a's and b's room: not while the batch holds them.
    let big = p.manage_with(model(4, 4 * MIB), named("big")).unwrap();
    big.offload().unwrap();
    let g = auto_manage(&c).unwrap();
    match try_auto_manage(&big) {
        Err(Error::OutOfMemory { location: Location::Cpu, .. }) => {}
        other => panic!("expected OutOfMemory while the batch holds its models, got {:?}", other.map(|_| ())),
    }
    drop(g);
    drop(batch);
    assert_eq!((a.use_count(), b.use_count()), (0, 0));
    let g = try_auto_manage(&big).unwrap();
    drop(g);
    check_invariants(&p.stats());
}

#[test]
fn a_batch_is_all_or_nothing() {
    let (p, _d) = pools(5 * MIB);
    let a = p.manage_with(model(1, 2 * MIB), named("a")).unwrap();
    let b = p.manage_with(model(2, 2 * MIB), named("b")).unwrap();
    let c = p.manage_with(model(3, 2 * MIB), named("c")).unwrap();
    // 6 MiB together can never fit in 5 MiB: fails at once, naming the batch.
    match auto_manage_all(&[a.handle(), b.handle(), c.handle()]) {
        Err(Error::TooLarge { model, requested, budget, .. }) => {
            assert!(model.contains('a') && model.contains('b') && model.contains('c'), "{model}");
            assert!(requested > budget);
        }
        other => panic!("expected TooLarge, got {:?}", other.map(|_| ())),
    }
    for m in [&a, &b, &c] {
        assert_eq!(m.use_count(), 0, "no use is left behind");
    }
    check_invariants(&p.stats());
    // Two of them fit.
    let batch = auto_manage_all(&[b.handle(), c.handle()]).unwrap();
    assert_eq!((b.location(), c.location()), (Location::Cpu, Location::Cpu));
    drop(batch);
}

#[test]
fn a_batch_waits_for_room_held_by_a_guard() {
    let (p, _d) = pools(4 * MIB);
    let a = p.manage_with(model(1, 2 * MIB), named("a")).unwrap();
    let b = p.manage_with(model(2, 2 * MIB), named("b")).unwrap();
    let c = p.manage_with(model(3, 2 * MIB), named("c")).unwrap();
    let g = auto_manage(&a).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            tx.send(()).unwrap();
            auto_manage_all(&[b.handle(), c.handle()]).map(|batch| batch.len())
        });
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50)); // let it reach the wait (not needed for correctness)
        drop(g);
        assert_eq!(t.join().unwrap().unwrap(), 2);
    });
    assert_eq!(a.location(), Location::Disk, "a made room once its guard dropped");
    check_invariants(&p.stats());
}

#[test]
fn models_of_two_instances_cannot_be_batched() {
    let (p, _d) = pools(4 * MIB);
    let (q, _e) = pools(4 * MIB);
    let a = p.manage(model(1, MIB)).unwrap();
    let b = q.manage(model(2, MIB)).unwrap();
    let res = auto_manage_all(&[a.handle(), b.handle()]);
    assert!(matches!(res, Err(Error::ForeignModel { .. })), "{res:?}");
    assert_eq!((a.use_count(), b.use_count()), (0, 0));
}

#[test]
fn prefetch_loads_in_the_background_and_the_next_guard_is_a_hit() {
    let (p, _d) = pools(8 * MIB);
    let m = p.manage_with(model(5, 4 * MIB), named("next")).unwrap();
    let want = snapshot(m.get_unguarded());
    m.offload().unwrap();
    let misses = p.stats().misses;
    let pending = prefetch(&m);
    // The caller computes meanwhile.
    let x = Tensor::randn([256, 256], (Kind::Float, tch::Device::Cpu));
    let _y = x.matmul(&x);
    let g = pending.wait().unwrap();
    assert_eq!(m.location(), Location::Cpu);
    assert_eq!(p.stats().misses, misses + 1);
    assert_eq!(snapshot(&g), want);
    let again = auto_manage(&m).unwrap();
    assert_eq!(p.stats().misses, misses + 1, "already in place: a hit");
    drop((g, again));
    // A dropped prefetch still completes and leaves the model resident and idle.
    m.offload().unwrap();
    drop(prefetch(&m));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(m.location() == Location::Cpu && m.use_count() == 0) {
        assert!(std::time::Instant::now() < deadline, "the dropped prefetch did not finish");
        std::thread::yield_now();
    }
    check_invariants(&p.stats());
}

#[test]
fn offloading_a_clean_model_moves_no_bytes() {
    let (p, _d) = pools(8 * MIB);
    let m = p.manage_with(model(6, 2 * MIB), named("clean")).unwrap();
    let want = snapshot(m.get_unguarded());
    m.offload().unwrap();
    let written = p.stats().bytes_to_disk;
    assert_eq!(written, 2 * MIB, "the first offload writes the home copy once");
    for _ in 0..3 {
        // A use that only reads the weights...
        let g = auto_manage(&m).unwrap();
        let s = g.get("a").unwrap().sum(Kind::Double).double_value(&[]);
        assert!(s.is_finite());
        drop(g);
        // ...leaves them clean: offloading again writes nothing and copies nothing back.
        m.offload().unwrap();
        let st = p.stats();
        assert_eq!(st.bytes_to_disk, written, "a clean model is not rewritten");
        assert_eq!(st.bytes_device_to_host, 0);
    }
    let g = auto_manage(&m).unwrap();
    assert_eq!(snapshot(&g), want, "the home copy was never modified by a use");
}

#[test]
fn a_clean_model_from_safetensors_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let w = Tensor::randn([512, 512], (Kind::Float, tch::Device::Cpu));
    Tensor::write_safetensors(&[("w", &w)], &path).unwrap();
    let (p, _d) = pools(8 * MIB);
    let m = p.manage(sire::TensorSet::from_safetensors(&path).unwrap()).unwrap();
    for _ in 0..3 {
        m.offload().unwrap();
        let g = auto_manage(&m).unwrap();
        assert!(g.get("w").unwrap().equal(&w));
    }
    let st = p.stats();
    assert_eq!(st.bytes_to_disk, 0, "reloaded from its source, never written");
    assert_eq!(st.bytes_from_disk, 3 * 512 * 512 * 4);
    assert_eq!(std::fs::read_dir(p.spill_dir().unwrap()).unwrap().count(), 0);
}

#[test]
fn batches_and_prefetches_bring_models_to_their_commit_stacks() {
    let (p, _d) = pools(8 * MIB);
    let w = Tensor::randn([64, 64], (Kind::Float, tch::Device::Cpu));
    let base = p.manage_with(sire::TensorSet::new([("w", w.copy())]).unwrap(), named("base")).unwrap();
    let other = p.manage_with(model(9, MIB), named("other")).unwrap();
    let delta = Tensor::ones([64, 64], (Kind::Float, tch::Device::Cpu));
    let v = base.variant();
    v.commit(sire::Commit::delta("w", delta.copy())).unwrap();
    base.offload().unwrap();
    // The batch applies the variant's stack before handing out the model.
    let batch = auto_manage_all(&[v.handle(), other.handle()]).unwrap();
    let g = auto_manage(&v).unwrap();
    assert!(g.get("w").unwrap().equal(&(&w + &delta)), "the variant's delta is applied");
    drop(g);
    drop(batch);
    // The base handle (no commits) rebases back to the base, bit for bit.
    let g = auto_manage(&base).unwrap();
    assert!(g.get("w").unwrap().equal(&w));
    drop(g);
    // A prefetch of the variant comes back patched.
    base.offload().unwrap();
    let g = prefetch(&v).wait().unwrap();
    assert!(g.get("w").unwrap().equal(&(&w + &delta)));
    drop(g);
    check_invariants(&p.stats());
}
