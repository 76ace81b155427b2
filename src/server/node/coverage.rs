//! Coverage scans: list buckets and list keys, as Riak does them, by asking one replica of
//! every partition for what it holds and merging the answers.
//!
//! Every key of partition `p` lives on the first owner in `p`'s preference list (for any
//! `n_val`), so asking that node covers `p`; when it does not answer, the next node of the walk
//! is asked, which covers every key whose bucket has `n_val >= 2`. The result is what the
//! replicas held when asked, not a snapshot: Riak documents the same for its key listing.

use super::Node;
use crate::core::object::{MAX_KEY_BYTES, decode_record, live_siblings};
use crate::core::ring::PartitionId;
use crate::protocol::{ClientError, ErrorKind, PeerRequest, PeerResponse};
use serde_bytes::ByteBuf;
use std::collections::HashSet;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::debug;

/// Records (or buckets) per page of a scan, so that no answer outgrows a frame.
const PAGE_LIMIT: u32 = 128;
/// Partitions a coverage scan reads at once: with pages of [`PAGE_LIMIT`] and a channel of the
/// same depth, a scan holds a few thousand names at most, however many keys the bucket has.
const SCAN_PARALLELISM: usize = 8;

type Entry = (Vec<u8>, Vec<u8>);

fn is_internal(bucket: &[u8]) -> bool {
    bucket.first() == Some(&0)
}

impl Node {
    /// One page of this node's copy of `partition`: the live keys of `bucket`, or the
    /// distinct bucket names when `bucket` is `None`.
    pub(super) fn list_local(
        &self,
        partition: PartitionId,
        bucket: Option<&[u8]>,
        start_after: Option<Entry>,
        limit: u32,
    ) -> Result<(Vec<Entry>, Option<Entry>), String> {
        let store = &self.inner.store;
        let limit = limit.clamp(1, PAGE_LIMIT) as usize;
        match bucket {
            Some(bucket) => {
                // Keys are stored as (bucket length, bucket, key): one bucket is contiguous.
                let start = start_after.unwrap_or_else(|| (bucket.to_vec(), Vec::new()));
                let records = store
                    .scan_partition(partition, Some((&start.0, &start.1)), limit)
                    .map_err(|error| error.to_string())?;
                let full = records.len() == limit;
                let mut entries = Vec::new();
                let mut next = None;
                for (record_bucket, key, value) in records {
                    if record_bucket != bucket {
                        return Ok((entries, None));
                    }
                    let live = decode_record(&value)
                        .map(|object| !live_siblings(&object).is_empty())
                        .unwrap_or(false);
                    if live {
                        entries.push((record_bucket.clone(), key.clone()));
                    }
                    next = Some((record_bucket, key));
                }
                Ok((entries, if full { next } else { None }))
            }
            None => {
                // Jump from bucket to bucket: past the longest key a bucket can hold.
                let mut cursor = start_after;
                let mut entries = Vec::new();
                while entries.len() < limit {
                    let records = store
                        .scan_partition(
                            partition,
                            cursor.as_ref().map(|(b, k)| (b.as_slice(), k.as_slice())),
                            1,
                        )
                        .map_err(|error| error.to_string())?;
                    let Some((record_bucket, _, _)) = records.into_iter().next() else {
                        return Ok((entries, None));
                    };
                    cursor = Some((record_bucket.clone(), vec![0xff; MAX_KEY_BYTES + 1]));
                    if !is_internal(&record_bucket) {
                        entries.push((record_bucket, Vec::new()));
                    }
                }
                Ok((entries, cursor))
            }
        }
    }

    pub(super) fn serve_list_keys(
        &self,
        partition: PartitionId,
        bucket: Option<ByteBuf>,
        start_after: Option<(ByteBuf, ByteBuf)>,
        limit: u32,
    ) -> PeerResponse {
        let partition_count = self.inner.membership.ring().partition_count();
        if partition >= partition_count {
            return PeerResponse::Failed {
                message: format!(
                    "partition {partition} is outside the ring (0..{partition_count})"
                ),
            };
        }
        let start_after = start_after.map(|(bucket, key)| (bucket.into_vec(), key.into_vec()));
        match self.list_local(
            partition,
            bucket.as_deref().map(|b| &b[..]),
            start_after,
            limit,
        ) {
            Ok((entries, next)) => PeerResponse::Keys {
                entries: entries
                    .into_iter()
                    .map(|(bucket, key)| (ByteBuf::from(bucket), ByteBuf::from(key)))
                    .collect(),
                next: next.map(|(bucket, key)| (ByteBuf::from(bucket), ByteBuf::from(key))),
            },
            Err(message) => PeerResponse::Failed { message },
        }
    }

