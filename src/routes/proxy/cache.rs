//! What the proxy reads on every call and may keep for [`CACHE_TTL`]: a project's
//! configuration ([`CallConfig`]: provider connections with their keys decrypted, and price
//! overrides) and which customer row a tenant's customer id names — beside project keys,
//! cached the same way in [`super::auth`]. A change made anywhere takes effect on every replica
//! within that time, and at once on the replica that made it ([`AppState::forget_project`]).
//!
//! Budgets are never cached: the ledger checks them in the database on every call. A cached
//! customer is only its row id and budget period, and the reservation itself says when either
//! is stale (the row deleted, the period changed: [`ReserveOutcome::Unknown`]), so the caller
//! forgets it and looks again; whether it is blocked is read by the reservation too.
//!
//! [`ReserveOutcome::Unknown`]: tollgate_core::ledger::ReserveOutcome::Unknown

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate_core::Db;
use tollgate_core::crypto::MasterKey;
use tollgate_core::db::DbError;
use tollgate_core::ids::{CustomerId, ProjectId};
use tollgate_core::ledger::Ledger;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::projects::{self, CallConfig, NewCustomer, Project, ProjectError};
use tollgate_core::time::UnixMillis;

use crate::state::AppState;

/// How long a cached key, project configuration or customer is trusted before the database
/// is asked again.
pub const CACHE_TTL: Duration = Duration::from_secs(2);
/// Past this many entries a map starts over (bounded memory under a flood of new names).
const MAX_ENTRIES: usize = 100_000;

struct Timed<T> {
    value: T,
    fetched: Instant,
}

impl<T> Timed<T> {
    fn new(value: T) -> Self {
        Self { value, fetched: Instant::now() }
    }

    fn fresh(&self) -> Option<&T> {
        (self.fetched.elapsed() < CACHE_TTL).then_some(&self.value)
    }
}

/// The customer row a call is charged to, as far as the proxy needs to know it.
#[derive(Debug, Clone)]
pub struct CustomerRef {
    pub id: CustomerId,
    pub period: BudgetPeriod,
}

type Customers = HashMap<String, Timed<CustomerRef>>;

/// Project configurations and customers, per project, for [`CACHE_TTL`].
#[derive(Default)]
pub struct ProxyCache {
    configs: Mutex<HashMap<ProjectId, Timed<Arc<CallConfig>>>>,
    customers: Mutex<HashMap<ProjectId, Customers>>,
}

impl ProxyCache {
    /// The project's provider connections and prices.
    pub async fn config(
        &self,
        db: &Db,
        master_key: &MasterKey,
        project: &ProjectId,
    ) -> Result<Arc<CallConfig>, DbError> {
        if let Ok(configs) = self.configs.lock()
            && let Some(config) = configs.get(project).and_then(Timed::fresh)
        {
            return Ok(config.clone());
        }
        let config = Arc::new(projects::call_config(db, master_key, project).await?);
        if let Ok(mut configs) = self.configs.lock() {
            if configs.len() >= MAX_ENTRIES {
                configs.clear();
            }
            configs.insert(project.clone(), Timed::new(config.clone()));
        }
        Ok(config)
    }

    /// The customer `external_id` of `project`, created with the project's default budget
    /// when first seen — unless it was deleted at or after `unless_deleted_since` (the issue
    /// time of the customer token the call carries): then `NotFound("customer")`.
    pub async fn customer(
        &self,
        db: &Db,
        ledger: &Ledger,
        project: &Project,
        external_id: &str,
        unless_deleted_since: Option<UnixMillis>,
    ) -> Result<CustomerRef, ProjectError> {
        if let Ok(customers) = self.customers.lock()
            && let Some(customer) = customers.get(&project.id).and_then(|c| c.get(external_id)).and_then(Timed::fresh)
        {
            return Ok(customer.clone());
        }
        let id = projects::validate_external_id(external_id)?;
        let row = match projects::find_customer(db, &project.id, id).await? {
            Some(row) => row,
            None => ledger
                .customer(NewCustomer::of(project, id).unless_deleted_since(unless_deleted_since))
                .await?
                .ok_or(ProjectError::NotFound("customer"))?,
        };
        let customer = CustomerRef { period: row.period(), id: row.id };
        if let Ok(mut customers) = self.customers.lock() {
            let of_project = customers.entry(project.id.clone()).or_default();
            if of_project.len() >= MAX_ENTRIES {
                of_project.clear();
            }
            of_project.insert(external_id.to_owned(), Timed::new(customer.clone()));
        }
        Ok(customer)
    }

    /// Drops one customer (the ledger found it deleted or changed).
    pub fn forget_customer(&self, project: &ProjectId, external_id: &str) {
        if let Ok(mut customers) = self.customers.lock()
            && let Some(of_project) = customers.get_mut(project)
        {
            of_project.remove(external_id);
        }
    }

    pub fn forget_project(&self, project: &ProjectId) {
        if let Ok(mut configs) = self.configs.lock() {
            configs.remove(project);
        }
        if let Ok(mut customers) = self.customers.lock() {
            customers.remove(project);
        }
    }
}

impl AppState {
    /// Drops what this process keeps of `project` (keys, providers, prices, customers), after
    /// a change.
    pub fn forget_project(&self, project: &ProjectId) {
        self.keys.forget_project(project);
        self.proxy_cache.forget_project(project);
    }
}
