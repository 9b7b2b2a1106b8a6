//! The MongoDB figures: intracom on the configured server beside the raw driver doing
//! the same job on the same server, each side of each round in a fresh database set up
//! by intracom (same collections, indexes and validator: the raw side writes where a
//! message would go).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use intracom::bson::{self, doc, Bson, Document, Timestamp};
use intracom::{Config, Intracom, Message, PublishStatus, Subscription, WorkOptions};
use mongodb::change_stream::event::ChangeStreamEvent;
use mongodb::options::ReturnDocument;
use mongodb::{Client, Collection};

use super::report::{Compare, Figure, Op, Progress};
use super::{
    bench_config, memory_in_child, quantile_ms, rate, sample, take_turns, Side, Sizes, Which,
    SERVICE,
};
use crate::output::{fail, Failure};

/// How long the bench waits for one delivery or answer before it calls the run failed
/// (a hang guard, not a measurement).
const PATIENCE: Duration = Duration::from_secs(30);

/// Morphium's published request/reply figure (messages over MongoDB, 89 req/s): the
/// request figure's target is ten times it.
const MORPHIUM_REQUESTS_PER_SECOND: f64 = 89.0;

pub(crate) struct DbBench {
    base: Config,
    sizes: Sizes,
    raw: Client,
}

fn failed(what: &str, error: impl std::fmt::Display) -> Failure {
    fail(
        format!("{what}: {error}"),
        "check the server (`intracom doctor`); INTRACOM_LOG=debug shows more",
    )
}

impl DbBench {
    pub async fn connect(config: &Config, sizes: &Sizes) -> Result<Self, Failure> {
        let raw = Client::with_uri_str(&config.db.uri)
            .await
            .map_err(|e| failed("raw driver client", e))?;
        Ok(DbBench {
            base: config.clone(),
            sizes: sizes.clone(),
            raw,
        })
    }

    /// The server's version and topology, for the report's header.
    pub async fn server_description(&self) -> Option<String> {
        let admin = self.raw.database("admin");
        let info = admin.run_command(doc! { "buildInfo": 1 }).await.ok()?;
        let hello = admin.run_command(doc! { "hello": 1 }).await.ok();
        let version = info.get_str("version").unwrap_or("?");
        let set = hello
            .as_ref()
            .and_then(|h| h.get_str("setName").ok())
            .map(|s| format!(", replica set {s}"))
            .unwrap_or_else(|| ", standalone".into());
        Some(format!("server version {version}{set}"))
    }

    pub async fn run(&self, which: Which, progress: &mut Progress) -> Result<Vec<Figure>, Failure> {
        match which {
            Which::Publish => self.publish(progress).await,
            Which::Concurrent => self.concurrent(progress).await,
            Which::Batch => self.batch(progress).await,
            Which::Latency => self.latency(progress).await,
            Which::Memory => self.memory(progress).await,
            Which::Request => self.request(progress).await,
            Which::Work => self.work(progress).await,
            Which::Fanout => Ok(Vec::new()),
        }
    }

    // ---- grounds: a fresh database per side of a round ----

    fn fresh() -> String {
        format!(
            "intracom_bench_{}",
            intracom::message::new_id().to_lowercase()
        )
    }

    async fn bus(&self, database: &str, instance: &str) -> Result<Intracom, Failure> {
        Ok(Intracom::connect(bench_config(&self.base, Some(database), instance)).await?)
    }

    /// A fresh database set up by intracom, for a raw side.
    async fn raw_ground(&self) -> Result<(String, Collection<Document>), Failure> {
        let database = Self::fresh();
        self.bus(&database, "bench-setup").await?.shutdown().await;
        let messages = self
            .raw
            .database(&database)
            .collection::<Document>(&self.base.db.messages);
        Ok((database, messages))
    }

    async fn drop(&self, database: &str) {
        if let Err(error) = self.raw.database(database).drop().await {
            tracing::warn!(%error, database, "bench database not dropped");
        }
    }

    // ---- publish ----

