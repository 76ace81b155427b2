//! An in-memory network for deterministic simulation.
//!
//! Whole clusters run in one process over a [`MemoryNetwork`]: no sockets, time only through
//! `tokio::time` (so tests run with a paused clock), and randomness only from the seeded
//! [`StdRng`] given at construction, so a seed reproduces a run (given a single-threaded
//! runtime, whose task order is itself deterministic).
//!
//! Every request and response is encoded into a frame and decoded again with [`frame`], with
//! the same size limit as on QUIC, so codec bugs and oversize messages show up in simulation
//! and not first in production.
//!
//! Faults behave as on a real network, which is silent: a request over a cut link, a lost
//! message, or a request to an unregistered (crashed) node produces no answer, and the caller
//! sees [`TransportError::Timeout`] when its timeout expires. Each direction of a call is
//! judged when it is sent: a link cut while a request is being handled loses the response.
//! A request that was delivered is handled to the end even if the caller gave up, as a real
//! server would.

use crate::core::ids::NodeId;
use crate::net::frame::{self, FrameKind, decode_body, decode_frame, encode_frame};
use crate::net::rpc::{BoxFuture, Handler};
use crate::net::{RpcLimits, Transport, TransportError};
use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng;
use rand::rngs::StdRng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, trace};

/// The fate of one message, drawn when it is sent.
enum Leg {
    Dropped,
    Delivered {
        delay: Duration,
        duplicate_delay: Option<Duration>,
    },
}

struct NetworkState<Req, Resp> {
    nodes: HashMap<NodeId, Handler<Req, Resp>>,
    /// Directed pairs (from, to) that drop everything; `cut` inserts both directions.
    cut_links: BTreeSet<(NodeId, NodeId)>,
    isolated: BTreeSet<NodeId>,
    loss_probability: f64,
    duplicate_probability: f64,
    delay_min: Duration,
    delay_max: Duration,
    rng: StdRng,
}

impl<Req, Resp> NetworkState<Req, Resp> {
    fn blocked(&self, from: &NodeId, to: &NodeId) -> bool {
        if from == to {
            return false;
        }
        self.isolated.contains(from)
            || self.isolated.contains(to)
            || self.cut_links.contains(&(from.clone(), to.clone()))
    }

    fn sample_delay(&mut self) -> Duration {
        if self.delay_max <= self.delay_min {
            return self.delay_min;
        }
        let min = self.delay_min.as_nanos() as u64;
        let max = self.delay_max.as_nanos() as u64;
        Duration::from_nanos(self.rng.random_range(min..=max))
    }

    fn draw(&mut self, probability: f64) -> bool {
        probability > 0.0 && self.rng.random_bool(probability)
    }

    /// Decides what happens to a message from `from` to `to`. The draws happen in a fixed
    /// order, and none happen for a blocked link, so a seed always yields the same sequence.
    fn plan(&mut self, from: &NodeId, to: &NodeId, may_duplicate: bool) -> Leg {
        if self.blocked(from, to) || self.draw(self.loss_probability) {
            return Leg::Dropped;
        }
        let delay = self.sample_delay();
        let duplicate_delay = if may_duplicate && self.draw(self.duplicate_probability) {
            Some(self.sample_delay())
        } else {
            None
        };
        Leg::Delivered {
            delay,
            duplicate_delay,
        }
    }
}

struct NetworkInner<Req, Resp> {
    state: Mutex<NetworkState<Req, Resp>>,
    max_frame_bytes: u32,
    next_request_id: AtomicU64,
}

/// A simulated network connecting registered nodes. Cloning shares the same network.
pub struct MemoryNetwork<Req, Resp> {
    inner: Arc<NetworkInner<Req, Resp>>,
}

impl<Req, Resp> Clone for MemoryNetwork<Req, Resp> {
    fn clone(&self) -> Self {
        MemoryNetwork {
            inner: self.inner.clone(),
        }
    }
}

type Reply<Resp> = oneshot::Sender<Result<Resp, TransportError>>;

