//! The HTTP listener of a node: the key/value part of Riak KV's HTTP API, `/stats` in Riak's
//! JSON shape and `/metrics` in Prometheus text format.
//!
//! Routes are served both under `/buckets/...` and `/types/default/buckets/...` (dynkv has
//! one bucket type). Handlers turn HTTP into [`ClientRequest`](crate::protocol::ClientRequest)s
//! for [`Node::handle_client`] and answers back into Riak's status codes and headers; they hold
//! no state of their own beyond the statistics.
//!
//! Layout: `params` (query parameters), `object` (fetch, store, delete), `bucket` (properties,
//! list buckets, list keys), `stats` (`/stats`, `/metrics`, request accounting).

mod bucket;
mod listener;
pub(crate) mod object;
mod params;
pub mod stats;

pub(crate) use object::random_name;

use crate::net::budget::ByteBudget;
use crate::protocol::{ClientError, ErrorKind};
use crate::server::node::Node;
use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{info, warn};

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    node: Node,
    stats: Arc<stats::Stats>,
    /// Largest request body read, in bytes (`limits.max_value_bytes`).
    max_body_bytes: u64,
}

/// An error answer: a status and a one-line plain-text message naming the problem.
#[derive(Debug)]
pub(crate) struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<ClientError> for HttpError {
    fn from(error: ClientError) -> Self {
        let status = match error.kind {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::QuorumUnmet(_) | ErrorKind::Timeout(_) | ErrorKind::NotServing => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
        };
        HttpError::new(status, error.message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        (self.status, headers, format!("{}\n", self.message)).into_response()
    }
}

fn object_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/buckets/{bucket}/keys/{key}",
            get(object::fetch)
                .put(object::store)
                .post(object::store)
                .delete(object::delete),
        )
        .route(
            "/buckets/{bucket}/keys",
            get(bucket::list_keys).post(object::create),
        )
        .route(
            "/buckets/{bucket}/props",
            get(bucket::get_props)
                .put(bucket::set_props)
                .delete(bucket::reset_props),
        )
        .route("/buckets", get(bucket::list_buckets))
}

/// With a token configured, every request but `/ping` (for health checks) must carry
/// `Authorization: Bearer <token>`; others get 401.
async fn require_token(
    axum::extract::State(token): axum::extract::State<Option<Arc<str>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = token else {
        return next.run(request).await;
    };
    if request.uri().path() == "/ping" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    if crate::protocol::token_matches(given, &token) {
        next.run(request).await
    } else {
        let mut response = HttpError::new(
            StatusCode::UNAUTHORIZED,
            "this node requires Authorization: Bearer <token> (http_token)",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }
}

/// The whole API as a router.
pub(crate) fn router(state: AppState, token: Option<Arc<str>>) -> Router {
    let api = Router::new()
        .merge(object_routes())
        .nest("/types/default", object_routes())
        .route(
            "/types/{bucket_type}/{*rest}",
            axum::routing::any(unknown_type),
        )
        .route("/ping", get(ping))
        .route("/stats", get(stats::riak_stats))
        .route("/metrics", get(stats::prometheus))
        .route("/", get(list_resources))
        .fallback(not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(token, require_token));
    // Outside the API's routing, so the rewritten path is the one routed.
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::map_request(plus_as_space))
}

/// A `+` in a path is a space, as Riak decodes paths (mochiweb's unquote; `%2B` is a plus):
/// Riak clients encode names with quote_plus, so a key "a b" arrives as `a+b`.
async fn plus_as_space(mut request: axum::extract::Request) -> axum::extract::Request {
    let uri = request.uri();
    if !uri.path().contains('+') {
        return request;
    }
    let path = uri.path().replace('+', "%20");
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    if let Ok(path_and_query) = path_and_query.parse() {
        parts.path_and_query = Some(path_and_query);
        if let Ok(rewritten) = axum::http::Uri::from_parts(parts) {
            *request.uri_mut() = rewritten;
        }
    }
    request
}

