//! What a key holds: a DVVSet of [`Content`] (one per sibling), its versioned record format
//! on disk, and the opaque causal context handed to clients.
//!
//! Record format (version 1): one byte `RECORD_FORMAT_VERSION`, then the MessagePack encoding
//! of the `DvvSet<Content>`. Context format (version 1): one byte `CONTEXT_FORMAT_VERSION`,
//! then the MessagePack encoding of the `VersionVector`. Both are versioned so that a later
//! release can read what an earlier one wrote.

use crate::core::ids::Actor;
use crate::core::version::{DvvSet, VersionError, VersionVector};
use serde::{Deserialize, Serialize};

pub const RECORD_FORMAT_VERSION: u8 = 1;
pub const CONTEXT_FORMAT_VERSION: u8 = 1;

/// Longest bucket name, in bytes.
pub const MAX_BUCKET_BYTES: usize = 255;
/// Longest key, in bytes: below the storage engine's 64 KiB key limit once the bucket
/// (at most 255 bytes) and its length prefix are added.
pub const MAX_KEY_BYTES: usize = 65_000;
/// Most actors a decoded context may name; clocks hold replica ids only, so real ones are small.
pub const MAX_CONTEXT_ACTORS: usize = 1024;

/// One version of a value, with the metadata a Riak client expects to see per sibling.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub content_type: String,
    pub user_metadata: Vec<(String, String)>,
    /// Wall-clock time of the write at its coordinator, in microseconds since the Unix epoch.
    /// Only used to pick a winner when a bucket has `allow_mult = false`, never for causality.
    pub last_modified_micros: u64,
    /// A tombstone: the key was deleted by this write.
    pub deleted: bool,
}

impl Content {
    pub fn tombstone(last_modified_micros: u64) -> Self {
        Content {
            value: Vec::new(),
            content_type: String::new(),
            user_metadata: Vec::new(),
            last_modified_micros,
            deleted: true,
        }
    }

    /// Bytes this content takes, as counted against the object size limit.
    pub fn size_bytes(&self) -> usize {
        self.value.len()
            + self.content_type.len()
            + self
                .user_metadata
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>()
    }

    /// Last-write-wins order for `allow_mult = false`: later timestamp wins, ties broken by the
    /// bytes so that every replica picks the same winner.
    pub fn wins_over(&self, other: &Content) -> bool {
        (self.last_modified_micros, &self.value, self.deleted)
            > (other.last_modified_micros, &other.value, other.deleted)
    }
}

/// Everything a replica stores for one key.
pub type StoredObject = DvvSet<Content>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("stored record is empty")]
    EmptyRecord,
    #[error(
        "stored record has format version {found}; this build reads version {RECORD_FORMAT_VERSION}"
    )]
    UnsupportedRecordVersion { found: u8 },
    #[error("stored record cannot be decoded: {reason}")]
    UndecodableRecord { reason: String },
    #[error("stored record is inconsistent: {0}")]
    InvalidClock(#[from] VersionError),
    #[error("context is empty")]
    EmptyContext,
    #[error(
        "context has format version {found}; this build reads version {CONTEXT_FORMAT_VERSION}"
    )]
    UnsupportedContextVersion { found: u8 },
    #[error("context cannot be decoded: {reason}")]
    UndecodableContext { reason: String },
    #[error("context names {count} actors; at most {MAX_CONTEXT_ACTORS} are allowed")]
    ContextTooLarge { count: usize },
}

pub fn encode_record(object: &StoredObject) -> Vec<u8> {
    let mut bytes = vec![RECORD_FORMAT_VERSION];
    // Encoding a plain struct into a Vec cannot fail.
    if let Err(error) = rmp_serde::encode::write(&mut bytes, object) {
        unreachable!("encoding a stored object into memory failed: {error}");
    }
    bytes
}

/// Decodes and validates a stored record; disk bytes are untrusted.
pub fn decode_record(bytes: &[u8]) -> Result<StoredObject, ObjectError> {
    let (&version, body) = bytes.split_first().ok_or(ObjectError::EmptyRecord)?;
    if version != RECORD_FORMAT_VERSION {
        return Err(ObjectError::UnsupportedRecordVersion { found: version });
    }
    let object: StoredObject =
        rmp_serde::from_slice(body).map_err(|error| ObjectError::UndecodableRecord {
            reason: error.to_string(),
        })?;
    object.validate()?;
    Ok(object)
}

/// The causal context a client gets with a read and sends back with a write. Opaque to the
/// client: it is the join of the version vectors of every sibling the client saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context(pub VersionVector);

impl Context {
    pub fn of(object: &StoredObject) -> Self {
        Context(object.join())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![CONTEXT_FORMAT_VERSION];
        if let Err(error) = rmp_serde::encode::write(&mut bytes, &self.0) {
            unreachable!("encoding a version vector into memory failed: {error}");
        }
        bytes
    }

    /// Decodes a context that came from a client; it is untrusted.
    pub fn decode(bytes: &[u8]) -> Result<Self, ObjectError> {
        let (&version, body) = bytes.split_first().ok_or(ObjectError::EmptyContext)?;
        if version != CONTEXT_FORMAT_VERSION {
            return Err(ObjectError::UnsupportedContextVersion { found: version });
        }
        let entries: Vec<(Actor, u64)> = rmp_serde::from_slice::<VersionVector>(body)
            .map(|vector| vector.entries().to_vec())
            .map_err(|error| ObjectError::UndecodableContext {
                reason: error.to_string(),
            })?;
        if entries.len() > MAX_CONTEXT_ACTORS {
            return Err(ObjectError::ContextTooLarge {
                count: entries.len(),
            });
        }
        let vector = VersionVector::from_entries(entries).map_err(|error| {
            ObjectError::UndecodableContext {
                reason: error.to_string(),
            }
        })?;
        Ok(Context(vector))
    }
}

