//! The HTTP API against a real `dynkv dev` cluster, driven with the `curl` binary the way
//! Riak's HTTP API pages do: fetch, store, siblings and their resolution, delete, bucket
//! properties, listing, ping, stats, metrics, and bad input.

mod common;

use common::process::{DevCluster, binary, make_pki, pb_address, server_command, start_servers};
use std::process::Command;
use std::time::{Duration, Instant};

/// One HTTP exchange as curl saw it.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.text()))
    }
}

/// Runs `curl -s -i ARGS` and splits its output into status, headers and body.
fn curl(args: &[&str]) -> Reply {
    let output = Command::new("curl")
        .args(["-s", "-i", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl runs");
    let mut rest: &[u8] = &output.stdout;
    loop {
        let end = rest
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .unwrap_or_else(|| {
                panic!(
                    "curl {args:?} gave no HTTP answer: {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 4..];
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        if status == 100 {
            continue;
        }
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
            .collect();
        return Reply {
            status,
            headers,
            body: rest.to_vec(),
        };
    }
}

fn put_text(url: &str, value: &str, vclock: Option<&str>) -> Reply {
    let mut args = vec!["-X", "PUT", "-H", "Content-Type: text/plain", "-d", value];
    let header;
    if let Some(vclock) = vclock {
        header = format!("X-Riak-Vclock: {vclock}");
        args.extend(["-H", header.as_str()]);
    }
    args.push(url);
    curl(&args)
}

/// The parts of a multipart/mixed body: (headers, value) per part, split as the Riak Python
/// client splits it: on CRLF--boundary CRLF, dropping what comes before the first such line
/// (the preamble) and what follows the closing CRLF--boundary--CRLF. A body whose first
/// boundary line does not follow a CRLF loses its first part here, as it does there.
fn multipart_parts(reply: &Reply) -> Vec<(String, String)> {
    let content_type = reply.header("content-type").expect("a content type");
    let boundary = content_type
        .split("boundary=")
        .nth(1)
        .expect("a boundary")
        .trim_matches('"');
    let text = reply.text();
    let close = format!("\r\n--{boundary}--\r\n");
    let end = text
        .find(&close)
        .expect("a closing boundary line ending in CRLF");
    let open = format!("\r\n--{boundary}\r\n");
    text[..end]
        .split(&open)
        .skip(1)
        .map(|part| {
            let (head, body) = part.split_once("\r\n\r\n").expect("part headers");
            (head.to_string(), body.to_string())
        })
        .collect()
}

#[test]
fn riak_examples_store_fetch_siblings_resolve_delete_and_list() {
    let cluster = DevCluster::start(3, 0);
    let node1 = cluster.http_addr(1);
    let node2 = cluster.http_addr(2);
    let node3 = cluster.http_addr(3);

    // Store Object: PUT with metadata and returnbody; Fetch Object from another node.
    let url = format!("{node1}/buckets/test/keys/doc?returnbody=true");
    let reply = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-H",
        "X-Riak-Meta-Author: ada",
        "-H",
        "Link: </buckets/test/keys/other>; riaktag=\"friend\"",
        "-d",
        "{\"bar\":\"baz\"}",
        &url,
    ]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "{\"bar\":\"baz\"}");
    let reply = curl(&[&format!("{node2}/types/default/buckets/test/keys/doc")]);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "{\"bar\":\"baz\"}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("x-riak-meta-author"), Some("ada"));
    let link = reply.header("link").expect("a Link header");
    assert!(
        link.contains("</buckets/test/keys/other>; riaktag=\"friend\""),
        "{link}"
    );
    assert!(link.contains("</buckets/test>; rel=\"up\""), "{link}");
    assert!(reply.header("x-riak-vclock").is_some());
    assert!(reply.header("last-modified").is_some());
    let etag = reply.header("etag").expect("an ETag").to_string();

    // Conditional fetches: 304 for a matching ETag or a later If-Modified-Since.
    let reply = curl(&[
        "-H",
        &format!("If-None-Match: {etag}"),
        &format!("{node3}/buckets/test/keys/doc"),
    ]);
    assert_eq!(reply.status, 304);
    let reply = curl(&[
        "-H",
        "If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT",
        &format!("{node3}/buckets/test/keys/doc"),
    ]);
    assert_eq!(reply.status, 304);
    let reply = curl(&[
        "-H",
        "If-None-Match: \"someothertag\"",
        &format!("{node3}/buckets/test/keys/doc"),
    ]);
    assert_eq!(reply.status, 200);

    // POST without a key: 201 Created with the new key's Location.
    let reply = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: text/plain",
        "-d",
        "generated",
        &format!("{node1}/buckets/test/keys"),
    ]);
    assert_eq!(reply.status, 201, "{}", reply.text());
    let location = reply.header("location").expect("a Location").to_string();
    assert!(location.starts_with("/buckets/test/keys/"), "{location}");
    let reply = curl(&[&format!("{node2}{location}")]);
    assert_eq!((reply.status, reply.text().as_str()), (200, "generated"));

    // Siblings: two writers that read the same version, through different nodes.
    let url = format!("{node1}/buckets/test/keys/shared");
    assert_eq!(put_text(&url, "base", None).status, 204);
    let base = curl(&[&url]);
    let base_vclock = base.header("x-riak-vclock").expect("a vclock").to_string();
    for (node, value) in [(&node2, "left"), (&node3, "right")] {
        let reply = put_text(
            &format!("{node}/buckets/test/keys/shared"),
            value,
            Some(&base_vclock),
        );
        assert_eq!(reply.status, 204, "{}", reply.text());
    }
    let url_all = format!("{url}?r=all");
    // Without multipart in Accept: 300 with the list of vtags.
    let listing = curl(&[&url_all]);
    assert_eq!(listing.status, 300, "{}", listing.text());
    let text = listing.text();
    let vtags: Vec<&str> = text.lines().skip(1).collect();
    assert!(text.starts_with("Siblings:\n"), "{text}");
    assert_eq!(vtags.len(), 2, "{text}");
    // With Accept: multipart/mixed: every sibling in one body.
    let reply = curl(&["-H", "Accept: multipart/mixed", &url_all]);
    assert_eq!(reply.status, 300);
    // Both bodies of a 300 depend on Accept; caches are told so, as Riak does.
    for reply in [&listing, &reply] {
        assert_eq!(reply.header("vary"), Some("Accept, Accept-Encoding"));
    }
    let parts = multipart_parts(&reply);
    let mut values: Vec<&str> = parts.iter().map(|(_, body)| body.as_str()).collect();
    values.sort();
    assert_eq!(values, vec!["left", "right"]);
    assert!(
        parts
            .iter()
            .all(|(head, _)| head.contains("Content-Type: text/plain"))
    );
    // One sibling by its vtag; a vtag no sibling has is a plain 404, not a deleted key.
    let reply = curl(&[&format!("{url}?vtag=NoSuchVtag")]);
    assert_eq!(reply.status, 404);
    assert!(reply.header("x-riak-deleted").is_none());
    let reply = curl(&[&format!("{url}?vtag={}", vtags[0])]);
    assert_eq!(reply.status, 200);
    assert!(["left", "right"].contains(&reply.text().as_str()));
    // A third writer resolves them with the vclock of the 300.
    let vclock = reply.header("x-riak-vclock").expect("a vclock").to_string();
    let reply = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: text/plain",
        "-H",
        &format!("X-Riak-Vclock: {vclock}"),
        "-d",
        "merged",
        &format!("{node1}/buckets/test/keys/shared?w=all&returnbody=true"),
    ]);
    assert_eq!((reply.status, reply.text().as_str()), (200, "merged"));
    let reply = curl(&[&format!("{node3}/buckets/test/keys/shared?r=all")]);
    assert_eq!((reply.status, reply.text().as_str()), (200, "merged"));

    // Delete Object: 204, then the fetch is 404 with a vclock; deleting again is 404.
    let reply = curl(&[
        "-X",
        "DELETE",
        &format!("{node2}/buckets/test/keys/doc?rw=all"),
    ]);
    assert_eq!(reply.status, 204, "{}", reply.text());
    let reply = curl(&[&format!("{node1}/buckets/test/keys/doc?r=all")]);
    assert_eq!(reply.status, 404);
    assert!(
        reply.header("x-riak-vclock").is_some(),
        "a tombstone answers with its vclock"
    );
    assert_eq!(reply.header("x-riak-deleted"), Some("true"));
    // The same read asking every replica at once (Riak's fan-out) answers the same.
    let reply = curl(&[&format!(
        "{node3}/buckets/test/keys/doc?r=1&ask_all_replicas=true"
    )]);
    assert_eq!(reply.status, 404);
    assert_eq!(reply.header("x-riak-deleted"), Some("true"));
    let reply = curl(&["-X", "DELETE", &format!("{node1}/buckets/test/keys/doc")]);
    assert_eq!(reply.status, 404);
    let reply = curl(&[&format!("{node1}/buckets/test/keys/never-written")]);
    assert_eq!(reply.status, 404);
    assert!(reply.header("x-riak-vclock").is_none());

    // List Keys (whole and streamed) and List Buckets: deleted keys are gone.
    let generated = location.rsplit('/').next().unwrap_or_default().to_string();
    let mut expected = vec!["shared".to_string(), generated];
    expected.sort();
    let reply = curl(&[&format!("{node3}/buckets/test/keys?keys=true")]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let keys: Vec<String> = serde_json::from_value(reply.json()["keys"].clone()).unwrap();
    assert_eq!(keys, expected);
    let reply = curl(&[&format!("{node2}/buckets/test/keys?keys=stream")]);
    assert_eq!(reply.status, 200);
    let mut streamed: Vec<String> = serde_json::Deserializer::from_slice(&reply.body)
        .into_iter::<serde_json::Value>()
        .flat_map(|document| {
            let document = document.expect("each chunk is JSON");
            serde_json::from_value::<Vec<String>>(document["keys"].clone()).unwrap()
        })
        .collect();
    streamed.sort();
    assert_eq!(streamed, expected);
    let reply = curl(&[&format!("{node1}/buckets?buckets=true")]);
    assert_eq!(reply.status, 200);
    let buckets: Vec<String> = serde_json::from_value(reply.json()["buckets"].clone()).unwrap();
    assert_eq!(buckets, vec!["test"]);
    // Without keys= (or buckets=), which defaults to false, Riak lists nothing: 200, {}.
    for path in [
        "buckets/test/keys",
        "buckets/test/keys?keys=false",
        "buckets",
    ] {
        let reply = curl(&[&format!("{node1}/{path}")]);
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        assert_eq!(reply.json(), serde_json::json!({}), "{path}");
    }
    let reply = curl(&[&format!("{node1}/buckets/test/keys?keys=yes")]);
    assert_eq!(reply.status, 400, "{}", reply.text());
}