    async fn publish(&self, progress: &mut Progress) -> Result<Vec<Figure>, Failure> {
        let m = self.sizes.messages;
        let mut vs_insert = Figure::new(
            "publish.sequential",
            format!("publish, one at a time (×{m})"),
            "publish",
            "insert_one".into(),
            "msg/s",
            Compare::Ratio,
            Some((Op::AtLeast, 0.95)),
        );
        let mut vs_update = Figure::new(
            "publish.sequential.same_update",
            format!("publish, one at a time (×{m})"),
            "publish",
            "the same update command, raw".into(),
            "msg/s",
            Compare::Ratio,
            None,
        );
        for round in 0..self.sizes.rounds {
            let sides: Vec<(&str, Side<'_, f64>)> = vec![
                ("intracom publish", Box::pin(self.publish_ours(m, 1))),
                ("raw insert_one", Box::pin(self.insert_raw(m, 1))),
                ("raw update", Box::pin(self.update_raw(m, 1))),
            ];
            let rates = take_turns(round, progress, "publish", sides).await?;
            vs_insert.push(rates[0], rates[1]);
            vs_update.push(rates[0], rates[2]);
        }
        Ok(vec![vs_insert, vs_update])
    }

    async fn concurrent(&self, progress: &mut Progress) -> Result<Vec<Figure>, Failure> {
        let (m, p) = (self.sizes.messages, self.sizes.publishers);
        let mut figure = Figure::new(
            "publish.concurrent",
            format!("publish, {p} publishers (×{m})"),
            "publish",
            format!("{p} × insert_one"),
            "msg/s",
            Compare::Ratio,
            Some((Op::AtLeast, 0.95)),
        );
        let mut vs_update = Figure::new(
            "publish.concurrent.same_update",
            format!("publish, {p} publishers (×{m})"),
            "publish",
            format!("{p} × the same update command, raw"),
            "msg/s",
            Compare::Ratio,
            None,
        );
        for round in 0..self.sizes.rounds {
            let sides: Vec<(&str, Side<'_, f64>)> = vec![
                ("intracom publish", Box::pin(self.publish_ours(m, p))),
                ("raw insert_one", Box::pin(self.insert_raw(m, p))),
                ("raw update", Box::pin(self.update_raw_concurrent(m, p))),
            ];
            let rates = take_turns(round, progress, "concurrent publishers", sides).await?;
            figure.push(rates[0], rates[1]);
            vs_update.push(rates[0], rates[2]);
        }
        Ok(vec![figure, vs_update])
    }

    /// `total` publishes by `tasks` concurrent publishers; messages per second.
    async fn publish_ours(&self, total: usize, tasks: usize) -> Result<f64, Failure> {
        let database = Self::fresh();
        let bus = self.bus(&database, "bench-1").await?;
        let publisher = bus.clone();
        let rate = concurrent_rate(total, tasks, move || {
            let bus = publisher.clone();
            async move {
                let published = bus
                    .publish(sample())
                    .await
                    .map_err(|e| failed("publish", e))?;
                if published.status != PublishStatus::Stored {
                    return Err(failed("publish", format!("{:?}", published.status)));
                }
                Ok(())
            }
        })
        .await;
        bus.shutdown().await;
        self.drop(&database).await;
        rate
    }

    /// The raw side of publish: what a service does without intracom, building the
    /// same document (client-side `ts` and `at`, since an insert cannot take server
    /// stamps) and inserting it.
    async fn insert_raw(&self, total: usize, tasks: usize) -> Result<f64, Failure> {
        let (database, messages) = self.raw_ground().await?;
        let collection = messages.clone();
        let rate = concurrent_rate(total, tasks, move || {
            let messages = collection.clone();
            async move {
                let document = raw_document().map_err(|e| failed("raw document", e))?;
                messages
                    .insert_one(document)
                    .await
                    .map_err(|e| failed("raw insert_one", e))?;
                Ok(())
            }
        })
        .await;
        self.drop(&database).await;
        rate
    }

    /// The update command intracom sends, sent raw: one statement per command.
    async fn update_raw(&self, total: usize, batch: usize) -> Result<f64, Failure> {
        let (database, messages) = self.raw_ground().await?;
        let db = self.raw.database(&database);
        let collection = messages.name().to_string();
        let send = |count: usize| {
            let db = db.clone();
            let collection = collection.clone();
            async move {
                let statements = (0..count)
                    .map(|_| upsert_statement(&sample()))
                    .collect::<Result<Vec<_>, _>>()?;
                let reply = db
                    .run_command(
                        doc! { "update": collection, "updates": statements, "ordered": true },
                    )
                    .await
                    .map_err(|e| failed("raw update", e))?;
                if reply.contains_key("writeErrors") {
                    return Err(failed("raw update", reply));
                }
                Ok::<(), Failure>(())
            }
        };
        send(1).await?;
        let started = Instant::now();
        let mut done = 0;
        while done < total {
            let n = batch.min(total - done);
            send(n).await?;
            done += n;
        }
        let rate = rate(done, started.elapsed());
        self.drop(&database).await;
        Ok(rate)
    }

