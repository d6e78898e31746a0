//! Models larger than the budget (issue 15): a model registered in ordered
//! parts, each an ordinary managed model, streamed part by part with the next
//! part prefetched while the current one computes.
//!
//! Each part is a [`Managed<TensorSet>`] named `<model>/<part>`, so eviction,
//! budgets, the disk tier, mapping, statistics and events work per part with
//! no change to the engine. What this module adds is the order: a [`Stream`]
//! (one pass over the model, `stream.rs`) takes each part just in time, releases the one
//! before, prefetches the one expected next, learns the execution order from
//! the passes it sees, and orders the recency of the model's idle parts so
//! that, between passes, the parts that stay resident are the ones the next
//! pass needs first. Here: registering a model in parts ([`Split`],
//! [`Parted`]) and its commits; `run.rs`: self-streaming modules;
//! `script.rs`: TorchScript by submodule; `worker.rs`: the prefetch thread.

mod run;
mod script;
mod stream;
mod worker;

use std::collections::HashMap;

use parking_lot::Mutex;

pub use run::{hook_parts, HookedParts, Sequential};
pub use script::ScriptParts;
pub use stream::Stream;

use crate::{
    Commit, CommitId, CommitInfo, Error, ManageOptions, Managed, ResourcePoolManagement, Result, TensorSet,
};
use stream::is_resident;
use worker::Worker;

/// How [`ResourcePoolManagement::manage_parts`] cuts a model into parts.
///
/// Parts are listed in order; the order only seeds the first pass's
/// prefetching (later passes follow the order they observed).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Split {
    /// One part per prefix, in the order given: each tensor goes to the
    /// longest prefix its name starts with (plain string prefixes: end one
    /// with `.` to match whole components, `"layers.1."` does not take
    /// `layers.10.w`). A tensor no prefix matches, a prefix that matches no
    /// tensor, or a prefix given twice is [`Error::InvalidOptions`]. Parts
    /// are named after their prefix (trailing `.` and `/` removed; `part<i>`
    /// if that leaves nothing or a name taken).
    Prefixes(Vec<String>),
    /// One part per top-level submodule: tensors grouped by the first
    /// component of their dotted name (`encoder.layer.0.w` → `encoder`),
    /// parts in the order their first tensor appears (file order for a set
    /// from [`TensorSet::from_safetensors`]).
    TopLevel,
    /// Consecutive tensors (in file or declaration order) up to a byte
    /// target: a new part starts when adding the next tensor would pass the
    /// target (a tensor larger than the target is a part of its own). Parts
    /// are named `part0`, `part1`…
    Bytes(u64),
}

/// A model registered in ordered parts, see [`ResourcePoolManagement::manage_parts`].
///
/// Each part is a managed [`TensorSet`] of its own (named `<model>/<part>`),
/// moved, evicted, spilled and counted like any model; [`Parted::stream`]
/// runs a pass over the parts. Dropping the `Parted` unregisters them.
pub struct Parted {
    name: String,
    names: Vec<String>,
    parts: Vec<Managed<TensorSet>>,
    /// Which part holds each tensor.
    owner: HashMap<String, usize>,
    /// The execution order last observed (part indices, repeats kept);
    /// empty before the first pass.
    order: Mutex<Vec<usize>>,
    /// The commits pushed through [`Parted::commit`], oldest first.
    commits: Mutex<Vec<PartedCommit>>,
    /// Prefetch threads of ended passes, for the next ones.
    workers: Mutex<Vec<Worker>>,
    pools: ResourcePoolManagement,
}

/// A commit of the whole model: one commit on each part it changes.
struct PartedCommit {
    info: CommitInfo,
    /// (part, the id of its share of the commit).
    shares: Vec<(usize, CommitId)>,
}

impl std::fmt::Debug for Parted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parted")
            .field("name", &self.name)
            .field("parts", &self.names)
            .field("bytes", &self.size_bytes())
            .finish_non_exhaustive()
    }
}

