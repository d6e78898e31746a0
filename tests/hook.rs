//! Self-managing modules: `sire::hook` gives the outputs of the plain module, bit
//! for bit, while the weights go back and forth between memory and disk.

mod common;
mod nets;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use nets::*;
use sire::{hook, hook_t, Error, Location, ManageOptions};
use tch::nn::{Module, ModuleT};
use tch::{CModule, Device, IValue, Kind, Tensor};

fn input(rows: i64) -> Tensor {
    tch::manual_seed(99);
    Tensor::randn([rows, 16], (Kind::Float, Device::Cpu))
}

#[test]
fn hooked_modules_give_the_plain_outputs_bit_for_bit_across_reloads() {
    // Host room for one of the two models and a half: each call of one evicts the
    // other to disk, so every call below reloads its model from the spill file.
    let (pools, _dir) = pools(NET_BYTES * 3 / 2);
    let (a, b) = (net(1), net(2));
    let x = input(3);
    let (ra, rb) = (bits(&a.forward(&x)), bits(&b.forward(&x)));
    assert_ne!(ra, rb);
    let ha = hook(pools.manage_with(a, ManageOptions::new().name("a")).unwrap());
    let hb = hook(pools.manage_with(b, ManageOptions::new().name("b")).unwrap());
    for _ in 0..3 {
        assert_eq!(bits(&ha.forward(&x)), ra);
        assert_eq!(bits(&hb.try_forward(&x).unwrap()), rb);
        assert_eq!(bits(&ha.forward_t(&x, false)), ra, "ModuleT comes with Module");
    }
    let s = pools.stats();
    assert!(s.misses >= 5 && s.bytes_from_disk >= 5 * NET_BYTES, "the models really moved:\n{s}");
    assert_eq!((ha.managed().use_count(), hb.managed().use_count()), (0, 0), "guards released");
    check_invariants(&s);

    // Usable wherever a module is: boxed as a trait object, in a Sequential.
    let boxed: Box<dyn Module> = Box::new(ha.clone());
    assert_eq!(bits(&boxed.forward(&x)), ra);
    let seq = tch::nn::seq().add(hb.clone()).add_fn(|y| y * 2);
    assert_eq!(bits(&seq.forward(&x)), bits(&(hb.forward(&x) * 2)));
}

#[test]
fn the_output_stays_on_the_execution_device_unless_asked() {
    let (pools, _dir) = pools(64 * MIB);
    let m = pools.manage(net(3)).unwrap();
    let x = input(2);
    let h = hook(m);
    assert_eq!(h.forward(&x).device(), Device::Cpu); // the execution device here
    let h = h.output_device(Device::Cpu);
    assert_eq!(h.forward(&x).device(), Device::Cpu);
    assert_eq!(h.managed().location(), Location::Cpu, "lazy: the model stays resident");
}

#[test]
fn hook_t_runs_the_training_flag_through() {
    let (pools, _dir) = pools(64 * MIB);
    let model = net_t(4);
    let x = input(8);
    let reference = bits(&model.forward_t(&x, false));
    let h = hook_t(pools.manage(model).unwrap());
    h.managed().offload().unwrap();
    assert_eq!(h.managed().location(), Location::Disk);
    assert_eq!(bits(&h.forward_t(&x, false)), reference, "eval mode is deterministic");
    assert_eq!(bits(&h.try_forward_t(&x, false).unwrap()), reference);
    // Training mode uses dropout: the flag reached the model.
    assert_ne!(bits(&h.forward_t(&x, true)), reference);
}

#[test]
fn failures_are_errors_in_try_forward_and_panics_in_forward() {
    // A model larger than the whole host budget (it is admitted straight to disk).
    let (pools, _dir) = pools(NET_BYTES / 2);
    let h = hook(pools.manage_with(net(5), ManageOptions::new().name("big")).unwrap());
    let x = input(1);
    match h.try_forward(&x) {
        Err(Error::TooLarge { model, requested, .. }) => {
            assert_eq!((model.as_str(), requested), ("big", NET_BYTES))
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let panic = catch_unwind(AssertUnwindSafe(|| h.forward(&x))).unwrap_err();
    let msg = panic.downcast_ref::<String>().expect("a formatted message");
    assert!(msg.contains("sire::Hooked::forward") && msg.contains("`big` needs"), "{msg}");
    assert_eq!(h.managed().use_count(), 0);
    check_invariants(&pools.stats());
}

#[test]
fn a_panic_inside_the_model_releases_the_guard() {
    let (pools, _dir) = pools(64 * MIB);
    let h = hook(pools.manage(net(6)).unwrap());
    let wrong = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)); // 3 features, not 16
    assert!(catch_unwind(AssertUnwindSafe(|| h.forward(&wrong))).is_err());
    assert_eq!(h.managed().use_count(), 0);
    h.managed().offload().expect("idle again: it can be offloaded");
}

fn ivalue_bits(v: &IValue) -> Vec<u8> {
    match v {
        IValue::Tensor(t) => bits(t),
        other => panic!("expected a tensor, got {other:?}"),
    }
}

fn tiny_ts() -> CModule {
    // Written by tests/data/make_tiny_ts.py: relu(Linear(8, 4)(x)) + y, and `both`.
    // The build's checkout, else the current directory (a copy of the tree on another machine).
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tiny.pt");
    let path = if std::path::Path::new(built).exists() { built } else { "tests/data/tiny.pt" };
    CModule::load(path).expect("tests/data/tiny.pt")
}

