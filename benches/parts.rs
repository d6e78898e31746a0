//! A model twice the host budget, streamed in parts (issue 15), against its
//! floor and against mapping every weight, in one run. The model: 16 layers
//! of `[2048, 2048]` f32 (16 MiB each, 256 MiB; `SIRE_PARTS_LAYERS` sets the
//! count) in one safetensors file; a pass computes `h ← tanh(W·h)` through
//! the layers in order, `h` of shape `[2048, 64]` (`SIRE_PARTS_BATCH` sets the
//! 64). Each iteration is one pass.
//!
//! - `sire`: the file registered with `manage_parts` (one part a layer) in
//!   pools with a host budget of half the model (`SIRE_PARTS_BUDGET` sets it
//!   in layers); a pass is a `Stream` (next part prefetched on a background
//!   thread). Between passes some layers stay resident, and each pass
//!   streams the others (both measured and printed).
//! - `mmap`: what a Python user does: the file mapped once (`memmap2`), every
//!   weight a tensor over the mapping, the page cache paging it: no budget
//!   (the whole model ends up resident in the process).
//! - `floor_compute`: the pass with every weight in memory (the compute floor).
//! - `floor_read`: reading, sequentially with `read`, the bytes sire streams in
//!   a pass, from the same file (the transfer floor).
//!
//! - `manual`: a hand-written streamer with sire's schedule and no runtime:
//!   the layers sire keeps resident at steady state mapped once; each pass
//!   maps and populates every other layer on one thread, one at a time (the
//!   first asked for when the pass starts, each next one when the streamed
//!   layer before it has been used), and unmaps it after use.
//! - `floor_both`: the two at once, perfectly overlapped: the bytes sire
//!   streams read into memory by a second thread (a populated mapping, the
//!   cheapest way measured) while the pass computes over weights in memory.
//!   On a machine whose cores the compute fills, the read's CPU time delays
//!   the compute: this is what overlap can reach there.
//!
//! Each system is built for its own benchmark and dropped after it: the pages
//! of the layers one keeps mapped survive `drop_cache` and would be warm for
//! the next.
//!
//! The floor of a pass is max(`floor_read`, `floor_compute`). `warm`: the file
//! in the page cache. `cold`: the file dropped from the page cache before each
//! pass (`posix_fadvise(DONTNEED)`, which leaves pages mapped by the process:
//! sire's resident half and nothing of `mmap`, which maps afresh each pass).
//!
//! Peak memory: `SIRE_PARTS_RSS=sire` (or `mmap`) runs 5 passes instead of the
//! benchmark and prints the growth of the peak resident set (VmHWM) over the
//! model's size and the budget; `memory` copies every weight into memory
//! first and prints the growth over that: what the compute itself adds.
//!
//! `SIRE_PARTS_MAP=0` builds sire's pools with `map_files(false)` (every load
//! copies). `SIRE_PARTS_TRACE=trace.json` runs 5 cold passes of sire (warm
//! with `SIRE_PARTS_WARM=1`) under a Chrome/Perfetto trace instead, and
//! prints each pass's time.
//!
//! Run: `source scripts/env.sh && cargo bench --bench parts`, then
//! `SIRE_PARTS_RSS=sire cargo bench --bench parts` and `SIRE_PARTS_RSS=mmap …`.

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{BatchSize, Criterion};
use sire::{ManageOptions, Parted, ResourcePoolManagement, Split, TensorSet};
use tch::{Device, Kind, Tensor};

const D: i64 = 2048;

