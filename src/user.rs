//! What can be managed: the [`ResourceUser`] trait, its implementations for tch's
//! model types, and [`TensorSet`].

use std::collections::HashMap;
use std::path::Path;

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

    /// Hook told where the weights are after `sire` moved them: called before
    /// a guard hands the model out (on the thread taking the guard), whenever
    /// the weights moved since the previous call, with the execution device.
    /// While no guard is alive the weights may move at any time without a call
    /// (they are only usable inside a guard). The default does nothing;
    /// override it if your type caches the device.
    fn on_moved(&self, _device: Device) {}
}

impl ResourceUser for nn::VarStore {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// TorchScript modules: their parameters and their buffers (batch-norm
/// running statistics, registered buffers of every submodule), read through
/// sire's C++ shim since `tch` exposes only parameters. Both are counted,
/// moved and spilled, keeping identity: the module computes with them wherever
/// they are.
impl ResourceUser for CModule {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut all = self.named_parameters().unwrap_or_default();
        match crate::tier::ffi::module_buffers(self) {
            Ok(buffers) => all.extend(buffers),
            Err(e) => tracing::warn!(error = %e, "could not list the TorchScript module's buffers"),
        }
        all
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
    /// The file the tensors come from, as first opened.
    source: Option<crate::tier::spill::Source>,
    /// Whether the tensors of a set opened from a file were read yet.
    lazy: parking_lot::Mutex<Lazy>,
}

/// The state of a set's tensors.
#[derive(Debug)]
enum Lazy {
    /// In memory (read, or given).
    Loaded,
    /// Opened from the header alone: the tensors are empty placeholders of
    /// these shapes until read.
    Pending(Vec<Vec<i64>>),
    /// Registered while pending: the engine reads them when a guard needs them.
    Managed,
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
        Ok(TensorSet { tensors, index, source: None, lazy: parking_lot::Mutex::new(Lazy::Loaded) })
    }

    /// The tensors of a safetensors file, on the CPU, read only when needed:
    /// opening reads the file's header alone. Managed, the set is registered
    /// from that header (it takes no host memory until a guard loads it, and
    /// while clean it reloads from this file instead of writing a spill
    /// copy); used without `sire`, its tensors are read on first access
    /// ([`TensorSet::get`], or [`TensorSet::load`] to handle errors).
    ///
    /// The file is remembered by its absolute path (symlinks resolved), size
    /// and modification time, by its stamp at the first read (device, inode,
    /// size, modification and change times) and, for tensors that read
    /// copied, by a hash of their bytes. Each later read checks them: a file
    /// that changed (overwritten, replaced, truncated) is [`Error::Corrupt`]
    /// naming it, and the model stays where it was. (A CPU model maps the
    /// file instead of copying it, see
    /// [`Builder::map_files`](crate::Builder::map_files): its stamp is then
    /// its identity, and any write to the file counts as a change.) To be immune to later changes of the
    /// file, at the cost of reading it now and writing a spill copy on the
    /// first eviction, use [`TensorSet::private_copy`].
    ///
    /// A malformed file (a bad header, an unsupported dtype, tensors beyond
    /// its end) is [`Error::Corrupt`] naming the file and the reason; a
    /// symlink or FIFO where the resolved file should be, or anything but a
    /// regular file, is refused the same way.
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<Self> {
        let (layout, source) = crate::tier::spill::open_source(path.as_ref())?;
        let mut shapes = Vec::with_capacity(layout.len());
        let placeholders = layout.into_iter().map(|(name, kind, shape)| {
            shapes.push(shape);
            (name, Tensor::empty([0i64], (kind, Device::Cpu)))
        });
        let mut set = TensorSet::new(placeholders.collect::<Vec<_>>())?;
        set.source = Some(source);
        set.lazy = parking_lot::Mutex::new(Lazy::Pending(shapes));
        Ok(set)
    }

    /// Reads the tensors now if they were not read yet (a set from
    /// [`TensorSet::from_safetensors`] that is not managed); errors as for
    /// that file. Does nothing for a managed set: `sire` loads it.
    pub fn load(&self) -> Result<()> {
        let mut lazy = self.lazy.lock();
        if let Lazy::Pending(_) = &*lazy {
            let source = self.source.as_ref().expect("a pending set has a source");
            let names: Vec<String> = self.tensors.iter().map(|(n, _)| n.clone()).collect();
            let read = source.read_into(&names, None).map_err(|e| match e {
                Error::Io(io) => {
                    Error::Io(std::io::Error::new(io.kind(), format!("{}: {io}", source.path().display())))
                }
                other => other,
            })?;
            for ((_, handle), t) in self.tensors.iter().zip(read) {
                // A handle shares the TensorImpl: every clone handed out follows.
                handle.shallow_clone().set_data(&t);
            }
            *lazy = Lazy::Loaded;
        }
        Ok(())
    }

