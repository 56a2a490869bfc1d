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
//! Each map holds at most as many entries as its bound (`cache_max_projects`,
//! `cache_max_customers`, across projects: a [`BoundedMap`]); past it the entry read longest
//! ago is dropped, and read again when needed. As only what the database says again is cached,
//! eviction never changes an answer: a customer's budget, block and period are the database's.
//!
//! [`ReserveOutcome::Unknown`]: tollgate_core::ledger::ReserveOutcome::Unknown

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tollgate_core::Db;
use tollgate_core::bounded::BoundedMap;
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

/// The customer row a call is charged to, as far as the proxy needs to know it.
#[derive(Debug, Clone)]
pub struct CustomerRef {
    pub id: CustomerId,
    pub period: BudgetPeriod,
}

/// Project configurations, and customers by project and external id, for [`CACHE_TTL`].
pub struct ProxyCache {
    configs: Mutex<BoundedMap<ProjectId, Arc<CallConfig>>>,
    customers: Mutex<BoundedMap<(ProjectId, String), CustomerRef>>,
}

impl ProxyCache {
    /// At most `projects` configurations and `customers` customers.
    pub fn new(projects: usize, customers: usize) -> Self {
        Self {
            configs: Mutex::new(BoundedMap::with_ttl(projects, CACHE_TTL)),
            customers: Mutex::new(BoundedMap::with_ttl(customers, CACHE_TTL)),
        }
    }

    /// How many configurations and customers are cached (expired entries dropped first).
    pub fn sizes(&self) -> (usize, usize) {
        let configs = self.configs.lock().map_or(0, |mut c| c.sweep());
        let customers = self.customers.lock().map_or(0, |mut c| c.sweep());
        (configs, customers)
    }

    /// The most configurations and customers held.
    pub fn capacities(&self) -> (usize, usize) {
        let configs = self.configs.lock().map_or(0, |c| c.capacity());
        let customers = self.customers.lock().map_or(0, |c| c.capacity());
        (configs, customers)
    }

    /// The project's provider connections and prices.
    pub async fn config(
        &self,
        db: &Db,
        master_key: &MasterKey,
        project: &ProjectId,
    ) -> Result<Arc<CallConfig>, DbError> {
        if let Ok(configs) = self.configs.lock()
            && let Some(config) = configs.get(project)
        {
            return Ok(config.clone());
        }
        let config = Arc::new(projects::call_config(db, master_key, project).await?);
        if let Ok(mut configs) = self.configs.lock() {
            configs.insert(project.clone(), config.clone());
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
        let key = (project.id.clone(), external_id.to_owned());
        if let Ok(customers) = self.customers.lock()
            && let Some(customer) = customers.get(&key)
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
            customers.insert(key, customer.clone());
        }
        Ok(customer)
    }

    /// Drops one customer (the ledger found it deleted or changed).
    pub fn forget_customer(&self, project: &ProjectId, external_id: &str) {
        if let Ok(mut customers) = self.customers.lock() {
            customers.remove(&(project.clone(), external_id.to_owned()));
        }
    }

    pub fn forget_project(&self, project: &ProjectId) {
        if let Ok(mut configs) = self.configs.lock() {
            configs.remove(project);
        }
        if let Ok(mut customers) = self.customers.lock() {
            customers.retain(|(of_project, _), _| of_project != project);
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
