use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use super::*;

/// Error type for test closures.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("refused by the test")]
struct Refused;

fn open(dir: &Path) -> Store {
    Store::open(dir, StorageConfig::default()).unwrap()
}

/// Which engine a shared test runs on: every test of the suite below runs on both, so the
/// in-memory twin that simulation uses behaves as the fjall store every node uses.
#[derive(Clone, Copy, Debug)]
enum Engine {
    Fjall,
    Memory,
}

/// Where a test's store lives: a temporary directory, or a simulated disk.
enum Disk {
    Fjall(tempfile::TempDir),
    Memory(Arc<MemoryDisk>),
}

impl Disk {
    fn new(kind: Engine) -> Disk {
        match kind {
            Engine::Fjall => Disk::Fjall(tempfile::tempdir().unwrap()),
            Engine::Memory => Disk::Memory(MemoryDisk::new()),
        }
    }

    fn open(&self) -> Store {
        self.open_with(StorageConfig::default())
    }

    fn open_with(&self, config: StorageConfig) -> Store {
        match self {
            Disk::Fjall(dir) => Store::open(dir.path(), config).unwrap(),
            Disk::Memory(disk) => Store::open_in_memory(disk, config).unwrap(),
        }
    }
}

/// Runs a shared test once on fjall and once on the in-memory disk.
macro_rules! on_both_engines {
    ($name:ident; $($runtime:tt)*) => {
        mod $name {
            #[tokio::test($($runtime)*)]
            async fn fjall() {
                super::$name(super::Engine::Fjall).await
            }

            #[tokio::test($($runtime)*)]
            async fn memory() {
                super::$name(super::Engine::Memory).await
            }
        }
    };
}

async fn put(store: &Store, partition: u32, bucket: &[u8], key: &[u8], value: &[u8]) {
    let value = value.to_vec();
    store
        .update(partition, bucket, key, |_| {
            Ok::<_, Refused>((Some(value), ()))
        })
        .await
        .unwrap();
}

async fn round_trip_through_update_and_get(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    assert_eq!(store.get(3, b"b", b"k").unwrap(), None);

    let seen = store
        .update(3, b"b", b"k", |current| {
            Ok::<_, Refused>((Some(b"one".to_vec()), current.map(<[u8]>::to_vec)))
        })
        .await
        .unwrap();
    assert_eq!(seen, None);
    assert_eq!(store.get(3, b"b", b"k").unwrap(), Some(b"one".to_vec()));

    let seen = store
        .update(3, b"b", b"k", |current| {
            Ok::<_, Refused>((Some(b"two".to_vec()), current.map(<[u8]>::to_vec)))
        })
        .await
        .unwrap();
    assert_eq!(seen, Some(b"one".to_vec()));
    assert_eq!(store.get(3, b"b", b"k").unwrap(), Some(b"two".to_vec()));
    // Same key in another partition or bucket is another record.
    assert_eq!(store.get(4, b"b", b"k").unwrap(), None);
    assert_eq!(store.get(3, b"c", b"k").unwrap(), None);
    assert_eq!(store.stats().writes, 2);
    store.close().await.unwrap();
}

async fn update_returning_none_writes_nothing(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    put(&store, 1, b"b", b"k", b"kept").await;
    let output = store
        .update(1, b"b", b"k", |_| Ok::<_, Refused>((None, 42)))
        .await
        .unwrap();
    assert_eq!(output, 42);
    assert_eq!(store.get(1, b"b", b"k").unwrap(), Some(b"kept".to_vec()));
    store
        .update(1, b"b", b"absent", |_| Ok::<_, Refused>((None, ())))
        .await
        .unwrap();
    assert_eq!(store.get(1, b"b", b"absent").unwrap(), None);
    assert_eq!(store.stats().writes, 1);
    store.close().await.unwrap();
}

async fn closure_errors_propagate_and_write_nothing(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    put(&store, 1, b"b", b"k", b"kept").await;
    let outcome: Result<(), _> = store.update(1, b"b", b"k", |_| Err(Refused)).await;
    assert!(matches!(
        outcome,
        Err(UpdateError::Rejected { source: Refused })
    ));
    assert_eq!(store.get(1, b"b", b"k").unwrap(), Some(b"kept".to_vec()));
    assert_eq!(store.stats().writes, 1);
    store.close().await.unwrap();
}

