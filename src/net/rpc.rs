//! Pipelined request/response over one long-lived QUIC connection.
//!
//! A client opens a small pool of long-lived bidirectional streams on the connection and
//! spreads requests over them; each request carries an id and the response comes back on the
//! same stream with the same id, in any order. Streams are reused because opening one per
//! request costs 2–5× more CPU, and several are used so that one large frame does not hold up
//! every other request behind it.
//!
//! Per stream on the client: a writer task owns the send half (a frame is handed over whole,
//! so a caller that times out mid-way can never leave half a frame on the wire), and a reader
//! task routes responses to the waiting callers by id. When the connection or a stream dies,
//! every call waiting on it fails at once with [`RpcError::ConnectionLost`].
//!
//! On the server ([`serve_connection`]) each stream is read frame by frame; every request runs
//! concurrently, bounded per connection: when the bound is reached the server stops reading,
//! and QUIC flow control pushes back on the sender. A peer that sends a malformed frame has
//! its connection closed with [`CLOSE_MALFORMED_FRAME`]; other connections are not affected.

use crate::net::frame::{
    self, Frame, FrameError, FrameKind, decode_body, encode_error_frame, encode_frame, read_frame,
    read_frame_within,
};
use crate::net::{MAX_STREAMS_PER_CONNECTION, RpcLimits, SMALL_FRAME_BYTES};
use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};

/// A boxed, sendable future; the return type of handlers and transports.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Answers one request. Handlers run concurrently, so they must be cheap to clone into tasks
/// (hence `Arc`) and must not assume any ordering between requests.
pub type Handler<Req, Resp> = Arc<dyn Fn(Req) -> BoxFuture<'static, Resp> + Send + Sync>;

/// Application close code: the client side went away normally.
pub const CLOSE_NORMAL: u32 = 0;
/// Application close code: the peer sent bytes that are not a valid frame.
pub const CLOSE_MALFORMED_FRAME: u32 = 1;
/// Application close code: the server is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 2;
/// Application close code: the server holds as many connections as its limit allows; the
/// close reason names the limit.
pub const CLOSE_TOO_MANY_CONNECTIONS: u32 = 3;

/// Frames queued per stream before writers wait; enough to keep a stream busy, small enough
/// that a stalled peer cannot make us buffer much.
const WRITE_QUEUE_FRAMES: usize = 256;
/// Frames written with one call, so a busy stream costs one syscall-ish write per batch.
const WRITE_BATCH_FRAMES: usize = 64;

/// Why a call on an [`RpcClient`] produced no response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    #[error("no response within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("connection lost: {reason}")]
    ConnectionLost { reason: String },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the peer could not answer: {reason}")]
    Remote { reason: String },
}

type Reply = oneshot::Sender<Result<Frame, RpcError>>;

/// The calls waiting for a response on one stream. Once the stream has failed, `failure` is
/// set under the same lock that registers calls, so no call can slip in and wait forever.
struct PendingCalls {
    state: Mutex<PendingState>,
    /// Mirrors `state.failure.is_some()` so the liveness check on every call takes no lock.
    failed: AtomicBool,
}

struct PendingState {
    waiting: HashMap<u64, Reply>,
    failure: Option<RpcError>,
}

impl PendingCalls {
    fn new() -> Self {
        PendingCalls {
            state: Mutex::new(PendingState {
                waiting: HashMap::new(),
                failure: None,
            }),
            failed: AtomicBool::new(false),
        }
    }

    fn register(
        &self,
        request_id: u64,
    ) -> Result<oneshot::Receiver<Result<Frame, RpcError>>, RpcError> {
        let mut state = self.state.lock();
        if let Some(failure) = &state.failure {
            return Err(failure.clone());
        }
        let (sender, receiver) = oneshot::channel();
        state.waiting.insert(request_id, sender);
        Ok(receiver)
    }

    fn remove(&self, request_id: u64) {
        self.state.lock().waiting.remove(&request_id);
    }

