// sire's C++ shim: the few libtorch calls that `tch` does not expose (CUDA
// memory, streams and events; the buffers of a TorchScript module).
//
// Every function is `extern "C"`, catches every C++ exception and turns it into
// a status code plus a malloc'ed message (freed with sire_shim_free): nothing
// unwinds into Rust. The Rust side (src/ffi.rs, src/cuda.rs) checks every status.
//
// Only libtorch's own headers are used, no CUDA header: the calls go through
// c10's device-generic interfaces (the device-guard registry, c10::Event,
// c10::DeviceAllocator), which libc10_cuda.so fills in with its CUDA
// implementations when it is loaded. So this file builds against any libtorch,
// and every call answers SIRE_NO_CUDA when libtorch has no CUDA backend or
// sees no device. (The PyTorch wheel's nvidia/cu13/include lacks the crt/
// headers that cuda_runtime_api.h includes, so CUDA's headers are not usable
// from it anyway.)
//
// With SIRE_SHIM_LINK_CUDA=1 (build.rs sets it when libtorch_cuda.so exists),
// one symbol of libtorch_cuda.so is referenced on purpose (g_link_anchor), so
// that a binary linking sire keeps libtorch_cuda.so as a dependency despite
// `--as-needed`, and libtorch registers its CUDA backend at start-up.

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/jit/api/module.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>

#if SIRE_SHIM_LINK_CUDA
// Declared in ATen/cuda/CUDAContextLight.h, which needs CUDA's headers.
namespace at::cuda {
int warp_size();
}  // namespace at::cuda
#endif

namespace {
// The address of a libtorch_cuda.so function, taken by a static constructor.
// build.rs links this object whole-archive, and .init_array is a root of the
// linker's section garbage collection, so every binary that links sire keeps
// this reference, and `--as-needed` keeps libtorch_cuda.so.
const void* volatile g_link_anchor = nullptr;
__attribute__((constructor)) void sire_shim_keep_libtorch_cuda() {
#if SIRE_SHIM_LINK_CUDA
  g_link_anchor = reinterpret_cast<const void*>(&at::cuda::warp_size);
#endif
}
}  // namespace

namespace {

constexpr int SIRE_OK = 0;
constexpr int SIRE_NO_CUDA = 1;
constexpr int SIRE_ERR = 2;

constexpr auto kCuda = c10::DeviceType::CUDA;

// Runs `f` (which returns a status) and turns any exception into SIRE_ERR with
// its message in `*err`.
template <typename F>
int guarded(char** err, F&& f) noexcept {
  const char* msg = "unknown C++ exception";
  try {
    return f();
  } catch (const c10::Error& e) {
    // The message without libtorch's C++ backtrace.
    *err = strdup(e.what_without_backtrace());
    return SIRE_ERR;
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return SIRE_ERR;
  } catch (...) {
  }
  *err = strdup(msg);
  return SIRE_ERR;
}

// The CUDA device-guard implementation, or null when libtorch has no CUDA
// backend loaded.
const c10::impl::DeviceGuardImplInterface* cuda_impl() noexcept {
  if (!c10::impl::hasDeviceGuardImpl(kCuda)) return nullptr;
  return c10::impl::getDeviceGuardImpl(kCuda);
}

int device_count() noexcept {
  auto* impl = cuda_impl();
  return impl ? static_cast<int>(impl->deviceCount()) : 0;
}

c10::Device cuda_device(int device) {
  return c10::Device(kCuda, static_cast<c10::DeviceIndex>(device));
}

c10::Stream cuda_stream(int64_t id, int device) {
  return c10::Stream::unpack3(id, static_cast<c10::DeviceIndex>(device), kCuda);
}

c10::DeviceAllocator* cuda_allocator() {
  // The caching allocator sizes its per-device state when CUDA is first
  // initialised; statistics before that would fail "invalid device".
  at::globalContext().lazyInitDevice(kCuda);
  return c10::getDeviceAllocator(kCuda);
}

}  // namespace

