//! Commits on the real CPU + disk tiers: every expected weight is computed here
//! with plain tch from a copy of the base taken before the model was managed,
//! so the checks do not depend on the crate's own arithmetic.

mod common;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use sire::{
    auto_manage, try_auto_manage, Commit, Error, Location, Lora, ManageOptions, ResourceUser, TensorSet,
};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const F32: (Kind, Device) = (Kind::Float, Device::Cpu);

fn lora(out: i64, inn: i64, rank: i64, scale: f64) -> Op {
    Op::Lora(Tensor::randn([rank, inn], F32), Tensor::randn([out, rank], F32), scale)
}

/// Base weights (deep copies) and the expected stack, by name.
struct Reference {
    base: Vec<(String, Tensor)>,
    /// (commit id, [(target, op)]) oldest first.
    stack: Vec<(sire::CommitId, Vec<(String, Op)>)>,
}

impl Reference {
    fn new(set: &TensorSet) -> Self {
        let base = set.names().map(|n| (n.to_string(), set.get(n).unwrap().copy())).collect();
        Reference { base, stack: Vec::new() }
    }

    fn commit(&mut self, m: &sire::Managed<TensorSet>, parts: Vec<(&str, Op)>) -> sire::CommitId {
        let c = Commit::squash(parts.iter().map(|(t, op)| op.commit(t)));
        let id = m.commit(c).unwrap();
        self.stack.push((id, parts.into_iter().map(|(t, op)| (t.to_string(), op)).collect()));
        id
    }

    fn expected(&self, name: &str) -> Tensor {
        let mut w = self.base.iter().find(|(n, _)| n == name).unwrap().1.copy();
        for (_, parts) in &self.stack {
            for (t, op) in parts {
                if t == name {
                    w = op.apply(&w);
                }
            }
        }
        w
    }

    /// Every weight of the guarded model equals the reference, bit for bit.
    fn check(&self, m: &sire::Managed<TensorSet>) {
        let g = auto_manage(m).unwrap();
        for (name, _) in &self.base {
            let got = g.get(name).unwrap();
            assert_eq!(
                bytes_of(&got),
                bytes_of(&self.expected(name)),
                "weight `{name}` differs from the reference"
            );
        }
    }
}

fn mixed_set(seed: i64) -> TensorSet {
    tch::manual_seed(seed);
    TensorSet::new([
        ("w1", Tensor::randn([16, 32], F32)),
        ("w2", Tensor::randn([16, 32], F32).to_kind(Kind::Half)),
        ("w3", Tensor::randn([8], (Kind::Double, Device::Cpu))),
        ("bias", Tensor::randn([16], F32)),
    ])
    .unwrap()
}

#[test]
fn stacks_match_a_plain_tch_reference_and_revert_bit_for_bit() {
    let (pools, _dir) = pools(64 * MIB);
    let set = mixed_set(1);
    let mut r = Reference::new(&set);
    let m = pools.manage(set).unwrap();
    let handle = m.get_unguarded().get("w1").unwrap(); // follows the managed tensor

    let c1 = r.commit(&m, vec![("w1", lora(16, 32, 4, 0.5))]);
    r.check(&m);
    let c2 = r.commit(
        &m,
        vec![
            ("w1", Op::Delta(Tensor::randn([16, 32], F32))),
            ("w2", lora(16, 32, 2, 2.0)),
            ("bias", Op::Replace(Tensor::randn([16], F32))),
        ],
    );
    r.check(&m);
    let c3 = r.commit(&m, vec![("w3", Op::Delta(Tensor::randn([8], (Kind::Double, Device::Cpu))))]);
    r.check(&m);
    {
        let g = auto_manage(&m).unwrap();
        assert_eq!(
            bytes_of(&handle),
            bytes_of(&g.get("w1").unwrap()),
            "user handles follow the patched weight"
        );
    }
    let listed: Vec<_> = m.commits().iter().map(|c| (c.id, c.targets.clone())).collect();
    assert_eq!(
        listed,
        [
            (c1, vec!["w1".to_string()]),
            (c2, vec!["w1".into(), "w2".into(), "bias".into()]),
            (c3, vec!["w3".into()])
        ]
    );

    assert_eq!(m.revert(), Some(c3));
    r.stack.pop();
    r.check(&m);
    // A fourth commit on top of c1, c2, then back to c1 (c2 as one unit).
    r.commit(&m, vec![("w2", Op::Delta(Tensor::randn([16, 32], F32).to_kind(Kind::Half)))]);
    r.check(&m);
    m.revert_to(c1).unwrap();
    r.stack.truncate(1);
    r.check(&m);
    assert_eq!(m.commits().len(), 1);

    m.revert_all();
    r.stack.clear();
    r.check(&m); // the base, bit for bit
    assert!(m.commits().is_empty());
    assert_eq!(m.revert(), None);
    match m.revert_to(c2) {
        Err(Error::UnknownCommit { id, .. }) => assert_eq!(id, c2),
        other => panic!("expected UnknownCommit, got {other:?}"),
    }
    let s = pools.stats();
    check_invariants(&s);
    assert_eq!(
        s.pool(Location::Cpu).unwrap().used,
        m.size_bytes(),
        "no patch buffer is left once all is reverted"
    );
}