async fn concurrent_updates_of_one_key_never_lose_each_other(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    let mut tasks = Vec::new();
    for writer in 0..200u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .update(7, b"b", b"counter", move |current| {
                    let mut value = current.map(<[u8]>::to_vec).unwrap_or_default();
                    value.push(writer);
                    Ok::<_, Refused>((Some(value), ()))
                })
                .await
                .unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let value = store.get(7, b"b", b"counter").unwrap().unwrap();
    assert_eq!(value.len(), 200);
    assert_eq!(value.iter().copied().collect::<BTreeSet<u8>>().len(), 200);
    store.close().await.unwrap();
}

async fn group_commit_shares_fsyncs_between_writers(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    let mut tasks = Vec::new();
    for writer in 0..500u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let key = writer.to_be_bytes();
            put(&store, writer % 16, b"b", &key, b"value").await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = store.stats();
    println!(
        "group commit: {} writes, {} fsyncs",
        stats.writes, stats.fsyncs
    );
    assert_eq!(stats.writes, 500);
    assert!(stats.fsyncs >= 1);
    assert!(
        stats.fsyncs < stats.writes,
        "every write had its own fsync: {stats:?}"
    );
    for writer in 0..500u32 {
        assert!(
            store
                .get(writer % 16, b"b", &writer.to_be_bytes())
                .unwrap()
                .is_some()
        );
    }
    store.close().await.unwrap();
}

/// Simulation tests run on tokio's paused clock; a write must still complete there.
async fn updates_complete_under_a_paused_clock(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    for index in 0..20u32 {
        put(&store, 0, b"b", &index.to_be_bytes(), b"v").await;
    }
    assert!(store.stats().fsyncs >= 1);
    store.close().await.unwrap();
}

async fn unsynced_writes_are_fsynced_periodically(kind: Engine) {
    let dir = Disk::new(kind);
    let config = StorageConfig {
        sync_writes: false,
        ..StorageConfig::default()
    };
    let store = dir.open_with(config.clone());
    put(&store, 0, b"b", b"k", b"v").await;
    assert_eq!(store.stats().fsyncs, 0, "acknowledged before any fsync");
    tokio::time::sleep(commit::PERIODIC_PERSIST_INTERVAL * 2).await;
    assert_eq!(
        store.stats().fsyncs,
        1,
        "one periodic fsync, none while idle"
    );
    store.close().await.unwrap();
    let reopened = dir.open_with(config);
    assert_eq!(reopened.get(0, b"b", b"k").unwrap(), Some(b"v".to_vec()));
    reopened.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_actor_survive_reopen_and_a_wiped_directory_is_a_new_actor() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let actor = store.actor();
    put(&store, 5, b"b", b"k", b"durable").await;
    store.close().await.unwrap();

    let reopened = open(dir.path());
    assert_eq!(reopened.actor(), actor);
    assert_eq!(
        reopened.get(5, b"b", b"k").unwrap(),
        Some(b"durable".to_vec())
    );
    assert_eq!(reopened.key_count_estimate(), 1);
    reopened.close().await.unwrap();

    std::fs::remove_dir_all(dir.path()).unwrap();
    let wiped = open(dir.path());
    assert_ne!(wiped.actor(), actor);
    assert_eq!(wiped.get(5, b"b", b"k").unwrap(), None);
    wiped.close().await.unwrap();

    let other_dir = tempfile::tempdir().unwrap();
    let other = open(other_dir.path());
    assert_ne!(other.actor(), actor);
    other.close().await.unwrap();
}

/// A simulated crash drops the store and reopens the directory at once.
#[tokio::test(start_paused = true)]
async fn dropping_the_last_handle_releases_the_directory_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3u8 {
        let store = open(dir.path());
        if round > 0 {
            assert_eq!(store.get(0, b"b", b"k").unwrap(), Some(vec![round - 1]));
        }
        put(&store, 0, b"b", b"k", &[round]).await;
        let clone = store.clone();
        drop(store);
        drop(clone);
    }
}

