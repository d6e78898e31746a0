//! CUDA primitives that `tch` lacks, over the C++ shim (`csrc/sire_shim.cpp`,
//! declared in [`crate::tier::ffi::shim`]): device memory, the caching allocator's
//! statistics and cache, pinned host tensors, side streams and events.
//!
//! Every call checks the shim's status at once: "no CUDA" (no device, no
//! driver, or a libtorch without CUDA) is [`Error::NoCuda`], a device index out
//! of range is [`Error::UnknownDevice`], and a libtorch failure (a C++
//! exception, caught in the shim) is [`Error::Torch`] with the operation's name.
//! Only [`device_memory`] and [`empty_cache`] are public; the rest serves the
//! engine (prefetch on a side stream, pinned homes).
// The engine's prefetch and pinned homes use these; until then only tests do.
#![cfg_attr(not(test), allow(dead_code))]

use std::ffi::{c_char, c_int, c_void};
use std::ptr::{self, NonNull};

use tch::{Kind, Tensor};

use crate::tier::ffi::shim::{self, shim_status};
use crate::{Error, Location, Result};

/// Whether libtorch sees at least one CUDA device (through its CUDA backend,
/// the same answer as `tch::Cuda::is_available()`).
pub(crate) fn available() -> bool {
    device_count() > 0
}

/// Number of CUDA devices libtorch sees; 0 without CUDA.
pub(crate) fn device_count() -> usize {
    // SAFETY: no arguments; the shim catches everything and returns a count >= 0.
    let n = unsafe { shim::sire_cuda_device_count() };
    usize::try_from(n).unwrap_or(0)
}

/// `device` as the shim's device index, after checking that CUDA is there
/// ([`Error::NoCuda`]) and that the device exists ([`Error::UnknownDevice`]).
fn device_index(what: &'static str, device: usize) -> Result<c_int> {
    let available = device_count();
    if available == 0 {
        return Err(Error::NoCuda { what });
    }
    if device >= available {
        return Err(Error::UnknownDevice { location: Location::Cuda(device), available });
    }
    // Below the device count, which is a c10::DeviceIndex (i8).
    Ok(device as c_int)
}

/// A null message slot for a shim call.
fn no_err() -> *mut c_char {
    ptr::null_mut()
}

/// Free and total bytes of `device` (`cudaMemGetInfo`). Creates the CUDA
/// context on that device if there is none yet; the current device is restored.
pub(crate) fn mem_get_info(device: usize) -> Result<(u64, u64)> {
    const WHAT: &str = "mem_get_info";
    let d = device_index(WHAT, device)?;
    let (mut free, mut total, mut err) = (0u64, 0u64, no_err());
    // SAFETY: `d` is a valid device index; the out-pointers point to live locals.
    let st = unsafe { shim::sire_cuda_mem_get_info(d, &mut free, &mut total, &mut err) };
    shim_status(WHAT, st, err)?;
    Ok((free, total))
}

/// Current bytes of libtorch's CUDA caching allocator on one device
/// (aggregate over its pools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AllocatorStats {
    /// Bytes the allocator holds from the driver (in use or cached).
    pub(crate) reserved: u64,
    /// Bytes in live tensors (a subset of `reserved`).
    pub(crate) allocated: u64,
}

/// The caching allocator's reserved and allocated bytes on `device`.
pub(crate) fn allocator_stats(device: usize) -> Result<AllocatorStats> {
    const WHAT: &str = "allocator_stats";
    let d = device_index(WHAT, device)?;
    let (mut reserved, mut allocated, mut err) = (0u64, 0u64, no_err());
    // SAFETY: `d` is a valid device index; the out-pointers point to live locals.
    let st = unsafe { shim::sire_cuda_allocator_stats(d, &mut reserved, &mut allocated, &mut err) };
    shim_status(WHAT, st, err)?;
    Ok(AllocatorStats { reserved, allocated })
}

