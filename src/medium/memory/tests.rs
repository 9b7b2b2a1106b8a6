//! Tests of the log, its retention and its followers.

use std::time::SystemTime;

use bson::Timestamp;
use futures::StreamExt;

use super::*;
use crate::medium::Event;

fn msg(action: &str) -> Message {
    let mut m = Message::broadcast(action);
    m.source_service = "s".into();
    m.source_instance = "s-1".into();
    m
}

fn medium(retention_ms: u64, max: usize) -> MemoryMedium {
    MemoryMedium::new(MemoryOptions {
        retention: Duration::from_millis(retention_ms),
        max_messages: max,
        max_message_bytes: 1 << 20,
    })
}

#[test]
fn stamps_strictly_increase_even_when_the_clock_does_not_move() {
    let mut log = Log::new();
    // One wall-clock reading for many stamps (as for a batch), then a clock that
    // steps back a minute.
    let wall = SystemTime::now();
    let mut last = log.next_ts_at(wall);
    for i in 0..10_000 {
        let at = if i < 5_000 {
            wall
        } else {
            wall - Duration::from_secs(60)
        };
        let ts = log.next_ts_at(at);
        assert!(ts > last, "{ts:?} after {last:?}");
        last = ts;
    }
    log.last_ts = Timestamp {
        time: u32::MAX - 1,
        increment: u32::MAX,
    };
    assert!(
        log.next_ts_at(SystemTime::now())
            > Timestamp {
                time: u32::MAX - 1,
                increment: u32::MAX
            }
    );
}

#[tokio::test]
async fn count_limit_reports_exactly_what_was_lost() {
    let m = medium(60_000, 3);
    let mut from_start = m
        .follow(StartFrom::Beginning, Filter::monitor())
        .await
        .unwrap();
    m.append(&(0..5).map(|i| msg(&format!("a{i}"))).collect::<Vec<_>>())
        .await
        .unwrap();
    match from_start.next().await.unwrap().unwrap() {
        Event::Lost { count } => assert_eq!(count, 2),
        other => panic!("expected Lost, got {other:?}"),
    }
    let mut actions = Vec::new();
    for _ in 0..3 {
        if let Event::Message(message, _) = from_start.next().await.unwrap().unwrap() {
            actions.push(message.action.clone());
        }
    }
    assert_eq!(actions, ["a2", "a3", "a4"]);
    assert_eq!(m.len(), 3);
}

#[tokio::test]
async fn duplicate_ids_are_stored_once() {
    let m = medium(60_000, 10);
    let one = msg("a");
    let first = m.append(std::slice::from_ref(&one)).await.unwrap();
    let again = m.append(&[one]).await.unwrap();
    assert!(!first[0].duplicate);
    assert!(again[0].duplicate);
    assert_eq!(first[0].ts, again[0].ts);
    assert_eq!(m.len(), 1);
}

#[tokio::test]
async fn an_id_whose_message_the_same_append_evicts_is_stored_again_and_stays_indexed() {
    // A retention of a second: the third append below must come within it of the
    // second, even on a loaded machine.
    let m = medium(1000, 10);
    let one = msg("a");
    let first = m.append(std::slice::from_ref(&one)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // This append's prune evicts the expired first copy, then stores this one.
    let again = m.append(std::slice::from_ref(&one)).await.unwrap();
    assert!(!again[0].duplicate);
    assert!(again[0].ts > first[0].ts);
    assert_eq!(m.len(), 1);
    // The index names the new copy (the eviction did not take its id out).
    let third = m.append(std::slice::from_ref(&one)).await.unwrap();
    assert!(third[0].duplicate);
    assert_eq!(third[0].ts, again[0].ts);
}

#[tokio::test]
async fn an_id_twice_in_one_append_is_stored_once_and_again_after_it_expired() {
    let m = medium(60_000, 2);
    let one = msg("a");
    let appended = m.append(&[one.clone(), one.clone()]).await.unwrap();
    assert!(!appended[0].duplicate);
    assert!(appended[1].duplicate);
    assert_eq!(appended[0].ts, appended[1].ts);
    assert_eq!(appended[1].id, one.id);
    // Pushed out by the count limit: gone from the id index too.
    m.append(&[msg("b"), msg("c")]).await.unwrap();
    let again = m.append(std::slice::from_ref(&one)).await.unwrap();
    assert!(!again[0].duplicate);
    assert!(again[0].ts > appended[0].ts);
}

#[tokio::test]
async fn a_follower_that_caught_up_wakes_on_each_append_and_ends_when_closed() {
    use futures::FutureExt;
    let m = Arc::new(medium(60_000, 100));
    let mut s = m.follow(StartFrom::Now, Filter::monitor()).await.unwrap();
    for round in 0..3 {
        // Caught up: nothing to hand out, so the follower waits.
        assert!(s.next().now_or_never().is_none(), "round {round}");
        let batch: Vec<_> = (0..2).map(|i| msg(&format!("r{round}-{i}"))).collect();
        m.append(&batch).await.unwrap();
        for i in 0..2 {
            match s.next().await.unwrap().unwrap() {
                Event::Message(message, _) => {
                    assert_eq!(message.action, format!("r{round}-{i}"))
                }
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }
    // An append from another task wakes the follower waiting for it.
    let writer = Arc::clone(&m);
    let append = tokio::spawn(async move {
        tokio::task::yield_now().await;
        writer.append(&[msg("late")]).await.unwrap();
    });
    match s.next().await.unwrap().unwrap() {
        Event::Message(message, _) => assert_eq!(message.action, "late"),
        other => panic!("expected a message, got {other:?}"),
    }
    append.await.unwrap();
    // Closed while the follower waits: the stream ends, and stays ended.
    assert!(s.next().now_or_never().is_none());
    m.close().await;
    assert!(s.next().await.is_none());
    assert!(s.next().await.is_none());
}

#[tokio::test]
async fn messages_that_expired_unread_are_reported_lost_before_any_new_append() {
    // A retention of a second: `d` below must be read within it, even on a loaded
    // machine.
    let m = medium(1000, 100);
    let mut s = m.follow(StartFrom::Now, Filter::monitor()).await.unwrap();
    m.append(&[msg("a"), msg("b"), msg("c")]).await.unwrap();
    // Expired while nobody read them, and no append since to prune them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    match s.next().await.unwrap().unwrap() {
        Event::Lost { count } => assert_eq!(count, 3),
        other => panic!("expected Lost, got {other:?}"),
    }
    m.append(&[msg("d")]).await.unwrap();
    match s.next().await.unwrap().unwrap() {
        Event::Message(message, _) => assert_eq!(message.action, "d"),
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn close_ends_followers() {
    let m = medium(60_000, 10);
    let mut s = m.follow(StartFrom::Now, Filter::monitor()).await.unwrap();
    m.close().await;
    assert!(s.next().await.is_none());
    assert!(m.append(&[msg("a")]).await.is_err());
}
