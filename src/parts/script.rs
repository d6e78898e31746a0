//! TorchScript modules in parts: one part per top-level submodule, streamed
//! by calling the submodules one after the other.
//!
//! What is possible: `tch` calls only a module's own methods, so a
//! TorchScript module's `forward` needs every weight on its device at once.
//! sire's C++ shim hands out the module's direct submodules as `CModule`s of
//! their own (they compute with the parent's tensors, which sire moves in
//! place), so a module whose forward chains its submodules (an
//! `nn.Sequential`, or any model written as a sequence of blocks) streams
//! part by part. A forward with other code between the blocks streams with
//! [`hook_parts`](crate::hook_parts) and [`ScriptParts::child`]: the user
//! writes the glue, sire takes the parts.

use std::fmt;

use tch::nn::Module;
use tch::{CModule, Tensor};

use super::run::{forward_options, Forward};
use super::{Parted, Split};
use crate::{ManageOptions, ResourcePoolManagement, ResourceUser, Result, TensorSet};

/// A TorchScript module registered in parts, one per top-level submodule;
/// see [`ResourcePoolManagement::manage_script_parts`].
pub struct ScriptParts {
    model: Parted,
    /// The direct submodules in registration order, each with the part
    /// holding its tensors (`None` for a submodule without tensors).
    children: Vec<(String, CModule, Option<usize>)>,
    /// The whole module (kept alive: the submodules are handles into it).
    module: CModule,
    fwd: Forward,
}

impl fmt::Debug for ScriptParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptParts")
            .field("model", &self.model)
            .field("children", &self.children.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>())
            .field("output_device", &self.fwd.output)
            .field("grad", &self.fwd.grad)
            .finish_non_exhaustive()
    }
}

impl ResourcePoolManagement {
    /// Registers a TorchScript module in parts: its parameters and buffers
    /// grouped by top-level submodule ([`Split::TopLevel`] over their dotted
    /// names; tensors of the module itself form parts of their own, named
    /// after the tensor). The parts hold the module's own tensors (nothing is
    /// copied), moved in place, so each submodule computes wherever its part
    /// is. Options as [`manage_parts`](ResourcePoolManagement::manage_parts).
    ///
    /// [`ScriptParts::try_forward`] (and `forward`, as a [`tch::nn::Module`])
    /// calls the submodules' `forward` one after the other, each while its
    /// part is taken, the next part prefetched: equal to the module's own
    /// forward when that forward chains its submodules (an `nn.Sequential`).
    /// Weights shared between two submodules are not supported (each part
    /// would move them).
    ///
    /// [`Error::InvalidOptions`](crate::Error::InvalidOptions) if the module has no tensor.
    pub fn manage_script_parts(&self, module: CModule, opts: ManageOptions) -> Result<ScriptParts> {
        let set = TensorSet::new(module.tensors())?;
        let model = self.manage_parts(set, Split::TopLevel, opts)?;
        let children = crate::tier::ffi::module_children(&module)?
            .into_iter()
            .map(|(name, child)| {
                let part = model.names.iter().position(|n| *n == name);
                (name, child, part)
            })
            .collect();
        Ok(ScriptParts { model, children, module, fwd: Forward::default() })
    }
}

impl ScriptParts {
    /// The parted model (its parts, order, commits, residency).
    pub fn parted(&self) -> &Parted {
        &self.model
    }

    /// The whole module. Calling its methods directly needs every part on its
    /// device: take them all through a [`Stream`](crate::Stream) first.
    pub fn module(&self) -> &CModule {
        &self.module
    }

    /// The names of the direct submodules, in registration order.
    pub fn children(&self) -> Vec<&str> {
        self.children.iter().map(|(n, _, _)| n.as_str()).collect()
    }

    /// The submodule `name` and the index of the part holding its tensors
    /// (`None` for a submodule without tensors): call its methods while a
    /// stream holds that part.
    pub fn child(&self, name: &str) -> Option<(&CModule, Option<usize>)> {
        self.children.iter().find(|(n, _, _)| n == name).map(|(_, c, p)| (c, *p))
    }

    forward_options!();

    /// Calls each submodule's `forward` on the output of the one before,
    /// taking its part just in time (the activation is moved to the part's
    /// device) while the next is prefetched. Errors: taking a part (no room,
    /// a failed move), or the submodule's own (a TorchScript error). Every
    /// part is released before this returns.
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fwd.run(|| {
            let mut pass = self.model.stream();
            let mut h = xs.shallow_clone();
            for (_, child, part) in &self.children {
                if let Some(i) = part {
                    h = h.f_to_device(pass.part(*i)?.device())?;
                }
                h = child.forward_ts(&[&h])?;
            }
            Ok(h)
        })
    }
}

/// A streamed forward through the submodules.
///
/// # Panics
///
/// On any error [`ScriptParts::try_forward`] would return, with its message.
impl Module for ScriptParts {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.try_forward(xs).unwrap_or_else(|e| panic!("sire::ScriptParts::forward: {e}"))
    }
}
