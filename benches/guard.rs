//! The hit path: a guard on a resident model, against a bare `parking_lot::Mutex`
//! lock/unlock, with 10, 1,000 and 10,000 managed models registered.
//!
//! Run: `bash scripts/env.sh >/dev/null; cargo bench --bench guard`
//! (or `source scripts/env.sh && cargo bench --bench guard`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use sire::{ResourcePoolManagement, TensorSet};
use tch::Tensor;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("hit");
    let mutex = parking_lot::Mutex::new(0u64);
    group.bench_function("parking_lot_mutex", |b| {
        b.iter(|| {
            let mut g = mutex.lock();
            *g = black_box(*g + 1);
        })
    });
    for n in [10usize, 1_000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let pools = ResourcePoolManagement::builder()
            .cuda(false)
            .env(false)
            .cpu_budget(1 << 30)
            .spill_dir(dir.path())
            .build()
            .unwrap();
        let models: Vec<_> = (0..n)
            .map(|i| {
                pools.manage(TensorSet::new([("w", Tensor::from_slice(&[i as f32; 4]))]).unwrap()).unwrap()
            })
            .collect();
        // Every model is resident; use one in the middle of the registry.
        let m = &models[n / 2];
        drop(sire::auto_manage(m).unwrap());
        group.bench_function(format!("guard_{n}_models"), |b| {
            b.iter(|| {
                let g = sire::auto_manage(black_box(m)).unwrap();
                black_box(g.device());
            })
        });
        assert_eq!(pools.stats().misses, 0, "the benchmark must measure hits only");
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