async fn close_with_other_handles_flushes_and_names_them(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    put(&store, 0, b"b", b"k", b"v").await;
    let second_handle = store.clone();
    assert!(matches!(
        store.close().await,
        Err(StorageError::StillShared { other_handles: 1 })
    ));
    second_handle.close().await.unwrap();
    let reopened = dir.open();
    assert_eq!(reopened.get(0, b"b", b"k").unwrap(), Some(b"v".to_vec()));
    reopened.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_metadata_is_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).close().await.unwrap();
    let meta_path = dir.path().join(meta::META_FILE);
    let text = std::fs::read_to_string(&meta_path).unwrap();
    // Flip one hex digit of the actor: a silent change of identity is what the checksum stops.
    let digit_at = text.find("actor = ").unwrap() + "actor = ".len();
    let flipped = if text.as_bytes()[digit_at] == b'0' {
        "1"
    } else {
        "0"
    };
    let mut damaged = text.clone();
    damaged.replace_range(digit_at..digit_at + 1, flipped);
    assert_ne!(damaged, text);
    std::fs::write(&meta_path, damaged).unwrap();

    let error = Store::open(dir.path(), StorageConfig::default())
        .err()
        .expect("a damaged metadata file must not open");
    assert!(
        matches!(&error, StorageError::CorruptMeta { path, .. } if *path == meta_path),
        "{error:?}"
    );
    assert!(error.to_string().contains(&meta_path.display().to_string()));

    std::fs::write(&meta_path, b"").unwrap();
    assert!(matches!(
        Store::open(dir.path(), StorageConfig::default()),
        Err(StorageError::CorruptMeta {
            problem: MetaProblem::Truncated,
            ..
        })
    ));
}

async fn over_long_buckets_and_keys_are_refused(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    let long_bucket = vec![b'b'; MAX_BUCKET_BYTES + 1];
    let long_key = vec![b'k'; MAX_KEY_BYTES + 1];
    assert!(matches!(
        store.get(0, &long_bucket, b"k"),
        Err(StorageError::BucketTooLong { length: 256 })
    ));
    let outcome = store
        .update(0, b"b", &long_key, |_| {
            Ok::<_, Refused>((Some(vec![1]), ()))
        })
        .await;
    assert!(matches!(
        outcome,
        Err(UpdateError::Storage {
            source: StorageError::KeyTooLong { .. }
        })
    ));
    assert!(matches!(
        store.scan_partition(0, Some((&long_bucket, b"k")), 10),
        Err(StorageError::BucketTooLong { .. })
    ));
    // The longest allowed bucket and key fit fjall's key limit.
    let longest_bucket = vec![b'b'; MAX_BUCKET_BYTES];
    let longest_key = vec![b'k'; MAX_KEY_BYTES];
    put(&store, 0, &longest_bucket, &longest_key, b"v").await;
    assert_eq!(
        store.get(0, &longest_bucket, &longest_key).unwrap(),
        Some(b"v".to_vec())
    );
    assert_eq!(store.stats().writes, 1);
    store.close().await.unwrap();
}

async fn scan_pagination_returns_every_record_exactly_once(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    let mut expected = BTreeSet::new();
    for bucket in [&b"a"[..], b"ab", b""] {
        for index in 0..100u32 {
            let key = format!("key{index}").into_bytes();
            let value = format!("{bucket:?}{index}").into_bytes();
            put(&store, 9, bucket, &key, &value).await;
            expected.insert((bucket.to_vec(), key, value));
        }
    }
    put(&store, 10, b"a", b"other partition", b"v").await;

    let mut seen = Vec::new();
    let mut cursor: Option<(Vec<u8>, Vec<u8>)> = None;
    loop {
        let start = cursor.as_ref().map(|(b, k)| (b.as_slice(), k.as_slice()));
        let page = store.scan_partition(9, start, 7).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        let (bucket, key, _) = page.last().unwrap();
        cursor = Some((bucket.clone(), key.clone()));
        seen.extend(page);
    }
    assert_eq!(seen.len(), expected.len(), "a record came back twice");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), expected);
    assert!(store.scan_partition(9, None, 0).unwrap().is_empty());
    assert!(store.scan_partition(11, None, 10).unwrap().is_empty());
    assert_eq!(store.key_count_estimate(), 301);

    assert!(store.drop_partition(9).unwrap());
    assert!(!store.drop_partition(9).unwrap());
    assert!(store.scan_partition(9, None, 10).unwrap().is_empty());
    assert_eq!(
        store.get(10, b"a", b"other partition").unwrap(),
        Some(b"v".to_vec())
    );
    store.close().await.unwrap();
}

const CRASH_DIR_VARIABLE: &str = "DYNKV_STORAGE_CRASH_TEST_DIR";
const ACK_PREFIX: &str = "ACK ";