#[test]
fn torchscript_calls_give_the_plain_outputs_bit_for_bit() {
    let plain = tiny_ts();
    let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
    let r_ts = bits(&plain.forward_ts(&[&x, &y]).unwrap());
    let r_both = match plain.method_is("both", &[IValue::Tensor(x.shallow_clone())]).unwrap() {
        IValue::Tuple(v) => v.iter().map(ivalue_bits).collect::<Vec<_>>(),
        other => panic!("expected a tuple, got {other:?}"),
    };

    // Room for one module: the two take turns on disk.
    let bytes = (8 * 4 + 4) * 4;
    let (pools, _dir) = pools(bytes * 3 / 2);
    let h = hook(pools.manage(tiny_ts()).unwrap());
    let other = hook(pools.manage(tiny_ts()).unwrap());
    assert_eq!(h.managed().size_bytes(), bytes);
    for _ in 0..2 {
        assert_eq!(bits(&h.forward_ts(&[&x, &y]).unwrap()), r_ts);
        assert_eq!(bits(&other.forward_ts(&[&x, &y]).unwrap()), r_ts);
        let out =
            h.forward_is(&[IValue::Tensor(x.shallow_clone()), IValue::Tensor(y.shallow_clone())]).unwrap();
        assert_eq!(ivalue_bits(&out), r_ts);
        match h.method_is("both", &[IValue::Tensor(x.shallow_clone())]).unwrap() {
            IValue::Tuple(v) => {
                let got: Vec<_> = v.iter().map(ivalue_bits).collect();
                assert_eq!(got, r_both);
            }
            other => panic!("expected a tuple, got {other:?}"),
        }
        // CModule implements Module, and so does its hook.
        assert_eq!(bits(&h.method_ts("forward", &[&x, &y]).unwrap()), r_ts);
    }
    let s = pools.stats();
    assert!(s.misses >= 4, "the modules took turns:\n{s}");
    check_invariants(&s);
    // Errors from TorchScript are values too.
    assert!(matches!(h.method_ts("missing", &[&x]), Err(Error::Torch(_))));
    assert_eq!(h.managed().use_count(), 0);
}

/// GPU: inputs on the CPU are moved to the execution device, outputs stay there
/// unless asked. Fails (never skips) without CUDA.
#[cfg(feature = "cuda-tests")]
#[test]
fn inputs_move_to_the_gpu_and_outputs_stay_there_unless_asked() {
    let p = sire::ResourcePoolManagement::builder().env(false).cuda_budget(1 << 30).build().unwrap();
    assert!(tch::Cuda::is_available(), "cuda-tests asked for, but libtorch sees no CUDA device");
    let model = net(7);
    let x = input(4);
    let reference = model.forward(&x);
    let h = hook(p.manage(model).unwrap());
    assert_eq!(h.managed().runtime(), Location::Cuda(0));
    let y = h.forward(&x); // x is on the CPU
    assert_eq!(y.device(), Device::Cuda(0));
    assert!(y.to_device(Device::Cpu).allclose(&reference, 1e-5, 1e-5, false));
    let h = h.output_device(Device::Cpu);
    let y = h.forward(&x.to_device(Device::Cuda(0)));
    assert_eq!(y.device(), Device::Cpu);
    assert!(y.allclose(&reference, 1e-5, 1e-5, false));

    let ts = hook(p.manage(tiny_ts()).unwrap());
    let (a, b) = (Tensor::randn([2, 8], tch::kind::FLOAT_CPU), Tensor::randn([2, 4], tch::kind::FLOAT_CPU));
    match ts.forward_is(&[IValue::Tensor(a), IValue::Tensor(b)]).unwrap() {
        IValue::Tensor(t) => assert_eq!(t.device(), Device::Cuda(0)),
        other => panic!("expected a tensor, got {other:?}"),
    }
}

/// Inference mode (issue 11): hooked forwards run without autograd by default,
/// so outputs do not require gradients; `with_grad(true)` turns it back on.
#[test]
fn hooked_forwards_run_without_autograd_unless_asked() {
    let (pools, _dir) = pools(64 * MIB);
    let m = pools.manage(net(4)).unwrap();
    let x = input(2);
    assert!(m.get_unguarded().forward(&x).requires_grad(), "the plain module records a graph");
    let h = hook(m);
    assert!(!h.forward(&x).requires_grad(), "inference mode by default");
    assert!(!h.try_forward(&x).unwrap().requires_grad());
    let h = h.with_grad(true);
    let y = h.forward(&x);
    assert!(y.requires_grad(), "with_grad(true) records the graph");
    y.sum(Kind::Float).backward();
    assert!(!tch::no_grad(|| h.forward(&x)).requires_grad(), "the caller's no_grad still applies");
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_forwards_run_without_autograd_unless_asked() {
    let (pools, _dir) = pools(64 * MIB);
    let m = pools.manage(net(5)).unwrap();
    let x = input(2);
    let expected = tch::no_grad(|| m.get_unguarded().forward(&x));
    let h = hook(m);
    let y = h.forward_async(&x).await.unwrap();
    assert!(!y.requires_grad(), "the blocking pool does not see the caller's no_grad: sire turns it off");
    assert_eq!(bits(&y), bits(&expected));
    let y = h.clone().with_grad(true).forward_async(&x).await.unwrap();
    assert!(y.requires_grad());
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_torchscript_calls_give_the_sync_outputs() {
    let (pools, _dir) = pools(64 * MIB);
    let h = hook(pools.manage(tiny_ts()).unwrap());
    let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
    let sync = h.forward_ts(&[&x, &y]).unwrap();
    let a = h.forward_ts_async(&[&x, &y]).await.unwrap();
    assert_eq!(bits(&a), bits(&sync));
    assert!(!a.requires_grad());
    let m = h.method_ts_async("forward", &[&x, &y]).await.unwrap();
    assert_eq!(bits(&m), bits(&sync));
}
