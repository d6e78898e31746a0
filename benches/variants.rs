//! Switching between two LoRA variants of one model, against making a second
//! full copy of the model's weights.
//!
//! The model: `SIRE_BENCH_WEIGHTS` (default 8) f32 weights of
//! `SIRE_BENCH_DIM`² (default 512², 1 MiB each), on the runtime device (the CPU
//! here). Variants A and B each carry one rank-8 LoRA commit on every weight.
//!
//! - `switch`: one guard, alternately from A and from B, so every guard rebases.
//!   The pool has room, so each patched weight keeps the other variant's buffer
//!   as a spare and a switch swaps buffers (a cold switch, or one without room
//!   for spares, recomputes every weight from its base instead).
//! - `switch_quarter`: the same with variants C and D whose LoRAs cover a
//!   quarter of the weights (as adapters on attention projections do).
//! - `same_variant`: a guard from A when A is applied (the commit path's hit).
//! - `copy_weights`: `Tensor::copy_` of every weight into preallocated tensors
//!   (a second in-memory copy, the cheapest way to hold two variants).
//! - `load_copy`: `Tensor::read_safetensors` of the model's file, from the page
//!   cache (loading a second full copy of the model).
//!
//! Run: `source scripts/env.sh && cargo bench --bench variants`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use sire::{Commit, ResourcePoolManagement, TensorSet};
use tch::{Device, Kind, Tensor};

fn env(name: &str, default: i64) -> i64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bench(c: &mut Criterion) {
    let (n, dim, rank) = (env("SIRE_BENCH_WEIGHTS", 8), env("SIRE_BENCH_DIM", 512), 8);
    let f32_cpu = (Kind::Float, Device::Cpu);
    tch::manual_seed(0);
    let names: Vec<String> = (0..n).map(|i| format!("layer{i}.weight")).collect();
    let weights: Vec<Tensor> = (0..n).map(|_| Tensor::randn([dim, dim], f32_cpu)).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let named: Vec<(&str, &Tensor)> = names.iter().map(String::as_str).zip(&weights).collect();
    Tensor::write_safetensors(&named, &file).unwrap();

    let pools = ResourcePoolManagement::builder()
        .cuda(true)
        .env(false)
        .cpu_budget(4 << 30)
        .spill_dir(dir.path())
        .build()
        .unwrap();
    let set = TensorSet::new(names.iter().cloned().zip(weights.iter().map(Tensor::copy))).unwrap();
    let m = pools.manage(set).unwrap();
    let lora = |scale: f64, every: usize| {
        Commit::squash(names.iter().step_by(every).map(|name| {
            Commit::lora(
                name,
                Tensor::randn([rank, dim], f32_cpu),
                Tensor::randn([dim, rank], f32_cpu),
                scale,
            )
        }))
    };
    let a = m.variant();
    a.commit(lora(0.5, 1)).unwrap();
    let b = m.variant();
    b.commit(lora(2.0, 1)).unwrap();
    let q1 = m.variant();
    q1.commit(lora(0.5, 4)).unwrap();
    let q2 = m.variant();
    q2.commit(lora(2.0, 4)).unwrap();
    let device = sire::auto_manage(&m).unwrap().device();
    eprintln!("model: {n} x {dim}x{dim} f32 = {} MiB on {device:?}", m.size_bytes() >> 20);

    let mut group = c.benchmark_group("variants");
    for (case, x, y) in [("switch", &a, &b), ("switch_quarter", &q1, &q2)] {
        let mut flip = false;
        group.bench_function(case, |bch| {
            bch.iter(|| {
                flip = !flip;
                let g = sire::auto_manage(if flip { x } else { y }).unwrap();
                black_box(g.device());
                drop(g);
                if let Device::Cuda(i) = device {
                    tch::Cuda::synchronize(i as i64);
                }
            })
        });
    }
    drop(sire::auto_manage(&a).unwrap());
    group.bench_function("same_variant", |bch| {
        bch.iter(|| {
            let g = sire::auto_manage(&a).unwrap();
            black_box(g.device());
        })
    });
    let src: Vec<Tensor> = weights.iter().map(|w| w.to_device(device)).collect();
    let mut dst: Vec<Tensor> = src.iter().map(Tensor::empty_like).collect();
    group.bench_function("copy_weights", |bch| {
        bch.iter(|| {
            for (d, s) in dst.iter_mut().zip(&src) {
                d.copy_(s);
            }
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
        })
    });
    group.bench_function("load_copy", |bch| {
        bch.iter(|| {
            let ts = Tensor::read_safetensors(&file).unwrap();
            let ts: Vec<Tensor> = ts.into_iter().map(|(_, t)| t.to_device(device)).collect();
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            black_box(ts);
        })
    });
    group.finish();
    let s = pools.stats();
    assert!(s.misses <= 1, "the benchmark must not reload the model:\n{s}");
}

criterion_group!(benches, bench);
criterion_main!(benches);
