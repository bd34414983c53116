//! Kiln's wire protocol: the generated code for package `kiln.v1` (see
//! `proto/kiln/v1/kiln.proto`, where every message and field is documented) plus small helpers
//! that every user of the protocol needs: state names as users see them, the coordinator's
//! address as users write it (`address`), the one validation of job specs and resources
//! (`validate`), and the descriptor set that server reflection serves.
#![deny(missing_docs)]

/// Generated messages, the `Coordinator` and `AgentLink` services, clients and servers.
pub mod v1 {
    tonic::include_proto!("kiln.v1");
}

/// The encoded `FileDescriptorSet` of `kiln.v1`, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");

pub mod address;
mod names;
pub mod validate;
pub use names::*;
