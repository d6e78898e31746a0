//! Test-only fault injection (the `faults` cargo feature; `tests/faults.rs`).
//!
//! A few named points in the transfer and disk-tier code call [`hit`]. In a
//! normal build `hit` is an empty inline function and nothing here can be
//! armed: no environment variable, file or public API reaches it. With the
//! `faults` feature, a test arms a point with [`arm`]: the point's `after + 1`-th
//! hit then performs the [`Action`] once (fails the way the real fault would,
//! or kills the process with `SIGKILL`), and the point disarms itself.
//!
//! The switch is global to the process: a test that arms a point must not run
//! beside other tests that move weights (`tests/faults.rs` runs its tests one
//! at a time).

/// A place where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(not(feature = "faults"), allow(dead_code))] // DownloadRename without `registry`
pub enum Point {
    /// Each tensor a move copies or maps: read from the disk tier into host
    /// memory, or copied to a CUDA device. Fails as CUDA out of memory does
    /// (a libtorch error), after the earlier tensors of the move were copied.
    Copy,
    /// Each buffer written to a spill file's temporary file (the header, then
    /// each chunk of data). Fails with `ENOSPC`, as a full disk does.
    SpillWrite,
    /// A spill file written and synced, just before it is renamed into place.
    /// Fails with `EIO`.
    SpillRename,
    /// A registry download written and checked, just before it is renamed
    /// into place. Fails with `EIO`.
    DownloadRename,
}

/// What an armed point does when it is reached.
#[cfg(feature = "faults")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Returns the error the real fault would (see [`Point`]).
    Fail,
    /// Kills the process with `SIGKILL` (no destructor, no unwinding): a
    /// process killed at that point.
    Kill,
}

#[cfg(feature = "faults")]
mod armed {
    use super::{Action, Point};

    /// Armed points: `(point, hits to let through, action)`.
    pub(super) static ARMED: parking_lot::Mutex<Vec<(Point, u32, Action)>> =
        parking_lot::Mutex::new(Vec::new());
    /// Whether `ARMED` may hold a point: a hit costs one load when none is.
    pub(super) static ANY: AtomicBool = AtomicBool::new(false);
    pub(super) use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
}

/// Arms `point`: its `after + 1`-th hit from now performs `action`, once.
/// Arming a point again replaces its earlier arming.
#[cfg(feature = "faults")]
pub fn arm(point: Point, after: u32, action: Action) {
    let mut armed = armed::ARMED.lock();
    armed.retain(|(p, _, _)| *p != point);
    armed.push((point, after, action));
    armed::ANY.store(true, armed::SeqCst);
}

/// Disarms every point; tells whether one was still armed (never reached).
#[cfg(feature = "faults")]
pub fn disarm() -> bool {
    let mut armed = armed::ARMED.lock();
    let left = !armed.is_empty();
    armed.clear();
    armed::ANY.store(false, armed::SeqCst);
    left
}

/// Whether `point` is armed (not yet reached).
#[cfg(feature = "faults")]
pub fn is_armed(point: Point) -> bool {
    armed::ARMED.lock().iter().any(|(p, _, _)| *p == point)
}

/// Called at `point`: performs the armed action when its turn has come.
#[cfg(feature = "faults")]
pub(crate) fn hit(point: Point) -> crate::Result<()> {
    if !armed::ANY.load(armed::SeqCst) {
        return Ok(());
    }
    let action = {
        let mut armed = armed::ARMED.lock();
        let Some(i) = armed.iter().position(|(p, _, _)| *p == point) else { return Ok(()) };
        if armed[i].1 > 0 {
            armed[i].1 -= 1;
            return Ok(());
        }
        armed.remove(i).2
    };
    match action {
        Action::Kill => {
            // SAFETY: plain libc calls with valid arguments.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            loop {
                std::thread::park();
            }
        }
        Action::Fail => Err(match point {
            Point::Copy => tch::TchError::Torch(
                "CUDA out of memory. Tried to allocate 2.00 MiB (injected by sire::faults)".into(),
            )
            .into(),
            Point::SpillWrite => std::io::Error::from_raw_os_error(libc::ENOSPC).into(),
            Point::SpillRename | Point::DownloadRename => std::io::Error::from_raw_os_error(libc::EIO).into(),
        }),
    }
}

/// Without the `faults` feature: nothing to inject.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub(crate) fn hit(_: Point) -> crate::Result<()> {
    Ok(())
}