/// Not a test on its own: the body of the child process that
/// `acknowledged_writes_survive_the_death_of_the_process` starts and kills. Without the variable it does nothing.
#[test]
fn crash_child_writes_until_killed() {
    let Ok(dir) = std::env::var(CRASH_DIR_VARIABLE) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = open(Path::new(&dir));
        let mut writers = Vec::new();
        for writer in 0..4u32 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                for index in 0..1_000_000u32 {
                    let key = format!("{writer}-{index}");
                    put(&store, index % 8, b"crash", key.as_bytes(), key.as_bytes()).await;
                    let mut stdout = std::io::stdout().lock();
                    writeln!(stdout, "{ACK_PREFIX}{key}").unwrap();
                    stdout.flush().unwrap();
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
    });
}

/// What this shows: a write is in fjall's journal, handed to the OS, before it is
/// acknowledged, so it survives the death of the process (SIGKILL) and a reopen replays it.
/// What it cannot show: that the journal was fsynced. A SIGKILL keeps the page cache, so this
/// passes without the fsync too; power-loss durability rests on the group commit's fsync
/// before every acknowledgement, and on the simulated disk (`engine.rs`), whose crash loses
/// every unsynced write, under the randomized simulation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_the_death_of_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let (_crate_name, module) = module_path!().split_once("::").unwrap();
    let child_test = format!("{module}::crash_child_writes_until_killed");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            child_test.as_str(),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR_VARIABLE, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acknowledged = Vec::new();
    // Kill once enough writes are acknowledged; every line read, before or after the kill,
    // is an acknowledgement the child gave.
    while acknowledged.len() < 300 {
        let line = lines.next().expect("child exited early").unwrap();
        if let Some(key) = line.strip_prefix(ACK_PREFIX) {
            acknowledged.push(key.to_owned());
        }
    }
    child.kill().unwrap();
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(key) = line.strip_prefix(ACK_PREFIX) {
            acknowledged.push(key.to_owned());
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child must have been killed");

    let store = open(dir.path());
    for key in &acknowledged {
        let index: u32 = key.split_once('-').unwrap().1.parse().unwrap();
        assert_eq!(
            store.get(index % 8, b"crash", key.as_bytes()).unwrap(),
            Some(key.as_bytes().to_vec()),
            "acknowledged key {key} lost"
        );
    }
    store.close().await.unwrap();
}

async fn a_panicking_batch_marks_the_store_failed(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    let panicked = store
        .update(
            0,
            b"b",
            b"k",
            |_current| -> Result<(Option<Vec<u8>>, ()), ()> {
                panic!("a storage job panicked (on purpose)")
            },
        )
        .await;
    assert!(
        matches!(
            panicked,
            Err(UpdateError::Storage {
                source: StorageError::CommitterStopped
            })
        ),
        "{panicked:?}"
    );
    let reason = tokio::time::timeout(std::time::Duration::from_secs(5), store.failed())
        .await
        .expect("the failure is reported");
    assert!(reason.contains("storage batch failed"), "{reason}");
    // Nothing is acknowledged afterwards.
    let later = store
        .update(0, b"b", b"k", |_| Ok::<_, ()>((Some(b"v".to_vec()), ())))
        .await;
    assert!(later.is_err(), "{later:?}");
}

/// The in-memory disk's crash model (see `engine.rs`): a crash loses exactly what was not
/// persisted, detaches the crashed store, and the next start is unclean.
#[tokio::test(start_paused = true)]
async fn a_simulated_crash_loses_exactly_what_was_not_persisted() {
    let disk = MemoryDisk::new();
    let unsynced = StorageConfig {
        sync_writes: false,
        ..StorageConfig::default()
    };
    let store = Store::open_in_memory(&disk, unsynced.clone()).unwrap();
    let first_epoch = store.epoch();
    put(&store, 0, b"b", b"early", b"v").await;
    // Halfway between two periodic persists, so none can run between `late` and the crash.
    tokio::time::sleep(commit::PERIODIC_PERSIST_INTERVAL * 5 / 2).await;
    put(&store, 0, b"b", b"late", b"v").await;
    assert_eq!(store.get(0, b"b", b"late").unwrap(), Some(b"v".to_vec()));
    disk.crash();
    assert!(
        store.get(0, b"b", b"early").is_err(),
        "a crashed store's handles are detached"
    );
    drop(store);
    let reopened = Store::open_in_memory(&disk, unsynced).unwrap();
    assert_eq!(
        reopened.get(0, b"b", b"early").unwrap(),
        Some(b"v".to_vec())
    );
    assert_eq!(reopened.get(0, b"b", b"late").unwrap(), None);
    let epoch = reopened.epoch();
    assert_eq!(epoch.base, first_epoch.base);
    assert_eq!(epoch.incarnation, first_epoch.incarnation + 1);
    assert_eq!(
        epoch.trusted_from, epoch.incarnation,
        "an unclean start trusts nothing earlier"
    );
    reopened.close().await.unwrap();
    let clean = Store::open_in_memory(&disk, StorageConfig::default()).unwrap();
    assert_eq!(
        clean.epoch().trusted_from,
        clean.epoch().incarnation,
        "a start after a clean stop trusts nothing earlier either (a backup may be restored)"
    );
    assert_ne!(clean.epoch().nonce, epoch.nonce);
    clean.close().await.unwrap();
}

