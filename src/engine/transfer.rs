//! Moving bytes: packing and pinning home copies, copying to and from a
//! device (streams and events), spilling to and reloading from the disk tier.
//! It works on one model's data (locked by the caller) and never sees the
//! ledger: the engine decides, this moves, the engine publishes.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::model::{ModelCore, ModelData};
use crate::error::panic_message;
use crate::stats::Counters;
use crate::tier::{cuda, spill};
use crate::user::Group;
use crate::{Error, Location, Result};

use std::sync::atomic::Ordering::Relaxed;

/// Fault-injection points (only armed by unit tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum FailAt {
    /// While copying weights toward the runtime location.
    Load,
    /// While writing a spill file.
    Spill,
    /// While copying device-written weights back to the home copy.
    CopyBack,
    /// A panic (as tch raises them) while loading weights.
    PanicInLoad,
    /// The synchronisation after a load's copies.
    Sync,
}

/// How home copies of CUDA models are allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pinning {
    /// Pageable memory (no CUDA device).
    Off,
    /// Page-locked memory, for asynchronous copies at full bandwidth.
    Cuda,
    /// Pageable memory accounted as pinned: tests of the cap without a GPU.
    #[cfg_attr(not(test), allow(dead_code))]
    Simulated,
}

/// What an eviction does to one model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EvictJob {
    /// Drop the CUDA copy (pointing the tensors back at the home copy).
    pub drop_dev: bool,
    /// Release the host copy, writing it to disk first if `write`.
    pub spill: bool,
    /// The disk copy is missing or stale: the spill writes the file.
    pub write: bool,
    /// The model leaves its runtime location (its patches are dropped first).
    pub leaves_runtime: bool,
    /// Why, for logs.
    pub cause: &'static str,
}

/// What a load must do.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadJob {
    /// Read the host copy from disk.
    pub host: bool,
    /// Copy to the runtime CUDA device.
    pub dev: bool,
    /// The home copy read from disk goes to pinned memory.
    pub pin: bool,
}

/// Device copies issued by [`Transfer::stage`], not yet visible to the model.
pub(crate) struct Staged {
    copies: Vec<Tensor>,
}

pub(crate) struct Transfer {
    pub pin: Pinning,
    /// Load CPU models from their files by mapping them (`Builder::map_files`).
    pub map_files: bool,
    #[cfg(test)]
    fail: parking_lot::Mutex<Vec<FailAt>>,
}

impl Transfer {
    pub(crate) fn new(pin: Pinning) -> Transfer {
        Transfer {
            pin,
            map_files: true,
            #[cfg(test)]
            fail: parking_lot::Mutex::new(Vec::new()),
        }
    }

    #[cfg(test)]
    pub(crate) fn fail_next(&self, at: FailAt) {
        self.fail.lock().push(at);
    }