extern "C" {

void sire_shim_free(char* p) {
  free(p);
}

// An address inside libtorch_cuda.so (null when sire was built against a
// libtorch without it); see the file comment.
const void* sire_shim_link_anchor(void) {
  return g_link_anchor;
}

// Number of CUDA devices libtorch sees; 0 without a CUDA backend. Never throws.
int sire_cuda_device_count(void) {
  return device_count();
}

// An uninitialised CPU tensor of `dtype` (a c10::ScalarType), in pinned
// (page-locked) memory when `pinned` is nonzero. `*out` receives a heap
// at::Tensor*, owned by the caller (tch frees it with at_free).
int sire_empty(const int64_t* dims, size_t ndims, int dtype, int pinned,
               void** out, char** err) {
  return guarded(err, [&] {
    if (pinned && device_count() == 0) return SIRE_NO_CUDA;
    auto opts = at::TensorOptions()
                    .dtype(static_cast<c10::ScalarType>(dtype))
                    .device(at::kCPU)
                    .pinned_memory(pinned != 0);
    at::Tensor t = at::empty(c10::IntArrayRef(dims, ndims), opts);
    *out = new at::Tensor(std::move(t));
    return SIRE_OK;
  });
}

// A contiguous CPU tensor of `dtype` over the `dims` elements at `data`,
// which are not copied. When the last tensor sharing its storage is freed,
// `release(ctx)` is called (on whichever thread frees it), once. On an error
// `release` may or may not have run: the caller must not release `ctx` itself
// (at worst it is leaked).
int sire_from_blob(void* data, const int64_t* dims, size_t ndims, int dtype,
                   void (*release)(void*), void* ctx, void** out,
                   char** err) {
  return guarded(err, [&] {
    auto opts = at::TensorOptions()
                    .dtype(static_cast<c10::ScalarType>(dtype))
                    .device(at::kCPU);
    at::Tensor t = at::from_blob(
        data, c10::IntArrayRef(dims, ndims),
        [release, ctx](void*) { release(ctx); }, opts);
    *out = new at::Tensor(std::move(t));
    return SIRE_OK;
  });
}

// How many references the tensor's storage has (the tensor's own included):
// 1 means no other tensor, view or handle shares its memory.
int sire_storage_use_count(const void* tensor, int64_t* out, char** err) {
  return guarded(err, [&] {
    const auto& t = *static_cast<const at::Tensor*>(tensor);
    *out = t.has_storage() ? static_cast<int64_t>(t.storage().use_count()) : 0;
    return SIRE_OK;
  });
}

// Whether the tensor's memory is pinned host memory (0 without CUDA).
int sire_is_pinned(const void* tensor, int* out, char** err) {
  return guarded(err, [&] {
    *out = 0;
    if (device_count() == 0) return SIRE_NO_CUDA;
    const auto& t = *static_cast<const at::Tensor*>(tensor);
    *out = t.is_pinned() ? 1 : 0;
    return SIRE_OK;
  });
}

// cudaMemGetInfo on `device`, through the CUDA allocator (which guards the
// device, so the current device is restored). Creates a CUDA context on that
// device if there is none.
int sire_cuda_mem_get_info(int device, uint64_t* free_b, uint64_t* total_b,
                           char** err) {
  return guarded(err, [&] {
    if (device_count() == 0) return SIRE_NO_CUDA;
    auto info = cuda_allocator()->getMemoryInfo(
        static_cast<c10::DeviceIndex>(device));
    *free_b = info.first;
    *total_b = info.second;
    return SIRE_OK;
  });
}

// The caching allocator's current reserved and allocated bytes on `device`
// (aggregate pool).
int sire_cuda_allocator_stats(int device, uint64_t* reserved,
                              uint64_t* allocated, char** err) {
  return guarded(err, [&] {
    if (device_count() == 0) return SIRE_NO_CUDA;
    auto stats = cuda_allocator()->getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    constexpr auto agg =
        static_cast<size_t>(c10::CachingDeviceAllocator::StatType::AGGREGATE);
    *reserved = static_cast<uint64_t>(stats.reserved_bytes[agg].current);
    *allocated = static_cast<uint64_t>(stats.allocated_bytes[agg].current);
    return SIRE_OK;
  });
}

// Releases the caching allocator's unused cached blocks on every device.
int sire_cuda_empty_cache(char** err) {
  return guarded(err, [&] {
    if (device_count() == 0) return SIRE_NO_CUDA;
    cuda_allocator()->emptyCache();
    return SIRE_OK;
  });
}

// A stream from libtorch's pool on `device`; `*id` receives its c10 stream id.
int sire_cuda_stream_from_pool(int device, int64_t* id, char** err) {
  return guarded(err, [&] {
    auto* impl = cuda_impl();
    if (impl == nullptr || impl->deviceCount() == 0) return SIRE_NO_CUDA;
    *id = impl->getStreamFromGlobalPool(cuda_device(device), false).id();
    return SIRE_OK;
  });
}

// The calling thread's current stream on `device`; `*id` receives its id.
int sire_cuda_current_stream(int device, int64_t* id, char** err) {
  return guarded(err, [&] {
    auto* impl = cuda_impl();
    if (impl == nullptr || impl->deviceCount() == 0) return SIRE_NO_CUDA;
    *id = impl->getStream(cuda_device(device)).id();
    return SIRE_OK;
  });
}

// Makes `device` the current device and (id, device) its current stream, on
// this thread. Returns what sire_cuda_stream_exit needs to undo it.
int sire_cuda_stream_enter(int64_t id, int device, int64_t* prev_stream,
                           int* prev_device, char** err) {
  return guarded(err, [&] {
    auto* impl = cuda_impl();
    if (impl == nullptr || impl->deviceCount() == 0) return SIRE_NO_CUDA;
    auto stream = cuda_stream(id, device);
    auto prev_dev = impl->exchangeDevice(cuda_device(device));
    try {
      auto prev = impl->exchangeStream(stream);
      *prev_stream = prev.id();
    } catch (...) {
      impl->uncheckedSetDevice(prev_dev);
      throw;
    }
    *prev_device = static_cast<int>(prev_dev.index());
    return SIRE_OK;
  });
}

// Undoes sire_cuda_stream_enter: restores `device`'s current stream, then the
// previous current device (without creating a context where there was none).
int sire_cuda_stream_exit(int64_t prev_stream, int device, int prev_device,
                          char** err) {
  return guarded(err, [&] {
    auto* impl = cuda_impl();
    if (impl == nullptr) return SIRE_NO_CUDA;
    impl->exchangeStream(cuda_stream(prev_stream, device));
    impl->uncheckedSetDevice(cuda_device(prev_device));
    return SIRE_OK;
  });
}

// A CUDA event, created by libtorch on its first record; with timing when
// `timing` is nonzero. Free with sire_cuda_event_free.
int sire_cuda_event_new(int timing, void** out, char** err) {
  return guarded(err, [&] {
    if (device_count() == 0) return SIRE_NO_CUDA;
    *out = new c10::Event(kCuda, timing ? c10::EventFlag::BACKEND_DEFAULT
                                        : c10::EventFlag::PYTORCH_DEFAULT);
    return SIRE_OK;
  });
}

void sire_cuda_event_free(void* ev) {
  // ~Event only warns when cudaEventDestroy fails; it does not throw.
  delete static_cast<c10::Event*>(ev);
}

int sire_cuda_event_record(void* ev, int64_t stream, int device, char** err) {
  return guarded(err, [&] {
    if (device_count() == 0) return SIRE_NO_CUDA;
    static_cast<c10::Event*>(ev)->record(cuda_stream(stream, device));
    return SIRE_OK;
  });
}

int sire_cuda_event_record_current(void* ev, int device, char** err) {
  return guarded(err, [&] {
    auto* impl = cuda_impl();
    if (impl == nullptr || impl->deviceCount() == 0) return SIRE_NO_CUDA;
    static_cast<c10::Event*>(ev)->record(impl->getStream(cuda_device(device)));
    return SIRE_OK;
  });
}

// Makes `device`'s current stream wait for the event (no host block).
int sire_cuda_event_wait_current(const void* ev, int device, char** err) {
  return guarded(err, [&] {
    auto* impl = cuda_impl();
    if (impl == nullptr || impl->deviceCount() == 0) return SIRE_NO_CUDA;
    static_cast<const c10::Event*>(ev)->block(
        impl->getStream(cuda_device(device)));
    return SIRE_OK;
  });
}

int sire_cuda_event_synchronize(const void* ev, char** err) {
  return guarded(err, [&] {
    if (device_count() == 0) return SIRE_NO_CUDA;
    static_cast<const c10::Event*>(ev)->synchronize();
    return SIRE_OK;
  });
}

int sire_cuda_event_query(const void* ev, int* done, char** err) {
  return guarded(err, [&] {
    if (device_count() == 0) return SIRE_NO_CUDA;
    *done = static_cast<const c10::Event*>(ev)->query() ? 1 : 0;
    return SIRE_OK;
  });
}

int sire_cuda_event_elapsed_ms(const void* start, const void* end, double* ms,
                               char** err) {
  return guarded(err, [&] {
    if (device_count() == 0) return SIRE_NO_CUDA;
    *ms = static_cast<const c10::Event*>(start)->elapsedTime(
        *static_cast<const c10::Event*>(end));
    return SIRE_OK;
  });
}

// Tells the caching allocator that the CUDA tensor's memory is used on stream
// (id, device), so that it is not reused before the work queued there so far
// is done.
int sire_cuda_record_stream(const void* tensor, int64_t stream, int device,
                            char** err) {
  return guarded(err, [&] {
    if (device_count() == 0) return SIRE_NO_CUDA;
    const auto& t = *static_cast<const at::Tensor*>(tensor);
    TORCH_CHECK(t.is_cuda(), "record_stream needs a CUDA tensor, got one on ",
                t.device());
    cuda_allocator()->recordStream(t.storage().data_ptr(),
                                   cuda_stream(stream, device));
    return SIRE_OK;
  });
}

// Calls `f(ctx, name, tensor)` for every buffer of the TorchScript module
// `module` (a `torch::jit::Module*`, as torch-sys's `atm_load` returns) and of
// its submodules, recursively, with dotted names. `tensor` is a new
// `at::Tensor*` sharing the buffer's TensorImpl (so `set_data` on it changes
// the module's buffer); the callee owns it.
int sire_module_named_buffers(void* module,
                              void (*f)(void*, const char*, void*), void* ctx,
                              char** err) {
  return guarded(err, [&] {
    const auto* m = static_cast<const torch::jit::Module*>(module);
    for (const auto& b : m->named_buffers(/*recurse=*/true)) {
      f(ctx, b.name.c_str(), new at::Tensor(b.value));
    }
    return SIRE_OK;
  });
}
// Calls `f(ctx, name, child)` for every direct submodule of the TorchScript
// module `module`, in registration order. `child` is a new
// `torch::jit::Module*` (a handle on the same submodule object: its methods
// compute with the parent's tensors); the callee owns it and frees it as
// torch-sys's `atm_free` does (`delete`).
int sire_module_children(void* module, void (*f)(void*, const char*, void*),
                         void* ctx, char** err) {
  return guarded(err, [&] {
    const auto* m = static_cast<const torch::jit::Module*>(module);
    for (const auto& c : m->named_children()) {
      f(ctx, c.name.c_str(), new torch::jit::Module(c.value));
    }
    return SIRE_OK;
  });
}
}  // extern "C"