/// A hint key of `primary` for `partition` (the format of `core::hints`).
fn hint_key(primary: &str, partition: u32, key: &str) -> Vec<u8> {
    crate::core::hints::encode_key(&crate::core::hints::HintKey {
        primary: crate::core::ids::NodeId::new(primary).unwrap(),
        partition,
        bucket: b"b".to_vec(),
        key: key.as_bytes().to_vec(),
    })
}

async fn put_hint(store: &Store, key: &[u8], value: &[u8]) -> Result<(), UpdateError<Refused>> {
    let value = value.to_vec();
    store
        .hint_update(key, move |_| Ok::<_, Refused>((HintWrite::Put(value), ())))
        .await
}

async fn hint_tally_is_exact_and_the_bound_refuses_growth_only(kind: Engine) {
    let dir = Disk::new(kind);
    let config = StorageConfig {
        hints_max_bytes: 1000,
        ..StorageConfig::default()
    };
    let store = dir.open_with(config.clone());
    let (a, b, c) = (
        hint_key("n2", 5, "a"),
        hint_key("n2", 5, "b"),
        hint_key("n3", 9, "c"),
    );
    put_hint(&store, &a, &[1; 300]).await.unwrap();
    put_hint(&store, &b, &[2; 300]).await.unwrap();
    put_hint(&store, &c, &[3; 100]).await.unwrap();
    let tally = store.hint_tally();
    assert_eq!(tally.count, 3);
    assert_eq!(tally.bytes, (a.len() + b.len() + c.len() + 700) as u64);
    assert_eq!(tally.by_partition, [(5, 2), (9, 1)].into_iter().collect());

    // Growing past the bound is refused with the limit's name, and nothing changes.
    let refused = put_hint(&store, &c, &[4; 500]).await.unwrap_err();
    let message = refused.to_string();
    assert!(
        matches!(
            &refused,
            UpdateError::Storage {
                source: StorageError::HintsFull { limit: 1000, .. }
            }
        ),
        "{message}"
    );
    assert!(message.contains("hints.max_bytes"), "{message}");
    assert_eq!(store.hint_get(&c).unwrap(), Some(vec![3; 100]));
    let new_key = hint_key("n3", 9, "d");
    assert!(put_hint(&store, &new_key, &[5; 400]).await.is_err());
    assert_eq!(store.hint_tally(), tally, "a refused hint changes nothing");
    // Shrinking or replacing in place is allowed at the bound; delivery frees room.
    put_hint(&store, &a, &[6; 200]).await.unwrap();
    store
        .hint_update(&b, |_| Ok::<_, Refused>((HintWrite::Delete, ())))
        .await
        .unwrap();
    put_hint(&store, &new_key, &[5; 400]).await.unwrap();
    let tally = store.hint_tally();
    assert_eq!(tally.count, 3);
    assert_eq!(tally.by_partition, [(5, 1), (9, 2)].into_iter().collect());
    assert_eq!(
        tally.bytes,
        (a.len() + c.len() + new_key.len() + 200 + 100 + 400) as u64
    );
    store.close().await.unwrap();
    let reopened = dir.open_with(config);
    assert_eq!(
        reopened.hint_tally(),
        tally,
        "the tally is recounted at open"
    );
    reopened.close().await.unwrap();
}

on_both_engines!(round_trip_through_update_and_get; flavor = "multi_thread", worker_threads = 2);
on_both_engines!(update_returning_none_writes_nothing; flavor = "multi_thread", worker_threads = 2);
on_both_engines!(closure_errors_propagate_and_write_nothing; flavor = "multi_thread", worker_threads = 2);
on_both_engines!(concurrent_updates_of_one_key_never_lose_each_other; flavor = "multi_thread", worker_threads = 4);
on_both_engines!(group_commit_shares_fsyncs_between_writers; flavor = "multi_thread", worker_threads = 4);
on_both_engines!(updates_complete_under_a_paused_clock; start_paused = true);
on_both_engines!(unsynced_writes_are_fsynced_periodically; start_paused = true);
on_both_engines!(close_with_other_handles_flushes_and_names_them; flavor = "multi_thread", worker_threads = 2);
on_both_engines!(over_long_buckets_and_keys_are_refused; flavor = "multi_thread", worker_threads = 2);
on_both_engines!(scan_pagination_returns_every_record_exactly_once; flavor = "multi_thread", worker_threads = 2);
on_both_engines!(a_panicking_batch_marks_the_store_failed; flavor = "multi_thread", worker_threads = 2);
on_both_engines!(hint_tally_is_exact_and_the_bound_refuses_growth_only; flavor = "multi_thread", worker_threads = 2);

