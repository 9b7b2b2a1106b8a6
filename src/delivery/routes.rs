//! The local route: handlers served in this process, by (service, action).
//!
//! Why it exists: a request whose handler is served in the same process is called
//! directly instead of crossing the medium. The bus holds the table; the work layer
//! fills it when a service is served and reads it when a request is made.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bson::Document;
use futures::future::BoxFuture;

use crate::message::Message;

/// A type-erased handler: the message in, an optional result document or an error out.
pub(crate) type Handler = Arc<
    dyn Fn(Message) -> BoxFuture<'static, std::result::Result<Option<Document>, String>>
        + Send
        + Sync,
>;

/// The handlers served in this process, by (service, action): the local route.
#[derive(Default)]
pub(crate) struct LocalRoutes {
    routes: RwLock<HashMap<(String, String), Handler>>,
}

impl LocalRoutes {
    pub(crate) fn get(&self, service: &str, action: &str) -> Option<Handler> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes
            .get(&(service.to_string(), action.to_string()))
            .cloned()
    }

    pub(crate) fn insert(&self, service: &str, action: &str, handler: Handler) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.insert((service.to_string(), action.to_string()), handler);
    }

    pub(crate) fn remove(&self, service: &str, action: &str) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.remove(&(service.to_string(), action.to_string()));
    }
}