#[test]
fn reverting_one_of_several_patches_on_a_weight_replays_the_rest_from_the_base() {
    let (pools, _dir) = pools(64 * MIB);
    tch::manual_seed(2);
    let set = TensorSet::new([("w", Tensor::randn([24, 24], F32).to_kind(Kind::BFloat16))]).unwrap();
    let mut r = Reference::new(&set);
    let m = pools.manage(set).unwrap();
    let c1 = r.commit(&m, vec![("w", lora(24, 24, 3, 0.7))]);
    r.commit(&m, vec![("w", Op::Delta(Tensor::randn([24, 24], F32) * 0.1))]);
    r.commit(&m, vec![("w", lora(24, 24, 5, 1.3))]);
    r.check(&m);
    m.revert_to(c1).unwrap();
    r.stack.truncate(1);
    r.check(&m);
    r.commit(&m, vec![("w", Op::Replace(Tensor::randn([24, 24], F32)))]);
    r.commit(&m, vec![("w", lora(24, 24, 2, 0.25))]);
    r.check(&m);
}

#[test]
fn a_failing_commit_changes_nothing() {
    let (pools, _dir) = pools(64 * MIB);
    let set = mixed_set(3);
    let mut r = Reference::new(&set);
    let m = pools.manage(set).unwrap();
    r.commit(&m, vec![("w1", lora(16, 32, 4, 1.0))]);
    let before: Vec<Vec<u8>> = {
        let g = auto_manage(&m).unwrap();
        ["w1", "w2", "w3", "bias"].iter().map(|n| bytes_of(&g.get(n).unwrap())).collect()
    };
    let listed = m.commits();
    let ok = || lora(16, 32, 4, 1.0).commit("w2");

    let bad = [
        Commit::squash([ok(), Commit::delta("nope", Tensor::ones([3], F32))]),
        Commit::squash([ok(), Commit::delta("bias", Tensor::ones([15], F32))]),
        Commit::squash([ok(), lora(16, 32, 4, 1.0).commit("bias")]),
        Commit::squash([
            ok(),
            Commit::lora("w1", Tensor::ones([4, 32], F32), Tensor::ones([16, 3], F32), 1.0),
        ]),
        Commit::squash([ok(), Commit::replace("w1", Tensor::ones([16, 32], (Kind::Int, Device::Cpu)))]),
        Commit::squash([
            ok(),
            Commit::lora("w1", Tensor::ones([4, 32], F32), Tensor::ones([16, 4], F32), f64::NAN),
        ]),
    ];
    let mut errors = Vec::new();
    for c in bad {
        errors.push(m.commit(c).unwrap_err());
    }
    assert!(matches!(&errors[0], Error::UnknownTensor { name, .. } if name == "nope"), "{}", errors[0]);
    assert!(
        matches!(&errors[1], Error::ShapeMismatch { name, expected, found, .. }
            if name == "bias" && expected == &[16] && found == &[15]),
        "{}",
        errors[1]
    );
    assert!(matches!(&errors[2], Error::ShapeMismatch { found, .. } if found == &[16, 32]), "{}", errors[2]);
    for e in &errors[3..] {
        assert!(matches!(e, Error::InvalidCommit { .. }), "{e}");
    }

    // An integer tensor of the model cannot be patched.
    let ints = pools
        .manage(TensorSet::new([("steps", Tensor::zeros([4], (Kind::Int64, Device::Cpu)))]).unwrap())
        .unwrap();
    let e = ints.commit(Commit::delta("steps", Tensor::ones([4], F32))).unwrap_err();
    assert!(matches!(e, Error::InvalidCommit { .. }) && e.to_string().contains("Int64"), "{e}");

    assert_eq!(m.commits(), listed, "the stack is unchanged");
    let g = auto_manage(&m).unwrap();
    let after: Vec<Vec<u8>> =
        ["w1", "w2", "w3", "bias"].iter().map(|n| bytes_of(&g.get(n).unwrap())).collect();
    assert_eq!(before, after, "no weight changed");
    drop(g);
    r.check(&m);
}

