//! The project configuration the proxy reads on every call — its provider connections (keys
//! decrypted) and its model prices — kept in memory for [`CACHE_TTL`], like project keys
//! ([`super::auth`]): a change made anywhere takes effect on every replica within that time, and
//! at once on the replica that made it ([`AppState::forget_project`]). Budgets are never cached:
//! the ledger checks them in the database on every call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate_core::Db;
use tollgate_core::crypto::MasterKey;
use tollgate_core::db::DbError;
use tollgate_core::ids::ProjectId;
use tollgate_core::pricing::Price;
use tollgate_core::projects::{self, Provider};

use crate::state::AppState;

/// How long a project's configuration is trusted before the database is asked again.
pub const CACHE_TTL: Duration = super::auth::KEY_CACHE_TTL;
/// Past this many entries a map starts over (bounded memory under a flood of unknown models).
const MAX_ENTRIES: usize = 100_000;

struct Timed<T> {
    value: T,
    fetched: Instant,
}

type TimedMap<K, T> = Mutex<HashMap<K, Timed<T>>>;

/// Providers per project and prices per (project, model), for [`CACHE_TTL`].
#[derive(Default)]
pub struct ConfigCache {
    providers: TimedMap<ProjectId, Arc<Vec<Provider>>>,
    prices: TimedMap<(ProjectId, String), Option<Price>>,
}

fn fresh<K: std::hash::Hash + Eq, T: Clone>(map: &TimedMap<K, T>, key: &K) -> Option<T> {
    let map = map.lock().ok()?;
    map.get(key).filter(|e| e.fetched.elapsed() < CACHE_TTL).map(|e| e.value.clone())
}

fn keep<K: std::hash::Hash + Eq, T>(map: &TimedMap<K, T>, key: K, value: T) {
    if let Ok(mut map) = map.lock() {
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(key, Timed { value, fetched: Instant::now() });
    }
}

impl ConfigCache {
    /// The project's provider connections, in the order they were added.
    pub async fn providers(
        &self,
        db: &Db,
        master_key: &MasterKey,
        project: &ProjectId,
    ) -> Result<Arc<Vec<Provider>>, DbError> {
        if let Some(providers) = fresh(&self.providers, project) {
            return Ok(providers);
        }
        let providers = Arc::new(projects::list_providers(db, master_key, project).await?);
        keep(&self.providers, project.clone(), providers.clone());
        Ok(providers)
    }

    /// The price of `model` in the project (its override, else the shipped table), if any.
    pub async fn price(&self, db: &Db, project: &ProjectId, model: &str) -> Result<Option<Price>, DbError> {
        let key = (project.clone(), model.to_owned());
        if let Some(price) = fresh(&self.prices, &key) {
            return Ok(price);
        }
        let price = projects::price_for(db, project, model).await?;
        keep(&self.prices, key, price);
        Ok(price)
    }

    pub fn forget_project(&self, project: &ProjectId) {
        if let Ok(mut providers) = self.providers.lock() {
            providers.remove(project);
        }
        if let Ok(mut prices) = self.prices.lock() {
            prices.retain(|(p, _), _| p != project);
        }
    }
}

impl AppState {
    /// Drops what this process keeps of `project` (keys, providers, prices), after a change.
    pub fn forget_project(&self, project: &ProjectId) {
        self.keys.forget_project(project);
        self.config_cache.forget_project(project);
    }
}
