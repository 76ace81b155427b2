//! What a key holds: a DVVSet of [`Content`] (one per sibling), its versioned record format
//! on disk, and the opaque causal context handed to clients.
//!
//! Record format (version 3): one byte `RECORD_FORMAT_VERSION`, then a fixed header of
//! [`RECORD_HEADER_BYTES`] - 1 bytes, then the MessagePack encoding of the `DvvSet<Content>`.
//! The header holds what anti-entropy, tombstone reaping and actor retirement read on every
//! write without decoding the object: a flags byte (bit 0: every sibling is a tombstone;
//! bit 1: the clock may hold actors that no longer coordinate, see `retire`), the newest
//! tombstone's time (u64, big-endian), and the key actor this node coordinates the key under
//! (a presence byte, actor and incarnation as u64; local to the node, never replicated; see
//! `epoch`). The object's bytes come last, so a digest of the replicated object is a hash of
//! the record's tail. Versions 2 (MessagePack of `{object, key actor}`) and 1 (the `DvvSet`
//! alone) are still read.
//!
//! Context format (version 2): one byte `CONTEXT_FORMAT_VERSION`, then the MessagePack
//! encoding of the digest of the (bucket, key) it was issued for and the `VersionVector`.
//! A context sent with a write of another key is refused (DESIGN §4); version 1 contexts
//! (the vector alone, bound to nothing) are refused with a request to read the key again.
//! Both formats are versioned so that a later release can read what an earlier one wrote.

use crate::core::epoch::KeyActor;
use crate::core::ids::Actor;
use crate::core::version::{DvvSet, VersionError, VersionVector};
use serde::{Deserialize, Serialize};

pub const RECORD_FORMAT_VERSION: u8 = 3;
/// Bytes before a version 3 record's object: version, flags, tombstone time, key actor.
pub const RECORD_HEADER_BYTES: usize = 1 + 1 + 8 + 1 + 8 + 8;
/// Flag bit of a version 3 record: every sibling is a tombstone.
const RECORD_FLAG_TOMBSTONE: u8 = 1;
/// Flag bit of a version 3 record: this node replaced a key actor it no longer trusts, so the
/// clock may name actors that will never coordinate again ([`LocalRecord::retiring`]). A
/// reader that predates the bit ignores it, which is safe: it only asks for a retirement pass.
const RECORD_FLAG_RETIRING: u8 = 2;
/// Record format 2: MessagePack of a [`LocalRecord`].
const RECORD_FORMAT_VERSION_2: u8 = 2;
/// The first record format: the `DvvSet` alone.
const RECORD_FORMAT_VERSION_1: u8 = 1;
pub const CONTEXT_FORMAT_VERSION: u8 = 2;

/// Longest bucket name, in bytes.
pub const MAX_BUCKET_BYTES: usize = 255;
/// Longest key, in bytes: below the storage engine's 64 KiB key limit once the bucket
/// (at most 255 bytes) and its length prefix are added.
pub const MAX_KEY_BYTES: usize = 65_000;
/// Most actors a decoded context may name. A key's clock names the key actors of the nodes
/// that coordinated it (a few per replica), and a write's context is checked against the
/// actors the replicas know, so this only bounds what decoding an untrusted context allocates.
pub const MAX_CONTEXT_ACTORS: usize = 1024;

/// One version of a value, with the metadata a Riak client expects to see per sibling.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
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

// Encoded positionally, as a clock is (see `Serialize for DvvSet` in `core::version`): the
// derived `Deserialize` still reads the named map older peers send.
impl Serialize for Content {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut fields = serializer.serialize_tuple(5)?;
        fields.serialize_element(serde_bytes::Bytes::new(&self.value))?;
        fields.serialize_element(&self.content_type)?;
        fields.serialize_element(&self.user_metadata)?;
        fields.serialize_element(&self.last_modified_micros)?;
        fields.serialize_element(&self.deleted)?;
        fields.end()
    }
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
        "stored record has format version {found}; this build reads versions 1 to {RECORD_FORMAT_VERSION}"
    )]
    UnsupportedRecordVersion { found: u8 },
    #[error("stored record cannot be decoded: {reason}")]
    UndecodableRecord { reason: String },
    #[error("stored record is inconsistent: {0}")]
    InvalidClock(#[from] VersionError),
    #[error("context is empty")]
    EmptyContext,
    #[error(
        "context has format version {found}; this build reads version {CONTEXT_FORMAT_VERSION}: read the key again for a current context"
    )]
    UnsupportedContextVersion { found: u8 },
    #[error("context was issued for another bucket and key: read this key for its own context")]
    ContextForAnotherKey,
    #[error("context cannot be decoded: {reason}")]
    UndecodableContext { reason: String },
    #[error("context names {count} actors; at most {MAX_CONTEXT_ACTORS} are allowed")]
    ContextTooLarge { count: usize },
}

