//! Self-managing modules: [`hook`] wraps a managed model in a type whose
//! `forward` takes a guard, moves the input to the execution device and runs.

use std::borrow::Borrow;
use std::fmt;

use tch::nn::{Module, ModuleT};
use tch::{CModule, Device, IValue, Tensor};

use crate::{auto_manage, Error, Managed, Result};

/// Wraps a managed model so that it manages itself: every forward call takes a
/// guard (loading the model if needed, waiting for room like
/// [`auto_manage`]), moves the input to the execution device, runs, and
/// releases the guard.
///
/// `Hooked<T>` implements [`tch::nn::Module`] when `T` does (and so
/// [`tch::nn::ModuleT`], through tch's blanket implementation), so it drops in
/// wherever a module is expected. For models whose forward depends on the
/// training flag (dropout, batch norm) use [`hook_t`].
///
/// Inputs on another device are moved, not rejected. The output stays on the
/// execution device unless [`Hooked::output_device`] asks for another.
///
/// Forwards run in inference mode by default: without autograd (as inside
/// `tch::no_grad`, on the thread that runs the model, also for the async forms
/// that run on tokio's blocking pool), so outputs do not require gradients
/// and no graph is kept. [`Hooked::with_grad`] turns autograd back on.
///
/// `T` must be `Sync` for the `Module` implementation (tch's `Module` requires
/// `Send`, and a [`Managed`] handle shares its model between threads). tch's
/// layers hold [`Tensor`]s, which are `Send` but not `Sync`, so keep them
/// behind a `Mutex` in your model type (see the example below), or, if your
/// forward only reads the weights, assert `Sync` yourself with an `unsafe impl`.
///
/// ```
/// use std::sync::Mutex;
/// use tch::nn::{self, Module};
/// use tch::{Device, Kind, Tensor};
///
/// #[derive(Debug)]
/// struct Net { vs: nn::VarStore, net: Mutex<nn::Sequential> }
///
/// impl sire::ResourceUser for Net {
///     fn tensors(&self) -> Vec<(String, Tensor)> { self.vs.tensors() }
/// }
/// impl Module for Net {
///     fn forward(&self, xs: &Tensor) -> Tensor { self.net.lock().unwrap().forward(xs) }
/// }
///
/// # fn main() -> sire::Result<()> {
/// # let dir = tempfile::tempdir()?;
/// # let pools = sire::ResourcePoolManagement::builder().cuda(false).env(false).spill_dir(dir.path()).build()?;
/// let vs = nn::VarStore::new(Device::Cpu);
/// let net = nn::seq().add(nn::linear(vs.root() / "fc", 16, 4, Default::default()));
/// let model = Net { vs, net: Mutex::new(net) };
/// let x = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
/// let expected = model.forward(&x);
///
/// let hooked = sire::hook(pools.manage(model)?).output_device(Device::Cpu);
/// let y = hooked.forward(&x);          // loads the model if needed, runs, releases
/// assert!(y.equal(&expected));
/// let y = hooked.try_forward(&x)?;     // the same, with errors as `sire::Error`
/// # assert!(y.equal(&expected));
/// # Ok(()) }
/// ```
pub fn hook<T>(m: Managed<T>) -> Hooked<T> {
    Hooked { m, output: None, grad: false }
}

/// Like [`hook`], for models implementing [`tch::nn::ModuleT`] only (their
/// forward takes the training flag): the result implements `ModuleT`.
pub fn hook_t<T>(m: Managed<T>) -> HookedT<T> {
    HookedT(hook(m))
}

/// A self-managing model; see [`hook`].
pub struct Hooked<T> {
    m: Managed<T>,
    output: Option<Device>,
    /// Run forwards with autograd on (default off: inference mode).
    grad: bool,
}

impl<T> Clone for Hooked<T> {
    fn clone(&self) -> Self {
        Hooked { m: self.m.clone(), output: self.output, grad: self.grad }
    }
}

impl<T> fmt::Debug for Hooked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooked")
            .field("model", &self.m)
            .field("output_device", &self.output)
            .field("grad", &self.grad)
            .finish()
    }
}

