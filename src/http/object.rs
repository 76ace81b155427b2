//! Fetch, store and delete of objects, following Riak's "HTTP Fetch Object", "HTTP Store
//! Object" and "HTTP Delete Object" pages: the same parameters, status codes and headers.
//!
//! dynkv keeps per sibling the value, its content type, user metadata and the last-modified
//! time; a sibling's `Link` header is kept as a reserved metadata entry, and its ETag (Riak's
//! vtag) is a hash of the sibling, so every node names a sibling the same way.

use super::params::{self, Query};
use super::{AppState, HttpError};
use crate::core::object::Content;
use crate::protocol::{ClientRequest, ClientResponse, GetOptions, NewContent};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::debug;

/// The metadata entry that holds a sibling's `Link` header; no HTTP header name can make it.
const LINK_METADATA: &str = "\0link";
const META_PREFIX: &str = "x-riak-meta-";
const INDEX_PREFIX: &str = "x-riak-index-";
const VCLOCK: &str = "x-riak-vclock";
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

type Extracted = (
    State<AppState>,
    Path<(String, String)>,
    axum::extract::Query<Query>,
    HeaderMap,
);

fn level(query: &Query, name: &str) -> String {
    query
        .get(name)
        .map(|value| value.to_ascii_lowercase())
        .unwrap_or_else(|| "default".to_string())
}

/// `GET /buckets/{bucket}/keys/{key}`.
pub async fn fetch(
    State(state): State<AppState>,
    Path((bucket, key)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<Query>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let response = fetch_object(&state, &bucket, &key, &query, &headers)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    state.stats.record_request(
        "get",
        &level(&query, "r"),
        response.status(),
        started.elapsed(),
    );
    response
}

async fn fetch_object(
    state: &AppState,
    bucket: &str,
    key: &str,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, HttpError> {
    let options = params::get_options(query)?;
    let request = ClientRequest::Get {
        bucket: bucket.as_bytes().to_vec(),
        key: key.as_bytes().to_vec(),
        options,
    };
    match state.node.handle_client(request).await {
        ClientResponse::Found { siblings, context } => {
            state.stats.record_object(&siblings);
            Ok(render_siblings(
                bucket,
                &siblings,
                &context,
                query.get("vtag").map(String::as_str),
                headers,
                StatusCode::OK,
                true,
            ))
        }
        ClientResponse::NotFound { context } => {
            Ok(not_found(context.as_ref().map(|bytes| bytes.as_slice())))
        }
        ClientResponse::Error(error) => Err(error.into()),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(response: &ClientResponse) -> HttpError {
    HttpError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("unexpected answer from the node: {response:?}"),
    )
}

fn not_found(context: Option<&[u8]>) -> Response {
    let mut response = HttpError::new(StatusCode::NOT_FOUND, "not found").into_response();
    if let Some(context) = context
        && let Ok(value) = HeaderValue::from_str(&BASE64.encode(context))
    {
        // A tombstone: Riak marks it so, and its vclock lets a later write supersede it.
        response.headers_mut().insert(VCLOCK, value);
        response
            .headers_mut()
            .insert("x-riak-deleted", HeaderValue::from_static("true"));
    }
    response
}

/// A sibling's vtag: 22 base-62 characters of a hash of everything the sibling holds.
pub fn vtag(content: &Content) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(content.value.len() as u64).to_be_bytes());
    hasher.update(&content.value);
    hasher.update(content.content_type.as_bytes());
    for (name, value) in &content.user_metadata {
        hasher.update(&(name.len() as u64).to_be_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&(value.len() as u64).to_be_bytes());
        hasher.update(value.as_bytes());
    }
    hasher.update(&content.last_modified_micros.to_be_bytes());
    let hash = hasher.finalize();
    let mut number = u128::from_be_bytes(hash.as_bytes()[..16].try_into().unwrap_or([0; 16]));
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut text = String::with_capacity(22);
    for _ in 0..22 {
        text.push(ALPHABET[(number % 62) as usize] as char);
        number /= 62;
    }
    text
}

fn last_modified(content: &Content) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(content.last_modified_micros)
}

