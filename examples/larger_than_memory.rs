//! A model twice the host budget, run twice: registered in parts from its
//! safetensors file (nothing read), then streamed part by part, the next part
//! prefetched from disk while the current one computes. After each pass it
//! prints what was read from disk and which parts stayed resident.
//!
//! Run: `cargo run --release --example larger_than_memory`.
//!
//! With `SIRE_TRACE=trace.json` it also writes a Chrome/Perfetto trace of every
//! part use, prefetch, load, offload and the compute, with their threads (open
//! it in <https://ui.perfetto.dev>); `scripts/trace-plot.py trace.json
//! timeline.png` draws it as a timeline (the picture in the README).
//! `SIRE_COLD=1` drops the model file from the page cache before each pass
//! (`posix_fadvise`), so the prefetches read from the disk itself.

#[path = "support/trace.rs"]
mod trace;

use sire::{Location, ManageOptions, ResourcePoolManagement, Split, TensorSet};
use tch::{Device, Kind, Tensor};

const LAYERS: usize = 8;
const WIDTH: i64 = 1024; // each layer: 1024² f32 = 4 MiB
const MIB: u64 = 1 << 20;

fn main() -> sire::Result<()> {
    let _trace = trace::init();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    tch::manual_seed(0);
    let layers: Vec<(String, Tensor)> = (0..LAYERS)
        .map(|i| {
            let w = Tensor::randn([WIDTH, WIDTH], (Kind::Float, Device::Cpu)) / (WIDTH as f64).sqrt();
            (format!("layers.{i}.weight"), w)
        })
        .collect();
    Tensor::write_safetensors(&layers, &path)?;
    let model_bytes = LAYERS as u64 * (WIDTH * WIDTH * 4) as u64;

    // Host budget: half the model. No GPU: the CPU runs it, the disk tier holds the rest.
    let pools = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(model_bytes / 2)
        .spill_dir(dir.path())
        .build()?;
    let set = TensorSet::from_safetensors(&path)?;
    let prefixes = (0..LAYERS).map(|i| format!("layers.{i}.")).collect();
    let model = pools.manage_parts(set, Split::Prefixes(prefixes), ManageOptions::new().name("mlp"))?;
    println!(
        "model `{}`: {} parts, {} MiB; host budget {} MiB",
        model.name(),
        model.len(),
        model.size_bytes() / MIB,
        model_bytes / 2 / MIB
    );

    let x = Tensor::randn([WIDTH, 64], (Kind::Float, Device::Cpu));
    let cold = std::env::var_os("SIRE_COLD").is_some_and(|v| v != "0");
    for pass in 1..=2 {
        if cold {
            drop_cache(&path)?;
        }
        let before = pools.stats().bytes_from_disk;
        let mut stream = model.stream();
        let mut h = x.shallow_clone();
        for i in 0..model.len() {
            let part = stream.part(i)?;
            let _compute = tracing::info_span!("compute", layer = i).entered();
            h = part.get(&format!("layers.{i}.weight")).expect("weight").mm(&h).relu();
        }
        let loaded = stream.loaded().to_vec();
        drop(stream);
        let s = pools.stats();
        let host = s.pool(Location::Cpu).expect("host pool");
        println!(
            "pass {pass}: output norm {:.4}; read {} MiB from disk; loaded parts {loaded:?}; \
             resident after: {:?} ({} of {} MiB)",
            h.norm().double_value(&[]),
            (s.bytes_from_disk - before) / MIB,
            model.resident(),
            host.used / MIB,
            host.budget / MIB
        );
    }
    Ok(())
}

/// Drops the file's pages from the page cache (those no process maps).
fn drop_cache(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: a valid descriptor for the duration of the call; advice only.
    match unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}