impl<T> Hooked<T> {
    /// Moves every output to `device` (for example [`Device::Cpu`]) instead of
    /// leaving it on the execution device.
    #[must_use]
    pub fn output_device(mut self, device: Device) -> Self {
        self.output = Some(device);
        self
    }

    /// Runs forwards with autograd on (`true`), so that outputs can be
    /// back-propagated through the model, or off (`false`, the default:
    /// inference mode, no graph kept).
    #[must_use]
    pub fn with_grad(mut self, on: bool) -> Self {
        self.grad = on;
        self
    }

    /// The managed model behind the hook.
    pub fn managed(&self) -> &Managed<T> {
        &self.m
    }

    /// Unwraps the managed model.
    pub fn into_managed(self) -> Managed<T> {
        self.m
    }

    /// Takes a guard, calls `f` with the model and its execution device, and
    /// moves the output where it was asked for. The guard is released before
    /// the output moves (and by a panic in `f`).
    fn run<R>(
        &self,
        f: impl FnOnce(&T, Device) -> Result<R>,
        out: impl FnOnce(R, Device) -> Result<R>,
    ) -> Result<R> {
        let y = {
            let g = auto_manage(&self.m)?;
            let _no_grad = no_grad_unless(self.grad);
            f(&g, g.device())?
        };
        match self.output {
            Some(d) => out(y, d),
            None => Ok(y),
        }
    }

    /// [`Module::forward`] with errors as values: placing the model (no room,
    /// a failed move) or moving the input. A panic inside the model's own
    /// forward propagates, after the guard is released.
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor>
    where
        T: Module,
    {
        self.run(|m, dev| Ok(m.forward(&xs.f_to_device(dev)?)), to_device)
    }

    /// [`ModuleT::forward_t`] with errors as values (see [`Hooked::try_forward`]).
    pub fn try_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor>
    where
        T: ModuleT,
    {
        self.run(|m, dev| Ok(m.forward_t(&xs.f_to_device(dev)?, train)), to_device)
    }
}

fn to_device(t: Tensor, d: Device) -> Result<Tensor> {
    Ok(t.f_to_device(d)?)
}

/// Autograd off on this thread until the value drops (also by a panic), unless `grad`.
fn no_grad_unless(grad: bool) -> Option<tch::NoGradGuard> {
    (!grad).then(tch::no_grad_guard)
}

/// A self-managing forward.
///
/// # Panics
///
/// When the model cannot be placed (see [`auto_manage`]) or the input cannot
/// be moved, with the error's message; [`Hooked::try_forward`] returns the
/// error instead. The guard is released either way.
impl<T: Module + Sync> Module for Hooked<T> {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.try_forward(xs).unwrap_or_else(|e| panic!("sire::Hooked::forward: {e}"))
    }
}

/// TorchScript models: the `forward_*` and `method_*` calls of [`CModule`],
/// with every tensor argument moved to the execution device (including tensors
/// inside tuples, lists and dictionaries).
impl Hooked<CModule> {
    /// [`CModule::forward_ts`], self-managing.
    pub fn forward_ts<B: Borrow<Tensor>>(&self, ts: &[B]) -> Result<Tensor> {
        self.method_ts("forward", ts)
    }

    /// [`CModule::forward_is`], self-managing.
    pub fn forward_is<B: Borrow<IValue>>(&self, ts: &[B]) -> Result<IValue> {
        self.method_is("forward", ts)
    }

    /// [`CModule::method_ts`], self-managing.
    pub fn method_ts<B: Borrow<Tensor>>(&self, method: &str, ts: &[B]) -> Result<Tensor> {
        self.run(
            |m, dev| {
                let args = ts.iter().map(|t| t.borrow().f_to_device(dev)).collect::<Result<Vec<_>, _>>()?;
                Ok(m.method_ts(method, &args)?)
            },
            to_device,
        )
    }

