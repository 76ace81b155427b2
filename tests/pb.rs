//! Riak's Protocol Buffers API on real `dynkv` processes: framing, the key/value
//! messages, streamed listing, and bad input (frame lengths, undecodable messages, what is
//! not served) answered with `RpbErrorResp` while the node keeps serving. The official Riak
//! Python client runs against it in `tests/riak_client/run.sh` (by `.ci/run`).

mod common;

use common::process::{DevCluster, make_pki, pb_address, server_command, start_servers};
use dynkv::pb::messages::*;
use prost::Message;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

struct Connection(TcpStream);

impl Connection {
    fn open(cluster: &DevCluster, node: u16) -> Connection {
        let address = format!("127.0.0.1:{}", cluster.base_port + 300 + node - 1);
        let stream = TcpStream::connect(address).expect("the PB port accepts");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Connection(stream)
    }

    fn send_raw(&mut self, code: u8, body: &[u8]) {
        let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        frame.push(code);
        frame.extend_from_slice(body);
        self.0.write_all(&frame).unwrap();
    }

    fn send(&mut self, code: u8, message: &impl Message) {
        self.send_raw(code, &message.encode_to_vec());
    }

    /// The next frame: (code, body); `None` once the node closed the connection.
    fn receive(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 4];
        self.0.read_exact(&mut header).ok()?;
        let mut frame = vec![0u8; u32::from_be_bytes(header) as usize];
        self.0.read_exact(&mut frame).ok()?;
        let body = frame.split_off(1);
        Some((frame[0], body))
    }

    fn call(&mut self, code: u8, message: &impl Message) -> (u8, Vec<u8>) {
        self.send(code, message);
        self.receive().expect("an answer")
    }
}

fn error_text(code: u8, body: &[u8]) -> String {
    assert_eq!(code, code::ERROR_RESP, "expected an error");
    String::from_utf8(RpbErrorResp::decode(body).unwrap().errmsg).unwrap()
}

fn put(bucket: &str, key: &str, value: &str) -> RpbPutReq {
    RpbPutReq {
        bucket: bucket.into(),
        key: Some(key.into()),
        content: RpbContent {
            value: value.into(),
            content_type: Some(b"text/plain".to_vec()),
            ..RpbContent::default()
        },
        return_body: Some(true),
        ..RpbPutReq::default()
    }
}

