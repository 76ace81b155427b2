//! The storage key: `u16` big-endian bucket length, the bucket, then the key.
//!
//! The length prefix makes the encoding unambiguous (bucket `a` key `bc` differs from bucket
//! `ab` key `c`) and lets a scan split a stored key without a separator byte. It is a disk
//! format: changing it needs a migration.

use super::StorageError;

/// Longest bucket name accepted.
pub const MAX_BUCKET_BYTES: usize = 255;

/// Longest key accepted.
///
/// fjall (lsm-tree) panics on keys longer than `u16::MAX` bytes, and the stored key also
/// carries the 2-byte length prefix and the bucket, so the limit is what is left of 64 KiB
/// after a maximal bucket.
pub const MAX_KEY_BYTES: usize = u16::MAX as usize - LENGTH_PREFIX_BYTES - MAX_BUCKET_BYTES;

const LENGTH_PREFIX_BYTES: usize = 2;

/// Checks the limits and encodes `(bucket, key)` as a storage key.
pub(super) fn encode(bucket: &[u8], key: &[u8]) -> Result<Vec<u8>, StorageError> {
    if bucket.len() > MAX_BUCKET_BYTES {
        return Err(StorageError::BucketTooLong {
            length: bucket.len(),
        });
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StorageError::KeyTooLong { length: key.len() });
    }
    let bucket_length = u16::try_from(bucket.len()).map_err(|_| StorageError::BucketTooLong {
        length: bucket.len(),
    })?;
    let mut encoded = Vec::with_capacity(LENGTH_PREFIX_BYTES + bucket.len() + key.len());
    encoded.extend_from_slice(&bucket_length.to_be_bytes());
    encoded.extend_from_slice(bucket);
    encoded.extend_from_slice(key);
    Ok(encoded)
}

/// Splits a stored key into `(bucket, key)`; `None` if it is shorter than its prefix says.
pub(super) fn decode(stored: &[u8]) -> Option<(&[u8], &[u8])> {
    let (prefix, rest) = stored.split_first_chunk::<LENGTH_PREFIX_BYTES>()?;
    let bucket_length = usize::from(u16::from_be_bytes(*prefix));
    if bucket_length > MAX_BUCKET_BYTES {
        return None;
    }
    rest.split_at_checked(bucket_length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_is_unambiguous() {
        let first = encode(b"a", b"bc").unwrap();
        let second = encode(b"ab", b"c").unwrap();
        assert_ne!(first, second);
        assert_eq!(first, b"\x00\x01abc");
        assert_eq!(decode(&first), Some((&b"a"[..], &b"bc"[..])));
        assert_eq!(decode(&second), Some((&b"ab"[..], &b"c"[..])));
        assert_eq!(
            decode(&encode(b"", b"").unwrap()),
            Some((&b""[..], &b""[..]))
        );
    }

    #[test]
    fn malformed_stored_keys_are_refused() {
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"\x00"), None);
        assert_eq!(decode(b"\x00\x05ab"), None);
        assert_eq!(decode(b"\x01\x00ab"), None);
    }

    #[test]
    fn limits_are_enforced() {
        let longest_bucket = vec![b'b'; MAX_BUCKET_BYTES];
        let longest_key = vec![b'k'; MAX_KEY_BYTES];
        let encoded = encode(&longest_bucket, &longest_key).unwrap();
        assert_eq!(encoded.len(), usize::from(u16::MAX));
        assert!(matches!(
            encode(&[0; MAX_BUCKET_BYTES + 1], b"k"),
            Err(StorageError::BucketTooLong { length: 256 })
        ));
        assert!(matches!(
            encode(b"b", &vec![0; MAX_KEY_BYTES + 1]),
            Err(StorageError::KeyTooLong { length }) if length == MAX_KEY_BYTES + 1
        ));
    }
}