/// Columns of `h` (`SIRE_PARTS_BATCH`, default 64): more makes each layer's
/// compute longer against its read.
fn batch() -> i64 {
    std::env::var("SIRE_PARTS_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}
const LAYER_BYTES: u64 = (D * D * 4) as u64;

/// sire's host budget: `SIRE_PARTS_BUDGET` layers' worth, default half the model.
fn budget() -> u64 {
    std::env::var("SIRE_PARTS_BUDGET")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(layers() as u64 * LAYER_BYTES / 2, |n| n * LAYER_BYTES)
}

fn layers() -> usize {
    std::env::var("SIRE_PARTS_LAYERS").ok().and_then(|v| v.parse().ok()).unwrap_or(16)
}

fn write_model(dir: &Path) -> PathBuf {
    let path = dir.join("model.safetensors");
    tch::manual_seed(0);
    let ts: Vec<(String, Tensor)> = (0..layers())
        .map(|i| (format!("l{i}.w"), Tensor::randn([D, D], (Kind::Float, Device::Cpu)) / (D as f64).sqrt()))
        .collect();
    Tensor::write_safetensors(&ts, &path).unwrap();
    path
}

fn input() -> Tensor {
    tch::manual_seed(1);
    Tensor::randn([D, batch()], (Kind::Float, Device::Cpu))
}

fn layer(w: &Tensor, h: &Tensor) -> Tensor {
    w.mm(h).tanh()
}

/// Drops the file's pages from the page cache (those not mapped by a process).
fn drop_cache(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a valid descriptor; advice only.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn sire_model(path: &Path, spill: &Path) -> (ResourcePoolManagement, Parted) {
    let map = std::env::var("SIRE_PARTS_MAP").map_or(true, |v| v != "0");
    let pools = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .map_files(map)
        .cpu_budget(budget())
        .spill_dir(spill)
        .build()
        .unwrap();
    let prefixes = (0..layers()).map(|i| format!("l{i}.")).collect();
    let set = TensorSet::from_safetensors(path).unwrap();
    let m = pools.manage_parts(set, Split::Prefixes(prefixes), ManageOptions::new().name("net")).unwrap();
    (pools, m)
}

fn sire_pass(m: &Parted, x: &Tensor) -> Tensor {
    let mut s = m.stream();
    let mut h = x.shallow_clone();
    for i in 0..m.len() {
        let p = s.part(i).unwrap();
        h = layer(&p.get(&format!("l{i}.w")).unwrap(), &h);
    }
    h
}

/// The file mapped, every weight a tensor over the mapping (no copy).
struct Mapped {
    _map: memmap2::Mmap,
    weights: Vec<Tensor>,
}

fn mapped(path: &Path) -> Mapped {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: the benchmark's own file, not modified while mapped.
    let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
    let st = safetensors::SafeTensors::deserialize(&map).unwrap();
    let weights = (0..layers())
        .map(|i| {
            let v = st.tensor(&format!("l{i}.w")).unwrap();
            // SAFETY: the view lies in the mapping, which `Mapped` keeps alive
            // as long as the tensors; f32, contiguous, [D, D].
            unsafe { Tensor::from_blob(v.data().as_ptr(), &[D, D], &[D, 1], Kind::Float, Device::Cpu) }
        })
        .collect();
    Mapped { _map: map, weights }
}

fn mapped_pass(m: &Mapped, x: &Tensor) -> Tensor {
    m.weights.iter().fold(x.shallow_clone(), |h, w| layer(w, &h))
}

/// `len` bytes of the file from `offset` on, read into memory at the least
/// CPU cost measured here: a private mapping populated at once
/// (`MADV_POPULATE_READ`). Returns the mapping and where `offset` lies in it.
fn populate(path: &Path, offset: u64, len: u64) -> (memmap2::MmapMut, usize) {
    let file = std::fs::File::open(path).unwrap();
    let start = offset / 4096 * 4096;
    // SAFETY: the benchmark's own file, not modified while mapped.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(start)
            .len((offset - start + len) as usize)
            .map_copy(&file)
            .unwrap()
    };
    // SAFETY: an advice on the mapping above; it only reads pages in.
    let rc = unsafe { libc::madvise(map.as_ptr() as *mut libc::c_void, map.len(), libc::MADV_POPULATE_READ) };
    assert_eq!(rc, 0, "MADV_POPULATE_READ: {}", std::io::Error::last_os_error());
    (map, (offset - start) as usize)
}

/// The hand-written streamer: the layers in `keep` mapped once; each pass
/// maps and populates every other layer on one thread (the first asked for
/// when the pass starts, each next one when the streamed layer before it has
/// been used), and unmaps it after use.
struct Manual {
    path: PathBuf,
    offsets: Vec<u64>,
    resident: Vec<Option<(memmap2::MmapMut, usize)>>,
}

fn manual(path: &Path, keep: &[usize]) -> Manual {
    let bytes = std::fs::read(path).unwrap();
    let (header, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let offsets: Vec<u64> = (0..layers())
        .map(|i| (8 + header + meta.info(&format!("l{i}.w")).unwrap().data_offsets.0) as u64)
        .collect();
    let resident =
        (0..layers()).map(|i| keep.contains(&i).then(|| populate(path, offsets[i], LAYER_BYTES))).collect();
    Manual { path: path.to_owned(), offsets, resident }
}

fn manual_pass(m: &Manual, x: &Tensor) -> Tensor {
    // One reading thread for the pass, woken per layer (a thread started per
    // layer waits for a core while the compute fills them all).
    let (jobs, queue) = std::sync::mpsc::channel::<u64>();
    let (done, reads) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for offset in queue {
                let _ = done.send(populate(&m.path, offset, LAYER_BYTES));
            }
        });
        let mut streamed = (0..m.offsets.len()).filter(|&i| m.resident[i].is_none());
        let mut next = streamed.next();
        if let Some(i) = next {
            jobs.send(m.offsets[i]).unwrap();
        }
        let mut h = x.shallow_clone();
        for (i, resident) in m.resident.iter().enumerate() {
            let read = resident.is_none().then(|| {
                assert_eq!(next, Some(i));
                reads.recv().unwrap()
            });
            let (map, at) = read.as_ref().or(resident.as_ref()).map(|(m, a)| (m, *a)).unwrap();
            // SAFETY: the weight lies in the mapping, alive until after its use.
            let w = unsafe {
                Tensor::from_blob(map.as_ptr().add(at), &[D, D], &[D, 1], Kind::Float, Device::Cpu)
            };
            h = layer(&w, &h);
            if read.is_some() {
                drop(read);
                next = streamed.next();
                if let Some(j) = next {
                    jobs.send(m.offsets[j]).unwrap();
                }
            }
        }
        drop(jobs);
        h
    })
}