/// The tree a scan of `partition` would build: each record's entry hash in its segment.
fn tree_of_contents(store: &Store, partition: u32) -> Vec<u32> {
    let mut tree = crate::core::tictac::TicTacTree::new();
    for (bucket, key, record) in store.scan_partition(partition, None, usize::MAX).unwrap() {
        tree.insert(&bucket, &key, crate::core::tictac::record_digest(&record));
    }
    tree.branches().to_vec()
}

/// The anti-entropy tree follows every write and delete, and a build that runs while writes
/// go on (a page per writer job) ends equal to the store's contents.
async fn aae_trees_follow_writes_and_builds_race_no_write(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    let trees = store.aae_trees().unwrap().clone();
    assert_eq!(trees.branches(5), None, "no tree before a build");
    const KEYS: u32 = 6000;
    for index in 0..KEYS {
        put(&store, 5, b"b", &index.to_be_bytes(), b"first").await;
    }
    // Writes overwrite keys on both sides of the build's cursor while it runs.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            // From the top down, so that most land above the cursor, some below.
            for index in (0..KEYS).rev().step_by(7) {
                put(&store, 5, b"b", &index.to_be_bytes(), b"second").await;
                tokio::task::yield_now().await;
            }
        })
    };
    assert!(store.build_tree(5).await.unwrap());
    writer.await.unwrap();
    assert_eq!(trees.branches(5), Some(tree_of_contents(&store, 5)));
    let writes_before = trees.status()[0].writes_since_build;
    // Deletes of unchanged copies and later writes keep it equal.
    let expected = store.get(5, b"b", &3u32.to_be_bytes()).unwrap().unwrap();
    assert!(
        store
            .delete_if_unchanged(5, b"b", &3u32.to_be_bytes(), expected)
            .await
            .unwrap()
    );
    put(&store, 5, b"b", b"new key", b"v").await;
    assert_eq!(trees.branches(5), Some(tree_of_contents(&store, 5)));
    let status = trees.status();
    assert_eq!(status.len(), 1);
    assert!(status[0].built && !status[0].building);
    assert_eq!(status[0].builds, 1);
    assert_eq!(status[0].writes_since_build, writes_before + 2);
    // A digest list over every segment names every key once, with its record's digest.
    let all: Vec<u16> = (0..crate::core::tictac::SEGMENTS as u16).collect();
    let digests = store.key_digests(5, &all).unwrap();
    assert_eq!(digests.len(), KEYS as usize);
    // Two stores with the same records have equal trees; one differing key shows.
    let other_dir = Disk::new(kind);
    let other = other_dir.open();
    for (bucket, key, record) in store.scan_partition(5, None, usize::MAX).unwrap() {
        put(&other, 5, &bucket, &key, &record).await;
    }
    assert!(other.build_tree(5).await.unwrap());
    let other_trees = other.aae_trees().unwrap();
    assert_eq!(other_trees.branches(5), trees.branches(5));
    put(&other, 5, b"b", &10u32.to_be_bytes(), b"third").await;
    assert_ne!(other_trees.branches(5), trees.branches(5));
    // Dropping the partition drops its tree.
    assert!(store.drop_partition(5).unwrap());
    assert_eq!(trees.branches(5), None);
}
on_both_engines!(aae_trees_follow_writes_and_builds_race_no_write; flavor = "multi_thread", worker_threads = 2);

/// A stored record holding one version: a value, or a tombstone.
fn record_of(value: &[u8], deleted: bool, actor: crate::core::ids::Actor) -> Vec<u8> {
    use crate::core::object::{Content, LocalRecord, coordinate_put, encode_local_record};
    let content = if deleted {
        Content::tombstone(1_000)
    } else {
        Content {
            value: value.to_vec(),
            content_type: String::new(),
            user_metadata: Vec::new(),
            last_modified_micros: 500,
            deleted: false,
        }
    };
    let object = coordinate_put(None, None, content, actor, true);
    encode_local_record(&LocalRecord {
        object,
        coordinator: None,
        retiring: false,
    })
}