impl<Req, Resp> MemoryNetwork<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    /// A fault-free network with default limits; all randomness comes from `rng`.
    pub fn new(rng: StdRng) -> Self {
        Self::with_limits(rng, &RpcLimits::default())
    }

    /// A fault-free network enforcing `limits.max_frame_bytes` on every message.
    pub fn with_limits(rng: StdRng, limits: &RpcLimits) -> Self {
        MemoryNetwork {
            inner: Arc::new(NetworkInner {
                state: Mutex::new(NetworkState {
                    nodes: HashMap::new(),
                    cut_links: BTreeSet::new(),
                    isolated: BTreeSet::new(),
                    loss_probability: 0.0,
                    duplicate_probability: 0.0,
                    delay_min: Duration::ZERO,
                    delay_max: Duration::ZERO,
                    rng,
                }),
                max_frame_bytes: limits.max_frame_bytes,
                next_request_id: AtomicU64::new(1),
            }),
        }
    }

    /// Attaches `node`, answering requests with `handler` (replacing any previous handler:
    /// a restarted node).
    pub fn register(&self, node: NodeId, handler: Handler<Req, Resp>) {
        self.inner.state.lock().nodes.insert(node, handler);
    }

    /// Detaches `node`, as if it crashed: requests to it go unanswered until their timeout.
    pub fn unregister(&self, node: &NodeId) {
        self.inner.state.lock().nodes.remove(node);
    }

    /// Drops every message between `a` and `b`, both directions.
    pub fn cut(&self, a: &NodeId, b: &NodeId) {
        let mut state = self.inner.state.lock();
        state.cut_links.insert((a.clone(), b.clone()));
        state.cut_links.insert((b.clone(), a.clone()));
    }

    /// Restores the link between `a` and `b` (an isolation stays in force).
    pub fn heal(&self, a: &NodeId, b: &NodeId) {
        let mut state = self.inner.state.lock();
        state.cut_links.remove(&(a.clone(), b.clone()));
        state.cut_links.remove(&(b.clone(), a.clone()));
    }

    /// Drops every message to and from `node` (it still talks to itself).
    pub fn isolate(&self, node: &NodeId) {
        self.inner.state.lock().isolated.insert(node.clone());
    }

    /// Ends the isolation of `node` (cuts stay).
    pub fn rejoin(&self, node: &NodeId) {
        self.inner.state.lock().isolated.remove(node);
    }

    /// Removes every cut and isolation. Loss, delay and duplication stay as set.
    pub fn heal_all(&self) {
        let mut state = self.inner.state.lock();
        state.cut_links.clear();
        state.isolated.clear();
    }

    /// Each message (request or response) is lost with this probability, clamped to [0, 1].
    pub fn set_loss(&self, probability: f64) {
        self.inner.state.lock().loss_probability = clamp_probability(probability);
    }

    /// Each message takes a uniformly drawn time in `[min, max]` to arrive.
    pub fn set_delay(&self, min: Duration, max: Duration) {
        let mut state = self.inner.state.lock();
        state.delay_min = min;
        state.delay_max = max.max(min);
    }

    /// Each request is delivered twice with this probability, clamped to [0, 1]. The handler
    /// runs for both copies; the caller gets the first answer only.
    pub fn set_duplicate(&self, probability: f64) {
        self.inner.state.lock().duplicate_probability = clamp_probability(probability);
    }

    /// A [`Transport`] handle that sends as `local`.
    pub fn transport(&self, local: NodeId) -> MemoryTransport<Req, Resp> {
        MemoryTransport {
            network: self.clone(),
            local,
        }
    }

    /// Sends `request` from `from` to `to` and waits up to `timeout` for the response.
    pub async fn call(
        &self,
        from: &NodeId,
        to: &NodeId,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        let deadline = Instant::now() + timeout;
        let request_id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_frame(
            FrameKind::Request,
            request_id,
            request,
            self.inner.max_frame_bytes,
        )?;
        let leg = self.inner.state.lock().plan(from, to, true);
        let (reply, answer) = oneshot::channel();
        match leg {
            Leg::Dropped => trace!(%from, %to, request_id, "request dropped"),
            Leg::Delivered {
                delay,
                duplicate_delay,
            } => {
                if let Some(duplicate_delay) = duplicate_delay {
                    trace!(%from, %to, request_id, "request duplicated");
                    tokio::spawn(self.clone().deliver(
                        from.clone(),
                        to.clone(),
                        bytes.clone(),
                        duplicate_delay,
                        None,
                    ));
                }
                tokio::spawn(self.clone().deliver(
                    from.clone(),
                    to.clone(),
                    bytes,
                    delay,
                    Some(reply),
                ));
            }
        }
        let timed_out = || TransportError::Timeout {
            peer: to.clone(),
            timeout_ms: timeout.as_millis() as u64,
        };
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            // Nothing will come back (lost, or no such node): the caller learns it only by
            // waiting, as on a real network.
            Ok(Err(_)) => {
                tokio::time::sleep_until(deadline).await;
                Err(timed_out())
            }
            Err(_) => Err(timed_out()),
        }
    }

    /// Carries one request to `to`, runs its handler and carries the response back. With
    /// `reply` = `None` this is a duplicate copy whose answer nobody waits for.
    async fn deliver(
        self,
        from: NodeId,
        to: NodeId,
        bytes: Bytes,
        delay: Duration,
        reply: Option<Reply<Resp>>,
    ) {
        tokio::time::sleep(delay).await;
        let handler = self.inner.state.lock().nodes.get(&to).cloned();
        let Some(handler) = handler else {
            trace!(%from, %to, "request to a node that is not running");
            return;
        };
        let max_frame_bytes = self.inner.max_frame_bytes;
        let (request_id, request) = match decode_frame(&bytes, max_frame_bytes) {
            Ok(frame) => (frame.request_id, decode_body::<Req>(&frame.body)),
            Err(error) => (0, Err(error)),
        };
        let response = match request {
            Ok(request) => {
                let response = handler(request).await;
                encode_frame(FrameKind::Response, request_id, &response, max_frame_bytes)
                    .unwrap_or_else(|error| {
                        debug!(%to, error = %error, "response cannot be sent");
                        frame::encode_error_frame(
                            request_id,
                            &format!("response cannot be sent: {error}"),
                        )
                    })
            }
            Err(error) => {
                frame::encode_error_frame(request_id, &format!("request not understood: {error}"))
            }
        };
        let Some(reply) = reply else {
            return;
        };
        let leg = self.inner.state.lock().plan(&to, &from, false);
        let Leg::Delivered { delay, .. } = leg else {
            trace!(%from, %to, request_id, "response dropped");
            return;
        };
        tokio::time::sleep(delay).await;
        let result = decode_frame(&response, max_frame_bytes)
            .map_err(TransportError::Frame)
            .and_then(|frame| match frame.kind {
                FrameKind::Response => decode_body(&frame.body).map_err(TransportError::Frame),
                _ => Err(TransportError::Remote {
                    peer: to.clone(),
                    reason: frame::error_reason(&frame.body),
                }),
            });
        let _ = reply.send(result);
    }
}

