//! Messages, handlers and fixtures shared by the network tests.

use crate::core::ids::NodeId;
use crate::net::memory::MemoryNetwork;
use crate::net::quic::{QuicPeers, QuicServer};
use crate::net::rpc::Handler;
use crate::net::tls::{self, CertifiedKey};
use crate::net::{RpcLimits, Transport};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TestRequest {
    Echo {
        tag: u64,
        payload: String,
    },
    Sleep {
        millis: u64,
    },
    /// Asks for a response of `bytes` payload bytes (to exceed the frame limit on the way back).
    Big {
        bytes: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TestResponse {
    Echo { tag: u64, payload: String },
    Slept,
}

pub fn echo(tag: u64) -> TestRequest {
    TestRequest::Echo {
        tag,
        payload: format!("payload-{tag}"),
    }
}

pub fn node(id: &str) -> NodeId {
    NodeId::new(id).unwrap()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Small enough that an oversize message is cheap to build in a test.
pub fn test_limits() -> RpcLimits {
    RpcLimits {
        max_frame_bytes: 1024 * 1024,
        ..RpcLimits::default()
    }
}

/// Counts handler invocations and lets a test wait for a count without sleeping.
#[derive(Default)]
pub struct Probe {
    calls: AtomicUsize,
    changed: Notify,
}

impl Probe {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn record(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub async fn wait_for_calls(&self, count: usize) {
        loop {
            let changed = self.changed.notified();
            if self.calls() >= count {
                return;
            }
            changed.await;
        }
    }
}

/// Echoes, or sleeps on `tokio::time` (so it follows a paused clock); counts every call.
pub fn test_handler(probe: Arc<Probe>) -> Handler<TestRequest, TestResponse> {
    Arc::new(move |request| {
        probe.record();
        Box::pin(async move {
            match request {
                TestRequest::Echo { tag, payload } => TestResponse::Echo { tag, payload },
                TestRequest::Sleep { millis } => {
                    tokio::time::sleep(Duration::from_millis(millis)).await;
                    TestResponse::Slept
                }
                TestRequest::Big { bytes } => TestResponse::Echo {
                    tag: 0,
                    payload: "x".repeat(bytes),
                },
            }
        })
    })
}

/// A cluster CA with a server node and a client node.
pub struct Pki {
    pub ca: CertifiedKey,
    pub server_id: NodeId,
    pub server: CertifiedKey,
    pub client: CertifiedKey,
}

pub fn pki() -> Pki {
    tls::install_crypto_provider();
    let ca = tls::generate_ca("dynkv test cluster").unwrap();
    let server_id = node("server-node");
    let server = tls::issue_node_certificate(&ca, &server_id, &["127.0.0.1".into()]).unwrap();
    let client = tls::issue_node_certificate(&ca, &node("client-node"), &[]).unwrap();
    Pki {
        ca,
        server_id,
        server,
        client,
    }
}

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A mutual-TLS server and a client that knows its address.
pub struct QuicFixture {
    pub pki: Pki,
    pub server: QuicServer,
    pub peers: QuicPeers<TestRequest, TestResponse>,
    pub calls: Arc<Probe>,
}

pub fn quic_fixture() -> QuicFixture {
    init_tracing();
    let pki = pki();
    let calls = Arc::new(Probe::default());
    let server = QuicServer::bind(
        loopback(),
        tls::peer_server_config(&pki.ca.cert_pem, &pki.server).unwrap(),
        test_handler(calls.clone()),
        test_limits(),
    )
    .unwrap();
    let peers = QuicPeers::new(
        loopback(),
        tls::peer_client_config(&pki.ca.cert_pem, &pki.client).unwrap(),
        test_limits(),
    )
    .unwrap();
    peers.set_address(pki.server_id.clone(), server.local_addr());
    QuicFixture {
        pki,
        server,
        peers,
        calls,
    }
}

/// What the shared suite needs: a transport, a server to call, and whatever keeps it alive.
pub struct Fixture {
    pub name: &'static str,
    pub transport: Arc<dyn Transport<TestRequest, TestResponse>>,
    pub server: NodeId,
    pub calls: Arc<Probe>,
    _keep_alive: Box<dyn Any + Send + Sync>,
}

impl From<QuicFixture> for Fixture {
    fn from(fixture: QuicFixture) -> Self {
        Fixture {
            name: "quic",
            transport: Arc::new(fixture.peers.clone()),
            server: fixture.pki.server_id.clone(),
            calls: fixture.calls.clone(),
            _keep_alive: Box::new(fixture.server),
        }
    }
}

pub fn memory_network(seed: u64) -> MemoryNetwork<TestRequest, TestResponse> {
    init_tracing();
    MemoryNetwork::with_limits(StdRng::seed_from_u64(seed), &test_limits())
}

pub fn memory_fixture() -> Fixture {
    let network = memory_network(7);
    let calls = Arc::new(Probe::default());
    let server = node("server-node");
    network.register(server.clone(), test_handler(calls.clone()));
    Fixture {
        name: "memory",
        transport: Arc::new(network.transport(node("client-node"))),
        server,
        calls,
        _keep_alive: Box::new(()),
    }
}