    /// One page of one partition from one node.
    async fn page_from(
        &self,
        node: &crate::core::ids::NodeId,
        partition: PartitionId,
        bucket: Option<&[u8]>,
        start_after: Option<Entry>,
        deadline: Instant,
    ) -> Result<(Vec<Entry>, Option<Entry>), String> {
        if node == &self.inner.id {
            return self.list_local(partition, bucket, start_after, PAGE_LIMIT);
        }
        let request = PeerRequest::ListKeys {
            partition,
            bucket: bucket.map(|bucket| ByteBuf::from(bucket.to_vec())),
            start_after: start_after
                .map(|(bucket, key)| (ByteBuf::from(bucket), ByteBuf::from(key))),
            limit: PAGE_LIMIT,
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        match self.inner.peers.call(node, request, timeout).await {
            Ok(PeerResponse::Keys { entries, next }) => {
                if entries.len() > PAGE_LIMIT as usize {
                    return Err(format!(
                        "{node} answered {} entries for a page of {PAGE_LIMIT}",
                        entries.len()
                    ));
                }
                Ok((
                    entries
                        .into_iter()
                        .map(|(bucket, key)| (bucket.into_vec(), key.into_vec()))
                        .collect(),
                    next.map(|(bucket, key)| (bucket.into_vec(), key.into_vec())),
                ))
            }
            Ok(other) => Err(format!("{node} answered {other:?}")),
            Err(error) => Err(format!("{node}: {error}")),
        }
    }

    /// Scans one partition page by page, sending each page on `pages` as it arrives (the
    /// channel's bound holds the scan back while the consumer is slow). A node that fails is
    /// replaced by the next candidate, which resumes after the last entry sent: every node
    /// keeps a partition in the same key order, so nothing is sent twice.
    async fn scan_partition(
        &self,
        partition: PartitionId,
        candidates: &[crate::core::ids::NodeId],
        bucket: Option<&[u8]>,
        deadline: Instant,
        pages: &mpsc::Sender<Vec<Entry>>,
    ) -> Result<(), String> {
        let mut last_error = String::from("no node to ask");
        let mut start_after: Option<Entry> = None;
        for (index, candidate) in candidates.iter().enumerate() {
            // Leave later nodes half of the time if this one does not answer.
            let attempt_deadline = if index + 1 < candidates.len() {
                let now = Instant::now();
                now + deadline.saturating_duration_since(now) / 2
            } else {
                deadline
            };
            loop {
                match self
                    .page_from(
                        candidate,
                        partition,
                        bucket,
                        start_after.clone(),
                        attempt_deadline,
                    )
                    .await
                {
                    Ok((entries, next)) => {
                        if !entries.is_empty() && pages.send(entries).await.is_err() {
                            // The consumer went away.
                            return Ok(());
                        }
                        match next {
                            Some(next) => start_after = Some(next),
                            None => return Ok(()),
                        }
                    }
                    Err(error) => {
                        debug!(partition, node = %candidate, error = %error, "coverage scan failed; trying the next node");
                        last_error = error;
                        break;
                    }
                }
            }
        }
        Err(format!("partition {partition}: {last_error}"))
    }

    /// Lists the live keys of `bucket` (or, with `None`, the bucket names) across the cluster.
    /// Names are sent on `sink` a page at a time as partitions are scanned, with at most
    /// [`SCAN_PARALLELISM`] partitions in flight, so the scan holds a bounded number of pages
    /// whatever the bucket's size. Keys are not deduplicated (each lives in one partition);
    /// bucket names are, which holds one entry per bucket. The answer is an error when some
    /// partition had no node answer.
    pub async fn coverage_scan(
        &self,
        bucket: Option<Vec<u8>>,
        timeout_ms: Option<u64>,
        sink: mpsc::Sender<Vec<Vec<u8>>>,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + self.timeout_of(timeout_ms);
        let ring = self.inner.membership.ring();
        let member_count = ring.member_count();
        let (pages_sender, mut pages) = mpsc::channel::<Vec<Entry>>(SCAN_PARALLELISM);
        let mut remaining = 0..ring.partition_count();
        let mut scans = JoinSet::new();
        let mut spawn_next = |scans: &mut JoinSet<Result<(), String>>| {
            let Some(partition) = remaining.next() else {
                return;
            };
            let candidates: Vec<_> = ring
                .preference_list(partition, member_count)
                .into_iter()
                .map(|(_, node)| node)
                .collect();
            let node = self.clone();
            let bucket = bucket.clone();
            let pages = pages_sender.clone();
            scans.spawn(async move {
                node.scan_partition(partition, &candidates, bucket.as_deref(), deadline, &pages)
                    .await
            });
        };
        for _ in 0..SCAN_PARALLELISM {
            spawn_next(&mut scans);
        }
        let mut buckets_seen = HashSet::new();
        let mut failure = None;
        loop {
            tokio::select! {
                page = pages.recv() => {
                    let Some(page) = page else { break };
                    let names: Vec<Vec<u8>> = match &bucket {
                        Some(_) => page.into_iter().map(|(_, key)| key).collect(),
                        None => page
                            .into_iter()
                            .map(|(bucket, _)| bucket)
                            .filter(|name| buckets_seen.insert(name.clone()))
                            .collect(),
                    };
                    if !names.is_empty() && sink.send(names).await.is_err() {
                        // The HTTP client went away.
                        scans.abort_all();
                        return Ok(());
                    }
                }
                Some(joined) = scans.join_next() => {
                    match joined {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            failure.get_or_insert(error);
                        }
                        Err(error) => {
                            failure.get_or_insert(error.to_string());
                        }
                    }
                    spawn_next(&mut scans);
                    if scans.is_empty() {
                        // Every scan is done; what they sent is already queued.
                        pages.close();
                    }
                }
            }
        }
        match failure {
            None => Ok(()),
            Some(error) => Err(ClientError {
                kind: ErrorKind::Timeout(None),
                message: format!("the scan did not cover every partition: {error}"),
            }),
        }
    }
}