fn clamp_probability(probability: f64) -> f64 {
    if probability.is_nan() {
        0.0
    } else {
        probability.clamp(0.0, 1.0)
    }
}

/// A node's handle on a [`MemoryNetwork`]: calls are sent as `local`.
pub struct MemoryTransport<Req, Resp> {
    pub network: MemoryNetwork<Req, Resp>,
    pub local: NodeId,
}

impl<Req, Resp> Clone for MemoryTransport<Req, Resp> {
    fn clone(&self) -> Self {
        MemoryTransport {
            network: self.network.clone(),
            local: self.local.clone(),
        }
    }
}

impl<Req, Resp> Transport<Req, Resp> for MemoryTransport<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    fn call(
        &self,
        to: &NodeId,
        request: Req,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Resp, TransportError>> {
        let network = self.network.clone();
        let local = self.local.clone();
        let to = to.clone();
        Box::pin(async move { network.call(&local, &to, &request, timeout).await })
    }
}

#[cfg(test)]
mod tests {
    use crate::net::TransportError;
    use crate::net::test_support::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::time::Instant;

    const TIMEOUT: Duration = Duration::from_secs(1);

    fn is_timeout(result: &Result<TestResponse, TransportError>) -> bool {
        matches!(result, Err(TransportError::Timeout { .. }))
    }

    #[tokio::test(start_paused = true)]
    async fn cut_links_and_isolation_time_out_until_healed() {
        let network = memory_network(1);
        let (a, b, c) = (node("a"), node("b"), node("c"));
        let probe = Arc::new(Probe::default());
        network.register(b.clone(), test_handler(probe.clone()));
        network.set_delay(Duration::from_millis(10), Duration::from_millis(10));

        let started = Instant::now();
        assert!(network.call(&a, &b, &echo(1), TIMEOUT).await.is_ok());
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(20),
            "one delay each way"
        );

