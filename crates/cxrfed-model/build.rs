//! Re-exports torch-sys's libtorch directory to dependents (`DEP_CXRFED_MODEL_LIBTORCH_LIB`)
//! and links this crate's own test binaries against it (see `link_libtorch.rs`).

include!("link_libtorch.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link_libtorch.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:libtorch_lib={dir}");
        link_libtorch(&dir);
    }
}