#[test]
fn a_failing_closure_leaves_the_model_as_it_was() {
    let (pools, _dir) = pools(64 * MIB);
    let set = mixed_set(4);
    let mut r = Reference::new(&set);
    let m = pools.manage(set).unwrap();
    let level = Arc::new(AtomicI64::new(0));
    let counter = |label: &str| {
        let (up, down) = (level.clone(), level.clone());
        Commit::closure(
            label,
            move || -> Result<(), std::io::Error> {
                up.fetch_add(1, SeqCst);
                Ok(())
            },
            move || -> Result<(), std::io::Error> {
                down.fetch_sub(1, SeqCst);
                Ok(())
            },
        )
    };

    // c1: a weight and a closure, applied.
    let op = lora(16, 32, 4, 1.0);
    let id = m.commit(Commit::squash([op.commit("w1"), counter("c1")])).unwrap();
    r.stack.push((id, vec![("w1".into(), op)]));
    r.check(&m);
    assert_eq!(level.load(SeqCst), 1);
    let snapshot: Vec<Vec<u8>> = {
        let g = auto_manage(&m).unwrap();
        ["w1", "w2", "w3", "bias"].iter().map(|n| bytes_of(&g.get(n).unwrap())).collect()
    };

    // c2: a weight and a closure that applies fine; c3: a closure that fails.
    r.commit(&m, vec![("w2", lora(16, 32, 2, 1.0))]);
    m.commit(counter("c2b")).unwrap();
    m.commit(Commit::closure("broken", || Err::<(), _>("no such mode"), || Ok::<(), std::io::Error>(())))
        .unwrap();
    match auto_manage(&m) {
        Err(Error::CommitFailed { action: "apply", commit, source, .. }) => {
            assert!(commit.contains("broken"), "{commit}");
            assert_eq!(source.to_string(), "no such mode");
        }
        other => panic!("expected CommitFailed, got {other:?}"),
    }
    assert_eq!(level.load(SeqCst), 1, "the closure applied by the failed rebase was reverted");
    assert_eq!(m.use_count(), 0, "the failed guard gave its use back");
    // The weights are still c1's (compare through a variant that wants exactly c1).
    let v = m.variant();
    v.revert(); // "broken"
    v.revert(); // c2b
    v.revert(); // c2
    {
        let g = auto_manage(&v).unwrap();
        let now: Vec<Vec<u8>> =
            ["w1", "w2", "w3", "bias"].iter().map(|n| bytes_of(&g.get(n).unwrap())).collect();
        assert_eq!(now, snapshot);
        assert_eq!(level.load(SeqCst), 1);
    }
    check_invariants(&pools.stats());

    // Without the broken commit, the stack applies.
    m.revert();
    r.check(&m);
    assert_eq!(level.load(SeqCst), 2);

    // A revert closure that fails: the guard that needs it fails, nothing changes.
    m.commit(Commit::closure("sticky", || Ok::<(), std::io::Error>(()), || Err::<(), _>("cannot undo")))
        .unwrap();
    drop(auto_manage(&m).unwrap());
    m.revert();
    match auto_manage(&m) {
        Err(Error::CommitFailed { action: "revert", .. }) => {}
        other => panic!("expected CommitFailed on revert, got {other:?}"),
    }
    assert_eq!(level.load(SeqCst), 2);
    check_invariants(&pools.stats());
}

