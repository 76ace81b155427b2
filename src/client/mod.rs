//! The Rust client library: connects to any node of a cluster over QUIC (TLS, verifying the
//! node against the cluster CA), sends gets, puts and deletes with typed consistency options,
//! and returns every sibling with an opaque causal context.
//!
//! ```no_run
//! # async fn example() -> Result<(), dynkv::client::ClientLibError> {
//! use dynkv::client::{Client, ClientConfig};
//! use dynkv::protocol::{GetOptions, NewContent, PutOptions};
//! let config = ClientConfig::new(vec!["127.0.0.1:8700".parse().unwrap()], std::fs::read_to_string("ca.pem").unwrap());
//! let client = Client::connect(config).await?;
//! client.put(b"users", b"ada", None, NewContent { value: b"hello".to_vec(), ..Default::default() }, PutOptions::default()).await?;
//! let read = client.get(b"users", b"ada", GetOptions::default()).await?;
//! for sibling in &read.siblings { println!("{:?}", sibling.value); }
//! # Ok(()) }
//! ```

use crate::core::object::Content;
use crate::net::RpcLimits;
use crate::net::rpc::RpcClient;
use crate::net::tls;
use crate::protocol::{
    ClientError, ClientRequest, ClientResponse, ErrorKind, GetOptions, NewContent, PutOptions,
};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Nodes to try, in order; the first that answers is used until it fails.
    pub nodes: Vec<SocketAddr>,
    /// PEM of the cluster CA that signed the nodes' certificates.
    pub ca_cert_pem: String,
    /// Time allowed for one request on the wire; the node's own quorum timeout is shorter
    /// by default, so the node's answer (with its counts) normally arrives first.
    pub request_timeout: Duration,
    /// The token nodes with `client_token` set require; sent with every request.
    pub token: Option<String>,
}

impl ClientConfig {
    pub fn new(nodes: Vec<SocketAddr>, ca_cert_pem: String) -> Self {
        ClientConfig {
            nodes,
            ca_cert_pem,
            request_timeout: Duration::from_secs(30),
            token: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientLibError {
    #[error("no node given to connect to")]
    NoNodes,
    #[error("cannot reach any node ({attempts}): {last}")]
    Unreachable { attempts: usize, last: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("request failed on the wire: {0}")]
    Transport(String),
    /// The cluster answered with an error (bad option, quorum unmet, too large, ...).
    #[error("{0}")]
    Server(ClientError),
    #[error("unexpected response: {0}")]
    Unexpected(String),
}

/// The result of a get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetResult {
    /// Every concurrent version; empty when the key is absent or deleted.
    pub siblings: Vec<Content>,
    /// Opaque; send it back with the next write of this key to supersede what was read.
    pub context: Option<Vec<u8>>,
}

/// The result of a put or delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutResult {
    /// Filled when `return_body` was asked.
    pub siblings: Vec<Content>,
    pub context: Vec<u8>,
}

struct Connected {
    address: SocketAddr,
    rpc: RpcClient<ClientRequest, ClientResponse>,
}

/// Why a connection failed, in words a user can act on. A node far past its connection limit
/// refuses new connections before the handshake, so no reason can travel with the refusal.
fn describe_connection_error(error: &quinn::ConnectionError) -> String {
    match error {
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            "the node refused the connection: it is far past its connection limit \
             (limits.max_client_connections)"
                .to_string()
        }
        other => other.to_string(),
    }
}