    /// The update command intracom sends, sent raw by `tasks` concurrent publishers,
    /// one statement per command.
    async fn update_raw_concurrent(&self, total: usize, tasks: usize) -> Result<f64, Failure> {
        let (database, messages) = self.raw_ground().await?;
        let db = self.raw.database(&database);
        let collection: Arc<str> = messages.name().into();
        let rate = concurrent_rate(total, tasks, move || {
            let (db, collection) = (db.clone(), Arc::clone(&collection));
            async move {
                let statement = upsert_statement(&sample())?;
                let reply = db
                    .run_command(doc! {
                        "update": &*collection, "updates": [statement], "ordered": true,
                    })
                    .await
                    .map_err(|e| failed("raw update", e))?;
                if reply.contains_key("writeErrors") {
                    return Err(failed("raw update", reply));
                }
                Ok(())
            }
        })
        .await;
        self.drop(&database).await;
        rate
    }

    // ---- batch ----

    async fn batch(&self, progress: &mut Progress) -> Result<Vec<Figure>, Failure> {
        let (b, k) = (self.sizes.batch, self.sizes.batches);
        let mut vs_insert = Figure::new(
            "publish.batch",
            format!("publish_all of {b} (×{k})"),
            "publish_all",
            format!("insert_many of {b}"),
            "msg/s",
            Compare::Ratio,
            Some((Op::AtLeast, 0.6)),
        );
        let mut vs_update = Figure::new(
            "publish.batch.same_update",
            format!("publish_all of {b} (×{k})"),
            "publish_all",
            format!("the same update of {b}, raw"),
            "msg/s",
            Compare::Ratio,
            None,
        );
        for round in 0..self.sizes.rounds {
            let sides: Vec<(&str, Side<'_, f64>)> = vec![
                (
                    "intracom publish_all",
                    Box::pin(self.publish_all_ours(b, k)),
                ),
                ("raw insert_many", Box::pin(self.insert_many_raw(b, k))),
                ("raw update", Box::pin(self.update_raw(b * k, b))),
            ];
            let rates = take_turns(round, progress, "batch publish", sides).await?;
            vs_insert.push(rates[0], rates[1]);
            vs_update.push(rates[0], rates[2]);
        }
        Ok(vec![vs_insert, vs_update])
    }

    async fn publish_all_ours(&self, batch: usize, batches: usize) -> Result<f64, Failure> {
        let database = Self::fresh();
        let bus = self.bus(&database, "bench-1").await?;
        bus.publish(sample()).await?;
        let started = Instant::now();
        for _ in 0..batches {
            let published = bus
                .publish_all((0..batch).map(|_| sample()).collect())
                .await?;
            if published.iter().any(|p| p.status != PublishStatus::Stored) {
                return Err(failed("publish_all", "a message was not stored now"));
            }
        }
        let rate = rate(batch * batches, started.elapsed());
        bus.shutdown().await;
        self.drop(&database).await;
        Ok(rate)
    }