/// The one spill file of the instance holding a tensor `w` of this shape.
fn spilled(dir: &std::path::Path, shape: &[i64]) -> Vec<Tensor> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| Tensor::read_safetensors(e.unwrap().path()).ok())
        .filter_map(|ts| ts.into_iter().find(|(n, t)| n == "w" && t.size() == shape).map(|(_, t)| t))
        .collect()
}

#[test]
fn patched_weights_survive_eviction_through_disk_and_the_base_is_written_once() {
    const KIB: u64 = 1024;
    // Room for 768 KiB: a (256 KiB) and b (512 KiB), or a with its patch buffer.
    let (pools, _dir) = pools(768 * KIB);
    tch::manual_seed(5);
    let a_set = TensorSet::new([("w", Tensor::randn([256, 256], F32))]).unwrap();
    let mut r = Reference::new(&a_set);
    let a = pools.manage_with(a_set, ManageOptions::new().name("a")).unwrap();
    let b = pools
        .manage_with(
            TensorSet::new([("w", Tensor::randn([256, 512], F32))]).unwrap(),
            ManageOptions::new().name("b"),
        )
        .unwrap();
    r.commit(&a, vec![("w", lora(256, 256, 8, 0.5))]);

    // Patching a needs room for its buffer: b (idle) is spilled for it.
    r.check(&a);
    let s = pools.stats();
    check_invariants(&s);
    assert_eq!(b.location(), Location::Disk);
    assert_eq!(s.pool(Location::Cpu).unwrap().used, 512 * KIB, "a and its patch buffer");
    assert_eq!(s.bytes_to_disk, 512 * KIB, "b written");

    // Using b evicts a: its base, not the patched weight, goes to disk.
    drop(auto_manage(&b).unwrap());
    assert_eq!(a.location(), Location::Disk);
    let s = pools.stats();
    check_invariants(&s);
    assert_eq!(s.bytes_to_disk, 768 * KIB, "a's base written once");
    let files = spilled(pools.spill_dir().unwrap(), &[256, 256]);
    assert_eq!(files.len(), 1);
    assert_eq!(bytes_of(&files[0]), bytes_of(&r.base[0].1), "the spill file holds the base");

    // a comes back from disk with the same patched weights; b (clean) is not rewritten.
    for _ in 0..3 {
        r.check(&a);
        assert_eq!(b.location(), Location::Disk);
        drop(auto_manage(&b).unwrap());
        assert_eq!(a.location(), Location::Disk);
        check_invariants(&pools.stats());
    }
    assert_eq!(pools.stats().bytes_to_disk, 768 * KIB, "nothing was rewritten");
    // Explicit offload too, then back to the base.
    r.check(&a);
    a.offload().unwrap();
    a.revert_all();
    r.stack.clear();
    r.check(&a);
    let s = pools.stats();
    assert_eq!(s.bytes_to_disk, 768 * KIB);
    check_invariants(&s);
}

/// A linear layer in a VarStore: the module follows the managed weights.
struct Net {
    vs: nn::VarStore,
    fc: nn::Linear,
}

impl ResourceUser for Net {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vs.tensors()
    }
}

fn net(seed: i64) -> (Net, Tensor, Tensor) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let fc = nn::linear(vs.root() / "fc", 64, 32, Default::default());
    let (w, b) = (fc.ws.detach().copy(), fc.bs.as_ref().unwrap().detach().copy());
    (Net { vs, fc }, w, b)
}

