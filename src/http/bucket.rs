//! Bucket operations of Riak's HTTP API: get, set and reset properties; list buckets; list
//! keys (whole or streamed).

use super::params::{self, Query};
use super::{AppState, HttpError};
use crate::server::node::BucketProps;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::warn;

/// Largest bucket-properties document read.
const MAX_PROPS_BODY_BYTES: usize = 64 * 1024;

fn check_bucket(bucket: &str) -> Result<(), HttpError> {
    if bucket.is_empty() || bucket.starts_with('\0') {
        return Err(HttpError::bad_request(
            "bucket names that are empty or start with a NUL byte are not allowed",
        ));
    }
    Ok(())
}

fn props_json(bucket: &str, props: &BucketProps) -> Value {
    json!({
        "props": {
            "name": bucket,
            "n_val": props.n_val,
            "allow_mult": props.allow_mult,
            "last_write_wins": props.last_write_wins,
            "r": params::quorum_json(props.r),
            "w": params::quorum_json(props.w),
            "dw": params::quorum_json(props.dw),
            "rw": params::quorum_json(props.w),
            "pr": params::quorum_json(props.pr),
            "pw": params::quorum_json(props.pw),
            "notfound_ok": props.notfound_ok,
            "basic_quorum": props.basic_quorum,
            "tombstone_grace_secs": props.tombstone_grace_secs,
            // Riak's fixed properties that hold for dynkv too: no commit hooks, and
            // versions are dotted version vectors.
            "precommit": [],
            "postcommit": [],
            "dvv_enabled": true,
        }
    })
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// `GET /buckets/{bucket}/props`.
pub async fn get_props(State(state): State<AppState>, Path(bucket): Path<String>) -> Response {
    if let Err(error) = check_bucket(&bucket) {
        return error.into_response();
    }
    match state.node.bucket_props(bucket.as_bytes()).await {
        Ok(props) => json_response(StatusCode::OK, &props_json(&bucket, &props)),
        Err(error) => HttpError::from(error).into_response(),
    }
}

/// Applies the properties of a `{"props": {...}}` document to `props`. Properties dynkv does
/// not have (hooks, backends, search, ...) are ignored, as Riak ignores ones it does not know.
fn apply_props(props: &mut BucketProps, document: &Value) -> Result<(), HttpError> {
    let Some(given) = document.get("props").and_then(Value::as_object) else {
        return Err(HttpError::bad_request(
            "the body must be a JSON object with a \"props\" object",
        ));
    };
    let boolean = |name: &str, value: &Value| {
        value
            .as_bool()
            .ok_or_else(|| HttpError::bad_request(format!("{name} must be true or false")))
    };
    for (name, value) in given {
        match name.as_str() {
            "n_val" => {
                props.n_val = value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| HttpError::bad_request("n_val must be a positive integer"))?
            }
            "allow_mult" => props.allow_mult = boolean(name, value)?,
            "last_write_wins" => props.last_write_wins = boolean(name, value)?,
            "notfound_ok" => props.notfound_ok = boolean(name, value)?,
            "basic_quorum" => props.basic_quorum = boolean(name, value)?,
            "r" => props.r = params::quorum_from_json(name, value)?,
            "w" => props.w = params::quorum_from_json(name, value)?,
            "dw" => props.dw = params::quorum_from_json(name, value)?,
            "pr" => props.pr = params::quorum_from_json(name, value)?,
            "pw" => props.pw = params::quorum_from_json(name, value)?,
            "tombstone_grace_secs" if value.is_null() => props.tombstone_grace_secs = None,
            "tombstone_grace_secs" => {
                props.tombstone_grace_secs = Some(value.as_u64().ok_or_else(|| {
                    HttpError::bad_request(
                        "tombstone_grace_secs must be a whole number of seconds, or null for the node's tombstones.grace_secs",
                    )
                })?)
            }
            _ => {}
        }
    }
    Ok(())
}