    #[cfg(test)]
    fn failpoint(&self, at: FailAt) -> Result<()> {
        let mut f = self.fail.lock();
        if let Some(i) = f.iter().position(|x| *x == at) {
            f.remove(i);
            return Err(Error::Io(std::io::Error::other(format!("injected failure at {at:?}"))));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn failpoint(&self, _: FailAt) -> Result<()> {
        Ok(())
    }

    /// A byte buffer in host memory, pinned if asked and possible; tells
    /// whether it is pinned (pinning can fail, e.g. under a memlock limit:
    /// the buffer is then pageable and still correct).
    fn alloc_host(&self, bytes: usize, pin: bool) -> Result<(Tensor, bool)> {
        if pin && self.pin == Pinning::Cuda {
            match cuda::empty_pinned(&[bytes as i64], Kind::Uint8) {
                Ok(p) => return Ok((p, true)),
                Err(e) => tracing::warn!(bytes, error = %e, "pinning failed; the home copy stays pageable"),
            }
        }
        let t = Tensor::f_empty([host_size(bytes) as i64], (Kind::Uint8, Device::Cpu))?;
        prefer_huge_pages(&t);
        Ok((t, pin && self.pin == Pinning::Simulated))
    }

    /// Copies the model's weights into one packed host buffer (pinned if
    /// asked and possible) and points the tensors at it. Tells whether it is pinned.
    pub(crate) fn pack_home(&self, d: &mut ModelData, pin: bool) -> Result<bool> {
        let (offsets, total) = pack_layout(&d.groups);
        let (flat, pinned) = self.alloc_host(total, pin)?;
        let views = d
            .groups
            .iter()
            .zip(offsets)
            .map(|(g, o)| {
                let mut v = pack_view(&flat, o, g.kind, &g.shape, g.bytes)?;
                if g.bytes > 0 {
                    v.f_copy_(g.current())?;
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>>>()?;
        for (g, v) in d.groups.iter_mut().zip(&views) {
            g.set_data(v);
        }
        d.pack = Some(flat);
        d.disk_versions = d.groups.iter().map(Group::version).collect();
        Ok(pinned)
    }

    /// Performs an eviction's moves on a model whose data the caller locked.
    /// `dev_dropped` tells, on failure, whether the device copy is already gone
    /// (the model is then whole in host memory). When the host copy is
    /// released and `keep` allows, returns its packed buffer for reuse if it
    /// is pageable and nothing else references it.
    pub(crate) fn evict(
        &self,
        c: &ModelCore,
        d: &mut ModelData,
        job: &EvictJob,
        dev_dropped: &Cell<bool>,
        counters: &Counters,
        keep: bool,
    ) -> Result<Option<Tensor>> {
        let span = tracing::debug_span!("sire.evict", model = %c.name, bytes = c.bytes, from = %c.runtime(), to = %c.offload, cause = job.cause);
        let _evict = span.enter();
        let start = Instant::now();
        if job.leaves_runtime {
            // Back to the base weights: patches never reach the home copy or the disk.
            d.unpatch(c.patch_hooks());
        }
        if job.drop_dev && !d.homes.is_empty() {
            let span = tracing::debug_span!("sire.offload", model = %c.name, bytes = c.bytes, from = %c.runtime(), to = "cpu", cause = job.cause);
            let _g = span.enter();
            let mut copied = 0;
            // Two phases: copy back what was written on the device, then swap.
            // (Copying into a packed home in place is safe: until the swap the
            // device copy is the reference, and a failure retries the copy.)
            let mut fresh = Vec::new();
            for (i, g) in d.groups.iter().enumerate() {
                if g.version() != d.dev_versions[i] {
                    // Written on the device: the home copy must follow, after the
                    // kernels the consumer queued (a prefetch runs on a side stream).
                    self.failpoint(FailAt::CopyBack)?;
                    if let Location::Cuda(dev) = c.runtime() {
                        wait_for_consumer(dev)?;
                    }
                    if d.pack.is_some() {
                        d.homes[i].shallow_clone().f_copy_(g.current())?;
                    } else {
                        fresh.push((i, g.current().f_to_device(Device::Cpu)?));
                    }
                    copied += g.bytes;
                }
            }
            for (i, t) in fresh {
                d.homes[i] = t;
            }
            let homes = std::mem::take(&mut d.homes);
            for (g, home) in d.groups.iter_mut().zip(&homes) {
                g.set_data(home);
            }
            dev_dropped.set(true);
            counters.bytes_d2h.fetch_add(copied, Relaxed);
            tracing::debug!(copied, elapsed = ?start.elapsed(), "offloaded");
        }
        if job.spill {
            let span = tracing::debug_span!("sire.spill", model = %c.name, bytes = c.bytes, from = "cpu", to = "disk", cause = job.cause);
            let _g = span.enter();
            if job.write {
                let file = d.spill.as_mut().ok_or_else(|| Error::InvalidOptions {
                    model: c.name.clone(),
                    reason: "no spill directory".into(),
                })?;
                self.failpoint(FailAt::Spill)?;
                let named: Vec<(String, Tensor)> =
                    d.groups.iter().map(|g| (g.key.clone(), g.current().shallow_clone())).collect();
                file.write(&named).map_err(|e| in_file(e, &c.name, file.path()))?;
                d.source = None; // the spill file is now the reference copy
                counters.bytes_to_disk.fetch_add(c.bytes, Relaxed);
            }
            for g in d.groups.iter_mut() {
                let empty = Tensor::empty([0i64], (g.kind, Device::Cpu));
                g.set_data(&empty);
            }
            let pack = d.pack.take();
            d.mapped = false;
            d.disk_versions = d.groups.iter().map(Group::version).collect();
            tracing::debug!(elapsed = ?start.elapsed(), "spilled");
            counters.move_nanos.fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
            // A pinned buffer goes back to libtorch's pinned-memory cache.
            let reusable = |b: &Tensor| !crate::tier::cuda::is_pinned(b) && crate::tier::ffi::owns_storage(b);
            return Ok(pack.filter(|b| keep && reusable(b)));
        }
        counters.move_nanos.fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
        Ok(None)
    }

    /// First half of a load: reads the host copy from disk if needed (into a
    /// packed, possibly pinned buffer for a CUDA model) and issues the device
    /// copies, which the model does not see yet. Returns the copies and
    /// whether a home read from disk is pinned.
    /// `reuse` is a cached host buffer large enough for the model's packed
    /// host copy, to read into instead of allocating one.
    pub(crate) fn stage(
        &self,
        c: &ModelCore,
        d: &mut ModelData,
        load: &LoadJob,
        host_done: &Cell<bool>,
        counters: &Counters,
        reuse: Option<Tensor>,
    ) -> Result<(Option<Staged>, bool)> {
        let start = Instant::now();
        let mut pinned = false;
        if load.host {
            let span = tracing::debug_span!("sire.load", model = %c.name, bytes = c.bytes, from = "disk", to = "cpu");
            let _g = span.enter();
            let keys: Vec<String> = d.groups.iter().map(|g| g.key.clone()).collect();
            // The source file if the model is clean and has one (checked
            // unchanged), else its spill file (checked to be its own).
            let path = match (&d.source, &d.spill) {
                (Some(src), _) => src.path().to_owned(),
                (None, Some(f)) => f.path().to_owned(),
                (None, None) => unreachable!("a model off the host has a disk copy"),
            };
            let read = |d: &ModelData, dest: Option<spill::Dest<'_>>| match (&d.source, &d.spill) {
                (Some(src), _) => src.read_into(&keys, dest),
                (None, Some(f)) => f.read_into(&keys, dest),
                (None, None) => unreachable!("a model off the host has a disk copy"),
            };
            // A CPU model points into a mapping of its file where it can; else
            // the file is read straight into one packed buffer (a reused one
            // if given; pinned for a CUDA model's home if asked).
            let mapped = match (&d.source, &d.spill) {
                _ if !self.map_files || c.runtime() != Location::Cpu => None,
                (Some(src), _) => src.map(&keys).map_err(|e| in_file(e, &c.name, &path))?,
                (None, Some(f)) => f.map(&keys).map_err(|e| in_file(e, &c.name, &path))?,
                (None, None) => unreachable!("a model off the host has a disk copy"),
            };
            let was_mapped = mapped.is_some();
            let (ts, pack) = if let Some(ts) = mapped {
                (ts, None)
            } else {
                let (offsets, total) = pack_layout(&d.groups);
                let (flat, p) = match reuse {
                    Some(buf) if !load.pin && buf.numel() >= total => (buf, false),
                    _ => self.alloc_host(total, load.pin && c.runtime() != Location::Cpu)?,
                };
                pinned = p;
                let metas: Vec<(Kind, Vec<i64>, u64)> =
                    d.groups.iter().map(|g| (g.kind, g.shape.clone(), g.bytes)).collect();
                let mut dest = |slot: usize| {
                    let (kind, shape, bytes) = &metas[slot];
                    pack_view(&flat, offsets[slot], *kind, shape, *bytes)
                };
                let ts = read(d, Some(&mut dest)).map_err(|e| in_file(e, &c.name, &path))?;
                (ts, Some(flat))
            };
            self.failpoint(FailAt::Load)?;
            if self.failpoint(FailAt::PanicInLoad).is_err() {
                panic!("injected panic in a load");
            }
            check_shapes(&c.name, &path, &d.groups, &ts)?;
            d.pack = pack;
            d.mapped = was_mapped;
            for (g, t) in d.groups.iter_mut().zip(&ts) {
                g.set_data(t);
            }
            host_done.set(true);
            d.disk_versions = d.groups.iter().map(Group::version).collect();
            counters.bytes_from_disk.fetch_add(c.bytes, Relaxed);
            if was_mapped {
                counters.bytes_mapped.fetch_add(c.bytes, Relaxed);
            }
            tracing::debug!(elapsed = ?start.elapsed(), "loaded from disk");
        }
        let mut staged = None;
        if load.dev {
            let span = tracing::debug_span!("sire.load", model = %c.name, bytes = c.bytes, from = "cpu", to = %c.runtime());
            let _g = span.enter();
            self.failpoint(FailAt::Load)?;
            let copies = match &d.pack {
                // One copy of the whole packed home, then views.
                Some(flat) => {
                    crate::faults::hit(crate::faults::Point::Copy)?;
                    let dev = flat.f_to_device_(c.device(), Kind::Uint8, true, false)?;
                    record_for_consumer(&dev)?;
                    let (offsets, _) = pack_layout(&d.groups);
                    d.groups
                        .iter()
                        .zip(offsets)
                        .map(|(g, o)| pack_view(&dev, o, g.kind, &g.shape, g.bytes))
                        .collect::<Result<Vec<_>>>()?
                }
                None => d
                    .groups
                    .iter()
                    .map(|g| {
                        crate::faults::hit(crate::faults::Point::Copy)?;
                        let t = g.current().f_to_device_(c.device(), g.kind, true, false)?;
                        record_for_consumer(&t)?;
                        Ok(t)
                    })
                    .collect::<Result<Vec<_>>>()?,
            };
            staged = Some(Staged { copies });
        }
        counters.move_nanos.fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
        Ok((staged, pinned))
    }

    /// Waits for the copies issued to `device` on the current stream (only
    /// those: kernels queued on other streams keep running).
    pub(crate) fn sync(&self, device: Device) -> Result<()> {
        self.failpoint(FailAt::Sync)?;
        if let Device::Cuda(i) = device {
            let mut done = cuda::Event::new()?;
            done.record_current(i)?;
            done.synchronize()?;
        }
        Ok(())
    }

    /// Second half of a load, after the copies completed: points the weights
    /// at them, keeping the host copies as homes. If that panics (libtorch
    /// raising inside `set_data`), every group is pointed back at its home and
    /// the load fails: the model is whole in host memory.
    pub(crate) fn finish(
        &self,
        c: &ModelCore,
        d: &mut ModelData,
        staged: Staged,
        counters: &Counters,
    ) -> Result<()> {
        let homes: Vec<Tensor> = d.groups.iter().map(|g| g.current().detach()).collect();
        let swapped = unwind_safe(&c.name, || {
            for (g, t) in d.groups.iter_mut().zip(&staged.copies) {
                g.set_data(t);
            }
            Ok(())
        });
        if let Err(e) = swapped {
            for (g, home) in d.groups.iter_mut().zip(&homes) {
                g.set_data(home);
            }
            return Err(e);
        }
        d.homes = homes;
        d.dev_versions = d.groups.iter().map(Group::version).collect();
        counters.bytes_h2d.fetch_add(c.bytes, Relaxed);
        Ok(())
    }
}

/// Adds the model's name and the file to an I/O error from the disk tier.
fn in_file(e: Error, model: &str, path: &Path) -> Error {
    match e {
        Error::Io(source) => Error::File { model: model.to_string(), path: path.to_path_buf(), source },
        other => other,
    }
}

thread_local! {
    /// While a prefetch runs: the streams its caller computes on, per CUDA device.
    static CONSUMERS: RefCell<Vec<cuda::Stream>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's current stream on each of `devices`: what a prefetch
/// started from this thread must hand its buffers to.
pub(crate) fn consumer_streams(devices: &[usize]) -> Vec<cuda::Stream> {
    devices.iter().filter_map(|&i| cuda::Stream::current(i).ok()).collect()
}

/// Runs `f` as a prefetch for a caller computing on `consumers`: on every
/// device of `consumers` the current stream is a side stream, so the copies,
/// evictions and commit patches of `f` overlap the caller's kernels, wherever
/// placement puts the model; buffers allocated there are recorded on the
/// caller's stream, and copy-backs wait for the caller's queued kernels.
/// Waits for the side streams before returning.
pub(crate) fn as_prefetch<R>(consumers: Vec<cuda::Stream>, f: impl FnOnce() -> Result<R>) -> Result<R> {
    let sides: Vec<cuda::Stream> =
        consumers.iter().map(|c| cuda::Stream::new(c.device())).collect::<Result<_>>()?;
    CONSUMERS.set(consumers);
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CONSUMERS.set(Vec::new());
        }
    }
    let _reset = Reset;
    fn nest<R>(sides: &[cuda::Stream], f: &mut dyn FnMut() -> Result<R>) -> Result<R> {
        match sides.split_first() {
            None => f(),
            Some((s, rest)) => s.scope(|| {
                let r = nest(rest, f);
                // The side stream's work (copies, patches) is done before the guard is handed over.
                let mut done = cuda::Event::new()?;
                done.record(s)?;
                done.synchronize()?;
                r
            })?,
        }
    }
    let mut f = Some(f);
    nest(&sides, &mut || (f.take().expect("called once"))())
}

/// The consumer stream of a prefetch on `device`, if one runs on this thread.
fn consumer(device: usize) -> Option<cuda::Stream> {
    CONSUMERS.with_borrow(|c| c.iter().find(|s| s.device() == device).copied())
}

/// Inside a prefetch: marks `t` (allocated on a side stream) as used on the
/// caller's stream, so its memory is not reused before the caller is done.
pub(crate) fn record_for_consumer(t: &Tensor) -> Result<()> {
    if let Device::Cuda(i) = t.device() {
        if let Some(c) = consumer(i) {
            cuda::record_stream(t, &c)?;
        }
    }
    Ok(())
}

/// Inside a prefetch: makes the current (side) stream wait for the work the
/// caller has queued on the device of `t`, before writing a buffer the
/// caller's kernels may still read (a patch buffer rewritten by a rebase).
pub(crate) fn wait_for_consumer_of(t: &Tensor) -> Result<()> {
    match t.device() {
        Device::Cuda(i) => wait_for_consumer(i),
        _ => Ok(()),
    }
}

/// Inside a prefetch: makes the current (side) stream on `device` wait for the
/// work the caller has queued, before reading weights it may have written.
fn wait_for_consumer(device: usize) -> Result<()> {
    if let Some(c) = consumer(device) {
        let mut ev = cuda::Event::new()?;
        ev.record(&c)?;
        ev.wait_current(device)?;
    }
    Ok(())
}

/// Runs a move, turning a panic (tch panics where libtorch throws) into an
/// error, so the caller's undo path runs and the model is never left `moving`.
pub(crate) fn unwind_safe<R>(model: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::MovePanicked { model: model.to_string(), message: panic_message(&*p) }),
    }
}

/// The size of a pageable host buffer for `bytes`: rounded up to 2 MiB (to
/// 64 KiB under 32 MiB), so that buffers of models of about the same size can
/// be reused for one another.
fn host_size(bytes: usize) -> usize {
    bytes.next_multiple_of(if bytes >= 32 << 20 { 2 << 20 } else { 64 << 10 })
}

/// Asks for transparent huge pages for a fresh host buffer (see
/// [`ffi::prefer_huge_pages`](crate::tier::ffi::prefer_huge_pages)).
fn prefer_huge_pages(buf: &Tensor) {
    crate::tier::ffi::prefer_huge_pages(buf.data_ptr().cast(), buf.numel());
}

/// Alignment of each tensor in a packed buffer (the CUDA allocator's own).
const PACK_ALIGN: usize = 512;

/// Byte offsets of each group in a packed home copy, and the buffer's length.
pub(crate) fn pack_layout(groups: &[Group]) -> (Vec<usize>, usize) {
    let mut end = 0;
    let offsets = groups
        .iter()
        .map(|g| {
            let at = end;
            end += (g.bytes as usize).next_multiple_of(PACK_ALIGN);
            at
        })
        .collect();
    (offsets, end)
}

/// The tensor of one group inside a packed byte buffer.
fn pack_view(flat: &Tensor, offset: usize, kind: Kind, shape: &[i64], bytes: u64) -> Result<Tensor> {
    if bytes == 0 {
        return Ok(Tensor::f_empty(shape, (kind, flat.device()))?);
    }
    Ok(flat.f_narrow(0, offset as i64, bytes as i64)?.f_view_dtype(kind)?.f_view(shape)?)
}

fn check_shapes(model: &str, path: &Path, groups: &[Group], ts: &[Tensor]) -> Result<()> {
    for (g, t) in groups.iter().zip(ts) {
        if t.size() != g.shape || t.kind() != g.kind {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                detail: format!(
                    "model `{model}`: tensor `{}` is {:?} {:?} on disk but {:?} {:?} in the model",
                    g.key,
                    t.kind(),
                    t.size(),
                    g.kind,
                    g.shape
                ),
            });
        }
    }
    Ok(())
}
