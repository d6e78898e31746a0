//! Two LoRA variants of one model, sharing one copy of its base weights.
//!
//! Writes two small LoRA adapter files (PEFT layout) next to a toy MLP, loads
//! them as commits on two variants of the managed model, alternates between the
//! variants (each guard rebases the one base copy), and checks that the base
//! comes back bit for bit.
//!
//! Run: `cargo run --example lora_variants`.

use sire::{Lora, ResourceUser};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

struct Mlp {
    vs: nn::VarStore,
    net: nn::Sequential,
}

impl ResourceUser for Mlp {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vs.tensors()
    }
}

/// A rank-4 adapter for both layers, as a fine-tuning library would save it.
fn write_adapter(path: &std::path::Path, seed: i64) -> Result<(), tch::TchError> {
    tch::manual_seed(seed);
    let f = (Kind::Float, Device::Cpu);
    let (a1, b1) = (Tensor::randn([4, 32], f) * 0.1, Tensor::randn([64, 4], f) * 0.1);
    let (a2, b2) = (Tensor::randn([4, 64], f) * 0.1, Tensor::randn([8, 4], f) * 0.1);
    Tensor::write_safetensors(
        &[
            ("base_model.model.mlp.up.lora_A.weight", &a1),
            ("base_model.model.mlp.up.lora_B.weight", &b1),
            ("base_model.model.mlp.down.lora_A.weight", &a2),
            ("base_model.model.mlp.down.lora_B.weight", &b2),
        ],
        path,
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    sire::setup_default_pools()?;
    let dir = tempfile::tempdir()?;

    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root() / "mlp";
    let net = nn::seq()
        .add(nn::linear(&root / "up", 32, 64, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "down", 64, 8, Default::default()));
    let base = sire::manage(Mlp { vs, net })?;
    println!("model `{}`: {} bytes, tensors {:?}", base.name(), base.size_bytes(), base.tensor_names());

    // Two adapters, each a commit on its own variant of the same base.
    let mut variants = Vec::new();
    for (name, seed) in [("style-a", 1), ("style-b", 2)] {
        let path = dir.path().join(format!("{name}.safetensors"));
        write_adapter(&path, seed)?;
        let lora = Lora::from_safetensors(&path)?.alpha(8.0); // PEFT keeps lora_alpha in its JSON config
        let v = base.variant();
        let id = v.commit(lora.to_commit(base.tensor_names(), 1.0)?.named(name))?;
        println!("{name}: commit {id} on {:?}", v.commits()[0].targets);
        variants.push((name, v));
    }

    let x = Tensor::randn([1, 32], (Kind::Float, Device::Cpu));
    let run = |m: &sire::Managed<Mlp>| -> sire::Result<Tensor> {
        let g = sire::auto_manage(m)?; // rebases the shared base to m's commits
        Ok(tch::no_grad(|| g.net.forward(&x.to_device(g.device()))).to_device(Device::Cpu))
    };
    let y0 = run(&base)?;
    let mut last = Vec::new();
    for round in 0..3 {
        for (name, v) in &variants {
            let y = run(v)?;
            println!(
                "round {round} {name}: y[0..3] = {:?}",
                Vec::<f32>::try_from(y.narrow(1, 0, 3).flatten(0, -1))?
            );
            last.push(y);
        }
    }
    assert!(
        last[0].equal(&last[2]) && last[1].equal(&last[3]),
        "each variant gives the same output every time"
    );
    assert!(!last[0].equal(&last[1]), "the variants differ");

    // The base handle never had a commit: it still sees the base, bit for bit.
    assert!(run(&base)?.equal(&y0));
    println!("base output unchanged after 6 switches");
    println!("{}", sire::stats()?);
    Ok(())
}
