//! Self-streaming parted models: [`hook_parts`] wraps a [`Parted`] model and a
//! forward written against a [`Stream`]; [`Parted::sequential`] chains one
//! layer per part, tch's `nn::Sequential` with parts. Both implement
//! [`tch::nn::Module`], so `forward` on a model larger than the budget just
//! works.

use std::fmt;

use tch::nn::Module;
use tch::{Device, Tensor};

use super::{Parted, Stream};
use crate::{Error, Result, TensorSet};

/// The options every self-streaming model has, on its `fwd:` [`Forward`]:
/// `output_device` and `with_grad`.
macro_rules! forward_options {
    () => {
        /// Moves every output to `device` instead of leaving it on the
        /// device of the part that computed it last.
        #[must_use]
        pub fn output_device(mut self, device: tch::Device) -> Self {
            self.fwd.output = Some(device);
            self
        }

        /// Runs forwards with autograd on (`true`) or off (`false`, the default).
        #[must_use]
        pub fn with_grad(mut self, on: bool) -> Self {
            self.fwd.grad = on;
            self
        }
    };
}
pub(super) use forward_options;

/// The forward of a [`HookedParts`]: takes the parts it needs from the
/// stream, in any order.
type PassFn = dyn Fn(&mut Stream<'_>, &Tensor) -> Result<Tensor> + Send + Sync;

/// A layer of a [`Sequential`] given as a function of its part's tensors.
type LayerFn = dyn Fn(&TensorSet, &Tensor) -> Tensor + Send;

/// Makes a parted model self-streaming: every forward starts a pass
/// ([`Parted::stream`]), calls `f` with it and the input, and ends the pass
/// (releasing every part, also when `f` fails or panics). `f` takes the
/// parts it needs with [`Stream::part`]; the next part is prefetched while
/// the current one computes, and the order `f` takes them in is learned.
///
/// The result implements [`tch::nn::Module`] (its `forward` panics on an
/// error, with the error's message; [`HookedParts::try_forward`] returns it).
/// Like [`hook`](crate::hook), forwards run without autograd unless
/// [`HookedParts::with_grad`] says otherwise, and outputs stay where the last
/// part computed them unless [`HookedParts::output_device`] asks for another
/// device. `f` moves activations between parts itself (parts can run on
/// different devices); [`Parted::sequential`] does it for a chain of layers.
///
/// ```
/// # fn main() -> sire::Result<()> {
/// use sire::{ManageOptions, Split, TensorSet};
/// use tch::nn::Module;
/// use tch::{Kind, Tensor};
/// # let dir = tempfile::tempdir()?;
/// // Four 64 KiB layers under a 160 KiB budget.
/// let pools = sire::ResourcePoolManagement::builder().cuda(false).env(false)
///     .cpu_budget(160 << 10).spill_dir(dir.path()).build()?;
/// let set = TensorSet::new((0..4).map(|i| (format!("l{i}.w"), Tensor::eye(128, tch::kind::FLOAT_CPU) * 2)))?;
/// let model = pools.manage_parts(set, Split::TopLevel, ManageOptions::new())?;
/// let net = sire::hook_parts(model, |pass, x| {
///     let mut h = x.shallow_clone();
///     for i in 0..4 {
///         let part = pass.part(i)?;
///         h = part.get(&format!("l{i}.w")).unwrap().mm(&h.to_device(part.device()));
///     }
///     Ok(h)
/// });
/// let y = net.forward(&Tensor::ones([128, 1], (Kind::Float, tch::Device::Cpu)));
/// assert_eq!(y.sum(Kind::Float).double_value(&[]), 128.0 * 16.0);
/// # Ok(()) }
/// ```
pub fn hook_parts<F>(model: Parted, f: F) -> HookedParts
where
    F: Fn(&mut Stream<'_>, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    HookedParts { model, f: Box::new(f), fwd: Forward::default() }
}

/// A self-streaming parted model; see [`hook_parts`].
pub struct HookedParts {
    model: Parted,
    f: Box<PassFn>,
    fwd: Forward,
}

impl fmt::Debug for HookedParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookedParts")
            .field("model", &self.model)
            .field("output_device", &self.fwd.output)
            .field("grad", &self.fwd.grad)
            .finish_non_exhaustive()
    }
}

impl HookedParts {
    forward_options!();

    /// The parted model behind the hook.
    pub fn parted(&self) -> &Parted {
        &self.model
    }

    /// Unwraps the parted model.
    pub fn into_parted(self) -> Parted {
        self.model
    }

    /// [`Module::forward`] with errors as values (taking a part: no room, a
    /// failed move; or an error `f` returned). Every part is released before
    /// this returns, and by a panic in `f`.
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fwd.run(|| (self.f)(&mut self.model.stream(), xs))
    }
}

/// A self-streaming forward.
///
/// # Panics
///
/// On any error [`HookedParts::try_forward`] would return, with its message.
impl Module for HookedParts {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.try_forward(xs).unwrap_or_else(|e| panic!("sire::HookedParts::forward: {e}"))
    }
}

/// One layer of a [`Sequential`], run while its part is taken.
enum Layer {
    /// A tch module whose weights are the part's tensors.
    Module(Box<dyn Module>),
    /// A function of the part's tensors and the activation.
    Fn(Box<LayerFn>),
}