/// A bucket or key as a path segment, as Riak writes it in Link and Location headers
/// (mochiweb's `quote_plus`: a space becomes `+`, which dynkv's paths read back as a space).
fn quote_plus(segment: &str) -> String {
    form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

/// The links of a sibling: the ones its writer gave (except the `up` link, always added).
fn links(bucket: &str, content: &Content) -> String {
    let up = format!("</buckets/{}>; rel=\"up\"", quote_plus(bucket));
    let stored = content
        .user_metadata
        .iter()
        .find(|(name, _)| name == LINK_METADATA)
        .map(|(_, value)| value.as_str())
        .unwrap_or("");
    let mut all: Vec<String> = split_links(stored)
        .into_iter()
        .filter(|link| !link.contains("rel=\"up\""))
        .collect();
    all.push(up);
    all.join(", ")
}

/// Splits a `Link` header value into its links (commas inside `<...>` or quotes are not
/// separators).
fn split_links(value: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut current = String::new();
    let mut in_target = false;
    let mut in_quotes = false;
    for character in value.chars() {
        match character {
            '<' if !in_quotes => in_target = true,
            '>' if !in_quotes => in_target = false,
            '"' if !in_target => in_quotes = !in_quotes,
            ',' if !in_target && !in_quotes => {
                if !current.trim().is_empty() {
                    links.push(current.trim().to_string());
                }
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(character);
    }
    if !current.trim().is_empty() {
        links.push(current.trim().to_string());
    }
    links
}

/// The headers of one sibling, as `(name, value)` in Riak's spelling.
fn sibling_headers(bucket: &str, content: &Content) -> Vec<(String, String)> {
    let content_type = if content.content_type.is_empty() {
        DEFAULT_CONTENT_TYPE.to_string()
    } else {
        content.content_type.clone()
    };
    let mut headers = vec![
        ("Content-Type".to_string(), content_type),
        ("Link".to_string(), links(bucket, content)),
        (
            "Last-Modified".to_string(),
            httpdate::fmt_http_date(last_modified(content)),
        ),
    ];
    for (name, value) in &content.user_metadata {
        if name != LINK_METADATA {
            headers.push((format!("X-Riak-Meta-{name}"), value.clone()));
        }
    }
    headers
}

fn insert_headers(response: &mut Response, pairs: &[(String, String)]) {
    for (name, value) in pairs {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) if name == header::CONTENT_TYPE => {
                response.headers_mut().insert(name, value);
            }
            (Ok(name), Ok(value)) => {
                response.headers_mut().append(name, value);
            }
            _ => debug!(header = %name, "a stored value cannot be sent as an HTTP header; skipped"),
        }
    }
}

/// Whether a GET's `If-None-Match` / `If-Modified-Since` say the client's copy is current.
fn not_modified(content: &Content, tag: &str, headers: &HeaderMap) -> bool {
    if let Some(value) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
    {
        return value.split(',').any(|candidate| {
            let candidate = candidate.trim().trim_start_matches("W/").trim_matches('"');
            candidate == "*" || candidate == tag
        });
    }
    if let Some(since) = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| httpdate::parse_http_date(value).ok())
    {
        // HTTP dates have whole seconds.
        let modified_secs = content.last_modified_micros / 1_000_000;
        let since_secs = since
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0);
        return modified_secs <= since_secs;
    }
    false
}