    /// [`TensorSet::load`] for accessors that cannot return an error.
    fn loaded(&self) {
        if let Err(e) = self.load() {
            panic!("sire::TensorSet: reading the tensors failed: {e} (TensorSet::load returns this error)");
        }
    }

    /// Forgets the file the set was read from: `sire` then keeps its own
    /// private copy of the weights (a spill file written on the first
    /// eviction) and never reads the original file again, so the file may
    /// change or disappear. The tensors are read now if they were not yet.
    /// Without this, a set from [`TensorSet::from_safetensors`] reloads from
    /// its file, and a changed file is an error.
    ///
    /// ```
    /// # fn main() -> sire::Result<()> {
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("w.safetensors");
    /// # tch::Tensor::write_safetensors(&[("w", tch::Tensor::ones([4], tch::kind::FLOAT_CPU))], &path)?;
    /// let set = sire::TensorSet::from_safetensors(&path)?.private_copy()?;
    /// # let _ = set;
    /// # Ok(()) }
    /// ```
    pub fn private_copy(mut self) -> Result<Self> {
        self.load()?;
        self.source = None;
        Ok(self)
    }

    /// A handle on the tensor called `name` (it follows the managed weights).
    ///
    /// # Panics
    ///
    /// On a set from [`TensorSet::from_safetensors`] that is neither managed
    /// nor read yet, this reads it; if that fails (the file changed or went
    /// away), it panics with the error ([`TensorSet::load`] returns it).
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.loaded();
        self.index.get(name).map(|&i| self.tensors[i].1.shallow_clone())
    }

    /// The names, in insertion order (in file order for a set from a file).
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

    /// Splits the set into parts, one per group of names (for
    /// [`ResourcePoolManagement::manage_parts`](crate::ResourcePoolManagement::manage_parts)),
    /// keeping what each tensor is: a set opened from a file and not read yet
    /// gives sets of placeholders over the same file (nothing is read), a set
    /// in memory gives sets of handles on its own tensors (nothing is
    /// copied). Every name must be in exactly one group and every group must
    /// be non-empty ([`Error::InvalidOptions`] naming the offenders
    /// otherwise); tensors in memory that share storage must be in one part.
    pub(crate) fn split(self, model: &str, groups: Vec<Vec<String>>) -> Result<Vec<TensorSet>> {
        let invalid = |reason: String| Error::InvalidOptions { model: model.into(), reason };
        let quote = |names: &[&str]| names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let mut owner: Vec<Option<usize>> = vec![None; self.tensors.len()];
        let (mut unknown, mut twice) = (Vec::new(), Vec::new());
        for (p, group) in groups.iter().enumerate() {
            if group.is_empty() {
                return Err(invalid(format!("part {p} has no tensor")));
            }
            for name in group {
                match self.index.get(name) {
                    None => unknown.push(name.as_str()),
                    Some(&i) if owner[i].is_some() => twice.push(name.as_str()),
                    Some(&i) => owner[i] = Some(p),
                }
            }
        }
        if !unknown.is_empty() {
            return Err(invalid(format!("no tensor named {}", quote(&unknown))));
        }
        if !twice.is_empty() {
            return Err(invalid(format!("tensors in more than one part: {}", quote(&twice))));
        }
        let missing: Vec<&str> = self
            .tensors
            .iter()
            .zip(&owner)
            .filter(|(_, o)| o.is_none())
            .map(|((n, _), _)| n.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(invalid(format!("tensors in no part: {}", quote(&missing))));
        }
        let lazy = std::mem::replace(&mut *self.lazy.lock(), Lazy::Loaded);
        let mut shapes = match lazy {
            Lazy::Pending(shapes) => Some(shapes.into_iter().map(Some).collect::<Vec<_>>()),
            Lazy::Loaded => None,
            Lazy::Managed => return Err(invalid("the set is managed already".into())),
        };
        if shapes.is_none() {
            // Parts move independently: memory shared across two parts would
            // be moved (and counted) twice and stop being shared.
            let mut bases: HashMap<usize, (usize, &str)> = HashMap::new();
            for ((name, t), o) in self.tensors.iter().zip(&owner) {
                if !t.defined() || t.numel() == 0 {
                    continue;
                }
                let part = o.expect("checked");
                match bases.insert(storage_base(t), (part, name)) {
                    Some((other, first)) if other != part => {
                        return Err(invalid(format!(
                            "tensors `{first}` (part {other}) and `{name}` (part {part}) share memory; \
                             put them in one part"
                        )))
                    }
                    _ => {}
                }
            }
        }
        let mut parts: Vec<Vec<(String, Tensor)>> =
            groups.iter().map(|g| Vec::with_capacity(g.len())).collect();
        let mut part_shapes: Vec<Vec<Vec<i64>>> = vec![Vec::new(); groups.len()];
        for (i, ((name, t), o)) in self.tensors.into_iter().zip(owner).enumerate() {
            let p = o.expect("checked");
            if let Some(shapes) = shapes.as_mut() {
                part_shapes[p].push(shapes[i].take().expect("one shape per tensor"));
            }
            parts[p].push((name, t));
        }
        parts
            .into_iter()
            .zip(part_shapes)
            .map(|(tensors, shapes_of_part)| {
                let mut set = TensorSet::new(tensors)?;
                set.source = self.source.clone();
                if shapes.is_some() {
                    set.lazy = parking_lot::Mutex::new(Lazy::Pending(shapes_of_part));
                }
                Ok(set)
            })
            .collect()
    }

    /// Each tensor's name and bytes, in order (declared bytes for a set not
    /// read yet), without reading anything.
    pub(crate) fn sizes(&self) -> Vec<(String, u64)> {
        let lazy = self.lazy.lock();
        self.tensors
            .iter()
            .enumerate()
            .map(|(i, (n, t))| {
                let bytes = match &*lazy {
                    Lazy::Pending(shapes) => {
                        shapes[i].iter().product::<i64>() as u64 * t.kind().elt_size_in_bytes() as u64
                    }
                    _ if t.defined() => (t.numel() * t.kind().elt_size_in_bytes()) as u64,
                    _ => 0,
                };
                (n.clone(), bytes)
            })
            .collect()
    }

    /// For the engine: when the set was opened from a file and not read yet,
    /// marks it managed (it will not read itself any more) and returns each
    /// tensor's name, handle, kind and shape as declared by the file.
    pub(crate) fn take_declared(&self) -> Option<Vec<(crate::tier::spill::Declared, Tensor)>> {
        let mut lazy = self.lazy.lock();
        let Lazy::Pending(shapes) = &*lazy else { return None };
        let declared = self
            .tensors
            .iter()
            .zip(shapes)
            .map(|((n, t), shape)| ((n.clone(), t.kind(), shape.clone()), t.shallow_clone()))
            .collect();
        *lazy = Lazy::Managed;
        Some(declared)
    }
}