    fn complete(&self, frame: Frame) {
        let reply = self.state.lock().waiting.remove(&frame.request_id);
        match reply {
            // The caller may have given up in the meantime; that is fine.
            Some(reply) => drop(reply.send(Ok(frame))),
            None => debug!(
                request_id = frame.request_id,
                "response for a call that already gave up"
            ),
        }
    }

    /// Fails every waiting call and every later one with `error`.
    fn fail(&self, error: RpcError) {
        let waiting = {
            let mut state = self.state.lock();
            if state.failure.is_none() {
                state.failure = Some(error.clone());
                self.failed.store(true, Ordering::Relaxed);
            }
            std::mem::take(&mut state.waiting)
        };
        for (_, reply) in waiting {
            let _ = reply.send(Err(error.clone()));
        }
    }

    fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

struct ClientStream {
    outgoing: mpsc::Sender<Bytes>,
    pending: Arc<PendingCalls>,
}

/// Removes a call's pending entry when the call ends in any way (answer, timeout, or the
/// caller dropping the future), so abandoned calls never accumulate.
struct PendingGuard<'a> {
    pending: &'a PendingCalls,
    request_id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.remove(self.request_id);
    }
}

/// The calling side of one QUIC connection. Cheap to share (`Arc`); any number of concurrent
/// calls are multiplexed over its streams. Owns the connection: dropping the client closes it.
pub struct RpcClient<Req, Resp> {
    connection: quinn::Connection,
    streams: Vec<ClientStream>,
    next_request_id: AtomicU64,
    next_stream: AtomicUsize,
    max_frame_bytes: u32,
    closed: AtomicBool,
    _messages: PhantomData<fn(&Req) -> Resp>,
}

impl<Req, Resp> RpcClient<Req, Resp>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    /// Opens the stream pool on an established connection.
    pub async fn new(connection: quinn::Connection, limits: &RpcLimits) -> Result<Self, RpcError> {
        let peer = connection.remote_address();
        let connection_span = info_span!("rpc_client_connection", peer = %peer);
        let mut streams = Vec::with_capacity(limits.streams_per_connection);
        for index in 0..limits.streams_per_connection {
            let (send, receive) = match connection.open_bi().await {
                Ok(stream) => stream,
                Err(error) => {
                    // Stream tasks already spawned hold the connection; closing it ends them.
                    connection.close(quinn::VarInt::from_u32(CLOSE_NORMAL), b"setup failed");
                    return Err(RpcError::ConnectionLost {
                        reason: error.to_string(),
                    });
                }
            };
            let pending = Arc::new(PendingCalls::new());
            let (outgoing, queue) = mpsc::channel(WRITE_QUEUE_FRAMES);
            let span = info_span!(parent: &connection_span, "stream", index);
            tokio::spawn(
                write_frames(send, queue, Some(pending.clone()), connection.clone())
                    .instrument(span.clone()),
            );
            tokio::spawn(
                read_responses(
                    receive,
                    pending.clone(),
                    connection.clone(),
                    limits.max_frame_bytes,
                )
                .instrument(span),
            );
            streams.push(ClientStream { outgoing, pending });
        }
        Ok(RpcClient {
            connection,
            streams,
            next_request_id: AtomicU64::new(1),
            next_stream: AtomicUsize::new(0),
            max_frame_bytes: limits.max_frame_bytes,
            closed: AtomicBool::new(false),
            _messages: PhantomData,
        })
    }

    /// Sends `request` and waits up to `timeout` for its response.
    ///
    /// An oversize request fails with [`RpcError::Frame`] before anything is sent. When the
    /// connection dies, waiting calls fail promptly with [`RpcError::ConnectionLost`].
    pub async fn call(&self, request: &Req, timeout: Duration) -> Result<Resp, RpcError> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(
            FrameKind::Request,
            request_id,
            request,
            self.max_frame_bytes,
        )?;
        let index = if frame.len() <= SMALL_FRAME_BYTES || self.streams.len() == 1 {
            0
        } else {
            1 + self.next_stream.fetch_add(1, Ordering::Relaxed) % (self.streams.len() - 1)
        };
        let stream = &self.streams[index];
        let timeout_error = || RpcError::Timeout {
            timeout_ms: timeout.as_millis() as u64,
        };
        let exchange = async {
            let receiver = stream.pending.register(request_id)?;
            let _guard = PendingGuard {
                pending: &stream.pending,
                request_id,
            };
            if stream.outgoing.send(frame).await.is_err() {
                return Err(self.lost_reason());
            }
            match receiver.await {
                Ok(result) => result,
                // The reader dropped the reply without answering: it is gone.
                Err(_) => Err(self.lost_reason()),
            }
        };
        let frame = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| timeout_error())??;
        match frame.kind {
            FrameKind::Response => Ok(decode_body(&frame.body)?),
            FrameKind::Error => Err(RpcError::Remote {
                reason: frame::error_reason(&frame.body),
            }),
            FrameKind::Request => Err(RpcError::Frame(FrameError::Decode {
                reason: "a request frame arrived where a response was expected".into(),
            })),
        }
    }
}