struct Variant<T> {
    m: sire::Managed<T>,
    y: Tensor,
}

/// The base model, variant A (LoRA on the weight) and variant B (another LoRA and
/// a bias delta), with the outputs each should give, computed from copies of the
/// base weights `w`, `b`.
fn variants<T>(m: sire::Managed<T>, w: &Tensor, b: &Tensor, x: &Tensor) -> [Variant<T>; 3] {
    let (la, lb) = (lora(32, 64, 4, 0.5), lora(32, 64, 8, 2.0));
    let db = Tensor::randn([32], F32);
    let a = m.variant();
    a.commit(la.commit("fc.weight")).unwrap();
    let bv = m.variant();
    bv.commit(Commit::squash([lb.commit("fc.weight"), Commit::delta("fc.bias", db.shallow_clone())]))
        .unwrap();
    let y0 = tch::no_grad(|| x.linear(w, Some(b)));
    let ya = tch::no_grad(|| x.linear(&la.apply(w), Some(b)));
    let yb = tch::no_grad(|| x.linear(&lb.apply(w), Some(&Op::Delta(db).apply(b))));
    [Variant { m, y: y0 }, Variant { m: a, y: ya }, Variant { m: bv, y: yb }]
}

#[test]
fn variants_alternate_100_times_with_correct_outputs() {
    let (pools, _dir) = pools(64 * MIB);
    let (model, w, b) = net(6);
    let x = Tensor::randn([5, 64], F32);
    let [base, a, b] = variants(pools.manage(model).unwrap(), &w, &b, &x);
    let forward = |v: &Variant<Net>| {
        let g = auto_manage(&v.m).unwrap();
        tch::no_grad(|| g.fc.forward(&x)) // the module built on the VarStore
    };
    for i in 0..100 {
        assert_eq!(bytes_of(&forward(&a)), bytes_of(&a.y), "variant A, round {i}");
        assert_eq!(bytes_of(&forward(&b)), bytes_of(&b.y), "variant B, round {i}");
        if i % 10 == 0 {
            assert_eq!(bytes_of(&forward(&base)), bytes_of(&base.y), "base, round {i}");
        }
    }
    // One copy of the base, the patch buffers of the weights B patched, and A's
    // buffer of the weight both patch, kept as a spare (the pool had room).
    let s = pools.stats();
    check_invariants(&s);
    let used = s.pool(Location::Cpu).unwrap().used;
    assert_eq!(
        used,
        a.m.size_bytes() + 32 * 64 * 4 + 32 * 4 + 32 * 64 * 4,
        "one base, B's patch buffers and A's spare"
    );
    assert_eq!(a.m.location(), Location::Cpu);
    drop(forward(&base));
    assert_eq!(pools.stats().pool(Location::Cpu).unwrap().used, a.m.size_bytes(), "the base alone");
}

#[test]
fn variants_from_two_threads_serialise_on_the_base() {
    let (pools, _dir) = pools(64 * MIB);
    let (model, w, b) = net(6);
    let x = Tensor::randn([5, 64], F32);
    drop(model);
    let set = TensorSet::new([("fc.weight", w.copy()), ("fc.bias", b.copy())]).unwrap();
    let [_base, a, b] = variants(pools.manage(set).unwrap(), &w, &b, &x);
    let inside = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let start = Arc::new(Barrier::new(2));
    let run = |me: usize, v: Variant<TensorSet>| {
        let inside = inside.clone();
        let start = start.clone();
        let x = x.shallow_clone();
        std::thread::spawn(move || {
            start.wait();
            for i in 0..100 {
                let g = auto_manage(&v.m).unwrap();
                inside[me].fetch_add(1, SeqCst);
                assert_eq!(inside[1 - me].load(SeqCst), 0, "both variants held the base at once");
                let forward =
                    || tch::no_grad(|| x.linear(&g.get("fc.weight").unwrap(), g.get("fc.bias").as_ref()));
                let y1 = forward();
                std::thread::yield_now();
                let y2 = forward();
                assert_eq!(bytes_of(&y1), bytes_of(&v.y), "thread {me}, round {i}");
                assert_eq!(bytes_of(&y2), bytes_of(&v.y), "weights changed under a live guard");
                inside[me].fetch_sub(1, SeqCst);
                drop(g);
            }
        })
    };
    let (ta, tb) = (run(0, a), run(1, b));
    ta.join().unwrap();
    tb.join().unwrap();
    check_invariants(&pools.stats());
}

