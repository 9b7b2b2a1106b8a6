//! The sender/action catalog.
//!
//! Why it exists: the configuration lists which services may send on the bus and which actions
//! each declares (`common.intracom.senders.list`, `common.intracom.actions.<service>`).
//! A message from an unknown sender, or with an action its target does not declare, is
//! refused before anything is written, so a typo cannot put a message on the bus that
//! no consumer understands. The catalog lives in the medium's config store (the
//! `config` collection on MongoDB), so every process sees what any process registered.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::medium::{CatalogMap, Medium};
use crate::message::{check_name, Message};

/// The catalog, as seen by one bus handle: a cache over the medium's store.
///
/// A check that fails against the cache reloads the store once before refusing, so a
/// service registered by another process is accepted without a restart.
#[derive(Clone)]
pub struct Catalog {
    medium: Arc<dyn Medium>,
    cache: Arc<RwLock<CatalogMap>>,
    /// When the cache was last reloaded for a delivery check (see [`Catalog::screen`]).
    last_screen_refresh: Arc<std::sync::Mutex<Option<Instant>>>,
    /// Bumped after every change of the cache: a check that passed at a generation
    /// passes again while the generation is the same (see [`Catalog::generation`]).
    generation: Arc<AtomicU64>,
}

/// How often a delivered message with an undeclared action may reload the catalog.
const SCREEN_REFRESH: Duration = Duration::from_secs(1);

impl Catalog {
    pub(crate) fn new(medium: Arc<dyn Medium>) -> Self {
        Catalog {
            medium,
            cache: Arc::new(RwLock::new(CatalogMap::new())),
            last_screen_refresh: Arc::new(std::sync::Mutex::new(None)),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Adds a service and actions (a union with what is there; registering twice is a
    /// no-op).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = intracom::Intracom::connect(intracom::Config::default()).await?;
    /// bus.catalog().register("billing", ["invoice.created", "reload"]).await?;
    /// assert!(bus.catalog().actions("billing").unwrap().contains("reload"));
    /// # Ok::<(), intracom::Error>(()) }).unwrap();
    /// ```
    pub async fn register<I, S>(&self, service: &str, actions: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let actions: Vec<String> = actions.into_iter().map(Into::into).collect();
        check_name("service", service)?;
        for action in &actions {
            check_name("action", action)?;
        }
        self.medium.catalog_add(service, &actions).await?;
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        cache
            .entry(service.to_string())
            .or_default()
            .extend(actions);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Reloads the catalog from the medium.
    pub async fn refresh(&self) -> Result<()> {
        let fresh = self.medium.catalog_load().await?;
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Changes whenever the cache changes (a registration, a reload): a message the
    /// cache admitted stays admitted while this is the same.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The cached catalog (call [`Catalog::refresh`] first for the medium's latest).
    pub fn snapshot(&self) -> CatalogMap {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The actions a service declares, from the cache.
    pub fn actions(&self, service: &str) -> Option<BTreeSet<String>> {
        self.cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
    }

    /// Checks that a message may be published: its sender is catalogued, and its action
    /// is declared by the target service (or, for a broadcast to every service, by the
    /// sender).
    pub async fn check(&self, message: &Message) -> Result<()> {
        match self.check_cached(message) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.refresh().await?;
                self.check_cached(message)
            }
        }
    }

    /// Checks a message that arrived from the medium. Unlike [`Catalog::check`], a miss
    /// reloads the catalog at most once a second, so a flood of undeclared messages
    /// cannot turn into a flood of catalog reads on the delivery path.
    pub(crate) async fn screen(&self, message: &Message) -> Result<()> {
        let Err(error) = self.check_cached(message) else {
            return Ok(());
        };
        let due = {
            let mut last = self
                .last_screen_refresh
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|at| at.elapsed() >= SCREEN_REFRESH);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if !due {
            return Err(error);
        }
        self.refresh().await?;
        self.check_cached(message)
    }

    fn check_cached(&self, message: &Message) -> Result<()> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(&message.source_service) {
            return Err(Error::UnknownSender {
                service: message.source_service.clone(),
            });
        }
        let owner = message
            .dest_service
            .as_ref()
            .unwrap_or(&message.source_service);
        let declared = cache.get(owner);
        if declared.is_some_and(|actions| actions.contains(&message.action)) {
            return Ok(());
        }
        Err(Error::UnknownAction {
            service: owner.clone(),
            action: message.action.clone(),
            declared: declared
                .map(|a| a.iter().cloned().collect::<Vec<_>>().join(","))
                .unwrap_or_else(|| "service not in catalog".into()),
        })
    }
}