#[test]
fn bucket_properties_change_n_val_and_allow_mult_cluster_wide() {
    let cluster = DevCluster::start(3, 1);
    let node1 = cluster.http_addr(1);
    let node2 = cluster.http_addr(2);
    let node3 = cluster.http_addr(3);

    // Defaults, as Riak shows them.
    let reply = curl(&[&format!("{node1}/buckets/lww/props")]);
    assert_eq!(reply.status, 200);
    let props = &reply.json()["props"];
    assert_eq!(props["n_val"], 3);
    assert_eq!(props["allow_mult"], true);
    assert_eq!(props["r"], "quorum");
    assert_eq!(props["precommit"], serde_json::json!([]));
    assert_eq!(props["postcommit"], serde_json::json!([]));
    assert_eq!(props["dvv_enabled"], true);

    // Set Bucket Properties on one node; another node serves them.
    let reply = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{\"props\":{\"n_val\":1,\"allow_mult\":false,\"r\":1}}",
        &format!("{node1}/types/default/buckets/lww/props"),
    ]);
    assert_eq!(reply.status, 204, "{}", reply.text());
    let reply = curl(&[&format!("{node3}/buckets/lww/props")]);
    let props = &reply.json()["props"];
    assert_eq!(props["n_val"], 1);
    assert_eq!(props["allow_mult"], false);
    assert_eq!(props["r"], 1);
    assert_eq!(
        props["w"], "quorum",
        "properties not named keep their values"
    );

    // n_val = 1 is in force: asking for two replies is out of range.
    let reply = curl(&[&format!("{node2}/buckets/lww/keys/k?r=2")]);
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("n_val (1)"), "{}", reply.text());

    // n_val = 1 places each key on one node: 30 new keys add about 30 records across the
    // cluster, not 90 (the storage estimate is approximate, hence the margin).
    let records = || -> u64 {
        [&node1, &node2, &node3]
            .into_iter()
            .map(|node| {
                curl(&[&format!("{node}/stats")]).json()["storage_key_count_estimate"]
                    .as_u64()
                    .expect("a key count")
            })
            .sum()
    };
    let before = records();
    for index in 0..30 {
        let reply = put_text(
            &format!("{node1}/buckets/lww/keys/one{index}?w=all"),
            "x",
            None,
        );
        assert_eq!(reply.status, 204, "{}", reply.text());
    }
    let added = records() - before;
    assert!(
        (30..60).contains(&added),
        "{added} records for 30 keys with n_val=1"
    );

    // allow_mult = false: blind concurrent writes through every node leave one value.
    for (index, node) in [&node1, &node2, &node3].into_iter().enumerate() {
        let reply = put_text(
            &format!("{node}/buckets/lww/keys/k"),
            &format!("v{index}"),
            None,
        );
        assert_eq!(reply.status, 204, "{}", reply.text());
    }
    let reply = curl(&[
        "-H",
        "Accept: multipart/mixed",
        &format!("{node2}/buckets/lww/keys/k"),
    ]);
    assert_eq!(
        reply.status,
        200,
        "one value, not siblings: {}",
        reply.text()
    );
    assert!(["v0", "v1", "v2"].contains(&reply.text().as_str()));

    // The same blind writes in a bucket with allow_mult = true make siblings.
    let reply = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{\"props\":{\"allow_mult\":true}}",
        &format!("{node2}/buckets/multi/props"),
    ]);
    assert_eq!(reply.status, 204);
    for (index, node) in [&node1, &node2, &node3].into_iter().enumerate() {
        let reply = put_text(
            &format!("{node}/buckets/multi/keys/k"),
            &format!("v{index}"),
            None,
        );
        assert_eq!(reply.status, 204, "{}", reply.text());
    }
    let reply = curl(&[
        "-H",
        "Accept: multipart/mixed",
        &format!("{node3}/buckets/multi/keys/k?r=all"),
    ]);
    assert_eq!(reply.status, 300, "{}", reply.text());
    assert_eq!(multipart_parts(&reply).len(), 3);

    // Resetting the properties brings the defaults back everywhere.
    let reply = curl(&["-X", "DELETE", &format!("{node3}/buckets/lww/props")]);
    assert_eq!(reply.status, 204);
    let reply = curl(&[&format!("{node1}/buckets/lww/props")]);
    assert_eq!(reply.json()["props"]["n_val"], 3);
}