// SAFETY: `Tensor` is `Send` but not `Sync` because some of its `&self` methods
// mutate. A `TensorSet` never hands out `&Tensor`: `get` returns an owned
// shallow clone (an atomic reference-count increment in libtorch, safe from any
// thread), exactly what any thread may already do with a `Send` tensor.
unsafe impl Sync for TensorSet {}

impl ResourceUser for TensorSet {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.loaded();
        self.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

/// Where a model's tensors were found and what they weigh.
pub(crate) struct Inventory {
    /// Tensors grouped by shared memory (exact aliases, or views whose bytes
    /// overlap in one storage): each group moves as one region.
    pub groups: Vec<Group>,
    /// Bytes the model occupies: each group once.
    pub bytes: u64,
    /// The device every tensor is on.
    pub device: Device,
}

/// Tensors that share memory, moved as one region of one storage.
///
/// In the common case every member has the same layout (one tensor, or exact
/// aliases: same data, shape, strides and dtype): `shape` is that tensor's
/// shape and [`Group::current`] is the first member. When members are
/// different views whose bytes overlap (a weight and a narrow of it, a
/// transpose, ...), the group is the region of the storage from the lowest
/// byte any member reaches to the highest: `shape` is a contiguous shape of
/// that region (a member's shape when one member covers it contiguously, else
/// `[elements]`), [`Group::current`] is a tensor over the region, and
/// [`Group::set_data`] re-creates every member as a view of the new region, so
/// the members still share memory after a move.
pub(crate) struct Group {
    /// Name under which the group is stored on disk (its first member's name).
    pub key: String,
    /// Every member's name, `key` first.
    pub names: Vec<String>,
    /// Handles on the user's tensors.
    pub members: Vec<Tensor>,
    /// Bytes of one copy (of the region).
    pub bytes: u64,
    /// The dtype of every member.
    pub kind: Kind,
    /// Shape of [`Group::current`], and of the tensor [`Group::set_data`] expects.
    pub shape: Vec<i64>,
    /// For views that overlap without being aliases: the region and each
    /// member's layout in it. `None` in the common case.
    region: Option<Region>,
}

/// The region of a group of overlapping views, and where each member lies in it.
struct Region {
    /// A tensor over the whole region, of the group's shape, contiguous.
    tensor: Tensor,
    /// Each member's layout relative to the region's first element, in member order.
    layouts: Vec<Layout>,
}

/// A member's sizes, strides and storage offset relative to its region.
struct Layout {
    sizes: Vec<i64>,
    strides: Vec<i64>,
    offset: i64,
}

impl Group {
    /// The tensor holding the group's bytes, of shape `shape`: the first
    /// member, or the region tensor for overlapping views.
    pub fn current(&self) -> &Tensor {
        match &self.region {
            Some(r) => &r.tensor,
            None => &self.members[0],
        }
    }

