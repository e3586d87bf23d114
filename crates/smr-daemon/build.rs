//! Generates the server side of containerd's snapshots service
//! (`containerd.services.snapshots.v1.Snapshots`). The messages are the
//! ones `containerd-client` generates from containerd's own protos, so only
//! the routing is generated here, with no protoc run.

use tonic_build::manual::{Builder, Method, Service};

fn method(name: &str, route: &str, input: &str, output: &str, streaming: bool) -> Method {
    let b = Method::builder()
        .name(name)
        .route_name(route)
        .input_type(input)
        .output_type(output)
        .codec_path("tonic_prost::ProstCodec");
    if streaming {
        b.server_streaming().build()
    } else {
        b.build()
    }
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
        service = service.method(method(name, route, &m(input), &output, false));
    }
    let list = method(
        "list",
        "List",
        &m("ListSnapshotsRequest"),
        &m("ListSnapshotsResponse"),
        true,
    );
    service = service.method(list);
    Builder::new()
        .build_client(false)
        .compile(&[service.build()]);
}
