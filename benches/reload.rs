//! Reloading a spilled model from the disk tier, against `std::fs::read` of the
//! same file and against mapping it (all from the page cache, same run), and
//! the reload's peak extra memory.
//!
//! - `std_fs_read`: the whole file into a fresh `Vec<u8>`.
//! - `map_file`: what a Python user mapping the file with safetensors gets: the
//!   file mapped privately and read-only, every page touched once (one byte
//!   read per 4 KiB page, so each is mapped from the page cache; no copy),
//!   then unmapped (issue 12).
//! - `sire_reload`: `auto_manage` of the model after a clean `offload`: its
//!   spill file mapped (the default, `Builder::map_files`).
//! - `sire_reload_copy`: the same with `map_files(false)`: the file copied
//!   into a fresh buffer.
//!
//! Run: `source scripts/env.sh && cargo bench --bench reload`
//! (`SIRE_BENCH_MIB` sets the model size, default 256).

use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use sire::{Location, ResourcePoolManagement, TensorSet};
use tch::{Device, Kind, Tensor};

fn model_mib() -> u64 {
    std::env::var("SIRE_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

fn setup(
    map_files: bool,
) -> (ResourcePoolManagement, sire::Managed<TensorSet>, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pools = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(4 << 30)
        .spill_dir(dir.path())
        .map_files(map_files)
        .build()
        .unwrap();
    let elems = (model_mib() << 20) / 4;
    // Eight tensors, like the layers of a model.
    let set = TensorSet::new(
        (0..8)
            .map(|i| (format!("layer{i}"), Tensor::randn([(elems / 8) as i64], (Kind::Float, Device::Cpu)))),
    )
    .unwrap();
    let m = pools.manage(set).unwrap();
    m.offload().unwrap();
    let file = std::fs::read_dir(pools.spill_dir().unwrap()).unwrap().next().unwrap().unwrap().path();
    (pools, m, file, dir)
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Peak resident-set growth during one reload, by resetting the high-water mark.
fn peak_extra_memory(map_files: bool) {
    let (_pools, m, _file, _dir) = setup(map_files);
    let size = m.size_bytes();
    assert_eq!(m.location(), Location::Disk);
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM (Linux >= 4.0)");
    let before = status_kib("VmRSS:") * 1024;
    let g = sire::auto_manage(&m).unwrap();
    let peak = status_kib("VmHWM:") * 1024;
    drop(g);
    let extra = peak.saturating_sub(before);
    println!(
        "reload/peak_extra_memory ({}): model {} MiB, peak extra {:.1} MiB = {:.3}x the model (goal <= 1.10x)",
        if map_files { "mapped" } else { "copied" },
        size >> 20,
        extra as f64 / (1 << 20) as f64,
        extra as f64 / size as f64
    );
}

/// Maps `file` privately, reads one byte of every page, unmaps it; returns
/// the bytes read so that the reads are not optimised away.
fn map_and_touch(file: &std::path::Path) -> u64 {
    let f = std::fs::File::open(file).unwrap();
    // SAFETY: a read-only private mapping of a file that nothing writes while
    // the benchmark runs; it is only read, and dropped before returning.
    let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&f) }.unwrap();
    let sum = map.iter().step_by(4096).fold(0u64, |acc, &b| acc.wrapping_add(u64::from(b)));
    std::hint::black_box(sum)
}

fn bench(c: &mut Criterion) {
    let (_pools, m, file, _dir) = setup(true);
    let (copy_pools, copied, _, _copy_dir) = setup(false);
    let bytes = std::fs::metadata(&file).unwrap().len();
    let mut group = c.benchmark_group("reload");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(20).measurement_time(Duration::from_secs(10));
    group.bench_function("std_fs_read", |b| b.iter(|| std::fs::read(&file).unwrap()));
    group.bench_function("map_file", |b| b.iter(|| map_and_touch(&file)));
    group.bench_function("sire_reload", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                m.offload().unwrap(); // clean: drops the host copy, no write
                let t = Instant::now();
                drop(sire::auto_manage(&m).unwrap());
                total += t.elapsed();
            }
            total
        })
    });
    group.bench_function("sire_reload_copy", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                copied.offload().unwrap();
                let t = Instant::now();
                drop(sire::auto_manage(&copied).unwrap());
                total += t.elapsed();
            }
            total
        })
    });
    group.finish();
    assert_eq!(_pools.stats().bytes_to_disk, m.size_bytes(), "written once");
    assert_eq!(_pools.stats().bytes_mapped, _pools.stats().bytes_from_disk, "every reload mapped");
    assert_eq!(copy_pools.stats().bytes_mapped, 0, "every reload copied");
}

criterion_group!(benches, bench);

fn main() {
    peak_extra_memory(true);
    peak_extra_memory(false);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