    async fn insert_many_raw(&self, batch: usize, batches: usize) -> Result<f64, Failure> {
        let (database, messages) = self.raw_ground().await?;
        let one = raw_document().map_err(|e| failed("raw document", e))?;
        messages
            .insert_one(one)
            .await
            .map_err(|e| failed("raw insert_one", e))?;
        let started = Instant::now();
        for _ in 0..batches {
            let documents = (0..batch)
                .map(|_| raw_document())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| failed("raw document", e))?;
            messages
                .insert_many(documents)
                .await
                .map_err(|e| failed("raw insert_many", e))?;
        }
        let rate = rate(batch * batches, started.elapsed());
        self.drop(&database).await;
        Ok(rate)
    }

    // ---- latency ----

    async fn latency(&self, progress: &mut Progress) -> Result<Vec<Figure>, Failure> {
        let n = self.sizes.samples;
        let mut p50 = Figure::new(
            "latency.p50",
            format!("publish → delivery p50 (×{n})"),
            "publish + subscriber",
            "insert_one + watch()".into(),
            "ms",
            Compare::Difference,
            Some((Op::AtMost, 0.2)),
        );
        let mut p99 = Figure::new(
            "latency.p99",
            format!("publish → delivery p99 (×{n})"),
            "publish + subscriber",
            "insert_one + watch()".into(),
            "ms",
            Compare::Ratio,
            Some((Op::AtMost, 1.2)),
        );
        for round in 0..self.sizes.rounds {
            let sides: Vec<(&str, Side<'_, Vec<Duration>>)> = vec![
                (
                    "intracom publish → subscriber",
                    Box::pin(self.latency_ours(n)),
                ),
                ("raw insert → watch()", Box::pin(self.latency_raw(n))),
            ];
            let mut found = take_turns(round, progress, "latency", sides).await?;
            let (mut ours, mut raw) = (found.remove(0), found.remove(0));
            p50.push(quantile_ms(&mut ours, 0.5), quantile_ms(&mut raw, 0.5));
            p99.push(quantile_ms(&mut ours, 0.99), quantile_ms(&mut raw, 0.99));
        }
        Ok(vec![p50, p99])
    }

    async fn latency_ours(&self, samples: usize) -> Result<Vec<Duration>, Failure> {
        let database = Self::fresh();
        let bus = self.bus(&database, "bench-1").await?;
        let mut sub = bus
            .subscribe(Subscription::new().actions(["reload"]))
            .await?;
        let mut out = Vec::with_capacity(samples);
        for i in 0..samples + 5 {
            let message = sample();
            let id = message.id.clone();
            let started = Instant::now();
            bus.publish(message).await?;
            loop {
                let delivery = tokio::time::timeout(PATIENCE, sub.next())
                    .await
                    .map_err(|_| failed("latency", "no delivery within 30 s"))?
                    .ok_or_else(|| failed("latency", "the subscription ended"))??;
                if delivery.id == id {
                    break;
                }
            }
            if i >= 5 {
                out.push(started.elapsed());
            }
        }
        bus.shutdown().await;
        self.drop(&database).await;
        Ok(out)
    }

    async fn latency_raw(&self, samples: usize) -> Result<Vec<Duration>, Failure> {
        let (database, messages) = self.raw_ground().await?;
        let out = write_watch_round_trips(&messages, samples).await?;
        self.drop(&database).await;
        Ok(out)
    }

    // ---- memory ----

    async fn memory(&self, progress: &mut Progress) -> Result<Vec<Figure>, Failure> {
        let (s, n) = (self.sizes.subscribers, self.sizes.memory_messages);
        let mut figure = Figure::new(
            "memory.subscribers",
            format!("process memory growth over {n} messages, {s} subscribers vs 1"),
            "subscribers",
            "1 subscriber".into(),
            "MiB",
            Compare::Ratio,
            Some((Op::AtMost, 1.5)),
        );
        for round in 0..self.sizes.rounds {
            let sides: Vec<(&str, Side<'_, f64>)> = vec![
                (
                    "many subscribers (own process)",
                    Box::pin(self.memory_side(s, n)),
                ),
                (
                    "one subscriber (own process)",
                    Box::pin(self.memory_side(1, n)),
                ),
            ];
            let growth = take_turns(round, progress, "memory", sides).await?;
            figure.push(growth[0], growth[1]);
        }
        Ok(vec![figure])
    }

    async fn memory_side(&self, subscribers: usize, messages: usize) -> Result<f64, Failure> {
        let database = Self::fresh();
        let config = bench_config(&self.base, Some(&database), "bench-memory");
        let growth = memory_in_child(&config, subscribers, messages).await;
        self.drop(&database).await;
        Ok(growth? / (1024.0 * 1024.0))
    }

    // ---- request/reply ----

    async fn request(&self, progress: &mut Progress) -> Result<Vec<Figure>, Failure> {
        let (c, s, r) = (self.sizes.callers, self.sizes.servers, self.sizes.requests);
        let mut throughput = Figure::new(
            "request.throughput",
            format!("request/reply, {c} callers, {s} serving instances (×{r})"),
            "requests",
            "Morphium's published figure".into(),
            "req/s",
            Compare::Ratio,
            Some((Op::AtLeast, 10.0)),
        );
        let mut round_trip = Figure::new(
            "request.round_trip",
            format!("request/reply p50 round trip, {c} callers"),
            "request",
            "one insert_one + watch() round trip".into(),
            "ms",
            Compare::Ratio,
            Some((Op::AtMost, 3.0)),
        );
        // The same requests from one caller: the round trip without queueing behind the
        // other callers' claims.
        let alone = self.sizes.samples.min(r);
        let mut round_trip_alone = Figure::new(
            "request.round_trip.one_caller",
            format!("request/reply p50 round trip, 1 caller (×{alone})"),
            "request",
            "one insert_one + watch() round trip".into(),
            "ms",
            Compare::Ratio,
            Some((Op::AtMost, 3.0)),
        );
        // The same exchange done with the raw driver: how much of the round trip is the
        // exchange itself (three writes, two change events) rather than intracom.
        let mut round_trip_same = Figure::new(
            "request.round_trip.same_exchange",
            format!("request/reply p50 round trip, 1 caller (×{alone})"),
            "request",
            format!(
                "the same exchange, raw ({s} serving tasks: insert, findAndModify, update, \
                 change streams)"
            ),
            "ms",
            Compare::Ratio,
            None,
        );
        for round in 0..self.sizes.rounds {
            let sides: Vec<(&str, Side<'_, (f64, f64)>)> = vec![
                (
                    "intracom request/serve",
                    Box::pin(self.request_ours(c, s, r)),
                ),
                (
                    "intracom request/serve, 1 caller",
                    Box::pin(self.request_ours(1, s, alone)),
                ),
                (
                    "raw insert → watch()",
                    Box::pin(async {
                        let mut trips = self.latency_raw(self.sizes.samples).await?;
                        Ok((f64::NAN, quantile_ms(&mut trips, 0.5)))
                    }),
                ),
                (
                    "raw request exchange, 1 caller",
                    Box::pin(async {
                        let mut trips = self.request_raw(s, alone).await?;
                        Ok((f64::NAN, quantile_ms(&mut trips, 0.5)))
                    }),
                ),
            ];
            let found = take_turns(round, progress, "request/reply", sides).await?;
            throughput.push(found[0].0, MORPHIUM_REQUESTS_PER_SECOND);
            round_trip.push(found[0].1, found[2].1);
            round_trip_alone.push(found[1].1, found[2].1);
            round_trip_same.push(found[1].1, found[3].1);
        }
        Ok(vec![
            throughput,
            round_trip,
            round_trip_alone,
            round_trip_same,
        ])
    }

    /// What a request is, done with the raw driver: one caller and `servers` serving
    /// tasks, each with a change stream of its own as separate processes have. The
    /// caller inserts the request; every server sees the insert and tries to claim it
    /// (`findAndModify` of the pending, unleased request, with a lease stamped by the
    /// server), the winner answers with an update, and the caller sees that update on
    /// its stream. `samples` sequential round trips.
    async fn request_raw(&self, servers: usize, samples: usize) -> Result<Vec<Duration>, Failure> {
        let (database, messages) = self.raw_ground().await?;
        let mut serving = Vec::with_capacity(servers);
        for i in 0..servers {
            let messages = messages.clone();
            let mut stream = messages
                .watch()
                .pipeline([doc! { "$match": { "operationType": "insert" } }])
                .await
                .map_err(|e| failed("raw watch", e))?;
            let owner = format!("bench-raw-server-{i}");
            serving.push(tokio::spawn(async move {
                while let Some(event) = stream.next().await {
                    let event: ChangeStreamEvent<Document> = event?;
                    let Some(id) = event.document_key.and_then(|mut k| k.remove("_id")) else {
                        continue;
                    };
                    let claimed = messages
                        .find_one_and_update(
                            doc! { "_id": &id, "state": "pending", "lease": Bson::Null },
                            raw_claim(&owner),
                        )
                        .return_document(ReturnDocument::After)
                        .await?;
                    let Some(claimed) = claimed else { continue };
                    let answer = claimed.get_document("query").cloned().unwrap_or_default();
                    messages
                        .update_one(
                            doc! { "_id": &id, "state": "pending", "lease.owner": &owner },
                            raw_done(Some(answer)),
                        )
                        .await?;
                }
                Ok::<(), mongodb::error::Error>(())
            }));
        }
        // The caller: its own stream, on which the answering update shows.
        let answered = doc! { "$match": {
            "operationType": "update",
            "updateDescription.updatedFields.state": { "$exists": true },
        } };
        let out = round_trips(&messages, answered, samples, raw_request).await;
        for task in serving {
            task.abort();
        }
        self.drop(&database).await;
        out
    }

    /// Requests per second and the p50 round trip in ms.
    async fn request_ours(
        &self,
        callers: usize,
        servers: usize,
        requests: usize,
    ) -> Result<(f64, f64), Failure> {
        let database = Self::fresh();
        let caller = self.bus(&database, "bench-caller").await?;
        let mut serving = Vec::with_capacity(servers);
        for i in 0..servers {
            let bus = self.bus(&database, &format!("bench-server-{i}")).await?;
            let worker = bus.serve(SERVICE, "echo", |query: Document| async move {
                Ok::<_, String>(query)
            })?;
            serving.push((bus, worker));
        }
        let run = |count: usize| {
            let per_caller = count.div_ceil(callers);
            let handles: Vec<_> = (0..callers)
                .map(|n| {
                    let caller = caller.clone();
                    tokio::spawn(async move {
                        let mut trips = Vec::with_capacity(per_caller);
                        for i in 0..per_caller {
                            let started = Instant::now();
                            let answer: Document = caller
                                .request(
                                    SERVICE,
                                    "echo",
                                    &doc! { "caller": n as i64, "i": i as i64 },
                                )
                                .timeout(PATIENCE)
                                .await?;
                            if answer.get_i64("i").ok() != Some(i as i64) {
                                return Err(intracom::Error::refused(
                                    "db",
                                    format!("wrong answer {answer}"),
                                ));
                            }
                            trips.push(started.elapsed());
                        }
                        Ok::<_, intracom::Error>(trips)
                    })
                })
                .collect();
            async move {
                let mut trips = Vec::new();
                for handle in handles {
                    trips.extend(
                        handle
                            .await
                            .map_err(|e| failed("caller task", e))?
                            .map_err(|e| failed("request", e))?,
                    );
                }
                Ok::<Vec<Duration>, Failure>(trips)
            }
        };
        run(callers).await?; // warm-up: the hubs, the pools
        let started = Instant::now();
        let mut trips = run(requests).await?;
        let elapsed = started.elapsed();
        let throughput = rate(trips.len(), elapsed);
        let p50 = quantile_ms(&mut trips, 0.5);
        for (bus, worker) in serving {
            worker.stop().await;
            bus.shutdown().await;
        }
        caller.shutdown().await;
        self.drop(&database).await;
        Ok((throughput, p50))
    }

    // ---- work queue ----

    async fn work(&self, progress: &mut Progress) -> Result<Vec<Figure>, Failure> {
        let (w, j) = (self.sizes.workers, self.sizes.jobs);
        let mut figure = Figure::new(
            "work.claim_settle",
            format!("work queue, {w} workers, no-op jobs (×{j})"),
            "claim + settle",
            "findAndModify + update".into(),
            "µs/job",
            Compare::Ratio,
            Some((Op::AtMost, 1.2)),
        );
        for round in 0..self.sizes.rounds {
            let sides: Vec<(&str, Side<'_, f64>)> = vec![
                ("intracom workers", Box::pin(self.work_ours(w, j))),
                ("raw claim + settle", Box::pin(self.work_raw(w, j))),
            ];
            let found = take_turns(round, progress, "work queue", sides).await?;
            figure.push(found[0], found[1]);
        }
        Ok(vec![figure])
    }

    async fn queue_jobs(&self, bus: &Intracom, jobs: usize) -> Result<(), Failure> {
        let mut left = jobs;
        while left > 0 {
            let n = left.min(1000);
            bus.publish_all(
                (0..n)
                    .map(|_| Message::to_service(SERVICE, "job").work())
                    .collect(),
            )
            .await?;
            left -= n;
        }
        Ok(())
    }

    /// Microseconds per job for `workers` intracom workers doing `jobs` queued no-op jobs.
    async fn work_ours(&self, workers: usize, jobs: usize) -> Result<f64, Failure> {
        let database = Self::fresh();
        let bus = self.bus(&database, "bench-worker").await?;
        self.queue_jobs(&bus, jobs).await?;
        // The shared change stream the workers wake on is opened before the clock starts.
        let _open = bus.subscribe(Subscription::new().actions(["job"])).await?;
        let done = Arc::new(AtomicUsize::new(0));
        let messages = self
            .raw
            .database(&database)
            .collection::<Document>(&self.base.db.messages);
        let started = Instant::now();
        let mut running = Vec::with_capacity(workers);
        for _ in 0..workers {
            let done = Arc::clone(&done);
            running.push(bus.work(
                SERVICE,
                &["job"],
                WorkOptions::default(),
                move |_job: Message| {
                    done.fetch_add(1, Ordering::Relaxed);
                    async { Ok::<(), String>(()) }
                },
            )?);
        }
        // Handlers ran; the last settles follow them by a round trip.
        let deadline = Instant::now() + PATIENCE;
        loop {
            if done.load(Ordering::Relaxed) >= jobs {
                let pending = messages
                    .count_documents(doc! { "state": "pending" })
                    .await
                    .map_err(|e| failed("count", e))?;
                if pending == 0 {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(failed("work", "the jobs were not all settled within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = started.elapsed();
        for worker in running {
            worker.stop().await;
        }
        bus.shutdown().await;
        self.drop(&database).await;
        Ok(elapsed.as_secs_f64() * 1e6 / jobs as f64)
    }

    /// The raw commands a claim and a settle consist of (the same filter, sort and
    /// updates as the MongoDB medium's), by `workers` tasks until the queue is empty.
    async fn work_raw(&self, workers: usize, jobs: usize) -> Result<f64, Failure> {
        let database = Self::fresh();
        let bus = self.bus(&database, "bench-setup").await?;
        self.queue_jobs(&bus, jobs).await?;
        bus.shutdown().await;
        let messages = self
            .raw
            .database(&database)
            .collection::<Document>(&self.base.db.messages);
        let started = Instant::now();
        let handles: Vec<_> = (0..workers)
            .map(|n| {
                let messages = messages.clone();
                tokio::spawn(async move {
                    let owner = format!("raw-{n}");
                    loop {
                        let lease_end = doc! { "$dateAdd": { "startDate": "$lease.at", "unit": "millisecond", "amount": "$lease.ms" } };
                        let claimed = messages
                            .find_one_and_update(
                                doc! { "$and": [
                                    { "serviceNameDest": SERVICE, "delivery": "one", "state": "pending" },
                                    { "action": { "$in": ["job"] } },
                                    { "$or": [
                                        { "lease": Bson::Null },
                                        { "$expr": { "$lte": [lease_end, "$$NOW"] } },
                                    ] },
                                ] },
                                raw_claim(&owner),
                            )
                            .sort(doc! { "priority": -1, "ts": 1 })
                            .return_document(ReturnDocument::After)
                            .await?;
                        let Some(job) = claimed else { break };
                        let id = job.get_str("_id").unwrap_or_default().to_string();
                        messages
                            .update_one(
                                doc! { "_id": id, "state": "pending", "lease.owner": &owner },
                                raw_done(None),
                            )
                            .await?;
                    }
                    Ok::<(), mongodb::error::Error>(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .await
                .map_err(|e| failed("raw worker task", e))?
                .map_err(|e| failed("raw claim", e))?;
        }
        let elapsed = started.elapsed();
        self.drop(&database).await;
        Ok(elapsed.as_secs_f64() * 1e6 / jobs as f64)
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Operations per second of `total` operations shared by `tasks` concurrent tasks,
/// after a warm-up of one operation per task (the pool's connections); `op` makes one
/// operation.
async fn concurrent_rate<F, Fut>(total: usize, tasks: usize, op: F) -> Result<f64, Failure>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), Failure>> + Send + 'static,
{
    let run = |count: usize| {
        let per_task = count.div_ceil(tasks);
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let op = op.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        op().await?;
                    }
                    Ok::<(), Failure>(())
                })
            })
            .collect();
        async move {
            for handle in handles {
                handle.await.map_err(|e| failed("bench task", e))??;
            }
            Ok::<usize, Failure>(per_task * tasks)
        }
    };
    run(tasks).await?;
    let started = Instant::now();
    let done = run(total).await?;
    Ok(rate(done, started.elapsed()))
}

/// `samples` sequential round trips of one raw insert seen by a raw change stream. The
/// stream is read by a task of its own, as a service would (and as intracom's shared
/// stream is), so its `getMore` waits while the insert is on its way.
async fn write_watch_round_trips(
    messages: &Collection<Document>,
    samples: usize,
) -> Result<Vec<Duration>, Failure> {
    let inserted = doc! { "$match": { "operationType": "insert" } };
    round_trips(messages, inserted, samples, |_| raw_document()).await
}

/// `samples` sequential round trips, after five to warm up: insert the document that
/// `make(i)` makes, then wait until a raw change stream with `pipeline` shows an event
/// for it. The stream is read by a task of its own, as a service would (and as
/// intracom's shared stream is), so its `getMore` waits while the insert is on its way.
async fn round_trips(
    messages: &Collection<Document>,
    pipeline: Document,
    samples: usize,
    make: impl Fn(usize) -> Result<Document, bson::ser::Error>,
) -> Result<Vec<Duration>, Failure> {
    let mut stream = messages
        .watch()
        .pipeline([pipeline])
        .await
        .map_err(|e| failed("raw watch", e))?;
    let (seen, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let mut reader = tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            let event: ChangeStreamEvent<Document> = event?;
            let id = event.document_key.and_then(|mut k| k.remove("_id"));
            if seen.send(id).is_err() {
                break;
            }
        }
        Ok::<(), mongodb::error::Error>(())
    });
    let trips = async {
        let mut out = Vec::with_capacity(samples);
        for i in 0..samples + 5 {
            let document = make(i).map_err(|e| failed("raw document", e))?;
            let id = document.get("_id").cloned();
            let started = Instant::now();
            messages
                .insert_one(document)
                .await
                .map_err(|e| failed("raw insert_one", e))?;
            loop {
                let arrived = tokio::time::timeout(PATIENCE, arrivals.recv())
                    .await
                    .map_err(|_| failed("raw watch", "no event within 30 s"))?;
                match arrived {
                    Some(arrived) if arrived == id => break,
                    Some(_) => {}
                    None => {
                        let error = match (&mut reader).await {
                            Ok(Err(e)) => e.to_string(),
                            _ => "the stream ended".to_string(),
                        };
                        return Err(failed("raw watch", error));
                    }
                }
            }
            if i >= 5 {
                out.push(started.elapsed());
            }
        }
        Ok(out)
    }
    .await;
    reader.abort();
    trips
}

/// The update of a raw claim, as intracom's claim writes it: the lease (owner, server
/// time, 30 s) and one more attempt.
pub(super) fn raw_claim(owner: &str) -> Document {
    doc! {
        "$set": { "lease.owner": owner, "lease.ms": 30_000_i64 },
        "$currentDate": { "lease.at": true },
        "$inc": { "attempts": 1 },
    }
}

/// The update that settles raw claimed work as done (with its result, if any) and
/// releases the lease.
pub(super) fn raw_done(result: Option<Document>) -> Document {
    let mut set = doc! { "state": "done", "response_ts": now_nanos() };
    if let Some(result) = result {
        set.insert("result", result);
    }
    doc! { "$set": set, "$unset": { "lease": "" } }
}

/// A message as a service without intracom would insert it: the same fields, with
/// `ts` and `at` from the client (an insert cannot take server stamps).
fn raw_document() -> Result<Document, bson::ser::Error> {
    static INCREMENT: AtomicU32 = AtomicU32::new(1);
    let mut message = sample();
    message.source_service = SERVICE.to_string();
    message.source_instance = "bench-raw".to_string();
    let mut document = bson::to_document(&message)?;
    let now = bson::DateTime::now();
    document.insert(
        "ts",
        Timestamp {
            time: u32::try_from(now.timestamp_millis() / 1000).unwrap_or(u32::MAX),
            increment: INCREMENT.fetch_add(1, Ordering::Relaxed),
        },
    );
    document.insert("at", now);
    Ok(document)
}

/// A request as a caller without intracom would insert it: pending work for the bench
/// service's `echo`, with client-side `ts` and `at` as in [`raw_document`].
fn raw_request(i: usize) -> Result<Document, bson::ser::Error> {
    let mut message = Message::to_service(SERVICE, "echo").body(doc! { "i": i as i64 });
    message.source_service = SERVICE.to_string();
    message.source_instance = "bench-raw".to_string();
    message.delivery = intracom::DeliveryMode::One;
    message.state = Some(intracom::State::Pending);
    message.query_id = Some(message.id.clone());
    message.query_ms = Some(30_000);
    let mut document = bson::to_document(&message)?;
    let now = bson::DateTime::now();
    document.insert(
        "ts",
        Timestamp {
            time: u32::try_from(now.timestamp_millis() / 1000).unwrap_or(u32::MAX),
            increment: 1 + u32::try_from(i).unwrap_or(u32::MAX - 1),
        },
    );
    document.insert("at", now);
    Ok(document)
}

/// The statement intracom's MongoDB medium sends to publish a message (see
/// `MongoMedium::append`): an upsert that only inserts, stamped by the server.
fn upsert_statement(message: &Message) -> Result<Document, Failure> {
    let mut message = message.clone();
    message.source_service = SERVICE.to_string();
    message.source_instance = "bench-raw".to_string();
    let mut body = bson::to_document(&message).map_err(|e| failed("encode", e))?;
    let id = body.remove("_id").unwrap_or(Bson::Null);
    Ok(doc! {
        "q": { "_id": id, "ts": { "$exists": false } },
        "u": {
            "$setOnInsert": body,
            "$currentDate": { "ts": { "$type": "timestamp" }, "at": { "$type": "date" } },
        },
        "upsert": true,
    })
}
