//! Residency events: an observer's view of every published move.

use std::fmt;
use std::sync::Arc;

use crate::Location;

/// What happened to a model; see [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// The model was registered; `to` is where its weights start (host memory,
    /// or the disk when host memory had no room).
    Registered,
    /// Weights moved toward the runtime location. `to` is the runtime location,
    /// except after a failed load to a GPU that had already read the weights
    /// back from disk: then `to` is `Cpu`.
    Loaded,
    /// The model left its runtime location (evicted, offloaded by policy or by
    /// [`Managed::offload`](crate::Managed::offload)); `to` is `Cpu` or `Disk`.
    Offloaded,
    /// A host copy that was not the runtime copy (the home of a GPU model) was
    /// written to, or dropped in favour of, its disk copy.
    Spilled,
    /// The last handle was dropped; `to` is `None`.
    Unregistered,
}

/// One published change of where a model's weights are.
///
/// Events are produced under the engine's lock, in the order the changes were
/// published, and handed to the [listener](crate::Builder::listener) in that
/// order, after the lock is released (so a listener may call back into `sire`,
/// for example [`ResourcePoolManagement::stats`](crate::ResourcePoolManagement::stats)).
/// Replaying them gives, for every model, the same location as
/// [`Managed::location`](crate::Managed::location) at the instant each change
/// was published. Only moves produce events: a guard on a resident model
/// produces none.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// The model's name.
    pub model: String,
    /// What happened.
    pub kind: EventKind,
    /// Where the weights were (`None` for [`EventKind::Registered`]).
    pub from: Option<Location>,
    /// Where the weights are now (`None` for [`EventKind::Unregistered`]).
    pub to: Option<Location>,
    /// The model's size in bytes.
    pub bytes: u64,
    /// The model's runtime location (where it executes while guarded).
    pub runtime: Location,
}

impl Event {
    /// Whether, after this event, the model is on its runtime location.
    pub fn resident(&self) -> bool {
        self.to == Some(self.runtime)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loc = |l: Option<Location>| l.map_or_else(|| "-".to_string(), |l| l.to_string());
        write!(f, "{} {:?}: {} -> {}", self.model, self.kind, loc(self.from), loc(self.to))
    }
}

/// The listener callback, shared by the builder and the engine.
#[derive(Clone)]
pub(crate) struct Listener(pub(crate) Arc<dyn Fn(&Event) + Send + Sync>);

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Listener")
    }
}
