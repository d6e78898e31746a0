//! Views of one storage registered as separate tensors: counted once, and
//! still sharing memory after moves (defect 12).

mod common;

use common::*;
use sire::{auto_manage, Error, Location, TensorSet};
use tch::{Device, Kind, Tensor};

// The review's reproduction (a view and its base counted once, still sharing
// after a move) is in tests/review.rs.

/// A write through one view is a write to the model: it survives an eviction
/// to disk and a reload, and the views still share memory after many cycles.
#[test]
fn writes_through_a_view_survive_disk_cycles() {
    let (pools, _d) = pools(64 * MIB);
    let w = Tensor::arange(24, (Kind::Float, Device::Cpu)).view([4, 6]);
    let cols = w.slice(1, 0, 6, 2); // strided: columns 0, 2, 4
    let wt = w.tr();
    let lone = Tensor::ones([3], (Kind::Int64, Device::Cpu));
    let set = TensorSet::new([("cols", cols), ("w", w), ("wt", wt), ("lone", lone)]).unwrap();
    let m = pools.manage(set).unwrap();
    assert_eq!(m.size_bytes(), 24 * 4 + 3 * 8);
    let want = Tensor::arange(24, (Kind::Float, Device::Cpu)).view([4, 6]);
    for round in 0..5 {
        m.offload().unwrap();
        assert_eq!(m.location(), Location::Disk);
        let g = auto_manage(&m).unwrap();
        let (w, cols, wt) = (g.get("w").unwrap(), g.get("cols").unwrap(), g.get("wt").unwrap());
        assert!(w.equal(&want), "round {round}: {w}");
        assert_eq!((cols.size(), cols.stride(), wt.stride()), (vec![4, 3], vec![6, 2], vec![1, 6]));
        // Write through the strided view; `w` and `wt` see it.
        let _ = cols.shallow_clone().fill_(round as f64);
        let _ = want.slice(1, 0, 6, 2).fill_(round as f64);
        assert!(w.equal(&want) && wt.equal(&want.tr()), "round {round}: {w}");
    }
}

/// Tensors the spill format cannot store are refused at registration, with
/// a message naming the model, the tensor and the reason (defect 17).
#[test]
fn unstorable_tensors_are_refused_at_registration() {
    let (pools, _d) = pools(64 * MIB);
    let ok = || Tensor::ones([4], (Kind::Float, Device::Cpu));
    let complex = TensorSet::new([("w", ok()), ("z", Tensor::zeros([4], (Kind::ComplexFloat, Device::Cpu)))]);
    let reserved = TensorSet::new([("w", ok()), ("__metadata__", ok())]);
    for (set, name, why) in [(complex, "`z`", "ComplexFloat"), (reserved, "`__metadata__`", "reserved")] {
        match pools.manage_with(set.unwrap(), sire::ManageOptions::new().name("net")) {
            Err(e @ Error::InvalidOptions { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("`net`") && msg.contains(name) && msg.contains(why), "{msg}");
            }
            Err(e) => panic!("expected InvalidOptions, got {e}"),
            Ok(_) => panic!("{name} was accepted"),
        }
    }
    // Nothing was registered, and a valid model still is.
    assert!(pools.manage(TensorSet::new([("w", ok())]).unwrap()).is_ok());
}