/// `PUT /buckets/{bucket}/props` with `{"props": {...}}`; unnamed properties keep their values.
pub async fn set_props(
    State(state): State<AppState>,
    Path(bucket): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match set_props_inner(&state, &bucket, &headers, &body).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => error.into_response(),
    }
}

async fn set_props_inner(
    state: &AppState,
    bucket: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), HttpError> {
    check_bucket(bucket)?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().starts_with("application/json"));
    if !is_json {
        return Err(HttpError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bucket properties must be sent as Content-Type: application/json",
        ));
    }
    if body.len() > MAX_PROPS_BODY_BYTES {
        return Err(HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("properties document is over {MAX_PROPS_BODY_BYTES} bytes"),
        ));
    }
    let document: Value = serde_json::from_slice(body)
        .map_err(|error| HttpError::bad_request(format!("the body is not valid JSON: {error}")))?;
    let mut props = state.node.bucket_props(bucket.as_bytes()).await?;
    apply_props(&mut props, &document)?;
    state
        .node
        .set_bucket_props(bucket.as_bytes(), Some(props))
        .await?;
    Ok(())
}

/// `DELETE /buckets/{bucket}/props`: back to the node's defaults.
pub async fn reset_props(State(state): State<AppState>, Path(bucket): Path<String>) -> Response {
    if let Err(error) = check_bucket(&bucket) {
        return error.into_response();
    }
    match state.node.set_bucket_props(bucket.as_bytes(), None).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => HttpError::from(error).into_response(),
    }
}

/// Bytes of names a `keys=true` listing buffers to answer whole (sorted, with a status that
/// reflects the scan); past it, the listing is streamed.
const WHOLE_LISTING_BYTES: usize = 1024 * 1024;

/// A response body fed by a channel, for streamed listings; an error breaks the body off.
struct ChannelBody(mpsc::Receiver<std::io::Result<Bytes>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|result| result.map(http_body::Frame::data)))
    }
}

/// A 200 whose JSON body comes from `body` as the scan goes.
fn streamed_response(body: mpsc::Receiver<std::io::Result<Bytes>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::new(ChannelBody(body)),
    )
        .into_response()
}

/// The last chunk of a streamed listing: `complete` when the scan covered every partition.
/// The status is already sent, so an incomplete scan breaks the body off instead, and no
/// client takes a partial listing for a whole one (the reason goes to the log).
fn streamed_ending(
    scan: Result<Result<(), crate::protocol::ClientError>, tokio::task::JoinError>,
    complete: Bytes,
) -> std::io::Result<Bytes> {
    match scan {
        Ok(Ok(())) => Ok(complete),
        Ok(Err(error)) => {
            warn!(error = %error, "listing is incomplete; breaking the response off");
            Err(std::io::Error::other(error.message))
        }
        Err(error) => {
            warn!(error = %error, "listing failed; breaking the response off");
            Err(std::io::Error::other(error.to_string()))
        }
    }
}

fn names_json(field: &str, names: &[Vec<u8>]) -> Value {
    let names: Vec<String> = names
        .iter()
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect();
    json!({ field: names })
}

