//! Compiles the gRPC interfaces in `proto/sde/v1/` (AdminService, AuditService) with protox, a
//! protobuf compiler in Rust, so no `protoc` is needed on the build machine. The encoded
//! descriptor set is kept for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut protos: Vec<PathBuf> = std::fs::read_dir("proto/sde/v1")?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    protos.retain(|p| p.extension().is_some_and(|e| e == "proto"));
    protos.sort();
    let descriptors = protox::compile(&protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("sde_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Requests are written to the audit log as JSON (what an administrator asked for).
        .type_attribute(".sde.v1", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