/// A minimal check of the Prometheus text exposition format: comments are `# HELP` or
/// `# TYPE name kind`, every sample is `name{labels} value` with a float value, and every
/// sample's family has a TYPE line before it.
fn check_prometheus_text(text: &str) -> Vec<String> {
    let mut families = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.split_whitespace();
            match words.next() {
                Some("TYPE") => {
                    let name = words.next().expect("TYPE names a metric");
                    let kind = words.next().expect("TYPE has a kind");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{line}"
                    );
                    families.push(name.to_string());
                }
                Some("HELP") => {}
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "{line}"
        );
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            name.chars()
                .all(|character| character.is_ascii_alphanumeric() || "_:".contains(character)),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
        }
        assert!(
            families
                .iter()
                .any(|family| name == family || name.starts_with(&format!("{family}_"))),
            "sample {name} has no TYPE line"
        );
        samples.push(series.to_string());
    }
    samples
}

#[test]
fn ping_resources_stats_metrics_and_bad_input() {
    let cluster = DevCluster::start(3, 2);
    let node1 = cluster.http_addr(1);

    let reply = curl(&[&format!("{node1}/ping")]);
    assert_eq!((reply.status, reply.text().as_str()), (200, "OK"));
    let reply = curl(&["-H", "Accept: application/json", &format!("{node1}/")]);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["riak_kv_wm_buckets"], "/buckets");

    // Some traffic for the figures.
    assert_eq!(
        put_text(&format!("{node1}/buckets/s/keys/k?w=all"), "v", None).status,
        204
    );
    assert_eq!(
        curl(&[&format!("{node1}/buckets/s/keys/k?r=one")]).status,
        200
    );

    // A `+` in a path is a space, as Riak reads paths (clients encode with quote_plus);
    // `%2B` is a plus.
    let node2 = cluster.http_addr(2);
    let reply = put_text(&format!("{node1}/buckets/enc/keys/a+b"), "spaced", None);
    assert_eq!(reply.status, 204, "{}", reply.text());
    assert_eq!(
        curl(&[&format!("{node2}/buckets/enc/keys/a%20b")]).text(),
        "spaced"
    );
    assert_eq!(
        curl(&[&format!("{node2}/buckets/enc/keys/a%2Bb")]).status,
        404
    );
    let listed = curl(&[&format!("{node1}/buckets/enc/keys?keys=true")]).json();
    assert_eq!(listed["keys"], serde_json::json!(["a b"]));
    // Status: valid JSON in Riak's shape.
    let reply = curl(&[&format!("{node1}/stats")]);
    assert_eq!(reply.status, 200);
    let stats = reply.json();
    assert_eq!(stats["nodename"], "n1");
    assert!(stats["node_gets"].as_u64().unwrap() >= 1);
    assert!(stats["node_puts_total"].as_u64().unwrap() >= 1);
    for field in [
        "node_get_fsm_time_mean",
        "node_get_fsm_time_95",
        "node_put_fsm_time_99",
        "node_get_fsm_siblings_100",
        "node_get_fsm_objsize_median",
        "read_repairs_total",
    ] {
        assert!(stats[field].is_u64(), "{field} missing: {stats}");
    }
    assert_eq!(stats["ring_num_partitions"], 64);
    // Riak clients read riak_kv_version first (the Python client fails without it) and
    // parse it as a dotted version of three numbers.
    for field in ["riak_kv_version", "riak_pb_version"] {
        let version = stats[field].as_str().expect(field);
        assert_eq!(version.split('.').count(), 3, "{field}: {version}");
        assert!(version.split('.').all(|part| part.parse::<u32>().is_ok()));
    }
    assert!(stats["connected_nodes"].as_array().unwrap().len() == 2);
    assert!(stats["sys_logical_processors"].as_u64().unwrap() >= 1);

    // Metrics: Prometheus text with requests and latency by operation and consistency.
    let reply = curl(&[&format!("{node1}/metrics")]);
    assert_eq!(reply.status, 200);
    let samples = check_prometheus_text(&reply.text());
    assert!(
        samples
            .iter()
            .any(|series| series.starts_with("dynkv_requests_total{")
                && series.contains("operation=\"put\"")
                && series.contains("consistency=\"all\""))
    );
    assert!(samples.iter().any(
        |series| series.starts_with("dynkv_request_duration_seconds_bucket{")
            && series.contains("operation=\"get\"")
            && series.contains("consistency=\"one\"")
    ));

    // Bad parameters: 400 with a message that names the parameter.
    for (query, named) in [
        ("r=banana", "r"),
        ("r=4", "r=4"),
        ("pr=-1", "pr"),
        ("notfound_ok=maybe", "notfound_ok"),
        ("timeout=soon", "timeout"),
        ("ask_all_replicas=sometimes", "ask_all_replicas"),
    ] {
        let reply = curl(&[&format!("{node1}/buckets/s/keys/k?{query}")]);
        assert_eq!(reply.status, 400, "{query}: {}", reply.text());
        assert!(reply.text().starts_with(named), "{query}: {}", reply.text());
    }
    let reply = put_text(&format!("{node1}/buckets/s/keys/k?w=0"), "v", None);
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("w=0"), "{}", reply.text());
    let reply = put_text(
        &format!("{node1}/buckets/s/keys/k?returnbody=yes"),
        "v",
        None,
    );
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("returnbody"), "{}", reply.text());
    let reply = put_text(
        &format!("{node1}/buckets/s/keys/k"),
        "v",
        Some("not base64!"),
    );
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("X-Riak-Vclock"), "{}", reply.text());
    let reply = curl(&[
        "-X",
        "PUT",
        "-H",
        "X-Riak-Index-email_bin: a@b",
        "-d",
        "v",
        &format!("{node1}/buckets/s/keys/k"),
    ]);
    assert_eq!(reply.status, 400);
    let reply = curl(&[&format!("{node1}/buckets/s/keys?keys=all")]);
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("keys=true"), "{}", reply.text());
    let reply = curl(&["-X", "PUT", "-d", "{}", &format!("{node1}/buckets/s/props")]);
    assert_eq!(reply.status, 415);
    let reply = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{\"props\":{\"n_val\":0}}",
        &format!("{node1}/buckets/s/props"),
    ]);
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("n_val"), "{}", reply.text());
    let reply = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{\"props\":{\"w\":5}}",
        &format!("{node1}/buckets/s/props"),
    ]);
    assert_eq!(reply.status, 400);
    assert!(reply.text().starts_with("w=5"), "{}", reply.text());
    let reply = curl(&[&format!("{node1}/types/other/buckets/s/keys/k")]);
    assert_eq!(reply.status, 404);

    // Over the value limit (8 MiB by default): 413, declared or not.
    let body_path = cluster.path().join("big-body");
    std::fs::write(&body_path, vec![b'x'; 8 * 1024 * 1024 + 1]).unwrap();
    let data = format!("@{}", body_path.display());
    let reply = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &data,
        &format!("{node1}/buckets/s/keys/big"),
    ]);
    assert_eq!(reply.status, 413, "{}", reply.text());
    let reply = curl(&[
        "-X",
        "PUT",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &data,
        &format!("{node1}/buckets/s/keys/big"),
    ]);
    assert_eq!(reply.status, 413, "{}", reply.text());

    // An unmet quorum: 503 naming the requirement.
    cluster.kill_node(3);
    let reply = put_text(
        &format!("{node1}/buckets/s/keys/k?w=all&timeout=1000"),
        "v",
        None,
    );
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.text().contains("(w)"), "{}", reply.text());
    // Listing still covers every partition: the next node of each walk answers for n3.
    let reply = curl(&[&format!("{node1}/buckets/s/keys?keys=true")]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["keys"], serde_json::json!(["k"]));
}