/// Memory of one CUDA device, as the driver and libtorch's caching allocator
/// see it; returned by [`device_memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceMemory {
    /// Bytes free on the device (`cudaMemGetInfo`), for this process and all others.
    pub free: u64,
    /// Bytes of device memory in all.
    pub total: u64,
    /// Bytes libtorch's caching allocator holds in this process: in tensors, or
    /// cached for reuse (and so not `free`; [`empty_cache`] returns the cached part).
    pub reserved: u64,
    /// Bytes in live tensors of this process (at most `reserved`).
    pub allocated: u64,
}

/// Free and total memory of CUDA device `device`, with what libtorch's caching
/// allocator holds there.
///
/// Creates the CUDA context on that device if there is none yet. Without a
/// CUDA device this is [`Error::NoCuda`]; a device that does not exist is
/// [`Error::UnknownDevice`].
///
/// ```
/// match sire::device_memory(0) {
///     Ok(m) => println!("cuda:0: {} of {} bytes free, {} reserved by libtorch", m.free, m.total, m.reserved),
///     Err(sire::Error::NoCuda { what }) => println!("no GPU here ({what})"),
///     Err(e) => panic!("{e}"),
/// }
/// // On a machine without CUDA the error says so:
/// if !tch::Cuda::is_available() {
///     let e = sire::device_memory(0).unwrap_err();
///     assert!(matches!(e, sire::Error::NoCuda { .. }));
///     assert!(e.to_string().contains("no CUDA device"), "{e}");
/// }
/// ```
pub fn device_memory(device: usize) -> Result<DeviceMemory> {
    device_index("device_memory", device)?;
    let (free, total) = mem_get_info(device)?;
    let AllocatorStats { reserved, allocated } = allocator_stats(device)?;
    Ok(DeviceMemory { free, total, reserved, allocated })
}

/// Returns the unused memory cached by libtorch's CUDA caching allocator, on
/// every device, to the driver (like `torch.cuda.empty_cache()`), so other
/// processes can use it. Memory held by live tensors stays.
///
/// Without a CUDA device this is [`Error::NoCuda`].
///
/// ```
/// match sire::empty_cache() {
///     Ok(()) => println!("cache released"),
///     Err(sire::Error::NoCuda { .. }) => assert!(!tch::Cuda::is_available()),
///     Err(e) => panic!("{e}"),
/// }
/// ```
pub fn empty_cache() -> Result<()> {
    const WHAT: &str = "empty_cache";
    device_index(WHAT, 0)?;
    let mut err = no_err();
    // SAFETY: the out-pointer points to a live local.
    let st = unsafe { shim::sire_cuda_empty_cache(&mut err) };
    shim_status(WHAT, st, err)
}

/// libtorch's `c10::ScalarType` number for a `tch` kind (the same table as
/// tch's private `Kind::c_int`).
pub(crate) fn scalar_type(kind: Kind) -> c_int {
    match kind {
        Kind::Uint8 => 0,
        Kind::Int8 => 1,
        Kind::Int16 => 2,
        Kind::Int => 3,
        Kind::Int64 => 4,
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::ComplexHalf => 8,
        Kind::ComplexFloat => 9,
        Kind::ComplexDouble => 10,
        Kind::Bool => 11,
        Kind::QInt8 => 12,
        Kind::QUInt8 => 13,
        Kind::QInt32 => 14,
        Kind::BFloat16 => 15,
        Kind::Float8e5m2 => 23,
        Kind::Float8e4m3fn => 24,
        Kind::Float8e5m2fnuz => 25,
        Kind::Float8e4m3fnuz => 26,
    }
}