    /// Points every member at `data` (no copy). `data` is a contiguous tensor
    /// of the group's `shape` and `kind` (it may be a view into a larger
    /// buffer), or an empty placeholder (no elements) while the weights are
    /// elsewhere; for overlapping views each member becomes its own view of
    /// `data`, so they keep sharing memory.
    pub fn set_data(&mut self, data: &Tensor) {
        match &mut self.region {
            Some(r) if data.numel() > 0 => {
                debug_assert!(data.is_contiguous() && data.size() == self.shape && data.kind() == self.kind);
                let base = storage_offset(data);
                for (m, l) in self.members.iter_mut().zip(&r.layouts) {
                    m.set_data(&data.as_strided(l.sizes.as_slice(), l.strides.as_slice(), base + l.offset));
                }
                // `set_data` keeps the region tensor's version counter (see `group`).
                r.tensor.set_data(data);
            }
            region => {
                for m in &mut self.members {
                    m.set_data(data);
                }
                if let Some(r) = region {
                    r.tensor.set_data(data);
                }
            }
        }
    }

    /// A counter that grows whenever any member (or the region tensor) is
    /// written in place: the sum of their version counters. Compare it with a
    /// value taken earlier to tell whether the group was modified.
    pub fn version(&self) -> i64 {
        let members: i64 = self.members.iter().map(Tensor::internal_version).sum();
        members + self.region.as_ref().map_or(0, |r| r.tensor.internal_version())
    }
}

/// Bytes of a tensor's elements.
pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Address of the first byte of a non-empty tensor's storage (its data
/// pointer less its storage offset).
fn storage_base(t: &Tensor) -> usize {
    tch::no_grad(|| t.detach().as_strided([1], [1], 0).data_ptr() as usize)
}

/// A non-empty tensor's storage offset, in elements.
fn storage_offset(t: &Tensor) -> i64 {
    let elt = t.kind().elt_size_in_bytes();
    ((t.data_ptr() as usize - storage_base(t)) / elt) as i64
}

/// Elements from a tensor's first element to one past its last, in storage
/// order (strides are never negative in libtorch).
fn extent(sizes: &[i64], strides: &[i64]) -> i64 {
    1 + sizes.iter().zip(strides).map(|(&n, &s)| (n - 1) * s).sum::<i64>()
}

/// Contiguous strides for `shape`.
fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

/// Why the spill format cannot store a tensor, if it cannot.
fn unstorable(name: &str, t: &Tensor) -> Option<String> {
    if name == "__metadata__" {
        return Some("the name `__metadata__` is reserved by the safetensors format sire spills to".into());
    }
    if t.is_sparse() || t.is_mkldnn() {
        return Some(format!("tensor `{name}` is not a dense tensor, which sire cannot move or spill"));
    }
    let kind = t.kind();
    crate::tier::spill::kind_to_dtype(kind).err().map(|_| {
        format!(
            "tensor `{name}` is {kind:?}, a dtype the spill format (safetensors) cannot store \
             (supported: Float, Double, Half, BFloat16, Int8, Uint8, Int16, Int, Int64, Bool)"
        )
    })
}

/// A tensor of the model as found at registration.
struct Found {
    name: String,
    tensor: Tensor,
    /// `(device, storage base)`: equal for tensors of one storage.
    storage: Option<(Device, usize)>,
    /// Storage offset in elements.
    offset: i64,
    /// Bytes of the storage it reaches: `[start, end)` from the storage base.
    span: (usize, usize),
}

/// Groups tensors that share memory, checks that everything is on one device
/// and can be spilled, and sizes the model.
pub(crate) fn inventory(model: &str, tensors: Vec<(String, Tensor)>) -> Result<Inventory> {
    let invalid = |reason: String| Error::InvalidOptions { model: model.into(), reason };
    let mut seen_names: HashMap<String, ()> = HashMap::new();
    let mut devices: Vec<(String, Device)> = Vec::new();
    let mut found: Vec<Found> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if seen_names.insert(name.clone(), ()).is_some() {
            return Err(invalid(format!("two tensors are both named `{name}`")));
        }
        if let Some(why) = unstorable(&name, &t) {
            return Err(invalid(why));
        }
        devices.push((name.clone(), t.device()));
        let ptr = if t.numel() > 0 { t.data_ptr() as usize } else { 0 };
        let (storage, offset, span) = if ptr != 0 {
            let elt = t.kind().elt_size_in_bytes();
            let base = storage_base(&t);
            let offset = ((ptr - base) / elt) as i64;
            let end = offset + extent(&t.size(), &t.stride());
            (Some((t.device(), base)), offset, (offset as usize * elt, end as usize * elt))
        } else {
            (None, 0, (0, 0))
        };
        found.push(Found { name, tensor: t, storage, offset, span });
    }
    let device = one_device(model, &devices)?;

