//! Exclusive sharing (`SharedModelManager`): at most one model on the shared
//! device at any instant, for the whole life of its guards. Checked by an
//! observer that replays the engine's events, not by sleeping.

mod common;
mod nets;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nets::*;
use sire::{Error, Event, EventKind, Location, ResourcePoolManagement, SharedModelManager, TensorSet};
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

/// Replays events into "where is each model", and records every instant at
/// which more than one model sat on its runtime location.
#[derive(Default)]
struct Observer {
    at: HashMap<String, Location>,
    runtime: HashMap<String, Location>,
    max_resident: usize,
    violations: Vec<String>,
    loads: HashMap<String, usize>,
    log: Vec<String>,
}

impl Observer {
    fn see(&mut self, e: &Event) {
        self.log.push(e.to_string());
        self.runtime.insert(e.model.clone(), e.runtime);
        match e.to {
            Some(l) => self.at.insert(e.model.clone(), l),
            None => self.at.remove(&e.model),
        };
        if e.kind == EventKind::Loaded && e.resident() {
            *self.loads.entry(e.model.clone()).or_default() += 1;
        }
        let resident: Vec<&String> =
            self.at.iter().filter(|(m, l)| self.runtime[*m] == **l).map(|(m, _)| m).collect();
        self.max_resident = self.max_resident.max(resident.len());
        if resident.len() > 1 {
            self.violations.push(format!("after `{e}`: {resident:?} all resident"));
        }
    }
}

fn observed_pools(cpu_budget: u64) -> (ResourcePoolManagement, Arc<Mutex<Observer>>, tempfile::TempDir) {
    let obs = Arc::new(Mutex::new(Observer::default()));
    let o = obs.clone();
    let dir = tempfile::tempdir().unwrap();
    let pools = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(cpu_budget)
        .spill_dir(dir.path())
        .wait_timeout(Duration::from_secs(30))
        .listener(move |e| o.lock().unwrap().see(e))
        .build()
        .unwrap();
    (pools, obs, dir)
}

/// Models in use right now (the test's own view): a fetch must never find
/// another model in use.
#[derive(Default)]
struct InUse(Mutex<HashMap<String, usize>>);

impl InUse {
    fn enter(&self, id: &str) {
        let mut m = self.0.lock().unwrap();
        let others: Vec<_> =
            m.iter().filter(|(k, n)| k.as_str() != id && **n > 0).map(|(k, _)| k.clone()).collect();
        assert!(others.is_empty(), "`{id}` fetched while {others:?} in use");
        *m.entry(id.to_string()).or_default() += 1;
    }
    fn leave(&self, id: &str) {
        *self.0.lock().unwrap().get_mut(id).unwrap() -= 1;
    }
}