/// An uninitialised CPU tensor, pinned when `pinned` (`at::empty`).
fn empty(what: &'static str, shape: &[i64], kind: Kind, pinned: bool) -> Result<Tensor> {
    if pinned {
        device_index(what, 0)?;
    }
    let mut out: *mut torch_sys::C_tensor = ptr::null_mut();
    let mut err = no_err();
    // SAFETY: `shape` is a live slice of `shape.len()` i64s, read during the
    // call only; the out-pointers point to live locals.
    let st = unsafe {
        shim::sire_empty(
            shape.as_ptr(),
            shape.len(),
            scalar_type(kind),
            c_int::from(pinned),
            &mut out,
            &mut err,
        )
    };
    shim_status(what, st, err)?;
    assert!(!out.is_null(), "sire_empty succeeded without a tensor");
    // SAFETY: on success `out` is a new heap `at::Tensor*` that nothing else
    // owns; the returned `Tensor` takes it and frees it on drop (`at_free`),
    // exactly as tensors created by tch itself.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// An uninitialised tensor in pinned (page-locked) host memory, from libtorch's
/// caching host allocator (`at::empty(.., pinned_memory(true))`). Pinned memory
/// makes host-to-device copies faster, and asynchronous with `non_blocking`.
/// Freed pinned blocks stay cached by libtorch for reuse.
pub(crate) fn empty_pinned(shape: &[i64], kind: Kind) -> Result<Tensor> {
    empty("empty_pinned", shape, kind, true)
}

/// Whether `t`'s memory is pinned host memory; false without CUDA, for device
/// tensors, and when libtorch cannot tell (a warning is logged).
pub(crate) fn is_pinned(t: &Tensor) -> bool {
    if !available() {
        return false;
    }
    let (mut out, mut err) = (0 as c_int, no_err());
    // SAFETY: `t.as_ptr()` is a live `at::Tensor*` for the duration of the
    // call (borrowed from `t`), only read; the out-pointers point to live locals.
    let st = unsafe { shim::sire_is_pinned(t.as_ptr(), &mut out, &mut err) };
    match shim_status("is_pinned", st, err) {
        Ok(()) => out != 0,
        Err(e) => {
            tracing::warn!(error = %e, "is_pinned failed; treating the tensor as pageable");
            false
        }
    }
}

/// Tells libtorch's caching allocator that the CUDA tensor `t` is used on
/// `stream`, so that its memory is not reused (after `t` is dropped) before
/// the work queued on that stream so far has finished. Needed when a tensor
/// allocated under one stream is used or freed under another.
pub(crate) fn record_stream(t: &Tensor, stream: &Stream) -> Result<()> {
    const WHAT: &str = "record_stream";
    let d = device_index(WHAT, stream.device)?;
    let mut err = no_err();
    // SAFETY: `t.as_ptr()` is a live `at::Tensor*` borrowed for the call; the
    // stream id came from the shim for device `d`.
    let st = unsafe { shim::sire_cuda_record_stream(t.as_ptr(), stream.id, d, &mut err) };
    shim_status(WHAT, st, err)
}

/// A CUDA stream from libtorch's pool on one device, for work that should run
/// beside the default stream (a copy that overlaps compute).
///
/// Pool streams live as long as the process, so this is a plain value: `Copy`,
/// and `Send + Sync` (its fields are a device index and libtorch's stream id,
/// which names the same stream on every thread; nothing is freed on drop).
/// Make it current with [`Stream::scope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stream {
    device: usize,
    id: i64,
}

impl Stream {
    /// The next stream of libtorch's pool on `device` (low priority; the pool
    /// hands its streams out round-robin, so two calls may share one).
    pub(crate) fn new(device: usize) -> Result<Stream> {
        const WHAT: &str = "Stream::new";
        let d = device_index(WHAT, device)?;
        let (mut id, mut err) = (0i64, no_err());
        // SAFETY: `d` is a valid device index; the out-pointers point to live locals.
        let st = unsafe { shim::sire_cuda_stream_from_pool(d, &mut id, &mut err) };
        shim_status(WHAT, st, err)?;
        Ok(Stream { device, id })
    }

    /// The calling thread's current stream on `device` (the default stream
    /// unless a [`Stream::scope`] or libtorch code set another).
    pub(crate) fn current(device: usize) -> Result<Stream> {
        const WHAT: &str = "Stream::current";
        let d = device_index(WHAT, device)?;
        let (mut id, mut err) = (0i64, no_err());
        // SAFETY: `d` is a valid device index; the out-pointers point to live locals.
        let st = unsafe { shim::sire_cuda_current_stream(d, &mut id, &mut err) };
        shim_status(WHAT, st, err)?;
        Ok(Stream { device, id })
    }