fn status_mib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// `SIRE_PARTS_RSS`: 5 passes of one system, peak resident memory growth.
fn rss(system: &str) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = write_model(dir.path());
    let x = input();
    let model_mib = (layers() as u64 * LAYER_BYTES) as f64 / 1048576.0;
    // Reset the peak to the current resident set (writing the model used memory).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let mut start = status_mib("VmRSS:");
    let y = match system {
        "sire" => {
            let (_pools, m) = sire_model(&path, dir.path());
            (0..5).fold(x.shallow_clone(), |_, _| sire_pass(&m, &x))
        }
        "mmap" => {
            let m = mapped(&path);
            (0..5).fold(x.shallow_clone(), |_, _| mapped_pass(&m, &x))
        }
        "memory" => {
            // Every weight copied into memory first, then the peak and the
            // start reset: the growth is what the compute itself adds.
            let m = mapped(&path);
            let in_memory: Vec<Tensor> = m.weights.iter().map(Tensor::copy).collect();
            drop(m);
            let _ = std::fs::write("/proc/self/clear_refs", "5");
            start = status_mib("VmRSS:");
            (0..5)
                .fold(x.shallow_clone(), |_, _| in_memory.iter().fold(x.shallow_clone(), |h, w| layer(w, &h)))
        }
        other => panic!("SIRE_PARTS_RSS={other}: sire, mmap or memory"),
    };
    let peak = status_mib("VmHWM:");
    println!(
        "RESULT system={system} model_mib={model_mib:.0} budget_mib={:.0} rss_start_mib={start:.1} \
         peak_rss_mib={peak:.1} growth_mib={:.1} checksum={:.6}",
        budget() as f64 / 1048576.0,
        peak - start,
        y.sum(Kind::Double).double_value(&[])
    );
}

