//! Batch inference with the task pool: a directory of input tensors, one
//! model per device (managed, so the pool shares each device's budget with
//! the rest of the program), one result file per input, a progress bar.
//! Across processes (`srun`, `torchrun`) each rank takes its shard; a rerun
//! after a crash does only what is left.
//!
//! Run: `cargo run --release --features pool --example batch_inference [-- INPUT_DIR OUTPUT_DIR]`
//! (without directories it writes 256 inputs under the system's temporary
//! directory first). See the README's "Task pool" section for the launch lines.

use std::path::{Path, PathBuf};

use sire::pool::{Pool, Rank, Tasks};
use sire::{Location, ManageOptions, TensorSet};
use tch::{Device, Kind, Tensor};

const FEATURES: i64 = 256;
const CLASSES: i64 = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (input, output) = match args.as_slice() {
        [i, o] => (PathBuf::from(i), PathBuf::from(o)),
        [] => {
            let base = std::env::temp_dir().join(format!("sire-batch-inference-{}", std::process::id()));
            write_inputs(&base.join("inputs"), 256)?;
            (base.join("inputs"), base.join("outputs"))
        }
        _ => return Err("usage: batch_inference [INPUT_DIR OUTPUT_DIR]".into()),
    };
    std::fs::create_dir_all(&output)?;

    // This process's share of the inputs (rank 0 of 1 when run alone), minus
    // what an earlier run finished.
    let rank = Rank::from_env()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&input)?
        .map(|e| e.map(|e| e.path()))
        .filter(|p| p.as_ref().map_or(true, |p| p.extension().is_some_and(|x| x == "pt")))
        .collect::<Result<_, _>>()?;
    files.sort();
    let tasks = Tasks::keyed(files, |p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())?
        .shard(rank)
        .resume(output.join("records"))?;
    println!(
        "rank {} of {}: {} input(s) to do, {} done by an earlier run",
        rank.rank(),
        rank.world(),
        tasks.len(),
        tasks.skipped()
    );

    // One model per device, registered with the global pools.
    sire::setup_default_pools()?;
    let mut builder = Pool::builder().description(format!("rank {}/{}", rank.rank(), rank.world()));
    if let Some(device) = local_rank_device() {
        builder = builder.devices([device]); // torchrun with one process per GPU
    }
    let pool = builder.build(|device| {
        let runtime = Location::from_device(device).expect("a CPU or CUDA device");
        sire::manage_with(
            model(),
            ManageOptions::new().name(format!("classifier@{runtime}")).runtime(runtime),
        )
    })?;
    for e in pool.init_failures() {
        eprintln!("left out: {e}");
    }

    let outcomes = pool.execute(tasks, |path, device, model| {
        let x = Tensor::load(path)?.to_device(device);
        let g = sire::auto_manage(model)?;
        let (w, b) = (g.get("weight").expect("weight"), g.get("bias").expect("bias"));
        let scores = tch::no_grad(|| (x.matmul(&w.tr()) + b).softmax(-1, Kind::Float));
        let out = output.join(path.file_name().expect("a file name"));
        scores.to_device(Device::Cpu).save(&out)?;
        Ok::<_, sire::Error>(scores.argmax(-1, false).to_device(Device::Cpu))
    })?;

    let failed: Vec<_> = outcomes.iter().filter_map(|o| o.result.as_ref().err()).collect();
    let devices: std::collections::BTreeMap<String, usize> =
        outcomes.iter().fold(Default::default(), |mut m, o| {
            *m.entry(format!("#{} ({})", o.slot, o.device)).or_default() += 1;
            m
        });
    println!(
        "{} result(s) in {}, {} failed; tasks per device: {devices:?}",
        outcomes.len(),
        output.display(),
        failed.len()
    );
    for e in &failed {
        eprintln!("  {e}");
    }
    pool.shutdown();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} task(s) failed", failed.len()).into())
    }
}

/// A linear classifier with fixed weights (the same on every device).
fn model() -> TensorSet {
    tch::manual_seed(0);
    TensorSet::new([
        ("weight", Tensor::randn([CLASSES, FEATURES], (Kind::Float, Device::Cpu)) / (FEATURES as f64).sqrt()),
        ("bias", Tensor::zeros([CLASSES], (Kind::Float, Device::Cpu))),
    ])
    .expect("two named tensors")
}

/// `n` input files of 64 feature vectors each.
fn write_inputs(dir: &Path, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    tch::manual_seed(1);
    for i in 0..n {
        Tensor::randn([64, FEATURES], (Kind::Float, Device::Cpu))
            .save(dir.join(format!("input_{i:04}.pt")))?;
    }
    Ok(())
}

/// Under torchrun with one process per GPU (`LOCAL_RANK` set), this process's GPU.
fn local_rank_device() -> Option<Location> {
    let local: usize = std::env::var("LOCAL_RANK").ok()?.parse().ok()?;
    let gpus = tch::Cuda::device_count() as usize;
    (gpus > 0).then(|| Location::Cuda(local % gpus))
}
