//! Patches on managed models: commits (LoRA, deltas, replacements, closures),
//! the variant lock that lets several commit stacks share one base, the
//! rebase that brings a model's runtime copy to a stack, and LoRA files.
//! It reaches the engine only through the engine's narrow patch interface.

pub(crate) mod commit;
pub(crate) mod lora;
mod peft;
mod rebase;
pub(crate) mod variant;
