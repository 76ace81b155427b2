//! QUIC endpoints: the server accept loop and the client-side connection cache.
//!
//! [`QuicServer`] accepts connections and serves each with [`rpc::serve_connection`]; a
//! handshake that fails (for instance a peer without a certificate from the cluster CA) is
//! logged and refused, and the server goes on. [`QuicPeers`] keeps one connection per peer,
//! dialled lazily with the peer's node id as the TLS server name, so the certificate check
//! also proves the peer is the node it claims to be.

use crate::core::ids::NodeId;
use crate::net::budget::ByteBudget;
use crate::net::rpc::{self, BoxFuture, Handler, RpcClient, RpcError};
use crate::net::tls::{self, TlsError};
use crate::net::{LimitsError, RpcLimits, Transport, TransportError};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

/// Why an endpoint could not be created.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("cannot bind UDP {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Limits(#[from] LimitsError),
}

/// A QUIC server: binds a UDP address and serves every connection with one handler.
///
/// Dropping it closes the endpoint too; [`QuicServer::shutdown`] also waits for connections to
/// drain.
pub struct QuicServer {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept_loop: Option<JoinHandle<()>>,
}

impl QuicServer {
    /// Binds `address` (port 0 picks a free port; see [`QuicServer::local_addr`]) and starts
    /// accepting, with a byte budget of its own (`limits.max_in_flight_bytes`). Must be
    /// called inside a tokio runtime.
    pub fn bind<Req, Resp>(
        address: SocketAddr,
        tls: rustls::ServerConfig,
        handler: Handler<Req, Resp>,
        limits: RpcLimits,
    ) -> Result<Self, QuicError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        let bytes = ByteBudget::new(limits.max_in_flight_bytes);
        Self::bind_sharing(address, tls, handler, limits, bytes)
    }

    /// [`QuicServer::bind`] taking request bodies' bytes from `bytes`, a budget it shares with
    /// other listeners.
    pub fn bind_sharing<Req, Resp>(
        address: SocketAddr,
        tls: rustls::ServerConfig,
        handler: Handler<Req, Resp>,
        limits: RpcLimits,
        bytes: ByteBudget,
    ) -> Result<Self, QuicError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        limits.validate()?;
        let mut config = tls::quic_server_config(tls)?;
        config.transport_config(Arc::new(tls::transport_config_acking_every(
            limits.ack_eliciting_threshold,
        )));
        let endpoint = quinn::Endpoint::server(config, address)
            .map_err(|source| QuicError::Bind { address, source })?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| QuicError::Bind { address, source })?;
        let (stop, stopped) = watch::channel(false);
        let span = info_span!("quic_server", address = %local_addr);
        let accept_loop = tokio::spawn(
            accept_loop(endpoint.clone(), handler, limits, bytes, stopped).instrument(span),
        );
        info!(address = %local_addr, "QUIC server listening");
        Ok(QuicServer {
            endpoint,
            local_addr,
            stop,
            accept_loop: Some(accept_loop),
        })
    }

    /// The bound address, with the real port when bound to port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections currently open (including ones still draining after a close).
    pub fn open_connections(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// Stops accepting, closes every connection with [`rpc::CLOSE_SHUTDOWN`] (peers see the
    /// close at once instead of waiting for an idle timeout) and waits for them to drain.
    pub async fn shutdown(mut self) {
        self.close();
        if let Some(accept_loop) = self.accept_loop.take() {
            let _ = accept_loop.await;
        }
        self.endpoint.wait_idle().await;
        info!(address = %self.local_addr, "QUIC server stopped");
    }

    fn close(&self) {
        let _ = self.stop.send(true);
        self.endpoint.close(
            quinn::VarInt::from_u32(rpc::CLOSE_SHUTDOWN),
            b"server shutting down",
        );
    }
}

impl Drop for QuicServer {
    fn drop(&mut self) {
        self.close();
    }
}

