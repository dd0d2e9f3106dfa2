//! Generates the gRPC types, client and server from `ferrovia.proto` (needs `protoc`,
//! Debian's `protobuf-compiler`, which `cargo xtask setup` installs).
fn main() -> std::io::Result<()> {
    tonic_prost_build::configure().compile_protos(&["ferrovia.proto"], &["."])
}