#[test]
fn the_key_value_messages_and_bad_input_over_protocol_buffers() {
    let cluster = DevCluster::start(3, 0);
    let mut pb = Connection::open(&cluster, 1);

    // Ping and server info (Riak clients ask it first, for feature detection).
    pb.send_raw(code::PING_REQ, &[]);
    assert_eq!(pb.receive().unwrap().0, code::PING_RESP);
    pb.send_raw(code::GET_SERVER_INFO_REQ, &[]);
    let (answer, body) = pb.receive().unwrap();
    assert_eq!(answer, code::GET_SERVER_INFO_RESP);
    let info = RpbGetServerInfoResp::decode(body.as_slice()).unwrap();
    assert_eq!(info.node.as_deref(), Some(b"n1".as_slice()));
    let version = String::from_utf8(info.server_version.unwrap()).unwrap();
    assert!(version.split('.').all(|part| part.parse::<u32>().is_ok()));

    // Put with return_body, get it back through another node, siblings from a blind write.
    let (answer, body) = pb.call(code::PUT_REQ, &put("pb", "k", "first"));
    assert_eq!(answer, code::PUT_RESP);
    let stored = RpbPutResp::decode(body.as_slice()).unwrap();
    assert_eq!(stored.content[0].value, b"first");
    assert!(stored.vclock.is_some());
    let mut other = Connection::open(&cluster, 2);
    let get = RpbGetReq {
        bucket: b"pb".to_vec(),
        key: b"k".to_vec(),
        r: Some(quorum::ALL),
        ..RpbGetReq::default()
    };
    let (answer, body) = other.call(code::GET_REQ, &get);
    assert_eq!(answer, code::GET_RESP);
    let fetched = RpbGetResp::decode(body.as_slice()).unwrap();
    assert_eq!(fetched.content.len(), 1);
    assert_eq!(fetched.content[0].value, b"first");
    assert_eq!(fetched.vclock, stored.vclock);
    // A write with the vclock supersedes; unchanged is answered for a current if_modified.
    let mut update = put("pb", "k", "second");
    update.vclock = fetched.vclock.clone();
    let (answer, _) = other.call(code::PUT_REQ, &update);
    assert_eq!(answer, code::PUT_RESP);
    let (_, body) = pb.call(code::GET_REQ, &get);
    let fetched = RpbGetResp::decode(body.as_slice()).unwrap();
    let values: Vec<&[u8]> = fetched.content.iter().map(|c| c.value.as_slice()).collect();
    assert_eq!(values, vec![b"second".as_slice()]);
    let unchanged = RpbGetReq {
        if_modified: fetched.vclock.clone(),
        ..get.clone()
    };
    let (_, body) = pb.call(code::GET_REQ, &unchanged);
    assert_eq!(
        RpbGetResp::decode(body.as_slice()).unwrap().unchanged,
        Some(true)
    );
    // A server-assigned key comes back in the answer.
    let mut assigned = put("pb", "", "anywhere");
    assigned.key = None;
    let (_, body) = pb.call(code::PUT_REQ, &assigned);
    let key = RpbPutResp::decode(body.as_slice()).unwrap().key.unwrap();
    assert!(!key.is_empty());

    // Delete with the vclock; a get then finds nothing (with deletedvclock, the tombstone's).
    let delete = RpbDelReq {
        bucket: b"pb".to_vec(),
        key: b"k".to_vec(),
        vclock: fetched.vclock,
        ..RpbDelReq::default()
    };
    let (answer, _) = pb.call(code::DEL_REQ, &delete);
    assert_eq!(answer, code::DEL_RESP);
    let deleted = RpbGetReq {
        deletedvclock: Some(true),
        ..get.clone()
    };
    let (_, body) = pb.call(code::GET_REQ, &deleted);
    let fetched = RpbGetResp::decode(body.as_slice()).unwrap();
    assert!(fetched.content.is_empty());
    assert!(
        fetched.vclock.is_some(),
        "a tombstone's vclock was asked for"
    );

    // List keys: streamed frames, the last one done.
    for key in ["a", "b", "c"] {
        pb.call(code::PUT_REQ, &put("listed", key, "v"));
    }
    pb.send(
        code::LIST_KEYS_REQ,
        &RpbListKeysReq {
            bucket: b"listed".to_vec(),
            ..RpbListKeysReq::default()
        },
    );
    let mut keys = Vec::new();
    loop {
        let (answer, body) = pb.receive().unwrap();
        assert_eq!(answer, code::LIST_KEYS_RESP);
        let page = RpbListKeysResp::decode(body.as_slice()).unwrap();
        keys.extend(page.keys);
        if page.done == Some(true) {
            break;
        }
    }
    keys.sort();
    assert_eq!(keys, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);

    // Bad input: each gets an error naming the problem, and the connection serves on.
    pb.send_raw(code::GET_REQ, &[0xff, 0xff, 0xff]);
    let (answer, body) = pb.receive().unwrap();
    assert!(error_text(answer, &body).contains("cannot be decoded"));
    pb.send_raw(25, &[]);
    let (answer, body) = pb.receive().unwrap();
    assert!(error_text(answer, &body).contains("secondary indexes (2i) is not served"));
    pb.send_raw(200, &[]);
    let (answer, body) = pb.receive().unwrap();
    assert!(error_text(answer, &body).contains("unknown message code 200"));
    let typed = RpbGetReq {
        r#type: Some(b"maps".to_vec()),
        ..get.clone()
    };
    let (answer, body) = pb.call(code::GET_REQ, &typed);
    assert!(error_text(answer, &body).contains("bucket type \"maps\" is not served"));
    pb.send_raw(code::START_TLS, &[]);
    let (answer, body) = pb.receive().unwrap();
    assert!(error_text(answer, &body).contains("pb_tls"));
    pb.send_raw(code::AUTH_REQ, &RpbAuthReq::default().encode_to_vec());
    let (answer, body) = pb.receive().unwrap();
    assert!(error_text(answer, &body).contains("authentication is not configured"));
    pb.send_raw(code::PING_REQ, &[]);
    assert_eq!(pb.receive().unwrap().0, code::PING_RESP);
    // A frame longer than limits.max_frame_bytes is refused before it is read, and the
    // connection closed; the node serves new ones.
    pb.0.write_all(&u32::MAX.to_be_bytes()).unwrap();
    let (answer, body) = pb.receive().unwrap();
    assert!(error_text(answer, &body).contains("limits.max_frame_bytes"));
    assert!(pb.receive().is_none(), "the connection stays open");
    let mut again = Connection::open(&cluster, 1);
    again.send_raw(code::PING_REQ, &[]);
    assert_eq!(again.receive().unwrap().0, code::PING_RESP);
}

