//! The host and disk tiers against Python (issue 12): 4 models of
//! `SIRE_TIERS_MIB` MiB (default 256) of f32 weights in safetensors files, a
//! host budget for 2.5 of them, 3 rounds round-robin, every weight used by
//! each use.
//!
//! Each file is registered with [`TensorSet::from_safetensors`] in pools built
//! with `.cuda(false).env(false).cpu_budget(2.5 models)` and a spill
//! directory; each use takes a guard with [`sire::auto_manage`] and computes,
//! for every tensor in name order, `(w.view(-1, 1024) @ x).sum()` with the
//! fixed `x` of `benches/peers/common.py`. Prints the wall time (first
//! registration to last result), a checksum of the results, sire's stats and
//! peak resident memory (VmHWM), and last one line `RESULT key=value ...` that
//! `scripts/bench-tiers.sh` reads; the Python peers in `benches/peers/` print
//! the same line and write the same results file, compared byte for byte.
//!
//! Run alone: `source scripts/env.sh && SIRE_TIERS_MIB=16 cargo bench --bench tiers`
//! (writes its model files once under `target/tiers-models/<MiB>mib/`, the
//! layout and content of `benches/peers/make_models.py`). Side by side with
//! the Python systems, warm and cold: `scripts/bench-tiers.sh`.
//!
//! Environment: `SIRE_TIERS_MIB` (model size), `SIRE_TIERS_DIR` (a folder of
//! `model*.safetensors` to use instead), `SIRE_TIERS_BUDGET_MIB` (default 2.5
//! models), `SIRE_TIERS_ROUNDS` (default 3), `SIRE_TIERS_OUT` (write the
//! results there, one line `round model tensor f32-bits-hex` per result),
//! `SIRE_TIERS_SPILL` (spill directory, default a temporary one under `target/`),
//! `SIRE_TIERS_MAP` (0: `Builder::map_files(false)`, every load copies).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sire::{ResourcePoolManagement, TensorSet};
use tch::{Device, Kind, Tensor};

const MODELS: i64 = 4;
const TENSORS: i64 = 8;
const COLS: i64 = 1024;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn status_mib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Weight `tensor` of model `model`, as `make_models.py` computes it (exact in f32).
fn weight(model: i64, tensor: i64, elems: i64) -> Tensor {
    let start = (model * TENSORS + tensor) * elems;
    let j = Tensor::arange_start(start, start + elems, (Kind::Int64, Device::Cpu));
    let h = (j * 2_654_435_761i64).remainder(1i64 << 32).floor_divide_scalar(256);
    ((h - (1i64 << 23)).to_kind(Kind::Float) / f64::from(1u32 << 23)).view([-1, COLS])
}

/// The model files: `SIRE_TIERS_DIR`, or written once under `target/tiers-models/`.
fn model_files(mib: i64) -> Vec<PathBuf> {
    let dir = match std::env::var_os("SIRE_TIERS_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let target =
                std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
            let dir = target.join("tiers-models").join(format!("{mib}mib"));
            std::fs::create_dir_all(&dir).unwrap();
            let elems = (mib << 20) / 4 / TENSORS;
            assert!(elems > 0 && elems % COLS == 0, "SIRE_TIERS_MIB must give whole 1024-wide rows");
            for m in 0..MODELS {
                let path = dir.join(format!("model{m}.safetensors"));
                if std::fs::metadata(&path).is_ok_and(|md| md.len() >= (mib as u64) << 20) {
                    continue;
                }
                let named: Vec<(String, Tensor)> =
                    (0..TENSORS).map(|t| (format!("layers.{t}.weight"), weight(m, t, elems))).collect();
                let tmp = path.with_extension("safetensors.tmp");
                Tensor::write_safetensors(&named, &tmp).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            }
            dir
        }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("model") && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no model*.safetensors in {}", dir.display());
    files
}

/// The bytes of a safetensors file's tensors, from its header alone (so that
/// nothing of the weights enters the page cache before the timed part).
fn weight_bytes(path: &Path) -> u64 {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).unwrap();
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut header).unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    let entries = header.as_object().unwrap().iter().filter(|(k, _)| *k != "__metadata__");
    entries
        .map(|(_, v)| v["data_offsets"][1].as_u64().unwrap() - v["data_offsets"][0].as_u64().unwrap())
        .sum()
}

