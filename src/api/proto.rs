//! The generated code for `proto/sde/v1/` (messages, servers and clients), and the encoded
//! descriptor set that gRPC reflection serves.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("sde.v1");

/// The file descriptor set of every `sde.v1` service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sde_descriptor");
