//! The demo: four models whose total exceeds the budget, used round-robin.
//! After each step it prints where every model is, and at the end the statistics.
//!
//! With a GPU the models run on `cuda:0` and are evicted to host memory; without
//! one they run on the CPU and are evicted to the disk tier (a real safetensors
//! spill). Either way the budget holds two and a half models.
//!
//! Run: `bash scripts/demo.sh` (or `cargo run --release --example demo`).

use sire::{Location, ManageOptions, Managed, ResourcePoolManagement};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const HIDDEN: i64 = 2048; // each model: 2 × 2048² f32 ≈ 32 MiB

struct Mlp {
    vs: nn::VarStore,
    net: nn::Sequential,
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
    Mlp { vs, net }
}

fn main() -> sire::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
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
        let expected = m.net.forward(&x);
        models.push((pools.manage_with(m, ManageOptions::new().name(*name))?, expected));
    }
    print_row("registered", &models);

    for step in 0..8 {
        let (m, expected) = &models[step % models.len()];
        let g = sire::auto_manage(m)?;
        let y = g.net.forward(&x.to_device(g.device()));
        let ok = y.to_device(Device::Cpu).allclose(expected, 1e-5, 1e-5, false);
        assert!(ok, "{} computed a wrong output", m.name());
        drop(g);
        print_row(&format!("step {step}: {}", m.name()), &models);
    }
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
