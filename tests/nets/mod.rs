//! Small tch::nn models for the hook, exclusive and async tests.
#![allow(dead_code)]

use std::sync::Mutex;

use tch::nn::{self, Module, ModuleT};
use tch::{Device, Tensor};

/// A VarStore and the layers built on it. The layers hold `Tensor`s, which are
/// `Send` but not `Sync`; the `Mutex` makes the model `Sync` (a `Managed`
/// handle shares its model between threads) without any `unsafe`.
#[derive(Debug)]
pub struct Net {
    pub vs: nn::VarStore,
    pub net: Mutex<nn::Sequential>,
}

impl sire::ResourceUser for Net {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vs.tensors()
    }
}

impl Module for Net {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.net.lock().unwrap().forward(xs)
    }
}

/// 16 -> 32 -> 4 with a ReLU, seeded: 2704 bytes of f32 weights.
pub fn net(seed: i64) -> Net {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "l1", 16, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs.root() / "l2", 32, 4, Default::default()));
    Net { vs, net: Mutex::new(net) }
}

pub const NET_BYTES: u64 = (16 * 32 + 32 + 32 * 4 + 4) * 4;

/// A model whose forward depends on the training flag (dropout, batch norm).
#[derive(Debug)]
pub struct NetT {
    pub vs: nn::VarStore,
    pub net: Mutex<nn::SequentialT>,
}

impl sire::ResourceUser for NetT {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vs.tensors()
    }
}

impl ModuleT for NetT {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.net.lock().unwrap().forward_t(xs, train)
    }
}

pub fn net_t(seed: i64) -> NetT {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = nn::seq_t()
        .add(nn::linear(vs.root() / "l1", 16, 32, Default::default()))
        .add(nn::batch_norm1d(vs.root() / "bn", 32, Default::default()))
        .add_fn(|x| x.relu())
        .add_fn_t(|x, train| x.dropout(0.5, train))
        .add(nn::linear(vs.root() / "l2", 32, 4, Default::default()));
    NetT { vs, net: Mutex::new(net) }
}

/// Raw bytes of a tensor (on the CPU, contiguous): equality is bit for bit.
pub fn bits(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut v = vec![0u8; n];
    t.copy_data_u8(&mut v, t.numel());
    v
}
