//! The suite every [`Transport`] passes: run once over real QUIC on loopback and once over the
//! in-memory network (with tokio's clock paused).

use crate::net::FrameError;
use crate::net::TransportError;
use crate::net::test_support::*;
use std::time::Duration;
use tokio::task::JoinSet;

const TIMEOUT: Duration = Duration::from_secs(5);

async fn echo_round_trip(fixture: &Fixture) {
    let response = fixture
        .transport
        .call(&fixture.server, echo(1), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        response,
        TestResponse::Echo {
            tag: 1,
            payload: "payload-1".into()
        }
    );
}

async fn pipelines_500_concurrent_calls(fixture: &Fixture) {
    const CALLS: u64 = 500;
    // Warm up so the measurement does not include the handshake.
    fixture
        .transport
        .call(&fixture.server, echo(0), TIMEOUT)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut calls = JoinSet::new();
    for tag in 1..=CALLS {
        calls.spawn(fixture.transport.call(&fixture.server, echo(tag), TIMEOUT));
    }
    let mut answered = Vec::new();
    while let Some(result) = calls.join_next().await {
        answered.push(result.unwrap().unwrap());
    }
    let elapsed = started.elapsed();
    let mut tags: Vec<u64> = answered
        .iter()
        .map(|response| match response {
            TestResponse::Echo { tag, payload } => {
                assert_eq!(
                    payload,
                    &format!("payload-{tag}"),
                    "answer routed to the wrong call"
                );
                *tag
            }
            other => panic!("unexpected response {other:?}"),
        })
        .collect();
    tags.sort_unstable();
    assert_eq!(tags, (1..=CALLS).collect::<Vec<_>>());
    println!(
        "{}: {CALLS} concurrent calls in {elapsed:?} ({:.0} calls/s wall clock)",
        fixture.name,
        CALLS as f64 / elapsed.as_secs_f64()
    );
}

async fn slow_handler_times_out_and_the_next_call_works(fixture: &Fixture) {
    let result = fixture
        .transport
        .call(
            &fixture.server,
            TestRequest::Sleep { millis: 2_000 },
            Duration::from_millis(100),
        )
        .await;
    assert!(
        matches!(&result, Err(TransportError::Timeout { peer, timeout_ms: 100 }) if *peer == fixture.server),
        "{result:?}"
    );
    echo_round_trip(fixture).await;
}

async fn oversize_request_is_refused_and_the_peer_keeps_serving(fixture: &Fixture) {
    let calls_before = fixture.calls.calls();
    let oversize = TestRequest::Echo {
        tag: 9,
        payload: "x".repeat(2 * 1024 * 1024),
    };
    let result = fixture
        .transport
        .call(&fixture.server, oversize, TIMEOUT)
        .await;
    assert!(
        matches!(
            result,
            Err(TransportError::Frame(FrameError::TooLarge {
                limit: 1_048_576,
                ..
            }))
        ),
        "{result:?}"
    );
    assert_eq!(
        fixture.calls.calls(),
        calls_before,
        "an oversize request must not reach the handler"
    );
    echo_round_trip(fixture).await;
}

async fn oversize_response_is_an_error_and_the_peer_keeps_serving(fixture: &Fixture) {
    let result = fixture
        .transport
        .call(
            &fixture.server,
            TestRequest::Big {
                bytes: 2 * 1024 * 1024,
            },
            TIMEOUT,
        )
        .await;
    assert!(
        matches!(&result, Err(TransportError::Remote { peer, reason })
            if *peer == fixture.server && reason.contains("exceeds the limit")),
        "{result:?}"
    );
    echo_round_trip(fixture).await;
}

macro_rules! on_both_transports {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn quic() {
                    super::$test(&Fixture::from(quic_fixture())).await;
                }

                #[tokio::test(start_paused = true)]
                async fn memory() {
                    super::$test(&memory_fixture()).await;
                }
            }
        )*
    };
}

on_both_transports!(
    echo_round_trip,
    pipelines_500_concurrent_calls,
    slow_handler_times_out_and_the_next_call_works,
    oversize_request_is_refused_and_the_peer_keeps_serving,
    oversize_response_is_an_error_and_the_peer_keeps_serving,
);
