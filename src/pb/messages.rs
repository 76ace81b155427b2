//! The messages of Riak's Protocol Buffers API that dynkv serves, written for dynkv from the
//! documented message codes, field numbers and types (proto2: `required` and `optional`
//! fields, `repeated` lists). Unknown fields are skipped by prost, as protobuf requires.

use prost::Message;

/// Message codes: the byte after the length of every frame.
pub mod code {
    pub const ERROR_RESP: u8 = 0;
    pub const PING_REQ: u8 = 1;
    pub const PING_RESP: u8 = 2;
    pub const GET_CLIENT_ID_REQ: u8 = 3;
    pub const GET_CLIENT_ID_RESP: u8 = 4;
    pub const SET_CLIENT_ID_REQ: u8 = 5;
    pub const SET_CLIENT_ID_RESP: u8 = 6;
    pub const GET_SERVER_INFO_REQ: u8 = 7;
    pub const GET_SERVER_INFO_RESP: u8 = 8;
    pub const GET_REQ: u8 = 9;
    pub const GET_RESP: u8 = 10;
    pub const PUT_REQ: u8 = 11;
    pub const PUT_RESP: u8 = 12;
    pub const DEL_REQ: u8 = 13;
    pub const DEL_RESP: u8 = 14;
    pub const LIST_BUCKETS_REQ: u8 = 15;
    pub const LIST_BUCKETS_RESP: u8 = 16;
    pub const LIST_KEYS_REQ: u8 = 17;
    pub const LIST_KEYS_RESP: u8 = 18;
    pub const GET_BUCKET_REQ: u8 = 19;
    pub const GET_BUCKET_RESP: u8 = 20;
    pub const SET_BUCKET_REQ: u8 = 21;
    pub const SET_BUCKET_RESP: u8 = 22;
    pub const RESET_BUCKET_REQ: u8 = 29;
    pub const RESET_BUCKET_RESP: u8 = 30;
    pub const GET_BUCKET_TYPE_REQ: u8 = 31;
    pub const SET_BUCKET_TYPE_REQ: u8 = 32;
    pub const AUTH_REQ: u8 = 253;
    pub const AUTH_RESP: u8 = 254;
    pub const START_TLS: u8 = 255;

    /// What a request code asks for that dynkv does not serve, for the error's message.
    pub fn unserved(code: u8) -> Option<&'static str> {
        Some(match code {
            23 => "MapReduce",
            25 => "secondary indexes (2i)",
            27 => "Riak Search",
            33 => "preference lists (RpbGetBucketKeyPreflistReq)",
            50..=53 => "counters",
            54..=60 => "Riak Search (Yokozuna)",
            70..=71 => "coverage queries",
            80..=83 => "Riak data types",
            90..=104 => "Riak TS",
            _ => return None,
        })
    }
}