async fn accept_loop<Req, Resp>(
    endpoint: quinn::Endpoint,
    handler: Handler<Req, Resp>,
    limits: RpcLimits,
    bytes: ByteBudget,
    mut stopped: watch::Receiver<bool>,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    let mut connections = JoinSet::new();
    // Request bytes and requests in flight over every connection of this server.
    let budget = rpc::ServerBudget::new(&limits, &bytes);
    loop {
        let incoming = tokio::select! {
            _ = stopped.changed() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        while connections.try_join_next().is_some() {}
        let peer = incoming.remote_address();
        let open = connections.len();
        if open >= 2 * limits.max_connections {
            // Far over the limit: no handshake, no task.
            debug!(peer = %peer, open, "connection refused without a handshake");
            incoming.refuse();
            continue;
        }
        let over_limit = open >= limits.max_connections;
        let handler = handler.clone();
        let budget = budget.clone();
        let limits = limits.clone();
        // The handshake runs in its own task so a slow or hostile peer cannot stall accepting.
        connections.spawn(
            async move {
                match incoming.await {
                    Ok(connection) if over_limit => {
                        let reason = format!(
                            "too many connections: this node keeps at most {} ({})",
                            limits.max_connections, limits.limit_name
                        );
                        warn!(peer = %peer, limit = limits.max_connections, "connection refused: {reason}");
                        connection.close(
                            quinn::VarInt::from_u32(rpc::CLOSE_TOO_MANY_CONNECTIONS),
                            reason.as_bytes(),
                        );
                    }
                    Ok(connection) => {
                        rpc::serve_connection(connection, handler, limits, budget).await
                    }
                    Err(error) => warn!(peer = %peer, error = %error, "handshake refused"),
                }
            }
            .in_current_span(),
        );
    }
    // The endpoint is closed by now, so every connection ends promptly.
    while connections.join_next().await.is_some() {}
}

/// One cached connection slot per peer. `connecting` makes concurrent callers share one
/// connection attempt: the first dials, the others wait for it and reuse the result.
struct PeerSlot<Req, Resp> {
    client: Mutex<Option<Arc<RpcClient<Req, Resp>>>>,
    connecting: tokio::sync::Mutex<()>,
}

struct PeersInner<Req, Resp> {
    endpoint: quinn::Endpoint,
    addresses: RwLock<HashMap<NodeId, SocketAddr>>,
    slots: Mutex<HashMap<NodeId, Arc<PeerSlot<Req, Resp>>>>,
    limits: RpcLimits,
}

/// The calling side of QUIC: an address book and one long-lived connection per peer.
///
/// Connections are dialled on first use and re-dialled on the first call after one fails.
/// Cloning is cheap and shares everything.
pub struct QuicPeers<Req, Resp> {
    inner: Arc<PeersInner<Req, Resp>>,
    _messages: PhantomData<fn(&Req) -> Resp>,
}

impl<Req, Resp> Clone for QuicPeers<Req, Resp> {
    fn clone(&self) -> Self {
        QuicPeers {
            inner: self.inner.clone(),
            _messages: PhantomData,
        }
    }
}

impl<Req, Resp> QuicPeers<Req, Resp>
where
    Req: Serialize + Send + Sync + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    /// Creates a client endpoint bound to `bind` (usually `0.0.0.0:0` or `127.0.0.1:0`).
    /// Must be called inside a tokio runtime.
    pub fn new(
        bind: SocketAddr,
        tls: rustls::ClientConfig,
        limits: RpcLimits,
    ) -> Result<Self, QuicError> {
        limits.validate()?;
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|source| QuicError::Bind {
            address: bind,
            source,
        })?;
        let mut config = tls::quic_client_config(tls)?;
        config.transport_config(Arc::new(tls::transport_config_acking_every(
            limits.ack_eliciting_threshold,
        )));
        endpoint.set_default_client_config(config);
        Ok(QuicPeers {
            inner: Arc::new(PeersInner {
                endpoint,
                addresses: RwLock::new(HashMap::new()),
                slots: Mutex::new(HashMap::new()),
                limits,
            }),
            _messages: PhantomData,
        })
    }

    /// Records (or changes) where `node` listens. A changed address drops the cached
    /// connection so the next call dials the new one.
    pub fn set_address(&self, node: NodeId, address: SocketAddr) {
        let previous = self.inner.addresses.write().insert(node.clone(), address);
        if previous.is_some_and(|previous| previous != address) {
            self.disconnect(&node);
        }
    }

    /// Forgets `node`'s address and closes its connection.
    pub fn remove_address(&self, node: &NodeId) {
        self.inner.addresses.write().remove(node);
        self.disconnect(node);
    }

    /// The local UDP address of the client endpoint.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Closes every connection; later calls dial again.
    pub fn close_all(&self) {
        let slots: Vec<_> = self
            .inner
            .slots
            .lock()
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        for slot in slots {
            if let Some(client) = slot.client.lock().take() {
                client.close();
            }
        }
    }

    fn disconnect(&self, node: &NodeId) {
        let slot = self.inner.slots.lock().get(node).cloned();
        if let Some(client) = slot.and_then(|slot| slot.client.lock().take()) {
            client.close();
        }
    }

    /// Sends `request` to `to` and waits for the response; the whole call, including a
    /// connection attempt, takes at most about `timeout`.
    pub async fn call(
        &self,
        to: &NodeId,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || TransportError::Timeout {
            peer: to.clone(),
            timeout_ms: timeout.as_millis() as u64,
        };
        let client = tokio::time::timeout_at(deadline, self.client_for(to))
            .await
            .map_err(|_| timed_out())??;
        let remaining = deadline.saturating_duration_since(Instant::now());
        client
            .call(request, remaining)
            .await
            .map_err(|error| match error {
                RpcError::Timeout { .. } => timed_out(),
                RpcError::ConnectionLost { reason } => TransportError::Connection {
                    peer: to.clone(),
                    reason,
                },
                RpcError::Frame(error) => TransportError::Frame(error),
                RpcError::Remote { reason } => TransportError::Remote {
                    peer: to.clone(),
                    reason,
                },
            })
    }

    async fn client_for(&self, peer: &NodeId) -> Result<Arc<RpcClient<Req, Resp>>, TransportError> {
        let slot = self
            .inner
            .slots
            .lock()
            .entry(peer.clone())
            .or_insert_with(|| {
                Arc::new(PeerSlot {
                    client: Mutex::new(None),
                    connecting: tokio::sync::Mutex::new(()),
                })
            })
            .clone();
        if let Some(client) = live_client(&slot) {
            return Ok(client);
        }
        let _connecting = slot.connecting.lock().await;
        // Someone else may have connected while this caller waited.
        if let Some(client) = live_client(&slot) {
            return Ok(client);
        }
        let address = self
            .inner
            .addresses
            .read()
            .get(peer)
            .copied()
            .ok_or_else(|| TransportError::UnknownPeer { peer: peer.clone() })?;
        let client = Arc::new(self.connect(peer, address).await?);
        *slot.client.lock() = Some(client.clone());
        Ok(client)
    }

    async fn connect(
        &self,
        peer: &NodeId,
        address: SocketAddr,
    ) -> Result<RpcClient<Req, Resp>, TransportError> {
        let span = info_span!("quic_connect", peer = %peer, address = %address);
        async {
            let connecting = self
                .inner
                .endpoint
                .connect(address, peer.as_str())
                .map_err(|error| TransportError::Connection {
                    peer: peer.clone(),
                    reason: error.to_string(),
                })?;
            let connection = connecting.await.map_err(|error| match error {
                quinn::ConnectionError::TimedOut => TransportError::Unreachable {
                    peer: peer.clone(),
                    reason: error.to_string(),
                },
                error => TransportError::Connection {
                    peer: peer.clone(),
                    reason: error.to_string(),
                },
            })?;
            debug!("connected");
            RpcClient::new(connection, &self.inner.limits)
                .await
                .map_err(|error| TransportError::Connection {
                    peer: peer.clone(),
                    reason: error.to_string(),
                })
        }
        .instrument(span)
        .await
        .inspect_err(|error| debug!(peer = %peer, error = %error, "connection attempt failed"))
    }
}

