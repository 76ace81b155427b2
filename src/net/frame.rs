//! The versioned wire frame shared by the QUIC and in-memory transports.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! +-------+---------+------+------------+-------------+-----------------+
//! | magic | version | kind | request id | body length | body            |
//! | "DK"  | u8 = 1  | u8   | u64        | u32         | MessagePack ... |
//! +-------+---------+------+------------+-------------+-----------------+
//!   2 B     1 B       1 B    8 B          4 B           body length B
//! ```
//!
//! The header is checked field by field before the body is read: a wrong magic means the peer
//! does not speak this protocol, a wrong version means it speaks another revision of it, and
//! a body length above the configured limit is refused before a single byte is allocated for
//! it. Bodies are MessagePack with structs encoded as maps, so a later version can add fields
//! (with `#[serde(default)]`) without a new wire version.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"DK";
/// The only wire version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_BYTES: usize = 16;
/// How much of a body is reserved up front; larger bodies grow as their bytes arrive, so a
/// peer that announces a large length but sends little costs little.
const INITIAL_BODY_CAPACITY: usize = 64 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A request; the body is the caller's message.
    Request,
    /// The answer to the request with the same id; the body is the handler's message.
    Response,
    /// The request with the same id could not be answered; the body is a UTF-8 reason.
    Error,
}