impl ResourcePoolManagement {
    /// Registers a model in ordered parts, cut as `split` says: each part is
    /// a managed model of its own, named `<model>/<part>` (the model's name
    /// is [`ManageOptions::name`], else `Parted`, `Parted#2`…), with the
    /// other options applied to every part ([`ManageOptions::reserve`] is
    /// reserved per resident part). Nothing is read: a set from
    /// [`TensorSet::from_safetensors`] gives parts over the same file, read
    /// when a pass needs them; a set in memory gives parts that hold its
    /// tensors (no copy).
    ///
    /// The whole model may be larger than the budget: only a part must fit
    /// (a larger part is [`Error::TooLarge`] when a pass takes it). Between
    /// passes, as many parts stay resident as the budget allows.
    ///
    /// ```
    /// # fn main() -> sire::Result<()> {
    /// use sire::{ManageOptions, Split, TensorSet};
    /// use tch::{Kind, Tensor};
    /// # let dir = tempfile::tempdir()?;
    /// // Three layers of 64 KiB under a 160 KiB host budget: the model does not fit.
    /// let pools = sire::ResourcePoolManagement::builder().cuda(false).env(false)
    ///     .cpu_budget(160 << 10).spill_dir(dir.path()).build()?;
    /// let layers: Vec<(String, Tensor)> = (0..3)
    ///     .map(|i| (format!("layer{i}.w"), Tensor::eye(128, (Kind::Float, tch::Device::Cpu))))
    ///     .collect();
    /// let model = pools.manage_parts(TensorSet::new(layers)?, Split::TopLevel, ManageOptions::new().name("mlp"))?;
    /// assert_eq!(model.part_names(), ["layer0", "layer1", "layer2"]);
    /// let mut x = Tensor::ones([128, 1], (Kind::Float, tch::Device::Cpu));
    /// let mut pass = model.stream();
    /// for i in 0..model.len() {
    ///     let part = pass.part(i)?; // part i is resident while `pass` holds it
    ///     x = part.get(&format!("layer{i}.w")).unwrap().mm(&x);
    /// }
    /// drop(pass);
    /// assert_eq!(x.sum(Kind::Float).double_value(&[]), 128.0);
    /// # Ok(()) }
    /// ```
    pub fn manage_parts(&self, set: TensorSet, split: Split, opts: ManageOptions) -> Result<Parted> {
        let sizes = set.sizes();
        let label = opts.name.clone().unwrap_or_else(|| "Parted".to_string());
        let (names, groups) = cut(&label, &sizes, &split)?;
        let name = match &opts.name {
            Some(n) => n.clone(),
            None => self.free_parted_name(),
        };
        let owner: HashMap<String, usize> =
            groups.iter().enumerate().flat_map(|(p, g)| g.iter().map(move |n| (n.clone(), p))).collect();
        let sets = set.split(&name, groups)?;
        let parts = sets
            .into_iter()
            .zip(&names)
            .map(|(s, part)| self.manage_with(s, opts.clone().name(format!("{name}/{part}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Parted {
            name,
            names,
            parts,
            owner,
            order: Mutex::new(Vec::new()),
            commits: Mutex::new(Vec::new()),
            workers: Mutex::new(Vec::new()),
            pools: self.clone(),
        })
    }

    /// The first of `Parted`, `Parted#2`… that is no model's name and no
    /// registered model's prefix (`<name>/`).
    fn free_parted_name(&self) -> String {
        let lk = self.inner.lock();
        std::iter::once("Parted".to_string())
            .chain((2..).map(|n| format!("Parted#{n}")))
            .find(|base| {
                let prefix = format!("{base}/");
                !lk.name_taken(base) && !lk.entries().any(|e| e.core.name.starts_with(&prefix))
            })
            .expect("a free name")
    }
}

/// The part names and the tensor names of each part, as `split` cuts `sizes`
/// (each tensor's name and bytes, in order).
fn cut(model: &str, sizes: &[(String, u64)], split: &Split) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let invalid = |reason: String| Error::InvalidOptions { model: model.into(), reason };
    if sizes.is_empty() {
        return Err(invalid("a model in parts needs at least one tensor".into()));
    }
    match split {
        Split::Prefixes(prefixes) => {
            if prefixes.is_empty() {
                return Err(invalid("no prefix given".into()));
            }
            for (i, p) in prefixes.iter().enumerate() {
                if prefixes[..i].contains(p) {
                    return Err(invalid(format!("prefix `{p}` given twice")));
                }
            }
            let mut groups = vec![Vec::new(); prefixes.len()];
            let mut unmatched = Vec::new();
            for (name, _) in sizes {
                let best = prefixes
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| name.starts_with(p.as_str()))
                    .max_by_key(|(_, p)| p.len());
                match best {
                    Some((i, _)) => groups[i].push(name.clone()),
                    None => unmatched.push(format!("`{name}`")),
                }
            }
            if !unmatched.is_empty() {
                return Err(invalid(format!("no prefix matches {}", unmatched.join(", "))));
            }
            if let Some(i) = groups.iter().position(Vec::is_empty) {
                return Err(invalid(format!("prefix `{}` matches no tensor", prefixes[i])));
            }
            let mut names: Vec<String> = Vec::with_capacity(prefixes.len());
            for (i, p) in prefixes.iter().enumerate() {
                let trimmed = p.trim_end_matches(['.', '/']);
                let name = if trimmed.is_empty() || names.iter().any(|n| n == trimmed) {
                    format!("part{i}")
                } else {
                    trimmed.to_string()
                };
                names.push(name);
            }
            Ok((names, groups))
        }
        Split::TopLevel => {
            let mut names: Vec<String> = Vec::new();
            let mut groups: Vec<Vec<String>> = Vec::new();
            for (name, _) in sizes {
                let top = name.split('.').next().unwrap_or(name);
                match names.iter().position(|n| n == top) {
                    Some(i) => groups[i].push(name.clone()),
                    None => {
                        names.push(top.to_string());
                        groups.push(vec![name.clone()]);
                    }
                }
            }
            Ok((names, groups))
        }
        Split::Bytes(target) => {
            if *target == 0 {
                return Err(invalid("the byte target of a part must be positive".into()));
            }
            let mut groups: Vec<Vec<String>> = Vec::new();
            let mut bytes = 0u64;
            for (name, size) in sizes {
                match groups.last_mut() {
                    Some(g) if bytes.saturating_add(*size) <= *target => g.push(name.clone()),
                    _ => {
                        groups.push(vec![name.clone()]);
                        bytes = 0;
                    }
                }
                bytes = bytes.saturating_add(*size);
            }
            let names = (0..groups.len()).map(|i| format!("part{i}")).collect();
            Ok((names, groups))
        }
    }
}