/// At most `limit` requests are served at once; one more is answered at once with 503
/// naming `limits.http_concurrency`, instead of queueing without bound.
#[derive(Clone)]
struct Concurrency {
    permits: Arc<tokio::sync::Semaphore>,
    limit: usize,
}

async fn limit_concurrency(
    axum::extract::State(concurrency): axum::extract::State<Concurrency>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(_permit) = concurrency.permits.clone().try_acquire_owned() else {
        let mut response = HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many requests at once: this node serves at most {} (limits.http_concurrency); retry",
                concurrency.limit
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    next.run(request).await
}

/// The byte budget request bodies take from before they are read.
#[derive(Clone)]
struct BodyBudget {
    budget: ByteBudget,
    max_body_bytes: u64,
    wait: std::time::Duration,
}

/// A request with a body takes its bytes from the shared budget before the body is read
/// (its announced length, or the largest body allowed when it announces none), and gives
/// them back once answered; without room in time it is answered 503 naming
/// `limits.max_in_flight_bytes`, its body unread.
async fn take_body_budget(
    axum::extract::State(bodies): axum::extract::State<BodyBudget>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    let body_bytes = match announced {
        // A longer body is refused (413) before it is read.
        Some(length) => length.min(bodies.max_body_bytes),
        None if chunked => bodies.max_body_bytes,
        None => 0,
    };
    match bodies.budget.take(body_bytes, bodies.wait).await {
        Ok(_permit) => next.run(request).await,
        Err(error) => {
            let mut response =
                HttpError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            // The body is not read: the connection cannot be used again.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

/// [`router`] behind the concurrency limit.
fn limited(router: Router, limit: usize) -> Router {
    let concurrency = Concurrency {
        permits: Arc::new(tokio::sync::Semaphore::new(limit)),
        limit,
    };
    router.layer(axum::middleware::from_fn_with_state(
        concurrency,
        limit_concurrency,
    ))
}

async fn ping() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain")], "OK")
}

async fn unknown_type(
    axum::extract::Path((bucket_type, _)): axum::extract::Path<(String, String)>,
) -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        format!("unknown bucket type {bucket_type:?}: dynkv has only the \"default\" type"),
    )
}

async fn not_found() -> HttpError {
    HttpError::new(StatusCode::NOT_FOUND, "not found")
}

/// `GET /`: the resources this node serves, as JSON when asked for, else as HTML links.
async fn list_resources(headers: HeaderMap) -> Response {
    let resources = [
        ("riak_kv_wm_buckets", "/buckets"),
        ("riak_kv_wm_ping", "/ping"),
        ("riak_kv_wm_stats", "/stats"),
        ("riak_kv_wm_object", "/buckets"),
        ("dynkv_metrics", "/metrics"),
    ];
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"));
    if wants_json {
        let map: serde_json::Map<String, serde_json::Value> = resources
            .iter()
            .map(|(name, path)| (name.to_string(), serde_json::Value::from(*path)))
            .collect();
        (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::Value::Object(map).to_string(),
        )
            .into_response()
    } else {
        let mut html = String::from("<html><body><ul>");
        for (name, path) in resources {
            html.push_str(&format!("<li><a href=\"{path}\">{name}</a></li>"));
        }
        html.push_str("</ul></body></html>");
        ([(header::CONTENT_TYPE, "text/html")], html).into_response()
    }
}

/// How a node's HTTP listener is set up.
#[derive(Clone)]
pub struct HttpSettings {
    pub address: SocketAddr,
    /// Largest request body read (`limits.max_value_bytes`).
    pub max_body_bytes: u64,
    /// Where a request body takes its bytes before it is read (shared with the other
    /// client-facing listeners: `limits.max_in_flight_bytes`).
    pub body_budget: ByteBudget,
    /// How long a body waits for room in the budget before a 503 (the request timeout).
    pub budget_wait: std::time::Duration,
    /// Serve HTTPS with this config; plain HTTP when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Required bearer token, if any.
    pub token: Option<String>,
    /// Requests served at once (`limits.http_concurrency`).
    pub concurrency: usize,
    /// Connections kept open at once (`limits.max_http_connections`).
    pub max_connections: usize,
}

/// A running HTTP listener; [`HttpServer::shutdown`] stops it.
pub struct HttpServer {
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Binds `address` and serves the API for `node` until shut down.
    pub async fn start(node: Node, settings: HttpSettings) -> std::io::Result<HttpServer> {
        stats::install_prometheus();
        let listener = tokio::net::TcpListener::bind(settings.address).await?;
        let local_addr = listener.local_addr()?;
        let state = AppState {
            node,
            stats: Arc::new(stats::Stats::new()),
            max_body_bytes: settings.max_body_bytes,
        };
        let bodies = BodyBudget {
            budget: settings.body_budget,
            max_body_bytes: settings.max_body_bytes,
            wait: settings.budget_wait,
        };
        let app = limited(
            router(state, settings.token.map(Arc::from)).layer(
                axum::middleware::from_fn_with_state(bodies, take_body_budget),
            ),
            settings.concurrency.max(1),
        );
        let (stop, mut stopped) = watch::channel(false);
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let tls = settings.tls.is_some();
        let max_connections = settings.max_connections.max(1);
        let task = match settings.tls {
            None => tokio::spawn(async move {
                let listener = listener::LimitedListener::new(listener, max_connections);
                if let Err(error) = axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    warn!(error = %error, "HTTP listener failed");
                }
            }),
            Some(config) => {
                let listener = listener::LimitedListener::new(
                    listener::TlsListener::new(listener, config)?,
                    max_connections,
                );
                tokio::spawn(async move {
                    if let Err(error) = axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .await
                    {
                        warn!(error = %error, "HTTPS listener failed");
                    }
                })
            }
        };
        info!(%local_addr, tls, "HTTP API listening");
        Ok(HttpServer {
            local_addr,
            stop,
            task,
        })
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        // Keep-alive connections may linger; do not wait for them forever.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await;
    }
}