fn live_client<Req, Resp>(slot: &PeerSlot<Req, Resp>) -> Option<Arc<RpcClient<Req, Resp>>> {
    let mut client = slot.client.lock();
    match client.as_ref() {
        Some(existing) if existing.is_alive() => Some(existing.clone()),
        Some(_) => {
            *client = None;
            None
        }
        None => None,
    }
}

impl<Req, Resp> Transport<Req, Resp> for QuicPeers<Req, Resp>
where
    Req: Serialize + Send + Sync + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    fn call(
        &self,
        to: &NodeId,
        request: Req,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Resp, TransportError>> {
        let peers = self.clone();
        let to = to.clone();
        Box::pin(async move { QuicPeers::call(&peers, &to, &request, timeout).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::{FrameHeader, FrameKind, MAGIC, WIRE_VERSION, encode_header};
    use crate::net::test_support::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const TIMEOUT: Duration = Duration::from_secs(5);

    async fn assert_echo(peers: &QuicPeers<TestRequest, TestResponse>, server: &NodeId, tag: u64) {
        let response = peers.call(server, &echo(tag), TIMEOUT).await;
        assert_eq!(
            response,
            Ok(TestResponse::Echo {
                tag,
                payload: format!("payload-{tag}")
            })
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_calls_share_one_connection_and_timeouts_leave_nothing_behind() {
        let fixture = quic_fixture();
        let server = fixture.pki.server_id.clone();
        let mut calls = tokio::task::JoinSet::new();
        for tag in 0..50 {
            let peers = fixture.peers.clone();
            let server = server.clone();
            calls.spawn(async move { peers.call(&server, &echo(tag), TIMEOUT).await });
        }
        while let Some(result) = calls.join_next().await {
            assert!(result.unwrap().is_ok());
        }
        assert_eq!(
            fixture.server.open_connections(),
            1,
            "one connect attempt was shared"
        );

        let result = fixture
            .peers
            .call(
                &server,
                &TestRequest::Sleep { millis: 2_000 },
                Duration::from_millis(50),
            )
            .await;
        assert!(
            matches!(result, Err(TransportError::Timeout { .. })),
            "{result:?}"
        );
        let client = fixture.peers.client_for(&server).await.unwrap();
        assert_eq!(
            client.pending_calls(),
            0,
            "the timed-out call left its entry behind"
        );
        assert!(matches!(
            fixture.peers.call(&node("nobody"), &echo(1), TIMEOUT).await,
            Err(TransportError::UnknownPeer { peer }) if peer == node("nobody")
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_datagrams_do_not_disturb_the_server() {
        let fixture = quic_fixture();
        let socket = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        for index in 0..1000 {
            let length = rng.random_range(1..=1400);
            let mut datagram: Vec<u8> = (0..length).map(|_| rng.random()).collect();
            if index % 2 == 0 && length > 8 {
                // Half look like QUIC v1 long-header packets, to get past the first checks.
                datagram[0] = 0xc0 | (datagram[0] & 0x0f);
                datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
            }
            socket
                .send_to(&datagram, fixture.server.local_addr())
                .await
                .unwrap();
        }
        assert_echo(&fixture.peers, &fixture.pki.server_id, 1).await;
    }

    /// Opens a raw, properly authenticated connection, writes `bytes` on a stream and returns
    /// how the server closed the connection.
    async fn send_raw(fixture: &QuicFixture, bytes: &[u8]) -> quinn::ConnectionError {
        let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
        endpoint.set_default_client_config(
            tls::quic_client_config(
                tls::peer_client_config(&fixture.pki.ca.cert_pem, &fixture.pki.client).unwrap(),
            )
            .unwrap(),
        );
        let connection = endpoint
            .connect(fixture.server.local_addr(), fixture.pki.server_id.as_str())
            .unwrap()
            .await
            .unwrap();
        let (mut send, _receive) = connection.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        tokio::time::timeout(TIMEOUT, connection.closed())
            .await
            .expect("the server must close the connection")
    }

    fn closed_as_malformed(error: &quinn::ConnectionError) -> bool {
        matches!(error, quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(rpc::CLOSE_MALFORMED_FRAME))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn malformed_frames_close_only_their_connection() {
        let fixture = quic_fixture();
        let server = &fixture.pki.server_id;
        assert_echo(&fixture.peers, server, 1).await;

        let mut bad_magic = encode_header(FrameHeader {
            kind: FrameKind::Request,
            request_id: 1,
            body_bytes: 4,
        });
        bad_magic[0..2].copy_from_slice(b"XX");
        let error = send_raw(&fixture, &bad_magic).await;
        assert!(closed_as_malformed(&error), "{error:?}");

        let four_gib = encode_header(FrameHeader {
            kind: FrameKind::Request,
            request_id: 2,
            body_bytes: u32::MAX,
        });
        assert_eq!(&four_gib[0..3], &[MAGIC[0], MAGIC[1], WIRE_VERSION]);
        let error = send_raw(&fixture, &four_gib).await;
        assert!(closed_as_malformed(&error), "{error:?}");

        // The well-behaved connection, opened before, was not disturbed.
        for tag in 2..10 {
            assert_echo(&fixture.peers, server, tag).await;
        }
        assert_eq!(fixture.calls.calls(), 9);
    }

    fn peers_with(
        tls: rustls::ClientConfig,
        fixture: &QuicFixture,
    ) -> QuicPeers<TestRequest, TestResponse> {
        let peers = QuicPeers::new(loopback(), tls, test_limits()).unwrap();
        peers.set_address(fixture.pki.server_id.clone(), fixture.server.local_addr());
        peers
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mutual_tls_refuses_foreign_and_missing_client_certificates() {
        let fixture = quic_fixture();
        let server = &fixture.pki.server_id;
        let foreign_ca = tls::generate_ca("another cluster").unwrap();
        let foreign = tls::issue_node_certificate(&foreign_ca, &node("intruder"), &[]).unwrap();
        let attempts = [
            (
                "foreign certificate",
                tls::peer_client_config(&fixture.pki.ca.cert_pem, &foreign).unwrap(),
            ),
            (
                "no certificate",
                tls::client_config(&fixture.pki.ca.cert_pem).unwrap(),
            ),
        ];
        for (what, tls) in attempts {
            let intruder = peers_with(tls, &fixture);
            let result = intruder.call(server, &echo(1), TIMEOUT).await;
            assert!(
                matches!(result, Err(TransportError::Connection { .. })),
                "{what}: {result:?}"
            );
        }
        assert_eq!(
            fixture.calls.calls(),
            0,
            "no intruder request reached the handler"
        );
        assert_echo(&fixture.peers, server, 2).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_facing_server_accepts_clients_without_certificates() {
        init_tracing();
        let pki = pki();
        let probe = Arc::new(Probe::default());
        let server = QuicServer::bind(
            loopback(),
            tls::client_facing_server_config(&pki.server).unwrap(),
            test_handler(probe),
            test_limits(),
        )
        .unwrap();
        let client = client_of(&pki, &server);
        assert_echo(&client, &pki.server_id, 1).await;

        // The client still authenticates the server: a node of another cluster is refused.
        let foreign_ca = tls::generate_ca("another cluster").unwrap();
        let stranger: QuicPeers<TestRequest, TestResponse> = QuicPeers::new(
            loopback(),
            tls::client_config(&foreign_ca.cert_pem).unwrap(),
            test_limits(),
        )
        .unwrap();
        stranger.set_address(pki.server_id.clone(), server.local_addr());
        let result = stranger.call(&pki.server_id, &echo(2), TIMEOUT).await;
        assert!(
            matches!(result, Err(TransportError::Connection { .. })),
            "{result:?}"
        );
        server.shutdown().await;
    }

    /// A client of the client-facing `server` (no client certificate), on its own endpoint,
    /// so each one is a connection of its own.
    fn client_of(pki: &Pki, server: &QuicServer) -> QuicPeers<TestRequest, TestResponse> {
        let client = QuicPeers::new(
            loopback(),
            tls::client_config(&pki.ca.cert_pem).unwrap(),
            test_limits(),
        )
        .unwrap();
        client.set_address(pki.server_id.clone(), server.local_addr());
        client
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_limit_are_closed_with_the_limit_named() {
        init_tracing();
        let pki = pki();
        let probe = Arc::new(Probe::default());
        let server = QuicServer::bind(
            loopback(),
            tls::client_facing_server_config(&pki.server).unwrap(),
            test_handler(probe),
            RpcLimits {
                max_connections: 2,
                limit_name: "limits.max_client_connections",
                ..test_limits()
            },
        )
        .unwrap();
        let client = || client_of(&pki, &server);
        let (first, second, third) = (client(), client(), client());
        assert_echo(&first, &pki.server_id, 1).await;
        assert_echo(&second, &pki.server_id, 2).await;
        let refused = third.call(&pki.server_id, &echo(3), TIMEOUT).await;
        let message = format!("{:?}", refused.unwrap_err());
        assert!(
            message.contains("limits.max_client_connections"),
            "{message}"
        );
        // The connections within the limit still work; once one goes, a new one is served.
        assert_echo(&first, &pki.server_id, 4).await;
        drop(second);
        let fourth = client();
        let mut served = false;
        for attempt in 0..50 {
            if fourth
                .call(&pki.server_id, &echo(5 + attempt), TIMEOUT)
                .await
                .is_ok()
            {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            served,
            "a connection freed by a client that left is not reused"
        );
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn request_bytes_in_flight_stay_within_the_servers_budget() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        init_tracing();
        let pki = pki();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (running_in, most_in, gate_in) = (running.clone(), most.clone(), gate.clone());
        let handler: Handler<TestRequest, TestResponse> = Arc::new(move |request| {
            let (running, most, gate) = (running_in.clone(), most_in.clone(), gate_in.clone());
            Box::pin(async move {
                if let TestRequest::Echo { tag, payload } = &request
                    && payload.len() < 1024
                {
                    // Small requests are answered at once.
                    return TestResponse::Echo {
                        tag: *tag,
                        payload: payload.clone(),
                    };
                }
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let _pass = gate.acquire().await;
                running.fetch_sub(1, Ordering::SeqCst);
                match request {
                    TestRequest::Echo { tag, payload } => TestResponse::Echo { tag, payload },
                    _ => TestResponse::Slept,
                }
            })
        });
        // Room for one 600 KB request at a time.
        let limits = RpcLimits {
            max_in_flight_bytes: 1024 * 1024,
            ..test_limits()
        };
        let server = QuicServer::bind(
            loopback(),
            tls::client_facing_server_config(&pki.server).unwrap(),
            handler,
            limits,
        )
        .unwrap();
        let mut calls = tokio::task::JoinSet::new();
        for tag in 0..3u64 {
            let client = client_of(&pki, &server);
            let server_id = pki.server_id.clone();
            calls.spawn(async move {
                let request = TestRequest::Echo {
                    tag,
                    payload: "p".repeat(600 * 1024),
                };
                client
                    .call(&server_id, &request, Duration::from_secs(30))
                    .await
            });
        }
        while running.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            running.load(Ordering::SeqCst),
            1,
            "the other two requests wait unread"
        );
        // A small request is not held up behind the spent budget.
        let small = client_of(&pki, &server)
            .call(
                &pki.server_id,
                &TestRequest::Echo {
                    tag: 99,
                    payload: "small".into(),
                },
                Duration::from_secs(5),
            )
            .await;
        assert!(
            matches!(small, Ok(TestResponse::Echo { tag: 99, .. })),
            "{small:?}"
        );
        gate.add_permits(3);
        while let Some(call) = calls.join_next().await {
            assert!(matches!(call.unwrap(), Ok(TestResponse::Echo { .. })));
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn shutdown_fails_pending_calls_promptly_and_callers_reconnect() {
        let QuicFixture {
            pki,
            server,
            peers,
            calls,
        } = quic_fixture();
        let address = server.local_addr();
        assert_echo(&peers, &pki.server_id, 1).await;

        let mut pending = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let peers = peers.clone();
            let server_id = pki.server_id.clone();
            pending.spawn(async move {
                peers
                    .call(
                        &server_id,
                        &TestRequest::Sleep { millis: 30_000 },
                        Duration::from_secs(30),
                    )
                    .await
            });
        }
        calls.wait_for_calls(11).await;
        let shut_down = std::time::Instant::now();
        server.shutdown().await;
        while let Some(result) = pending.join_next().await {
            let result = result.unwrap();
            assert!(
                matches!(result, Err(TransportError::Connection { .. })),
                "{result:?}"
            );
        }
        assert!(
            shut_down.elapsed() < Duration::from_secs(3),
            "pending calls failed after {:?}",
            shut_down.elapsed()
        );

        // A new server on the same address: the next call dials it.
        let probe = Arc::new(Probe::default());
        let config = || tls::peer_server_config(&pki.ca.cert_pem, &pki.server).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let restarted = loop {
            // The old socket is released by quinn's endpoint driver task after shutdown
            // returns; rebinding can race it for a moment.
            match QuicServer::bind(
                address,
                config(),
                test_handler(probe.clone()),
                test_limits(),
            ) {
                Ok(server) => break server,
                Err(QuicError::Bind { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => panic!("cannot rebind {address}: {error}"),
            }
        };
        assert_echo(&peers, &pki.server_id, 2).await;
        assert_eq!(probe.calls(), 1);
        restarted.shutdown().await;
    }
}
