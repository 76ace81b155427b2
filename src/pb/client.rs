//! A minimal client of Riak's Protocol Buffers API, one request at a time on one connection,
//! as Riak's client libraries use it: for `dynkv bench --protocol pb` and tests.

use super::messages::*;
use crate::core::quorum::Quorum;
use prost::Message;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest answer frame read (bounds the allocation for a length read from the network).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PbClientError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the node answered: {0}")]
    Refused(String),
    #[error("unexpected answer: message code {found}, expected {expected}")]
    Unexpected { found: u8, expected: u8 },
    #[error("an answer of {0} bytes is over the client's limit")]
    TooLarge(usize),
    #[error("the answer cannot be decoded: {0}")]
    Undecodable(#[from] prost::DecodeError),
}

pub struct PbClient {
    stream: TcpStream,
}

/// A quorum as Riak's clients send it.
fn quorum_field(level: Quorum) -> Option<u32> {
    match level {
        Quorum::Default => None,
        Quorum::One => Some(quorum::ONE),
        Quorum::Quorum => Some(quorum::QUORUM),
        Quorum::All => Some(quorum::ALL),
        Quorum::Count(count) => Some(count),
    }
}

impl PbClient {
    pub async fn connect(address: SocketAddr) -> Result<PbClient, PbClientError> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(PbClient { stream })
    }

    /// Sends one request and reads its answer, which must have code `expected`.
    async fn call(
        &mut self,
        code: u8,
        body: &[u8],
        expected: u8,
    ) -> Result<Vec<u8>, PbClientError> {
        let mut frame = Vec::with_capacity(body.len() + 5);
        frame.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
        frame.push(code);
        frame.extend_from_slice(body);
        self.stream.write_all(&frame).await?;
        let mut header = [0u8; 4];
        self.stream.read_exact(&mut header).await?;
        let length = u32::from_be_bytes(header) as usize;
        if length == 0 || length > MAX_ANSWER_BYTES {
            return Err(PbClientError::TooLarge(length));
        }
        let mut answer = vec![0u8; length];
        self.stream.read_exact(&mut answer).await?;
        let body = answer.split_off(1);
        match answer[0] {
            found if found == expected => Ok(body),
            code::ERROR_RESP => Err(PbClientError::Refused(
                String::from_utf8_lossy(&RpbErrorResp::decode(body.as_slice())?.errmsg)
                    .into_owned(),
            )),
            found => Err(PbClientError::Unexpected { found, expected }),
        }
    }

    pub async fn ping(&mut self) -> Result<(), PbClientError> {
        self.call(code::PING_REQ, &[], code::PING_RESP).await?;
        Ok(())
    }

    /// The key's vclock if it has a live value.
    pub async fn get(
        &mut self,
        bucket: &[u8],
        key: &[u8],
        r: Quorum,
    ) -> Result<Option<Vec<u8>>, PbClientError> {
        let request = RpbGetReq {
            bucket: bucket.to_vec(),
            key: key.to_vec(),
            r: quorum_field(r),
            ..RpbGetReq::default()
        };
        let body = self
            .call(code::GET_REQ, &request.encode_to_vec(), code::GET_RESP)
            .await?;
        let answer = RpbGetResp::decode(body.as_slice())?;
        Ok((!answer.content.is_empty())
            .then_some(answer.vclock)
            .flatten())
    }

    /// Writes `value` with `vclock` (if any); returns the new vclock (asked for with
    /// `return_head`, so no value comes back).
    pub async fn put(
        &mut self,
        bucket: &[u8],
        key: &[u8],
        vclock: Option<Vec<u8>>,
        value: Vec<u8>,
        w: Quorum,
        dw: Quorum,
    ) -> Result<Option<Vec<u8>>, PbClientError> {
        let request = RpbPutReq {
            bucket: bucket.to_vec(),
            key: Some(key.to_vec()),
            vclock,
            content: RpbContent {
                value,
                ..RpbContent::default()
            },
            w: quorum_field(w),
            dw: quorum_field(dw),
            return_head: Some(true),
            ..RpbPutReq::default()
        };
        let body = self
            .call(code::PUT_REQ, &request.encode_to_vec(), code::PUT_RESP)
            .await?;
        Ok(RpbPutResp::decode(body.as_slice())?.vclock)
    }
}