/// The answer for an object with its siblings: one sibling as the body (200, or `status`),
/// several as 300 Multiple Choices with a multipart/mixed body when the client accepts it and
/// the list of vtags otherwise.
pub(super) fn render_siblings(
    bucket: &str,
    siblings: &[Content],
    context: &[u8],
    vtag_wanted: Option<&str>,
    request_headers: &HeaderMap,
    status: StatusCode,
    conditional: bool,
) -> Response {
    let vclock = BASE64.encode(context);
    let vclock_header = ("X-Riak-Vclock".to_string(), vclock);
    let chosen = match vtag_wanted {
        Some(wanted) => match siblings.iter().find(|sibling| vtag(sibling) == wanted) {
            Some(sibling) => Some(sibling),
            // A plain 404, as Riak's: the key exists, only that sibling does not (no
            // X-Riak-Deleted, which clients read as "the key was deleted").
            None => return not_found(None),
        },
        None if siblings.len() == 1 => siblings.first(),
        None => None,
    };
    if let Some(content) = chosen {
        let tag = vtag(content);
        let mut headers = sibling_headers(bucket, content);
        headers.push(vclock_header);
        headers.push(("ETag".to_string(), format!("\"{tag}\"")));
        headers.push(("Vary".to_string(), "Accept-Encoding".to_string()));
        let mut response = if conditional && not_modified(content, &tag, request_headers) {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            (status, content.value.clone()).into_response()
        };
        insert_headers(&mut response, &headers);
        return response;
    }
    let accepts_multipart = request_headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("multipart/mixed"));
    let mut response = if accepts_multipart {
        let boundary = boundary_for(siblings);
        // As Riak frames it: every boundary line, the first too, starts after a CRLF, and
        // the closing one ends with one. Parsers that split on CRLF--boundary (the Riak
        // Python client's does) otherwise take the first sibling for the preamble.
        let mut body = Vec::new();
        for sibling in siblings {
            body.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
            for (name, value) in sibling_headers(bucket, sibling) {
                body.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            body.extend_from_slice(format!("Etag: {}\r\n\r\n", vtag(sibling)).as_bytes());
            body.extend_from_slice(&sibling.value);
        }
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let mut response = (StatusCode::MULTIPLE_CHOICES, body).into_response();
        if let Ok(value) = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}")) {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        response.headers_mut().insert(
            header::VARY,
            HeaderValue::from_static("Accept, Accept-Encoding"),
        );
        response
    } else {
        let mut text = String::from("Siblings:\n");
        for sibling in siblings {
            text.push_str(&vtag(sibling));
            text.push('\n');
        }
        let mut response = (StatusCode::MULTIPLE_CHOICES, text).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        // The body depends on Accept, as Riak says of its 300s.
        headers.insert(
            header::VARY,
            HeaderValue::from_static("Accept, Accept-Encoding"),
        );
        response
    };
    insert_headers(&mut response, &[vclock_header]);
    response
}

/// A multipart boundary that occurs in no sibling's value.
fn boundary_for(siblings: &[Content]) -> String {
    loop {
        let boundary = random_name(27);
        let needle = boundary.as_bytes();
        let collides = siblings.iter().any(|sibling| {
            sibling
                .value
                .windows(needle.len())
                .any(|window| window == needle)
        });
        if !collides {
            return boundary;
        }
    }
}

