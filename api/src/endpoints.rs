//! The list of endpoints the router is built from. Each entry names its method and path
//! next to its handler, so the list cannot drift from what is served; tests read it (the
//! access-control matrix must have a row for every endpoint).

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;

use crate::state::AppState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Delete => "DELETE",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Put => MethodFilter::PUT,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

#[derive(Default)]
pub struct Endpoints {
    entries: Vec<(Verb, &'static str, MethodRouter<AppState>)>,
}

impl Endpoints {
    pub fn add<H, T>(&mut self, verb: Verb, path: &'static str, handler: H)
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add_limited(verb, path, handler, None);
    }

    /// With a request body limit of its own.
    pub fn add_limited<H, T>(
        &mut self,
        verb: Verb,
        path: &'static str,
        handler: H,
        body_limit: Option<usize>,
    ) where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let mut method_router = on(verb.filter(), handler);
        if let Some(limit) = body_limit {
            method_router = method_router.layer(DefaultBodyLimit::max(limit));
        }
        self.entries.push((verb, path, method_router));
    }

    /// (method, path) of every endpoint, in registration order.
    pub fn list(&self) -> Vec<(&'static str, &'static str)> {
        self.entries
            .iter()
            .map(|(verb, path, _)| (verb.as_str(), *path))
            .collect()
    }

    /// The router: one route per path, its methods merged.
    pub fn into_router(self) -> Router<AppState> {
        let mut paths: Vec<(&'static str, MethodRouter<AppState>)> = vec![];
        for (_, path, method_router) in self.entries {
            match paths.iter().position(|(p, _)| *p == path) {
                Some(i) => {
                    let (p, existing) = paths.remove(i);
                    paths.insert(i, (p, existing.merge(method_router)));
                }
                None => paths.push((path, method_router)),
            }
        }
        paths
            .into_iter()
            .fold(Router::new(), |router, (path, method_router)| {
                router.route(path, method_router)
            })
    }
}

/// Every endpoint the API serves.
pub fn all() -> Endpoints {
    let mut endpoints = Endpoints::default();
    crate::routes::register(&mut endpoints);
    crate::console::register(&mut endpoints);
    endpoints
}

/// (method, path) of every endpoint the API serves.
pub fn list() -> Vec<(&'static str, &'static str)> {
    all().list()
}