/// A chain of layers over a [`Parted`] model, like tch's `nn::Sequential`:
/// each layer belongs to a part, and a forward streams the parts in the
/// chain's order, moving the activation to each part's device. Built by
/// [`Parted::sequential`], then [`Sequential::add`] (a tch module whose
/// weights are the part's tensors) or [`Sequential::add_fn`] (a function of
/// the part's tensors). Several consecutive layers may share a part; a part
/// may come back later in the chain (it is taken again).
///
/// It implements [`tch::nn::Module`]; [`Sequential::try_forward`] returns
/// errors as values. Forwards run without autograd unless
/// [`Sequential::with_grad`].
///
/// **tch layers.** A layer built on a `VarStore` computes with the
/// `VarStore`'s tensors. Give the same tensors to the parts (a [`TensorSet`]
/// built from [`tch::nn::VarStore::variables`] shares them, nothing is
/// copied): sire moves a part's tensors in place, so the layer follows its
/// part to the device and back.
///
/// ```
/// # fn main() -> sire::Result<()> {
/// use sire::{ManageOptions, Split, TensorSet};
/// use tch::nn::{self, Module};
/// use tch::{Device, Kind, Tensor};
/// # let dir = tempfile::tempdir()?;
/// let vs = nn::VarStore::new(Device::Cpu);
/// let layers: Vec<nn::Linear> =
///     (0..4).map(|i| nn::linear(vs.root() / format!("fc{i}"), 256, 256, Default::default())).collect();
/// let x = Tensor::randn([8, 256], (Kind::Float, Device::Cpu));
/// let expected = layers.iter().fold(x.shallow_clone(), |h, l| l.forward(&h).relu());
///
/// // About 257 KiB a layer, a budget of two layers: the model is twice the budget.
/// let pools = sire::ResourcePoolManagement::builder().cuda(false).env(false)
///     .cpu_budget(2 * 260 << 10).spill_dir(dir.path()).build()?;
/// let set = TensorSet::new(vs.variables())?;
/// let model = pools.manage_parts(set, Split::TopLevel, ManageOptions::new().name("mlp"))?;
/// let mut net = model.sequential();
/// for (i, l) in layers.into_iter().enumerate() {
///     net = net.add(&format!("fc{i}"), l)?.add_fn(&format!("fc{i}"), |_, h| h.relu())?;
/// }
/// let y = net.forward(&x); // streams fc0..fc3 through the budget
/// assert!(y.allclose(&expected, 1e-6, 1e-6, false));
/// # Ok(()) }
/// ```
pub struct Sequential {
    model: Parted,
    layers: Vec<(usize, Layer)>,
    fwd: Forward,
}

impl fmt::Debug for Sequential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<&str> = self.layers.iter().map(|(p, _)| self.model.names[*p].as_str()).collect();
        f.debug_struct("Sequential")
            .field("model", &self.model.name)
            .field("layers", &parts)
            .field("output_device", &self.fwd.output)
            .field("grad", &self.fwd.grad)
            .finish()
    }
}

impl Parted {
    /// An empty chain of layers over this model: see [`Sequential`].
    pub fn sequential(self) -> Sequential {
        Sequential { model: self, layers: Vec::new(), fwd: Forward::default() }
    }
}

impl Sequential {
    /// Appends a tch layer that computes with part `part`'s tensors (named as
    /// [`Parted::part_names`] gives them); [`Error::InvalidOptions`] if the
    /// model has no such part.
    pub fn add(self, part: &str, layer: impl Module + 'static) -> Result<Sequential> {
        self.push(part, Layer::Module(Box::new(layer)))
    }

    /// Appends a layer computed by `f` from part `part`'s tensors and the
    /// activation (already on the part's device).
    pub fn add_fn(
        self,
        part: &str,
        f: impl Fn(&TensorSet, &Tensor) -> Tensor + Send + 'static,
    ) -> Result<Sequential> {
        self.push(part, Layer::Fn(Box::new(f)))
    }

    fn push(mut self, part: &str, layer: Layer) -> Result<Sequential> {
        let Some(i) = self.model.names.iter().position(|n| n == part) else {
            return Err(Error::InvalidOptions {
                model: self.model.name.clone(),
                reason: format!("no part named `{part}` (parts: {})", self.model.names.join(", ")),
            });
        };
        self.layers.push((i, layer));
        Ok(self)
    }

    /// The number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the chain has no layer (its forward returns the input).
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    forward_options!();

    /// The parted model behind the chain.
    pub fn parted(&self) -> &Parted {
        &self.model
    }

    /// [`Module::forward`] with errors as values (taking a part, moving the
    /// activation). Every part is released before this returns, and by a
    /// panic in a layer.
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fwd.run(|| {
            let mut pass = self.model.stream();
            let mut h = xs.shallow_clone();
            for (i, layer) in &self.layers {
                let part = pass.part(*i)?;
                h = h.f_to_device(part.device())?;
                h = match layer {
                    Layer::Module(m) => m.forward(&h),
                    Layer::Fn(f) => f(part, &h),
                };
            }
            Ok(h)
        })
    }
}

/// A streamed forward.
///
/// # Panics
///
/// On any error [`Sequential::try_forward`] would return, with its message.
impl Module for Sequential {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.try_forward(xs).unwrap_or_else(|e| panic!("sire::Sequential::forward: {e}"))
    }
}

/// How a self-streaming model runs its forwards: with autograd or not, and
/// where the output goes.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Forward {
    /// Move every output there (else it stays where it was computed).
    pub(super) output: Option<Device>,
    /// Autograd on (default off: inference mode).
    pub(super) grad: bool,
}

impl Forward {
    /// Runs `pass` (which streams the parts and ends its stream before it
    /// returns) without autograd unless asked, then moves the output.
    pub(super) fn run(&self, pass: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        let y = {
            let _no_grad = (!self.grad).then(tch::no_grad_guard);
            pass()?
        };
        match self.output {
            Some(d) => Ok(y.f_to_device(d)?),
            None => Ok(y),
        }
    }
}