    /// [`CModule::method_is`], self-managing.
    pub fn method_is<B: Borrow<IValue>>(&self, method: &str, ts: &[B]) -> Result<IValue> {
        let name = self.m.name();
        self.run(
            |m, dev| {
                let args = ts.iter().map(|v| Arg::new(name, v.borrow(), dev)).collect::<Result<Vec<_>>>()?;
                Ok(m.method_is(method, &args)?)
            },
            |v, d| match needs_move(&v, d) {
                true => moved(name, &v, d),
                false => Ok(v),
            },
        )
    }
}

/// An argument: the caller's value when it has nothing to move, else a copy
/// with its tensors on the execution device.
enum Arg<'a> {
    Same(&'a IValue),
    Moved(IValue),
}

impl<'a> Arg<'a> {
    fn new(model: &str, v: &'a IValue, dev: Device) -> Result<Self> {
        Ok(if needs_move(v, dev) { Arg::Moved(moved(model, v, dev)?) } else { Arg::Same(v) })
    }
}

impl Borrow<IValue> for Arg<'_> {
    fn borrow(&self) -> &IValue {
        match self {
            Arg::Same(v) => v,
            Arg::Moved(v) => v,
        }
    }
}

/// Whether `v` holds a tensor that is not on `dev`.
fn needs_move(v: &IValue, dev: Device) -> bool {
    match v {
        IValue::Tensor(t) => t.device() != dev,
        IValue::TensorList(ts) => ts.iter().any(|t| t.device() != dev),
        IValue::Tuple(vs) | IValue::GenericList(vs) => vs.iter().any(|v| needs_move(v, dev)),
        IValue::GenericDict(kvs) => kvs.iter().any(|(k, v)| needs_move(k, dev) || needs_move(v, dev)),
        _ => false,
    }
}

/// A copy of `v` with every tensor on `dev` (tensors already there are shared, not copied).
fn moved(model: &str, v: &IValue, dev: Device) -> Result<IValue> {
    let all = |vs: &[IValue]| vs.iter().map(|v| moved(model, v, dev)).collect::<Result<Vec<_>>>();
    Ok(match v {
        IValue::Tensor(t) => IValue::Tensor(t.f_to_device(dev)?),
        IValue::TensorList(ts) => {
            IValue::TensorList(ts.iter().map(|t| t.f_to_device(dev)).collect::<Result<Vec<_>, _>>()?)
        }
        IValue::Tuple(vs) => IValue::Tuple(all(vs)?),
        IValue::GenericList(vs) => IValue::GenericList(all(vs)?),
        IValue::GenericDict(kvs) => IValue::GenericDict(
            kvs.iter()
                .map(|(k, v)| Ok((moved(model, k, dev)?, moved(model, v, dev)?)))
                .collect::<Result<Vec<_>>>()?,
        ),
        IValue::None => IValue::None,
        IValue::Double(x) => IValue::Double(*x),
        IValue::Int(x) => IValue::Int(*x),
        IValue::Bool(x) => IValue::Bool(*x),
        IValue::IntList(x) => IValue::IntList(x.clone()),
        IValue::DoubleList(x) => IValue::DoubleList(x.clone()),
        IValue::BoolList(x) => IValue::BoolList(x.clone()),
        IValue::String(x) => IValue::String(x.clone()),
        IValue::StringList(x) => IValue::StringList(x.clone()),
        IValue::Device(x) => IValue::Device(*x),
        _ => {
            return Err(Error::InvalidOptions {
                model: model.to_string(),
                reason: format!(
                    "an argument holds a TorchScript object next to tensors that must move to {dev:?}; \
                     objects cannot be copied: pass those tensors on the execution device"
                ),
            })
        }
    })
}

/// A self-managing model whose forward takes the training flag; see [`hook_t`].
pub struct HookedT<T>(Hooked<T>);

impl<T> Clone for HookedT<T> {
    fn clone(&self) -> Self {
        HookedT(self.0.clone())
    }
}

impl<T> fmt::Debug for HookedT<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HookedT").field(&self.0).finish()
    }
}

impl<T> HookedT<T> {
    /// Moves every output to `device` instead of leaving it on the execution device.
    #[must_use]
    pub fn output_device(self, device: Device) -> Self {
        HookedT(self.0.output_device(device))
    }