#[test]
fn a_live_guard_keeps_its_weights_and_a_new_stack_waits_for_it() {
    let (pools, _dir) = pools(64 * MIB);
    let set = mixed_set(7);
    let mut r = Reference::new(&set);
    let m = pools.manage(set).unwrap();
    let g = auto_manage(&m).unwrap();
    r.commit(&m, vec![("w1", lora(16, 32, 4, 1.0))]);
    assert_eq!(bytes_of(&g.get("w1").unwrap()), bytes_of(&r.base[0].1), "the live guard still sees the base");
    // A guard wanting the new stack cannot rebase while g is alive.
    match try_auto_manage(&m) {
        Err(Error::InUse { .. }) => {}
        other => panic!("expected InUse, got {other:?}"),
    }
    // From another thread, a waiting guard gets the model once g drops.
    let m2 = m.clone();
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let g = auto_manage(&m2).unwrap();
        (t.elapsed(), bytes_of(&g.get("w1").unwrap()))
    });
    std::thread::sleep(Duration::from_millis(150));
    drop(g);
    let (waited, w1) = waiter.join().unwrap();
    assert!(waited >= Duration::from_millis(100), "the rebase waited for the live guard ({waited:?})");
    assert_eq!(w1, bytes_of(&r.expected("w1")));
}

#[test]
fn a_guard_taken_before_the_first_commit_delays_the_rebase() {
    let (pools, _dir) = pools(64 * MIB);
    let set = mixed_set(8);
    let mut r = Reference::new(&set);
    let m = pools.manage(set).unwrap();
    let plain = auto_manage(&m).unwrap(); // no commit yet: the plain hit path
    r.commit(&m, vec![("w1", lora(16, 32, 4, 1.0))]);
    let m2 = m.clone();
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let g = sire::auto_manage_timeout(&m2, Duration::from_secs(20)).unwrap();
        (t.elapsed(), bytes_of(&g.get("w1").unwrap()))
    });
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        bytes_of(&plain.get("w1").unwrap()),
        bytes_of(&r.base[0].1),
        "unchanged under the plain guard"
    );
    drop(plain);
    let (waited, w1) = waiter.join().unwrap();
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    assert_eq!(w1, bytes_of(&r.expected("w1")));
}

