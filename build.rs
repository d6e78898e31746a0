//! Build script: the C++ shim, and the link fix for the crate's own binaries.
//!
//! 1. `csrc/sire_shim.cpp` (the CUDA calls `tch` lacks: memory info, allocator
//!    statistics and cache, pinned host tensors, streams and events) is compiled
//!    against the headers of the libtorch that `torch-sys` found (`lib/../include`;
//!    no CUDA header is needed). When that libtorch has `libtorch_cuda.so`, the
//!    shim references one of its symbols and links it, so that every binary using
//!    sire keeps `libtorch_cuda.so` as a dependency despite `--as-needed` and
//!    libtorch registers its CUDA backend (GPU.md, "the link trap"). Against a
//!    CPU-only libtorch the shim builds without that reference and its calls
//!    answer `Error::NoCuda`.
//! 2. An rpath to libtorch's lib directory for the crate's tests, examples and
//!    benches, so they run without `LD_LIBRARY_PATH`.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/sire_shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // `torch-sys` (direct dependency, `links = "tch"`) exports its lib directory.
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        // torch-sys's `doc-only` mode: nothing to compile against. Documentation
        // and `cargo check` still work; linking a binary would not.
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: sire's C++ shim is not built");
        return;
    };
    let lib = PathBuf::from(&dir);
    build_shim(&lib);
    for kind in ["tests", "examples", "benches"] {
        println!("cargo:rustc-link-arg-{kind}=-Wl,-rpath,{dir}");
    }
}

fn build_shim(lib: &Path) {
    let include = lib.parent().map(|p| p.join("include")).filter(|p| p.join("ATen").is_dir());
    let Some(include) = include else {
        panic!(
            "sire: libtorch's headers are not at {}/../include (ATen/ missing); \
             sire's C++ shim needs them",
            lib.display()
        );
    };
    let link_cuda = lib.join("libtorch_cuda.so").exists();
    if !link_cuda {
        println!(
            "cargo:warning=no libtorch_cuda.so in {}: a CPU-only libtorch, sire's CUDA calls \
             will answer Error::NoCuda",
            lib.display()
        );
    }
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi(lib).as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        .define("SIRE_SHIM_LINK_CUDA", if link_cuda { "1" } else { "0" })
        .file("csrc/sire_shim.cpp")
        // Whole-archive: the shim's object is in every binary that links sire,
        // not only in those that call it, and so is its static constructor that
        // references libtorch_cuda.so (see csrc/sire_shim.cpp).
        .link_lib_modifier("+whole-archive")
        .compile("sire_shim");
    if link_cuda {
        // After the shim on the link line: `--as-needed` keeps it because the
        // shim references it.
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
}

/// The C++ ABI libtorch was built with: `LIBTORCH_CXX11_ABI` (as for torch-sys),
/// else whether `libc10.so` exports `[abi:cxx11]` symbols (mangled `B5cxx11`).
fn cxx11_abi(lib: &Path) -> String {
    if let Ok(v) = std::env::var("LIBTORCH_CXX11_ABI") {
        return v;
    }
    let c10 = lib.join("libc10.so");
    match std::fs::read(&c10) {
        Ok(bytes) => {
            let tagged = bytes.windows(7).any(|w| w == b"B5cxx11");
            (if tagged { "1" } else { "0" }).to_string()
        }
        Err(e) => {
            println!("cargo:warning=cannot read {} ({e}); assuming the C++11 ABI", c10.display());
            "1".to_string()
        }
    }
}
