//! The README's quickstart: register a model, use it inside a guard.
//!
//! Run: `cargo run --example quickstart`.

use sire::ResourceUser;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

struct Net {
    vs: nn::VarStore,
    net: nn::Sequential,
}

impl ResourceUser for Net {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vs.tensors()
    }
}

fn main() -> sire::Result<()> {
    sire::setup_default_pools()?; // detect CUDA devices, host RAM, spill dir
    let vs = nn::VarStore::new(Device::Cpu); // build on the CPU: that copy is the model's home
    let net = nn::seq().add(nn::linear(vs.root() / "fc", 16, 4, Default::default()));
    let m = sire::manage(Net { vs, net })?; // register: nothing moves yet
    let x = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
    {
        let g = sire::auto_manage(&m)?; // RAII: weights are now on g.device()
        let y = g.net.forward(&x.to_device(g.device()));
        println!("output {:?} on {:?}", y.size(), y.device());
    } // guard dropped: m is idle and may be evicted
    println!("{}", sire::stats()?);
    Ok(())
}
