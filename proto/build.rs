//! Generates the protobuf types and the gRPC service from `proto/` with protox, a protobuf
//! compiler written in Rust, so a build needs nothing but the Rust toolchain (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/sflow_relay/v1/relay.proto",
        "proto/sflow_relay/enroll/v1/enroll.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
