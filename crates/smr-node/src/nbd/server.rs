//! Listening, accepting, per-connection lifecycle and shutdown.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::conns::{Activity, Table};
use super::export::Export;
use super::handshake::{negotiate, Outcome};
use super::{transmission, NbdError, Result};

/// Tunables of an [`NbdServer`]; `Default` suits a node daemon.
///
/// Memory: what requests hold is bounded per connection and, across all
/// connections and exports, per server ([`ServerConfig::server_max_in_flight_bytes`]);
/// request bytes are held from the time a request is accepted until its
/// reply has been written, so a client that does not read its replies
/// holds back only its own share once the server-wide budget is used.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A client must finish option haggling within this time.
    pub handshake_timeout: Duration,
    /// Connections served at once. A client beyond it takes the slot of
    /// the connection idle longest, if that one has been idle for
    /// [`evict_idle_after`](Self::evict_idle_after); else it is closed on
    /// accept.
    pub max_connections: usize,
    /// Connections from one IP address served at once (TCP; UNIX-socket
    /// clients count against `max_connections` only), with the same rule.
    pub max_connections_per_address: usize,
    /// How long a connection must have been idle (no request in flight or
    /// received) to give way to a new client over a limit.
    pub evict_idle_after: Duration,
    /// Close a connection idle this long even with no one waiting. Off by
    /// default: kernel and FUSE clients stay connected, idle, while a device
    /// is in use.
    pub idle_timeout: Option<Duration>,
    /// Requests of one connection processed concurrently.
    pub max_in_flight: usize,
    /// READ/WRITE buffer bytes of one connection in flight (a larger
    /// request waits for, and takes, all of it).
    pub max_in_flight_bytes: usize,
    /// Requests of all connections processed concurrently (each may block
    /// a thread on a chunk fetch, so this also bounds the server's threads).
    pub server_max_in_flight: usize,
    /// READ/WRITE bytes of all connections in flight (a larger request
    /// waits for, and takes, all of it).
    pub server_max_in_flight_bytes: usize,
    /// On shutdown, how long connections get to answer in-flight requests.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    /// Sized for a node serving a handful of images: 48 requests and
    /// 16 MiB in flight across all clients keep two cores busy on a warm
    /// cache (a request reads its chunks from disk one after another, so
    /// the disk sees many requests at once) and a cold one fetching
    /// (one fetch per chunk of each request in flight), while the whole
    /// process stays under 64 MiB serving 4 images under load
    /// (docs/BENCHMARKS.md). One connection may use half of it.
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_connections_per_address: 64,
            evict_idle_after: Duration::from_secs(10),
            idle_timeout: None,
            max_in_flight: 32,
            max_in_flight_bytes: 8 << 20,
            server_max_in_flight: 48,
            server_max_in_flight_bytes: 16 << 20,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The server-wide request and byte budgets shared by every connection.
pub(crate) struct Budget {
    pub(crate) requests: Arc<Semaphore>,
    pub(crate) bytes: Arc<Semaphore>,
    /// Permits in `bytes`.
    pub(crate) max_bytes: usize,
}

impl Budget {
    fn new(config: &ServerConfig) -> Self {
        // A request larger than the whole budget takes all of it.
        let max_bytes = config
            .server_max_in_flight_bytes
            .clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            requests: Arc::new(Semaphore::new(config.server_max_in_flight.max(1))),
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
        }
    }
}

/// Receiver side of the server's stop signal.
pub(crate) type Shutdown = watch::Receiver<bool>;

/// Resolve once shutdown was requested (or the server is gone).
pub(crate) async fn wait_shutdown(rx: &mut Shutdown) {
    // An error means the sender was dropped: treat as shutdown.
    let _ = rx.wait_for(|stop| *stop).await;
}

struct Shared {
    exports: Vec<Export>,
    conns: Arc<Table>,
    config: ServerConfig,
    budget: Budget,
    stop: watch::Sender<bool>,
}