#[cfg(test)]
mod concurrency_tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends a bare GET and returns the whole response (the server closes the connection).
    async fn send(address: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_past_the_concurrency_limit_get_503_naming_it() {
        let entered = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let (entered_in, release_in) = (entered.clone(), release.clone());
        let app = limited(
            Router::new()
                .route(
                    "/slow",
                    axum::routing::get(move || async move {
                        entered_in.notify_one();
                        release_in.notified().await;
                        "done"
                    }),
                )
                .route("/fast", axum::routing::get(|| async { "fast" })),
            1,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let slow = tokio::spawn(async move { send(address, "/slow").await });
        entered.notified().await;
        let refused = send(address, "/fast").await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains("limits.http_concurrency"), "{refused}");
        assert!(
            refused.to_ascii_lowercase().contains("retry-after: 1"),
            "{refused}"
        );
        release.notify_one();
        let done = slow.await.unwrap();
        assert!(
            done.starts_with("HTTP/1.1 200") && done.ends_with("done"),
            "{done}"
        );
        let served = send(address, "/fast").await;
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_limit_get_503_naming_it() {
        let app = Router::new().route("/fast", axum::routing::get(|| async { "fast" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let limited = listener::LimitedListener::new(listener, 1);
        tokio::spawn(async move { axum::serve(limited, app).await });

        // One idle connection takes the only slot.
        let idle = tokio::net::TcpStream::connect(address).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = send(address, "/fast").await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains("limits.max_http_connections"), "{refused}");
        drop(idle);
        let mut served = String::new();
        for _ in 0..50 {
            served = send(address, "/fast").await;
            if served.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    }
}