/// Riak's symbolic quorum values, as they travel in `uint32` fields.
pub mod quorum {
    pub const ONE: u32 = u32::MAX - 1;
    pub const QUORUM: u32 = u32::MAX - 2;
    pub const ALL: u32 = u32::MAX - 3;
    pub const DEFAULT: u32 = u32::MAX - 4;
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbErrorResp {
    #[prost(bytes = "vec", required, tag = "1")]
    pub errmsg: Vec<u8>,
    #[prost(uint32, required, tag = "2")]
    pub errcode: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbGetClientIdResp {
    #[prost(bytes = "vec", required, tag = "1")]
    pub client_id: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbSetClientIdReq {
    #[prost(bytes = "vec", required, tag = "1")]
    pub client_id: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbGetServerInfoResp {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub node: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub server_version: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbPair {
    #[prost(bytes = "vec", required, tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub value: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbLink {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub tag: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbContent {
    #[prost(bytes = "vec", required, tag = "1")]
    pub value: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub content_type: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub charset: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub content_encoding: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub vtag: Option<Vec<u8>>,
    #[prost(message, repeated, tag = "6")]
    pub links: Vec<RpbLink>,
    #[prost(uint32, optional, tag = "7")]
    pub last_mod: Option<u32>,
    #[prost(uint32, optional, tag = "8")]
    pub last_mod_usecs: Option<u32>,
    #[prost(message, repeated, tag = "9")]
    pub usermeta: Vec<RpbPair>,
    #[prost(message, repeated, tag = "10")]
    pub indexes: Vec<RpbPair>,
    #[prost(bool, optional, tag = "11")]
    pub deleted: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbGetReq {
    #[prost(bytes = "vec", required, tag = "1")]
    pub bucket: Vec<u8>,
    #[prost(bytes = "vec", required, tag = "2")]
    pub key: Vec<u8>,
    #[prost(uint32, optional, tag = "3")]
    pub r: Option<u32>,
    #[prost(uint32, optional, tag = "4")]
    pub pr: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub basic_quorum: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub notfound_ok: Option<bool>,
    #[prost(bytes = "vec", optional, tag = "7")]
    pub if_modified: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "8")]
    pub head: Option<bool>,
    #[prost(bool, optional, tag = "9")]
    pub deletedvclock: Option<bool>,
    #[prost(uint32, optional, tag = "10")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "11")]
    pub sloppy_quorum: Option<bool>,
    #[prost(uint32, optional, tag = "12")]
    pub n_val: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "13")]
    pub r#type: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbGetResp {
    #[prost(message, repeated, tag = "1")]
    pub content: Vec<RpbContent>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub vclock: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    pub unchanged: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbPutReq {
    #[prost(bytes = "vec", required, tag = "1")]
    pub bucket: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub vclock: Option<Vec<u8>>,
    #[prost(message, required, tag = "4")]
    pub content: RpbContent,
    #[prost(uint32, optional, tag = "5")]
    pub w: Option<u32>,
    #[prost(uint32, optional, tag = "6")]
    pub dw: Option<u32>,
    #[prost(bool, optional, tag = "7")]
    pub return_body: Option<bool>,
    #[prost(uint32, optional, tag = "8")]
    pub pw: Option<u32>,
    #[prost(bool, optional, tag = "9")]
    pub if_not_modified: Option<bool>,
    #[prost(bool, optional, tag = "10")]
    pub if_none_match: Option<bool>,
    #[prost(bool, optional, tag = "11")]
    pub return_head: Option<bool>,
    #[prost(uint32, optional, tag = "12")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "13")]
    pub asis: Option<bool>,
    #[prost(bool, optional, tag = "14")]
    pub sloppy_quorum: Option<bool>,
    #[prost(uint32, optional, tag = "15")]
    pub n_val: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "16")]
    pub r#type: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbPutResp {
    #[prost(message, repeated, tag = "1")]
    pub content: Vec<RpbContent>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub vclock: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub key: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbDelReq {
    #[prost(bytes = "vec", required, tag = "1")]
    pub bucket: Vec<u8>,
    #[prost(bytes = "vec", required, tag = "2")]
    pub key: Vec<u8>,
    #[prost(uint32, optional, tag = "3")]
    pub rw: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub vclock: Option<Vec<u8>>,
    #[prost(uint32, optional, tag = "5")]
    pub r: Option<u32>,
    #[prost(uint32, optional, tag = "6")]
    pub w: Option<u32>,
    #[prost(uint32, optional, tag = "7")]
    pub pr: Option<u32>,
    #[prost(uint32, optional, tag = "8")]
    pub pw: Option<u32>,
    #[prost(uint32, optional, tag = "9")]
    pub dw: Option<u32>,
    #[prost(uint32, optional, tag = "10")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "11")]
    pub sloppy_quorum: Option<bool>,
    #[prost(uint32, optional, tag = "12")]
    pub n_val: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "13")]
    pub r#type: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbListBucketsReq {
    #[prost(uint32, optional, tag = "1")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub stream: Option<bool>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub r#type: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbListBucketsResp {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub buckets: Vec<Vec<u8>>,
    #[prost(bool, optional, tag = "2")]
    pub done: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbListKeysReq {
    #[prost(bytes = "vec", required, tag = "1")]
    pub bucket: Vec<u8>,
    #[prost(uint32, optional, tag = "2")]
    pub timeout: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub r#type: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbListKeysResp {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub keys: Vec<Vec<u8>>,
    #[prost(bool, optional, tag = "2")]
    pub done: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbGetBucketReq {
    #[prost(bytes = "vec", required, tag = "1")]
    pub bucket: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub r#type: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbGetBucketResp {
    #[prost(message, required, tag = "1")]
    pub props: RpbBucketProps,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbSetBucketReq {
    #[prost(bytes = "vec", required, tag = "1")]
    pub bucket: Vec<u8>,
    #[prost(message, required, tag = "2")]
    pub props: RpbBucketProps,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub r#type: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbResetBucketReq {
    #[prost(bytes = "vec", required, tag = "1")]
    pub bucket: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub r#type: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbGetBucketTypeReq {
    #[prost(bytes = "vec", required, tag = "1")]
    pub r#type: Vec<u8>,
}

/// The bucket properties dynkv has; the others of Riak's message (hooks, key and link
/// functions, vclock pruning, backend, search, replication, data types) are skipped when
/// received and never sent.
#[derive(Clone, PartialEq, Message)]
pub struct RpbBucketProps {
    #[prost(uint32, optional, tag = "1")]
    pub n_val: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub allow_mult: Option<bool>,
    #[prost(bool, optional, tag = "3")]
    pub last_write_wins: Option<bool>,
    #[prost(uint32, optional, tag = "14")]
    pub pr: Option<u32>,
    #[prost(uint32, optional, tag = "15")]
    pub r: Option<u32>,
    #[prost(uint32, optional, tag = "16")]
    pub w: Option<u32>,
    #[prost(uint32, optional, tag = "17")]
    pub pw: Option<u32>,
    #[prost(uint32, optional, tag = "18")]
    pub dw: Option<u32>,
    #[prost(uint32, optional, tag = "19")]
    pub rw: Option<u32>,
    #[prost(bool, optional, tag = "20")]
    pub basic_quorum: Option<bool>,
    #[prost(bool, optional, tag = "21")]
    pub notfound_ok: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpbAuthReq {
    #[prost(bytes = "vec", required, tag = "1")]
    pub user: Vec<u8>,
    #[prost(bytes = "vec", required, tag = "2")]
    pub password: Vec<u8>,
}