/// An NBD server exporting one or more block devices.
///
/// Cheap to clone; clones share exports and the stop signal. Serve with
/// [`serve_tcp`](Self::serve_tcp) / [`serve_unix`](Self::serve_unix) inside
/// a tokio runtime, or with [`spawn_tcp`](Self::spawn_tcp) /
/// [`spawn_unix`](Self::spawn_unix) from synchronous code.
#[derive(Clone)]
pub struct NbdServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.shared.exports)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl NbdServer {
    /// A server with default configuration. The first export is the default
    /// one (selected by the empty name).
    pub fn new(exports: Vec<Export>) -> Result<Self> {
        Self::with_config(exports, ServerConfig::default())
    }

    /// A server with explicit configuration.
    pub fn with_config(exports: Vec<Export>, config: ServerConfig) -> Result<Self> {
        if exports.is_empty() {
            return Err(NbdError::NoExports);
        }
        let mut names = HashSet::new();
        for e in &exports {
            e.check()?;
            if !names.insert(e.name.as_str()) {
                return Err(NbdError::DuplicateExport(e.name.clone()));
            }
        }
        let (stop, _) = watch::channel(false);
        Ok(Self {
            shared: Arc::new(Shared {
                exports,
                conns: Table::new(),
                budget: Budget::new(&config),
                config,
                stop,
            }),
        })
    }

    /// The exports served.
    pub fn exports(&self) -> &[Export] {
        &self.shared.exports
    }

    /// Ask every `serve_*` loop and connection to stop: no new connections
    /// or requests are accepted, in-flight requests are answered.
    pub fn shutdown(&self) {
        self.shared.stop.send_replace(true);
    }

    /// Accept TCP clients until [`shutdown`](Self::shutdown).
    pub async fn serve_tcp(&self, listener: tokio::net::TcpListener) -> Result<()> {
        let listener = &listener;
        self.accept_loop(move || async move {
            let (s, peer) = listener.accept().await?;
            // Replies are written whole; do not let Nagle delay them.
            s.set_nodelay(true)?;
            Ok((s, Some(peer.ip()), peer.to_string()))
        })
        .await
    }

    /// Accept UNIX-socket clients until [`shutdown`](Self::shutdown).
    pub async fn serve_unix(&self, listener: tokio::net::UnixListener) -> Result<()> {
        let listener = &listener;
        self.accept_loop(move || async move {
            let (s, _) = listener.accept().await?;
            set_send_buffer(&s);
            Ok((s, None, "unix".to_string()))
        })
        .await
    }

    async fn accept_loop<S, F, Fut>(&self, mut accept: F) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<(S, Option<std::net::IpAddr>, String)>>,
    {
        let mut stop = self.shared.stop.subscribe();
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = wait_shutdown(&mut stop) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                r = accept() => match r {
                    Ok((stream, ip, peer)) => {
                        let slot = match self.shared.conns.admit(ip, &self.shared.config) {
                            Ok(slot) => slot,
                            Err(refusal) => {
                                tracing::warn!(%peer, "NBD client refused: {refusal}");
                                drop(stream);
                                continue;
                            }
                        };
                        let server = self.clone();
                        conns.spawn(async move {
                            tracing::debug!(%peer, "NBD client connected");
                            let activity = slot.activity.clone();
                            let r = server.serve_admitted(stream, activity).await;
                            drop(slot);
                            match r {
                                Ok(()) => tracing::debug!(%peer, "NBD client done"),
                                Err(e) => tracing::info!(%peer, error = %e, "NBD client dropped"),
                            }
                        });
                    }
                    Err(e) => {
                        // E.g. EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        let grace = self.shared.config.shutdown_grace;
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drain).await.is_err() {
            tracing::warn!(
                left = conns.len(),
                "NBD connections did not finish in time; aborting"
            );
            conns.shutdown().await;
        }
        Ok(())
    }

    /// Serve one already-connected client (any byte stream) to the end.
    ///
    /// Returns `Ok` when the client disconnected or the server stopped, an
    /// error when the client broke the protocol or the stream failed.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_admitted(stream, Arc::new(Activity::new(std::time::Instant::now())))
            .await
    }

