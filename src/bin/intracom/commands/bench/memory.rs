//! The memory medium's figures (fan-out beside `tokio::sync::broadcast`, the limit of
//! in-process fan-out), and the memory probe both media use: one side of the memory
//! figure measured in a process of its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use intracom::{Config, Intracom, MediumKind, Subscription};
use tokio::sync::Notify;

use super::report::{Compare, Figure, Op, Progress};
use super::{
    bench_config, memory_in_child, rate, resident_bytes, sample, take_turns, Side, Sizes, Which,
};
use crate::output::{fail, Failure, Outcome};

/// The fan-outs measured (as `cargo bench --bench throughput` does).
const FAN_OUT: [usize; 3] = [1, 4, 16];

pub(crate) async fn run(
    config: &Config,
    sizes: &Sizes,
    which: Which,
    progress: &mut Progress,
) -> Result<Vec<Figure>, Failure> {
    match which {
        Which::Fanout => fan_out(config, sizes, progress).await,
        Which::Memory => memory(config, sizes, progress).await,
        _ => Ok(Vec::new()),
    }
}

async fn fan_out(
    config: &Config,
    sizes: &Sizes,
    progress: &mut Progress,
) -> Result<Vec<Figure>, Failure> {
    let m = sizes.messages;
    let mut figures = Vec::new();
    for subscribers in FAN_OUT {
        let mut figure = Figure::new(
            "fanout",
            format!("publish → {subscribers} subscriber(s) (×{m})"),
            "memory medium",
            "tokio::sync::broadcast".into(),
            "msg/s",
            Compare::Ratio,
            Some((Op::AtLeast, 0.6)),
        );
        for round in 0..sizes.rounds {
            let sides: Vec<(&str, Side<'_, f64>)> = vec![
                ("intracom", Box::pin(fan_out_ours(config, subscribers, m))),
                ("broadcast", Box::pin(fan_out_broadcast(subscribers, m))),
            ];
            let what = format!("fan-out to {subscribers}");
            let found = take_turns(round, progress, &what, sides).await?;
            figure.push(found[0], found[1]);
        }
        figures.push(figure);
    }
    Ok(figures)
}

/// Messages per second from publish to the last subscriber's delivery.
async fn fan_out_ours(
    config: &Config,
    subscribers: usize,
    messages: usize,
) -> Result<f64, Failure> {
    let mut config = bench_config(config, None, "bench-1");
    config.memory_max_messages = config.memory_max_messages.max(messages * 2);
    let bus = Intracom::connect(config).await?;
    let mut tasks = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let mut sub = bus.subscribe(Subscription::new()).await?;
        tasks.push(tokio::spawn(async move {
            for _ in 0..messages {
                match sub.next().await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
            Ok(())
        }));
    }
    let started = Instant::now();
    for _ in 0..messages {
        bus.publish(sample()).await?;
    }
    for task in tasks {
        task.await
            .map_err(|e| fail(format!("subscriber task: {e}"), "a bug: please report it"))??;
    }
    let rate = rate(messages, started.elapsed());
    bus.shutdown().await;
    Ok(rate)
}

/// The same hand-over through `tokio::sync::broadcast`: build the message, share it.
async fn fan_out_broadcast(subscribers: usize, messages: usize) -> Result<f64, Failure> {
    let (tx, _) = tokio::sync::broadcast::channel(messages.max(1));
    let mut tasks = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let mut rx = tx.subscribe();
        tasks.push(tokio::spawn(async move {
            for _ in 0..messages {
                if rx.recv().await.is_err() {
                    break;
                }
            }
        }));
    }
    let started = Instant::now();
    for _ in 0..messages {
        let _ = tx.send(Arc::new(sample()));
    }
    for task in tasks {
        task.await
            .map_err(|e| fail(format!("receiver task: {e}"), "a bug: please report it"))?;
    }
    Ok(rate(messages, started.elapsed()))
}

async fn memory(
    config: &Config,
    sizes: &Sizes,
    progress: &mut Progress,
) -> Result<Vec<Figure>, Failure> {
    let (s, n) = (sizes.subscribers, sizes.memory_messages);
    let mut figure = Figure::new(
        "memory.subscribers",
        format!("process memory growth over {n} messages, {s} subscribers vs 1"),
        "subscribers",
        "1 subscriber".into(),
        "MiB",
        Compare::Ratio,
        Some((Op::AtMost, 1.5)),
    );
    let config = bench_config(config, None, "bench-memory");
    for round in 0..sizes.rounds {
        let sides: Vec<(&str, Side<'_, f64>)> = vec![
            (
                "many subscribers (own process)",
                Box::pin(memory_in_child(&config, s, n)),
            ),
            (
                "one subscriber (own process)",
                Box::pin(memory_in_child(&config, 1, n)),
            ),
        ];
        let growth = take_turns(round, progress, "memory", sides).await?;
        figure.push(growth[0] / (1024.0 * 1024.0), growth[1] / (1024.0 * 1024.0));
    }
    Ok(vec![figure])
}

/// Messages published before the measurement starts, so that what every run allocates
/// once (pools, the change stream, buffers) is not counted as growth.
const WARM_UP: usize = 200;

/// One side of the memory figure, in this process: `subscribers` local subscribers
/// follow while `messages` messages are published; prints the growth of the resident
/// memory, in bytes, once every subscriber has received every message.
pub(crate) async fn probe(config: &Config, subscribers: usize, messages: usize) -> Outcome {
    let mut config = bench_config(config, None, &format!("bench-probe-{}", std::process::id()));
    if config.medium == MediumKind::Memory {
        config.memory_max_messages = config.memory_max_messages.max((messages + WARM_UP) * 2);
    }
    let bus = Intracom::connect(config).await?;
    let received = Arc::new(AtomicUsize::new(0));
    let wake = Arc::new(Notify::new());
    let mut tasks = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let mut sub = bus
            .subscribe(Subscription::new().actions(["reload"]))
            .await?;
        let (received, wake) = (Arc::clone(&received), Arc::clone(&wake));
        tasks.push(tokio::spawn(async move {
            while let Some(item) = sub.next().await {
                if item.is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                    wake.notify_one();
                }
            }
        }));
    }
    let publish = |count: usize| {
        let bus = bus.clone();
        async move {
            let mut left = count;
            while left > 0 {
                let n = left.min(100);
                bus.publish_all((0..n).map(|_| sample()).collect()).await?;
                left -= n;
            }
            Ok::<(), intracom::Error>(())
        }
    };
    let all_received = |count: usize| {
        let (received, wake) = (Arc::clone(&received), Arc::clone(&wake));
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while received.load(Ordering::Relaxed) < count {
                if Instant::now() > deadline {
                    return Err(fail(
                        "the subscribers did not receive every message within 120 s",
                        "is the server overloaded?",
                    ));
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), wake.notified()).await;
            }
            Ok(())
        }
    };
    publish(WARM_UP).await?;
    all_received(WARM_UP * subscribers).await?;
    let before = resident_bytes().ok_or_else(|| {
        fail(
            "cannot read this process's resident memory",
            "the memory figure needs /proc/self/status (Linux)",
        )
    })?;
    publish(messages).await?;
    all_received((WARM_UP + messages) * subscribers).await?;
    let after = resident_bytes().unwrap_or(before);
    bus.shutdown().await;
    for task in tasks {
        task.abort();
    }
    out!("{}", after.saturating_sub(before));
    Ok(())
}
