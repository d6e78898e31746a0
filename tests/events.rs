//! The event listener: every published move, in order, delivered outside the
//! engine's lock (a listener may call back), and a panicking listener is contained.

mod common;

use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use sire::{auto_manage, EventKind, Location, ManageOptions, ResourcePoolManagement};

#[test]
fn the_listener_sees_every_move_in_order_and_may_call_back() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let me: Arc<OnceLock<ResourcePoolManagement>> = Arc::new(OnceLock::new());
    let (l, m) = (log.clone(), me.clone());
    let pools = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(MIB * 3 / 2) // room for one of the two models
        .spill_dir(dir.path())
        .listener(move |e| {
            // Calling back into the engine from the listener must not deadlock.
            let used = m.get().map_or(0, |p| p.stats().pool(Location::Cpu).unwrap().used);
            l.lock().unwrap().push((e.to_string(), used));
            assert_eq!(e.bytes, MIB);
            if e.kind == EventKind::Unregistered {
                panic!("a listener that panics"); // contained by the engine
            }
        })
        .build()
        .unwrap();
    me.set(pools.clone()).unwrap();
    let named = |n: &str| ManageOptions::new().name(n);
    let a = pools.manage_with(model(1, MIB), named("a")).unwrap();
    let b = pools.manage_with(model(2, MIB), named("b")).unwrap(); // a spilled to make room
    drop(auto_manage(&a).unwrap()); // b evicted, a loaded
    drop(b); // unregistered: the listener panics
    drop(auto_manage(&a).unwrap()); // a hit: no event
    a.offload().unwrap();
    let got: Vec<String> = log.lock().unwrap().iter().map(|(e, _)| e.clone()).collect();
    assert_eq!(
        got,
        [
            "a Registered: - -> cpu",
            "a Offloaded: cpu -> disk",
            "b Registered: - -> cpu",
            "b Offloaded: cpu -> disk",
            "a Loaded: disk -> cpu",
            "b Unregistered: disk -> -",
            "a Offloaded: cpu -> disk",
        ]
    );
    // Each callback saw the pool as it was once the operation had published its moves.
    let used: Vec<u64> = log.lock().unwrap().iter().map(|(_, u)| *u).collect();
    assert_eq!(used, [MIB, MIB, MIB, MIB, MIB, MIB, 0]);
    check_invariants(&pools.stats());
}
