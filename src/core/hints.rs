//! Hinted handoff records: a fallback that stood in for a down primary keeps the object it
//! received under a hint key naming that primary, until the primary acknowledges it.
//!
//! Hint key: u8 length + primary node id, u32 BE partition, u16 BE bucket length, bucket,
//! key — so one primary's hints are contiguous and can be scanned by prefix. Hint record
//! (format version 1): one version byte, then MessagePack of [`HintRecord`].

use crate::core::epoch::KeyActor;
use crate::core::ids::NodeId;
use crate::core::object::StoredObject;
use crate::core::ring::PartitionId;
use serde::{Deserialize, Serialize};

pub const HINT_FORMAT_VERSION: u8 = 1;

/// What a fallback keeps for one key of one primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintRecord {
    /// When the hint was first written, microseconds since the Unix epoch (from the shell),
    /// for operators; a hint is kept until delivered, whatever its age.
    pub created_micros: u64,
    pub object: StoredObject,
    /// The key actor this node coordinates writes of this hint copy under (see `epoch`);
    /// it dies with the hint. Absent in hints written before it existed.
    #[serde(default)]
    pub coordinator: Option<KeyActor>,
}

/// A decoded hint key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HintKey {
    pub primary: NodeId,
    pub partition: PartitionId,
    pub bucket: Vec<u8>,
    pub key: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HintError {
    #[error("hint key is malformed")]
    MalformedKey,
    #[error("hint record has format version {found}; this build reads {HINT_FORMAT_VERSION}")]
    UnsupportedVersion { found: u8 },
    #[error("hint record cannot be decoded: {reason}")]
    Undecodable { reason: String },
}

/// The prefix shared by every hint of `primary`.
pub fn primary_prefix(primary: &NodeId) -> Vec<u8> {
    let id = primary.as_str().as_bytes();
    let mut prefix = Vec::with_capacity(1 + id.len());
    // Node ids are at most 64 bytes, so the length fits a byte.
    prefix.push(id.len() as u8);
    prefix.extend_from_slice(id);
    prefix
}

pub fn encode_key(hint: &HintKey) -> Vec<u8> {
    let mut bytes = primary_prefix(&hint.primary);
    bytes.extend_from_slice(&hint.partition.to_be_bytes());
    bytes.extend_from_slice(&(hint.bucket.len() as u16).to_be_bytes());
    bytes.extend_from_slice(&hint.bucket);
    bytes.extend_from_slice(&hint.key);
    bytes
}

pub fn decode_key(bytes: &[u8]) -> Result<HintKey, HintError> {
    let (&id_length, rest) = bytes.split_first().ok_or(HintError::MalformedKey)?;
    let id_length = usize::from(id_length);
    let id = rest.get(..id_length).ok_or(HintError::MalformedKey)?;
    let rest = &rest[id_length..];
    let primary = std::str::from_utf8(id)
        .ok()
        .and_then(|id| NodeId::new(id).ok())
        .ok_or(HintError::MalformedKey)?;
    let partition = rest
        .get(..4)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(HintError::MalformedKey)?;
    let bucket_length = rest
        .get(4..6)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u16::from_be_bytes)
        .ok_or(HintError::MalformedKey)?;
    let bucket_end = 6 + usize::from(bucket_length);
    let bucket = rest
        .get(6..bucket_end)
        .ok_or(HintError::MalformedKey)?
        .to_vec();
    let key = rest[bucket_end..].to_vec();
    Ok(HintKey {
        primary,
        partition,
        bucket,
        key,
    })
}

pub fn encode_record(record: &HintRecord) -> Vec<u8> {
    let mut bytes = vec![HINT_FORMAT_VERSION];
    if let Err(error) = rmp_serde::encode::write(&mut bytes, record) {
        unreachable!("encoding a hint into memory failed: {error}");
    }
    bytes
}

pub fn decode_record(bytes: &[u8]) -> Result<HintRecord, HintError> {
    let (&version, body) = bytes.split_first().ok_or(HintError::Undecodable {
        reason: "empty record".into(),
    })?;
    if version != HINT_FORMAT_VERSION {
        return Err(HintError::UnsupportedVersion { found: version });
    }
    rmp_serde::from_slice(body).map_err(|error| HintError::Undecodable {
        reason: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_group_by_primary() {
        let hint = HintKey {
            primary: NodeId::new("n2").unwrap(),
            partition: 42,
            bucket: b"users".to_vec(),
            key: b"ada".to_vec(),
        };
        let bytes = encode_key(&hint);
        assert!(bytes.starts_with(&primary_prefix(&hint.primary)));
        assert_eq!(decode_key(&bytes), Ok(hint));
        assert_eq!(decode_key(&[5, b'a']), Err(HintError::MalformedKey));
        assert_eq!(decode_key(&[]), Err(HintError::MalformedKey));
        assert!(
            !primary_prefix(&NodeId::new("n1").unwrap())
                .starts_with(&primary_prefix(&NodeId::new("n12").unwrap()))
        );
    }

    #[test]
    fn records_round_trip_and_unknown_versions_are_refused() {
        let record = HintRecord {
            created_micros: 5,
            object: crate::core::version::DvvSet::empty(),
            coordinator: None,
        };
        assert_eq!(decode_record(&encode_record(&record)), Ok(record));
        assert!(matches!(
            decode_record(&[7]),
            Err(HintError::UnsupportedVersion { found: 7 })
        ));
    }
}
