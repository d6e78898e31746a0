//! What can be managed: the [`ResourceUser`] trait, its implementations for tch's
//! model types, and [`TensorSet`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, CModule, Device, Kind, Tensor};

use crate::{Error, Result};

/// A model whose weights `sire` can move.
///
/// Implement it for your own types by listing every tensor that holds weights,
/// parameters *and* buffers, under unique names. The tensors must be handles on
/// the model's own tensor objects ([`Tensor::shallow_clone`], which is what
/// [`nn::VarStore::variables`] returns), not copies: `sire` moves a model by
/// swapping each tensor's storage in place (`set_data`), so every module and
/// clone built on those tensors follows the weights.
///
/// The list is taken once, when the model is registered.
///
/// ```
/// use sire::ResourceUser;
/// use tch::{nn, Tensor};
///
/// #[derive(Debug)]
/// struct Mlp { vs: nn::VarStore, net: nn::Sequential }
///
/// impl sire::ResourceUser for Mlp {
///     fn tensors(&self) -> Vec<(String, Tensor)> { self.vs.tensors() }
/// }
/// ```
pub trait ResourceUser: Send + 'static {
    /// Every weight tensor of the model, named, as handles sharing the model's tensors.
    fn tensors(&self) -> Vec<(String, Tensor)>;

    /// Hook called after `sire` moved the weights to `device` (the execution
    /// device while a guard is alive, or where the home copy lives). The default
    /// does nothing; override it if your type caches the device.
    fn on_moved(&self, _device: Device) {}
}

impl ResourceUser for nn::VarStore {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// TorchScript modules. `tch` exposes only the parameters of a `CModule`, so its
/// buffers (batch-norm statistics, for example) are neither counted nor moved:
/// prefer modules whose state is all in parameters, or a [`TensorSet`].
impl ResourceUser for CModule {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.named_parameters().unwrap_or_default()
    }
}

/// A named set of tensors: the simplest thing to manage (embedding tables,
/// weights you apply by hand, a checkpoint loaded from safetensors).
///
/// Access goes through [`TensorSet::get`], which returns a handle on the managed
/// tensor, so a `TensorSet` can be shared between threads.
#[derive(Debug)]
pub struct TensorSet {
    tensors: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
    source: Option<PathBuf>,
}

impl TensorSet {
    /// A set from named tensors. Names must be unique.
    pub fn new<S: Into<String>>(tensors: impl IntoIterator<Item = (S, Tensor)>) -> Result<Self> {
        let tensors: Vec<(String, Tensor)> = tensors.into_iter().map(|(n, t)| (n.into(), t)).collect();
        let mut index = HashMap::with_capacity(tensors.len());
        for (i, (n, _)) in tensors.iter().enumerate() {
            if index.insert(n.clone(), i).is_some() {
                return Err(Error::InvalidOptions {
                    model: "TensorSet".into(),
                    reason: format!("duplicate tensor name `{n}`"),
                });
            }
        }
        Ok(TensorSet { tensors, index, source: None })
    }

    /// Loads every tensor of a safetensors file onto the CPU. While the model is
    /// clean, `sire` reloads it from this file instead of writing a spill copy.
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let loaded = Tensor::read_safetensors(path)?;
        let mut set = TensorSet::new(loaded)?;
        set.source = Some(path.to_path_buf());
        Ok(set)
    }

    /// A handle on the tensor called `name` (it follows the managed weights).
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.index.get(name).map(|&i| self.tensors[i].1.shallow_clone())
    }

    /// The names, in insertion order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

// SAFETY: `Tensor` is `Send` but not `Sync` because some of its `&self` methods
// mutate. A `TensorSet` never hands out `&Tensor`: `get` returns an owned
// shallow clone (an atomic reference-count increment in libtorch, safe from any
// thread), exactly what any thread may already do with a `Send` tensor.
unsafe impl Sync for TensorSet {}

impl ResourceUser for TensorSet {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

/// Where a model's tensors were found and what they weigh.
pub(crate) struct Inventory {
    /// Tensors grouped by exact alias (same data, shape, strides, dtype):
    /// each group moves as one tensor.
    pub groups: Vec<Group>,
    /// Bytes the model occupies: each group once.
    pub bytes: u64,
    /// The device every tensor is on.
    pub device: Device,
}

/// Tensors that alias each other exactly, moved as one.
pub(crate) struct Group {
    /// Name under which the group is stored on disk (its first member's name).
    pub key: String,
    /// Every member's name, `key` first.
    pub names: Vec<String>,
    /// Handles on the user's tensors.
    pub members: Vec<Tensor>,
    /// Bytes of one copy.
    pub bytes: u64,
    pub kind: Kind,
    pub shape: Vec<i64>,
}

impl Group {
    /// The tensor every member currently shares.
    pub fn current(&self) -> &Tensor {
        &self.members[0]
    }

