//! Bucket properties, stored cluster-wide as ordinary replicated objects.
//!
//! A bucket's properties are the value of key `<bucket>` in the reserved bucket
//! [`PROPS_BUCKET`], written and read through the normal quorum path (so they are replicated,
//! read-repaired and survive restarts like any data) with last-write-wins merging. Each node
//! keeps a small cache; a node that sets properties updates its own cache and sends the new
//! properties to every other member before it answers, and a time-to-live bounds how long a
//! node that missed that message serves stale properties. Clients cannot name the reserved
//! bucket.

use super::{Copy, Node, Write};
use crate::core::object::{Content, live_siblings};
use crate::core::quorum::{BucketDefaults, Quorum};
use crate::protocol::{
    ClientError, ClientResponse, GetOptions, NewContent, PeerRequest, PutOptions,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::time::Instant;
use tracing::warn;

/// The internal bucket that holds every bucket's properties, keyed by bucket name.
pub const PROPS_BUCKET: &[u8] = b"\0props";

/// How long a node trusts a cached copy it was not told to forget.
const CACHE_TTL: Duration = Duration::from_secs(10);
/// After a failed read the defaults are used for this long, so that an outage does not
/// make every request wait for a properties read first.
const FAILED_READ_TTL: Duration = Duration::from_secs(1);
/// How long the setting node waits for each member to take the new properties.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(1);
/// A properties read waits at most this long (or the request timeout if shorter).
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Most buckets cached; the cache is cleared when it would grow past this.
const CACHE_CAPACITY: usize = 10_000;
const STORED_CONTENT_TYPE: &str = "application/x-msgpack";

/// Longest tombstone grace period a bucket may set (10 years, in seconds).
pub const MAX_TOMBSTONE_GRACE_SECS: u64 = 10 * 366 * 24 * 3600;

/// The properties of one bucket, as Riak names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketProps {
    pub n_val: u32,
    pub allow_mult: bool,
    pub last_write_wins: bool,
    pub r: Quorum,
    pub w: Quorum,
    pub dw: Quorum,
    pub pr: Quorum,
    pub pw: Quorum,
    /// Stored and reported; dynkv always counts a not-found reply towards `r`.
    pub notfound_ok: bool,
    /// Stored and reported; dynkv always waits for `r` replies (or the timeout).
    pub basic_quorum: bool,
    /// How long a tombstone of this bucket is kept before it may be reaped, overriding
    /// `tombstones.grace_secs`; `None`: the node's setting. Properties stored by earlier
    /// releases have none.
    #[serde(default)]
    pub tombstone_grace_secs: Option<u64>,
}

impl BucketProps {
    /// The consistency defaults a request saying `default` resolves against.
    pub fn defaults(&self) -> BucketDefaults {
        BucketDefaults {
            n_val: self.n_val,
            r: self.r,
            w: self.w,
            dw: self.dw,
            pr: self.pr,
            pw: self.pw,
        }
    }

    /// Whether concurrent writes stay siblings; otherwise the latest write wins.
    pub fn keeps_siblings(&self) -> bool {
        self.allow_mult && !self.last_write_wins
    }

    /// Checks the values a client set, naming the first bad one.
    pub fn validate(&self) -> Result<(), ClientError> {
        if let Some(grace) = self.tombstone_grace_secs
            && grace > MAX_TOMBSTONE_GRACE_SECS
        {
            return Err(ClientError::invalid(format!(
                "tombstone_grace_secs={grace} is out of range: at most {MAX_TOMBSTONE_GRACE_SECS} (10 years)"
            )));
        }
        if !(1..=16).contains(&self.n_val) {
            return Err(ClientError::invalid(format!(
                "n_val={} is out of range: n_val must be between 1 and 16",
                self.n_val
            )));
        }
        // Minimums as the request path uses them: r and w need a reply, the rest may be 0.
        for (field, level, minimum) in [
            ("r", self.r, 1),
            ("w", self.w, 1),
            ("dw", self.dw, 0),
            ("pr", self.pr, 0),
            ("pw", self.pw, 0),
        ] {
            level
                .resolve(field, self.n_val, Quorum::Default, minimum)
                .map_err(|error| ClientError::invalid(error.to_string()))?;
        }
        Ok(())
    }
}

/// A node's cache of bucket properties.
#[derive(Default)]
pub(super) struct BucketCache {
    /// Properties and when they expire.
    entries: parking_lot::Mutex<HashMap<Vec<u8>, (BucketProps, Instant)>>,
}

impl BucketCache {
    fn get(&self, bucket: &[u8]) -> Option<BucketProps> {
        let entries = self.entries.lock();
        let (props, expires) = entries.get(bucket)?;
        (Instant::now() < *expires).then_some(*props)
    }

    /// The last properties read or announced, even past their time to live: a change since
    /// would have been announced and removed them.
    fn get_stale(&self, bucket: &[u8]) -> Option<BucketProps> {
        self.entries.lock().get(bucket).map(|(props, _)| *props)
    }