        network.cut(&a, &b);
        let started = Instant::now();
        assert!(is_timeout(&network.call(&a, &b, &echo(2), TIMEOUT).await));
        assert_eq!(
            started.elapsed(),
            TIMEOUT,
            "a cut link is silent until the timeout"
        );
        assert!(is_timeout(&network.call(&b, &a, &echo(3), TIMEOUT).await));
        assert!(
            network.call(&c, &b, &echo(4), TIMEOUT).await.is_ok(),
            "only a-b is cut"
        );
        assert_eq!(probe.calls(), 2, "nothing crossed the cut");

        network.heal(&a, &b);
        assert!(network.call(&a, &b, &echo(5), TIMEOUT).await.is_ok());

        network.isolate(&b);
        assert!(is_timeout(&network.call(&a, &b, &echo(6), TIMEOUT).await));
        assert!(is_timeout(&network.call(&c, &b, &echo(7), TIMEOUT).await));
        network.heal_all();
        assert!(network.call(&c, &b, &echo(8), TIMEOUT).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_is_lost_when_the_link_is_cut_during_handling() {
        let network = memory_network(1);
        let (a, b) = (node("a"), node("b"));
        let probe = Arc::new(Probe::default());
        network.register(b.clone(), test_handler(probe.clone()));
        let call = tokio::spawn({
            let network = network.clone();
            let (a, b) = (a.clone(), b.clone());
            async move {
                network
                    .call(&a, &b, &TestRequest::Sleep { millis: 100 }, TIMEOUT)
                    .await
            }
        });
        probe.wait_for_calls(1).await;
        network.cut(&a, &b);
        assert!(
            is_timeout(&call.await.unwrap()),
            "the request was handled, the answer lost"
        );
    }

    /// Runs 64 sequential calls under 30% loss and jittered delay; returns which succeeded.
    async fn outcomes(seed: u64) -> Vec<bool> {
        let network = memory_network(seed);
        let (a, b) = (node("a"), node("b"));
        network.register(b.clone(), test_handler(Arc::new(Probe::default())));
        network.set_loss(0.3);
        network.set_delay(Duration::from_millis(1), Duration::from_millis(50));
        let mut outcomes = Vec::new();
        for tag in 0..64 {
            outcomes.push(network.call(&a, &b, &echo(tag), TIMEOUT).await.is_ok());
        }
        outcomes
    }

    #[tokio::test(start_paused = true)]
    async fn a_seed_reproduces_the_same_losses() {
        let first = outcomes(42).await;
        assert_eq!(first, outcomes(42).await);
        assert!(first.contains(&true) && first.contains(&false), "{first:?}");
        assert_ne!(first, outcomes(43).await, "the seed must matter");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unregistered_node_is_silent_until_the_timeout() {
        let network = memory_network(1);
        let (a, b) = (node("a"), node("b"));
        network.register(b.clone(), test_handler(Arc::new(Probe::default())));
        assert!(network.call(&a, &b, &echo(1), TIMEOUT).await.is_ok());
        network.unregister(&b);
        let started = Instant::now();
        assert!(is_timeout(&network.call(&a, &b, &echo(2), TIMEOUT).await));
        assert_eq!(started.elapsed(), TIMEOUT);
        assert!(is_timeout(
            &network.call(&a, &node("never"), &echo(3), TIMEOUT).await
        ));
        network.register(b.clone(), test_handler(Arc::new(Probe::default())));
        assert!(
            network.call(&a, &b, &echo(4), TIMEOUT).await.is_ok(),
            "a restarted node answers"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_duplicated_request_runs_twice_but_is_answered_once() {
        let network = memory_network(1);
        let (a, b) = (node("a"), node("b"));
        let probe = Arc::new(Probe::default());
        network.register(b.clone(), test_handler(probe.clone()));
        network.set_duplicate(1.0);
        network.set_delay(Duration::from_millis(5), Duration::from_millis(20));
        let response = network.call(&a, &b, &echo(1), TIMEOUT).await;
        assert_eq!(
            response,
            Ok(TestResponse::Echo {
                tag: 1,
                payload: "payload-1".into()
            })
        );
        probe.wait_for_calls(2).await;
        tokio::time::sleep(TIMEOUT).await;
        assert_eq!(probe.calls(), 2, "exactly one duplicate");
    }
}
