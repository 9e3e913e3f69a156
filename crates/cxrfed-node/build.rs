//! Same as the cxrfed binary's build script, for this crate's test binaries: embeds an rpath to
//! libtorch (from the project's virtualenv torch wheel) so they run
//! without LD_LIBRARY_PATH, and keeps libtorch_cuda linked: the linker's default --as-needed
//! would drop it because no symbol is referenced directly, and CUDA would silently be
//! unavailable at run time.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_CXRFED_MODEL_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_CXRFED_MODEL_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{dir}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