/// Trees count tombstones; a reap deletes a tombstone only while it is the one named, and
/// keeps the tree equal to the store's contents.
async fn tombstones_are_counted_and_reaped_only_unchanged(kind: Engine) {
    let dir = Disk::new(kind);
    let store = dir.open();
    let trees = store.aae_trees().unwrap().clone();
    put(&store, 3, b"b", b"live", &record_of(b"v", false, 1)).await;
    put(&store, 3, b"b", b"gone", &record_of(b"", true, 1)).await;
    // A partition created empty has a (built, empty) tree from its first write on.
    assert_eq!(trees.tombstones(3), Some(1));
    assert_eq!(trees.tombstones(4), None, "no tree: no count");
    assert!(store.build_tree(3).await.unwrap());
    assert_eq!(trees.tombstones(3), Some(1));
    put(&store, 3, b"b", b"also gone", &record_of(b"", true, 2)).await;
    assert_eq!(trees.tombstones(3), Some(2));
    let found = store.tombstones(3, None, 10).unwrap();
    let names: Vec<&[u8]> = found.iter().map(|t| t.key.as_slice()).collect();
    assert_eq!(names, vec![b"also gone".as_slice(), b"gone".as_slice()]);
    assert!(found.iter().all(|t| t.since_micros == 1_000));
    // Paged: one at a time, after a cursor.
    let first = store.tombstones(3, None, 1).unwrap();
    assert_eq!(first.len(), 1);
    let rest = store
        .tombstones(3, Some((&first[0].bucket, &first[0].key)), 10)
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_ne!(rest[0].key, first[0].key);
    let gone = found.iter().find(|t| t.key == b"gone").unwrap().clone();
    let name = |key: &[u8]| (b"b".to_vec(), key.to_vec());
    let summaries = store
        .durable_summaries(3, &[name(b"gone"), name(b"never")])
        .await
        .unwrap();
    assert_eq!(summaries[0].unwrap().digest, gone.digest);
    assert_eq!(summaries[1], None);
    // A different digest (the copy changed since the check) keeps it; so does a live copy.
    let target = |key: &[u8], digest: u64| (b"b".to_vec(), key.to_vec(), digest);
    let live_digest =
        crate::core::tictac::record_digest(&store.get(3, b"b", b"live").unwrap().unwrap());
    let changed = [
        target(b"gone", gone.digest ^ 1),
        target(b"live", live_digest),
    ];
    assert_eq!(store.reap_tombstones(3, &changed).await.unwrap(), 0);
    let unchanged = [target(b"gone", gone.digest)];
    assert_eq!(store.reap_tombstones(3, &unchanged).await.unwrap(), 1);
    assert_eq!(store.get(3, b"b", b"gone").unwrap(), None);
    assert_eq!(store.reap_tombstones(3, &unchanged).await.unwrap(), 0);
    assert_eq!(trees.tombstones(3), Some(1));
    assert_eq!(trees.branches(3), Some(tree_of_contents(&store, 3)));
    // A tombstone overwritten by a live value is no longer counted.
    put(&store, 3, b"b", b"also gone", &record_of(b"back", false, 3)).await;
    assert_eq!(trees.tombstones(3), Some(0));
    assert!(store.build_tree(3).await.unwrap());
    assert_eq!(trees.tombstones(3), Some(0));
}
on_both_engines!(tombstones_are_counted_and_reaped_only_unchanged; flavor = "multi_thread", worker_threads = 2);