impl<Req, Resp> RpcClient<Req, Resp> {
    /// False once the connection or any of its streams has failed; the owner should then drop
    /// this client and connect again.
    pub fn is_alive(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
            && self.connection.close_reason().is_none()
            && !self.streams.iter().any(|stream| stream.pending.is_failed())
    }

    /// Calls waiting for a response, over all streams.
    pub fn pending_calls(&self) -> usize {
        self.streams
            .iter()
            .map(|stream| stream.pending.state.lock().waiting.len())
            .sum()
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Closes the connection; waiting calls fail with [`RpcError::ConnectionLost`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.connection
            .close(quinn::VarInt::from_u32(CLOSE_NORMAL), b"client closed");
    }

    fn lost_reason(&self) -> RpcError {
        RpcError::ConnectionLost {
            reason: self
                .connection
                .close_reason()
                .map_or_else(|| "stream closed".to_string(), |error| error.to_string()),
        }
    }
}

impl<Req, Resp> Drop for RpcClient<Req, Resp> {
    fn drop(&mut self) {
        self.close();
    }
}

/// Writes queued frames to a stream in batches until every sender is gone, then finishes the
/// stream. On the client, a write failure fails the stream's waiting calls.
///
/// It also stops as soon as the connection closes: the stream holds the connection and with it
/// the endpoint's UDP socket, which must not outlive the connection just because a slow
/// handler still holds a sender.
async fn write_frames(
    mut send: quinn::SendStream,
    mut queue: mpsc::Receiver<Bytes>,
    pending: Option<Arc<PendingCalls>>,
    connection: quinn::Connection,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_FRAMES);
    loop {
        let received = tokio::select! {
            received = queue.recv_many(&mut batch, WRITE_BATCH_FRAMES) => received,
            _ = connection.closed() => return,
        };
        if received == 0 {
            break;
        }
        // Let the other ready tasks queue their frames first: under load they then share
        // this write, and so QUIC packets and send syscalls (Cassandra's outbound message
        // coalescing, without its wait).
        tokio::task::yield_now().await;
        while batch.len() < WRITE_BATCH_FRAMES {
            match queue.try_recv() {
                Ok(frame) => batch.push(frame),
                Err(_) => break,
            }
        }
        if let Err(error) = send.write_all_chunks(&mut batch).await {
            debug!(error = %error, "stream write failed");
            if let Some(pending) = pending {
                let reason = connection
                    .close_reason()
                    .map_or_else(|| error.to_string(), |reason| reason.to_string());
                pending.fail(RpcError::ConnectionLost { reason });
            }
            return;
        }
        batch.clear();
    }
    // The peer may already be gone; nothing is lost by not finishing then.
    let _ = send.finish();
}

