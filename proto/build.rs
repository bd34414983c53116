//! Compiles `proto/kiln/v1/kiln.proto` with the vendored protoc, so no system protoc is needed,
//! and writes the file descriptor set that server reflection serves.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // `AgentLink.Connect` would clash with the generated `connect(dst)` constructor, so clients
    // are built from a `Channel` with `new` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .file_descriptor_set_path(out_dir.join("kiln_descriptor.bin"))
        .compile_protos(&["proto/kiln/v1/kiln.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/kiln/v1/kiln.proto");
    Ok(())
}