#[test]
fn lora_files_in_both_layouts_map_onto_a_varstore() {
    let (pools, dir) = pools(64 * MIB);
    tch::manual_seed(9);
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = vs.root() / "enc";
    let fc1 = nn::linear(&enc / "fc1", 16, 12, Default::default());
    let fc2 = nn::linear(&enc / "fc2", 12, 8, Default::default());
    let (w1, w2) = (fc1.ws.detach().copy(), fc2.ws.detach().copy());
    let (a1, b1) = (Tensor::randn([4, 16], F32), Tensor::randn([12, 4], F32));
    let (a2, b2) = (Tensor::randn([2, 12], F32), Tensor::randn([8, 2], F32));
    let path = dir.path().join("adapter.safetensors");
    Tensor::write_safetensors(
        &[
            ("base_model.model.enc.fc1.lora_A.weight", &a1),
            ("base_model.model.enc.fc1.lora_B.weight", &b1),
            ("lora_unet_enc_fc2.lora_down.weight", &a2),
            ("lora_unet_enc_fc2.lora_up.weight", &b2),
            ("lora_unet_enc_fc2.alpha", &Tensor::from(1.0f32)),
        ],
        &path,
    )
    .unwrap();
    let lora = Lora::from_safetensors(&path).unwrap().alpha(8.0); // fc1 has no alpha of its own
    assert_eq!(lora.len(), 2);
    let m = pools.manage(vs).unwrap();
    let commit = lora.to_commit(m.tensor_names(), 0.5).unwrap();
    assert_eq!(commit.targets().collect::<Vec<_>>(), ["enc.fc1.weight", "enc.fc2.weight"]);
    m.commit(commit).unwrap();
    let g = auto_manage(&m).unwrap();
    // multiplier 0.5 · alpha / rank: fc1 0.5·8/4 = 1, fc2 0.5·1/2 = 0.25.
    let want1 = Op::Lora(a1, b1, 1.0).apply(&w1);
    let want2 = Op::Lora(a2.shallow_clone(), b2.shallow_clone(), 0.25).apply(&w2);
    assert_eq!(bytes_of(&fc1.ws), bytes_of(&want1), "the module follows the patched weight");
    assert_eq!(bytes_of(&fc2.ws), bytes_of(&want2));
    drop(g);

    // A module with no counterpart in the model is named in the error.
    let stray = dir.path().join("stray.safetensors");
    Tensor::write_safetensors(&[("dec.out.lora_A.weight", &a2), ("dec.out.lora_B.weight", &b2)], &stray)
        .unwrap();
    match Lora::from_safetensors(&stray).unwrap().to_commit(m.tensor_names(), 1.0) {
        Err(e @ Error::UnmatchedKey { .. }) => assert!(e.to_string().contains("`dec.out`"), "{e}"),
        other => panic!("expected UnmatchedKey, got {other:?}"),
    }
}

/// GPU: run with `--features cuda-tests` (fails, never skips, without CUDA).
#[cfg(feature = "cuda-tests")]
mod cuda {
    use super::*;

    #[test]
    fn patches_live_on_the_gpu_copy_and_never_reach_the_home() {
        let p = sire::ResourcePoolManagement::builder()
            .env(false)
            .cuda_budget(1 << 30)
            .cpu_budget(8 << 30)
            .build()
            .unwrap();
        assert!(tch::Cuda::is_available(), "cuda-tests asked for, but libtorch sees no CUDA device");
        let set = mixed_set(12);
        let mut r = Reference::new(&set);
        let m = p.manage(set).unwrap();
        assert_eq!(m.runtime(), Location::Cuda(0));
        r.commit(&m, vec![("w1", lora(16, 32, 4, 0.5)), ("w2", Op::Delta(Tensor::randn([16, 32], F32)))]);
        let names = ["w1", "w2", "w3", "bias"];
        let read = |m: &sire::Managed<TensorSet>| -> Vec<Vec<u8>> {
            let g = auto_manage(m).unwrap();
            names
                .iter()
                .map(|n| {
                    let t = g.get(n).unwrap();
                    assert_eq!(t.device(), Device::Cuda(0), "`{n}` is not on the GPU");
                    bytes_of(&t.to_device(Device::Cpu))
                })
                .collect()
        };
        let patched = read(&m);
        {
            // cuBLAS and the CPU may round products differently: compare with a tolerance.
            let g = auto_manage(&m).unwrap();
            for n in names {
                let got = g.get(n).unwrap().to_device(Device::Cpu).to_kind(Kind::Double);
                let want = r.expected(n).to_kind(Kind::Double);
                assert!(got.allclose(&want, 1e-2, 1e-3, false), "`{n}` differs from the reference");
            }
        }
        m.offload().unwrap();
        assert_eq!(m.location(), Location::Cpu);
        let home = m.get_unguarded();
        for (n, base) in &r.base {
            assert_eq!(bytes_of(&home.get(n).unwrap()), bytes_of(base), "the home copy of `{n}` was written");
        }
        assert_eq!(p.stats().bytes_device_to_host, 0, "patches are not user writes: nothing copied back");
        assert_eq!(read(&m), patched, "reloaded with the same patched weights");
        m.revert_all();
        r.stack.clear();
        let base: Vec<Vec<u8>> = r.base.iter().map(|(_, t)| bytes_of(t)).collect();
        assert_eq!(read(&m), base, "reverted to the base, bit for bit");
        check_invariants(&p.stats());
    }
}

