//! Riak's Protocol Buffers API (Riak's port 8087; `pb_listen`), for the Riak client
//! libraries that speak it (Java, Go, Erlang, .NET, Python's default transport).
//!
//! A frame is a 4-byte big-endian length (of what follows), a 1-byte message code and the
//! protobuf message. Each request is answered with one frame, except list keys and a
//! streamed list buckets, answered with frames until one says `done`. The key/value subset
//! is served through the same [`Node`] requests as the native and HTTP APIs, so a vclock is
//! the same opaque context everywhere: one read over HTTP writes over PB and back. What is
//! not served (2i, MapReduce, search, data types, bucket types other than `default`) gets
//! an `RpbErrorResp` naming it. Every frame length is checked against
//! `limits.max_frame_bytes` before anything is allocated for it.
//!
//! Security, both optional: `RpbStartTls` upgrades the connection to TLS with the node
//! certificate when `pb_tls = true`; with `http_token` set, `RpbAuthReq` must carry it as the
//! password before anything but ping, server info and TLS is served.

pub mod client;
pub mod messages;

use crate::core::object::Content;
use crate::core::quorum::Quorum;
use crate::protocol::{
    ClientError, ClientRequest, ClientResponse, GetOptions, NewContent, PutOptions,
};
use crate::server::node::{BucketProps, Node};
use messages::*;
use prost::Message;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

/// How the Protocol Buffers listener runs.
#[derive(Clone)]
pub struct PbSettings {
    pub address: SocketAddr,
    /// Longest frame accepted (`limits.max_frame_bytes`); a longer one closes the connection
    /// after an error naming the limit.
    pub max_frame_bytes: usize,
    /// Where a frame takes its bytes before it is read (shared with the other client-facing
    /// listeners: `limits.max_in_flight_bytes`).
    pub body_budget: crate::net::budget::ByteBudget,
    /// How long a frame waits for room in the budget before it is refused (the request
    /// timeout); meanwhile it is not read, and TCP holds the sender back.
    pub budget_wait: std::time::Duration,
    /// Connections served at once; one more is closed at once.
    pub max_connections: usize,
    /// `RpbStartTls` upgrades to this; `None` refuses it.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The token `RpbAuthReq` must carry as its password; `None` refuses authentication
    /// (none is needed).
    pub token: Option<String>,
}

/// The running listener; stopped when dropped.
pub struct PbServer {
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PbServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PbServer {
    /// Stops accepting and closes every connection (their tasks hold the node).
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = (&mut { self }.task).await;
    }
}

impl PbServer {
    /// Binds `settings.address` and serves `node` until dropped.
    pub async fn start(node: Node, settings: PbSettings) -> std::io::Result<PbServer> {
        let listener = tokio::net::TcpListener::bind(settings.address).await?;
        let local_addr = listener.local_addr()?;
        let settings = Arc::new(settings);
        let permits = Arc::new(tokio::sync::Semaphore::new(settings.max_connections.max(1)));
        let task = tokio::spawn(async move {
            // Dropped with this task, which aborts every connection.
            let mut sessions = tokio::task::JoinSet::new();
            loop {
                while sessions.try_join_next().is_some() {}
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(error = %error, "protocol buffers listener cannot accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    debug!(%peer, "protocol buffers connection refused: limits.max_client_connections reached");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let session = Session::new(node.clone(), settings.clone());
                sessions.spawn(
                    async move {
                        session.run(stream).await;
                        drop(permit);
                    }
                    .instrument(info_span!("pb_connection", %peer)),
                );
            }
        });
        Ok(PbServer { local_addr, task })
    }
}

/// What the serve loop ends with.
enum Next {
    Closed,
    StartTls,
}

/// One client connection.
struct Session {
    node: Node,
    settings: Arc<PbSettings>,
    client_id: Vec<u8>,
    authenticated: bool,
}

/// A request's answer: frames of (code, message bytes).
type Frames = Vec<(u8, Vec<u8>)>;

impl Session {
    fn new(node: Node, settings: Arc<PbSettings>) -> Session {
        let authenticated = settings.token.is_none();
        Session {
            node,
            settings,
            client_id: crate::http::random_name(12).into_bytes(),
            authenticated,
        }
    }