fn spill_root() -> (PathBuf, Option<tempfile::TempDir>) {
    if let Some(d) = std::env::var_os("SIRE_TIERS_SPILL") {
        return (PathBuf::from(d), None);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    std::fs::create_dir_all(&target).unwrap();
    let tmp = tempfile::Builder::new().prefix("tiers-spill").tempdir_in(&target).unwrap();
    (tmp.path().to_path_buf(), Some(tmp))
}

fn main() {
    let mib: i64 = env_or("SIRE_TIERS_MIB", 256);
    let rounds: usize = env_or("SIRE_TIERS_ROUNDS", 3);
    let files = model_files(mib);
    let model_bytes = weight_bytes(&files[0]);
    let budget_mib: f64 = env_or("SIRE_TIERS_BUDGET_MIB", 2.5 * model_bytes as f64 / f64::from(1u32 << 20));
    let budget = (budget_mib * f64::from(1u32 << 20)) as u64;
    let (spill, _keep) = spill_root();
    let x = ((Tensor::arange(COLS, (Kind::Int64, Device::Cpu)).remainder(17) - 8).to_kind(Kind::Float)) / 8.0;
    let _no_grad = tch::no_grad_guard();
    // As the Python peers do: the BLAS code is faulted in before the timer starts.
    let _ =
        Tensor::zeros([64, COLS], (Kind::Float, Device::Cpu)).matmul(&x).sum(Kind::Float).double_value(&[]);

    let map_files = env_or("SIRE_TIERS_MAP", 1) != 0;
    let rss_start = status_mib("VmRSS:");
    let t0 = Instant::now();
    let pools = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(budget)
        .spill_dir(&spill)
        .map_files(map_files)
        .build()
        .unwrap();
    let models: Vec<_> =
        files.iter().map(|f| pools.manage(TensorSet::from_safetensors(f).unwrap()).unwrap()).collect();
    let registered = t0.elapsed();
    let mut results = String::new();
    for r in 0..rounds {
        for (m, model) in models.iter().enumerate() {
            let g = sire::auto_manage(model).unwrap();
            let mut names: Vec<&str> = g.names().collect();
            names.sort_unstable();
            for (i, name) in names.iter().enumerate() {
                let w = g.get(name).unwrap();
                let v = w.view([-1, COLS]).matmul(&x).sum(Kind::Float).double_value(&[]) as f32;
                writeln!(results, "{r} {m} {i} {:08x}", v.to_bits()).unwrap();
            }
        }
    }
    let elapsed = t0.elapsed();
    let peak = status_mib("VmHWM:");
    let stats = pools.stats();

    if let Some(out) = std::env::var_os("SIRE_TIERS_OUT") {
        std::fs::write(Path::new(&out), &results).unwrap();
    }
    // FNV-1a over the results' text: the same results give the same checksum.
    let checksum = results
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    println!(
        "tiers: {} models of {} MiB, budget {budget_mib:.0} MiB, {rounds} rounds: {:.3} s ({:.3} s registering), \
         checksum {checksum:016x}",
        files.len(),
        model_bytes >> 20,
        elapsed.as_secs_f64(),
        registered.as_secs_f64()
    );
    println!(
        "tiers: stats: misses {}, hits {}, evictions {}, bytes from disk {} MiB, to disk {} MiB, moving {:.3} s",
        stats.misses,
        stats.hits,
        stats.evictions,
        stats.bytes_from_disk >> 20,
        stats.bytes_to_disk >> 20,
        stats.time_moving.as_secs_f64()
    );
    println!("tiers: peak RSS {peak:.1} MiB (VmHWM), {rss_start:.1} MiB before the workload");
    println!(
        "RESULT system=sire time_s={:.4} rss_start_mib={rss_start:.1} peak_rss_mib={peak:.1} misses={} hits={} \
         bytes_from_disk={} bytes_mapped={} bytes_to_disk={} register_s={:.4}",
        elapsed.as_secs_f64(),
        stats.misses,
        stats.hits,
        stats.bytes_from_disk,
        stats.bytes_mapped,
        stats.bytes_to_disk,
        registered.as_secs_f64()
    );
}
