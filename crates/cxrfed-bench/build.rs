//! Links this package's binaries and test binaries against libtorch with an rpath and with
//! libtorch_cuda kept (see `cxrfed-model/link_libtorch.rs`).

include!("../cxrfed-model/link_libtorch.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../cxrfed-model/link_libtorch.rs");
    println!("cargo:rerun-if-env-changed=DEP_CXRFED_MODEL_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_CXRFED_MODEL_LIBTORCH_LIB") {
        link_libtorch(&dir);
    }
}