/// A coverage scan answered whole (`true`) or as a stream of JSON documents (`stream`).
async fn coverage(
    state: &AppState,
    bucket: Option<Vec<u8>>,
    field: &'static str,
    mode: Option<&str>,
    query: &Query,
) -> Result<Response, HttpError> {
    let timeout_ms = match query.get("timeout") {
        None => None,
        Some(text) => Some(text.parse::<u64>().map_err(|_| {
            HttpError::bad_request(format!("timeout={text:?} is not a number of milliseconds"))
        })?),
    };
    match mode {
        Some("true") => {
            let (sender, mut receiver) = mpsc::channel(16);
            let node = state.node.clone();
            let mut scan =
                tokio::spawn(async move { node.coverage_scan(bucket, timeout_ms, sender).await });
            // A listing that fits a small buffer is answered whole, sorted, with a status that
            // says whether the scan covered every partition. A larger one is streamed as one
            // JSON document, so no listing holds every name in memory.
            let mut names = Vec::new();
            let mut buffered_bytes = 0;
            while buffered_bytes < WHOLE_LISTING_BYTES {
                match receiver.recv().await {
                    Some(batch) => {
                        buffered_bytes += batch.iter().map(|name| name.len() + 8).sum::<usize>();
                        names.extend(batch);
                    }
                    None => {
                        return match (&mut scan).await {
                            Ok(Ok(())) => {
                                names.sort();
                                Ok(json_response(StatusCode::OK, &names_json(field, &names)))
                            }
                            Ok(Err(error)) => Err(error.into()),
                            Err(error) => Err(HttpError::new(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                format!("the scan failed: {error}"),
                            )),
                        };
                    }
                }
            }
            let (chunks, body) = mpsc::channel::<std::io::Result<Bytes>>(16);
            tokio::spawn(async move {
                let mut opened = false;
                let mut first = true;
                let mut send_names = async |names: &[Vec<u8>]| {
                    let mut chunk = String::new();
                    if !opened {
                        chunk.push_str(&format!("{{\"{field}\":["));
                        opened = true;
                    }
                    for name in names {
                        if !first {
                            chunk.push(',');
                        }
                        first = false;
                        chunk.push_str(&Value::from(String::from_utf8_lossy(name)).to_string());
                    }
                    chunks.send(Ok(Bytes::from(chunk))).await.is_ok()
                };
                if !send_names(&names).await {
                    return;
                }
                drop(names);
                while let Some(batch) = receiver.recv().await {
                    if !send_names(&batch).await {
                        return;
                    }
                }
                let ending = streamed_ending(scan.await, Bytes::from_static(b"]}"));
                let _ = chunks.send(ending).await;
            });
            Ok(streamed_response(body))
        }
        Some("stream") => {
            let (sender, mut receiver) = mpsc::channel::<Vec<Vec<u8>>>(16);
            let (chunks, body) = mpsc::channel::<std::io::Result<Bytes>>(16);
            let node = state.node.clone();
            tokio::spawn(async move {
                let scan =
                    tokio::spawn(
                        async move { node.coverage_scan(bucket, timeout_ms, sender).await },
                    );
                while let Some(batch) = receiver.recv().await {
                    let chunk = names_json(field, &batch).to_string();
                    if chunks.send(Ok(Bytes::from(chunk))).await.is_err() {
                        return;
                    }
                }
                let ending =
                    streamed_ending(scan.await, Bytes::from(names_json(field, &[]).to_string()));
                let _ = chunks.send(ending).await;
            });
            Ok(streamed_response(body))
        }
        // As Riak: without the parameter (it defaults to false), no listing.
        None | Some("false") => Ok(json_response(StatusCode::OK, &json!({}))),
        Some(other) => Err(HttpError::bad_request(format!(
            "{field}={other:?}: use {field}=true or {field}=stream to list, or leave it out"
        ))),
    }
}

/// `GET /buckets?buckets=true|stream`.
pub async fn list_buckets(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<Query>,
) -> Response {
    let started = Instant::now();
    let response = coverage(
        &state,
        None,
        "buckets",
        query.get("buckets").map(String::as_str),
        &query,
    )
    .await
    .unwrap_or_else(IntoResponse::into_response);
    state
        .stats
        .record_request("list_buckets", "all", response.status(), started.elapsed());
    response
}

/// `GET /buckets/{bucket}/keys?keys=true|stream`.
pub async fn list_keys(
    State(state): State<AppState>,
    Path(bucket): Path<String>,
    axum::extract::Query(query): axum::extract::Query<Query>,
) -> Response {
    let started = Instant::now();
    let response = match check_bucket(&bucket) {
        Err(error) => error.into_response(),
        Ok(()) => coverage(
            &state,
            Some(bucket.into_bytes()),
            "keys",
            query.get("keys").map(String::as_str),
            &query,
        )
        .await
        .unwrap_or_else(IntoResponse::into_response),
    };
    state
        .stats
        .record_request("list_keys", "all", response.status(), started.elapsed());
    response
}
