//! The demo: four models whose total exceeds the budget, used round-robin.
//! After each step it prints where every model is, and at the end the statistics.
//! Then the same round-robin with the next model prefetched while the current
//! one computes, and two LoRA variants of one model sharing its base weights.
//!
//! With a GPU the models run on `cuda:0` and are evicted to host memory; without
//! one they run on the CPU and are evicted to the disk tier (a real safetensors
//! spill). Either way the budget holds two and a half models.
//!
//! Run: `bash scripts/demo.sh` (or `cargo run --release --example demo`).

#[path = "support/trace.rs"]
mod trace;

use std::sync::Mutex;

use sire::{Commit, Location, ManageOptions, Managed, ResourcePoolManagement};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const HIDDEN: i64 = 2048; // each model: 2 × 2048² f32 ≈ 32 MiB

struct Mlp {
    vs: nn::VarStore,
    // tch layers are `Send` but not `Sync`; the mutex makes the model shareable
    // between threads (needed by `prefetch`, which loads on a background thread).
    net: Mutex<nn::Sequential>,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.net.lock().unwrap().forward(x)
    }
}

impl sire::ResourceUser for Mlp {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vs.tensors()
    }
}

fn mlp(seed: i64) -> Mlp {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "l1", HIDDEN, HIDDEN, Default::default()))
        .add_fn(|x| x.gelu("none"))
        .add(nn::linear(vs.root() / "l2", HIDDEN, HIDDEN, Default::default()));
    Mlp { vs, net: Mutex::new(net) }
}

fn main() -> sire::Result<()> {
    let _trace = trace::init();
    let model_bytes = (2 * (HIDDEN * HIDDEN + HIDDEN) * 4) as u64;
    let budget = model_bytes * 5 / 2;
    let gpu = tch::Cuda::is_available();
    let pools = if gpu {
        ResourcePoolManagement::builder().cuda_budget(budget).build()?
    } else {
        ResourcePoolManagement::builder().cpu_budget(budget).build()?
    };
    println!("{pools}");
    println!("4 models of {:.1} MiB each, budget {:.1} MiB\n", mib(model_bytes), mib(budget));

    let x = Tensor::randn([8, HIDDEN], (Kind::Float, Device::Cpu));
    let mut models: Vec<(Managed<Mlp>, Tensor)> = Vec::new();
    for (i, name) in ["encoder", "unet", "vae", "upscaler"].iter().enumerate() {
        let m = mlp(i as i64);
        let expected = m.forward(&x);
        models.push((pools.manage_with(m, ManageOptions::new().name(*name))?, expected));
    }
    print_row("registered", &models);

    for step in 0..8 {
        let (m, expected) = &models[step % models.len()];
        let g = sire::auto_manage(m)?;
        let y = g.forward(&x.to_device(g.device()));
        let ok = y.to_device(Device::Cpu).allclose(expected, 1e-5, 1e-5, false);
        assert!(ok, "{} computed a wrong output", m.name());
        drop(g);
        print_row(&format!("step {step}: {}", m.name()), &models);
    }
    println!("\n{}", pools.stats());

    // The same round-robin, each next model prefetched while the current one
    // computes: its load (disk read, or host-to-device copy on a side stream)
    // overlaps the work instead of following it.
    println!("\nprefetching the next model while the current one computes:");
    let misses = pools.stats().misses;
    let mut pending = sire::prefetch(&models[0].0);
    for step in 0..8 {
        let (m, expected) = &models[step % models.len()];
        let g = pending.wait()?;
        pending = sire::prefetch(&models[(step + 1) % models.len()].0);
        let y = g.forward(&x.to_device(g.device()));
        assert!(y.to_device(Device::Cpu).allclose(expected, 1e-5, 1e-5, false), "{} is wrong", m.name());
        drop(g);
        print_row(&format!("step {step}: {}", m.name()), &models);
    }
    drop(pending.wait()?);
    println!("loads: {}, each started before the previous model's work", pools.stats().misses - misses);

    // Two LoRA variants of one model: one copy of its base weights, each variant
    // its own commit stack; a guard rebases the base to its variant.
    let (unet, base_out) = &models[1];
    let lora = |seed: i64| {
        tch::manual_seed(seed);
        let a = Tensor::randn([8, HIDDEN], (Kind::Float, Device::Cpu)) * 0.01;
        let b = Tensor::randn([HIDDEN, 8], (Kind::Float, Device::Cpu)) * 0.01;
        Commit::lora("l1.weight", a, b, 1.0)
    };
    let (style_a, style_b) = (unet.variant(), unet.variant());
    style_a.commit(lora(10))?;
    style_b.commit(lora(11))?;
    println!("\ntwo LoRA variants of `{}` sharing its base weights:", unet.name());
    let mut first: Vec<Tensor> = Vec::new();
    for round in 0..3 {
        for (i, (label, v)) in [("style-a", &style_a), ("style-b", &style_b)].into_iter().enumerate() {
            let g = sire::auto_manage(v)?;
            let y = g.forward(&x.to_device(g.device())).to_device(Device::Cpu);
            drop(g);
            assert!(!y.allclose(base_out, 1e-6, 1e-6, false), "{label} did not change the output");
            if round == 0 {
                first.push(y.copy());
            } else {
                assert!(y.equal(&first[i]), "{label} changed between rounds");
            }
            println!("round {round} {label}: y[0,0] = {:+.6}", y.double_value(&[0, 0]));
        }
    }
    let g = sire::auto_manage(unet)?;
    let y = g.forward(&x.to_device(g.device())).to_device(Device::Cpu);
    assert!(y.allclose(base_out, 1e-5, 1e-5, false), "the base changed");
    drop(g);
    println!("base output unchanged after 6 switches");
    println!("\n{}", pools.stats());
    let runtime = if gpu { Location::Cuda(0) } else { Location::Cpu };
    let s = pools.stats();
    let p = s.pool(runtime).expect("runtime pool");
    assert!(p.used <= p.budget);
    println!("\nall outputs correct; {} stayed within its budget", runtime);
    Ok(())
}

fn print_row(label: &str, models: &[(Managed<Mlp>, Tensor)]) {
    let cells: Vec<String> = models.iter().map(|(m, _)| format!("{}={}", m.name(), m.location())).collect();
    println!("{label:<20} {}", cells.join("  "));
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}