    /// The device of the stream.
    pub(crate) fn device(&self) -> usize {
        self.device
    }

    /// Runs `f` with this stream as the calling thread's current CUDA stream
    /// and its device as the current device (`c10::cuda::CUDAStreamGuard`):
    /// the CUDA work that libtorch queues inside `f` (copies, kernels) goes
    /// onto this stream. The previous stream and device are restored when `f`
    /// returns or panics.
    pub(crate) fn scope<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        const WHAT: &str = "Stream::scope";
        let d = device_index(WHAT, self.device)?;
        let (mut prev_stream, mut prev_device, mut err) = (0i64, 0 as c_int, no_err());
        // SAFETY: the stream id came from the shim for device `d`; the
        // out-pointers point to live locals.
        let st =
            unsafe { shim::sire_cuda_stream_enter(self.id, d, &mut prev_stream, &mut prev_device, &mut err) };
        shim_status(WHAT, st, err)?;

        /// Restores the previous stream and device, also on unwind.
        struct Restore {
            prev_stream: i64,
            device: c_int,
            prev_device: c_int,
        }
        impl Drop for Restore {
            fn drop(&mut self) {
                let mut err = no_err();
                // SAFETY: the values were returned by `sire_cuda_stream_enter`
                // on this thread (the closure runs on the caller's thread).
                let st = unsafe {
                    shim::sire_cuda_stream_exit(self.prev_stream, self.device, self.prev_device, &mut err)
                };
                if let Err(e) = shim_status("Stream::scope (restore)", st, err) {
                    tracing::error!(error = %e, "could not restore the previous CUDA stream");
                }
            }
        }
        let _restore = Restore { prev_stream, device: d, prev_device };
        Ok(f())
    }
}

/// A CUDA event (`c10::Event`): a marker recorded on a stream, which other
/// streams can wait for without blocking the host.
///
/// `Send`: the event is a heap `c10::Event` owned by this value alone; CUDA
/// events are not tied to the thread that created them. `Sync`: the methods
/// taking `&self` only read the event handle and call the CUDA runtime, which
/// is thread-safe; recording (which may create the handle) takes `&mut self`.
/// Freed on drop.
#[derive(Debug)]
pub(crate) struct Event {
    ptr: NonNull<c_void>,
    timing: bool,
}

// SAFETY: see the type's documentation.
unsafe impl Send for Event {}
// SAFETY: see the type's documentation.
unsafe impl Sync for Event {}

impl Event {
    fn create(timing: bool) -> Result<Event> {
        const WHAT: &str = "Event::new";
        device_index(WHAT, 0)?;
        let (mut out, mut err) = (ptr::null_mut::<c_void>(), no_err());
        // SAFETY: the out-pointers point to live locals.
        let st = unsafe { shim::sire_cuda_event_new(c_int::from(timing), &mut out, &mut err) };
        shim_status(WHAT, st, err)?;
        let ptr = NonNull::new(out).expect("sire_cuda_event_new succeeded without an event");
        Ok(Event { ptr, timing })
    }

    /// A new event without timing (cheaper to record and wait for).
    pub(crate) fn new() -> Result<Event> {
        Event::create(false)
    }

    /// A new event that also records a time stamp, for [`Event::elapsed_ms`].
    pub(crate) fn with_timing() -> Result<Event> {
        Event::create(true)
    }

    /// Records the event on `stream`: it completes when the work queued there
    /// so far has. An event is tied to the device of its first record.
    pub(crate) fn record(&mut self, stream: &Stream) -> Result<()> {
        const WHAT: &str = "Event::record";
        let d = device_index(WHAT, stream.device)?;
        let mut err = no_err();
        // SAFETY: `self.ptr` is a live event owned by `self`, borrowed mutably;
        // the stream id came from the shim for device `d`.
        let st = unsafe { shim::sire_cuda_event_record(self.ptr.as_ptr(), stream.id, d, &mut err) };
        shim_status(WHAT, st, err)
    }

