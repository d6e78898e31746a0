//! Property test for commits: after any sequence of commit / revert / revert_to /
//! variant / evict / guard, with a second model competing for a small host
//! budget (so patched models really go through the disk), every guard sees
//! exactly the weights a plain tch computation gives for its handle's stack, the
//! pools' accounting holds after every step, and reverting everything gives the
//! base back bit for bit.

mod common;

use std::rc::Rc;

use common::*;
use proptest::prelude::*;
use sire::{Commit, CommitId, Location, ManageOptions, Managed, TensorSet};
use tch::{Device, Kind, Tensor};

const NAMES: [&str; 3] = ["w", "h", "b"];

fn shape(target: usize) -> Vec<i64> {
    match target {
        0 | 1 => vec![32, 32],
        _ => vec![32],
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// Targets (0..3) and kinds (0 LoRA, 1 delta, 2 replace) of a squashed commit.
    Commit {
        handle: usize,
        parts: Vec<(usize, u8)>,
        scale: f64,
    },
    Revert(usize),
    RevertTo(usize, usize),
    RevertAll(usize),
    Variant(usize),
    Evict,
    Guard(usize),
    Filler,
}

fn step() -> impl Strategy<Value = Step> {
    let part = (0usize..3, 0u8..3).prop_filter("LoRA needs a matrix", |(t, k)| !(*t == 2 && *k == 0));
    prop_oneof![
        4 => (0usize..4, prop::collection::vec(part, 1..4), prop_oneof![Just(1.0), Just(0.5), Just(-2.0)])
            .prop_map(|(handle, parts, scale)| Step::Commit { handle, parts, scale }),
        2 => (0usize..4).prop_map(Step::Revert),
        1 => (0usize..4, 0usize..8).prop_map(|(h, i)| Step::RevertTo(h, i)),
        1 => (0usize..4).prop_map(Step::RevertAll),
        1 => (0usize..4).prop_map(Step::Variant),
        2 => Just(Step::Evict),
        5 => (0usize..4).prop_map(Step::Guard),
        2 => Just(Step::Filler),
    ]
}

type RefCommit = Rc<(CommitId, Vec<(usize, Op)>)>;

struct Handle {
    m: Managed<TensorSet>,
    stack: Vec<RefCommit>,
}

fn expected(base: &[Tensor], stack: &[RefCommit], target: usize) -> Tensor {
    let mut w = base[target].copy();
    for c in stack {
        for (t, op) in &c.1 {
            if *t == target {
                w = op.apply(&w);
            }
        }
    }
    w
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn guards_see_their_stack_after_any_sequence(steps in prop::collection::vec(step(), 1..40)) {
        // The model: 4 KiB + 2 KiB + 128 B; patches up to as much again. The filler
        // (8 KiB) and the model with all its patches do not fit together.
        let (pools, _dir) = pools(16 * 1024);
        tch::manual_seed(11);
        let base = vec![
            Tensor::randn([32, 32], (Kind::Float, Device::Cpu)),
            Tensor::randn([32, 32], (Kind::Float, Device::Cpu)).to_kind(Kind::Half),
            Tensor::randn([32], (Kind::Float, Device::Cpu)),
        ];
        let set = TensorSet::new(NAMES.iter().zip(&base).map(|(n, t)| (*n, t.copy()))).unwrap();
        let m = pools.manage_with(set, ManageOptions::new().name("m")).unwrap();
        let filler = pools
            .manage_with(TensorSet::new([("f", Tensor::ones([2048], (Kind::Float, Device::Cpu)))]).unwrap(),
                         ManageOptions::new().name("filler"))
            .unwrap();
        let mut handles = vec![Handle { m, stack: Vec::new() }];
        for (n, step) in steps.into_iter().enumerate() {
            tch::manual_seed(100 + n as i64);
            match step {
                Step::Commit { handle, parts, scale } => {
                    let len = handles.len();
                    let h = &mut handles[handle % len];
                    let parts: Vec<(usize, Op)> = parts
                        .into_iter()
                        .map(|(t, k)| {
                            let f = (Kind::Float, Device::Cpu);
                            let op = match k {
                                0 => Op::Lora(Tensor::randn([3, 32], f), Tensor::randn([32, 3], f), scale),
                                1 => Op::Delta(Tensor::randn(shape(t), f)),
                                _ => Op::Replace(Tensor::randn(shape(t), f)),
                            };
                            (t, op)
                        })
                        .collect();
                    let c = Commit::squash(parts.iter().map(|(t, op)| op.commit(NAMES[*t])));
                    let id = h.m.commit(c).unwrap();
                    h.stack.push(Rc::new((id, parts)));
                }
                Step::Revert(i) => {
                    let len = handles.len();
                    let h = &mut handles[i % len];
                    let popped = h.m.revert();
                    prop_assert_eq!(popped, h.stack.pop().map(|c| c.0));
                }
                Step::RevertTo(i, k) => {
                    let len = handles.len();
                    let h = &mut handles[i % len];
                    if !h.stack.is_empty() {
                        let k = k % h.stack.len();
                        h.m.revert_to(h.stack[k].0).unwrap();
                        h.stack.truncate(k + 1);
                    }
                }
                Step::RevertAll(i) => {
                    let len = handles.len();
                    let h = &mut handles[i % len];
                    h.m.revert_all();
                    h.stack.clear();
                }
                Step::Variant(i) => {
                    if handles.len() < 4 {
                        let h = &handles[i % handles.len()];
                        let v = Handle { m: h.m.variant(), stack: h.stack.clone() };
                        handles.push(v);
                    }
                }
                Step::Evict => handles[0].m.offload().unwrap(),
                Step::Guard(i) => {
                    let h = &handles[i % handles.len()];
                    let g = sire::auto_manage(&h.m).unwrap();
                    prop_assert_eq!(h.m.location(), Location::Cpu);
                    for (t, name) in NAMES.iter().enumerate() {
                        let got = bytes_of(&g.get(name).unwrap());
                        prop_assert!(got == bytes_of(&expected(&base, &h.stack, t)), "step {}: `{}` differs", n, name);
                    }
                }
                Step::Filler => drop(sire::auto_manage(&filler).unwrap()),
            }
            let listed: Vec<CommitId> = handles[0].m.commits().iter().map(|c| c.id).collect();
            prop_assert_eq!(listed, handles[0].stack.iter().map(|c| c.0).collect::<Vec<_>>());
            check_invariants(&pools.stats());
        }
        // Everything reverted: the base, bit for bit, and no patch bytes left.
        for h in &handles {
            h.m.revert_all();
            let g = sire::auto_manage(&h.m).unwrap();
            for (name, b) in NAMES.iter().zip(&base) {
                prop_assert!(bytes_of(&g.get(name).unwrap()) == bytes_of(b), "`{}` is not the base", name);
            }
        }
        let s = pools.stats();
        check_invariants(&s);
        prop_assert!(s.pool(Location::Cpu).unwrap().residents.iter().all(|r| r.name != "m" || r.bytes == handles[0].m.size_bytes()));
    }
}
