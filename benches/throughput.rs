//! Memory medium: publish → deliver throughput with 1, 4 and 16 subscribers, beside
//! `tokio::sync::broadcast` carrying the same message in the same run (the physical
//! limit of in-process fan-out). After criterion's own report, prints the ratio of its
//! estimates, then the ratios of pairs of rounds in which the sides take turns going
//! first (one right after the other: a slow phase of a shared machine weighs on both).
//!
//! Run: `cargo bench --bench throughput`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use futures::StreamExt;
use intracom::bson::doc;
use intracom::{Config, Intracom, Message, Subscription};

const MESSAGES: u64 = 2_000;
const FAN_OUT: [usize; 3] = [1, 4, 16];
const GROUP: &str = "publish_to_deliver";

fn sample() -> Message {
    Message::broadcast("reload")
        .body(doc! { "tenant": 7, "reason": "price list changed", "items": [1, 2, 3] })
}

async fn intracom_round(bus: &Intracom, subscribers: usize) -> Duration {
    let mut tasks = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(subscribers);
    for _ in 0..subscribers {
        let mut sub = bus.subscribe(Subscription::new()).await.expect("subscribe");
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            ready.send(()).await.ok();
            for _ in 0..MESSAGES {
                sub.next().await.expect("delivery").expect("no error");
            }
        }));
    }
    for _ in 0..subscribers {
        ready_rx.recv().await;
    }
    let start = Instant::now();
    for _ in 0..MESSAGES {
        bus.publish(sample()).await.expect("publish");
    }
    for task in tasks {
        task.await.expect("subscriber task");
    }
    start.elapsed()
}

async fn broadcast_round(subscribers: usize) -> Duration {
    let (tx, _) = tokio::sync::broadcast::channel::<Arc<Message>>(MESSAGES as usize);
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let mut rx = tx.subscribe();
        tasks.push(tokio::spawn(async move {
            for _ in 0..MESSAGES {
                rx.recv().await.expect("receive");
            }
        }));
    }
    let start = Instant::now();
    for _ in 0..MESSAGES {
        // The same work a publisher does to hand over a message: build it, share it.
        tx.send(Arc::new(sample())).expect("send");
    }
    for task in tasks {
        task.await.expect("receiver task");
    }
    start.elapsed()
}

fn benches(c: &mut Criterion, rt: &tokio::runtime::Runtime, bus: &Intracom) {
    let mut group = c.benchmark_group(GROUP);
    group.throughput(Throughput::Elements(MESSAGES));
    for subscribers in FAN_OUT {
        group.bench_with_input(
            BenchmarkId::new("intracom_memory", subscribers),
            &subscribers,
            |b, &n| {
                b.to_async(rt).iter_custom(|iters| {
                    let bus = bus.clone();
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += intracom_round(&bus, n).await;
                        }
                        total
                    }
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("tokio_broadcast", subscribers),
            &subscribers,
            |b, &n| {
                b.to_async(rt).iter_custom(|iters| async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += broadcast_round(n).await;
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

/// Reads criterion's mean estimate (ns per iteration) for one benchmark of this run.
fn mean_ns(function: &str, subscribers: usize) -> Option<f64> {
    let home = std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| "target".into());
            target.join("criterion")
        });
    let path = home
        .join(GROUP)
        .join(function)
        .join(subscribers.to_string())
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = Config::builder()
        .service("bench")
        .sender("bench", ["reload"])
        .build()
        .expect("config");
    let bus = rt.block_on(Intracom::connect(config)).expect("bus");
    benches(&mut criterion, &rt, &bus);
    criterion.final_summary();
    let mut measured = true;
    println!("\nintracom memory medium vs tokio::sync::broadcast, {MESSAGES} messages per round:");
    println!(
        "{:>12} {:>16} {:>16} {:>8}",
        "subscribers", "intracom msg/s", "broadcast msg/s", "ratio"
    );
    for subscribers in FAN_OUT {
        match (
            mean_ns("intracom_memory", subscribers),
            mean_ns("tokio_broadcast", subscribers),
        ) {
            (Some(ours), Some(limit)) => {
                let rate = |ns: f64| MESSAGES as f64 / (ns / 1e9);
                println!(
                    "{subscribers:>12} {:>16.0} {:>16.0} {:>8.3}",
                    rate(ours),
                    rate(limit),
                    limit / ours
                );
            }
            _ => {
                measured = false;
                println!("{subscribers:>12} (no estimate: run without a filter to measure both)")
            }
        }
    }
    if measured {
        alternating(&rt, &bus);
    }
}

/// Rounds in which the two sides take turns going first, one right after the other:
/// a ratio per pair of rounds, so that a slow phase of a shared machine (criterion
/// measures one side for seconds, then the other) weighs on both sides of a ratio.
const PAIRS: usize = 51;

fn alternating(rt: &tokio::runtime::Runtime, bus: &Intracom) {
    println!(
        "\nthe same, {PAIRS} pairs of rounds, the sides taking turns going first (ratio per pair):"
    );
    println!(
        "{:>12} {:>8} {:>8} {:>8}",
        "subscribers", "median", "min", "max"
    );
    for subscribers in FAN_OUT {
        let mut ratios: Vec<f64> = (0..PAIRS)
            .map(|pair| {
                rt.block_on(async {
                    let (ours, limit) = if pair % 2 == 0 {
                        let ours = intracom_round(bus, subscribers).await;
                        (ours, broadcast_round(subscribers).await)
                    } else {
                        let limit = broadcast_round(subscribers).await;
                        (intracom_round(bus, subscribers).await, limit)
                    };
                    limit.as_secs_f64() / ours.as_secs_f64()
                })
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "{subscribers:>12} {:>8.3} {:>8.3} {:>8.3}",
            ratios[PAIRS / 2],
            ratios[0],
            ratios[PAIRS - 1]
        );
    }
}
