//! Every raw libc call of the crate, in one place. Each call is checked and each
//! `unsafe` block says why it is sound.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// What [`ensure_libtorch_cuda_loaded`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoadOutcome {
    /// `libtorch_cuda.so` was already mapped (linked, or loaded before).
    AlreadyLoaded,
    /// This call loaded it from this path.
    Loaded(PathBuf),
    /// There is no `libtorch_cuda.so` beside `libtorch_cpu.so`: a CPU-only libtorch.
    NotPresent,
    /// It could not be loaded; the message says why (`dlerror`, missing CUDA
    /// libraries, no `libtorch_cpu.so` mapped).
    Failed(String),
}

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

/// Makes sure `libtorch_cuda.so` is loaded, so that libtorch registers its
/// CUDA backend.
///
/// Rust links with `--as-needed`, and no Rust symbol references
/// `libtorch_cuda.so`, so a downstream binary usually lacks it and
/// `tch::Cuda::is_available()` says false even on a GPU machine. This loads the
/// `libtorch_cuda.so` that sits beside the mapped `libtorch_cpu.so` with
/// `RTLD_NOW | RTLD_GLOBAL`; the handle is never closed. Calls are serialised;
/// a second call answers [`LoadOutcome::AlreadyLoaded`].
pub(crate) fn ensure_libtorch_cuda_loaded() -> LoadOutcome {
    static LOCK: Mutex<()> = Mutex::new(());
    let _serial = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Reference a libtorch-backed symbol so that `libtorch_cpu.so` is a
    // dependency of any binary that uses this function (it always is in
    // practice: the crate calls into tch everywhere).
    std::hint::black_box(tch::utils::has_cuda as fn() -> bool);

    let paths = match mapped_paths() {
        Ok(p) => p,
        Err(e) => return LoadOutcome::Failed(format!("cannot read /proc/self/maps: {e}")),
    };
    if paths.iter().any(|p| is_lib(p, "libtorch_cuda.so")) {
        return LoadOutcome::AlreadyLoaded;
    }
    let Some(cpu) = paths.iter().find(|p| is_lib(p, "libtorch_cpu.so")) else {
        return LoadOutcome::Failed(
            "libtorch_cpu.so is not mapped in this process, so libtorch_cuda.so cannot be \
             located"
                .into(),
        );
    };
    let Some(dir) = cpu.parent() else {
        return LoadOutcome::Failed(format!("{cpu:?} has no parent directory"));
    };
    let cuda = dir.join("libtorch_cuda.so");
    if !cuda.exists() {
        return LoadOutcome::NotPresent;
    }
    match dlopen_global(&cuda) {
        Ok(()) => LoadOutcome::Loaded(cuda),
        Err(e) => LoadOutcome::Failed(e),
    }
}

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`, leaking the handle on purpose.
fn dlopen_global(path: &Path) -> Result<(), String> {
    let c = c_path(path).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call and the
    // flags are valid. Loading runs the library's initialisers: for
    // libtorch_cuda.so these register the CUDA backend with the libtorch_cpu.so
    // already loaded from the same directory (the same thing `import torch`
    // does). The handle is never closed, so nothing it registers can dangle.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated string that stays
        // valid until the next dl* call on this thread; it is copied at once.
        let msg = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!("dlopen({path:?}) failed: {msg}"));
    }
    Ok(())
}

#[cfg(test)]
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn loads_libtorch_cuda() {
        // Other tests in this process may have loaded it already.
        let first = ensure_libtorch_cuda_loaded();
        assert!(matches!(first, LoadOutcome::Loaded(_) | LoadOutcome::AlreadyLoaded), "{first:?}");
        assert!(is_mapped("libtorch_cuda.so"));
        assert_eq!(ensure_libtorch_cuda_loaded(), LoadOutcome::AlreadyLoaded);
    }

    /// Environment variable that turns [`fresh_process_probe`] on in a child.
    const PROBE: &str = "SIRE_FFI_FRESH_PROCESS_PROBE";

    /// Runs [`fresh_process_probe`] alone in a new process of this test binary,
    /// where nothing has loaded `libtorch_cuda.so` yet.
    #[test]
    fn loads_libtorch_cuda_in_a_fresh_process() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "ffi::tests::fresh_process_probe", "--test-threads=1", "--nocapture"])
            .env(PROBE, "1")
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{text}");
        assert!(text.contains("probe ok: loaded "), "{text}");
        assert!(text.contains("1 passed"), "{text}");
        // Shown with --nocapture.
        println!("{text}");
    }

    /// A no-op unless [`PROBE`] is set (then it runs alone in its own process).
    #[test]
    fn fresh_process_probe() {
        if std::env::var_os(PROBE).is_none() {
            return;
        }
        // Test binaries are linked without the link fix (see build.rs), as a
        // downstream binary would be: `--as-needed` dropped libtorch_cuda.so.
        assert!(is_mapped("libtorch_cpu.so"));
        assert!(
            !is_mapped("libtorch_cuda.so"),
            "libtorch_cuda.so is mapped at start: the test binary was linked with it"
        );
        let outcome = ensure_libtorch_cuda_loaded();
        let LoadOutcome::Loaded(path) = &outcome else {
            panic!("expected Loaded, got {outcome:?}");
        };
        assert!(path.ends_with("libtorch_cuda.so"), "{path:?}");
        assert!(is_mapped("libtorch_cuda.so"));
        assert_eq!(ensure_libtorch_cuda_loaded(), LoadOutcome::AlreadyLoaded);
        // Loading must not break libtorch without a GPU, and must register CUDA with one.
        let available = tch::Cuda::is_available();
        println!(
            "after loading: Cuda::is_available() = {available}, device_count = {}",
            tch::Cuda::device_count()
        );
        #[cfg(feature = "cuda-tests")]
        assert!(available, "libtorch_cuda.so was loaded but libtorch did not register CUDA");
        println!("probe ok: loaded {}", path.display());
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