/// Routes responses read from one client stream to their callers.
async fn read_responses(
    mut receive: quinn::RecvStream,
    pending: Arc<PendingCalls>,
    connection: quinn::Connection,
    max_frame_bytes: u32,
) {
    loop {
        match read_frame(&mut receive, max_frame_bytes).await {
            Ok(Some(frame)) if frame.kind != FrameKind::Request => pending.complete(frame),
            Ok(Some(_)) => {
                let error = FrameError::Decode {
                    reason: "the server sent a request frame".into(),
                };
                return violation(&connection, &pending, error);
            }
            Ok(None) => {
                pending.fail(RpcError::ConnectionLost {
                    reason: "the server closed the stream".into(),
                });
                return;
            }
            Err(error) if error.is_protocol_violation() => {
                return violation(&connection, &pending, error);
            }
            Err(error) => {
                let reason = connection
                    .close_reason()
                    .map_or_else(|| error.to_string(), |reason| reason.to_string());
                debug!(reason = %reason, "response stream ended");
                pending.fail(RpcError::ConnectionLost { reason });
                return;
            }
        }
    }
}

fn violation(connection: &quinn::Connection, pending: &PendingCalls, error: FrameError) {
    warn!(peer = %connection.remote_address(), error = %error, "malformed response frame; closing connection");
    connection.close(
        quinn::VarInt::from_u32(CLOSE_MALFORMED_FRAME),
        b"malformed frame",
    );
    pending.fail(RpcError::Frame(error));
}

/// Serves requests arriving on `connection` until it closes.
///
/// Accepts up to [`MAX_STREAMS_PER_CONNECTION`] bidirectional streams, reads frames from each,
/// runs `handler` for every request concurrently (at most
/// [`RpcLimits::max_in_flight_per_connection`] at once; beyond that the streams are not read,
/// which back-pressures the peer) and writes each response with its request's id.
///
/// A malformed frame (bad magic, unknown version or kind, a length over
/// [`RpcLimits::max_frame_bytes`], a truncated frame) closes the connection with
/// [`CLOSE_MALFORMED_FRAME`]. A well-framed request whose body does not decode, a handler that
/// panics, and a response too large to send are answered with an error frame instead, since
/// they concern one request, not the peer's framing.
pub async fn serve_connection<Req, Resp>(
    connection: quinn::Connection,
    handler: Handler<Req, Resp>,
    limits: RpcLimits,
    budget: ServerBudget,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    let peer = connection.remote_address();
    let span = info_span!("rpc_connection", peer = %peer);
    async move {
        debug!("serving connection");
        let in_flight = Arc::new(Semaphore::new(limits.max_in_flight_per_connection));
        let stream_slots = Arc::new(Semaphore::new(MAX_STREAMS_PER_CONNECTION));
        let mut streams = JoinSet::new();
        loop {
            let Ok(slot) = stream_slots.clone().acquire_owned().await else {
                break;
            };
            let (send, receive) = match connection.accept_bi().await {
                Ok(stream) => stream,
                Err(error) => {
                    debug!(reason = %error, "connection closed");
                    break;
                }
            };
            let context = StreamContext {
                connection: connection.clone(),
                peer,
                handler: handler.clone(),
                in_flight: in_flight.clone(),
                budget: budget.clone(),
                max_frame_bytes: limits.max_frame_bytes,
            };
            streams.spawn(
                async move {
                    serve_stream(context, send, receive).await;
                    drop(slot);
                }
                .in_current_span(),
            );
            while streams.try_join_next().is_some() {}
        }
        // Dropping the set stops the stream readers; handlers already running finish on
        // their own and find their stream gone.
        drop(streams);
    }
    .instrument(span)
    .await
}

/// What a server's connections share: permits for the request bytes
/// ([`RpcLimits::max_in_flight_bytes`], in units of [`crate::net::frame::BUDGET_UNIT_BYTES`])
/// and the requests ([`RpcLimits::max_in_flight_requests`]) in flight over all of them.
#[derive(Clone)]
pub struct ServerBudget {
    pub bytes: Arc<Semaphore>,
    pub requests: Arc<Semaphore>,
}

impl ServerBudget {
    /// The requests of `limits` and the bytes of `bytes` (which other listeners may share).
    pub fn new(limits: &RpcLimits, bytes: &crate::net::budget::ByteBudget) -> Self {
        ServerBudget {
            bytes: bytes.permits().clone(),
            requests: Arc::new(Semaphore::new(
                limits.max_in_flight_requests.min(Semaphore::MAX_PERMITS),
            )),
        }
    }
}