    /// Records the event on the calling thread's current stream of `device`.
    pub(crate) fn record_current(&mut self, device: usize) -> Result<()> {
        const WHAT: &str = "Event::record_current";
        let d = device_index(WHAT, device)?;
        let mut err = no_err();
        // SAFETY: `self.ptr` is a live event owned by `self`, borrowed mutably.
        let st = unsafe { shim::sire_cuda_event_record_current(self.ptr.as_ptr(), d, &mut err) };
        shim_status(WHAT, st, err)
    }

    /// Makes the calling thread's current stream of `device` wait for the
    /// event (work queued there later starts after it); the host does not
    /// block. A no-op for an event never recorded.
    pub(crate) fn wait_current(&self, device: usize) -> Result<()> {
        const WHAT: &str = "Event::wait_current";
        let d = device_index(WHAT, device)?;
        let mut err = no_err();
        // SAFETY: `self.ptr` is a live event owned by `self`, only read.
        let st = unsafe { shim::sire_cuda_event_wait_current(self.ptr.as_ptr(), d, &mut err) };
        shim_status(WHAT, st, err)
    }

    /// Blocks the calling thread until the event has completed (at once for
    /// an event never recorded).
    pub(crate) fn synchronize(&self) -> Result<()> {
        const WHAT: &str = "Event::synchronize";
        device_index(WHAT, 0)?;
        let mut err = no_err();
        // SAFETY: `self.ptr` is a live event owned by `self`, only read.
        let st = unsafe { shim::sire_cuda_event_synchronize(self.ptr.as_ptr(), &mut err) };
        shim_status(WHAT, st, err)
    }

    /// Whether the event has completed (true for an event never recorded);
    /// never blocks.
    pub(crate) fn query(&self) -> Result<bool> {
        const WHAT: &str = "Event::query";
        device_index(WHAT, 0)?;
        let (mut done, mut err) = (0 as c_int, no_err());
        // SAFETY: `self.ptr` is a live event owned by `self`, only read; the
        // out-pointers point to live locals.
        let st = unsafe { shim::sire_cuda_event_query(self.ptr.as_ptr(), &mut done, &mut err) };
        shim_status(WHAT, st, err)?;
        Ok(done != 0)
    }

