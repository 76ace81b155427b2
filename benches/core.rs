//! Micro-benchmarks of the hot core paths: DVVSet sync, ring claim and preference lists,
//! stored-record and wire-frame codecs. `cargo bench --bench core`.

use criterion::{Criterion, criterion_group, criterion_main};
use dynkv::core::ids::NodeId;
use dynkv::core::object::{Content, StoredObject, decode_record, encode_record};
use dynkv::core::ring::Ring;
use dynkv::core::version::DvvSet;
use dynkv::net::frame::{FrameKind, decode_body, decode_frame, encode_frame};
use dynkv::protocol::{ClientRequest, NewContent, PutOptions};
use std::hint::black_box;

const MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;

fn content(byte: u8) -> Content {
    Content {
        value: vec![byte; 100],
        content_type: "application/octet-stream".into(),
        user_metadata: Vec::new(),
        last_modified_micros: 1_700_000_000_000_000,
        deleted: false,
    }
}

/// A key written through `writes` coordinators in turn, each write carrying the context of
/// the previous one: the common single-value case with a three-actor history.
fn written_object(writes: u64) -> StoredObject {
    let mut object = StoredObject::empty();
    for write in 0..writes {
        let new = DvvSet::new_with_context(&object.join(), content(write as u8));
        object = DvvSet::update(new, &object, 1 + write % 3);
    }
    object
}

fn members(count: usize) -> Vec<NodeId> {
    (1..=count)
        .map(|index| NodeId::new(format!("n{index}")).expect("valid node id"))
        .collect()
}

fn dvvset(c: &mut Criterion) {
    let replica = written_object(9);
    // Another replica that missed the last write, and one with a concurrent sibling.
    let behind = written_object(8);
    let concurrent = DvvSet::update(DvvSet::new(content(200)), &behind, 2);
    c.bench_function("dvvset/sync_equal", |b| {
        b.iter(|| black_box(&replica).sync(black_box(&replica)))
    });
    c.bench_function("dvvset/sync_behind", |b| {
        b.iter(|| black_box(&replica).sync(black_box(&behind)))
    });
    c.bench_function("dvvset/sync_siblings", |b| {
        b.iter(|| black_box(&replica).sync(black_box(&concurrent)))
    });
    c.bench_function("dvvset/update_with_context", |b| {
        b.iter(|| {
            let new = DvvSet::new_with_context(&replica.join(), content(7));
            DvvSet::update(new, black_box(&replica), 1)
        })
    });
}

fn ring(c: &mut Criterion) {
    let three = members(3);
    let four = members(4);
    let ring = Ring::new(64, &three, 3).expect("valid ring");
    c.bench_function("ring/claim_new_64x3", |b| {
        b.iter(|| Ring::new(64, black_box(&three), 3))
    });
    c.bench_function("ring/claim_join_64_3to4", |b| {
        b.iter(|| ring.rebalance(black_box(&four), 3))
    });
    let large = Ring::new(1024, &members(32), 3).expect("valid ring");
    c.bench_function("ring/claim_join_1024_32to33", |b| {
        b.iter(|| large.rebalance(black_box(&members(33)), 3))
    });
    c.bench_function("ring/preference_list_n3", |b| {
        let mut index = 0u64;
        b.iter(|| {
            index += 1;
            let key = index.to_le_bytes();
            let partition = ring.partition_for_key(b"bench", &key);
            ring.preference_list(partition, 3)
        })
    });
}

fn record(c: &mut Criterion) {
    let object = written_object(9);
    let bytes = encode_record(&object);
    c.bench_function("record/encode_100B", |b| {
        b.iter(|| encode_record(black_box(&object)))
    });
    c.bench_function("record/decode_100B", |b| {
        b.iter(|| decode_record(black_box(&bytes)))
    });
}

fn frame(c: &mut Criterion) {
    let request = ClientRequest::Put {
        bucket: b"bench".to_vec(),
        key: b"user12345".to_vec(),
        context: None,
        content: NewContent {
            value: vec![b'x'; 100],
            ..Default::default()
        },
        options: PutOptions::default(),
    };
    let bytes = encode_frame(FrameKind::Request, 42, &request, MAX_FRAME_BYTES).expect("encodes");
    c.bench_function("frame/encode_put_100B", |b| {
        b.iter(|| encode_frame(FrameKind::Request, 42, black_box(&request), MAX_FRAME_BYTES))
    });
    c.bench_function("frame/decode_put_100B", |b| {
        b.iter(|| {
            let frame = decode_frame(black_box(&bytes), MAX_FRAME_BYTES).expect("decodes");
            decode_body::<ClientRequest>(&frame.body)
        })
    });
}

criterion_group!(benches, dvvset, ring, record, frame);
criterion_main!(benches);
