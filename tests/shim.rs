//! The public CUDA calls of the C++ shim, on any machine: without CUDA they
//! answer the typed `Error::NoCuda`; with it, sane numbers. Which case applies
//! is decided by libtorch (`tch::Cuda::is_available()`), and the shim must agree
//! with it. (The crate-internal calls, streams, events and pinned tensors, are
//! tested the same way in `src/cuda.rs`.)

use sire::{Error, Location};

/// libtorch's answer; a `cuda-tests` run must have CUDA.
fn cuda() -> bool {
    let available = tch::Cuda::is_available();
    if cfg!(feature = "cuda-tests") {
        assert!(available, "cuda-tests asked for, but libtorch sees no CUDA device");
    }
    available
}

fn assert_no_cuda<T: std::fmt::Debug>(r: sire::Result<T>, what: &str) {
    match r {
        Err(e @ Error::NoCuda { .. }) => {
            let Error::NoCuda { what: w } = &e else { unreachable!() };
            assert_eq!(*w, what);
            let msg = e.to_string();
            assert!(msg.contains("no CUDA device") && msg.contains(what), "{msg}");
        }
        other => panic!("{what}: expected Error::NoCuda, got {other:?}"),
    }
}

#[test]
fn device_memory() {
    if cuda() {
        let n = tch::Cuda::device_count() as usize;
        for d in 0..n {
            let m = sire::device_memory(d).unwrap();
            assert!(m.total > 0, "cuda:{d}: {m:?}");
            assert!(m.free <= m.total, "cuda:{d}: {m:?}");
            assert!(m.allocated <= m.reserved, "cuda:{d}: {m:?}");
            assert!(m.reserved <= m.total, "cuda:{d}: {m:?}");
        }
        match sire::device_memory(n) {
            Err(Error::UnknownDevice { location, available }) => {
                assert_eq!(location, Location::Cuda(n));
                assert_eq!(available, n);
            }
            other => panic!("expected UnknownDevice, got {other:?}"),
        }
    } else {
        assert_no_cuda(sire::device_memory(0), "device_memory");
        // No CUDA wins over a device index out of range.
        assert_no_cuda(sire::device_memory(3), "device_memory");
    }
}

#[test]
fn empty_cache() {
    if cuda() {
        sire::empty_cache().unwrap();
        sire::empty_cache().unwrap();
    } else {
        assert_no_cuda(sire::empty_cache(), "empty_cache");
    }
}

#[test]
fn no_cuda_is_an_ordinary_error_value() {
    // Typed, displayable, and a std::error::Error, like every sire error.
    let e = Error::NoCuda { what: "device_memory" };
    assert_eq!(e.to_string(), "no CUDA device: device_memory needs one and libtorch sees none");
    let _: &dyn std::error::Error = &e;
}