/// A connection to a cluster; cheap to clone and safe to share between tasks.
#[derive(Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    endpoint: quinn::Endpoint,
    current: Arc<Mutex<Option<Arc<Connected>>>>,
    /// Held while connecting, so that concurrent requests of a client without a connection
    /// wait for one attempt instead of each opening a connection of its own.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// Nodes that answered that they no longer serve requests (they left the cluster):
    /// tried last.
    not_serving: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Client {
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientLibError> {
        if config.nodes.is_empty() {
            return Err(ClientLibError::NoNodes);
        }
        tls::install_crypto_provider();
        let client_config = tls::client_config(&config.ca_cert_pem)
            .and_then(tls::quic_client_config)
            .map_err(|error| ClientLibError::Tls(error.to_string()))?;
        let bind: SocketAddr = if config.nodes[0].is_ipv6() {
            "[::]:0".parse().map_err(|_| ClientLibError::NoNodes)?
        } else {
            "0.0.0.0:0".parse().map_err(|_| ClientLibError::NoNodes)?
        };
        let mut endpoint = quinn::Endpoint::client(bind)
            .map_err(|error| ClientLibError::Transport(error.to_string()))?;
        endpoint.set_default_client_config(client_config);
        let client = Client {
            config: Arc::new(config),
            endpoint,
            current: Arc::new(Mutex::new(None)),
            connecting: Arc::new(tokio::sync::Mutex::new(())),
            not_serving: Arc::new(Mutex::new(Vec::new())),
        };
        client.connection().await?;
        Ok(client)
    }

    /// The node this client currently talks to.
    pub fn connected_node(&self) -> Option<SocketAddr> {
        self.current
            .lock()
            .as_ref()
            .map(|connected| connected.address)
    }

    async fn connection(&self) -> Result<Arc<Connected>, ClientLibError> {
        if let Some(connected) = self.current.lock().clone() {
            return Ok(connected);
        }
        let _connecting = self.connecting.lock().await;
        // Another request may have connected while this one waited.
        if let Some(connected) = self.current.lock().clone() {
            return Ok(connected);
        }
        let mut last = String::new();
        let avoided = self.not_serving.lock().clone();
        let (serving, others): (Vec<&SocketAddr>, Vec<&SocketAddr>) = self
            .config
            .nodes
            .iter()
            .partition(|address| !avoided.contains(address));
        for address in serving.into_iter().chain(others) {
            // Nodes' certificates name their IP addresses, so the address is the server name.
            let server_name = address.ip().to_string();
            let attempt = async {
                let connecting = self
                    .endpoint
                    .connect(*address, &server_name)
                    .map_err(|error| error.to_string())?;
                connecting
                    .await
                    .map_err(|error| describe_connection_error(&error))
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(connection)) => {
                    let rpc = match RpcClient::new(connection, &RpcLimits::default()).await {
                        Ok(rpc) => rpc,
                        Err(error) => {
                            last = format!("{address}: {error}");
                            continue;
                        }
                    };
                    let connected = Arc::new(Connected {
                        address: *address,
                        rpc,
                    });
                    *self.current.lock() = Some(connected.clone());
                    return Ok(connected);
                }
                Ok(Err(error)) => last = format!("{address}: {error}"),
                Err(_) => last = format!("{address}: connection timed out"),
            }
        }
        Err(ClientLibError::Unreachable {
            attempts: self.config.nodes.len(),
            last,
        })
    }

    async fn call(&self, request: ClientRequest) -> Result<ClientResponse, ClientLibError> {
        let request = match &self.config.token {
            Some(token) => ClientRequest::WithToken {
                token: token.clone(),
                request: Box::new(request),
            },
            None => request,
        };
        let mut connected = self.connection().await?;
        // A node that left the cluster refuses without doing anything: the request goes to
        // the next node (each at most once).
        for _ in 1..self.config.nodes.len() {
            match connected
                .rpc
                .call(&request, self.config.request_timeout)
                .await
            {
                Ok(ClientResponse::Error(error)) if error.kind == ErrorKind::NotServing => {
                    self.not_serving.lock().push(connected.address);
                    {
                        let mut current = self.current.lock();
                        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &connected)) {
                            *current = None;
                        }
                    }
                    connected = self.connection().await?;
                }
                answer => return self.answered(answer, &connected),
            }
        }
        let answer = connected
            .rpc
            .call(&request, self.config.request_timeout)
            .await;
        self.answered(answer, &connected)
    }

    /// A call's answer as the caller sees it; a transport failure drops the connection.
    fn answered(
        &self,
        answer: Result<ClientResponse, crate::net::rpc::RpcError>,
        connected: &Arc<Connected>,
    ) -> Result<ClientResponse, ClientLibError> {
        match answer {
            Ok(ClientResponse::Error(error)) => Err(ClientLibError::Server(error)),
            Ok(response) => Ok(response),
            Err(error) => {
                // Drop the connection so the next call tries the nodes again.
                let mut current = self.current.lock();
                if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, connected)) {
                    *current = None;
                }
                Err(ClientLibError::Transport(error.to_string()))
            }
        }
    }

    /// Sends any client request (admin ones included) and returns the node's answer; an
    /// error answer becomes [`ClientLibError::Server`].
    pub async fn request(&self, request: ClientRequest) -> Result<ClientResponse, ClientLibError> {
        self.call(request).await
    }

    /// Asks the connected node to answer; returns its node id.
    pub async fn ping(&self) -> Result<String, ClientLibError> {
        match self.call(ClientRequest::Ping).await? {
            ClientResponse::Pong { node } => Ok(node),
            other => Err(ClientLibError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn get(
        &self,
        bucket: &[u8],
        key: &[u8],
        options: GetOptions,
    ) -> Result<GetResult, ClientLibError> {
        let request = ClientRequest::Get {
            bucket: bucket.to_vec(),
            key: key.to_vec(),
            options,
        };
        match self.call(request).await? {
            ClientResponse::Found { siblings, context } => Ok(GetResult {
                siblings,
                context: Some(context),
            }),
            ClientResponse::NotFound { context } => Ok(GetResult {
                siblings: Vec::new(),
                context: context.map(|bytes| bytes.into_vec()),
            }),
            other => Err(ClientLibError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Writes a value. With the `context` of an earlier read it supersedes exactly what that
    /// read returned; without one it is concurrent with whatever the key holds.
    pub async fn put(
        &self,
        bucket: &[u8],
        key: &[u8],
        context: Option<&[u8]>,
        content: NewContent,
        options: PutOptions,
    ) -> Result<PutResult, ClientLibError> {
        let request = ClientRequest::Put {
            bucket: bucket.to_vec(),
            key: key.to_vec(),
            context: context.map(|bytes| serde_bytes::ByteBuf::from(bytes.to_vec())),
            content,
            options,
        };
        self.stored(request).await
    }

    /// Deletes a key by writing a tombstone that supersedes what `context` covers. Without
    /// a context, the node first reads the key at `options.r` and deletes what that read
    /// returned, as Riak does.
    pub async fn delete(
        &self,
        bucket: &[u8],
        key: &[u8],
        context: Option<&[u8]>,
        options: PutOptions,
    ) -> Result<PutResult, ClientLibError> {
        let request = ClientRequest::Delete {
            bucket: bucket.to_vec(),
            key: key.to_vec(),
            context: context.map(|bytes| serde_bytes::ByteBuf::from(bytes.to_vec())),
            options,
        };
        self.stored(request).await
    }

    async fn stored(&self, request: ClientRequest) -> Result<PutResult, ClientLibError> {
        match self.call(request).await? {
            ClientResponse::Stored { siblings, context } => Ok(PutResult { siblings, context }),
            other => Err(ClientLibError::Unexpected(format!("{other:?}"))),
        }
    }
}
