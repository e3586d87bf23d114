//! Generates the server side of containerd's snapshots service
//! (`containerd.services.snapshots.v1.Snapshots`). The messages are the
//! ones `containerd-client` generates from containerd's own protos, so only
//! the routing is generated here, with no protoc run.

use tonic_build::manual::{Builder, Method, Service};

fn method(name: &str, route: &str, input: &str, output: &str) -> Method {
    Method::builder()
        .name(name)
        .route_name(route)
        .input_type(input)
        .output_type(output)
        .codec_path("tonic_prost::ProstCodec")
        .build()
}

fn main() {
    let m = |n: &str| format!("containerd_client::services::v1::snapshots::{n}");
    let unary = [
        (
            "prepare",
            "Prepare",
            "PrepareSnapshotRequest",
            Some("PrepareSnapshotResponse"),
        ),
        (
            "view",
            "View",
            "ViewSnapshotRequest",
            Some("ViewSnapshotResponse"),
        ),
        ("mounts", "Mounts", "MountsRequest", Some("MountsResponse")),
        ("commit", "Commit", "CommitSnapshotRequest", None),
        ("remove", "Remove", "RemoveSnapshotRequest", None),
        (
            "stat",
            "Stat",
            "StatSnapshotRequest",
            Some("StatSnapshotResponse"),
        ),
        (
            "update",
            "Update",
            "UpdateSnapshotRequest",
            Some("UpdateSnapshotResponse"),
        ),
        ("usage", "Usage", "UsageRequest", Some("UsageResponse")),
        ("cleanup", "Cleanup", "CleanupRequest", None),
    ];
    let mut service = Service::builder()
        .name("Snapshots")
        .package("containerd.services.snapshots.v1");
    for (name, route, input, output) in unary {
        let output = output.map_or_else(|| "crate::proto::Empty".to_string(), m);
        service = service.method(method(name, route, &m(input), &output));
    }
    let list = Method::builder()
        .name("list")
        .route_name("List")
        .input_type(m("ListSnapshotsRequest"))
        .output_type(m("ListSnapshotsResponse"))
        .codec_path("tonic_prost::ProstCodec")
        .server_streaming()
        .build();
    service = service.method(list);
    Builder::new()
        .build_client(false)
        .compile(&[service.build()]);
}
