//! Link fix for the crate's own tests, examples and benches (see `GPU.md`):
//! `--as-needed` drops `libtorch_cuda.so` because no Rust symbol references it,
//! and then CUDA is silently unavailable. Downstream binaries do not get these
//! arguments; the library loads `libtorch_cuda.so` itself at set-up instead.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // Tests are deliberately left without the fix: they run as a downstream
        // user's binary would, so they exercise the library-side loading.
        for kind in ["examples", "benches"] {
            println!("cargo:rustc-link-arg-{kind}=-Wl,-rpath,{dir}");
            println!("cargo:rustc-link-arg-{kind}=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
        // Tests still need to find libtorch at run time.
        println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{dir}");
    }
}