impl FrameKind {
    fn to_byte(self) -> u8 {
        match self {
            FrameKind::Request => 0,
            FrameKind::Response => 1,
            FrameKind::Error => 2,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, FrameError> {
        match byte {
            0 => Ok(FrameKind::Request),
            1 => Ok(FrameKind::Response),
            2 => Ok(FrameKind::Error),
            found => Err(FrameError::UnknownKind { found }),
        }
    }
}

/// Why a frame could not be encoded, read or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {found:02x?}; the peer does not speak the dynkv protocol")]
    BadMagic { found: [u8; 2] },
    #[error("unsupported wire version {found}; this build speaks version {WIRE_VERSION}")]
    UnsupportedVersion { found: u8 },
    #[error("unknown frame kind {found}")]
    UnknownKind { found: u8 },
    #[error("frame body of {length} bytes exceeds the limit of {limit} bytes")]
    TooLarge { length: u64, limit: u32 },
    #[error("frame truncated: expected {expected} bytes, got {received}")]
    Truncated { expected: u64, received: u64 },
    #[error("frame body could not be decoded: {reason}")]
    Decode { reason: String },
    #[error("message could not be encoded: {reason}")]
    Encode { reason: String },
    /// The underlying stream failed (connection lost, stream reset).
    #[error("stream failed while reading a frame: {reason}")]
    Io { reason: String },
}

impl FrameError {
    /// True when the bytes themselves were wrong (as opposed to the stream failing): the peer
    /// broke the protocol and its connection should be closed.
    pub fn is_protocol_violation(&self) -> bool {
        !matches!(self, FrameError::Io { .. } | FrameError::Encode { .. })
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub request_id: u64,
    pub body_bytes: u32,
}

/// A whole frame whose body has not been decoded yet (it is decoded by whoever knows its type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub request_id: u64,
    pub body: Bytes,
}

/// Bytes an encoded frame's buffer starts with.
const INITIAL_FRAME_CAPACITY: usize = 512;

/// Encodes `body` as MessagePack into a complete frame (header included).
///
/// Fails with [`FrameError::TooLarge`] when the body exceeds `max_frame_bytes`, so an oversize
/// message is refused by its sender instead of killing the receiver's connection.
pub fn encode_frame<T: Serialize + ?Sized>(
    kind: FrameKind,
    request_id: u64,
    body: &T,
    max_frame_bytes: u32,
) -> Result<Bytes, FrameError> {
    // Room for the usual message (a get, or a put of a small value is 100 to 300 bytes), so
    // that encoding it does not grow and copy the buffer twice on the way.
    let mut buffer = BytesMut::with_capacity(INITIAL_FRAME_CAPACITY).writer();
    buffer.get_mut().put_slice(&[0u8; HEADER_BYTES]);
    rmp_serde::encode::write_named(&mut buffer, body).map_err(|error| FrameError::Encode {
        reason: error.to_string(),
    })?;
    let mut buffer = buffer.into_inner();
    let body_length = (buffer.len() - HEADER_BYTES) as u64;
    if body_length > u64::from(max_frame_bytes) {
        return Err(FrameError::TooLarge {
            length: body_length,
            limit: max_frame_bytes,
        });
    }
    let header = encode_header(FrameHeader {
        kind,
        request_id,
        // Fits: checked against a u32 limit just above.
        body_bytes: body_length as u32,
    });
    buffer[..HEADER_BYTES].copy_from_slice(&header);
    Ok(buffer.freeze())
}

/// Encodes an error frame answering `request_id`; the reason is cut to keep it small.
pub fn encode_error_frame(request_id: u64, reason: &str) -> Bytes {
    const MAX_REASON_BYTES: usize = 1024;
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let body = &reason.as_bytes()[..end];
    let mut buffer = BytesMut::with_capacity(HEADER_BYTES + body.len());
    buffer.put_slice(&encode_header(FrameHeader {
        kind: FrameKind::Error,
        request_id,
        body_bytes: body.len() as u32,
    }));
    buffer.put_slice(body);
    buffer.freeze()
}

/// The header bytes for `header`.
pub fn encode_header(header: FrameHeader) -> [u8; HEADER_BYTES] {
    let mut bytes = [0u8; HEADER_BYTES];
    bytes[0..2].copy_from_slice(&MAGIC);
    bytes[2] = WIRE_VERSION;
    bytes[3] = header.kind.to_byte();
    bytes[4..12].copy_from_slice(&header.request_id.to_be_bytes());
    bytes[12..16].copy_from_slice(&header.body_bytes.to_be_bytes());
    bytes
}

/// Parses and checks a header: magic, version, kind, and body length against the limit.
pub fn decode_header(
    bytes: &[u8; HEADER_BYTES],
    max_frame_bytes: u32,
) -> Result<FrameHeader, FrameError> {
    let magic = [bytes[0], bytes[1]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    if bytes[2] != WIRE_VERSION {
        return Err(FrameError::UnsupportedVersion { found: bytes[2] });
    }
    let kind = FrameKind::from_byte(bytes[3])?;
    let mut request_id = [0u8; 8];
    request_id.copy_from_slice(&bytes[4..12]);
    let mut body_bytes = [0u8; 4];
    body_bytes.copy_from_slice(&bytes[12..16]);
    let body_bytes = u32::from_be_bytes(body_bytes);
    if body_bytes > max_frame_bytes {
        return Err(FrameError::TooLarge {
            length: u64::from(body_bytes),
            limit: max_frame_bytes,
        });
    }
    Ok(FrameHeader {
        kind,
        request_id: u64::from_be_bytes(request_id),
        body_bytes,
    })
}

/// Decodes one complete frame held in memory (the in-memory transport's path). Trailing bytes
/// after the announced body are an error, as they would desynchronise a stream.
pub fn decode_frame(bytes: &[u8], max_frame_bytes: u32) -> Result<Frame, FrameError> {
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER_BYTES>() else {
        return Err(FrameError::Truncated {
            expected: HEADER_BYTES as u64,
            received: bytes.len() as u64,
        });
    };
    let header = decode_header(header, max_frame_bytes)?;
    let expected = header.body_bytes as usize;
    if rest.len() < expected {
        return Err(FrameError::Truncated {
            expected: expected as u64,
            received: rest.len() as u64,
        });
    }
    if rest.len() > expected {
        return Err(FrameError::Decode {
            reason: format!("{} bytes after the frame body", rest.len() - expected),
        });
    }
    Ok(Frame {
        kind: header.kind,
        request_id: header.request_id,
        body: Bytes::copy_from_slice(rest),
    })
}

/// Reads the next frame from a stream.
///
/// Returns `Ok(None)` when the stream ends cleanly between frames, and
/// [`FrameError::Truncated`] when it ends inside one. The body length is checked before
/// reading the body, and the body buffer grows only as bytes arrive.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_bytes: u32,
) -> Result<Option<Frame>, FrameError> {
    Ok(read_frame_within(reader, max_frame_bytes, None)
        .await?
        .map(|(frame, _)| frame))
}

/// Bytes of a frame body one permit of a [`read_frame_within`] budget stands for.
pub const BUDGET_UNIT_BYTES: u32 = 1024;

/// [`read_frame`] that first takes, from `budget`, one permit per started
/// [`BUDGET_UNIT_BYTES`] of the body the header announces, and waits for them before reading
/// the body: a server's frames in flight then stay within the budget, and while it is spent
/// the sender's stream is not read (QUIC flow control pushes back). The permits come back
/// with the frame; dropping them returns the bytes to the budget.
///
/// A body of at most [`crate::net::SMALL_FRAME_BYTES`] takes no permit: small requests
/// (reads, pings, small writes) are not held up behind large ones that spent the budget, and
/// the requests in flight bound what they hold (`max_in_flight_requests` × 16 KiB).
pub async fn read_frame_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_bytes: u32,
    budget: Option<&std::sync::Arc<tokio::sync::Semaphore>>,
) -> Result<Option<(Frame, Option<tokio::sync::OwnedSemaphorePermit>)>, FrameError> {
    let mut header = [0u8; HEADER_BYTES];
    let mut filled = 0;
    while filled < HEADER_BYTES {
        let read = reader
            .read(&mut header[filled..])
            .await
            .map_err(|error| FrameError::Io {
                reason: error.to_string(),
            })?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated {
                expected: HEADER_BYTES as u64,
                received: filled as u64,
            });
        }
        filled += read;
    }
    let header = decode_header(&header, max_frame_bytes)?;
    let permit = match budget {
        Some(_) if header.body_bytes as usize <= crate::net::SMALL_FRAME_BYTES => None,
        Some(budget) => Some(
            budget
                .clone()
                .acquire_many_owned(header.body_bytes.div_ceil(BUDGET_UNIT_BYTES))
                .await
                .map_err(|_| FrameError::Io {
                    reason: "the server is shutting down".into(),
                })?,
        ),
        None => None,
    };
    let expected = u64::from(header.body_bytes);
    let mut body = Vec::with_capacity((header.body_bytes as usize).min(INITIAL_BODY_CAPACITY));
    let received = (&mut *reader)
        .take(expected)
        .read_to_end(&mut body)
        .await
        .map_err(|error| FrameError::Io {
            reason: error.to_string(),
        })?;
    if (received as u64) < expected {
        return Err(FrameError::Truncated {
            expected,
            received: received as u64,
        });
    }
    let frame = Frame {
        kind: header.kind,
        request_id: header.request_id,
        body: Bytes::from(body),
    };
    Ok(Some((frame, permit)))
}

