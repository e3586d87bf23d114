//! The snapshots gRPC service on a real UNIX socket, driven by
//! containerd-client's generated client (what containerd's proxy plugin
//! sends): the ordinary overlay snapshot life cycle, and bad input that must
//! get a clean gRPC error and leave the state intact.

#![allow(clippy::unwrap_used)]

use containerd_client::services::v1::snapshots as pb;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use smr_daemon::{DaemonConfig, MountConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;
use tonic::Code;

struct Server {
    _dir: tempfile::TempDir,
    root: PathBuf,
    sock: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A daemon under `dir` that mounts no image (no smr binary).
fn config(dir: &Path, root: &Path, sock: &Path) -> DaemonConfig {
    DaemonConfig {
        root: root.to_path_buf(),
        snapshotter_socket: sock.to_path_buf(),
        socket: sock.with_file_name("smr.sock"),
        metrics_addr: None,
        release_after: None,
        cri_proxy: None,
        mount: MountConfig {
            smr: PathBuf::from("/nonexistent/smr"),
            cache_dir: dir.join("cache"),
            key_file: None,
            cache_memory: None,
        },
    }
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let sock = dir.path().join("snap.sock");
        let cfg = config(dir.path(), &root, &sock);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            smr_daemon::serve(cfg, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Server {
            _dir: dir,
            root,
            sock,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn client(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(containerd_client::connect(&self.sock).await.unwrap())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }
}

fn prep(key: &str, parent: &str, labels: &[(&str, &str)]) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: "smr".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn commit(name: &str, key: &str) -> pb::CommitSnapshotRequest {
    pb::CommitSnapshotRequest {
        snapshotter: "smr".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    }
}

fn option<'a>(m: &'a containerd_client::types::Mount, prefix: &str) -> &'a str {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {:?}", m.options))
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => panic!("call succeeded"),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

async fn keys(c: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Vec<String> {
    let mut s = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "smr".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        out.extend(m.info.into_iter().map(|i| i.name));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_life_cycle() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    // A first layer: a writable bind mount of an empty directory.
    let m = c
        .prepare(prep("l1-extract", "", &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "bind");
    let l1 = PathBuf::from(&m[0].source);
    std::fs::write(l1.join("a"), b"one").unwrap();
    c.commit(commit("l1", "l1-extract")).await.unwrap();
    // A second layer on it: overlay, lower = the first.
    let m = c
        .prepare(prep("l2-extract", "l1", &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "overlay");
    assert_eq!(option(&m[0], "lowerdir="), l1.display().to_string());
    let upper = PathBuf::from(option(&m[0], "upperdir="));
    std::fs::write(upper.join("b"), vec![7u8; 10_000]).unwrap();
    c.commit(commit("l2", "l2-extract")).await.unwrap();
    // A container on top: two lowers, top first.
    let m = c
        .prepare(prep("ctr", "l2", &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let lowers: Vec<&str> = option(&m[0], "lowerdir=").split(':').collect();
    assert_eq!(lowers.len(), 2);
    assert_eq!(lowers[1], l1.display().to_string());
    assert_eq!(PathBuf::from(lowers[0]), upper);
    // Mounts answers the same as Prepare.
    let again = c
        .mounts(pb::MountsRequest {
            snapshotter: "smr".into(),
            key: "ctr".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, m);
    // A view of one layer: read-only bind of it.
    let v = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: "smr".into(),
            key: "v".into(),
            parent: "l1".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(v[0].r#type, "bind");
    assert!(v[0].options.contains(&"ro".to_string()));
    // Stat, Update, Usage, List with filters.
    let info = c
        .stat(pb::StatSnapshotRequest {
            snapshotter: "smr".into(),
            key: "l2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.parent, "l1");
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    let mut info2 = info.clone();
    info2.labels.insert("x".into(), "1".into());
    let up = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "smr".into(),
            info: Some(info2),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.x".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(up.labels.get("x").map(String::as_str), Some("1"));
    let u = c
        .usage(pb::UsageRequest {
            snapshotter: "smr".into(),
            key: "l2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.size >= 10_000 && u.inodes >= 2, "{u:?}");
    assert_eq!(keys(&mut c, &[]).await, ["ctr", "l1", "l2", "v"]);
    assert_eq!(keys(&mut c, &["labels.x==1"]).await, ["l2"]);
    assert_eq!(
        keys(&mut c, &["kind==active", "parent==l1"]).await,
        ["ctr", "l2", "v"]
    );
    // Remove in containerd's order; the directories go with them.
    for k in ["ctr", "v", "l2", "l1"] {
        c.remove(pb::RemoveSnapshotRequest {
            snapshotter: "smr".into(),
            key: k.into(),
        })
        .await
        .unwrap();
    }
    assert!(keys(&mut c, &[]).await.is_empty());
    assert_eq!(
        std::fs::read_dir(srv.root.join("snapshots"))
            .unwrap()
            .count(),
        0
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clean_errors_and_keeps_state() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    c.prepare(prep("a", "", &[])).await.unwrap();
    c.commit(commit("base", "a")).await.unwrap();
    c.prepare(prep("child", "base", &[])).await.unwrap();
    // Keys that do not exist.
    let (k, m) = code(
        c.stat(pb::StatSnapshotRequest {
            snapshotter: "smr".into(),
            key: "nope".into(),
        })
        .await,
    );
    assert_eq!(k, Code::NotFound);
    assert!(m.contains("nope"), "{m}");
    let (k, _) = code(c.commit(commit("x", "missing")).await);
    assert_eq!(k, Code::NotFound);
    let (k, _) = code(c.prepare(prep("y", "no-such-parent", &[])).await);
    assert_eq!(k, Code::NotFound);
    // Commit of a committed snapshot, Prepare of an existing key, Remove of
    // a snapshot with children, Mounts of a committed one.
    let (k, _) = code(c.commit(commit("x", "base")).await);
    assert_eq!(k, Code::FailedPrecondition);
    let (k, _) = code(c.prepare(prep("child", "base", &[])).await);
    assert_eq!(k, Code::AlreadyExists);
    let (k, _) = code(
        c.remove(pb::RemoveSnapshotRequest {
            snapshotter: "smr".into(),
            key: "base".into(),
        })
        .await,
    );
    assert_eq!(k, Code::FailedPrecondition);
    let (k, _) = code(
        c.mounts(pb::MountsRequest {
            snapshotter: "smr".into(),
            key: "base".into(),
        })
        .await,
    );
    assert_eq!(k, Code::FailedPrecondition);
    // Remote-snapshot labels with garbage digests: refused, naming the label.
    let (k, m) = code(
        c.prepare(prep(
            "extract-1",
            "",
            &[
                ("containerd.io/snapshot.ref", "sha256:abc"),
                ("containerd.io/snapshot/cri.image-ref", "127.0.0.1:1/x:1"),
                (
                    "containerd.io/snapshot/cri.manifest-digest",
                    "sha256:../../etc",
                ),
                (
                    "containerd.io/snapshot/cri.layer-digest",
                    &format!("sha256:{}", "a".repeat(64)),
                ),
            ],
        ))
        .await,
    );
    assert_eq!(k, Code::InvalidArgument);
    assert!(m.contains("cri.manifest-digest"), "{m}");
    // An unsupported filter.
    let r = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "smr".into(),
            filters: vec!["name~=x".into()],
        })
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::InvalidArgument));
    // Garbage on the socket: the connection fails, the server goes on.
    let mut raw = tokio::net::UnixStream::connect(&srv.sock).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\x01\x02garbage")
        .await
        .unwrap();
    drop(raw);
    let mut c = srv.client().await;
    assert_eq!(keys(&mut c, &[]).await, ["base", "child"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_and_cleanup_frees_orphans() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    c.prepare(prep("a", "", &[])).await.unwrap();
    c.commit(commit("base", "a")).await.unwrap();
    c.prepare(prep("gone", "base", &[])).await.unwrap();
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "smr".into(),
        key: "gone".into(),
    })
    .await
    .unwrap();
    let root = srv.root.clone();
    let sock = srv.sock.clone();
    let dir = srv._dir;
    let _ = srv.stop.unwrap().send(());
    srv.task.unwrap().await.unwrap();
    // An orphan directory, as a crash between a Remove's commit and its
    // rm -r leaves (snapshot 2 was "gone"); and one of a Prepare whose
    // transaction a crash cut short (id 3, not allocated yet: kept, and
    // reused by the next Prepare).
    std::fs::create_dir_all(root.join("snapshots/2/fs")).unwrap();
    std::fs::create_dir_all(root.join("snapshots/3/fs")).unwrap();
    let srv2 = restart(dir, root.clone(), sock).await;
    let mut c = srv2.client().await;
    assert_eq!(keys(&mut c, &[]).await, ["base"]);
    c.cleanup(pb::CleanupRequest {
        snapshotter: "smr".into(),
    })
    .await
    .unwrap();
    assert!(!root.join("snapshots/2").exists());
    assert!(root.join("snapshots/1").exists() && root.join("snapshots/3").exists());
    assert_eq!(
        std::fs::read_dir(root.join("snapshots")).unwrap().count(),
        2
    );
    srv2.stop().await;
}

async fn restart(dir: tempfile::TempDir, root: PathBuf, sock: PathBuf) -> Server {
    let cfg = config(dir.path(), &root, &sock);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        smr_daemon::serve(cfg, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    wait_for(&sock).await;
    Server {
        _dir: dir,
        root,
        sock,
        stop: Some(tx),
        task: Some(task),
    }
}

async fn wait_for(sock: &Path) {
    for _ in 0..200 {
        if sock.exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{} did not appear", sock.display());
}
