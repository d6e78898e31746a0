//! Statistics: what is where, and what it cost to put it there.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::error::fmt_bytes;
use crate::Location;

/// A snapshot of a [`ResourcePoolManagement`](crate::ResourcePoolManagement),
/// taken atomically. `Display` prints it as a table.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Stats {
    /// One entry per pool.
    pub pools: Vec<PoolStats>,
    /// Guards served by a model already in place (no move).
    pub hits: u64,
    /// Guards that had to load the model first.
    pub misses: u64,
    /// Models moved out of a pool to make room or by policy.
    pub evictions: u64,
    /// Bytes copied from host memory to a CUDA device.
    pub bytes_host_to_device: u64,
    /// Bytes copied from a CUDA device to host memory (only weights written on the device).
    pub bytes_device_to_host: u64,
    /// Bytes written to spill files.
    pub bytes_to_disk: u64,
    /// Bytes read back from disk.
    pub bytes_from_disk: u64,
    /// Of [`bytes_from_disk`](Stats::bytes_from_disk), those not copied but
    /// mapped: CPU models whose weights point into their file
    /// ([`Builder::map_files`](crate::Builder::map_files)).
    pub bytes_mapped: u64,
    /// Wall time spent moving bytes, summed over all moves.
    pub time_moving: Duration,
    /// Bytes of home copies held in pinned host memory (part of the host pool's `used`).
    pub pinned: u64,
    /// The most that may be pinned ([`Builder::pinned_cap`](crate::Builder::pinned_cap)).
    pub pinned_cap: u64,
    /// Times the CUDA caching allocator's idle blocks were given back to the
    /// driver after evictions left it short of a load.
    pub cache_releases: u64,
    /// Calls in the slow path when the snapshot was taken: loading a model, or
    /// waiting for room or for a move (async waiters included).
    pub waiting: u64,
}

/// One pool in a [`Stats`] snapshot.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolStats {
    /// The pool's location.
    pub location: Location,
    /// Its budget in bytes.
    pub budget: u64,
    /// Bytes held there: by managed models (including moves under way), plus
    /// [`cached`](PoolStats::cached).
    pub used: u64,
    /// Bytes of host buffers that evicted models left behind, kept for the
    /// next load to reuse (no fresh pages to fault in and zero) and given back
    /// before anything else when room is needed. Host pool only; 0 elsewhere.
    pub cached: u64,
    /// The models there, most recently used first.
    pub residents: Vec<Resident>,
}

/// One model present in a pool.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Resident {
    /// The model's name.
    pub name: String,
    /// Bytes it holds in this pool (`used` is the sum of these and `cached`).
    pub bytes: u64,
    /// Live guards on the model.
    pub in_use: u64,
    /// Whether bytes are moving into or out of the pool right now.
    pub moving: bool,
    pub(crate) last_used: u64,
}

impl PoolStats {
    /// Whether a model with this name is present.
    pub fn holds(&self, name: &str) -> bool {
        self.residents.iter().any(|r| r.name == name)
    }
}

impl Stats {
    /// The pool at `location`, if there is one.
    pub fn pool(&self, location: Location) -> Option<&PoolStats> {
        self.pools.iter().find(|p| p.location == location)
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub bytes_h2d: AtomicU64,
    pub bytes_d2h: AtomicU64,
    pub bytes_to_disk: AtomicU64,
    pub bytes_from_disk: AtomicU64,
    pub bytes_mapped: AtomicU64,
    pub move_nanos: AtomicU64,
    /// Times the CUDA caching allocator's idle blocks were given back to the driver.
    pub cache_releases: AtomicU64,
    /// Hits of models no longer registered.
    pub retired_hits: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self, pools: Vec<PoolStats>, hits: u64, pinned: (u64, u64)) -> Stats {
        Stats {
            pools,
            hits,
            misses: self.misses.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            bytes_host_to_device: self.bytes_h2d.load(Relaxed),
            bytes_device_to_host: self.bytes_d2h.load(Relaxed),
            bytes_to_disk: self.bytes_to_disk.load(Relaxed),
            bytes_from_disk: self.bytes_from_disk.load(Relaxed),
            bytes_mapped: self.bytes_mapped.load(Relaxed),
            time_moving: Duration::from_nanos(self.move_nanos.load(Relaxed)),
            pinned: pinned.0,
            pinned_cap: pinned.1,
            cache_releases: self.cache_releases.load(Relaxed),
            waiting: 0,
        }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<8} {:>12} {:>12} {:>6}  residents (most recent first)",
            "pool", "budget", "used", "use%"
        )?;
        for p in &self.pools {
            let pct = if p.budget == 0 { 0.0 } else { 100.0 * p.used as f64 / p.budget as f64 };
            let names: Vec<String> = p
                .residents
                .iter()
                .map(|r| {
                    let mut s = r.name.clone();
                    if r.in_use > 0 {
                        s.push_str(&format!(" [{} in use]", r.in_use));
                    }
                    if r.moving {
                        s.push_str(" [moving]");
                    }
                    s
                })
                .collect();
            writeln!(
                f,
                "{:<8} {:>12} {:>12} {:>5.1}%  {}",
                p.location.to_string(),
                fmt_bytes(p.budget),
                fmt_bytes(p.used),
                pct,
                if names.is_empty() { "-".to_string() } else { names.join(", ") }
            )?;
            if p.cached > 0 {
                writeln!(
                    f,
                    "{:<8} {:>12} {:>12}         (host buffers kept for reuse)",
                    "",
                    "",
                    fmt_bytes(p.cached)
                )?;
            }
        }
        writeln!(
            f,
            "hits {}  misses {}  evictions {}  moving time {:.3?}",
            self.hits, self.misses, self.evictions, self.time_moving
        )?;
        write!(
            f,
            "bytes: host->device {}  device->host {}  to disk {}  from disk {} ({} mapped)  pinned {} of {}",
            fmt_bytes(self.bytes_host_to_device),
            fmt_bytes(self.bytes_device_to_host),
            fmt_bytes(self.bytes_to_disk),
            fmt_bytes(self.bytes_from_disk),
            fmt_bytes(self.bytes_mapped),
            fmt_bytes(self.pinned),
            fmt_bytes(self.pinned_cap)
        )
    }
}