/// What a node stores for one key: the replicated object, and what only this node needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRecord {
    pub object: StoredObject,
    /// The key actor this node coordinates writes of this copy under, once it has
    /// coordinated one (see `epoch`). A copy born from a merge has none yet.
    pub coordinator: Option<KeyActor>,
    /// This node gave up a key actor of this copy (it trusts no key actor of an earlier start,
    /// or it rescued a version under a one-off actor): the clock may hold actors that
    /// never coordinate again, and a retirement pass should look for ones it can fold away.
    pub retiring: bool,
}

/// Record format 2 as it was written: the object and the key actor.
#[derive(Deserialize)]
struct LocalRecordV2 {
    object: StoredObject,
    coordinator: Option<KeyActor>,
}

impl LocalRecord {
    /// A copy this node has never coordinated into.
    pub fn merged(object: StoredObject) -> Self {
        LocalRecord {
            object,
            coordinator: None,
            retiring: false,
        }
    }
}

/// Encodes a record in the current format.
pub fn encode_local_record(record: &LocalRecord) -> Vec<u8> {
    let mut bytes =
        Vec::with_capacity(RECORD_HEADER_BYTES + 64 + object_size_bytes(&record.object));
    bytes.push(RECORD_FORMAT_VERSION);
    let since = tombstone_since(&record.object);
    let mut flags = 0;
    if since.is_some() {
        flags |= RECORD_FLAG_TOMBSTONE;
    }
    if record.retiring {
        flags |= RECORD_FLAG_RETIRING;
    }
    bytes.push(flags);
    bytes.extend_from_slice(&since.unwrap_or(0).to_be_bytes());
    let (present, actor, incarnation) = match record.coordinator {
        Some(key_actor) => (1u8, key_actor.actor, key_actor.incarnation),
        None => (0, 0, 0),
    };
    bytes.push(present);
    bytes.extend_from_slice(&actor.to_be_bytes());
    bytes.extend_from_slice(&incarnation.to_be_bytes());
    // Encoding a plain struct into a Vec cannot fail.
    if let Err(error) = rmp_serde::encode::write(&mut bytes, &record.object) {
        unreachable!("encoding a stored record into memory failed: {error}");
    }
    bytes
}

/// What a version 3 record's header says, read without decoding its object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader<'a> {
    /// Set when every sibling is a tombstone: the newest one's time.
    pub tombstone_since: Option<u64>,
    /// [`LocalRecord::retiring`].
    pub retiring: bool,
    /// The object's MessagePack bytes.
    pub object: &'a [u8],
}

/// The header of a version 3 record; `None` for other versions or a record too short to
/// hold a header.
pub fn record_header(bytes: &[u8]) -> Option<RecordHeader<'_>> {
    if bytes.len() < RECORD_HEADER_BYTES || bytes[0] != RECORD_FORMAT_VERSION {
        return None;
    }
    let mut since = [0u8; 8];
    since.copy_from_slice(&bytes[2..10]);
    Some(RecordHeader {
        tombstone_since: (bytes[1] & RECORD_FLAG_TOMBSTONE != 0)
            .then_some(u64::from_be_bytes(since)),
        retiring: bytes[1] & RECORD_FLAG_RETIRING != 0,
        object: &bytes[RECORD_HEADER_BYTES..],
    })
}

/// The MessagePack encoding of an object, as a version 3 record holds it.
pub fn encode_object(object: &StoredObject) -> Vec<u8> {
    // Encoding a plain struct into a Vec cannot fail.
    rmp_serde::to_vec(object)
        .unwrap_or_else(|error| unreachable!("encoding an object into memory failed: {error}"))
}

/// Encodes an object as a record that no coordinator has claimed.
pub fn encode_record(object: &StoredObject) -> Vec<u8> {
    encode_local_record(&LocalRecord::merged(object.clone()))
}