    /// Runs forwards with autograd on or off (see [`Hooked::with_grad`]).
    #[must_use]
    pub fn with_grad(self, on: bool) -> Self {
        HookedT(self.0.with_grad(on))
    }

    /// The managed model behind the hook.
    pub fn managed(&self) -> &Managed<T> {
        self.0.managed()
    }

    /// [`ModuleT::forward_t`] with errors as values (see [`Hooked::try_forward`]).
    pub fn try_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor>
    where
        T: ModuleT,
    {
        self.0.try_forward_t(xs, train)
    }
}

/// A self-managing forward with the training flag.
///
/// # Panics
///
/// Like [`Hooked`]'s `Module::forward`, with the error's message;
/// [`HookedT::try_forward_t`] returns the error instead.
impl<T: ModuleT + Sync> ModuleT for HookedT<T> {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.try_forward_t(xs, train).unwrap_or_else(|e| panic!("sire::HookedT::forward_t: {e}"))
    }
}

#[cfg(feature = "tokio")]
impl<T: Module + Sync + 'static> Hooked<T> {
    /// The forward of an async program: waits for room without blocking the
    /// executor ([`auto_manage_async`](crate::auto_manage_async)), then runs the
    /// forward on tokio's blocking pool (it is compute, not I/O). The input is
    /// taken as a handle at the call, so the future is `Send` and can be
    /// spawned. Dropping the future releases whatever it holds, once the
    /// blocking part (if started) has finished. Requires the `tokio` feature.
    pub fn forward_async(
        &self,
        xs: &Tensor,
    ) -> impl std::future::Future<Output = Result<Tensor>> + Send + '_ {
        let xs = xs.shallow_clone();
        self.run_async(move |m, dev| Ok(m.forward(&xs.f_to_device(dev)?)))
    }
}

#[cfg(feature = "tokio")]
impl<T: Send + Sync + 'static> Hooked<T> {
    /// The async skeleton: a guard without blocking the executor, then `f` on
    /// tokio's blocking pool with autograd off unless asked (autograd's mode is
    /// per thread: the caller's `no_grad` does not reach the pool), the guard
    /// released before the output moves.
    fn run_async(
        &self,
        f: impl FnOnce(&T, Device) -> Result<Tensor> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<Tensor>> + Send + '_ {
        let (output, grad) = (self.output, self.grad);
        async move {
            let g = crate::auto_manage_async(&self.m).await?;
            let run = move || -> Result<Tensor> {
                let y = {
                    let _no_grad = no_grad_unless(grad);
                    f(&g, g.device())?
                };
                drop(g);
                match output {
                    Some(d) => to_device(y, d),
                    None => Ok(y),
                }
            };
            crate::asyncs::blocking(run).await?
        }
    }
}

/// Async TorchScript calls (the `tokio` feature), like [`Hooked::forward_async`].
#[cfg(feature = "tokio")]
impl Hooked<CModule> {
    /// [`Hooked::forward_ts`] for async code: the inputs are taken as handles
    /// at the call, the forward runs on tokio's blocking pool.
    pub fn forward_ts_async<B: Borrow<Tensor>>(
        &self,
        ts: &[B],
    ) -> impl std::future::Future<Output = Result<Tensor>> + Send + '_ {
        self.method_ts_async("forward", ts)
    }

    /// [`Hooked::method_ts`] for async code (see [`Hooked::forward_ts_async`]).
    pub fn method_ts_async<B: Borrow<Tensor>>(
        &self,
        method: &str,
        ts: &[B],
    ) -> impl std::future::Future<Output = Result<Tensor>> + Send + '_ {
        let args: Vec<Tensor> = ts.iter().map(|t| t.borrow().shallow_clone()).collect();
        let method = method.to_string();
        self.run_async(move |m, dev| {
            let args = args.iter().map(|t| t.f_to_device(dev)).collect::<Result<Vec<_>, _>>()?;
            Ok(m.method_ts(&method, &args)?)
        })
    }
}