/// The coordinator's half of a put: supersede what the context covers, add `content` under a
/// fresh dot of the coordinator's `actor`, keep every sibling the context did not cover.
/// With `allow_mult = false` the result is reduced to its last-write-wins value.
pub fn coordinate_put(
    local: Option<&StoredObject>,
    context: Option<&Context>,
    content: Content,
    actor: Actor,
    allow_mult: bool,
) -> StoredObject {
    let new = match context {
        Some(context) => DvvSet::new_with_context(&context.0, content),
        None => DvvSet::new(content),
    };
    let updated = match local {
        Some(local) => DvvSet::update(new, local, actor),
        None => DvvSet::update_without_local(new, actor),
    };
    if allow_mult {
        updated
    } else {
        updated.reconcile(Content::wins_over)
    }
}

/// A replica's half: merge what the coordinator (or read repair) sent into the local object.
pub fn merge_replica(
    local: Option<&StoredObject>,
    incoming: &StoredObject,
    allow_mult: bool,
) -> StoredObject {
    let merged = match local {
        Some(local) => local.sync(incoming),
        None => incoming.clone(),
    };
    if allow_mult {
        merged
    } else {
        merged.reconcile(Content::wins_over)
    }
}

/// Siblings that are not tombstones; a key whose siblings are all tombstones reads as not found.
pub fn live_siblings(object: &StoredObject) -> Vec<Content> {
    object
        .values()
        .into_iter()
        .filter(|content| !content.deleted)
        .cloned()
        .collect()
}

/// Total bytes of every sibling, as checked against the object size limit.
pub fn object_size_bytes(object: &StoredObject) -> usize {
    object
        .values()
        .iter()
        .map(|content| content.size_bytes())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(value: &str, at: u64) -> Content {
        Content {
            value: value.as_bytes().to_vec(),
            content_type: "text/plain".into(),
            user_metadata: vec![("author".into(), "test".into())],
            last_modified_micros: at,
            deleted: false,
        }
    }

    #[test]
    fn records_round_trip_and_bad_records_are_refused() {
        let object = coordinate_put(None, None, content("a", 1), 7, true);
        let bytes = encode_record(&object);
        assert_eq!(bytes[0], RECORD_FORMAT_VERSION);
        assert_eq!(decode_record(&bytes), Ok(object));
        assert_eq!(decode_record(&[]), Err(ObjectError::EmptyRecord));
        assert_eq!(
            decode_record(&[9, 1, 2]),
            Err(ObjectError::UnsupportedRecordVersion { found: 9 })
        );
        assert!(matches!(
            decode_record(&[RECORD_FORMAT_VERSION, 0xc1, 0xff]),
            Err(ObjectError::UndecodableRecord { .. })
        ));
    }

    #[test]
    fn contexts_round_trip_and_garbage_is_refused() {
        let first = coordinate_put(None, None, content("a", 1), 7, true);
        let context = Context::of(&first);
        assert_eq!(Context::decode(&context.encode()), Ok(context));
        assert!(Context::decode(b"").is_err());
        assert!(Context::decode(b"\x01garbage").is_err());
        assert!(matches!(
            Context::decode(b"\x02"),
            Err(ObjectError::UnsupportedContextVersion { found: 2 })
        ));
    }

    #[test]
    fn same_context_gives_siblings_and_a_covering_context_resolves_them() {
        let base = coordinate_put(None, None, content("base", 1), 1, true);
        let read_context = Context::of(&base);
        let first = coordinate_put(Some(&base), Some(&read_context), content("x", 2), 1, true);
        let both = coordinate_put(Some(&first), Some(&read_context), content("y", 3), 1, true);
        assert_eq!(live_siblings(&both).len(), 2);
        let resolved = coordinate_put(
            Some(&both),
            Some(&Context::of(&both)),
            content("z", 4),
            1,
            true,
        );
        assert_eq!(live_siblings(&resolved), vec![content("z", 4)]);
    }

    #[test]
    fn allow_mult_false_keeps_the_latest_write() {
        let base = coordinate_put(None, None, content("old", 5), 1, false);
        let concurrent = coordinate_put(Some(&base), None, content("new", 9), 2, false);
        assert_eq!(live_siblings(&concurrent), vec![content("new", 9)]);
        let replica = merge_replica(Some(&concurrent), &base, false);
        assert_eq!(live_siblings(&replica), vec![content("new", 9)]);
    }

    #[test]
    fn tombstones_read_as_absent_but_keep_a_context() {
        let base = coordinate_put(None, None, content("a", 1), 1, true);
        let deleted = coordinate_put(
            Some(&base),
            Some(&Context::of(&base)),
            Content::tombstone(2),
            1,
            true,
        );
        assert!(live_siblings(&deleted).is_empty());
        assert!(Context::of(&deleted).0.descends(&Context::of(&base).0));
        // A stale replica's copy merged in does not resurrect the deleted value.
        assert!(live_siblings(&merge_replica(Some(&deleted), &base, true)).is_empty());
    }
}