impl Parted {
    /// The model's name (its parts are named `<name>/<part>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of parts.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Whether the model has no part (never: registration refuses it).
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The parts' names, in order (without the model's name).
    pub fn part_names(&self) -> &[String] {
        &self.names
    }

    /// The parts, each a managed model of its own (for its location, use
    /// count, statistics; take them through [`Parted::stream`]).
    pub fn parts(&self) -> &[Managed<TensorSet>] {
        &self.parts
    }

    /// The index of the part holding the tensor `name`.
    pub fn part_of(&self, name: &str) -> Option<usize> {
        self.owner.get(name).copied()
    }

    /// Bytes of the whole model (the sum of its parts).
    pub fn size_bytes(&self) -> u64 {
        self.parts.iter().map(Managed::size_bytes).sum()
    }

    /// The parts now on their runtime location (resident, in use or not).
    pub fn resident(&self) -> Vec<usize> {
        (0..self.parts.len()).filter(|&i| is_resident(&self.parts[i])).collect()
    }

    /// The execution order observed (part indices, in the order the last
    /// pass that changed it took them); empty before the first pass.
    pub fn order(&self) -> Vec<usize> {
        self.order.lock().clone()
    }

    /// The names of the model's tensors, part after part (as commits and
    /// [`Lora::to_commit`](crate::Lora::to_commit) name them).
    pub fn tensor_names(&self) -> Vec<String> {
        self.parts.iter().flat_map(Managed::tensor_names).collect()
    }

    /// Pushes a commit onto the model: each weight change goes to the part
    /// that holds its weight (one commit per part changed, taking effect
    /// when a pass next takes that part, like [`Managed::commit`]; an evicted
    /// part comes back with its patches). Returns the id of the whole
    /// commit, for [`Parted::revert`].
    ///
    /// All or nothing: a weight no part holds is [`Error::UnknownTensor`], a
    /// closure ([`Commit::closure`]) belongs to no part and is
    /// [`Error::InvalidCommit`] (commit it to one part through
    /// [`Parted::parts`]), and a part refusing its share (a shape mismatch)
    /// takes back the shares already pushed.
    ///
    /// ```
    /// # fn main() -> sire::Result<()> {
    /// use sire::{Commit, ManageOptions, Split, TensorSet};
    /// use tch::{kind::FLOAT_CPU, Tensor};
    /// # let dir = tempfile::tempdir()?;
    /// # let pools = sire::ResourcePoolManagement::builder().cuda(false).env(false)
    /// #     .cpu_budget(1 << 20).spill_dir(dir.path()).build()?;
    /// let set = TensorSet::new((0..3).map(|i| (format!("l{i}.w"), Tensor::zeros([4], FLOAT_CPU))))?;
    /// let model = pools.manage_parts(set, Split::TopLevel, ManageOptions::new())?;
    /// let both = Commit::squash([
    ///     Commit::delta("l0.w", Tensor::ones([4], FLOAT_CPU)),
    ///     Commit::delta("l2.w", Tensor::ones([4], FLOAT_CPU)),
    /// ]);
    /// let id = model.commit(both)?; // one share on `l0`, one on `l2`
    /// let sum = |model: &sire::Parted| -> sire::Result<f64> {
    ///     let mut pass = model.stream();
    ///     let mut total = 0.0;
    ///     for i in 0..3 {
    ///         total += pass.part(i)?.get(&format!("l{i}.w")).unwrap().sum(tch::Kind::Float).double_value(&[]);
    ///     }
    ///     Ok(total)
    /// };
    /// assert_eq!(sum(&model)?, 8.0);
    /// assert_eq!(model.revert(), Some(id));
    /// assert_eq!(sum(&model)?, 0.0);
    /// # Ok(()) }
    /// ```
    pub fn commit(&self, commit: Commit) -> Result<CommitId> {
        let mut stack = self.commits.lock();
        let label = commit.label().to_string();
        let targets: Vec<String> = commit.targets().map(str::to_string).collect();
        let split = commit.split_by(&self.name, |t| self.part_of(t))?;
        let mut shares: Vec<(usize, CommitId)> = Vec::with_capacity(split.len());
        for (p, c) in split {
            match self.parts[p].commit(c) {
                Ok(id) => shares.push((p, id)),
                Err(e) => {
                    for &(q, id) in shares.iter().rev() {
                        let popped = self.parts[q].revert();
                        debug_assert_eq!(popped, Some(id));
                    }
                    return Err(e);
                }
            }
        }
        let id = CommitId::fresh();
        stack.push(PartedCommit { info: CommitInfo { id, label, targets, closures: 0 }, shares });
        Ok(id)
    }

    /// Pops the newest commit pushed by [`Parted::commit`] (its share on
    /// every part) and returns its id, or `None` if there is none. Takes
    /// effect when a pass next takes each part.
    pub fn revert(&self) -> Option<CommitId> {
        let c = self.commits.lock().pop()?;
        for &(p, id) in c.shares.iter().rev() {
            // The share is the newest commit on the part unless the part's own
            // handle was committed to since; then it goes with what followed it.
            if self.parts[p].revert_to(id).is_ok() {
                self.parts[p].revert();
            }
        }
        Some(c.info.id)
    }

    /// Reverts every commit of every part: the next pass sees the base
    /// weights, bit for bit.
    pub fn revert_all(&self) {
        let mut stack = self.commits.lock();
        stack.clear();
        self.parts.iter().for_each(Managed::revert_all);
    }

    /// The commits pushed by [`Parted::commit`], oldest first.
    pub fn commits(&self) -> Vec<CommitInfo> {
        self.commits.lock().iter().map(|c| c.info.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(v: &[(&str, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(n, b)| (n.to_string(), *b)).collect()
    }

    fn groups(v: &[&[&str]]) -> Vec<Vec<String>> {
        v.iter().map(|g| g.iter().map(|n| n.to_string()).collect()).collect()
    }

    #[test]
    fn bytes_cut_consecutive_tensors_at_the_target() {
        let s = sizes(&[("a", 40), ("b", 60), ("c", 1), ("d", 250), ("e", 30)]);
        let (names, g) = cut("m", &s, &Split::Bytes(100)).unwrap();
        // a+b = 100 fits; c would pass it; d alone passes it (a part of its own).
        assert_eq!(g, groups(&[&["a", "b"], &["c"], &["d"], &["e"]]));
        assert_eq!(names, ["part0", "part1", "part2", "part3"]);
        let (_, g) = cut("m", &s, &Split::Bytes(u64::MAX)).unwrap();
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn top_level_groups_by_first_component_in_order_of_appearance() {
        let s = sizes(&[("enc.0.w", 1), ("dec.w", 1), ("enc.1.w", 1), ("head", 1)]);
        let (names, g) = cut("m", &s, &Split::TopLevel).unwrap();
        assert_eq!(names, ["enc", "dec", "head"]);
        assert_eq!(g, groups(&[&["enc.0.w", "enc.1.w"], &["dec.w"], &["head"]]));
    }

    #[test]
    fn prefixes_take_the_longest_match_and_name_parts() {
        let s = sizes(&[("layers.1.w", 1), ("layers.10.w", 1), ("embed", 1)]);
        let split = Split::Prefixes(vec!["layers.1.".into(), "layers.".into(), "".into()]);
        let (names, g) = cut("m", &s, &split).unwrap();
        assert_eq!(names, ["layers.1", "layers", "part2"]);
        assert_eq!(g, groups(&[&["layers.1.w"], &["layers.10.w"], &["embed"]]));
        let e = cut("m", &[], &Split::TopLevel).unwrap_err();
        assert!(e.to_string().contains("at least one tensor"), "{e}");
    }
}