/// With `pb_tls` and a token: nothing but ping and server info before `RpbAuthReq`;
/// `RpbStartTls` upgrades the connection (verified against the cluster CA, the node's
/// certificate naming 127.0.0.1), and the token as the password authenticates it.
#[test]
fn start_tls_and_authentication_over_protocol_buffers() {
    dynkv::net::tls::install_crypto_provider();
    let root = tempfile::tempdir().unwrap();
    let pki = make_pki(&root.path().join("pki"), "n1");
    let (_server, base) = start_servers(1, |base| {
        let mut command = server_command(&pki, &root.path().join("data"), base);
        command.args(["--pb-tls", "true", "--http-token", "pb-secret"]);
        vec![(command, pb_address(base))]
    });
    let address = format!("127.0.0.1:{}", base + 300);
    let stream = (0..200)
        .find_map(|_| {
            TcpStream::connect(&address).ok().or_else(|| {
                std::thread::sleep(Duration::from_millis(100));
                None
            })
        })
        .expect("the PB port opens");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut plain = Connection(stream);
    plain.send_raw(code::PING_REQ, &[]);
    assert_eq!(plain.receive().unwrap().0, code::PING_RESP);
    let get = RpbGetReq {
        bucket: b"b".to_vec(),
        key: b"k".to_vec(),
        ..RpbGetReq::default()
    };
    let (answer, body) = plain.call(code::GET_REQ, &get);
    assert!(error_text(answer, &body).contains("requires authentication"));
    plain.send_raw(code::START_TLS, &[]);
    assert_eq!(plain.receive().unwrap().0, code::START_TLS);

    let ca = std::fs::read_to_string(pki.join("ca.pem")).unwrap();
    let config = std::sync::Arc::new(dynkv::net::tls::client_config(&ca).unwrap());
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = rustls::ClientConnection::new(config, name).unwrap();
    let mut secure = rustls::StreamOwned::new(tls, plain.0);
    let mut call = |code: u8, body: Vec<u8>| -> (u8, Vec<u8>) {
        let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        frame.push(code);
        frame.extend_from_slice(&body);
        secure.write_all(&frame).unwrap();
        let mut header = [0u8; 4];
        secure.read_exact(&mut header).unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(header) as usize];
        secure.read_exact(&mut frame).unwrap();
        let body = frame.split_off(1);
        (frame[0], body)
    };
    let wrong = RpbAuthReq {
        user: b"anyone".to_vec(),
        password: b"guess".to_vec(),
    };
    let (answer, body) = call(code::AUTH_REQ, wrong.encode_to_vec());
    assert!(error_text(answer, &body).contains("authentication failed"));
    let (answer, body) = call(code::GET_REQ, get.encode_to_vec());
    assert!(error_text(answer, &body).contains("requires authentication"));
    let right = RpbAuthReq {
        user: b"anyone".to_vec(),
        password: b"pb-secret".to_vec(),
    };
    assert_eq!(
        call(code::AUTH_REQ, right.encode_to_vec()).0,
        code::AUTH_RESP
    );
    let (answer, body) = call(code::GET_REQ, get.encode_to_vec());
    assert_eq!(answer, code::GET_RESP, "{body:?}");
    assert!(
        RpbGetResp::decode(body.as_slice())
            .unwrap()
            .content
            .is_empty()
    );
    let (answer, body) = call(code::START_TLS, Vec::new());
    assert!(error_text(answer, &body).contains("already TLS"));
}

/// PB frames take their bytes from the client-facing listeners' budget
/// (`limits.max_in_flight_bytes`) before they are read: while a half-sent frame holds all of
/// it, a large put waits for the request timeout, is answered with an error naming the
/// limit and skipped unread (the connection stays in step: a ping after it is answered), and
/// once the budget is free again the same put is stored.
#[test]
fn protocol_buffers_frames_wait_for_the_shared_byte_budget_and_are_refused_naming_it() {
    let root = tempfile::tempdir().unwrap();
    let pki = make_pki(&root.path().join("pki"), "n1");
    let config = root.path().join("limits.toml");
    std::fs::write(
        &config,
        "request_timeout_ms = 500\n[limits]\nmax_value_bytes = 524288\nmax_object_bytes = 1048576\n\
         max_merged_object_bytes = 1048576\nmax_frame_bytes = 2097152\nmax_in_flight_bytes = 2097152\n",
    )
    .unwrap();
    let (_server, base) = start_servers(2, |base| {
        let mut command = server_command(&pki, &root.path().join("data"), base);
        command.arg("--config").arg(&config);
        vec![(command, pb_address(base))]
    });
    let connect = || {
        let stream = TcpStream::connect(pb_address(base)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Connection(stream)
    };
    // A frame of the whole budget, announced and left half-sent.
    let mut hog = connect();
    let announced: u32 = 2 * 1024 * 1024;
    let mut head = announced.to_be_bytes().to_vec();
    head.push(code::PUT_REQ);
    hog.0.write_all(&head).unwrap();
    hog.0.write_all(&[0u8; 100]).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let mut client = connect();
    let large = put("b", "large", &"v".repeat(500 * 1024));
    let (answer, body) = client.call(code::PUT_REQ, &large);
    let message = error_text(answer, &body);
    assert!(message.contains("limits.max_in_flight_bytes"), "{message}");
    client.send_raw(code::PING_REQ, &[]);
    assert_eq!(client.receive().unwrap().0, code::PING_RESP);

    drop(hog);
    std::thread::sleep(Duration::from_millis(300));
    let (answer, _) = client.call(code::PUT_REQ, &large);
    assert_eq!(answer, code::PUT_RESP, "stored once the budget is free");
}
