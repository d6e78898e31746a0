//! Property test for the accounting: after any sequence of manage / guard / drop /
//! offload / unregister / batch, every pool has `used <= budget` and `used == sum of its
//! residents`, models in use are on their runtime location, and every model's
//! weights are intact.

mod common;

use common::*;
use proptest::prelude::*;
use sire::{Location, ManageOptions, OffloadPolicy};
use tch::Kind;

#[derive(Debug, Clone)]
enum Op {
    Manage {
        size_kib: u64,
        eager: bool,
    },
    Acquire(usize),
    Release(usize),
    Offload(usize),
    Drop(usize),
    /// Two models loaded together (only while no guard is held, so it never waits).
    Batch(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u64..96, any::<bool>()).prop_map(|(size_kib, eager)| Op::Manage { size_kib, eager }),
        (0usize..8).prop_map(Op::Acquire),
        (0usize..8).prop_map(Op::Release),
        (0usize..8).prop_map(Op::Offload),
        (0usize..8).prop_map(Op::Drop),
        (0usize..8, 0usize..8).prop_map(|(i, j)| Op::Batch(i, j)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn accounting_holds_after_every_step(ops in prop::collection::vec(op(), 1..40)) {
        // Host room for about two of the larger models.
        let (pools, _dir) = pools(160 * 1024);
        let mut models: Vec<(sire::Managed<sire::TensorSet>, f64)> = Vec::new();
        let mut guards: Vec<(usize, sire::OwnedGuard<sire::TensorSet>)> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Manage { size_kib, eager } => {
                    let policy = if eager { OffloadPolicy::Eager } else { OffloadPolicy::Lazy };
                    let set = model(step as i64, size_kib * 1024);
                    let sum = set.get("a").unwrap().sum(Kind::Double).double_value(&[]);
                    let opts = ManageOptions::new().name(format!("m{step}")).policy(policy);
                    match pools.manage_with(set, opts) {
                        Ok(m) => models.push((m, sum)),
                        Err(sire::Error::OutOfMemory { .. }) => {}
                        Err(e) => panic!("manage: {e}"),
                    }
                }
                Op::Acquire(i) if !models.is_empty() => {
                    let i = i % models.len();
                    match sire::try_auto_manage(&models[i].0) {
                        Ok(g) => {
                            drop(g);
                            let g = sire::auto_manage_owned(&models[i].0).unwrap();
                            let s = g.get("a").unwrap().sum(Kind::Double).double_value(&[]);
                            prop_assert_eq!(s, models[i].1, "weights of model {} changed", i);
                            guards.push((i, g));
                        }
                        // Room held by guards, or too large: both legitimate here.
                        Err(sire::Error::OutOfMemory { .. }) | Err(sire::Error::TooLarge { .. }) => {}
                        Err(e) => panic!("acquire: {e}"),
                    }
                }
                Op::Release(i) if !guards.is_empty() => {
                    drop(guards.remove(i % guards.len()));
                }
                Op::Offload(i) if !models.is_empty() => {
                    let i = i % models.len();
                    match models[i].0.offload() {
                        Ok(()) => prop_assert_ne!(models[i].0.location(), Location::Cpu),
                        Err(sire::Error::InUse { .. }) => prop_assert!(models[i].0.use_count() > 0),
                        Err(e) => panic!("offload: {e}"),
                    }
                }
                Op::Batch(i, j) if !models.is_empty() && guards.is_empty() => {
                    let (i, j) = (i % models.len(), j % models.len());
                    match sire::auto_manage_all(&[models[i].0.handle(), models[j].0.handle()]) {
                        Ok(batch) => {
                            for k in [i, j] {
                                prop_assert_eq!(models[k].0.location(), Location::Cpu);
                                prop_assert_eq!(models[k].0.use_count(), 1);
                                let g = sire::try_auto_manage(&models[k].0).unwrap();
                                let s = g.get("a").unwrap().sum(Kind::Double).double_value(&[]);
                                prop_assert_eq!(s, models[k].1, "weights of model {} changed", k);
                            }
                            drop(batch);
                        }
                        Err(sire::Error::OutOfMemory { .. }) | Err(sire::Error::TooLarge { .. }) => {}
                        Err(e) => panic!("batch: {e}"),
                    }
                    prop_assert!(models.iter().all(|(m, _)| m.use_count() == 0), "a batch left a use behind");
                }
                Op::Drop(i) if !models.is_empty() => {
                    let i = i % models.len();
                    guards.retain(|(j, _)| *j != i);
                    guards.iter_mut().for_each(|(j, _)| if *j > i { *j -= 1 });
                    models.remove(i);
                }
                _ => {}
            }
            let s = pools.stats();
            check_invariants(&s);
            for (i, _) in &guards {
                prop_assert_eq!(models[*i].0.location(), Location::Cpu, "a model in use left its runtime location");
            }
        }
        drop(guards);
        drop(models);
        let s = pools.stats();
        prop_assert!(s.pools.iter().all(|p| p.used == 0), "bytes left behind after every model was dropped:\n{}", s);
    }
}
