//! GPU transfer benchmarks (issue 3). They need a CUDA device and fail, never
//! skip, without one.
//!
//! Run on the GPU machine (see `GPU.md`):
//! `cargo bench --features cuda-tests --bench gpu`
//! (`SIRE_BENCH_GB` lists the model sizes, default `0.5,2,8`).
//!
//! Each group measures its baseline in the same run and prints a `RATIO` line:
//! - `ceiling`: a raw pinned host-to-device copy of N bytes (one tensor, one
//!   non-blocking copy, one synchronisation): the bandwidth floor of a load;
//! - `load`: `auto_manage` of a spilled-to-host model of N bytes (packed,
//!   pinned home, 64 tensors), against the ceiling (goal >= 0.9x its GB/s);
//! - `offload`: offloading a clean 8 GB model (goal < 1 ms);
//! - `round_robin`: 4 models of 2 GB through a 5 GB budget, with a fixed
//!   compute per use, against bytes moved / ceiling + compute (goal <= 1.15x);
//! - `prefetch`: loading the next model while the current one computes,
//!   against compute alone (goal: the load hidden when compute is longer).

use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use sire::{auto_manage, prefetch, Location, Managed, ResourcePoolManagement, TensorSet};
use tch::{Device, Kind, Tensor};

const GB: f64 = 1e9;
const DEV: Device = Device::Cuda(0);

fn sizes() -> Vec<f64> {
    let v = std::env::var("SIRE_BENCH_GB").unwrap_or_else(|_| "0.5,2,8".into());
    v.split(',').map(|s| s.trim().parse().expect("SIRE_BENCH_GB: numbers of GB")).collect()
}

fn require_gpu() {
    assert!(tch::Cuda::is_available(), "the gpu benchmarks need a CUDA device (none is visible)");
}

fn sync() {
    tch::Cuda::synchronize(0);
}

fn pools(cuda_budget: u64) -> ResourcePoolManagement {
    let p = ResourcePoolManagement::builder()
        .env(false)
        .cuda_budget(cuda_budget)
        .disk(false)
        .wait_timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    assert!(p.pools().iter().any(|(l, _)| *l == Location::Cuda(0)), "no cuda:0 pool: {p}");
    p
}

/// A model of `bytes` bytes in 64 half-precision tensors (like a model's layers).
fn model(bytes: u64) -> TensorSet {
    let per = (bytes / 2 / 64) as i64;
    TensorSet::new(
        (0..64).map(|i| (format!("layer{i}.weight"), Tensor::ones([per], (Kind::Half, Device::Cpu)))),
    )
    .unwrap()
}

/// Seconds per copy of `bytes` from pinned host memory, best of `reps`.
fn raw_pinned_copy(bytes: u64, reps: usize) -> f64 {
    let src = Tensor::empty([bytes as i64], (Kind::Uint8, Device::Cpu)).pin_memory(DEV);
    assert!(src.is_pinned(DEV));
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        let d = src.to_device_(DEV, Kind::Uint8, true, false);
        sync();
        best = best.min(t.elapsed().as_secs_f64());
        drop(d);
    }
    best
}

/// A fixed amount of GPU work (square matmuls), queued on the current stream.
fn compute(x: &Tensor, n: usize) -> Tensor {
    let mut y = x.shallow_clone();
    for _ in 0..n {
        y = y.matmul(x);
    }
    y
}

fn loads(c: &mut Criterion) {
    require_gpu();
    let mut g = c.benchmark_group("gpu");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for gb in sizes() {
        let bytes = (gb * GB) as u64;
        g.throughput(Throughput::Bytes(bytes));
        g.bench_with_input(BenchmarkId::new("ceiling", gb), &bytes, |b, &bytes| {
            let src = Tensor::empty([bytes as i64], (Kind::Uint8, Device::Cpu)).pin_memory(DEV);
            b.iter(|| {
                let d = src.to_device_(DEV, Kind::Uint8, true, false);
                sync();
                d
            })
        });
        let p = pools(bytes * 2 + (1 << 30));
        let m = p.manage(model(bytes)).unwrap();
        g.bench_with_input(BenchmarkId::new("load", gb), &bytes, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    m.offload().unwrap();
                    let t = Instant::now();
                    let guard = auto_manage(&m).unwrap();
                    total += t.elapsed();
                    drop(guard);
                }
                total
            })
        });
        let ceiling = raw_pinned_copy(bytes, 5);
        let mut best = f64::MAX;
        for _ in 0..5 {
            m.offload().unwrap();
            let t = Instant::now();
            let guard = auto_manage(&m).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
            drop(guard);
        }
        let s = p.stats();
        println!(
            "RATIO load {gb} GB: {:.2} GB/s vs ceiling {:.2} GB/s = {:.3}x (goal >= 0.9x); pinned {} of {}",
            bytes as f64 / best / GB,
            bytes as f64 / ceiling / GB,
            ceiling / best,
            s.pinned,
            m.size_bytes()
        );
        if gb >= 8.0 {
            g.bench_function("offload_clean_8GB", |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        drop(auto_manage(&m).unwrap());
                        let d2h = p.stats().bytes_device_to_host;
                        let t = Instant::now();
                        m.offload().unwrap();
                        total += t.elapsed();
                        assert_eq!(
                            p.stats().bytes_device_to_host,
                            d2h,
                            "a clean offload copies nothing back"
                        );
                    }
                    total
                })
            });
            drop(auto_manage(&m).unwrap());
            let t = Instant::now();
            m.offload().unwrap();
            println!("RATIO offload clean {gb} GB: {:.3} ms (goal < 1 ms)", t.elapsed().as_secs_f64() * 1e3);
        }
    }
    g.finish();
}