#[test]
fn https_with_a_bearer_token_and_a_client_token_on_the_quic_port() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let pki = make_pki(&dir.path().join("pki"), "n1");
    let (_server, base) = start_servers(3, |base| {
        let mut command = server_command(&pki, &dir.path().join("data"), base);
        command.args(["--http-tls", "true"]).args([
            "--http-token",
            "s3cret",
            "--client-token",
            "quic-t0ken",
        ]);
        vec![(command, pb_address(base))]
    });
    let address = |offset: u16| format!("127.0.0.1:{}", base + offset);
    let ca = pki.join("ca.pem").display().to_string();
    let url = |path: &str| format!("https://{}{path}", address(200));

    // /ping needs no token (health checks); wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                &ca,
                &url("/ping"),
            ])
            .output()
            .expect("curl runs");
        if output.stdout == b"200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the HTTPS listener never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let reply = curl(&["--cacert", &ca, &url("/buckets/b/keys/k")]);
    assert_eq!(reply.status, 401);
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    let reply = curl(&[
        "--cacert",
        &ca,
        "-H",
        "Authorization: Bearer wrong",
        &url("/stats"),
    ]);
    assert_eq!(reply.status, 401);
    let auth = "Authorization: Bearer s3cret";
    let reply = curl(&[
        "--cacert",
        &ca,
        "-H",
        auth,
        "-X",
        "PUT",
        "-H",
        "Content-Type: text/plain",
        "-d",
        "secret value",
        &url("/buckets/b/keys/k"),
    ]);
    assert_eq!(reply.status, 204, "{}", reply.text());
    let reply = curl(&["--cacert", &ca, "-H", auth, &url("/buckets/b/keys/k")]);
    assert_eq!((reply.status, reply.text().as_str()), (200, "secret value"));

    // The QUIC client port: ping is open, everything else needs the client token.
    let cli = |extra: &[&str]| {
        let mut command = Command::new(binary());
        command
            .args(extra)
            .args(["--node", &address(0), "--ca", &ca])
            .env_remove("DYNKV_TOKEN");
        command.output().expect("dynkv runs")
    };
    let pinged = cli(&["ping"]);
    assert!(
        pinged.status.success(),
        "{}",
        String::from_utf8_lossy(&pinged.stderr)
    );
    let refused = cli(&["get", "b", "k"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("requires a client token"), "{message}");
    let wrong = cli(&["get", "b", "k", "--token", "nope"]);
    assert!(!wrong.status.success());
    let message = String::from_utf8_lossy(&wrong.stderr);
    assert!(message.contains("client token is wrong"), "{message}");
    let read = cli(&["get", "b", "k", "--token", "quic-t0ken"]);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert!(String::from_utf8_lossy(&read.stdout).contains("secret value"));
    // Plain HTTP to the TLS port gets no HTTP answer.
    let output = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg(format!("http://{}/ping", address(200)))
        .output()
        .expect("curl runs");
    assert_ne!(output.stdout, b"200");
}
