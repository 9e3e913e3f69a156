// Shared by the build scripts of cxrfed-model, cxrfed-node and cxrfed (`include!`d): cargo
// passes link arguments only to the targets of the package whose build script prints them, so
// every package with binaries or tests that link libtorch needs them.

/// Embeds an rpath to libtorch (the project's virtualenv torch wheel) so binaries and test
/// binaries run without LD_LIBRARY_PATH, and keeps libtorch_cuda linked: the linker's default
/// --as-needed would drop it because no symbol is referenced directly, and CUDA would silently
/// be unavailable at run time.
fn link_libtorch(dir: &str) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    if std::path::Path::new(dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{dir}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
