//! A CRI image service in front of containerd's: kubelet (or any CRI
//! client) pulls through it, every call is passed on to containerd's CRI
//! plugin unchanged, and the registry credentials of a `PullImage` (the
//! pod's image pull secret) are recorded in the daemon's [`Keychain`]
//! first, so that the lazy image mounts the pull leads to can read a
//! private registry the node's docker config knows nothing of. Point
//! kubelet's `--image-service-endpoint` at this socket and keep its
//! runtime endpoint on containerd.

use crate::keychain::Keychain;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The proxy: containerd's CRI image service, and where credentials go.
pub struct CriImageProxy {
    containerd: PathBuf,
    upstream: tokio::sync::OnceCell<ImageServiceClient<Channel>>,
    keychain: Arc<Keychain>,
}

impl CriImageProxy {
    /// A proxy to containerd on `containerd` (its socket, connected at the
    /// first call: containerd may start after the daemon), recording into
    /// `keychain`.
    pub fn new(containerd: &Path, keychain: Arc<Keychain>) -> Self {
        CriImageProxy {
            containerd: containerd.to_path_buf(),
            upstream: tokio::sync::OnceCell::new(),
            keychain,
        }
    }

    /// containerd's image service (connected once).
    async fn upstream(&self) -> Result<ImageServiceClient<Channel>, Status> {
        let c = self
            .upstream
            .get_or_try_init(|| async {
                containerd_client::connect(&self.containerd)
                    .await
                    .map(ImageServiceClient::new)
                    .map_err(|e| {
                        Status::unavailable(format!(
                            "connecting to containerd at {}: {e}",
                            self.containerd.display()
                        ))
                    })
            })
            .await?;
        Ok(c.clone())
    }

    /// The gRPC service.
    pub fn service(self) -> ImageServiceServer<CriImageProxy> {
        ImageServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl ImageService for CriImageProxy {
    async fn list_images(
        &self,
        r: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        self.upstream().await?.list_images(r.into_inner()).await
    }

    async fn image_status(
        &self,
        r: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        self.upstream().await?.image_status(r.into_inner()).await
    }

    async fn pull_image(
        &self,
        r: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = r.into_inner();
        if let (Some(image), Some(auth)) = (&req.image, &req.auth) {
            self.keychain
                .record(&image.image, &auth.username, &auth.password, &auth.auth);
        }
        self.upstream().await?.pull_image(req).await
    }

    async fn remove_image(
        &self,
        r: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        self.upstream().await?.remove_image(r.into_inner()).await
    }

    async fn image_fs_info(
        &self,
        r: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        self.upstream().await?.image_fs_info(r.into_inner()).await
    }
}

/// Where the proxy listens and what it forwards to.
#[derive(Debug, Clone)]
pub struct CriProxyConfig {
    /// The socket kubelet's image service endpoint names.
    pub socket: PathBuf,
    /// containerd's socket (its CRI plugin).
    pub containerd: PathBuf,
}