/// Decodes and validates a stored record of either format; disk bytes are untrusted.
pub fn decode_local_record(bytes: &[u8]) -> Result<LocalRecord, ObjectError> {
    let (&version, body) = bytes.split_first().ok_or(ObjectError::EmptyRecord)?;
    let undecodable = |error: rmp_serde::decode::Error| ObjectError::UndecodableRecord {
        reason: error.to_string(),
    };
    let record = match version {
        RECORD_FORMAT_VERSION => {
            if bytes.len() < RECORD_HEADER_BYTES {
                return Err(ObjectError::UndecodableRecord {
                    reason: format!(
                        "a version 3 record needs a {RECORD_HEADER_BYTES}-byte header; this one has {} bytes",
                        bytes.len()
                    ),
                });
            }
            let u64_at = |at: usize| {
                let mut word = [0u8; 8];
                word.copy_from_slice(&bytes[at..at + 8]);
                u64::from_be_bytes(word)
            };
            let coordinator = match bytes[10] {
                0 => None,
                1 => Some(KeyActor {
                    actor: u64_at(11),
                    incarnation: u64_at(19),
                }),
                other => {
                    return Err(ObjectError::UndecodableRecord {
                        reason: format!("key actor presence byte is {other}, not 0 or 1"),
                    });
                }
            };
            let object = rmp_serde::from_slice::<StoredObject>(&bytes[RECORD_HEADER_BYTES..])
                .map_err(undecodable)?;
            LocalRecord {
                object,
                coordinator,
                retiring: bytes[1] & RECORD_FLAG_RETIRING != 0,
            }
        }
        RECORD_FORMAT_VERSION_2 => {
            let LocalRecordV2 {
                object,
                coordinator,
            } = rmp_serde::from_slice(body).map_err(undecodable)?;
            LocalRecord {
                object,
                coordinator,
                retiring: false,
            }
        }
        RECORD_FORMAT_VERSION_1 => {
            LocalRecord::merged(rmp_serde::from_slice(body).map_err(undecodable)?)
        }
        found => return Err(ObjectError::UnsupportedRecordVersion { found }),
    };
    record.object.validate()?;
    Ok(record)
}

/// Decodes a stored record's object.
pub fn decode_record(bytes: &[u8]) -> Result<StoredObject, ObjectError> {
    decode_local_record(bytes).map(|record| record.object)
}

/// The causal context a client gets with a read and sends back with a write. Opaque to the
/// client: it is the join of the version vectors of every sibling the client saw, bound to
/// the key it was read from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context(pub VersionVector);

/// A context as encoded: the digest of its key, and its clock.
#[derive(Serialize, Deserialize)]
struct ContextWire {
    key_digest: u64,
    clock: VersionVector,
}

/// The first 8 bytes of the BLAKE3 hash of the length-prefixed bucket and the key: enough to
/// tell a context of another key from this key's (a checksum, not a secret).
pub fn key_digest(bucket: &[u8], key: &[u8]) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(bucket.len() as u64).to_le_bytes());
    hasher.update(bucket);
    hasher.update(key);
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

impl Context {
    pub fn of(object: &StoredObject) -> Self {
        Context(object.join())
    }

    /// The context as handed to a client that read (or wrote) `bucket`/`key`.
    pub fn encode(&self, bucket: &[u8], key: &[u8]) -> Vec<u8> {
        let mut bytes = vec![CONTEXT_FORMAT_VERSION];
        let wire = ContextWire {
            key_digest: key_digest(bucket, key),
            clock: self.0.clone(),
        };
        if let Err(error) = rmp_serde::encode::write(&mut bytes, &wire) {
            unreachable!("encoding a version vector into memory failed: {error}");
        }
        bytes
    }

    /// Decodes a context that came from a client with a write of `bucket`/`key`; it is
    /// untrusted: it must have been issued for that key, and name at most
    /// [`MAX_CONTEXT_ACTORS`] actors. (Whether its counters were ever issued is checked
    /// against the replicas by the coordinator.)
    pub fn decode(bytes: &[u8], bucket: &[u8], key: &[u8]) -> Result<Self, ObjectError> {
        let (&version, body) = bytes.split_first().ok_or(ObjectError::EmptyContext)?;
        if version != CONTEXT_FORMAT_VERSION {
            return Err(ObjectError::UnsupportedContextVersion { found: version });
        }
        let wire: ContextWire =
            rmp_serde::from_slice(body).map_err(|error| ObjectError::UndecodableContext {
                reason: error.to_string(),
            })?;
        if wire.key_digest != key_digest(bucket, key) {
            return Err(ObjectError::ContextForAnotherKey);
        }
        // Decoding checked the vector (sorted, no duplicates, at most `MAX_ACTORS`).
        if wire.clock.len() > MAX_CONTEXT_ACTORS {
            return Err(ObjectError::ContextTooLarge {
                count: wire.clock.len(),
            });
        }
        Ok(Context(wire.clock))
    }