/// `SIRE_PARTS_TRACE=<file>`: 5 cold passes of sire (after 2 warm-up passes)
/// under a Chrome/Perfetto trace (see `scripts/trace-plot.py`); warm passes
/// with `SIRE_PARTS_WARM=1`.
fn trace(file: &str) {
    use tracing_subscriber::prelude::*;
    let (chrome, guard) = tracing_chrome::ChromeLayerBuilder::new().file(file).include_args(true).build();
    tracing_subscriber::registry().with(chrome).init();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = write_model(dir.path());
    let x = input();
    let (_pools, m) = sire_model(&path, dir.path());
    for _ in 0..2 {
        let _ = sire_pass(&m, &x);
    }
    let warm = std::env::var_os("SIRE_PARTS_WARM").is_some_and(|v| v != "0");
    for _ in 0..5 {
        if !warm {
            drop_cache(&path);
        }
        let t = std::time::Instant::now();
        let _span = tracing::info_span!("pass").entered();
        let _ = sire_pass(&m, &x);
        println!("pass: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    drop(guard);
}

fn main() {
    if let Ok(file) = std::env::var("SIRE_PARTS_TRACE") {
        trace(&file);
        return;
    }
    if let Ok(system) = std::env::var("SIRE_PARTS_RSS") {
        rss(&system);
        return;
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = write_model(dir.path());
    let x = input();

    // sire, how many bytes a pass streams at steady state, and which layers
    // stay resident between passes. Each system below is built for its own
    // benchmark and dropped after it: the layers one keeps mapped stay in the
    // page cache through `drop_cache`, and would be warm for another.
    let want = mapped_pass(&mapped(&path), &x);
    let (streamed, keep) = {
        let (pools, sire) = sire_model(&path, dir.path());
        for _ in 0..2 {
            assert!(
                sire_pass(&sire, &x).allclose(&want, 1e-5, 1e-5, false),
                "sire's pass differs from the mapped one"
            );
        }
        let before = pools.stats().bytes_from_disk;
        let _ = sire_pass(&sire, &x);
        let streamed = pools.stats().bytes_from_disk - before;
        // The layers sire keeps between passes, as many as it does not stream
        // (it has one more resident at the end of a pass, the first it
        // evicts in the next): the manual streamer keeps the same ones.
        let mut keep = sire.resident();
        keep.truncate(layers() - (streamed / LAYER_BYTES) as usize);
        (streamed, keep)
    };
    println!(
        "parts: {} layers, {} MiB, budget {} MiB; a pass streams {} MiB; keeps {keep:?}",
        layers(),
        (layers() as u64 * LAYER_BYTES) >> 20,
        budget() >> 20,
        streamed >> 20
    );
    assert!(
        manual_pass(&manual(&path, &keep), &x).allclose(&want, 1e-5, 1e-5, false),
        "the manual pass differs"
    );

    let in_memory: Vec<Tensor> = mapped(&path).weights.iter().map(Tensor::copy).collect();
    let file = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let len = std::fs::metadata(&path).unwrap().len();
    let read_streamed = |buf: &mut Vec<u8>| {
        // The last `streamed` bytes of the file, sequentially.
        let mut off = len - streamed;
        while off < len {
            let n = file.read_at(buf, off).unwrap();
            assert!(n > 0);
            off += n as u64;
        }
    };

    for mode in ["warm", "cold"] {
        let cold = mode == "cold";
        // Before each timed pass: the file dropped from the page cache, if cold.
        let setup = || {
            if cold {
                drop_cache(&path)
            }
        };
        let compute = || in_memory.iter().fold(x.shallow_clone(), |h, w| layer(w, &h));
        let mut g = c.benchmark_group(format!("parts_{mode}"));
        g.bench_function("floor_compute", |b| b.iter(compute));
        g.bench_function("floor_read", |b| {
            b.iter_batched(setup, |()| read_streamed(&mut buf), BatchSize::PerIteration)
        });
        g.bench_function("floor_both", |b| {
            b.iter_batched(
                setup,
                |()| {
                    std::thread::scope(|scope| {
                        scope.spawn(|| populate(&path, len - streamed, streamed));
                        compute()
                    })
                },
                BatchSize::PerIteration,
            )
        });
        let hand = manual(&path, &keep);
        g.bench_function("manual", |b| {
            b.iter_batched(setup, |()| manual_pass(&hand, &x), BatchSize::PerIteration)
        });
        drop(hand);
        let (pools, sire) = sire_model(&path, dir.path());
        g.bench_function("sire", |b| {
            b.iter_batched(setup, |()| sire_pass(&sire, &x), BatchSize::PerIteration)
        });
        drop((sire, pools));
        if cold {
            g.bench_function("mmap", |b| {
                b.iter_batched(
                    || {
                        drop_cache(&path);
                        mapped(&path)
                    },
                    |m| mapped_pass(&m, &x),
                    BatchSize::PerIteration,
                )
            });
        } else {
            let m = mapped(&path);
            g.bench_function("mmap", |b| b.iter(|| mapped_pass(&m, &x)));
        }
        g.finish();
    }
    c.final_summary();
}
