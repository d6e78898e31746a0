//! Every raw libc call of the crate, and the declarations of its C++ shim
//! ([`shim`]), in one place. Each call is checked and each `unsafe` block says
//! why it is sound.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("path {path:?} contains a NUL byte"))
    })
}

/// Bytes available to unprivileged users on the filesystem holding `path`
/// (`statvfs`: `f_bavail × f_frsize`).
pub(crate) fn statvfs_free(path: &Path) -> io::Result<u64> {
    let c = c_path(path)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated string that outlives the call, and `st`
    // points to writable memory sized and aligned for a `statvfs`, which the
    // call only writes to.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("statvfs({path:?}): {e}")));
    }
    // SAFETY: statvfs returned 0, so it filled in the whole struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let free = u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize));
    Ok(free)
}

/// The effective user id of the process: the owner that the files and
/// folders of the disk tier must have.
pub(crate) fn euid() -> u32 {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Fills `buf` with bytes from the kernel's random source (`getrandom`):
/// unguessable names and nonces for the disk tier.
pub(crate) fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is writable memory of `rest.len()` bytes that
        // outlives the call, which writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io::Error::new(e.kind(), format!("getrandom: {e}")));
        }
        filled += n as usize;
    }
    Ok(())
}

/// A random 128-bit value (see [`random_bytes`]).
pub(crate) fn random_u128() -> io::Result<u128> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    Ok(u128::from_le_bytes(b))
}

#[cfg(test)]
/// Paths of the files mapped into this process, from `/proc/self/maps`.
fn mapped_paths() -> io::Result<Vec<PathBuf>> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut paths: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        if let Some(p) = maps_path(line) {
            if paths.last().is_none_or(|last| last.as_os_str() != p) {
                paths.push(PathBuf::from(p));
            }
        }
    }
    Ok(paths)
}

#[cfg(test)]
/// The path field of one `/proc/self/maps` line (`address perms offset dev
/// inode path`), for lines that map a file.
fn maps_path(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start();
        rest = &rest[rest.find(char::is_whitespace)?..];
    }
    let p = rest.trim();
    let p = p.strip_suffix(" (deleted)").unwrap_or(p);
    p.starts_with('/').then_some(p)
}

#[cfg(test)]
/// Whether `path` is the library `lib_name` (exactly, or a versioned
/// `lib_name.N…`).
fn is_lib(path: &Path, lib_name: &str) -> bool {
    let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
        return false;
    };
    file == lib_name || file.strip_prefix(lib_name).is_some_and(|rest| rest.starts_with('.'))
}

#[cfg(test)]
/// Whether a library with this file name (e.g. `libtorch_cuda.so`) is mapped
/// into the process.
pub(crate) fn is_mapped(lib_name: &str) -> bool {
    mapped_paths().map(|ps| ps.iter().any(|p| is_lib(p, lib_name))).unwrap_or(false)
}

/// The C++ shim (`csrc/sire_shim.cpp`, built by `build.rs`): the libtorch
/// CUDA calls that `tch` lacks. Safe wrappers are in `crate::tier::cuda`.
///
/// Contract of every `-> c_int` function: it returns [`SHIM_OK`],
/// [`SHIM_NO_CUDA`] (libtorch has no CUDA backend or sees no device; nothing
/// was done) or [`SHIM_ERR`], and only with `SHIM_ERR` it stores a `malloc`ed
/// NUL-terminated message in `*err` (see [`shim_status`]). No C++ exception
/// crosses the boundary: the shim catches them all. Out-parameters are written
/// only on success. Device indices must be below `sire_cuda_device_count()`;
/// stream ids come from `sire_cuda_stream_from_pool` or `sire_cuda_stream_enter`;
/// event pointers from `sire_cuda_event_new`, tensor pointers from tch (`at::Tensor*`).
pub(crate) mod shim {
    use std::ffi::{c_char, c_int, c_void};

    use torch_sys::C_tensor;

    /// Success.
    pub(crate) const SHIM_OK: c_int = 0;
    /// No CUDA backend or no device.
    pub(crate) const SHIM_NO_CUDA: c_int = 1;
    /// A C++ exception; `*err` holds its message.
    pub(crate) const SHIM_ERR: c_int = 2;