    /// This context without its claims on actors that `known` (the history of every replica
    /// of the key) does not name: retired actors, whose dots are superseded everywhere, or
    /// actors of versions that have not reached a replica yet (they arrive as siblings). See
    /// `core::retire`: dropping a claim never loses a version.
    pub fn without_actors_unknown_to(&self, known: &VersionVector) -> Context {
        let entries = self
            .0
            .entries()
            .iter()
            .copied()
            .filter(|(actor, _)| known.get(*actor) > 0)
            .collect();
        // A subset of a valid vector's entries is still sorted, unique and non-zero.
        Context(VersionVector::from_entries(entries).unwrap_or_default())
    }

    /// The entries of this context that claim more of an actor's history than `known`
    /// holds: (actor, counter claimed, counter known).
    pub fn beyond(&self, known: &VersionVector) -> Vec<(Actor, u64, u64)> {
        self.0
            .entries()
            .iter()
            .filter(|(actor, counter)| *counter > known.get(*actor))
            .map(|(actor, counter)| (*actor, *counter, known.get(*actor)))
            .collect()
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

/// Pairs of different versions that `local` and `incoming` hold under one dot: a dot issued
/// twice (DESIGN §4 forbids it; a replica that meets one keeps both and counts it).
/// Only dots that both sides still hold as live siblings can be compared.
pub fn colliding_versions(
    local: &StoredObject,
    incoming: &StoredObject,
) -> Vec<(Content, Content)> {
    let mut collisions = Vec::new();
    for theirs in incoming.entries() {
        let Some(ours) = local
            .entries()
            .iter()
            .find(|entry| entry.actor() == theirs.actor())
        else {
            continue;
        };
        for (their_index, their_value) in theirs.values().iter().enumerate() {
            let dot = theirs.counter() - their_index as u64;
            let Some(our_index) = ours.counter().checked_sub(dot) else {
                continue;
            };
            if let Some(our_value) = ours.values().get(our_index as usize)
                && our_value != their_value
            {
                collisions.push((our_value.clone(), their_value.clone()));
            }
        }
    }
    collisions
}

/// Keeps a version that a dot collision would have dropped: records it again under a fresh
/// dot of `actor` (an actor used for nothing else), concurrent with everything `merged`
/// holds, so that a client sees it as a sibling and resolves it.
pub fn rescue_version(merged: &StoredObject, version: Content, actor: Actor) -> StoredObject {
    DvvSet::update(DvvSet::new(version), merged, actor)
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

/// When a key whose every sibling is a tombstone was deleted: the newest tombstone's
/// wall-clock time (microseconds); `None` while any sibling is live (or there is none).
/// Tombstone reaping measures its grace period from this.
pub fn tombstone_since(object: &StoredObject) -> Option<u64> {
    let values = object.values();
    if values.is_empty() || values.iter().any(|content| !content.deleted) {
        return None;
    }
    values
        .iter()
        .map(|content| content.last_modified_micros)
        .max()
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

    /// What the derived, named encoding of a stored object looked like before objects were
    /// encoded positionally; peers of older builds still send it.
    #[derive(Serialize)]
    struct NamedContent<'a> {
        #[serde(with = "serde_bytes")]
        value: &'a [u8],
        content_type: &'a str,
        user_metadata: &'a [(String, String)],
        last_modified_micros: u64,
        deleted: bool,
    }

    #[derive(Serialize)]
    struct NamedEntry<'a> {
        actor: Actor,
        counter: u64,
        values: Vec<NamedContent<'a>>,
    }

    #[derive(Serialize)]
    struct NamedObject<'a> {
        entries: Vec<NamedEntry<'a>>,
        anonymous: Vec<NamedContent<'a>>,
    }

