//! Project keys on the proxy: `Authorization: Bearer <key>` (OpenAI SDKs) or
//! `x-api-key: <key>` (Anthropic SDKs). Keys are stored and looked up by their SHA-256.
//!
//! Lookups go through a [`KeyCache`]: a key's project is read from the database at most once
//! per [`CACHE_TTL`] (like the rest of what the proxy caches, [`super::cache`]), so a
//! revocation made anywhere takes effect on every replica within that time, and at once on
//! the replica that made it ([`KeyCache::forget_project`]). Unknown
//! keys are cached too, so a client hammering with a wrong key does not hammer the database.
//! `last_used_at` is written at most once a minute per key, off the request's path.
//!
//! Both maps hold at most `cache_max_keys` entries ([`BoundedMap`]): past that the key looked
//! up longest ago is dropped and, when it comes again, read again from the database — a
//! revoked key stays refused, and at worst a key's last use is written once more.

use std::sync::Mutex;
use std::time::Duration;

use axum::http::HeaderMap;
use tollgate_core::bounded::BoundedMap;
use tollgate_core::ids::{KeyId, ProjectId};
use tollgate_core::projects::{self, Project};
use tollgate_core::time::UnixMillis;
use tollgate_core::tokens;

use super::cache::CACHE_TTL;
use super::error::ProxyError;
use crate::state::AppState;

const LAST_USED_EVERY: Duration = Duration::from_secs(60);

/// A live key and its project.
#[derive(Debug, Clone)]
pub struct KeyGrant {
    pub key_id: KeyId,
    pub kind: String,
    pub project: Project,
}

/// Key hash → grant (`None`: no live key has that hash), for [`CACHE_TTL`]; and the keys whose
/// last use was written in the last [`LAST_USED_EVERY`].
pub struct KeyCache {
    entries: Mutex<BoundedMap<String, Option<KeyGrant>>>,
    last_used: Mutex<BoundedMap<KeyId, ()>>,
}

impl KeyCache {
    /// At most `capacity` keys in each map.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(BoundedMap::with_ttl(capacity, CACHE_TTL)),
            last_used: Mutex::new(BoundedMap::with_ttl(capacity, LAST_USED_EVERY)),
        }
    }

    fn cached(&self, hash: &str) -> Option<Option<KeyGrant>> {
        let entries = self.entries.lock().ok()?;
        entries.get(hash).cloned()
    }

    fn store(&self, hash: String, grant: Option<KeyGrant>) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(hash, grant);
        }
    }

    /// Drops every cached key of `project` (after a revocation or a settings change).
    pub fn forget_project(&self, project: &ProjectId) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|_, grant| grant.as_ref().is_none_or(|g| &g.project.id != project));
        }
    }

    /// Whether `key`'s `last_used_at` is due a write (and notes that it is being written).
    fn last_used_due(&self, key: &KeyId) -> bool {
        let Ok(mut seen) = self.last_used.lock() else { return false };
        if seen.get(key).is_some() {
            return false;
        }
        seen.insert(key.clone(), ());
        true
    }

    /// How many keys are cached, and how many have a recent last use noted (expired entries
    /// dropped first).
    pub fn sizes(&self) -> (usize, usize) {
        let entries = self.entries.lock().map_or(0, |mut e| e.sweep());
        let last_used = self.last_used.lock().map_or(0, |mut e| e.sweep());
        (entries, last_used)
    }

    /// The most keys each map holds.
    pub fn capacity(&self) -> usize {
        self.entries.lock().map_or(0, |e| e.capacity())
    }
}

/// The key presented with a request, if any.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let value = value.trim();
        if let Some(key) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) {
            return Some(key.trim());
        }
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

/// The live key a request carries, with its project.
pub async fn grant(state: &AppState, headers: &HeaderMap) -> Result<KeyGrant, ProxyError> {
    let key = presented_key(headers).filter(|k| !k.is_empty()).ok_or_else(|| {
        ProxyError::Unauthorized(
            "You didn't provide an API key. Pass a Tollgate project key as `Authorization: Bearer <key>` or `x-api-key`."
                .to_owned(),
        )
    })?;
    let hash = projects::hash_key(key);
    let grant = match state.keys.cached(&hash) {
        Some(grant) => grant,
        None => {
            let grant = match projects::find_key_by_hash(&state.db, &hash).await? {
                Some(owner) => projects::get_project(&state.db, &owner.project_id).await?.map(|project| KeyGrant {
                    key_id: owner.key_id,
                    kind: owner.kind,
                    project,
                }),
                None => None,
            };
            state.keys.store(hash, grant.clone());
            grant
        }
    };
    let grant = grant
        .ok_or_else(|| ProxyError::Unauthorized("Incorrect API key provided, or the key was revoked.".to_owned()))?;
    if state.keys.last_used_due(&grant.key_id) {
        let (db, key_id) = (state.db.clone(), grant.key_id.clone());
        tokio::spawn(async move {
            if let Err(e) = projects::touch_key(&db, &key_id, UnixMillis::now()).await {
                tracing::warn!(error = %e, "could not record a key's last use");
            }
        });
    }
    Ok(grant)
}

/// The header that carries a customer token with a publishable key.
pub const CUSTOMER_TOKEN_HEADER: &str = "x-tollgate-customer-token";

/// Who is calling: the project, and (publishable keys) the customer its token names.
#[derive(Debug, Clone)]
pub struct Caller {
    pub project: Project,
    /// With a publishable key, the only customer the call may be charged to.
    pub token_customer: Option<String>,
    /// With a publishable key, when its token was issued: a customer deleted since then is
    /// not created again by this call.
    pub token_issued_at: Option<UnixMillis>,
}

/// The project a request's key belongs to. A secret key is enough; a publishable key also
/// needs a valid, unexpired customer token of the same project (`X-Tollgate-Customer-Token`).
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ProxyError> {
    let grant = grant(state, headers).await?;
    if grant.kind == "secret" {
        return Ok(Caller { project: grant.project, token_customer: None, token_issued_at: None });
    }
    let token = headers.get(CUSTOMER_TOKEN_HEADER).and_then(|v| v.to_str().ok()).ok_or_else(|| {
        ProxyError::Unauthorized(
            "A publishable key needs a customer token in the X-Tollgate-Customer-Token header; your backend mints one with POST /api/v1/customer-tokens."
                .to_owned(),
        )
    })?;
    let claims = tokens::verify(&state.master_key, token, UnixMillis::now()).map_err(|e| {
        ProxyError::Unauthorized(format!("{}: mint a new one from your backend.", capitalize(&e.to_string())))
    })?;
    if claims.project != grant.project.id {
        return Err(ProxyError::Unauthorized("The customer token belongs to another project.".to_owned()));
    }
    let issued_at = claims.issued_at();
    Ok(Caller { project: grant.project, token_customer: Some(claims.customer), token_issued_at: Some(issued_at) })
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}