    // Connected components of tensors whose bytes overlap in one storage.
    let mut component: Vec<usize> = (0..found.len()).collect();
    let mut by_storage: HashMap<(Device, usize), Vec<usize>> = HashMap::new();
    for (i, f) in found.iter().enumerate() {
        if let Some(s) = f.storage {
            by_storage.entry(s).or_default().push(i);
        }
    }
    for mut idx in by_storage.into_values() {
        idx.sort_by_key(|&i| found[i].span.0);
        let (mut head, mut end) = (idx[0], found[idx[0]].span.1);
        for &i in &idx[1..] {
            if found[i].span.0 < end {
                component[i] = head;
                end = end.max(found[i].span.1);
            } else {
                (head, end) = (i, found[i].span.1);
            }
        }
    }
    // Each component, in the order of its first member; members in input order.
    let mut slot: HashMap<usize, usize> = HashMap::new();
    let mut parts: Vec<Vec<Found>> = Vec::new();
    let heads: Vec<usize> = (0..found.len())
        .map(|i| {
            let mut h = component[i];
            while component[h] != h {
                h = component[h];
            }
            h
        })
        .collect();
    for (f, h) in found.into_iter().zip(heads) {
        let at = *slot.entry(h).or_insert_with(|| {
            parts.push(Vec::new());
            parts.len() - 1
        });
        parts[at].push(f);
    }
    let groups = parts.into_iter().map(|p| group(model, p)).collect::<Result<Vec<_>>>()?;
    let bytes = groups.iter().map(|g| g.bytes).sum();
    Ok(Inventory { groups, bytes, device })
}