#[test]
fn switching_back_to_the_previous_variant_swaps_buffers_when_there_is_room() {
    let w = Tensor::randn([256, 256], F32);
    let (la, lb) = (lora(256, 256, 8, 0.5), lora(256, 256, 8, 2.0));
    let run = |budget: u64| {
        let (pools, _dir) = pools(budget);
        let m = pools.manage(TensorSet::new([("w", w.copy())]).unwrap()).unwrap();
        let (a, b) = (m.variant(), m.variant());
        a.commit(la.commit("w")).unwrap();
        b.commit(lb.commit("w")).unwrap();
        let mut ptrs = Vec::new();
        for i in 0..6 {
            let (v, op) = if i % 2 == 0 { (&a, &la) } else { (&b, &lb) };
            let g = auto_manage(v).unwrap();
            let t = g.get("w").unwrap();
            assert_eq!(bytes_of(&t), bytes_of(&op.apply(&w)), "round {i}");
            ptrs.push(t.data_ptr() as usize);
        }
        check_invariants(&pools.stats());
        (ptrs, pools.stats().pool(Location::Cpu).unwrap().used)
    };
    const W: u64 = 256 * 256 * 4;
    // Room for the base and two buffers: A and B alternate between two buffers.
    let (ptrs, used) = run(4 * W);
    assert_eq!(used, 3 * W, "base + current buffer + spare");
    assert!(ptrs.iter().step_by(2).all(|&p| p == ptrs[0]), "A always in its own buffer: {ptrs:x?}");
    assert!(ptrs.iter().skip(1).step_by(2).all(|&p| p == ptrs[1]), "B always in its own: {ptrs:x?}");
    assert_ne!(ptrs[0], ptrs[1]);
    // Room for the base and one buffer only: no spare, recomputed in place, still exact.
    let (ptrs, used) = run(2 * W + W / 2);
    assert_eq!(used, 2 * W, "base + one buffer, no spare");
    assert!(ptrs.iter().all(|&p| p == ptrs[0]), "one buffer rewritten in place: {ptrs:x?}");
}

#[test]
fn spares_are_given_up_before_any_model_is_evicted() {
    const W: u64 = 256 * 256 * 4;
    let (pools, _dir) = pools(3 * W + W / 2);
    let w = Tensor::randn([256, 256], F32);
    let m = pools
        .manage_with(TensorSet::new([("w", w.copy())]).unwrap(), ManageOptions::new().name("m"))
        .unwrap();
    let (la, lb) = (lora(256, 256, 8, 0.5), lora(256, 256, 8, 2.0));
    let (a, b) = (m.variant(), m.variant());
    a.commit(la.commit("w")).unwrap();
    b.commit(lb.commit("w")).unwrap();
    drop(auto_manage(&a).unwrap());
    drop(auto_manage(&b).unwrap());
    assert_eq!(pools.stats().pool(Location::Cpu).unwrap().used, 3 * W, "base + buffer + spare");
    // Another model of one weight's size needs the spare's room: the spare goes,
    // `m` stays resident.
    let other = pools.manage(TensorSet::new([("x", Tensor::zeros([256, 256], F32))]).unwrap()).unwrap();
    let s = pools.stats();
    check_invariants(&s);
    assert_eq!(m.location(), Location::Cpu, "m was not evicted");
    assert_eq!(other.location(), Location::Cpu);
    assert_eq!(s.pool(Location::Cpu).unwrap().used, 3 * W, "base + buffer + other");
    assert_eq!(s.evictions, 0);
    // Both variants are still exact (the switch recomputes now).
    for (v, op) in [(&a, &la), (&b, &lb), (&a, &la)] {
        let g = auto_manage(v).unwrap();
        assert_eq!(bytes_of(&g.get("w").unwrap()), bytes_of(&op.apply(&w)));
    }
    check_invariants(&pools.stats());
}