/// Trees count the records that ask for an actor retirement pass, through writes, clears,
/// deletes and rebuilds, and a scan finds exactly those.
async fn records_asking_for_retirement_are_counted_and_found(kind: Engine) {
    use crate::core::object::{LocalRecord, decode_local_record, encode_local_record};
    let dir = Disk::new(kind);
    let store = dir.open();
    let trees = store.aae_trees().unwrap().clone();
    let marked = |value: &[u8], actor| {
        let mut record = decode_local_record(&record_of(value, false, actor)).unwrap();
        record.retiring = true;
        encode_local_record(&record)
    };
    put(&store, 3, b"b", b"plain", &record_of(b"v", false, 1)).await;
    put(&store, 3, b"b", b"marked", &marked(b"w", 2)).await;
    put(&store, 3, b"b", b"also marked", &marked(b"x", 3)).await;
    assert_eq!(trees.retiring(3), Some(2));
    assert_eq!(trees.retiring(4), None, "no tree: no count");
    let found = store.retiring(3, None, 10).unwrap();
    let names: Vec<&[u8]> = found.iter().map(|r| r.key.as_slice()).collect();
    assert_eq!(names, vec![b"also marked".as_slice(), b"marked".as_slice()]);
    assert!(found.iter().all(|r| r.record.retiring));
    let digest =
        crate::core::tictac::record_digest(&store.get(3, b"b", b"marked").unwrap().unwrap());
    assert_eq!(found[1].digest, digest);
    // Paged after a cursor.
    let rest = store
        .retiring(3, Some((&found[0].bucket, &found[0].key)), 10)
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].key, b"marked");
    // Clearing the mark uncounts it, an update that writes nothing keeps it, a rebuild agrees.
    let cleared = LocalRecord {
        retiring: false,
        ..found[1].record.clone()
    };
    put(&store, 3, b"b", b"marked", &encode_local_record(&cleared)).await;
    assert_eq!(trees.retiring(3), Some(1));
    store
        .update(3, b"b", b"also marked", |_| {
            Ok::<_, std::convert::Infallible>((None, ()))
        })
        .await
        .unwrap();
    assert_eq!(trees.retiring(3), Some(1), "returning None writes nothing");
    assert!(store.build_tree(3).await.unwrap());
    assert_eq!(trees.retiring(3), Some(1));
    assert_eq!(store.retiring(3, None, 10).unwrap().len(), 1);
}
on_both_engines!(records_asking_for_retirement_are_counted_and_found; flavor = "multi_thread", worker_threads = 2);

/// With `aae_trees` off no tree is kept and no build runs.
#[tokio::test]
async fn aae_trees_can_be_turned_off() {
    let disk = MemoryDisk::new();
    let config = StorageConfig {
        aae_trees: false,
        ..StorageConfig::default()
    };
    let store = Store::open_in_memory(&disk, config).unwrap();
    put(&store, 1, b"b", b"k", b"v").await;
    assert!(store.aae_trees().is_none());
    assert!(!store.build_tree(1).await.unwrap());
}

/// Every change of a key reaches what a get and a read-before-write see, with the row cache
/// on (one slot, so keys also evict each other) and off: a write, a larger record than the
/// cache keeps, a delete of an unchanged copy, a dropped partition.
async fn the_row_cache_follows_every_change(kind: Engine) {
    for slots in [1, 0] {
        let dir = Disk::new(kind);
        let store = dir.open_with(StorageConfig {
            row_cache_slots: slots,
            ..StorageConfig::default()
        });
        let current = |store: &Store| {
            let store = store.clone();
            async move {
                store
                    .update(2, b"b", b"k", |current| {
                        Ok::<_, Refused>((None, current.map(<[u8]>::to_vec)))
                    })
                    .await
                    .unwrap()
            }
        };
        put(&store, 2, b"b", b"k", b"v1").await;
        put(&store, 2, b"b", b"k", b"v2").await;
        assert_eq!(store.get(2, b"b", b"k").unwrap(), Some(b"v2".to_vec()));
        assert_eq!(current(&store).await, Some(b"v2".to_vec()));
        put(&store, 2, b"b", b"other", b"o").await;
        assert_eq!(store.get(2, b"b", b"k").unwrap(), Some(b"v2".to_vec()));
        let large = vec![9u8; 2 * rows::MAX_CACHED_ROW_BYTES];
        put(&store, 2, b"b", b"k", &large).await;
        assert_eq!(store.get(2, b"b", b"k").unwrap(), Some(large.clone()));
        assert_eq!(current(&store).await, Some(large.clone()));
        put(&store, 2, b"b", b"k", b"v3").await;
        assert!(
            store
                .delete_if_unchanged(2, b"b", b"k", b"v3".to_vec())
                .await
                .unwrap()
        );
        assert_eq!(store.get(2, b"b", b"k").unwrap(), None, "slots {slots}");
        assert_eq!(current(&store).await, None);
        put(&store, 9, b"b", b"k", b"in 9").await;
        assert!(store.drop_partition(9).unwrap());
        assert_eq!(store.get(9, b"b", b"k").unwrap(), None, "slots {slots}");
        assert_eq!(store.get(2, b"b", b"other").unwrap(), Some(b"o".to_vec()));
    }
}

on_both_engines!(the_row_cache_follows_every_change; flavor = "current_thread");