    fn put(&self, bucket: &[u8], props: BucketProps, ttl: Duration) {
        let mut entries = self.entries.lock();
        if entries.len() >= CACHE_CAPACITY && !entries.contains_key(bucket) {
            entries.clear();
        }
        entries.insert(bucket.to_vec(), (props, Instant::now() + ttl));
    }

    fn forget(&self, bucket: &[u8]) {
        self.entries.lock().remove(bucket);
    }

    fn clear(&self) {
        self.entries.lock().clear();
    }
}

impl Node {
    /// The properties every bucket has until a client sets its own: the node's config.
    pub fn default_bucket_props(&self) -> BucketProps {
        let settings = &self.inner.settings;
        let defaults = settings.bucket_defaults;
        BucketProps {
            n_val: defaults.n_val,
            allow_mult: settings.allow_mult,
            last_write_wins: false,
            r: defaults.r,
            w: defaults.w,
            dw: defaults.dw,
            pr: defaults.pr,
            pw: defaults.pw,
            notfound_ok: true,
            basic_quorum: false,
            tombstone_grace_secs: None,
        }
    }

    /// A bucket's properties: cached, else read from the replicas of its properties. When
    /// no replica answers, the last properties this node read (or was told of) serve, else
    /// its own durable replica if it holds one; otherwise the request fails with an error. The node defaults never stand in for properties that
    /// could not be read: with `allow_mult = false` they would reconcile away the siblings of
    /// an `allow_mult` bucket, and a wrong `n_val` would place the key elsewhere.
    ///
    /// The future is boxed with its type spelled out: a get looks properties up and a
    /// properties lookup is a get, so an inferred future type would be recursive.
    pub fn bucket_props<'a>(
        &'a self,
        bucket: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = Result<BucketProps, ClientError>> + Send + 'a>> {
        Box::pin(self.bucket_props_inner(bucket))
    }

    async fn bucket_props_inner(&self, bucket: &[u8]) -> Result<BucketProps, ClientError> {
        if bucket == PROPS_BUCKET {
            // Properties themselves are last-write-wins objects with the default placement.
            return Ok(BucketProps {
                allow_mult: false,
                ..self.default_bucket_props()
            });
        }
        if let Some(props) = self.inner.bucket_cache.get(bucket) {
            return Ok(props);
        }
        match self.read_bucket_props(bucket).await {
            Ok(props) => {
                self.inner.bucket_cache.put(bucket, props, CACHE_TTL);
                Ok(props)
            }
            Err(error) => {
                let name = String::from_utf8_lossy(bucket);
                if let Some(props) = self.inner.bucket_cache.get_stale(bucket) {
                    warn!(bucket = %name, error = %error, "cannot read bucket properties from the cluster; serving the last ones read");
                    return Ok(props);
                }
                if let Some(props) = self.local_bucket_props(bucket) {
                    warn!(bucket = %name, error = %error, "cannot read bucket properties from the cluster; serving this node's copy");
                    self.inner.bucket_cache.put(bucket, props, FAILED_READ_TTL);
                    return Ok(props);
                }
                warn!(bucket = %name, error = %error, "cannot read bucket properties");
                Err(ClientError {
                    kind: error.kind,
                    message: format!(
                        "cannot read the properties of bucket {name:?} ({}); the request was not served with default properties, retry",
                        error.message
                    ),
                })
            }
        }
    }

    /// This node's own replica of a bucket's properties, if it holds one.
    fn local_bucket_props(&self, bucket: &[u8]) -> Option<BucketProps> {
        let ring = self.inner.membership.ring();
        let copy = Copy {
            partition: ring.partition_for_key(PROPS_BUCKET, bucket),
            bucket: PROPS_BUCKET.to_vec(),
            key: bucket.to_vec(),
            hint_for: None,
        };
        let object = self.read_copy(&copy).ok()??;
        let latest = live_siblings(&object)
            .into_iter()
            .reduce(|best, next| if next.wins_over(&best) { next } else { best })?;
        rmp_serde::from_slice(&latest.value).ok()
    }

    /// Reads with `r = one`: properties are eventually consistent, as Riak's (gossiped with
    /// its ring) are, and a read must not need more replicas than the request it serves.
    async fn read_bucket_props(&self, bucket: &[u8]) -> Result<BucketProps, ClientError> {
        let timeout = READ_TIMEOUT.min(self.inner.settings.request_timeout);
        let options = GetOptions {
            r: Quorum::One,
            pr: Quorum::Count(0),
            timeout_ms: Some(timeout.as_millis() as u64),
            sloppy_quorum: None,
            // Every replica's copy feeds the merge and read repair, as before reads asked
            // only what `r` needs: property reads are rare (they are cached).
            ask_all_replicas: Some(true),
        };
        let response = self
            .get(PROPS_BUCKET.to_vec(), bucket.to_vec(), options)
            .await;
        match response {
            ClientResponse::Found { siblings, .. } => {
                let latest = siblings
                    .iter()
                    .reduce(|best, next| if next.wins_over(best) { next } else { best })
                    .ok_or_else(|| ClientError::internal("properties object has no value"))?;
                rmp_serde::from_slice(&latest.value).map_err(|error| {
                    ClientError::internal(format!("stored properties are unreadable: {error}"))
                })
            }
            ClientResponse::NotFound { .. } => Ok(self.default_bucket_props()),
            ClientResponse::Error(error) => Err(error),
            other => Err(ClientError::internal(format!(
                "unexpected answer to a properties read: {other:?}"
            ))),
        }
    }

    /// Stores a bucket's properties cluster-wide (`None` resets them to the defaults), then
    /// tells every other member to forget its cached copy.
    /// Whether any replica holds a live key of `bucket` (a coverage scan that stops at the
    /// first page); an error when the scan could not cover every partition.
    async fn holds_live_keys(&self, bucket: &[u8]) -> Result<bool, ClientError> {
        let (sink, mut pages) = tokio::sync::mpsc::channel(1);
        let node = self.clone();
        let bucket = bucket.to_vec();
        let scan = tokio::spawn(async move { node.coverage_scan(Some(bucket), None, sink).await });
        let found = pages.recv().await.is_some();
        // Dropping the receiver stops the scan at its next page.
        drop(pages);
        let scanned = scan
            .await
            .map_err(|error| ClientError::internal(format!("the key scan failed: {error}")))?;
        if found {
            return Ok(true);
        }
        scanned.map_err(|error| ClientError {
            kind: error.kind,
            message: format!(
                "cannot tell whether the bucket holds keys, so n_val is not lowered: {}",
                error.message
            ),
        })?;
        Ok(false)
    }

    pub async fn set_bucket_props(
        &self,
        bucket: &[u8],
        props: Option<BucketProps>,
    ) -> Result<(), ClientError> {
        if let Some(props) = &props {
            props.validate()?;
        }
        let encode = |props: &BucketProps| {
            rmp_serde::to_vec_named(props).map_err(|error| {
                ClientError::internal(format!("cannot encode properties: {error}"))
            })
        };
        let content = match &props {
            Some(props) => Some(NewContent {
                value: encode(props)?,
                content_type: STORED_CONTENT_TYPE.to_string(),
                user_metadata: Vec::new(),
            }),
            None => None,
        };
        let in_force = props.unwrap_or_else(|| self.default_bucket_props());
        let current = self.bucket_props(bucket).await?;
        if in_force.n_val < current.n_val && self.holds_live_keys(bucket).await? {
            // The replicas past the new n_val would keep their copies, which no delete,
            // reaper or anti-entropy exchange visits again, and a later ring change would
            // hand them back to the remaining replicas as if they were new.
            return Err(ClientError::invalid(format!(
                "n_val cannot be lowered from {} to {} while the bucket holds keys: the copies on the replicas beyond the first {} would never be deleted; write the keys to a new bucket with the lower n_val, or delete them first",
                current.n_val, in_force.n_val, in_force.n_val
            )));
        }
        let announced = encode(&in_force)?;
        let write = Write {
            bucket: PROPS_BUCKET.to_vec(),
            key: bucket.to_vec(),
            context: None,
            content,
            options: PutOptions::default(),
        };
        match Box::pin(self.write(write, false)).await {
            ClientResponse::Stored { .. } => {}
            ClientResponse::Error(error) => return Err(error),
            other => {
                return Err(ClientError::internal(format!(
                    "unexpected answer to a properties write: {other:?}"
                )));
            }
        }
        self.inner.bucket_cache.put(bucket, in_force, CACHE_TTL);
        // Tell every member before answering, so that a client that sets properties and then
        // uses another node finds them in force. Best effort: a member that misses it serves
        // stale properties for at most CACHE_TTL.
        let mut announcements = tokio::task::JoinSet::new();
        for member in self.inner.membership.ring().members() {
            if member == self.inner.id {
                continue;
            }
            let peers = self.inner.peers.clone();
            let request = PeerRequest::BucketPropsChanged {
                bucket: bucket.to_vec(),
                props: announced.clone(),
            };
            announcements.spawn(async move {
                let _ = peers.call(&member, request, ANNOUNCE_TIMEOUT).await;
            });
        }
        while announcements.join_next().await.is_some() {}
        Ok(())
    }

    /// Another node set a bucket's properties: cache them (or, when they cannot be read,
    /// forget the cached copy so that the next request reads them).
    pub(super) fn learn_bucket_props(&self, bucket: &[u8], encoded: &[u8]) {
        match rmp_serde::from_slice::<BucketProps>(encoded) {
            Ok(props) if props.validate().is_ok() => {
                self.inner.bucket_cache.put(bucket, props, CACHE_TTL)
            }
            _ => {
                warn!(bucket = %String::from_utf8_lossy(bucket), "a peer announced unreadable bucket properties");
                self.inner.bucket_cache.forget(bucket);
            }
        }
    }

    /// Drops every cached bucket property, so that the next requests read them afresh.
    pub fn clear_bucket_props_cache(&self) {
        self.inner.bucket_cache.clear();
    }
}

/// The latest of a sibling set by the last-write-wins order.
pub(super) fn reconcile_latest(
    object: &crate::core::object::StoredObject,
) -> crate::core::object::StoredObject {
    object.reconcile(Content::wins_over)
}
