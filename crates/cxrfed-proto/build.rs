//! Compiles `proto/cxrfed/v1/*.proto` with protox (pure Rust, no system `protoc`) and generates
//! tonic/prost code plus the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled once may serve checkouts at other paths.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "cxrfed/v1/record.proto",
        "cxrfed/v1/node.proto",
        "cxrfed/v1/coordinator.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("cxrfed_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Weights chunks are slices of one shared buffer: sending a model to many sites
        // copies nothing.
        .bytes(".cxrfed.v1.Chunk.data")
        // Upload chunks are slices of the receive buffer on the node (no copy per message)
        // and of one file buffer on a client (a retry or a benchmark resends without copying).
        .bytes(".cxrfed.v1.ExtractRequest.chunk")
        // Maps as BTreeMap: a message encodes to the same bytes every time (found by fuzzing:
        // with HashMap, re-encoding a decoded message reordered its map entries), which
        // anything that hashes, compares or signs an encoding relies on.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
