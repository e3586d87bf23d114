//! What kubelet does, through containerd's CRI plugin with smr as its
//! snapshotter: PullImage, RunPodSandbox, CreateContainer, StartContainer,
//! driven by a CRI client (the k8s-cri crate's generated stubs) over
//! containerd's socket. No smr command is involved: CRI's labels reach the
//! snapshotter, which serves the image lazily.

use crate::node::{bytes_under, Node};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::time::{Duration, Instant};

fn sandbox_config(log_dir: &std::path::Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "smr-pod".into(),
            uid: "smr-pod-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                // The host's network: no CNI plugin is needed.
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn cri_pull_and_run_is_lazy() {
    let Some(node) = Node::start_with(false, true) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = containerd_client::connect(&node.containerd).await.unwrap();
        let mut images = ImageServiceClient::new(ch.clone());
        let mut runtime = RuntimeServiceClient::new(ch);
        let image = format!("{}/py:1", node.reg.addr);
        let log_dir = node.dir.path().join("pod-logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let sb_config = sandbox_config(&log_dir);
        let t = Instant::now();
        images
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                sandbox_config: Some(sb_config.clone()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", node.daemon_log()));
        eprintln!("CRI PullImage of debian-python took {:?}", t.elapsed());
        let log = node.daemon_log();
        assert!(
            log.contains("remote snapshot") && log.contains("top=true"),
            "{log}"
        );
        let sandbox = runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sb_config.clone()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| {
                let log = std::fs::read_to_string(node.dir.path().join("ctd/containerd.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "RunPodSandbox: {e}\ncontainerd log (last lines first):\n{}",
                    tail.join("\n")
                )
            })
            .into_inner()
            .pod_sandbox_id;
        let ctr = runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "py".into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    command: vec!["python3".into()],
                    args: vec![
                        "-c".into(),
                        "import json; print('cri', json.dumps({'ok': 1}))".into(),
                    ],
                    log_path: "py.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sb_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}"))
            .into_inner()
            .container_id;
        runtime
            .start_container(cri::StartContainerRequest {
                container_id: ctr.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer: {e}"));
        let t = Instant::now();
        let exit = loop {
            let st = runtime
                .container_status(cri::ContainerStatusRequest {
                    container_id: ctr.clone(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if st.state == cri::ContainerState::ContainerExited as i32 {
                break st.exit_code;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "container did not exit: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let out = std::fs::read_to_string(log_dir.join("py.log")).unwrap_or_default();
        assert_eq!(exit, 0, "{out}");
        assert!(out.contains("cri {\"ok\": 1}"), "{out}");
        let fetched = bytes_under(&node.cache());
        eprintln!("debian-python via CRI: {fetched} bytes fetched into the node cache");
        assert!(fetched < 100 << 20, "{fetched}");
        // Tear down as kubelet would; the image's snapshots go with it.
        runtime
            .remove_container(cri::RemoveContainerRequest { container_id: ctr })
            .await
            .unwrap();
        runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: sandbox.clone(),
            })
            .await
            .unwrap();
        runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: sandbox,
            })
            .await
            .unwrap();
        images
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image,
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    });
}

#[test]
fn pull_secrets_given_to_cri_reach_the_lazy_image_mounts() {
    let creds = ("puller", "pull-secret-123");
    let Some(mut node) = Node::start_full(false, true, Some(&format!("{}:{}", creds.0, creds.1)))
    else {
        return;
    };
    // The daemon fronts containerd's CRI image service.
    let proxy = node.dir.path().join("cri-images.sock");
    node.daemon_args = vec![
        "--cri-image-socket".into(),
        proxy.display().to_string(),
        "--containerd".into(),
        node.containerd.display().to_string(),
    ];
    node.start_daemon();
    let t = Instant::now();
    while !proxy.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}",
            node.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = containerd_client::connect(&proxy).await.unwrap();
        let mut images = ImageServiceClient::new(ch);
        let image = format!("{}/py:1", node.reg.addr);
        let pull = |auth: Option<cri::AuthConfig>| cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            auth,
            ..Default::default()
        };
        // Without the secret the registry refuses containerd too.
        let e = images.pull_image(pull(None)).await.unwrap_err();
        assert!(!e.message().is_empty());
        let auth = cri::AuthConfig {
            username: creds.0.into(),
            password: creds.1.into(),
            ..Default::default()
        };
        images
            .pull_image(pull(Some(auth)))
            .await
            .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", node.daemon_log()));
        let listed = images
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(
            listed
                .images
                .iter()
                .any(|i| i.repo_tags.iter().any(|t| t.ends_with("/py:1"))),
            "{listed:?}"
        );
    });
    // The layers became remote snapshots: the daemon mounted the image
    // with the pull's credentials, and never logged them.
    let log = node.daemon_log();
    assert!(
        log.contains("registry credentials recorded from a CRI pull"),
        "{log}"
    );
    assert!(
        log.contains("remote snapshot") && log.contains("top=true"),
        "{log}"
    );
    assert!(!log.contains(creds.1), "the secret is in the daemon's log");
}
