//! The conformance suite on the memory medium: every handle of a test shares one
//! `MemoryMedium`, as the services of one process do.

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use conformance::{Harness, World};
use intracom::medium::memory::{MemoryMedium, MemoryOptions};
use intracom::{Config, Intracom};

struct Memory;

struct MemoryWorld {
    medium: Arc<MemoryMedium>,
    retention: Duration,
}

#[async_trait]
impl Harness for Memory {
    async fn world(&self, retention_ms: u64) -> Box<dyn World> {
        let config = Config::builder()
            .timeout_ms(retention_ms)
            .build()
            .expect("valid config");
        let options = MemoryOptions::from(&config);
        Box::new(MemoryWorld {
            medium: Arc::new(MemoryMedium::new(options)),
            retention: Duration::from_millis(retention_ms),
        })
    }

    fn short_retention_ms(&self) -> u64 {
        // Room to read a fresh message before it expires on a busy machine (the test
        // reads each one right after its publish, but four trials share two cores).
        5_000
    }
}

#[async_trait]
impl World for MemoryWorld {
    async fn bus(&self, config: Config) -> Intracom {
        Intracom::with_medium(config, self.medium.clone())
            .await
            .expect("bus on the memory medium")
    }

    async fn wait_expired(&self, _id: &str) {
        // Expiry on the memory medium is exact (a monotonic deadline per message): once
        // the retention has passed since the publish, the message is gone.
        tokio::time::sleep(self.retention + Duration::from_millis(50)).await;
    }
}

fn main() {
    let mut trials = conformance::trials("memory", Arc::new(Memory), None);
    trials.push(libtest_mimic::Trial::test(
        "undeclared_messages_land_in_the_dead_letters",
        || conformance::block_on(undeclared_messages_land_in_the_dead_letters()),
    ));
    trials.push(libtest_mimic::Trial::test(
        "the_size_limit_is_exact_without_encoding",
        || conformance::block_on(the_size_limit_is_exact_without_encoding()),
    ));
    trials.push(libtest_mimic::Trial::test(
        "what_memory_keeps_of_a_message_is_held_to_the_limit",
        || conformance::block_on(what_memory_keeps_of_a_message_is_held_to_the_limit()),
    ));
    conformance::run_main(trials, 4, || {});
}

async fn undeclared_messages_land_in_the_dead_letters() {
    use futures::StreamExt;
    let medium = Arc::new(MemoryMedium::new(MemoryOptions::default()));
    let config = Config::builder()
        .service("billing")
        .instance("billing-1")
        .sender("billing", ["reload"])
        .build()
        .unwrap();
    let bus = Intracom::with_medium(config, medium.clone()).await.unwrap();
    let mut sub = bus.subscribe(intracom::Subscription::new()).await.unwrap();
    let mut rogue = intracom::Message::broadcast("nope");
    rogue.source_service = "billing".into();
    rogue.source_instance = "billing-9".into();
    intracom::Medium::append(&*medium, &[rogue.clone()])
        .await
        .unwrap();
    let ok = bus
        .publish(intracom::Message::broadcast("reload"))
        .await
        .unwrap();
    assert_eq!(sub.next().await.unwrap().unwrap().id, ok.id);
    let dead = medium.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].document.get_str("_id").unwrap(), rogue.id);
    assert!(
        dead[0].reason.contains("nope"),
        "the reason names the action: {}",
        dead[0].reason
    );
}

/// The memory medium keeps messages unencoded, so the bus counts their size instead of
/// encoding them: the count must draw the line exactly where the encoding, or what the
/// message takes in memory when that is more, would.
async fn the_size_limit_is_exact_without_encoding() {
    use intracom::bson::doc;
    let payload = doc! {
        "text": "prix modifié",
        "items": (0..30).collect::<Vec<i32>>(),
        "nested": { "at": intracom::bson::DateTime::now(), "big": 1_i64 << 40 },
    };
    let mut message = intracom::Message::broadcast("reload").body(payload);
    // As the bus will send it: its sender filled in.
    message.source_service = "billing".into();
    message.source_instance = "billing-1".into();
    let size = intracom::bson::to_vec(&message)
        .unwrap()
        .len()
        .max(message.kept_len());
    let medium = Arc::new(MemoryMedium::new(MemoryOptions::default()));
    for (limit, fits) in [(size, true), (size - 1, false)] {
        let config = Config::builder()
            .service("billing")
            .instance("billing-1")
            .sender("billing", ["reload"])
            .max_message_bytes(limit)
            .build()
            .unwrap();
        let bus = Intracom::with_medium(config, medium.clone()).await.unwrap();
        let outcome = bus.publish(message.clone()).await;
        match (fits, outcome) {
            (true, Ok(published)) => assert_eq!(published.id, message.id),
            (
                false,
                Err(intracom::Error::TooLarge {
                    size: s, limit: l, ..
                }),
            ) => {
                assert_eq!((s, l), (size, limit));
            }
            (fits, outcome) => panic!("limit {limit} for {size} bytes (fits: {fits}): {outcome:?}"),
        }
    }
}

/// A payload of many small values is about ten times larger in memory than encoded: the
/// memory medium, which keeps messages decoded, holds what it keeps to the limit (a
/// MongoDB medium stores the encoding, and takes it).
async fn what_memory_keeps_of_a_message_is_held_to_the_limit() {
    use intracom::bson::doc;
    let values: Vec<i32> = vec![0; 20_000];
    let message = intracom::Message::broadcast("reload").body(doc! { "a": values });
    let encoded = message.encoded_len().unwrap();
    let kept = message.kept_len();
    assert!(kept > 4 * encoded, "kept {kept}, encoded {encoded}");
    let limit = 2 * encoded;
    let config = Config::builder()
        .service("billing")
        .instance("billing-1")
        .sender("billing", ["reload"])
        .max_message_bytes(limit)
        .build()
        .unwrap();
    let medium = Arc::new(MemoryMedium::new(MemoryOptions::from(&config)));
    let bus = Intracom::with_medium(config, medium).await.unwrap();
    match bus.publish(message).await {
        Err(intracom::Error::TooLarge { size, limit: l, .. }) => {
            assert_eq!(l, limit);
            assert!(size > limit && size >= kept, "refused as {size} bytes");
        }
        other => panic!("{encoded} bytes encoded, {kept} kept, limit {limit}: {other:?}"),
    }
}