    /// Milliseconds from this event to `end`; both must have been created
    /// [`with_timing`](Event::with_timing), recorded, and completed.
    pub(crate) fn elapsed_ms(&self, end: &Event) -> Result<f64> {
        const WHAT: &str = "Event::elapsed_ms";
        device_index(WHAT, 0)?;
        if !(self.timing && end.timing) {
            return Err(Error::Torch(tch::TchError::Torch(format!(
                "{WHAT}: both events must be created with timing"
            ))));
        }
        let (mut ms, mut err) = (0f64, no_err());
        // SAFETY: both pointers are live events owned by `self` and `end`, only
        // read; the out-pointers point to live locals.
        let st = unsafe {
            shim::sire_cuda_event_elapsed_ms(self.ptr.as_ptr(), end.ptr.as_ptr(), &mut ms, &mut err)
        };
        shim_status(WHAT, st, err)?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from `sire_cuda_event_new`, is owned by
        // `self` alone, and is freed exactly once, here.
        unsafe { shim::sire_cuda_event_free(self.ptr.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_no_cuda<T: std::fmt::Debug>(r: Result<T>, what: &str) {
        match r {
            Err(Error::NoCuda { what: w }) => assert_eq!(w, what),
            other => panic!("{what}: expected Error::NoCuda, got {other:?}"),
        }
    }

    /// The premise of every test here: the shim and tch agree about CUDA, and
    /// a `cuda-tests` run has it.
    fn cuda() -> bool {
        let tch_sees = tch::Cuda::is_available();
        assert_eq!(available(), tch_sees, "the shim and tch disagree about CUDA");
        let n = usize::try_from(tch::Cuda::device_count()).unwrap();
        assert_eq!(device_count(), if tch_sees { n } else { 0 });
        if cfg!(feature = "cuda-tests") {
            assert!(tch_sees, "cuda-tests asked for, but libtorch sees no CUDA device");
        }
        tch_sees
    }

    #[test]
    fn kinds_map_to_libtorch_scalar_types() {
        // The table above must agree with tch's own (private) one: an empty
        // tensor made by the shim reads back, through tch, as the same kind.
        let kinds = [
            Kind::Uint8,
            Kind::Int8,
            Kind::Int16,
            Kind::Int,
            Kind::Int64,
            Kind::Half,
            Kind::Float,
            Kind::Double,
            Kind::ComplexHalf,
            Kind::ComplexFloat,
            Kind::ComplexDouble,
            Kind::Bool,
            Kind::BFloat16,
            Kind::Float8e5m2,
            Kind::Float8e4m3fn,
            Kind::Float8e5m2fnuz,
            Kind::Float8e4m3fnuz,
        ];
        for kind in kinds {
            let t = empty("test", &[2, 3], kind, false).unwrap();
            assert_eq!(t.kind(), kind);
            assert_eq!(t.size(), [2, 3]);
            assert_eq!(t.device(), tch::Device::Cpu);
        }
        // Quantized kinds need a quantizer: libtorch refuses, and the C++
        // exception comes back as an error naming the operation.
        match empty("test", &[2], Kind::QInt8, false) {
            Err(Error::Torch(e)) => assert!(e.to_string().contains("test: "), "{e}"),
            Ok(t) => assert_eq!(t.kind(), Kind::QInt8),
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }

    #[test]
    fn cpp_exceptions_become_errors() {
        // A negative dimension throws inside at::empty; the shim catches it.
        match empty("empty", &[-1], Kind::Float, false) {
            Err(Error::Torch(e)) => {
                let m = e.to_string();
                assert!(m.contains("empty: "), "{m}");
                assert!(m.contains("negative"), "{m}");
            }
            other => panic!("expected a libtorch error, got {other:?}"),
        }
        // The thread can go on using libtorch.
        assert_eq!(empty("empty", &[4], Kind::Float, false).unwrap().size(), [4]);
    }

    #[test]
    fn memory_calls() {
        if cuda() {
            let (free, total) = mem_get_info(0).unwrap();
            assert!(total > 0 && free <= total, "free {free}, total {total}");
            let s = allocator_stats(0).unwrap();
            assert!(s.allocated <= s.reserved, "{s:?}");
            let n = device_count();
            match mem_get_info(n) {
                Err(Error::UnknownDevice { location, available }) => {
                    assert_eq!((location, available), (Location::Cuda(n), n))
                }
                other => panic!("expected UnknownDevice, got {other:?}"),
            }
        } else {
            assert_no_cuda(mem_get_info(0), "mem_get_info");
            // No CUDA wins over a device index out of range.
            assert_no_cuda(mem_get_info(7), "mem_get_info");
            assert_no_cuda(allocator_stats(0), "allocator_stats");
        }
    }

    #[test]
    fn pinned_tensors() {
        let pageable = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
        assert!(!is_pinned(&pageable));
        if cuda() {
            let t = empty_pinned(&[3, 5], Kind::Half).unwrap();
            assert_eq!((t.size(), t.kind(), t.device()), (vec![3, 5], Kind::Half, tch::Device::Cpu));
            assert!(is_pinned(&t));
            assert!(!is_pinned(&t.to_device(tch::Device::Cuda(0))));
        } else {
            assert_no_cuda(empty_pinned(&[3, 5], Kind::Half), "empty_pinned");
        }
    }

    #[test]
    fn streams_and_events() {
        if cuda() {
            let s = Stream::new(0).unwrap();
            assert_eq!(s.device(), 0);
            let mut start = Event::with_timing().unwrap();
            let mut end = Event::with_timing().unwrap();
            assert!(start.query().unwrap(), "an event never recorded counts as complete");
            start.record(&s).unwrap();
            let y = s
                .scope(|| Tensor::ones([1 << 20], (Kind::Float, tch::Device::Cuda(0))).sum(Kind::Float))
                .unwrap();
            end.record(&s).unwrap();
            end.wait_current(0).unwrap();
            end.synchronize().unwrap();
            assert!(end.query().unwrap());
            assert!(start.elapsed_ms(&end).unwrap() >= 0.0);
            assert_eq!(y.double_value(&[]), (1 << 20) as f64);
            let mut plain = Event::new().unwrap();
            plain.record_current(0).unwrap();
            assert!(plain.elapsed_ms(&end).is_err(), "no timing on a plain event");
            // The scope sets the current stream and restores it, also when
            // the closure panics.
            let before = Stream::current(0).unwrap();
            assert_ne!(before, s, "a pool stream is not the default stream");
            assert_eq!(s.scope(|| Stream::current(0).unwrap()).unwrap(), s);
            assert_eq!(Stream::current(0).unwrap(), before);
            let r = std::panic::catch_unwind(|| s.scope(|| panic!("inside")));
            assert!(r.is_err());
            assert_eq!(Stream::current(0).unwrap(), before, "not restored after a panic");
            plain.record_current(0).unwrap();
            plain.synchronize().unwrap();
            record_stream(&y, &s).unwrap();
            assert!(record_stream(&Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)), &s).is_err());
        } else {
            assert_no_cuda(Stream::new(0), "Stream::new");
            assert_no_cuda(Event::new(), "Event::new");
            assert_no_cuda(Event::with_timing(), "Event::new");
            assert_no_cuda(Stream::current(0), "Stream::current");
            // Values that cannot be built without CUDA (a stream is only ever
            // made by `Stream::new`) still meet the checks when forged.
            let s = Stream { device: 0, id: 0 };
            let mut ran = false;
            assert_no_cuda(s.scope(|| ran = true), "Stream::scope");
            assert!(!ran, "the closure must not run without CUDA");
            let t = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
            assert_no_cuda(record_stream(&t, &s), "record_stream");
        }
    }

    /// A host-to-device copy queued on a side stream, fenced by an event that
    /// the default stream waits for, is complete and right when the default
    /// stream reads it.
    #[cfg(feature = "cuda-tests")]
    #[test]
    fn side_stream_copy_then_wait_current_gives_the_right_values() {
        assert!(cuda());
        let cuda0 = tch::Device::Cuda(0);
        let n: i64 = 1 << 24; // 64 MiB of f32; every value exact
        let mut host = empty_pinned(&[n], Kind::Float).unwrap();
        assert!(is_pinned(&host));
        host.copy_(&Tensor::arange(n, (Kind::Float, tch::Device::Cpu)));
        let side = Stream::new(0).unwrap();
        let default = Stream::current(0).unwrap();
        assert_ne!(side, default);
        // `busy` is written on the default stream; the side stream waits for
        // that, then keeps busy (milliseconds of matmuls) before the copy, so
        // that a default stream not waiting for the copy would read garbage.
        let busy = Tensor::ones([4096, 4096], (Kind::Float, cuda0));
        let mut written = Event::new().unwrap();
        written.record_current(0).unwrap();
        let mut copied = Event::new().unwrap();
        let (spin, dev) = side
            .scope(|| {
                written.wait_current(0).unwrap(); // current = the side stream here
                let spin = busy.matmul(&busy).matmul(&busy);
                (spin, host.to_device_(cuda0, Kind::Float, true, false))
            })
            .unwrap();
        copied.record(&side).unwrap();
        copied.wait_current(0).unwrap();
        // `dev` was allocated under the side stream and is used (and freed)
        // under the default one.
        record_stream(&dev, &default).unwrap();
        let sum = dev.sum(Kind::Double).double_value(&[]);
        assert_eq!(sum, (n * (n - 1) / 2) as f64);
        assert!(dev.to_device(tch::Device::Cpu).equal(&host));
        copied.synchronize().unwrap();
        assert!(copied.query().unwrap());
        assert_eq!(spin.double_value(&[0, 0]), 4096.0 * 4096.0);
    }

    #[test]
    fn shim_types_are_send() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Stream>();
        send_sync::<Event>();
    }
}