    extern "C" {
        pub(crate) fn sire_shim_free(p: *mut c_char);
        #[cfg(test)]
        pub(crate) fn sire_shim_link_anchor() -> *const c_void;
        pub(crate) fn sire_cuda_device_count() -> c_int;
        pub(crate) fn sire_module_named_buffers(
            module: *mut c_void,
            f: extern "C" fn(*mut c_void, *const c_char, *mut C_tensor),
            ctx: *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_module_children(
            module: *mut c_void,
            f: extern "C" fn(*mut c_void, *const c_char, *mut c_void),
            ctx: *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_empty(
            dims: *const i64,
            ndims: usize,
            dtype: c_int,
            pinned: c_int,
            out: *mut *mut C_tensor,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_from_blob(
            data: *mut c_void,
            dims: *const i64,
            ndims: usize,
            dtype: c_int,
            release: extern "C" fn(*mut c_void),
            ctx: *mut c_void,
            out: *mut *mut C_tensor,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_storage_use_count(
            t: *const C_tensor,
            out: *mut i64,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_is_pinned(t: *const C_tensor, out: *mut c_int, err: *mut *mut c_char) -> c_int;
        pub(crate) fn sire_cuda_mem_get_info(
            device: c_int,
            free: *mut u64,
            total: *mut u64,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_cuda_allocator_stats(
            device: c_int,
            reserved: *mut u64,
            allocated: *mut u64,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_cuda_empty_cache(err: *mut *mut c_char) -> c_int;
        pub(crate) fn sire_cuda_stream_from_pool(device: c_int, id: *mut i64, err: *mut *mut c_char)
            -> c_int;
        pub(crate) fn sire_cuda_current_stream(device: c_int, id: *mut i64, err: *mut *mut c_char) -> c_int;
        pub(crate) fn sire_cuda_stream_enter(
            id: i64,
            device: c_int,
            prev_stream: *mut i64,
            prev_device: *mut c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_cuda_stream_exit(
            prev_stream: i64,
            device: c_int,
            prev_device: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_cuda_event_new(
            timing: c_int,
            out: *mut *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_cuda_event_free(ev: *mut c_void);
        pub(crate) fn sire_cuda_event_record(
            ev: *mut c_void,
            stream: i64,
            device: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_cuda_event_record_current(
            ev: *mut c_void,
            device: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_cuda_event_wait_current(
            ev: *const c_void,
            device: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_cuda_event_synchronize(ev: *const c_void, err: *mut *mut c_char) -> c_int;
        pub(crate) fn sire_cuda_event_query(
            ev: *const c_void,
            done: *mut c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_cuda_event_elapsed_ms(
            start: *const c_void,
            end: *const c_void,
            ms: *mut f64,
            err: *mut *mut c_char,
        ) -> c_int;
        pub(crate) fn sire_cuda_record_stream(
            t: *const C_tensor,
            stream: i64,
            device: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
    }

    /// Turns a shim status into a `Result`, taking ownership of (and freeing)
    /// the message in `err`. `what` names the operation for the error.
    pub(crate) fn shim_status(what: &'static str, status: c_int, err: *mut c_char) -> crate::Result<()> {
        let message = if err.is_null() {
            None
        } else {
            // SAFETY: a non-null `err` was set by the shim to a NUL-terminated
            // string from `strdup`, owned by us; it is copied, then freed once
            // with the shim's matching `free`.
            unsafe {
                let m = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
                sire_shim_free(err);
                Some(m)
            }
        };
        match status {
            SHIM_OK => Ok(()),
            SHIM_NO_CUDA => Err(crate::Error::NoCuda { what }),
            SHIM_ERR => {
                let message = message.unwrap_or_else(|| "(no message)".to_string());
                Err(crate::Error::Torch(tch::TchError::Torch(format!("{what}: {message}"))))
            }
            other => {
                Err(crate::Error::Torch(tch::TchError::Torch(format!("{what}: unknown shim status {other}"))))
            }
        }
    }
}

/// A contiguous CPU tensor of `kind` and `shape` over the bytes at `data`,
/// which are not copied: its storage keeps `owner` alive, and drops it (on
/// whichever thread frees the last tensor sharing that storage).
///
/// # Safety
/// `data` must point to `shape`'s element count times `kind`'s element size
/// bytes, aligned for `kind`, readable and writable, that stay valid as long
/// as `owner` lives and are not used as anything else meanwhile.
pub(crate) unsafe fn tensor_over<T: Send + Sync + 'static>(
    data: *mut u8,
    shape: &[i64],
    kind: tch::Kind,
    owner: std::sync::Arc<T>,
) -> crate::Result<tch::Tensor> {
    use std::ffi::{c_char, c_void};
    extern "C" fn release<T>(ctx: *mut c_void) {
        // SAFETY: `ctx` is the `Arc::into_raw` below, released once by the
        // storage's deleter.
        drop(unsafe { std::sync::Arc::from_raw(ctx as *const T) });
    }
    let ctx = std::sync::Arc::into_raw(owner) as *mut c_void;
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: the caller vouches for `data`; `shape` is read during the call
    // only; `release::<T>` matches the callback's C signature and takes back
    // the reference `ctx` holds. On an error the reference may leak, never
    // double-free (the shim's contract).
    let st = unsafe {
        shim::sire_from_blob(
            data.cast(),
            shape.as_ptr(),
            shape.len(),
            crate::tier::cuda::scalar_type(kind),
            release::<T>,
            ctx,
            &mut out,
            &mut err,
        )
    };
    shim::shim_status("from_blob", st, err)?;
    assert!(!out.is_null(), "sire_from_blob succeeded without a tensor");
    // SAFETY: on success `out` is a new heap `at::Tensor*` that nothing else
    // owns; the `Tensor` takes it and frees it on drop (`at_free`).
    Ok(unsafe { tch::Tensor::from_ptr(out) })
}

/// Whether `t` is the only tensor over its storage (no view, alias or other
/// handle shares its memory); false when libtorch cannot tell.
pub(crate) fn owns_storage(t: &tch::Tensor) -> bool {
    let mut n = 0i64;
    let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
    // SAFETY: `t.as_ptr()` is a live `at::Tensor*` borrowed for the call and
    // only read; the out-pointers point to live locals.
    let st = unsafe { shim::sire_storage_use_count(t.as_ptr(), &mut n, &mut err) };
    shim::shim_status("storage_use_count", st, err).is_ok() && n == 1
}

/// Asks for transparent huge pages for the whole pages inside the `len`
/// bytes at `addr` (a hint: where huge pages are off or unavailable nothing
/// changes). Faulting fresh memory in 2 MiB at a time rather than 4 KiB makes
/// the first write to it several times cheaper.
pub(crate) fn prefer_huge_pages(addr: *mut u8, len: usize) {
    const HUGE_PAGE: usize = 2 << 20;
    if len < HUGE_PAGE {
        return;
    }
    let page = page_size() as usize;
    let start = (addr as usize).next_multiple_of(page);
    let end = (addr as usize + len) / page * page;
    if end > start {
        // SAFETY: MADV_HUGEPAGE changes only how the pages are backed, never
        // what they hold, and fails harmlessly on a range that is not mapped.
        let _ = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// Reads the pages under the `len` bytes at `addr` into memory now, on the
/// calling thread (`MADV_POPULATE_READ`; where the kernel lacks it, a
/// read-ahead request, `MADV_WILLNEED`): for weights mapped from a file, the
/// disk read happens here rather than at their first use. A hint: what the
/// memory holds never changes. Returns whether the pages were populated
/// (rather than only asked for, or not at all).
pub(crate) fn read_ahead(addr: *const u8, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    let page = page_size() as usize;
    let start = addr as usize / page * page;
    let len = addr as usize + len - start;
    // SAFETY: both advices only fault pages in for reading or schedule their
    // read, never changing their contents; on a range that is not mapped, or
    // past the end of a mapped file, they fail with an error (no signal).
    unsafe {
        if libc::madvise(start as *mut libc::c_void, len, libc::MADV_POPULATE_READ) == 0 {
            return true;
        }
        let _ = libc::madvise(start as *mut libc::c_void, len, libc::MADV_WILLNEED);
    }
    false
}

/// Gives the C allocator's free memory back to the system (`malloc_trim`):
/// host buffers of evicted models are freed to it, and without this it may
/// keep them (glibc raises its mmap threshold after large frees, so blocks of
/// a few MiB come from its heaps and stay there once free).
pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim has no preconditions; it only returns free pages.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The buffers of a TorchScript module and of its submodules (recursively,
/// dotted names, as `named_buffers()` gives them in Python), as handles that
/// share the module's tensors: `set_data` on one changes the module's buffer.
/// `tch` exposes only a module's parameters.
pub(crate) fn module_buffers(m: &tch::CModule) -> crate::Result<Vec<(String, tch::Tensor)>> {
    use std::ffi::{c_char, c_void, CStr};
    let module = module_ptr(m);

    extern "C" fn push(ctx: *mut c_void, name: *const c_char, t: *mut torch_sys::C_tensor) {
        // SAFETY: `ctx` is the `Vec` passed below, alive and not aliased during
        // the call; `name` is a NUL-terminated string valid for this call; `t`
        // is a new `at::Tensor*` that the shim hands over to us.
        unsafe {
            let out = &mut *(ctx as *mut Vec<(String, tch::Tensor)>);
            let name = CStr::from_ptr(name).to_string_lossy().into_owned();
            out.push((name, tch::Tensor::from_ptr(t)));
        }
    }

    let mut out: Vec<(String, tch::Tensor)> = Vec::new();
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: `module` is a live `torch::jit::Module*`; `push` matches the
    // callback's C signature and `ctx` points to `out`, which outlives the call.
    let st =
        unsafe { shim::sire_module_named_buffers(module, push, &mut out as *mut _ as *mut c_void, &mut err) };
    shim::shim_status("named_buffers", st, err)?;
    Ok(out)
}

// tch's `CModule` is a struct whose one field is the `torch::jit::Module*`
// that torch-sys's `atm_load` returned (private to tch). A size change of the
// struct (a field added) stops the build here.
const _: () = assert!(std::mem::size_of::<tch::CModule>() == std::mem::size_of::<*mut std::ffi::c_void>());

/// The `torch::jit::Module*` inside a `CModule`, valid while `m` lives.
fn module_ptr(m: &tch::CModule) -> *mut std::ffi::c_void {
    // SAFETY: by the assertion above `CModule` is exactly one pointer-sized
    // field, the module pointer, valid while `m` lives; it is only read.
    unsafe { *(m as *const tch::CModule as *const *mut std::ffi::c_void) }
}

/// The direct submodules of a TorchScript module, in registration order, each
/// a `CModule` of its own that computes with the parent's tensors (`tch` can
/// call only a module's own methods).
pub(crate) fn module_children(m: &tch::CModule) -> crate::Result<Vec<(String, tch::CModule)>> {
    use std::ffi::{c_char, c_void, CStr};

    extern "C" fn push(ctx: *mut c_void, name: *const c_char, child: *mut c_void) {
        // SAFETY: `ctx` is the `Vec` passed below, alive and not aliased during
        // the call; `name` is a NUL-terminated string valid for this call;
        // `child` is a new `torch::jit::Module*` the shim hands over, which
        // becomes the one field of a `CModule` (same layout, asserted above),
        // freed by its `Drop` as tch frees a module it loaded.
        unsafe {
            let out = &mut *(ctx as *mut Vec<(String, tch::CModule)>);
            let name = CStr::from_ptr(name).to_string_lossy().into_owned();
            out.push((name, std::mem::transmute::<*mut c_void, tch::CModule>(child)));
        }
    }

    let mut out: Vec<(String, tch::CModule)> = Vec::new();
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: the module pointer is live while `m` is; `push` matches the
    // callback's C signature and `ctx` points to `out`, which outlives the call.
    let st = unsafe {
        shim::sire_module_children(module_ptr(m), push, &mut out as *mut _ as *mut c_void, &mut err)
    };
    shim::shim_status("named_children", st, err)?;
    Ok(out)
}

/// The system's page size in bytes (4096 if `sysconf` cannot say).
fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions; it returns -1 on error.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

#[cfg(test)]
/// Resident set size of this process in bytes (`/proc/self/statm`, second
/// field × page size); 0 if it cannot be read.
pub(crate) fn resident_set_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages.saturating_mul(page_size()))
}

/// The size and the resident bytes (`Rss`) of this process's mapping that
/// holds `addr`, from `/proc/self/smaps` (for tests).
#[cfg(test)]
pub(crate) fn mapping_of(addr: usize) -> (usize, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = None;
    for line in smaps.lines() {
        let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
        if let Some((a, b)) = range.filter(|_| line.contains(' ')) {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = (a..b).contains(&addr).then_some(b - a);
                continue;
            }
        }
        if let (Some(size), Some(kb)) = (inside, line.strip_prefix("Rss:")) {
            return (size, kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024);
        }
    }
    panic!("no mapping holds {addr:#x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_populates_a_file_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 8 << 20]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a private read-only mapping of a file nobody else writes.
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) }.unwrap();
        let addr = map.as_ptr() as usize;
        assert_eq!(mapping_of(addr).1, 0, "nothing touched yet");
        if read_ahead(map.as_ptr(), map.len()) {
            assert_eq!(mapping_of(addr).1, 8 << 20, "every page read in");
        }
        // Unaligned ranges, and nothing.
        assert!(read_ahead(map[100..].as_ptr(), 5000));
        assert!(read_ahead(std::ptr::null(), 0));
        assert_eq!(map[(8 << 20) - 1], 7);
    }

    #[test]
    fn statvfs_of_a_tempdir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(statvfs_free(dir.path()).unwrap() > 0);
        let missing = dir.path().join("missing");
        let e = statvfs_free(&missing).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("missing"), "{e}");
        let e = statvfs_free(Path::new("a\0b")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn maps_lines() {
        assert_eq!(
            maps_path("7f1c0000-7f1c1000 r-xp 00000000 08:01 1234    /usr/lib/libc.so.6"),
            Some("/usr/lib/libc.so.6")
        );
        assert_eq!(
            maps_path("7f1c0000-7f1c1000 r--p 00000000 08:01 1234   /a dir/lib x.so (deleted)"),
            Some("/a dir/lib x.so")
        );
        assert_eq!(maps_path("7ffd0000-7ffd1000 rw-p 00000000 00:00 0      [stack]"), None);
        assert_eq!(maps_path("7ffd0000-7ffd1000 rw-p 00000000 00:00 0"), None);
        assert_eq!(maps_path(""), None);
        assert!(is_lib(Path::new("/x/libtorch_cuda.so"), "libtorch_cuda.so"));
        assert!(is_lib(Path::new("/x/libc10.so.2"), "libc10.so"));
        assert!(!is_lib(Path::new("/x/libc10_cuda.so"), "libc10.so"));
        assert!(!is_lib(Path::new("/x/libtorch_cuda.so"), "libtorch_cpu.so"));
        assert!(!is_lib(Path::new("/x/libtorch_cuda.sox"), "libtorch_cuda.so"));
    }

    #[test]
    fn libtorch_cpu_is_mapped() {
        assert!(is_mapped("libtorch_cpu.so"));
        assert!(!is_mapped("libsire_no_such_library.so"));
    }

    /// The shim (csrc/sire_shim.cpp, linked whole-archive by build.rs)
    /// references libtorch_cuda.so, so every binary that links sire has it
    /// mapped from the start, when the libtorch in use ships it. Nothing in the
    /// crate loads it at run time, so this test binary shows the linking alone.
    #[test]
    fn the_shim_links_libtorch_cuda() {
        let cpu = mapped_paths().unwrap().into_iter().find(|p| is_lib(p, "libtorch_cpu.so"));
        let cpu = cpu.expect("libtorch_cpu.so is mapped");
        let ships_cuda = cpu.with_file_name("libtorch_cuda.so").exists();
        // SAFETY: no arguments; returns an address set by a static constructor, or null.
        let anchor = unsafe { shim::sire_shim_link_anchor() };
        assert_eq!(
            !anchor.is_null(),
            ships_cuda,
            "link anchor {anchor:?}, libtorch_cuda.so beside {cpu:?}: {ships_cuda}"
        );
        assert_eq!(is_mapped("libtorch_cuda.so"), ships_cuda);
        // With a GPU, libtorch registered CUDA because the library was there at start.
        if cfg!(feature = "cuda-tests") {
            assert!(
                tch::Cuda::is_available(),
                "libtorch_cuda.so is linked, but libtorch did not register CUDA"
            );
        }
    }

    #[test]
    fn resident_set_counts_touched_memory() {
        assert!(page_size() >= 4096);
        assert!(resident_set_bytes() > 0);
        let mut v = vec![0u8; 64 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
        // Whatever other tests free meanwhile, the touched 64 MiB are resident.
        let after = resident_set_bytes();
        assert!(after >= 64 << 20, "{after}");
    }
}
