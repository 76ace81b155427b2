//! `dynkv bench` and `dynkv bench compare` against a real dev cluster, with tiny counts: the
//! JSON has the documented fields and no request failed. No time or rate is asserted.

mod common;

use common::process::{DevCluster, stderr, stdout};

fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("the JSON report is written");
    serde_json::from_str(&text).expect("the report is JSON")
}

fn assert_latency_fields(latency: &serde_json::Value) {
    for field in ["mean", "p50", "p90", "p99", "p99_9", "max"] {
        assert!(
            latency[field].is_number(),
            "latency_ms.{field} in {latency}"
        );
    }
}

#[test]
fn bench_workload_and_compare_report_json_without_errors() {
    let cluster = DevCluster::start(3, 0);
    let out = cluster.path().join("run.json");
    let output = cluster.cli(&[
        "bench",
        "--workload",
        "a",
        "--records",
        "50",
        "--operations",
        "300",
        "--workers",
        "4",
        "--r",
        "quorum",
        "--w",
        "quorum",
        "--json-out",
        out.to_str().expect("utf-8 path"),
    ]);
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(stdout(&output).contains("p99.9 ms"), "{}", stdout(&output));
    let report = read_json(&out);
    let result = &report["result"];
    assert_eq!(result["operations"], 300, "{report}");
    assert_eq!(result["errors"]["total"], 0, "{report}");
    for operation in ["read", "update"] {
        let entry = &result["per_operation"][operation];
        assert!(entry["count"].as_u64().is_some_and(|count| count > 0));
        assert!(entry["throughput_ops_per_sec"].is_number());
        assert_latency_fields(&entry["latency_ms"]);
    }
    assert_eq!(report["ceiling"]["per_operation"]["ping"]["count"], 300);
    assert!(report["fraction_of_ceiling"].is_number());
    assert_eq!(report["settings"]["workload"], "A");
    // CPU per operation, from the pids in the dev directory: every node was measured.
    assert_eq!(report["cpu"]["nodes"], 3, "{report}");
    assert!(
        report["cpu"]["node_cpu_seconds"]
            .as_f64()
            .is_some_and(|seconds| seconds > 0.0),
        "{report}"
    );

    let out = cluster.path().join("compare.json");
    let svg = cluster.path().join("compare.svg");
    let output = cluster.cli(&[
        "bench",
        "compare",
        "--records",
        "50",
        "--duration-secs",
        "0.5",
        "--workers",
        "4",
        "--probes",
        "2",
        "--no-ceiling",
        "--json-out",
        out.to_str().expect("utf-8 path"),
        "--svg-out",
        svg.to_str().expect("utf-8 path"),
    ]);
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let report = read_json(&out);
    let configs = report["configs"].as_array().expect("configs");
    let labels: Vec<&str> = configs
        .iter()
        .filter_map(|config| config["label"].as_str())
        .collect();
    assert_eq!(
        labels,
        [
            "W=one/R=all",
            "W=quorum/R=quorum",
            "W=all/R=one",
            "W=one/R=one"
        ]
    );
    for config in configs {
        assert_eq!(config["result"]["errors"]["total"], 0, "{config}");
        let buckets = config["staleness"].as_array().expect("staleness buckets");
        assert_eq!(buckets.len(), 5);
        assert_eq!(buckets[0]["bucket"], "0-1 ms");
        let reads: u64 = buckets.iter().filter_map(|b| b["reads"].as_u64()).sum();
        assert!(reads > 0, "probes read something: {config}");
    }
    let chart = std::fs::read_to_string(&svg).expect("the chart is written");
    assert!(chart.contains("<svg") && chart.trim_end().ends_with("</svg>"));
}