    async fn run(mut self, mut stream: tokio::net::TcpStream) {
        match self.serve(&mut stream, true).await {
            Ok(Next::StartTls) => {
                let Some(tls) = self.settings.tls.clone() else {
                    return;
                };
                match tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
                    Ok(mut tls_stream) => {
                        if let Err(error) = self.serve(&mut tls_stream, false).await {
                            debug!(error = %error, "protocol buffers connection ended");
                        }
                    }
                    Err(error) => debug!(error = %error, "TLS handshake after RpbStartTls failed"),
                }
            }
            Ok(Next::Closed) => {}
            Err(error) => debug!(error = %error, "protocol buffers connection ended"),
        }
    }

    /// Reads and answers frames until the client closes, asks for TLS, or breaks a limit.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        plain: bool,
    ) -> std::io::Result<Next> {
        loop {
            let mut header = [0u8; 4];
            match stream.read_exact(&mut header).await {
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(Next::Closed);
                }
                Err(error) => return Err(error),
            }
            let length = u32::from_be_bytes(header) as usize;
            if length == 0 || length > self.settings.max_frame_bytes {
                let message = format!(
                    "a frame of {length} bytes: frames hold a message code and at most {} bytes (limits.max_frame_bytes); closing",
                    self.settings.max_frame_bytes
                );
                write_frames(stream, &error_frame(&message)).await?;
                return Ok(Next::Closed);
            }
            // The frame's bytes come from the shared budget before it is read; held until
            // its answer is written.
            let _permit = match self
                .settings
                .body_budget
                .take(length as u64, self.settings.budget_wait)
                .await
            {
                Ok(permit) => permit,
                Err(error) => {
                    // Skipped unread (never allocated) to keep the stream in step.
                    tokio::io::copy(
                        &mut (&mut *stream).take(length as u64),
                        &mut tokio::io::sink(),
                    )
                    .await?;
                    write_frames(stream, &error_frame(&error.to_string())).await?;
                    continue;
                }
            };
            let mut frame = vec![0u8; length];
            stream.read_exact(&mut frame).await?;
            let code = frame[0];
            let body = &frame[1..];
            if code == code::START_TLS {
                if !plain {
                    write_frames(stream, &error_frame("the connection is already TLS")).await?;
                    continue;
                }
                if self.settings.tls.is_none() {
                    write_frames(
                        stream,
                        &error_frame("TLS is not configured on this node (set pb_tls = true)"),
                    )
                    .await?;
                    continue;
                }
                write_frames(stream, &[(code::START_TLS, Vec::new())]).await?;
                return Ok(Next::StartTls);
            }
            if code == code::LIST_KEYS_REQ || code == code::LIST_BUCKETS_REQ {
                if let Err(message) = self.authorized(code) {
                    write_frames(stream, &error_frame(&message)).await?;
                    continue;
                }
                self.stream_listing(stream, code, body).await?;
                continue;
            }
            let frames = match self.authorized(code) {
                Ok(()) => self.answer(code, body).await,
                Err(message) => error_frame(&message),
            };
            write_frames(stream, &frames).await?;
        }
    }

    fn authorized(&self, code: u8) -> Result<(), String> {
        if self.authenticated
            || matches!(
                code,
                code::PING_REQ | code::GET_SERVER_INFO_REQ | code::AUTH_REQ
            )
        {
            Ok(())
        } else {
            Err("this node requires authentication: send RpbAuthReq with the node's http_token as the password".into())
        }
    }

    /// The answer to one request (all but listings and TLS).
    async fn answer(&mut self, code: u8, body: &[u8]) -> Frames {
        let result = match code {
            code::PING_REQ => Ok(vec![(code::PING_RESP, Vec::new())]),
            code::GET_SERVER_INFO_REQ => Ok(one(
                code::GET_SERVER_INFO_RESP,
                &RpbGetServerInfoResp {
                    node: Some(self.node.id().to_string().into_bytes()),
                    server_version: Some(
                        crate::http::stats::RIAK_COMPATIBLE_VERSION
                            .as_bytes()
                            .to_vec(),
                    ),
                },
            )),
            code::GET_CLIENT_ID_REQ => Ok(one(
                code::GET_CLIENT_ID_RESP,
                &RpbGetClientIdResp {
                    client_id: self.client_id.clone(),
                },
            )),
            code::SET_CLIENT_ID_REQ => decode::<RpbSetClientIdReq>(body).map(|request| {
                // Riak once used it for vclocks; dynkv's clocks name replicas, so it is
                // only kept for RpbGetClientIdReq.
                self.client_id = request.client_id;
                vec![(code::SET_CLIENT_ID_RESP, Vec::new())]
            }),
            code::AUTH_REQ => decode::<RpbAuthReq>(body).and_then(|request| {
                let Some(token) = &self.settings.token else {
                    return Err("authentication is not configured on this node (no http_token)".into());
                };
                let password = String::from_utf8_lossy(&request.password);
                if crate::protocol::token_matches(&password, token) {
                    self.authenticated = true;
                    Ok(vec![(code::AUTH_RESP, Vec::new())])
                } else {
                    Err("authentication failed: the password is not this node's http_token".into())
                }
            }),
            code::GET_REQ => match decode::<RpbGetReq>(body) {
                Ok(request) => self.get(request).await,
                Err(message) => Err(message),
            },
            code::PUT_REQ => match decode::<RpbPutReq>(body) {
                Ok(request) => self.put(request).await,
                Err(message) => Err(message),
            },
            code::DEL_REQ => match decode::<RpbDelReq>(body) {
                Ok(request) => self.delete(request).await,
                Err(message) => Err(message),
            },
            code::GET_BUCKET_REQ => match decode::<RpbGetBucketReq>(body) {
                Ok(request) => match default_type(request.r#type.as_deref()) {
                    Ok(()) => self.get_bucket(&request.bucket).await,
                    Err(message) => Err(message),
                },
                Err(message) => Err(message),
            },
            code::SET_BUCKET_REQ => match decode::<RpbSetBucketReq>(body) {
                Ok(request) => match default_type(request.r#type.as_deref()) {
                    Ok(()) => self.set_bucket(&request.bucket, &request.props).await,
                    Err(message) => Err(message),
                },
                Err(message) => Err(message),
            },
            code::RESET_BUCKET_REQ => match decode::<RpbResetBucketReq>(body) {
                Ok(request) => match default_type(request.r#type.as_deref()) {
                    Ok(()) => match check_bucket(&request.bucket) {
                        Ok(()) => self
                            .node
                            .set_bucket_props(&request.bucket, None)
                            .await
                            .map(|()| vec![(code::RESET_BUCKET_RESP, Vec::new())])
                            .map_err(|error| error.message),
                        Err(message) => Err(message),
                    },
                    Err(message) => Err(message),
                },
                Err(message) => Err(message),
            },
            code::GET_BUCKET_TYPE_REQ => decode::<RpbGetBucketTypeReq>(body).and_then(|request| {
                default_type(Some(&request.r#type))?;
                Ok(one(
                    code::GET_BUCKET_RESP,
                    &RpbGetBucketResp {
                        props: props_message(&self.node.default_bucket_props()),
                    },
                ))
            }),
            code::SET_BUCKET_TYPE_REQ => Err(
                "bucket types are not served: dynkv has the default type only, whose properties are the node's config".into(),
            ),
            other => Err(match code::unserved(other) {
                Some(feature) => format!("{feature} is not served by dynkv (message code {other})"),
                None => format!("unknown message code {other}"),
            }),
        };
        result.unwrap_or_else(|message| error_frame(&message))
    }

    async fn get(&self, request: RpbGetReq) -> Result<Frames, String> {
        default_type(request.r#type.as_deref())?;
        check_bucket(&request.bucket)?;
        let options = GetOptions {
            r: quorum_of(request.r),
            pr: quorum_of(request.pr),
            timeout_ms: request.timeout.map(u64::from),
            sloppy_quorum: request.sloppy_quorum,
            ask_all_replicas: None,
        };
        let response = self
            .node
            .handle_client(ClientRequest::Get {
                bucket: request.bucket.clone(),
                key: request.key,
                options,
            })
            .await;
        let head = request.head.unwrap_or(false);
        Ok(match response {
            ClientResponse::Found { siblings, context } => {
                if request
                    .if_modified
                    .as_ref()
                    .is_some_and(|given| *given == context)
                {
                    one(
                        code::GET_RESP,
                        &RpbGetResp {
                            content: Vec::new(),
                            vclock: None,
                            unchanged: Some(true),
                        },
                    )
                } else {
                    one(
                        code::GET_RESP,
                        &RpbGetResp {
                            content: siblings
                                .iter()
                                .map(|sibling| content_message(sibling, head))
                                .collect(),
                            vclock: Some(context),
                            unchanged: None,
                        },
                    )
                }
            }
            // Not found: an empty answer; a tombstone's vclock when asked for
            // (deletedvclock), so that a later write supersedes it.
            ClientResponse::NotFound { context } => one(
                code::GET_RESP,
                &RpbGetResp {
                    content: Vec::new(),
                    vclock: context
                        .filter(|_| request.deletedvclock.unwrap_or(false))
                        .map(|context| context.into_vec()),
                    unchanged: None,
                },
            ),
            ClientResponse::Error(error) => return Err(error_message(&error)),
            other => return Err(format!("unexpected answer from the node: {other:?}")),
        })
    }

    async fn put(&self, request: RpbPutReq) -> Result<Frames, String> {
        default_type(request.r#type.as_deref())?;
        check_bucket(&request.bucket)?;
        let assigned = request.key.is_none();
        let key = match request.key {
            Some(key) => key,
            None => crate::http::random_name(27).into_bytes(),
        };
        let mut context = request.vclock;
        // Conditional puts read first: if_none_match needs no live value, if_not_modified
        // needs the key's context to still be the one given.
        if request.if_none_match.unwrap_or(false) || request.if_not_modified.unwrap_or(false) {
            let current = self
                .node
                .handle_client(ClientRequest::Get {
                    bucket: request.bucket.clone(),
                    key: key.clone(),
                    options: GetOptions::default(),
                })
                .await;
            match current {
                ClientResponse::Found { context: found, .. } => {
                    if request.if_none_match.unwrap_or(false) {
                        return Err("match_found: the key exists (if_none_match)".into());
                    }
                    if context.as_deref() != Some(found.as_slice()) {
                        return Err("modified: the key changed since the vclock given was read (if_not_modified)".into());
                    }
                }
                ClientResponse::NotFound { context: tombstone } => {
                    if request.if_not_modified.unwrap_or(false) {
                        return Err("notfound: the key does not exist (if_not_modified)".into());
                    }
                    if context.is_none() {
                        context = tombstone.map(|context| context.into_vec());
                    }
                }
                ClientResponse::Error(error) => return Err(error_message(&error)),
                other => return Err(format!("unexpected answer from the node: {other:?}")),
            }
        }
        let content = request.content;
        let return_body = request.return_body.unwrap_or(false);
        let return_head = request.return_head.unwrap_or(false);
        let options = PutOptions {
            w: quorum_of(request.w),
            dw: quorum_of(request.dw),
            pw: quorum_of(request.pw),
            timeout_ms: request.timeout.map(u64::from),
            return_body: return_body || return_head,
            sloppy_quorum: request.sloppy_quorum,
            r: None,
        };
        let new_content = NewContent {
            value: content.value,
            content_type: content
                .content_type
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_default(),
            user_metadata: content
                .usermeta
                .into_iter()
                .map(|pair| {
                    (
                        String::from_utf8_lossy(&pair.key).into_owned(),
                        String::from_utf8_lossy(&pair.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect(),
        };
        let response = self
            .node
            .handle_client(ClientRequest::Put {
                bucket: request.bucket,
                key: key.clone(),
                context: context.map(serde_bytes::ByteBuf::from),
                content: new_content,
                options,
            })
            .await;
        match response {
            ClientResponse::Stored { siblings, context } => {
                let answer = if return_body || return_head {
                    RpbPutResp {
                        content: siblings
                            .iter()
                            .map(|sibling| content_message(sibling, !return_body))
                            .collect(),
                        vclock: Some(context),
                        key: assigned.then_some(key),
                    }
                } else {
                    RpbPutResp {
                        content: Vec::new(),
                        vclock: None,
                        key: assigned.then_some(key),
                    }
                };
                Ok(one(code::PUT_RESP, &answer))
            }
            ClientResponse::Error(error) => Err(error_message(&error)),
            other => Err(format!("unexpected answer from the node: {other:?}")),
        }
    }

    async fn delete(&self, request: RpbDelReq) -> Result<Frames, String> {
        default_type(request.r#type.as_deref())?;
        check_bucket(&request.bucket)?;
        // Riak's rw stands for r and w of a delete when they are not given.
        let w = request.w.or(request.rw);
        let r = request.r.or(request.rw);
        let options = PutOptions {
            w: quorum_of(w),
            dw: quorum_of(request.dw),
            pw: quorum_of(request.pw),
            timeout_ms: request.timeout.map(u64::from),
            return_body: false,
            sloppy_quorum: request.sloppy_quorum,
            r: r.map(|r| quorum_of(Some(r))),
        };
        let response = self
            .node
            .handle_client(ClientRequest::Delete {
                bucket: request.bucket,
                key: request.key,
                context: request.vclock.map(serde_bytes::ByteBuf::from),
                options,
            })
            .await;
        match response {
            ClientResponse::Stored { .. } | ClientResponse::NotFound { .. } => {
                Ok(vec![(code::DEL_RESP, Vec::new())])
            }
            ClientResponse::Error(error) => Err(error_message(&error)),
            other => Err(format!("unexpected answer from the node: {other:?}")),
        }
    }

    async fn get_bucket(&self, bucket: &[u8]) -> Result<Frames, String> {
        check_bucket(bucket)?;
        let props = self
            .node
            .bucket_props(bucket)
            .await
            .map_err(|error| error.message)?;
        Ok(one(
            code::GET_BUCKET_RESP,
            &RpbGetBucketResp {
                props: props_message(&props),
            },
        ))
    }

    async fn set_bucket(&self, bucket: &[u8], given: &RpbBucketProps) -> Result<Frames, String> {
        check_bucket(bucket)?;
        let mut props = self
            .node
            .bucket_props(bucket)
            .await
            .map_err(|error| error.message)?;
        apply_props(&mut props, given);
        self.node
            .set_bucket_props(bucket, Some(props))
            .await
            .map_err(|error| error.message)?;
        Ok(vec![(code::SET_BUCKET_RESP, Vec::new())])
    }

    /// List keys (always streamed) and list buckets (streamed when asked): one frame per page
    /// of the coverage scan, then one that says `done`; an error frame if the scan failed.
    async fn stream_listing<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        code: u8,
        body: &[u8],
    ) -> std::io::Result<()> {
        let request = if code == code::LIST_KEYS_REQ {
            decode::<RpbListKeysReq>(body).and_then(|request| {
                default_type(request.r#type.as_deref())?;
                check_bucket(&request.bucket)?;
                Ok((Some(request.bucket), request.timeout, true))
            })
        } else {
            decode::<RpbListBucketsReq>(body).and_then(|request| {
                default_type(request.r#type.as_deref())?;
                Ok((None, request.timeout, request.stream.unwrap_or(false)))
            })
        };
        let (bucket, timeout, streamed) = match request {
            Ok(request) => request,
            Err(message) => return write_frames(stream, &error_frame(&message)).await,
        };
        let response_code = if code == code::LIST_KEYS_REQ {
            code::LIST_KEYS_RESP
        } else {
            code::LIST_BUCKETS_RESP
        };
        let page = |names: Vec<Vec<u8>>, done: Option<bool>| -> Vec<u8> {
            if response_code == code::LIST_KEYS_RESP {
                RpbListKeysResp { keys: names, done }.encode_to_vec()
            } else {
                RpbListBucketsResp {
                    buckets: names,
                    done,
                }
                .encode_to_vec()
            }
        };
        let (sender, mut receiver) = mpsc::channel::<Vec<Vec<u8>>>(16);
        let node = self.node.clone();
        let scan = tokio::spawn(async move {
            node.coverage_scan(bucket, timeout.map(u64::from), sender)
                .await
        });
        let mut whole = Vec::new();
        while let Some(names) = receiver.recv().await {
            if streamed {
                if !names.is_empty() {
                    write_frames(stream, &[(response_code, page(names, None))]).await?;
                }
            } else {
                whole.extend(names);
            }
        }
        match scan.await {
            Ok(Ok(())) => {
                let last = if streamed {
                    page(Vec::new(), Some(true))
                } else {
                    whole.sort();
                    page(whole, None)
                };
                write_frames(stream, &[(response_code, last)]).await
            }
            Ok(Err(error)) => write_frames(stream, &error_frame(&error_message(&error))).await,
            Err(error) => {
                write_frames(stream, &error_frame(&format!("the scan failed: {error}"))).await
            }
        }
    }
}

async fn write_frames<S: AsyncWrite + Unpin>(
    stream: &mut S,
    frames: &[(u8, Vec<u8>)],
) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(frames.iter().map(|(_, body)| body.len() + 5).sum());
    for (code, body) in frames {
        bytes.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
        bytes.push(*code);
        bytes.extend_from_slice(body);
    }
    stream.write_all(&bytes).await?;
    stream.flush().await
}

fn one(code: u8, message: &impl Message) -> Frames {
    vec![(code, message.encode_to_vec())]
}

fn error_frame(message: &str) -> Frames {
    one(
        code::ERROR_RESP,
        &RpbErrorResp {
            errmsg: message.as_bytes().to_vec(),
            errcode: 0,
        },
    )
}

fn decode<M: Message + Default>(body: &[u8]) -> Result<M, String> {
    M::decode(body).map_err(|error| format!("the message cannot be decoded: {error}"))
}

fn error_message(error: &ClientError) -> String {
    error.message.clone()
}

/// Only the `default` bucket type exists.
fn default_type(bucket_type: Option<&[u8]>) -> Result<(), String> {
    match bucket_type {
        None | Some(b"default") => Ok(()),
        Some(other) => Err(format!(
            "bucket type {:?} is not served: dynkv has the default type only",
            String::from_utf8_lossy(other)
        )),
    }
}

fn check_bucket(bucket: &[u8]) -> Result<(), String> {
    if bucket == crate::server::node::PROPS_BUCKET {
        return Err("that bucket name is reserved".into());
    }
    crate::protocol::validate_bucket_and_key(bucket, b"k").map_err(|error| error.message)
}

/// A quorum field as Riak's clients send it: a count or a symbolic value.
fn quorum_of(value: Option<u32>) -> Quorum {
    match value {
        None | Some(quorum::DEFAULT) => Quorum::Default,
        Some(quorum::ONE) => Quorum::One,
        Some(quorum::QUORUM) => Quorum::Quorum,
        Some(quorum::ALL) => Quorum::All,
        Some(count) => Quorum::Count(count),
    }
}

fn quorum_value(level: Quorum) -> u32 {
    match level {
        Quorum::One => quorum::ONE,
        Quorum::Quorum => quorum::QUORUM,
        Quorum::All => quorum::ALL,
        Quorum::Default => quorum::DEFAULT,
        Quorum::Count(count) => count,
    }
}

fn content_message(content: &Content, head: bool) -> RpbContent {
    let seconds = content.last_modified_micros / 1_000_000;
    RpbContent {
        value: if head {
            Vec::new()
        } else {
            content.value.clone()
        },
        content_type: Some(content.content_type.clone().into_bytes()),
        charset: None,
        content_encoding: None,
        vtag: Some(crate::http::object::vtag(content).into_bytes()),
        links: Vec::new(),
        last_mod: Some(seconds.min(u64::from(u32::MAX)) as u32),
        last_mod_usecs: Some((content.last_modified_micros % 1_000_000) as u32),
        usermeta: content
            .user_metadata
            .iter()
            .filter(|(name, _)| !name.starts_with('\0'))
            .map(|(name, value)| RpbPair {
                key: name.clone().into_bytes(),
                value: Some(value.clone().into_bytes()),
            })
            .collect(),
        indexes: Vec::new(),
        deleted: content.deleted.then_some(true),
    }
}

fn props_message(props: &BucketProps) -> RpbBucketProps {
    RpbBucketProps {
        n_val: Some(props.n_val),
        allow_mult: Some(props.allow_mult),
        last_write_wins: Some(props.last_write_wins),
        pr: Some(quorum_value(props.pr)),
        r: Some(quorum_value(props.r)),
        w: Some(quorum_value(props.w)),
        pw: Some(quorum_value(props.pw)),
        dw: Some(quorum_value(props.dw)),
        rw: Some(quorum_value(props.w)),
        basic_quorum: Some(props.basic_quorum),
        notfound_ok: Some(props.notfound_ok),
    }
}

fn apply_props(props: &mut BucketProps, given: &RpbBucketProps) {
    if let Some(n_val) = given.n_val {
        props.n_val = n_val;
    }
    if let Some(allow_mult) = given.allow_mult {
        props.allow_mult = allow_mult;
    }
    if let Some(last_write_wins) = given.last_write_wins {
        props.last_write_wins = last_write_wins;
    }
    for (field, value) in [
        (&mut props.r, given.r),
        (&mut props.w, given.w),
        (&mut props.dw, given.dw),
        (&mut props.pr, given.pr),
        (&mut props.pw, given.pw),
    ] {
        if value.is_some() {
            *field = quorum_of(value);
        }
    }
    if let Some(basic_quorum) = given.basic_quorum {
        props.basic_quorum = basic_quorum;
    }
    if let Some(notfound_ok) = given.notfound_ok {
        props.notfound_ok = notfound_ok;
    }
}