pub(crate) fn random_name(length: usize) -> String {
    use rand::{Rng, SeedableRng};
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rngs::SmallRng::from_os_rng();
    (0..length)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Reads a request body of at most `limit` bytes: a declared larger length is refused before
/// anything is read, and a chunked body as soon as it passes the limit.
async fn read_body(body: Body, headers: &HeaderMap, limit: u64) -> Result<Vec<u8>, HttpError> {
    let too_large = |size: String| {
        HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is {size} bytes; the limit is {limit} bytes (limits.max_value_bytes)"
            ),
        )
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if let Some(length) = announced
        && length > limit
    {
        return Err(too_large(length.to_string()));
    }
    let mut body = body;
    // Sized once from the announced length (within the limit, so within the budget the body
    // took), instead of doubling past it as the body arrives.
    let mut bytes = Vec::with_capacity(announced.unwrap_or(0) as usize);
    while let Some(frame) =
        std::future::poll_fn(|cx| http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx))
            .await
    {
        let frame = frame
            .map_err(|error| HttpError::bad_request(format!("cannot read the body: {error}")))?;
        if let Ok(data) = frame.into_data() {
            if (bytes.len() + data.len()) as u64 > limit {
                return Err(too_large(format!("more than {limit}")));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, HttpError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(Some)
            .map_err(|_| HttpError::bad_request(format!("the {name} header is not valid text"))),
    }
}

fn vclock_of(headers: &HeaderMap) -> Result<Option<Vec<u8>>, HttpError> {
    match header_text(headers, VCLOCK)? {
        None => Ok(None),
        Some(text) => BASE64.decode(text.trim()).map(Some).map_err(|error| {
            HttpError::bad_request(format!("X-Riak-Vclock is not valid base64: {error}"))
        }),
    }
}

/// The new sibling described by a store request's headers and body.
fn new_content(headers: &HeaderMap, value: Vec<u8>) -> Result<NewContent, HttpError> {
    let content_type = header_text(headers, "content-type")?
        .unwrap_or(DEFAULT_CONTENT_TYPE)
        .to_string();
    let mut user_metadata = Vec::new();
    for (name, raw) in headers {
        let name = name.as_str();
        if name.starts_with(INDEX_PREFIX) {
            return Err(HttpError::bad_request(format!(
                "{name}: secondary indexes are not supported by dynkv"
            )));
        }
        if let Some(meta) = name.strip_prefix(META_PREFIX) {
            let text = raw.to_str().map_err(|_| {
                HttpError::bad_request(format!("the {name} header is not valid text"))
            })?;
            user_metadata.push((meta.to_string(), text.to_string()));
        }
    }
    if let Some(link) = header_text(headers, "link")? {
        user_metadata.push((LINK_METADATA.to_string(), link.to_string()));
    }
    Ok(NewContent {
        value,
        content_type,
        user_metadata,
    })
}

/// `PUT` or `POST /buckets/{bucket}/keys/{key}`.
pub async fn store(
    State(state): State<AppState>,
    Path((bucket, key)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<Query>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let extracted: Extracted = (
        State(state),
        Path((bucket, key)),
        axum::extract::Query(query),
        headers,
    );
    store_with(extracted, body, false).await
}

/// `POST /buckets/{bucket}/keys`: stores under a new random key; 201 with its Location.
pub async fn create(
    State(state): State<AppState>,
    Path(bucket): Path<String>,
    axum::extract::Query(query): axum::extract::Query<Query>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let extracted: Extracted = (
        State(state),
        Path((bucket, random_name(27))),
        axum::extract::Query(query),
        headers,
    );
    store_with(extracted, body, true).await
}

async fn store_with(extracted: Extracted, body: Body, created: bool) -> Response {
    let (State(state), Path((bucket, key)), axum::extract::Query(query), headers) = extracted;
    let started = Instant::now();
    let response = store_object(&state, &bucket, &key, &query, &headers, body, created)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    state.stats.record_request(
        "put",
        &level(&query, "w"),
        response.status(),
        started.elapsed(),
    );
    response
}

async fn store_object(
    state: &AppState,
    bucket: &str,
    key: &str,
    query: &Query,
    headers: &HeaderMap,
    body: Body,
    created: bool,
) -> Result<Response, HttpError> {
    let options = params::put_options(query)?;
    let context = vclock_of(headers)?;
    let value = read_body(body, headers, state.max_body_bytes).await?;
    let content = new_content(headers, value)?;
    check_preconditions(state, bucket, key, headers).await?;
    let return_body = options.return_body;
    let request = ClientRequest::Put {
        bucket: bucket.as_bytes().to_vec(),
        key: key.as_bytes().to_vec(),
        context: context.map(serde_bytes::ByteBuf::from),
        content,
        options,
    };
    let (siblings, context) = match state.node.handle_client(request).await {
        ClientResponse::Stored { siblings, context } => (siblings, context),
        ClientResponse::Error(error) => return Err(error.into()),
        other => return Err(unexpected(&other)),
    };
    let mut response = if return_body && !siblings.is_empty() {
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        render_siblings(bucket, &siblings, &context, None, headers, status, false)
    } else if created {
        StatusCode::CREATED.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    };
    if created {
        let location = format!("/buckets/{}/keys/{}", quote_plus(bucket), quote_plus(key));
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    Ok(response)
}

/// A PUT's conditional headers, matched against the stored object: 412 when one fails.
async fn check_preconditions(
    state: &AppState,
    bucket: &str,
    key: &str,
    headers: &HeaderMap,
) -> Result<(), HttpError> {
    let if_none_match = header_text(headers, "if-none-match")?;
    let if_match = header_text(headers, "if-match")?;
    let if_unmodified = header_text(headers, "if-unmodified-since")?;
    let if_modified = header_text(headers, "if-modified-since")?;
    if if_none_match.is_none()
        && if_match.is_none()
        && if_unmodified.is_none()
        && if_modified.is_none()
    {
        return Ok(());
    }
    let request = ClientRequest::Get {
        bucket: bucket.as_bytes().to_vec(),
        key: key.as_bytes().to_vec(),
        options: GetOptions::default(),
    };
    let current = match state.node.handle_client(request).await {
        ClientResponse::Found { siblings, .. } => siblings,
        ClientResponse::NotFound { .. } => Vec::new(),
        ClientResponse::Error(error) => return Err(error.into()),
        other => return Err(unexpected(&other)),
    };
    let tags: Vec<String> = current.iter().map(vtag).collect();
    let matches = |list: &str| {
        list.split(',').any(|candidate| {
            let candidate = candidate.trim().trim_start_matches("W/").trim_matches('"');
            (candidate == "*" && !tags.is_empty()) || tags.iter().any(|tag| tag == candidate)
        })
    };
    let newest_secs = current
        .iter()
        .map(|content| content.last_modified_micros / 1_000_000)
        .max();
    let date_secs = |text: &str| {
        httpdate::parse_http_date(text)
            .ok()
            .and_then(|date| date.duration_since(UNIX_EPOCH).ok())
            .map(|elapsed| elapsed.as_secs())
    };
    let failed = if_none_match.is_some_and(matches)
        || if_match.is_some_and(|list| !matches(list))
        || if_unmodified
            .and_then(date_secs)
            .is_some_and(|since| newest_secs.is_some_and(|newest| newest > since))
        || if_modified
            .and_then(date_secs)
            .is_some_and(|since| newest_secs.is_none_or(|newest| newest <= since));
    if failed {
        return Err(HttpError::new(
            StatusCode::PRECONDITION_FAILED,
            "a conditional header does not match the stored object",
        ));
    }
    Ok(())
}

/// `DELETE /buckets/{bucket}/keys/{key}`: 204, or 404 when there is nothing to delete.
pub async fn delete(
    State(state): State<AppState>,
    Path((bucket, key)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<Query>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let response = delete_object(&state, &bucket, &key, &query, &headers)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    let consistency = if query.contains_key("w") {
        level(&query, "w")
    } else {
        level(&query, "rw")
    };
    state
        .stats
        .record_request("delete", &consistency, response.status(), started.elapsed());
    response
}

async fn delete_object(
    state: &AppState,
    bucket: &str,
    key: &str,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, HttpError> {
    let read_options = params::get_options(query)?;
    let options = params::delete_options(query)?;
    let given_context = vclock_of(headers)?;
    // Riak answers 404 for a key with nothing to delete; the read also supplies the context.
    let read = ClientRequest::Get {
        bucket: bucket.as_bytes().to_vec(),
        key: key.as_bytes().to_vec(),
        options: read_options,
    };
    let read_context = match state.node.handle_client(read).await {
        ClientResponse::Found { context, .. } => context,
        ClientResponse::NotFound { context } => {
            return Ok(not_found(context.as_ref().map(|bytes| bytes.as_slice())));
        }
        ClientResponse::Error(error) => return Err(error.into()),
        other => return Err(unexpected(&other)),
    };
    let request = ClientRequest::Delete {
        bucket: bucket.as_bytes().to_vec(),
        key: key.as_bytes().to_vec(),
        context: Some(serde_bytes::ByteBuf::from(
            given_context.unwrap_or(read_context),
        )),
        options,
    };
    match state.node.handle_client(request).await {
        ClientResponse::Stored { .. } => Ok(StatusCode::NO_CONTENT.into_response()),
        ClientResponse::Error(error) => Err(error.into()),
        other => Err(unexpected(&other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(value: &str) -> Content {
        Content {
            value: value.as_bytes().to_vec(),
            content_type: "text/plain".into(),
            user_metadata: vec![(
                LINK_METADATA.into(),
                "</buckets/a/keys/b>; riaktag=\"x,y\"".into(),
            )],
            last_modified_micros: 1_700_000_000_000_000,
            deleted: false,
        }
    }

    #[test]
    fn vtags_are_stable_and_distinguish_siblings() {
        assert_eq!(vtag(&content("a")), vtag(&content("a")));
        assert_ne!(vtag(&content("a")), vtag(&content("b")));
        assert_eq!(vtag(&content("a")).len(), 22);
    }

    #[test]
    fn links_keep_quoted_commas_and_add_up() {
        let links = links("b1", &content("a"));
        assert_eq!(
            links,
            "</buckets/a/keys/b>; riaktag=\"x,y\", </buckets/b1>; rel=\"up\""
        );
        // A bucket name is a path segment there, as Riak quotes it.
        let quoted = super::links("a b/ü", &content("a"));
        assert!(
            quoted.ends_with("</buckets/a+b%2F%C3%BC>; rel=\"up\""),
            "{quoted}"
        );
    }
}