/// Encodes a message body on its own (no header), as MessagePack with named fields.
pub fn encode_body<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, FrameError> {
    rmp_serde::to_vec_named(value).map_err(|error| FrameError::Encode {
        reason: error.to_string(),
    })
}

/// Decodes a message body. Untrusted input: every failure is a [`FrameError::Decode`].
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(body).map_err(|error| FrameError::Decode {
        reason: error.to_string(),
    })
}

/// The reason carried by an [`FrameKind::Error`] frame (lossy: it is only shown to humans).
pub fn error_reason(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Message {
        key: String,
        count: u64,
    }

    fn message() -> Message {
        Message {
            key: "k".into(),
            count: 7,
        }
    }

    #[tokio::test]
    async fn frames_round_trip_through_a_stream() {
        let first = encode_frame(FrameKind::Request, 1, &message(), 1024).unwrap();
        let second = encode_frame(FrameKind::Response, u64::MAX, &message(), 1024).unwrap();
        let mut stream: &[u8] = &[first.as_ref(), second.as_ref()].concat();
        let frame = read_frame(&mut stream, 1024).await.unwrap().unwrap();
        assert_eq!((frame.kind, frame.request_id), (FrameKind::Request, 1));
        assert_eq!(decode_body::<Message>(&frame.body).unwrap(), message());
        let frame = read_frame(&mut stream, 1024).await.unwrap().unwrap();
        assert_eq!(
            (frame.kind, frame.request_id),
            (FrameKind::Response, u64::MAX)
        );
        assert_eq!(read_frame(&mut stream, 1024).await, Ok(None));
        assert_eq!(decode_frame(&first, 1024).unwrap().request_id, 1);
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        let good = encode_frame(FrameKind::Request, 3, &message(), 1024).unwrap();
        let mut bad_magic = good.to_vec();
        bad_magic[0] = b'X';
        assert!(matches!(
            read_frame(&mut bad_magic.as_slice(), 1024).await,
            Err(FrameError::BadMagic { found }) if found == *b"XK"
        ));
        let mut bad_version = good.to_vec();
        bad_version[2] = 9;
        assert_eq!(
            read_frame(&mut bad_version.as_slice(), 1024).await,
            Err(FrameError::UnsupportedVersion { found: 9 })
        );
        let mut bad_kind = good.to_vec();
        bad_kind[3] = 7;
        assert_eq!(
            decode_frame(&bad_kind, 1024),
            Err(FrameError::UnknownKind { found: 7 })
        );
    }

    #[tokio::test]
    async fn oversize_length_is_refused_before_reading_the_body() {
        // A header announcing 4 GiB - 1 followed by nothing: the limit check must fire first,
        // not an allocation or a wait for the body.
        let header = encode_header(FrameHeader {
            kind: FrameKind::Request,
            request_id: 1,
            body_bytes: u32::MAX,
        });
        assert_eq!(
            read_frame(&mut header.as_slice(), 1024).await,
            Err(FrameError::TooLarge {
                length: u64::from(u32::MAX),
                limit: 1024
            })
        );
        let big = Message {
            key: "x".repeat(2000),
            count: 0,
        };
        assert!(matches!(
            encode_frame(FrameKind::Request, 1, &big, 1024),
            Err(FrameError::TooLarge { limit: 1024, .. })
        ));
    }

    #[tokio::test]
    async fn truncation_and_garbage_bodies_are_typed_errors() {
        let good = encode_frame(FrameKind::Request, 3, &message(), 1024).unwrap();
        let cut = &good[..good.len() - 2];
        assert!(matches!(
            read_frame(&mut &cut[..], 1024).await,
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            read_frame(&mut &good[..5], 1024).await,
            Err(FrameError::Truncated {
                expected: 16,
                received: 5
            })
        ));
        assert!(matches!(
            decode_frame(cut, 1024),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode_body::<Message>(&[0xc1, 0xff, 0x00]),
            Err(FrameError::Decode { .. })
        ));
        let error = encode_error_frame(5, "boom");
        let frame = decode_frame(&error, 1024).unwrap();
        assert_eq!(frame.kind, FrameKind::Error);
        assert_eq!(error_reason(&frame.body), "boom");
    }
}