    fn named_content(content: &Content) -> NamedContent<'_> {
        NamedContent {
            value: &content.value,
            content_type: &content.content_type,
            user_metadata: &content.user_metadata,
            last_modified_micros: content.last_modified_micros,
            deleted: content.deleted,
        }
    }

    fn named(object: &StoredObject) -> NamedObject<'_> {
        NamedObject {
            entries: object
                .entries()
                .iter()
                .map(|entry| NamedEntry {
                    actor: entry.actor(),
                    counter: entry.counter(),
                    values: entry.values().iter().map(named_content).collect(),
                })
                .collect(),
            anonymous: object.anonymous().iter().map(named_content).collect(),
        }
    }

    #[test]
    fn objects_travel_without_field_names_and_the_named_form_still_decodes() {
        let first = coordinate_put(None, None, content("a", 1), 7, true);
        let object = first.sync(&coordinate_put(None, None, content("b", 2), 9, true));
        assert_eq!(object.entries().len(), 2);
        // The wire's encoder names struct fields; a stored object's are left out.
        let positional = rmp_serde::to_vec_named(&object).unwrap();
        for name in [
            &b"content_type"[..],
            b"user_metadata",
            b"entries",
            b"counter",
        ] {
            assert!(
                !positional.windows(name.len()).any(|window| window == name),
                "{} is on the wire",
                String::from_utf8_lossy(name)
            );
        }
        assert_eq!(
            rmp_serde::from_slice::<StoredObject>(&positional).unwrap(),
            object
        );
        // What an older peer sends, with every field named, decodes to the same object.
        let legacy = rmp_serde::to_vec_named(&named(&object)).unwrap();
        assert!(legacy.len() > positional.len());
        assert_eq!(
            rmp_serde::from_slice::<StoredObject>(&legacy).unwrap(),
            object
        );
        // The disk format was positional already: its bytes are unchanged.
        assert_eq!(
            rmp_serde::to_vec(&named(&object)).unwrap(),
            encode_object(&object)
        );
    }

    #[test]
    fn records_round_trip_and_bad_records_are_refused() {
        let object = coordinate_put(None, None, content("a", 1), 7, true);
        let bytes = encode_record(&object);
        assert_eq!(bytes[0], RECORD_FORMAT_VERSION);
        assert_eq!(decode_record(&bytes), Ok(object.clone()));
        assert_eq!(decode_record(&[]), Err(ObjectError::EmptyRecord));
        assert_eq!(
            decode_record(&[9, 1, 2]),
            Err(ObjectError::UnsupportedRecordVersion { found: 9 })
        );
        assert!(matches!(
            decode_record(&[RECORD_FORMAT_VERSION, 0xc1, 0xff]),
            Err(ObjectError::UndecodableRecord { .. })
        ));
        let mut bad_presence = bytes.clone();
        bad_presence[10] = 7;
        assert!(matches!(
            decode_record(&bad_presence),
            Err(ObjectError::UndecodableRecord { .. })
        ));
        // The header gives the object's bytes and the tombstone state without a decode.
        let header = record_header(&bytes).unwrap();
        assert_eq!((header.tombstone_since, header.retiring), (None, false));
        assert_eq!(header.object, encode_object(&object).as_slice());
        let deleted = coordinate_put(
            Some(&object),
            Some(&Context::of(&object)),
            Content::tombstone(9),
            7,
            true,
        );
        assert_eq!(
            record_header(&encode_record(&deleted))
                .unwrap()
                .tombstone_since,
            Some(9)
        );
        let retiring = LocalRecord {
            retiring: true,
            ..LocalRecord::merged(deleted.clone())
        };
        let header_bytes = encode_local_record(&retiring);
        let header = record_header(&header_bytes).unwrap();
        assert_eq!((header.tombstone_since, header.retiring), (Some(9), true));
        assert_eq!(decode_local_record(&header_bytes), Ok(retiring));
        assert_eq!(record_header(&[RECORD_FORMAT_VERSION, 0]), None);
    }

    #[test]
    fn records_keep_their_key_actor_and_version_1_and_2_records_are_read() {
        let object = coordinate_put(None, None, content("a", 1), 7, true);
        let record = LocalRecord {
            object: object.clone(),
            coordinator: Some(KeyActor {
                actor: 7,
                incarnation: 3,
            }),
            retiring: false,
        };
        assert_eq!(
            decode_local_record(&encode_local_record(&record)),
            Ok(record.clone())
        );
        // Version 2 held MessagePack of (object, key actor).
        let mut version_2 = vec![RECORD_FORMAT_VERSION_2];
        rmp_serde::encode::write(&mut version_2, &(&record.object, record.coordinator)).unwrap();
        assert_eq!(decode_local_record(&version_2), Ok(record.clone()));
        let mut version_1 = vec![RECORD_FORMAT_VERSION_1];
        rmp_serde::encode::write(&mut version_1, &object).unwrap();
        assert_eq!(
            decode_local_record(&version_1),
            Ok(LocalRecord::merged(object))
        );
    }

    #[test]
    fn a_dot_issued_twice_is_found_and_both_versions_are_kept() {
        // Actor 7 issued dot (7, 1) twice, for "first" and for "second".
        let ours = coordinate_put(None, None, content("first", 1), 7, true);
        let theirs = coordinate_put(None, None, content("second", 2), 7, true);
        let collisions = colliding_versions(&ours, &theirs);
        assert_eq!(
            collisions,
            vec![(content("first", 1), content("second", 2))]
        );
        assert!(colliding_versions(&ours, &ours).is_empty());
        let mut merged = merge_replica(Some(&ours), &theirs, true);
        for (left, right) in &collisions {
            for version in [left, right] {
                if !merged.values().contains(&version) {
                    merged = rescue_version(&merged, version.clone(), 99);
                }
            }
        }
        let mut values: Vec<Vec<u8>> = merged
            .values()
            .into_iter()
            .map(|c| c.value.clone())
            .collect();
        values.sort();
        assert_eq!(values, vec![b"first".to_vec(), b"second".to_vec()]);
    }

    #[test]
    fn contexts_round_trip_for_their_key_and_garbage_is_refused() {
        let first = coordinate_put(None, None, content("a", 1), 7, true);
        let context = Context::of(&first);
        let bytes = context.encode(b"b", b"k");
        assert_eq!(Context::decode(&bytes, b"b", b"k"), Ok(context.clone()));
        assert_eq!(
            Context::decode(&bytes, b"b", b"other"),
            Err(ObjectError::ContextForAnotherKey)
        );
        // The bucket and key are told apart, not concatenated.
        assert_eq!(
            Context::decode(&context.encode(b"bk", b""), b"b", b"k"),
            Err(ObjectError::ContextForAnotherKey)
        );
        assert!(Context::decode(b"", b"b", b"k").is_err());
        assert!(Context::decode(b"\x02garbage", b"b", b"k").is_err());
        let mut version_1 = vec![1];
        rmp_serde::encode::write(&mut version_1, &context.0).unwrap();
        assert!(matches!(
            Context::decode(&version_1, b"b", b"k"),
            Err(ObjectError::UnsupportedContextVersion { found: 1 })
        ));
    }

    #[test]
    fn a_context_with_too_many_actors_is_refused() {
        let entries: Vec<(Actor, u64)> = (1..=MAX_CONTEXT_ACTORS as u64 + 1)
            .map(|actor| (actor, 1))
            .collect();
        let context = Context(VersionVector::from_entries(entries).unwrap());
        assert_eq!(
            Context::decode(&context.encode(b"b", b"k"), b"b", b"k"),
            Err(ObjectError::ContextTooLarge {
                count: MAX_CONTEXT_ACTORS + 1
            })
        );
    }

    #[test]
    fn beyond_names_the_entries_a_copy_does_not_know() {
        let known = VersionVector::from_entries(vec![(1, 3), (2, 5)]).unwrap();
        let context = Context(VersionVector::from_entries(vec![(1, 3), (2, 9), (4, 1)]).unwrap());
        assert_eq!(context.beyond(&known), vec![(2, 9, 5), (4, 1, 0)]);
        assert!(Context(known.clone()).beyond(&known).is_empty());
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

    #[test]
    fn only_a_key_whose_every_sibling_is_a_tombstone_has_a_tombstone_time() {
        let base = coordinate_put(None, None, content("a", 1), 1, true);
        assert_eq!(tombstone_since(&base), None);
        // Two concurrent deletes: the newest one's time counts.
        let first = coordinate_put(Some(&base), None, Content::tombstone(5), 1, true);
        let both = coordinate_put(Some(&first), None, Content::tombstone(3), 2, true);
        assert_eq!(both.values().len(), 3);
        assert_eq!(tombstone_since(&both), None, "a live sibling remains");
        let deleted = coordinate_put(
            Some(&both),
            Some(&Context::of(&base)),
            Content::tombstone(4),
            1,
            true,
        );
        assert!(deleted.values().iter().all(|content| content.deleted));
        assert_eq!(tombstone_since(&deleted), Some(5));
    }
}