/// One group from tensors whose bytes overlap (a component of `inventory`).
fn group(model: &str, part: Vec<Found>) -> Result<Group> {
    let first = &part[0];
    let (kind, sizes, strides) = (first.tensor.kind(), first.tensor.size(), first.tensor.stride());
    if let Some(other) = part.iter().find(|f| f.tensor.kind() != kind) {
        return Err(Error::InvalidOptions {
            model: model.into(),
            reason: format!(
                "tensors `{}` ({kind:?}) and `{}` ({:?}) share memory with different dtypes; \
                 sire moves shared memory as one region of one dtype",
                first.name,
                other.name,
                other.tensor.kind()
            ),
        });
    }
    let key = first.name.clone();
    let aliases = part
        .iter()
        .all(|f| f.offset == first.offset && f.tensor.size() == sizes && f.tensor.stride() == strides);
    if aliases {
        let bytes = tensor_bytes(&first.tensor);
        let (names, members) = part.into_iter().map(|f| (f.name, f.tensor)).unzip();
        return Ok(Group { key, names, members, bytes, kind, shape: sizes, region: None });
    }
    let elt = kind.elt_size_in_bytes();
    let start = part.iter().map(|f| f.offset).min().unwrap_or(0);
    let end = part.iter().map(|f| (f.span.1 / elt) as i64).max().unwrap_or(0);
    let len = end - start;
    let covers = |f: &&Found| f.offset == start && f.tensor.numel() as i64 == len && f.tensor.is_contiguous();
    let shape = part.iter().find(covers).map_or_else(|| vec![len], |f| f.tensor.size());
    // The region tensor is a `detach` of the first member (which shares its
    // version counter, and with it the counter of every member that is a view
    // of the same base) given the region's layout by `set_data` (which keeps
    // that counter and, unlike a view, holds no reference to the old storage).
    // So a write through such a member shows in `current().internal_version()`,
    // while `set_data` itself (a move, a patch buffer) does not.
    let mut tensor = first.tensor.detach();
    let strides = contiguous_strides(&shape);
    tensor.set_data(&first.tensor.detach().as_strided(shape.as_slice(), strides.as_slice(), start));
    let layouts = part
        .iter()
        .map(|f| Layout { sizes: f.tensor.size(), strides: f.tensor.stride(), offset: f.offset - start })
        .collect();
    let (names, members) = part.into_iter().map(|f| (f.name, f.tensor)).unzip();
    Ok(Group {
        key,
        names,
        members,
        bytes: (len as usize * elt) as u64,
        kind,
        shape,
        region: Some(Region { tensor, layouts }),
    })
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
pub(crate) fn source_of(user: &dyn std::any::Any) -> Option<crate::tier::spill::Source> {
    user.downcast_ref::<TensorSet>().and_then(|s| s.source.clone())
}

/// The inventory of a model known from a file's header alone (a
/// [`TensorSet`] opened with `from_safetensors` and not read yet), without
/// reading anything: each tensor is its own group, of the declared kind and
/// shape, its handle an empty placeholder until the first load. `None` for
/// any other model (its tensors are listed as usual).
pub(crate) fn declared_inventory(user: &dyn std::any::Any) -> Option<Inventory> {
    let declared = user.downcast_ref::<TensorSet>()?.take_declared()?;
    let groups: Vec<Group> = declared
        .into_iter()
        .map(|((name, kind, shape), handle)| Group {
            key: name.clone(),
            names: vec![name],
            members: vec![handle],
            bytes: shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64,
            kind,
            shape,
            region: None,
        })
        .collect();
    let bytes = groups.iter().map(|g| g.bytes).sum();
    Some(Inventory { groups, bytes, device: Device::Cpu })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(groups: &[&[&str]]) -> Vec<Vec<String>> {
        groups.iter().map(|g| g.iter().map(|n| n.to_string()).collect()).collect()
    }

    #[test]
    fn split_keeps_a_pending_set_pending_over_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let ts: Vec<(String, Tensor)> = (0..3)
            .map(|i| (format!("t{i}"), Tensor::full([4 + i], i as f64, tch::kind::FLOAT_CPU)))
            .collect();
        Tensor::write_safetensors(&ts, &path).unwrap();
        let set = TensorSet::from_safetensors(&path).unwrap();
        assert_eq!(set.sizes(), [("t0".to_string(), 16), ("t1".to_string(), 20), ("t2".to_string(), 24)]);
        let parts = set.split("m", names(&[&["t2", "t0"], &["t1"]])).unwrap();
        assert_eq!(parts[0].names().collect::<Vec<_>>(), ["t0", "t2"], "file order within a part");
        for p in &parts {
            assert!(matches!(*p.lazy.lock(), Lazy::Pending(_)), "nothing read");
            assert_eq!(p.source.as_ref().unwrap().path(), std::fs::canonicalize(&path).unwrap());
        }
        assert_eq!(parts[0].sizes()[1], ("t2".to_string(), 24));
        // Each part reads its own tensors when used.
        assert!(parts[1].get("t1").unwrap().equal(&ts[1].1));
        assert!(parts[0].get("t2").unwrap().equal(&ts[2].1));
    }

    #[test]
    fn split_of_a_set_in_memory_moves_handles_and_refuses_bad_groups() {
        let a = Tensor::ones([4], tch::kind::FLOAT_CPU);
        let set = || {
            TensorSet::new([
                ("a", a.shallow_clone()),
                ("b", Tensor::zeros([2], tch::kind::FLOAT_CPU)),
                ("c", Tensor::zeros([3], tch::kind::FLOAT_CPU)),
            ])
            .unwrap()
        };
        let parts = set().split("m", names(&[&["a", "c"], &["b"]])).unwrap();
        assert_eq!(parts[0].get("a").unwrap().data_ptr(), a.data_ptr(), "no copy");
        let refused = |groups: &[&[&str]], want: &str| {
            let e = set().split("m", names(groups)).unwrap_err();
            assert!(matches!(e, Error::InvalidOptions { .. }) && e.to_string().contains(want), "{e}");
        };
        refused(&[&["a", "b", "c", "x"]], "`x`");
        refused(&[&["a", "b"], &["b", "c"]], "more than one part: `b`");
        refused(&[&["a"], &["b"]], "in no part: `c`");
        refused(&[&["a", "b", "c"], &[]], "part 1 has no tensor");
        let tied = TensorSet::new([("w", a.shallow_clone()), ("tied", a.narrow(0, 1, 2))]).unwrap();
        let e = tied.split("m", names(&[&["w"], &["tied"]])).unwrap_err();
        assert!(e.to_string().contains("share memory"), "{e}");
    }

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

    fn inv(tensors: Vec<(&str, Tensor)>) -> Result<Inventory> {
        inventory("m", tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect())
    }

    fn shares_memory(a: &Tensor, b: &Tensor) -> bool {
        storage_base(a) == storage_base(b)
    }

    /// A contiguous float tensor on the CPU, standing for what the engine
    /// hands `set_data`: a view into a larger buffer at a nonzero offset.
    fn region_in_buffer(shape: &[i64], fill: f64) -> (Tensor, Tensor) {
        let n: i64 = shape.iter().product();
        let buffer = Tensor::full([n + 5], fill, tch::kind::FLOAT_CPU);
        let data = buffer.narrow(0, 5, n).view(shape);
        (buffer, data)
    }

    #[test]
    fn a_view_and_its_base_count_once_and_keep_sharing_after_a_move() {
        let w = Tensor::arange(16, tch::kind::FLOAT_CPU).view([4, 4]);
        let top = w.narrow(0, 0, 2);
        let mut inv = inv(vec![("w", w.shallow_clone()), ("top", top.shallow_clone())]).unwrap();
        assert_eq!((inv.groups.len(), inv.bytes), (1, 64));
        let g = &mut inv.groups[0];
        assert_eq!((g.key.as_str(), g.names.clone()), ("w", vec!["w".to_string(), "top".to_string()]));
        assert_eq!((g.shape.clone(), g.kind), (vec![4, 4], Kind::Float), "`w` covers the region");
        assert!(g.current().equal(&w));
        let (buffer, data) = region_in_buffer(&g.shape, 1.0);
        let (v0, c0) = (g.version(), g.current().internal_version());
        g.set_data(&data);
        assert_eq!((g.version(), g.current().internal_version()), (v0, c0), "a move is not a write");
        assert!(shares_memory(&w, &buffer) && shares_memory(&top, &buffer));
        assert!(g.current().equal(&data) && shares_memory(g.current(), &buffer));
        assert_eq!((w.size(), top.size(), top.stride()), (vec![4, 4], vec![2, 4], vec![4, 1]));
        let _ = top.shallow_clone().fill_(7.0);
        assert_eq!(w.sum(Kind::Float).double_value(&[]), 2.0 * 4.0 * 7.0 + 8.0);
        assert!(g.version() > v0, "a write through a member shows in the version");
        assert!(g.current().internal_version() > c0, "and in the region's, as they are views of one base");
    }

    #[test]
    fn two_overlapping_narrows_form_one_region() {
        let w = Tensor::arange(20, tch::kind::FLOAT_CPU);
        let a = w.narrow(0, 2, 8); // elements 2..10
        let b = w.narrow(0, 6, 10); // elements 6..16
        let c = w.narrow(0, 17, 2); // elements 17..19: no overlap, a group of its own
        let mut inv = inv(vec![("a", a.shallow_clone()), ("b", b.shallow_clone()), ("c", c)]).unwrap();
        assert_eq!(inv.groups.len(), 2);
        assert_eq!(inv.bytes, (14 + 2) * 4);
        let g = &mut inv.groups[0];
        assert_eq!((g.names.clone(), g.shape.clone()), (vec!["a".to_string(), "b".to_string()], vec![14]));
        assert_eq!(Vec::<f32>::try_from(g.current()).unwrap(), (2..16).map(|i| i as f32).collect::<Vec<_>>());
        let (buffer, mut data) = region_in_buffer(&g.shape, 0.0);
        data.copy_(&Tensor::arange(14, tch::kind::FLOAT_CPU));
        g.set_data(&data);
        assert!(shares_memory(&a, &buffer) && shares_memory(&b, &buffer));
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), (0..8).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), (4..14).map(|i| i as f32).collect::<Vec<_>>());
        let _ = b.shallow_clone().fill_(-1.0);
        assert_eq!(a.double_value(&[7]), -1.0, "the overlap is still shared");
        assert_eq!(a.double_value(&[3]), 3.0);
        // Spilled: every member points at an empty placeholder; loaded again: views again.
        g.set_data(&Tensor::empty([0], tch::kind::FLOAT_CPU));
        assert_eq!((a.numel(), b.numel(), g.current().numel()), (0, 0, 0));
        let (buffer, data) = region_in_buffer(&g.shape, 3.0);
        g.set_data(&data);
        assert_eq!((a.size(), b.size()), (vec![8], vec![10]));
        assert!(
            shares_memory(&a, &buffer) && shares_memory(&b, &buffer) && shares_memory(g.current(), &buffer)
        );
        let _ = a.shallow_clone().fill_(4.0);
        assert_eq!(b.sum(Kind::Float).double_value(&[]), 4.0 * 4.0 + 3.0 * 6.0);
    }

    #[test]
    fn a_strided_view_keeps_its_strides_through_a_move() {
        let w = Tensor::arange(12, tch::kind::DOUBLE_CPU).view([3, 4]);
        let cols = w.slice(1, 1, 4, 2); // columns 1 and 3: strides [4, 2]
        let wt = w.tr(); // same bytes, another layout
        let mut inv =
            inv(vec![("cols", cols.shallow_clone()), ("w", w.shallow_clone()), ("wt", wt.shallow_clone())])
                .unwrap();
        assert_eq!((inv.groups.len(), inv.bytes), (1, 12 * 8));
        let g = &mut inv.groups[0];
        assert_eq!((g.key.as_str(), g.shape.clone(), g.kind), ("cols", vec![3, 4], Kind::Double));
        let data = Tensor::arange(12, tch::kind::DOUBLE_CPU).view([3, 4]) * 10;
        g.set_data(&data);
        assert_eq!((cols.size(), cols.stride(), wt.stride()), (vec![3, 2], vec![4, 2], vec![1, 4]));
        assert!(shares_memory(&cols, &data) && shares_memory(&w, &data) && shares_memory(&wt, &data));
        assert!(cols.equal(&(Tensor::arange(12, tch::kind::DOUBLE_CPU).view([3, 4]).slice(1, 1, 4, 2) * 10)));
        let _ = wt.shallow_clone().fill_(1.0);
        assert_eq!(cols.sum(Kind::Double).double_value(&[]), 6.0);
    }

    #[test]
    fn a_region_no_member_covers_has_a_flat_shape() {
        let w = Tensor::arange(10, tch::kind::FLOAT_CPU);
        let a = w.narrow(0, 0, 6).view([2, 3]);
        let b = w.narrow(0, 4, 6);
        let mut inv = inv(vec![("a", a.shallow_clone()), ("b", b.shallow_clone())]).unwrap();
        let g = &mut inv.groups[0];
        assert_eq!((g.shape.clone(), g.bytes), (vec![10], 40));
        let (buffer, data) = region_in_buffer(&[10], 2.0);
        g.set_data(&data);
        assert!(shares_memory(&a, &buffer) && shares_memory(&b, &buffer));
        assert_eq!(a.size(), vec![2, 3]);
    }

    #[test]
    fn exact_aliases_stay_one_simple_group() {
        let w = Tensor::ones([4, 4], tch::kind::FLOAT_CPU);
        let tied = w.shallow_clone();
        let same = w.view([4, 4]); // another tensor object, same layout
        let mut inv =
            inv(vec![("w", w.shallow_clone()), ("tied", tied.shallow_clone()), ("same", same)]).unwrap();
        assert_eq!((inv.groups.len(), inv.bytes), (1, 64));
        let g = &mut inv.groups[0];
        assert!(g.region.is_none());
        assert_eq!((g.shape.clone(), g.members.len()), (vec![4, 4], 3));
        assert_eq!(g.current().data_ptr(), w.data_ptr(), "current() is the first member");
        let (_buffer, data) = region_in_buffer(&[4, 4], 5.0);
        g.set_data(&data);
        assert!(g.members.iter().all(|m| m.data_ptr() == data.data_ptr()));
        assert_eq!(tied.sum(Kind::Float).double_value(&[]), 80.0);
        // A lone non-contiguous tensor is simple too (as before: it moves as itself).
        let inv =
            inventory("m", vec![("t".into(), Tensor::ones([2, 3], tch::kind::FLOAT_CPU).tr())]).unwrap();
        assert!(inv.groups[0].region.is_none());
        assert_eq!((inv.groups[0].shape.clone(), inv.bytes), (vec![3, 2], 24));
    }

    #[test]
    fn overlapping_tensors_of_different_dtypes_are_refused() {
        let raw = Tensor::zeros([16], (Kind::Uint8, Device::Cpu));
        let f = raw.view_dtype(Kind::Float);
        let err = inv(vec![("raw", raw.shallow_clone()), ("f", f)]).err().expect("refused");
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidOptions { .. }), "{msg}");
        assert!(msg.contains("`raw`") && msg.contains("`f`") && msg.contains("Float"), "{msg}");
        // Disjoint tensors of one buffer (a packed checkpoint) are separate groups.
        let a = raw.narrow(0, 0, 8).view_dtype(Kind::Float);
        let b = raw.narrow(0, 8, 8).view_dtype(Kind::Int64);
        let inv = inv(vec![("a", a), ("b", b)]).unwrap();
        assert_eq!((inv.groups.len(), inv.bytes), (2, 16));
    }

    #[test]
    fn tensors_the_spill_format_cannot_store_are_refused() {
        let cases = [
            ("z", Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu)), "ComplexFloat"),
            ("__metadata__", Tensor::zeros([2], tch::kind::FLOAT_CPU), "reserved"),
        ];
        for (name, t, why) in cases {
            let ok = Tensor::zeros([2], tch::kind::FLOAT_CPU);
            match inventory("net", vec![("ok".into(), ok), (name.into(), t)]) {
                Err(e @ Error::InvalidOptions { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains("`net`") && msg.contains(name) && msg.contains(why), "{msg}");
                }
                Err(e) => panic!("expected InvalidOptions, got {e}"),
                Ok(_) => panic!("`{name}` was accepted"),
            }
        }
    }
}
