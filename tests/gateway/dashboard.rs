//! The Grafana dashboard shipped in `deploy/grafana/intracom.json` against a live
//! `/metrics`: after traffic that touches every part of the bus the dashboard shows
//! (publishes, deliveries, a request, work that fails until it dies, SSE streams), every
//! metric name that a panel's query (or a variable's) names is served by the gateway.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use intracom::gateway::Gateway;
use intracom::{Message, WorkOptions};
use libtest_mimic::Trial;
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::{block_on, eventually, Gw, Place, ADMIN, BILLING, USERS};

/// The trials of this file.
pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("dashboard_names_are_read_out_of_expressions", || {
            names_are_read_out_of_expressions();
            Ok(())
        }),
        Trial::test("memory::grafana_dashboard_queries_served_metrics", || {
            block_on(grafana_dashboard_queries_served_metrics())
        }),
    ]
}

/// The dashboard, parsed.
fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/intracom.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every query of the dashboard: each panel's targets (rows' panels included), each
/// query variable's; with the panel's title.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default().to_string();
            if panel["type"] != "row" {
                let targets = panel["targets"].as_array().cloned().unwrap_or_default();
                assert!(!targets.is_empty(), "panel {title:?} has no query");
                assert_eq!(
                    panel["datasource"]["uid"], "${datasource}",
                    "panel {title:?} uses the datasource variable"
                );
                for target in targets {
                    let expr = target["expr"].as_str().unwrap_or_default();
                    assert!(!expr.is_empty(), "panel {title:?}: a target without expr");
                    out.push((title.clone(), expr.to_string()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query" {
            let query = variable["query"]["query"]
                .as_str()
                .or_else(|| variable["query"].as_str())
                .unwrap_or_default();
            out.push((format!("variable ${}", variable["name"]), query.to_string()));
        }
    }
    out
}

/// The metric names a PromQL expression names: the `intracom_…` identifiers (every
/// metric of the crate has the prefix; label names and functions do not).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("intracom_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Part of a longer identifier (a label value is quoted, so it never starts here).
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The series names `/metrics` serves, from its `# TYPE` lines: a histogram's as
/// Prometheus stores them (`_bucket`, `_sum`, `_count`), a summary's (`_sum`, `_count`
/// and itself), any other's as named.
fn served(text: &str) -> BTreeSet<String> {
    let mut served = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        // A declared metric with no sample would be no series.
        let sampled = |series: &str| {
            text.lines().any(|l| {
                l.strip_prefix(series)
                    .is_some_and(|r| r.starts_with(['{', ' ']))
            })
        };
        let names: Vec<String> = match kind {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{name}{s}"))
                .collect(),
            "summary" => vec![name.into(), format!("{name}_sum"), format!("{name}_count")],
            _ => vec![name.into()],
        };
        served.extend(names.into_iter().filter(|n| sampled(n)));
    }
    served
}

async fn grafana_dashboard_queries_served_metrics() {
    let dashboard = dashboard();
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        variables.contains(&"datasource"),
        "a Prometheus datasource variable: {variables:?}"
    );
    let queries = queries(&dashboard);
    let mut wanted = BTreeSet::new();
    for (panel, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{panel}: no intracom metric in {expr}");
        wanted.extend(names.into_iter().map(|n| (n, panel.clone())));
    }

    // The recorder first: the bus takes its publish counters when it connects.
    assert!(
        Gateway::install_metrics(),
        "the gateway's recorder is this process's"
    );
    let gw = Gw::start(&Place::Memory).await;
    let billing = gw.peer("billing").await;

    // Deliveries to an SSE client, with their latency.
    let mut sub = gw.subscribe("/subscribe/reload", USERS, None).await;
    let id = gw.publish(BILLING, json!({ "action": "reload" })).await;
    assert_eq!(sub.message("the delivery").await.1["id"], id.as_str());

    // A request and its answer.
    let _server = billing
        .serve(
            "billing",
            "invoice.get",
            |n: intracom::bson::Document| async move { Ok::<_, String>(n) },
        )
        .expect("a server");
    let answer: intracom::bson::Document = billing
        .request("billing", "invoice.get", &intracom::bson::doc! { "n": 1 })
        .await
        .expect("an answer");
    assert_eq!(answer.get_i32("n"), Ok(1));

    // Work that fails until it dies: claimed, redelivered, dead-lettered.
    let options = WorkOptions::default()
        .max_attempts(2)
        .backoff(Duration::from_millis(10))
        .poll(Duration::from_millis(20));
    let _worker = billing
        .work(
            "billing",
            &["invoice.render"],
            options,
            |_m: Message| async { Err::<(), _>("broken") },
        )
        .expect("a worker");
    let job = gw
        .publish(
            BILLING,
            json!({ "action": "invoice.render", "to": "billing", "work": true }),
        )
        .await;
    eventually("the job dead-lettered", || async {
        gw.get(&format!("/dead/{job}"), ADMIN).await.0 == StatusCode::OK
    })
    .await;

    // The gateway samples the queues every 5 s: the dead letter's queue shows then.
    let metrics = || async {
        let response = gw.http.get(gw.url("/metrics")).send().await;
        let response = response.expect("/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.expect("its text")
    };
    eventually("the queue gauges", || async {
        metrics()
            .await
            .contains("intracom_queue_dead_letters{queue=\"billing/invoice.render\"} 1")
    })
    .await;
    let text = metrics().await;
    let served = served(&text);
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(name, _)| !served.contains(name))
        .map(|(name, panel)| format!("{name} ({panel})"))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard names metrics /metrics does not serve: {missing:?}\nserved: {served:?}"
    );
    // The latency panels compute quantiles from buckets: a histogram, not a summary.
    assert!(
        text.contains("# TYPE intracom_delivery_latency_seconds histogram"),
        "{text}"
    );
    eprintln!(
        "dashboard: {} queries, {} metric names, all served",
        queries.len(),
        wanted.iter().map(|(n, _)| n).collect::<BTreeSet<_>>().len()
    );
    drop(sub);
    billing.shutdown().await;
    gw.stop().await;
}

fn names_are_read_out_of_expressions() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.5, sum by (le) (rate(intracom_a_seconds_bucket{job=~\"$job\"}[5m]))) / intracom_b"
        ),
        ["intracom_a_seconds_bucket", "intracom_b"]
    );
    assert!(metric_names("rate(my_intracom_x[5m])").is_empty());
    let text = "# TYPE intracom_h histogram\nintracom_h_bucket{le=\"1\"} 1\nintracom_h_sum 1\nintracom_h_count 1\n# TYPE intracom_c counter\n";
    let served = served(text);
    assert!(served.contains("intracom_h_bucket") && served.contains("intracom_h_count"));
    assert!(
        !served.contains("intracom_h") && !served.contains("intracom_c"),
        "{served:?}"
    );
}