fn round_robin(_c: &mut Criterion) {
    require_gpu();
    let bytes = (2.0 * GB) as u64;
    let p = pools((5.0 * GB) as u64);
    let models: Vec<Managed<TensorSet>> = (0..4).map(|_| p.manage(model(bytes)).unwrap()).collect();
    let x = Tensor::randn([4096, 4096], (Kind::Half, DEV));
    let per_use = 20;
    // Compute alone, on a resident model.
    drop(compute(&x, per_use));
    sync();
    let t = Instant::now();
    for _ in 0..models.len() * 3 {
        drop(compute(&x, per_use));
    }
    sync();
    let compute_s = t.elapsed().as_secs_f64();
    let ceiling = raw_pinned_copy(bytes, 3) / bytes as f64; // seconds per byte
    let before = p.stats().bytes_host_to_device;
    let t = Instant::now();
    for _ in 0..3 {
        for m in &models {
            let g = auto_manage(m).unwrap();
            drop(compute(&x, per_use));
            drop(g);
        }
    }
    sync();
    let total = t.elapsed().as_secs_f64();
    let moved = p.stats().bytes_host_to_device - before;
    let floor = moved as f64 * ceiling + compute_s;
    println!(
        "RATIO round_robin 4 x 2 GB, 5 GB budget: {total:.3} s for {:.1} GB moved + {compute_s:.3} s compute; \
         floor {floor:.3} s = {:.3}x (goal <= 1.15x)",
        moved as f64 / GB,
        total / floor
    );
}

fn prefetch_overlap(_c: &mut Criterion) {
    require_gpu();
    let bytes = (2.0 * GB) as u64;
    let p = pools((5.0 * GB) as u64);
    let current = p.manage(model(bytes)).unwrap();
    let next = p.manage(model(bytes)).unwrap();
    let x = Tensor::randn([8192, 8192], (Kind::Half, DEV));
    let load_s = raw_pinned_copy(bytes, 3);
    // Enough compute to be longer than the load.
    let mut n = 1;
    loop {
        sync();
        let t = Instant::now();
        drop(compute(&x, n));
        sync();
        if t.elapsed().as_secs_f64() > 2.0 * load_s {
            break;
        }
        n *= 2;
    }
    let g = auto_manage(&current).unwrap();
    sync();
    let t = Instant::now();
    drop(compute(&x, n));
    sync();
    let compute_s = t.elapsed().as_secs_f64();
    // Sequential: compute, then load the next model.
    next.offload().unwrap();
    let t = Instant::now();
    drop(compute(&x, n));
    let gn = auto_manage(&next).unwrap();
    sync();
    let sequential = t.elapsed().as_secs_f64();
    drop(gn);
    // Overlapped: start the next model's load, then compute.
    next.offload().unwrap();
    sync();
    let t = Instant::now();
    let pending = prefetch(&next);
    drop(compute(&x, n));
    let gn = pending.wait().unwrap();
    sync();
    let overlapped = t.elapsed().as_secs_f64();
    drop((g, gn));
    println!(
        "RATIO prefetch: compute {compute_s:.3} s, load {load_s:.3} s; sequential {sequential:.3} s, \
         overlapped {overlapped:.3} s = {:.3}x compute alone (goal ~1.0x: the load hidden)",
        overlapped / compute_s
    );
}

criterion_group!(benches, loads, round_robin, prefetch_overlap);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