#[test]
fn two_models_alternate_and_are_never_resident_together() {
    // Room for both models at once: exclusivity is the manager's doing, not the budget's.
    let (pools, obs, _dir) = observed_pools(64 * MIB);
    let shared = SharedModelManager::with_pools(pools.clone());
    assert_eq!(shared.location(), Location::Cpu);
    let x = Tensor::randn([4, 16], (Kind::Float, Device::Cpu));
    let (a, b) = (net(1), net(2));
    let expected: HashMap<String, Vec<u8>> =
        [("a", bits(&a.forward(&x))), ("b", bits(&b.forward(&x)))].map(|(k, v)| (k.to_string(), v)).into();
    shared.add_with_id("a", a).unwrap();
    shared.add_with_id("b", b).unwrap();
    assert_eq!(shared.ids(), ["a", "b"]);
    assert_eq!(shared.model_location("a").unwrap(), Location::Disk, "added models wait off the device");

    let in_use = Arc::new(InUse::default());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (shared, x, expected, in_use) =
                (shared.clone(), x.shallow_clone(), expected.clone(), in_use.clone());
            std::thread::spawn(move || {
                for i in 0..12 {
                    let id = if (i + t) % 2 == 0 { "a" } else { "b" };
                    let g = shared.fetch_model::<Net>(id).unwrap();
                    in_use.enter(id);
                    assert_eq!(g.id(), id);
                    assert_eq!(shared.model_location(id).unwrap(), Location::Cpu);
                    let y = g.forward(&x.to_device(g.device()));
                    assert_eq!(bits(&y), expected[id], "{id} computed a wrong output");
                    in_use.leave(id);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let o = obs.lock().unwrap();
    assert!(o.violations.is_empty(), "{:#?}\n{:#?}", o.violations, o.log);
    assert_eq!(o.max_resident, 1);
    assert!(o.loads["a"] >= 2 && o.loads["b"] >= 2, "the models alternated: {:?}", o.loads);
    check_invariants(&pools.stats());
}

#[test]
fn fetching_the_occupant_moves_nothing() {
    let (pools, _obs, _dir) = observed_pools(64 * MIB);
    let shared = SharedModelManager::with_pools(pools.clone());
    let a = shared.add(net(1)).unwrap();
    let b = shared.add(net(2)).unwrap();
    assert_eq!((a.as_str(), b.as_str()), ("Net", "Net#2"));
    drop(shared.fetch_model::<Net>(&b).unwrap());
    drop(shared.fetch_model::<Net>(&a).unwrap());
    let before = pools.stats();
    {
        let g1 = shared.fetch_model::<Net>(&a).unwrap();
        let g2 = shared.fetch_model::<Net>(&a).unwrap(); // same model: both guards at once
        assert_eq!((g1.device(), g2.device()), (Device::Cpu, Device::Cpu));
    }
    drop(shared.fetch_model::<Net>(&a).unwrap());
    let after = pools.stats();
    assert_eq!(after.misses, before.misses);
    assert_eq!(after.evictions, before.evictions);
    assert_eq!(after.bytes_from_disk, before.bytes_from_disk);
    assert_eq!(after.bytes_to_disk, before.bytes_to_disk);
    assert_eq!(after.hits, before.hits + 3);
    assert_eq!(
        shared.model_location(&a).unwrap(),
        Location::Cpu,
        "the occupant stays until another is fetched"
    );
    assert_eq!(shared.model_location(&b).unwrap(), Location::Disk);
}

#[test]
fn a_guard_keeps_the_device_until_it_is_dropped() {
    let (pools, obs, _dir) = observed_pools(64 * MIB);
    let shared = SharedModelManager::with_pools(pools);
    shared.add_with_id("a", net(1)).unwrap();
    shared.add_with_id("b", net(2)).unwrap();
    let ga = shared.fetch_model::<Net>("a").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let s = shared.clone();
    let fetcher = std::thread::spawn(move || {
        let g = s.fetch_model::<Net>("b").unwrap();
        tx.send(s.model_location("a").unwrap()).unwrap();
        drop(g);
    });
    // The fetch of b waits (this only checks that it has not finished; the order of
    // the moves below is the real check).
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "b was fetched while a's guard lived");
    assert_eq!(shared.model_location("a").unwrap(), Location::Cpu);
    drop(ga);
    assert_eq!(rx.recv().unwrap(), Location::Disk, "a was offloaded before b got the device");
    fetcher.join().unwrap();
    let o = obs.lock().unwrap();
    let a_off = o.log.iter().rposition(|l| l == "a Offloaded: cpu -> disk").expect("a offloaded");
    let b_on = o.log.iter().rposition(|l| l == "b Loaded: disk -> cpu").expect("b loaded");
    assert!(a_off < b_on, "{:#?}", o.log);
    assert!(o.violations.is_empty(), "{:#?}", o.violations);
}

#[test]
fn unknown_ids_and_wrong_types_are_typed_errors() {
    let (pools, _obs, _dir) = observed_pools(64 * MIB);
    let shared = SharedModelManager::with_pools(pools);
    shared.add_with_id("detector", net(1)).unwrap();
    shared.add(TensorSet::new([("w", Tensor::ones([4], tch::kind::FLOAT_CPU))]).unwrap()).unwrap();
    match shared.fetch_model::<Net>("captioner") {
        Err(Error::UnknownModel { id, known }) => {
            assert_eq!(id, "captioner");
            assert_eq!(known, ["TensorSet", "detector"]);
        }
        other => panic!("expected UnknownModel, got {other:?}"),
    }
    let msg = shared.fetch_model::<Net>("nope").unwrap_err().to_string();
    assert!(msg.contains("`nope`") && msg.contains("TensorSet, detector"), "{msg}");
    match shared.fetch_model::<TensorSet>("detector") {
        Err(Error::WrongModelType { id, requested, actual }) => {
            assert_eq!(id, "detector");
            assert!(requested.ends_with("TensorSet") && actual.ends_with("Net"), "{requested} {actual}");
        }
        other => panic!("expected WrongModelType, got {other:?}"),
    }
    assert!(matches!(shared.add_with_id("detector", net(2)), Err(Error::InvalidOptions { .. })));
    // A failed fetch took no turn: the device is still free.
    drop(shared.fetch_model::<TensorSet>("TensorSet").unwrap());
    drop(shared.fetch_model::<Net>("detector").unwrap());
}

#[test]
fn send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<SharedModelManager>();
    check::<sire::ExclusiveGuard<Net>>();
    check::<sire::Hooked<Net>>();
}