struct StreamContext<Req, Resp> {
    connection: quinn::Connection,
    peer: SocketAddr,
    handler: Handler<Req, Resp>,
    in_flight: Arc<Semaphore>,
    budget: ServerBudget,
    max_frame_bytes: u32,
}

async fn serve_stream<Req, Resp>(
    context: StreamContext<Req, Resp>,
    send: quinn::SendStream,
    mut receive: quinn::RecvStream,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    let (outgoing, queue) = mpsc::channel(WRITE_QUEUE_FRAMES);
    tokio::spawn(write_frames(send, queue, None, context.connection.clone()).in_current_span());
    loop {
        // Take the permit before reading: when the connection has too much in flight, its
        // frames stay unread and QUIC flow control stops the sender.
        let Ok(permit) = context.in_flight.clone().acquire_owned().await else {
            return;
        };
        let Ok(server_permit) = context.budget.requests.clone().acquire_owned().await else {
            return;
        };
        let (frame, bytes) = match read_frame_within(
            &mut receive,
            context.max_frame_bytes,
            Some(&context.budget.bytes),
        )
        .await
        {
            Ok(Some((frame, bytes))) if frame.kind == FrameKind::Request => (frame, bytes),
            Ok(Some((frame, _))) => {
                let error = FrameError::Decode {
                    reason: format!("expected a request frame, got {:?}", frame.kind),
                };
                return close_malformed(&context, &error);
            }
            // The client finished its side of the stream; answers still queued are written.
            Ok(None) => return,
            Err(error) if error.is_protocol_violation() => {
                return close_malformed(&context, &error);
            }
            Err(error) => {
                debug!(error = %error, "request stream ended");
                return;
            }
        };
        let handler = context.handler.clone();
        let outgoing = outgoing.clone();
        let max_frame_bytes = context.max_frame_bytes;
        tokio::spawn(
            async move {
                let reply = answer(&handler, frame, max_frame_bytes).await;
                // The stream may be gone (connection closed); the answer has nowhere to go.
                let _ = outgoing.send(reply).await;
                drop(permit);
                drop(server_permit);
                drop(bytes);
            }
            .in_current_span(),
        );
    }
}

fn close_malformed<Req, Resp>(context: &StreamContext<Req, Resp>, error: &FrameError) {
    warn!(peer = %context.peer, error = %error, "malformed frame; closing connection");
    context.connection.close(
        quinn::VarInt::from_u32(CLOSE_MALFORMED_FRAME),
        b"malformed frame",
    );
}

/// Runs the handler for one request frame and encodes what goes back.
async fn answer<Req, Resp>(
    handler: &Handler<Req, Resp>,
    frame: Frame,
    max_frame_bytes: u32,
) -> Bytes
where
    Req: DeserializeOwned,
    Resp: Serialize,
{
    let request_id = frame.request_id;
    let request: Req = match decode_body(&frame.body) {
        Ok(request) => request,
        Err(error) => {
            debug!(request_id, error = %error, "undecodable request");
            return encode_error_frame(request_id, &format!("request not understood: {error}"));
        }
    };
    let response = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(request))) {
        Ok(future) => CatchUnwind(future).await,
        Err(_) => None,
    };
    let Some(response) = response else {
        warn!(request_id, "request handler panicked");
        return encode_error_frame(request_id, "the request handler failed");
    };
    match encode_frame(FrameKind::Response, request_id, &response, max_frame_bytes) {
        Ok(bytes) => bytes,
        Err(error) => {
            warn!(request_id, error = %error, "response cannot be sent");
            encode_error_frame(request_id, &format!("response cannot be sent: {error}"))
        }
    }
}

/// Polls a handler future, turning a panic into `None` so one bad request cannot take down
/// the stream it arrived on.
struct CatchUnwind<T>(BoxFuture<'static, T>);

impl<T> Future for CatchUnwind<T> {
    type Output = Option<T>;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let future = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(context))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Some(value)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(None),
        }
    }
}