    /// The sum of the members' version counters: it changes whenever any of
    /// them is written (the engine's dirty check).
    pub fn version(&self) -> i64 {
        self.members.iter().map(|m| m.internal_version()).sum()
    }

    /// Points every member at `data` (no copy).
    pub fn set_data(&mut self, data: &Tensor) {
        for m in &mut self.members {
            m.set_data(data);
        }
    }
}

/// Bytes of a tensor's elements.
pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Groups aliases, checks that everything is on one device, and sizes the model.
pub(crate) fn inventory(model: &str, tensors: Vec<(String, Tensor)>) -> Result<Inventory> {
    let mut groups: Vec<Group> = Vec::new();
    let mut by_alias: HashMap<(usize, Kind, Vec<i64>, Vec<i64>), usize> = HashMap::new();
    let mut seen_names: HashMap<String, ()> = HashMap::new();
    let mut devices: Vec<(String, Device)> = Vec::new();
    for (name, t) in tensors {
        if seen_names.insert(name.clone(), ()).is_some() {
            return Err(Error::InvalidOptions {
                model: model.into(),
                reason: format!("two tensors are both named `{name}`"),
            });
        }
        devices.push((name.clone(), t.device()));
        let bytes = tensor_bytes(&t);
        let ptr = t.data_ptr() as usize;
        let key = (ptr, t.kind(), t.size(), t.stride());
        if bytes > 0 && ptr != 0 {
            if let Some(&g) = by_alias.get(&key) {
                groups[g].members.push(t);
                groups[g].names.push(name);
                continue;
            }
            by_alias.insert(key, groups.len());
        }
        groups.push(Group {
            key: name.clone(),
            names: vec![name],
            bytes,
            kind: t.kind(),
            shape: t.size(),
            members: vec![t],
        });
    }
    let device = one_device(model, &devices)?;
    let bytes = groups.iter().map(|g| g.bytes).sum();
    Ok(Inventory { groups, bytes, device })
}

/// The one device all tensors are on (the CPU for a model without tensors), or
/// an error naming a tensor on each device found.
pub(crate) fn one_device(model: &str, devices: &[(String, Device)]) -> Result<Device> {
    let Some((_, first)) = devices.first() else { return Ok(Device::Cpu) };
    let mut seen: Vec<(Device, &str)> = Vec::new();
    for (name, d) in devices {
        if !seen.iter().any(|(s, _)| s == d) {
            seen.push((*d, name));
        }
    }
    if seen.len() == 1 {
        return Ok(*first);
    }
    let devices = seen.iter().map(|(d, n)| format!("`{n}` on {d:?}")).collect::<Vec<_>>().join(", ");
    Err(Error::MixedDevices { model: model.into(), devices })
}

/// The source file of a model that came from safetensors, if any (used to
/// reload clean models without writing a spill copy).
pub(crate) fn source_of(user: &dyn std::any::Any) -> Option<PathBuf> {
    user.downcast_ref::<TensorSet>().and_then(|s| s.source.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_device_names_a_tensor_per_device() {
        let cpu = |n: &str| (n.to_string(), Device::Cpu);
        assert_eq!(one_device("m", &[]).unwrap(), Device::Cpu);
        assert_eq!(one_device("m", &[cpu("a"), cpu("b")]).unwrap(), Device::Cpu);
        let err = one_device("m", &[cpu("a"), ("b".into(), Device::Cuda(1)), cpu("c")]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::MixedDevices { .. }), "{msg}");
        assert!(
            msg.contains("`a` on Cpu") && msg.contains("`b` on Cuda(1)") && !msg.contains("`c`"),
            "{msg}"
        );
    }

    #[test]
    fn inventory_counts_aliases_once() {
        let w = Tensor::ones([4, 4], tch::kind::FLOAT_CPU);
        let tied = w.shallow_clone();
        let other = Tensor::ones([3], tch::kind::DOUBLE_CPU);
        let inv = inventory("m", vec![("w".into(), w), ("tied".into(), tied), ("o".into(), other)]).unwrap();
        assert_eq!(inv.groups.len(), 2);
        assert_eq!(inv.groups[0].members.len(), 2);
        assert_eq!(inv.bytes, 16 * 4 + 3 * 8);
        let dup = inventory(
            "m",
            vec![
                ("w".into(), Tensor::ones([1], tch::kind::FLOAT_CPU)),
                ("w".into(), Tensor::ones([1], tch::kind::FLOAT_CPU)),
            ],
        );
        assert!(matches!(dup, Err(Error::InvalidOptions { .. })));
    }
}