    /// [`serve_connection`](Self::serve_connection) of a client whose
    /// activity the connection table watches.
    async fn serve_admitted<S>(&self, stream: S, activity: Arc<Activity>) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut stop = self.shared.stop.subscribe();
        if *stop.borrow() {
            return Ok(());
        }
        let (mut reader, mut writer) = tokio::io::split(stream);
        let config = &self.shared.config;
        let handshake = negotiate(&mut reader, &mut writer, &self.shared.exports);
        let outcome = tokio::select! {
            r = tokio::time::timeout(config.handshake_timeout, handshake) => match r {
                Ok(r) => r,
                Err(_) => Err(NbdError::HandshakeTimeout),
            },
            _ = wait_shutdown(&mut stop) => return Ok(()),
            _ = activity.closed() => return Ok(()),
        };
        let session = match outcome {
            Ok(Outcome::Transmission(s)) => s,
            Ok(Outcome::Closed) => {
                let _ = writer.shutdown().await;
                return Ok(());
            }
            Err(e) => {
                let _ = writer.shutdown().await;
                return Err(e);
            }
        };
        tracing::debug!(export = %session.export.name, structured = session.structured, "NBD transmission");
        let budget = &self.shared.budget;
        transmission::serve(reader, writer, session, config, budget, stop, activity).await
    }

    /// Serve TCP clients on a runtime of its own, from synchronous code.
    pub fn spawn_tcp(&self, listener: std::net::TcpListener) -> Result<ServerHandle> {
        listener.set_nonblocking(true)?;
        self.spawn("smr-nbd-tcp", move |server| async move {
            server
                .serve_tcp(tokio::net::TcpListener::from_std(listener)?)
                .await
        })
    }

    /// Serve UNIX-socket clients on a runtime of its own, from synchronous code.
    pub fn spawn_unix(&self, listener: std::os::unix::net::UnixListener) -> Result<ServerHandle> {
        listener.set_nonblocking(true)?;
        self.spawn("smr-nbd-unix", move |server| async move {
            server
                .serve_unix(tokio::net::UnixListener::from_std(listener)?)
                .await
        })
    }

    fn spawn<F, Fut>(&self, name: &str, run: F) -> Result<ServerHandle>
    where
        F: FnOnce(NbdServer) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>>,
    {
        // Device calls run on the blocking pool, at most
        // `server_max_in_flight` at once; a few more threads for the rest.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name(name)
            .max_blocking_threads(self.shared.config.server_max_in_flight.max(1) + 4)
            .enable_all()
            .build()?;
        let server = self.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let r = runtime.block_on(run(server));
                // Device calls stuck in the blocking pool must not hang the caller.
                runtime.shutdown_timeout(Duration::from_secs(5));
                r
            })?;
        Ok(ServerHandle {
            server: self.clone(),
            thread: Some(thread),
        })
    }
}

/// Bytes a UNIX connection's socket may buffer towards the client (the
/// kernel doubles it for its bookkeeping, and caps it at
/// `net.core.wmem_max`). The default, about 208 KiB, is less than one READ
/// reply of `nbdcopy` (256 KiB): every reply was written in two parts, the
/// second after an `epoll` wake-up once the client had read the first.
/// With room for a few replies, a reply is one `writev` (a warm `nbdcopy`
/// measured a quarter fewer context switches in the server). The cost is
/// kernel memory, per connection and only while the client lags behind:
/// bounded by this, where the request budget bounds the server's own.
const SEND_BUFFER: usize = 1 << 20;

/// Lets the socket take a few whole READ replies ahead of the client.
fn set_send_buffer(s: &impl std::os::fd::AsFd) {
    if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(s, SEND_BUFFER) {
        tracing::debug!(error = %e, "cannot enlarge the socket send buffer");
    }
}

/// A server running on its own threads; [`stop`](Self::stop) it, or drop it
/// (which stops it too).
#[derive(Debug)]
pub struct ServerHandle {
    server: NbdServer,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl ServerHandle {
    /// The running server (e.g. to inspect its exports).
    pub fn server(&self) -> &NbdServer {
        &self.server
    }

    /// Stop accepting, let connections finish in-flight requests, and wait.
    pub fn stop(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        self.server.shutdown();
        match self.thread.take() {
            Some(t) => t.join().unwrap_or(Err(NbdError::ServerPanicked)),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.join() {
            tracing::warn!(error = %e, "NBD server ended with an error");
        }
    }
}
