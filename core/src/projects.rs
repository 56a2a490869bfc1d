//! Projects and what hangs off them: keys, provider connections, price overrides and
//! end-customers. The dashboard, the management API and `tollgate admin` all call these.

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::crypto::{MasterKey, SealedFor};
use crate::currency::Currency;
use crate::db::{Db, DbError, is_unique_violation};
use crate::ids::{CustomerId, KeyId, OrgId, ProjectId, ProviderId};
use crate::money::Nanos;
use crate::period::BudgetPeriod;
use crate::pricing::{Price, Tokenizer};
use crate::time::UnixMillis;
use crate::with_db;

/// What to do when a call's worst case does not fit the customer's remaining budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPolicy {
    /// Lower the call's max output to what the budget pays for (at least `min_output_tokens`).
    Clamp,
    /// Refuse the call with 402.
    Reject,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Project {
    pub id: ProjectId,
    pub org_id: OrgId,
    pub name: String,
    pub currency: String,
    pub budget_policy: String,
    pub min_output_tokens: i64,
    /// The max output of a call that names none; None: the model's own limit.
    pub default_max_output_tokens: Option<i64>,
    pub markup_bps: i64,
    pub default_budget_nanos: i64,
    pub default_budget_period: String,
    pub customer_from_user: bool,
    pub default_customer: Option<String>,
    pub estimate_margin_bps: i64,
    /// Whether a call interrupted by its process's death is billed at what it had reserved
    /// (else it is recorded, not billed). See [`crate::instances`].
    pub bill_interrupted: bool,
    /// What a call whose cost Tollgate cannot bound from the request reserves (billed nanos);
    /// None: such calls are refused. See the proxy's admission rule.
    pub unbounded_call_ceiling_nanos: Option<i64>,
    /// Nano-units of the project's currency one US dollar is worth, for the shipped prices
    /// (which are in USD). None outside USD: only the project's own prices apply.
    pub usd_rate_nanos: Option<i64>,
}

impl Project {
    pub fn policy(&self) -> BudgetPolicy {
        if self.budget_policy == "reject" { BudgetPolicy::Reject } else { BudgetPolicy::Clamp }
    }

    pub fn default_period(&self) -> BudgetPeriod {
        BudgetPeriod::parse(&self.default_budget_period).unwrap_or(BudgetPeriod::Month)
    }

    /// The per-call ceiling under which calls Tollgate cannot bound are admitted, if any.
    pub fn unbounded_call_ceiling(&self) -> Option<Nanos> {
        self.unbounded_call_ceiling_nanos.map(Nanos)
    }

    /// What one USD of a shipped price is in the project's currency, if shipped prices apply.
    pub fn shipped_price_rate(&self) -> Option<Nanos> {
        shipped_price_rate(&self.currency, self.usd_rate_nanos)
    }
}

/// One USD in `currency`: itself in a USD project, else the project's rate if it set one.
fn shipped_price_rate(currency: &str, usd_rate_nanos: Option<i64>) -> Option<Nanos> {
    if currency.eq_ignore_ascii_case("usd") {
        Some(Nanos(crate::money::NANOS_PER_UNIT))
    } else {
        usd_rate_nanos.filter(|r| *r > 0).map(Nanos)
    }
}

const PROJECT_COLUMNS: &str = "id, org_id, name, currency, budget_policy, min_output_tokens, \
    default_max_output_tokens, markup_bps, default_budget_nanos, default_budget_period, customer_from_user, \
    default_customer, estimate_margin_bps, bill_interrupted, unbounded_call_ceiling_nanos, usd_rate_nanos";

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("no such {0}")]
    NotFound(&'static str),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for ProjectError {
    fn from(e: sqlx::Error) -> Self {
        ProjectError::Db(e.into())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ProjectError {
    ProjectError::Invalid { field, reason: reason.into() }
}

/// The default max output of a new project. A call that names no limit is reserved for this,
/// not for the model's whole limit (128,000 tokens on gpt-5): a customer's budget then admits
/// that many more concurrent calls, and under `clamp` the first call of a burst no longer
/// takes the whole remaining budget. 4,096 tokens (some 3,000 words) holds a long answer,
/// and is the whole limit of many models (gpt-4-turbo, gpt-3.5-turbo, Claude 3 Haiku), so
/// clients already live with it. A reasoning model spends its hidden reasoning from the same
/// limit, so a call that needs more should name its own (the answer says it was cut:
/// `finish_reason: "length"`, `stop_reason: "max_tokens"`).
pub const DEFAULT_MAX_OUTPUT_TOKENS: i64 = 4_096;
/// The largest default max output a project may set (more than any model produces).
const MAX_DEFAULT_MAX_OUTPUT_TOKENS: i64 = 1_000_000;

/// The largest USD rate a project may set: a million units of its currency to the dollar
/// (far above any currency Stripe charges in).
const MAX_USD_RATE: Nanos = Nanos(1_000_000 * crate::money::NANOS_PER_UNIT);

fn check_usd_rate(rate: Option<Nanos>) -> Option<ProjectError> {
    let rate = rate?;
    (rate <= Nanos::ZERO || rate > MAX_USD_RATE)
        .then(|| invalid("USD exchange rate", "must be more than zero and at most 1000000 (empty: no shipped prices)"))
}

/// Checks a default max output (None: the model's limit) against the minimum clamped output.
fn check_default_max_output(default: Option<i64>, min_output_tokens: i64) -> Option<ProjectError> {
    let default = default?;
    if !(1..=MAX_DEFAULT_MAX_OUTPUT_TOKENS).contains(&default) {
        return Some(invalid("default max output", format!("must be between 1 and {MAX_DEFAULT_MAX_OUTPUT_TOKENS}")));
    }
    (default < min_output_tokens).then(|| invalid("default max output", "must not be below the minimum output tokens"))
}

/// Settings of a new project; `Default` is what the dashboard pre-fills.
#[derive(Debug, Clone)]
pub struct NewProject {
    pub name: String,
    /// Fixed once the project exists: every amount in it is in this currency.
    pub currency: Currency,
    /// See [`Project::usd_rate_nanos`]; ignored for USD.
    pub usd_rate: Option<Nanos>,
    pub policy: BudgetPolicy,
    pub markup_bps: i64,
    pub default_budget: Nanos,
    pub default_period: BudgetPeriod,
    pub min_output_tokens: i64,
    pub default_max_output_tokens: Option<i64>,
}

impl Default for NewProject {
    fn default() -> Self {
        Self {
            name: String::new(),
            currency: Currency::usd(),
            usd_rate: None,
            policy: BudgetPolicy::Clamp,
            markup_bps: 0,
            default_budget: Nanos::ZERO,
            default_period: BudgetPeriod::Month,
            min_output_tokens: 16,
            default_max_output_tokens: Some(DEFAULT_MAX_OUTPUT_TOKENS),
        }
    }
}

pub async fn create_project(db: &Db, org: &OrgId, new: &NewProject) -> Result<Project, ProjectError> {
    let name = new.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(invalid("name", "must be 1 to 100 characters"));
    }
    if new.markup_bps < 0 || new.markup_bps > 1_000_000 {
        return Err(invalid("markup", "must be between 0 % and 10000 %"));
    }
    if new.default_budget.is_negative() {
        return Err(invalid("default budget", "must not be negative"));
    }
    if new.min_output_tokens < 1 {
        return Err(invalid("minimum output tokens", "must be at least 1"));
    }
    if let Some(problem) = check_usd_rate(new.usd_rate) {
        return Err(problem);
    }
    if let Some(problem) = check_default_max_output(new.default_max_output_tokens, new.min_output_tokens) {
        return Err(problem);
    }
    let id = ProjectId::generate();
    const SQL: &str = "INSERT INTO projects (id, org_id, name, budget_policy, min_output_tokens, \
        default_max_output_tokens, markup_bps, default_budget_nanos, default_budget_period, created_at, currency, \
        usd_rate_nanos) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";
    let usd_rate = new.usd_rate.filter(|_| new.currency.as_str() != "usd").map(|r| r.0);
    let policy = match new.policy {
        BudgetPolicy::Clamp => "clamp",
        BudgetPolicy::Reject => "reject",
    };
    with_db!(db, pool => sqlx::query(SQL)
        .bind(&id).bind(org).bind(name).bind(policy).bind(new.min_output_tokens)
        .bind(new.default_max_output_tokens).bind(new.markup_bps)
        .bind(new.default_budget.0).bind(new.default_period.as_str()).bind(UnixMillis::now().0)
        .bind(new.currency.as_str()).bind(usd_rate)
        .execute(pool).await.map(|_| ()))?;
    get_project(db, &id).await?.ok_or(ProjectError::NotFound("project"))
}

pub async fn get_project(db: &Db, id: &ProjectId) -> Result<Option<Project>, ProjectError> {
    let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1");
    Ok(
        with_db!(db, pool => sqlx::query_as::<_, Project>(sqlx::AssertSqlSafe(sql.clone())).bind(id).fetch_optional(pool).await)?,
    )
}

/// Everything about a project a tenant can change after creating it.
#[derive(Debug, Clone)]
pub struct ProjectSettings {
    pub name: String,
    pub policy: BudgetPolicy,
    pub min_output_tokens: i64,
    pub default_max_output_tokens: Option<i64>,
    pub markup_bps: i64,
    pub default_budget: Nanos,
    pub default_period: BudgetPeriod,
    pub customer_from_user: bool,
    pub default_customer: Option<String>,
    pub estimate_margin_bps: i64,
    pub bill_interrupted: bool,
    /// None: calls whose cost Tollgate cannot bound are refused.
    pub unbounded_call_ceiling: Option<Nanos>,
    /// See [`Project::usd_rate_nanos`]; ignored in a USD project.
    pub usd_rate: Option<Nanos>,
}

impl ProjectSettings {
    pub fn of(project: &Project) -> Self {
        Self {
            name: project.name.clone(),
            policy: project.policy(),
            min_output_tokens: project.min_output_tokens,
            default_max_output_tokens: project.default_max_output_tokens,
            markup_bps: project.markup_bps,
            default_budget: Nanos(project.default_budget_nanos),
            default_period: project.default_period(),
            customer_from_user: project.customer_from_user,
            default_customer: project.default_customer.clone(),
            estimate_margin_bps: project.estimate_margin_bps,
            bill_interrupted: project.bill_interrupted,
            unbounded_call_ceiling: project.unbounded_call_ceiling(),
            usd_rate: project.usd_rate_nanos.map(Nanos),
        }
    }

    /// Every problem with these settings, by field.
    pub fn problems(&self) -> Vec<ProjectError> {
        let mut problems = Vec::new();
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            problems.push(invalid("name", "must be 1 to 100 characters"));
        }
        if !(0..=1_000_000).contains(&self.markup_bps) {
            problems.push(invalid("markup", "must be between 0 % and 10000 %"));
        }
        if self.default_budget.is_negative() {
            problems.push(invalid("default budget", "must not be negative"));
        }
        if !(1..=1_000_000).contains(&self.min_output_tokens) {
            problems.push(invalid("minimum output tokens", "must be between 1 and 1000000"));
        }
        problems.extend(check_default_max_output(self.default_max_output_tokens, self.min_output_tokens));
        if !(0..=100_000).contains(&self.estimate_margin_bps) {
            problems.push(invalid("estimate margin", "must be between 0 % and 1000 %"));
        }
        problems.extend(check_usd_rate(self.usd_rate));
        if self.unbounded_call_ceiling.is_some_and(|c| c <= Nanos::ZERO) {
            problems.push(invalid("per-call ceiling", "must be more than zero (empty: refuse such calls)"));
        }
        if let Some(default) = &self.default_customer
            && let Err(e) = validate_external_id(default)
        {
            problems.push(match e {
                ProjectError::Invalid { reason, .. } => ProjectError::Invalid { field: "default customer", reason },
                other => other,
            });
        }
        problems
    }
}

/// Saves a project's settings (all checked first: nothing is half-saved).
pub async fn update_project(
    db: &Db,
    org: &OrgId,
    id: &ProjectId,
    settings: &ProjectSettings,
) -> Result<Project, ProjectError> {
    if let Some(problem) = settings.problems().into_iter().next() {
        return Err(problem);
    }
    const SQL: &str = "UPDATE projects SET name = $1, budget_policy = $2, min_output_tokens = $3, markup_bps = $4, \
        default_budget_nanos = $5, default_budget_period = $6, customer_from_user = $7, default_customer = $8, \
        estimate_margin_bps = $9, default_max_output_tokens = $10, bill_interrupted = $13, \
        unbounded_call_ceiling_nanos = $14, \
        usd_rate_nanos = CASE WHEN currency = 'usd' THEN NULL ELSE $15 END WHERE id = $11 AND org_id = $12";
    let policy = match settings.policy {
        BudgetPolicy::Clamp => "clamp",
        BudgetPolicy::Reject => "reject",
    };
    let default_customer = settings.default_customer.as_deref().map(str::trim).filter(|c| !c.is_empty());
    let n = with_db!(db, pool => sqlx::query(SQL)
        .bind(settings.name.trim()).bind(policy).bind(settings.min_output_tokens).bind(settings.markup_bps)
        .bind(settings.default_budget.0).bind(settings.default_period.as_str()).bind(settings.customer_from_user)
        .bind(default_customer).bind(settings.estimate_margin_bps).bind(settings.default_max_output_tokens)
        .bind(id).bind(org).bind(settings.bill_interrupted).bind(settings.unbounded_call_ceiling.map(|c| c.0))
        .bind(settings.usd_rate.map(|r| r.0))
        .execute(pool).await.map(|r| r.rows_affected()))?;
    if n == 0 {
        return Err(ProjectError::NotFound("project"));
    }
    get_project(db, id).await?.ok_or(ProjectError::NotFound("project"))
}

/// Deletes a project of `org` with everything in it (keys, connections, customers, usage).
pub async fn delete_project(db: &Db, org: &OrgId, id: &ProjectId) -> Result<bool, DbError> {
    const SQL: &str = "DELETE FROM projects WHERE id = $1 AND org_id = $2";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(id).bind(org).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// A project of `org` (None for another organization's project: callers answer 404).
pub async fn get_project_in_org(db: &Db, org: &OrgId, id: &ProjectId) -> Result<Option<Project>, ProjectError> {
    let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1 AND org_id = $2");
    Ok(with_db!(db, pool => sqlx::query_as::<_, Project>(sqlx::AssertSqlSafe(sql.clone())).bind(id).bind(org)
        .fetch_optional(pool).await)?)
}

/// An organization's projects, by name.
pub async fn list_projects(db: &Db, org: &OrgId) -> Result<Vec<Project>, ProjectError> {
    let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE org_id = $1 ORDER BY name, id");
    Ok(with_db!(db, pool => sqlx::query_as::<_, Project>(sqlx::AssertSqlSafe(sql.clone())).bind(org)
        .fetch_all(pool).await)?)
}

// ---------------------------------------------------------------------------------------
// Keys

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Secret,
    Publishable,
}

impl KeyKind {
    fn as_str(self) -> &'static str {
        match self {
            KeyKind::Secret => "secret",
            KeyKind::Publishable => "publishable",
        }
    }
}

/// A freshly created key: `plaintext` is shown once and never stored.
#[derive(Debug)]
pub struct CreatedKey {
    pub id: KeyId,
    pub plaintext: String,
    pub prefix: String,
}

/// The SHA-256 of a presented key, as stored. Keys are 190 random bits, so a fast hash
/// is as safe as a slow one here and keeps the lookup on the hot path cheap.
pub fn hash_key(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

pub async fn create_key(db: &Db, project: &ProjectId, kind: KeyKind, name: &str) -> Result<CreatedKey, ProjectError> {
    let name = name.trim();
    if name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(invalid("name", "must be at most 100 printable characters"));
    }
    let mut secret = [0u8; 24];
    rand::fill(&mut secret);
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let marker = match kind {
        KeyKind::Secret => "sk",
        KeyKind::Publishable => "pk",
    };
    let plaintext = format!("tg_{marker}_{body}");
    let prefix: String = plaintext.chars().take(12).collect();
    let id = KeyId::generate();
    const SQL: &str = "INSERT INTO api_keys (id, project_id, kind, name, prefix, key_hash, created_at) \
                       VALUES ($1, $2, $3, $4, $5, $6, $7)";
    with_db!(db, pool => sqlx::query(SQL)
        .bind(&id).bind(project).bind(kind.as_str()).bind(if name.is_empty() { "key" } else { name })
        .bind(&prefix).bind(hash_key(&plaintext)).bind(UnixMillis::now().0)
        .execute(pool).await.map(|_| ()))?;
    Ok(CreatedKey { id, plaintext, prefix })
}

/// The project a presented key belongs to, if the key exists and is not revoked.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyOwner {
    pub key_id: KeyId,
    pub project_id: ProjectId,
    pub kind: String,
}

pub async fn find_key(db: &Db, plaintext: &str) -> Result<Option<KeyOwner>, DbError> {
    find_key_by_hash(db, &hash_key(plaintext)).await
}

/// Like [`find_key`], for a key already hashed with [`hash_key`].
pub async fn find_key_by_hash(db: &Db, hash: &str) -> Result<Option<KeyOwner>, DbError> {
    const SQL: &str = "SELECT id AS key_id, project_id, kind FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL";
    Ok(with_db!(db, pool => sqlx::query_as::<_, KeyOwner>(SQL).bind(hash).fetch_optional(pool).await)?)
}

/// Records that a key was used at `at` (callers throttle this).
pub async fn touch_key(db: &Db, key: &KeyId, at: UnixMillis) -> Result<(), DbError> {
    const SQL: &str = "UPDATE api_keys SET last_used_at = $1 WHERE id = $2";
    Ok(with_db!(db, pool => sqlx::query(SQL).bind(at.0).bind(key).execute(pool).await.map(|_| ()))?)
}

/// A key as the dashboard lists it (never the key itself).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeySummary {
    pub id: KeyId,
    pub name: String,
    pub prefix: String,
    pub kind: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// A project's keys, live ones first, newest first.
pub async fn list_keys(db: &Db, project: &ProjectId) -> Result<Vec<KeySummary>, DbError> {
    const SQL: &str = "SELECT id, name, prefix, kind, created_at, last_used_at, revoked_at FROM api_keys \
                       WHERE project_id = $1 ORDER BY (revoked_at IS NOT NULL), created_at DESC, id";
    Ok(with_db!(db, pool => sqlx::query_as::<_, KeySummary>(SQL).bind(project).fetch_all(pool).await)?)
}

pub async fn revoke_key(db: &Db, project: &ProjectId, key: &KeyId) -> Result<bool, DbError> {
    const SQL: &str = "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND project_id = $3 AND revoked_at IS NULL";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(UnixMillis::now().0).bind(key).bind(project)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

// ---------------------------------------------------------------------------------------
// Provider connections

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
    OpenAiCompatible,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenAiCompatible => "openai_compatible",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(ProviderKind::OpenAi),
            "anthropic" => Some(ProviderKind::Anthropic),
            "openai_compatible" => Some(ProviderKind::OpenAiCompatible),
            _ => None,
        }
    }

    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::OpenAi => Some("https://api.openai.com/v1"),
            ProviderKind::Anthropic => Some("https://api.anthropic.com"),
            ProviderKind::OpenAiCompatible => None,
        }
    }
}

/// A provider connection with its credential decrypted, ready to call.
#[derive(Clone)]
pub struct Provider {
    pub id: ProviderId,
    pub kind: ProviderKind,
    pub base_url: String,
    pub api_key: secrecy::SecretString,
    pub models: Vec<String>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("base_url", &crate::egress::display_url(&self.base_url))
            .finish()
    }
}

impl Provider {
    /// Whether this connection serves `model` (exact name, or a prefix ending in `*`).
    pub fn serves(&self, model: &str) -> bool {
        serves(&self.models, model)
    }
}

/// Whether a connection serving `models` (names, or prefixes ending in `*`) serves `model`.
pub fn serves(models: &[String], model: &str) -> bool {
    models.iter().any(|m| match m.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => m == model,
    })
}

#[derive(Debug, Clone)]
pub struct NewProvider {
    pub kind: ProviderKind,
    pub name: String,
    pub base_url: Option<String>,
    pub api_key: String,
    pub models: Vec<String>,
}

pub async fn add_provider(
    db: &Db,
    key: &MasterKey,
    project: &ProjectId,
    new: &NewProvider,
) -> Result<ProviderId, ProjectError> {
    let base_url = match new.base_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
        Some(url) => url,
        None => new
            .kind
            .default_base_url()
            .ok_or_else(|| invalid("base URL", "is required for an OpenAI-compatible provider"))?,
    };
    // Kept as parsed, so what is called is what was checked.
    let base_url = crate::egress::check_base_url(base_url)
        .map_err(|e| invalid("base URL", e.to_string()))?
        .as_str()
        .trim_end_matches('/')
        .to_owned();
    let models: Vec<String> = new.models.iter().map(|m| m.trim().to_owned()).filter(|m| !m.is_empty()).collect();
    if models.is_empty() {
        return Err(invalid("models", "name at least one model (or a prefix such as gpt-*)"));
    }
    if models.iter().any(|m| m.contains(',')) {
        return Err(invalid("models", "a model name cannot contain a comma"));
    }
    let id = ProviderId::generate();
    const SQL: &str = "INSERT INTO provider_connections (id, project_id, kind, name, base_url, api_key_sealed, models, created_at) \
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
    let name = if new.name.trim().is_empty() { new.kind.as_str() } else { new.name.trim() };
    with_db!(db, pool => sqlx::query(SQL)
        .bind(&id).bind(project).bind(new.kind.as_str()).bind(name).bind(&base_url)
        .bind(key.seal(&new.api_key, &SealedFor::provider_api_key(&id))).bind(models.join(",")).bind(UnixMillis::now().0)
        .execute(pool).await.map(|_| ()))?;
    Ok(id)
}

#[derive(sqlx::FromRow)]
struct ProviderRow {
    id: ProviderId,
    kind: String,
    base_url: String,
    api_key_sealed: String,
    models: String,
}

/// The project's provider connections, oldest first (the first that serves a model wins).
/// A provider connection as the dashboard lists it: everything but the credential (and the
/// base URL without any user name, password or query a URL saved before they were refused
/// may hold).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProviderSummary {
    pub id: ProviderId,
    pub kind: String,
    pub name: String,
    pub base_url: String,
    pub models: String,
    pub created_at: i64,
}

pub async fn list_provider_summaries(db: &Db, project: &ProjectId) -> Result<Vec<ProviderSummary>, DbError> {
    const SQL: &str = "SELECT id, kind, name, base_url, models, created_at FROM provider_connections \
                       WHERE project_id = $1 ORDER BY created_at, id";
    let rows = with_db!(db, pool => sqlx::query_as::<_, ProviderSummary>(SQL).bind(project).fetch_all(pool).await)?;
    Ok(rows.into_iter().map(|p| ProviderSummary { base_url: crate::egress::display_url(&p.base_url), ..p }).collect())
}

/// Removes a provider connection of `project`; false if there was none.
pub async fn delete_provider(db: &Db, project: &ProjectId, provider: &ProviderId) -> Result<bool, DbError> {
    const SQL: &str = "DELETE FROM provider_connections WHERE id = $1 AND project_id = $2";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(provider).bind(project).execute(pool).await
        .map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

pub async fn list_providers(db: &Db, key: &MasterKey, project: &ProjectId) -> Result<Vec<Provider>, DbError> {
    Ok(load_providers(db, key, project).await?.0)
}

/// The project's connections whose credential opens, and the models of those whose credential
/// does not (sealed for another row, or under another master key): left out, never used.
async fn load_providers(
    db: &Db,
    key: &MasterKey,
    project: &ProjectId,
) -> Result<(Vec<Provider>, Vec<Vec<String>>), DbError> {
    const SQL: &str = "SELECT id, kind, base_url, api_key_sealed, models FROM provider_connections \
                       WHERE project_id = $1 ORDER BY created_at, id";
    let rows = with_db!(db, pool => sqlx::query_as::<_, ProviderRow>(SQL).bind(project).fetch_all(pool).await)?;
    let (mut providers, mut unreadable) = (Vec::new(), Vec::new());
    for row in rows {
        let Some(kind) = ProviderKind::parse(&row.kind) else { continue };
        let models = row.models.split(',').map(str::to_owned).collect();
        match key.open(&row.api_key_sealed, &SealedFor::provider_api_key(&row.id)) {
            Ok(api_key) => {
                providers.push(Provider { id: row.id, kind, base_url: row.base_url, api_key: api_key.into(), models })
            }
            Err(e) => {
                tracing::error!(provider = %row.id, error = %e, "cannot decrypt a provider credential");
                unreadable.push(models);
            }
        }
    }
    Ok((providers, unreadable))
}

// ---------------------------------------------------------------------------------------
// Prices

/// Everything a proxied call needs of its project beside the key and the customer: the
/// provider connections (credentials decrypted, oldest first) and the price overrides. Read
/// whole, so one cached copy serves every model of the project.
#[derive(Debug, Clone)]
pub struct CallConfig {
    pub providers: Vec<Provider>,
    /// The models of connections whose credential does not open: their calls fail closed.
    unreadable: Vec<Vec<String>>,
    overrides: std::collections::HashMap<String, Price>,
    /// What one USD of a shipped price is in the project's currency; None: shipped prices do
    /// not apply (a project outside USD that set no rate), so only its own prices do.
    shipped_rate: Option<Nanos>,
}

impl CallConfig {
    /// The price of `model`: the project's override, else the shipped price in the project's
    /// currency.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.overrides.get(model).copied().or_else(|| self.shipped_price(model))
    }

    /// The shipped price of `model` in the project's currency, if it applies.
    pub fn shipped_price(&self, model: &str) -> Option<Price> {
        let price = crate::pricing::shipped_price(model)?;
        Some(price.converted(self.shipped_rate?))
    }

    /// Whether a connection that would serve `model` was left out because its credential does
    /// not open for it.
    pub fn credential_unreadable(&self, model: &str) -> bool {
        self.unreadable.iter().any(|models| serves(models, model))
    }
}

/// The project's [`CallConfig`], in one round trip per table.
pub async fn call_config(db: &Db, key: &MasterKey, project: &ProjectId) -> Result<CallConfig, DbError> {
    const SQL: &str = "SELECT model, input, cached_input, output, cache_write, max_output_tokens FROM price_overrides \
                       WHERE project_id = $1";
    const RATE: &str = "SELECT currency, usd_rate_nanos FROM projects WHERE id = $1";
    let (providers, unreadable) = load_providers(db, key, project).await?;
    let rows = with_db!(db, pool => sqlx::query_as::<_, PriceOverride>(SQL).bind(project).fetch_all(pool).await)?;
    let rate: Option<(String, Option<i64>)> =
        with_db!(db, pool => sqlx::query_as(RATE).bind(project).fetch_optional(pool).await)?;
    let shipped_rate = rate.and_then(|(currency, rate)| shipped_price_rate(&currency, rate));
    let overrides = rows
        .into_iter()
        .map(|r| {
            let shipped = crate::pricing::shipped_price(&r.model);
            let price = Price {
                input: r.input,
                cached_input: r.cached_input,
                output: r.output,
                cache_write: r.cache_write,
                max_output_tokens: r.max_output_tokens,
                tokenizer: shipped.map_or(Tokenizer::Approximate, |p| p.tokenizer),
            };
            (r.model, price)
        })
        .collect();
    Ok(CallConfig { providers, unreadable, overrides, shipped_rate })
}

/// A price override of a project, as listed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PriceOverride {
    pub model: String,
    pub input: i64,
    pub cached_input: i64,
    pub output: i64,
    pub cache_write: i64,
    pub max_output_tokens: i64,
}

pub async fn list_price_overrides(db: &Db, project: &ProjectId) -> Result<Vec<PriceOverride>, DbError> {
    const SQL: &str = "SELECT model, input, cached_input, output, cache_write, max_output_tokens FROM price_overrides \
                       WHERE project_id = $1 ORDER BY model";
    Ok(with_db!(db, pool => sqlx::query_as::<_, PriceOverride>(SQL).bind(project).fetch_all(pool).await)?)
}

/// Removes a project's override of `model` (the shipped price, if any, applies again).
pub async fn delete_price(db: &Db, project: &ProjectId, model: &str) -> Result<bool, DbError> {
    const SQL: &str = "DELETE FROM price_overrides WHERE project_id = $1 AND model = $2";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(project).bind(model).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// The models this project has price overrides for.
pub async fn overridden_models(db: &Db, project: &ProjectId) -> Result<Vec<String>, DbError> {
    const SQL: &str = "SELECT model FROM price_overrides WHERE project_id = $1 ORDER BY model";
    Ok(with_db!(db, pool => sqlx::query_scalar::<_, String>(SQL).bind(project).fetch_all(pool).await)?)
}

pub async fn set_price(db: &Db, project: &ProjectId, model: &str, price: &Price) -> Result<(), ProjectError> {
    let model = model.trim();
    if model.is_empty() || model.len() > 200 {
        return Err(invalid("model", "must be 1 to 200 characters"));
    }
    if price.max_output_tokens < 1 {
        return Err(invalid("max output tokens", "must be at least 1"));
    }
    const SQL: &str = "INSERT INTO price_overrides (project_id, model, input, cached_input, output, cache_write, max_output_tokens) \
        VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (project_id, model) DO UPDATE SET input = excluded.input, \
        cached_input = excluded.cached_input, output = excluded.output, cache_write = excluded.cache_write, \
        max_output_tokens = excluded.max_output_tokens";
    with_db!(db, pool => sqlx::query(SQL).bind(project).bind(model).bind(price.input).bind(price.cached_input)
        .bind(price.output).bind(price.cache_write).bind(price.max_output_tokens).execute(pool).await.map(|_| ()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Customers

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Customer {
    pub id: CustomerId,
    pub project_id: ProjectId,
    pub external_id: String,
    pub budget_nanos: i64,
    pub budget_period: String,
    pub period_start: i64,
    pub period_end: i64,
    pub spent_nanos: i64,
    pub reserved_nanos: i64,
    pub blocked: bool,
}

impl Customer {
    pub fn period(&self) -> BudgetPeriod {
        BudgetPeriod::parse(&self.budget_period).unwrap_or(BudgetPeriod::Month)
    }

    /// What the customer can still spend now (spend of a finished period no longer counts).
    pub fn remaining(&self, now: UnixMillis) -> Nanos {
        let spent = if self.period_end <= now.0 { 0 } else { self.spent_nanos };
        Nanos(self.budget_nanos - spent - self.reserved_nanos)
    }
}

const CUSTOMER_COLUMNS: &str = "id, project_id, external_id, budget_nanos, budget_period, period_start, period_end, spent_nanos, reserved_nanos, blocked";

/// Checks a tenant's customer id: 1–200 printable characters.
pub fn validate_external_id(external_id: &str) -> Result<&str, ProjectError> {
    let id = external_id.trim();
    if id.is_empty() || id.chars().count() > 200 || id.chars().any(char::is_control) {
        return Err(invalid("customer", "must be 1 to 200 printable characters"));
    }
    Ok(id)
}

/// A customer to create with its project's default budget, unless it exists already.
#[derive(Debug, Clone)]
pub struct NewCustomer {
    pub project_id: ProjectId,
    pub external_id: String,
    pub budget: Nanos,
    pub period: BudgetPeriod,
    /// Not created if a customer of that id was deleted at or after this time: a customer
    /// token issued before a deletion does not bring the customer back.
    pub unless_deleted_since: Option<UnixMillis>,
}

impl NewCustomer {
    /// `external_id` (validated) with `project`'s default budget and period.
    pub fn of(project: &Project, external_id: &str) -> Self {
        Self {
            project_id: project.id.clone(),
            external_id: external_id.to_owned(),
            budget: Nanos(project.default_budget_nanos),
            period: project.default_period(),
            unless_deleted_since: None,
        }
    }

    /// Not created if it was deleted at or after `time`.
    pub fn unless_deleted_since(mut self, time: Option<UnixMillis>) -> Self {
        self.unless_deleted_since = time;
        self
    }
}

/// Creates `new` unless it exists (insert-or-ignore) or was deleted since
/// `new.unless_deleted_since`, then reads it: concurrent first calls all end up with the one
/// row, so none can slip past the default budget, and the deletion check is in the same
/// statement, so no deletion can slip between check and insert. One function per backend,
/// on a connection of the caller's (the ledger's writer, within its transaction).
macro_rules! create_customer_fn {
    ($name:ident, $conn:ty) => {
        pub(crate) async fn $name(conn: &mut $conn, new: &NewCustomer) -> Result<Option<Customer>, sqlx::Error> {
            const SQL: &str = "INSERT INTO customers (id, project_id, external_id, budget_nanos, budget_period, \
                period_start, period_end, created_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
                WHERE NOT EXISTS (SELECT 1 FROM deleted_customers d WHERE d.project_id = $2 \
                    AND d.external_id = $3 AND d.deleted_at >= $9) \
                ON CONFLICT (project_id, external_id) DO NOTHING";
            let now = UnixMillis::now();
            let (start, end) = new.period.window(now);
            sqlx::query(SQL)
                .bind(CustomerId::generate())
                .bind(&new.project_id)
                .bind(&new.external_id)
                .bind(new.budget.0)
                .bind(new.period.as_str())
                .bind(start)
                .bind(end)
                .bind(now.0)
                .bind(new.unless_deleted_since.map(|t| t.0))
                .execute(&mut *conn)
                .await?;
            let sql = format!("SELECT {CUSTOMER_COLUMNS} FROM customers WHERE project_id = $1 AND external_id = $2");
            sqlx::query_as::<_, Customer>(sqlx::AssertSqlSafe(sql))
                .bind(&new.project_id)
                .bind(&new.external_id)
                .fetch_optional(&mut *conn)
                .await
        }
    };
}
create_customer_fn!(create_customer_sqlite, sqlx::SqliteConnection);
create_customer_fn!(create_customer_pg, sqlx::PgConnection);

pub async fn find_customer(db: &Db, project: &ProjectId, external_id: &str) -> Result<Option<Customer>, ProjectError> {
    let sql = format!("SELECT {CUSTOMER_COLUMNS} FROM customers WHERE project_id = $1 AND external_id = $2");
    Ok(with_db!(db, pool => sqlx::query_as::<_, Customer>(sqlx::AssertSqlSafe(sql.clone()))
        .bind(project).bind(external_id).fetch_optional(pool).await)?)
}

pub async fn get_customer(db: &Db, id: &CustomerId) -> Result<Option<Customer>, DbError> {
    let sql = format!("SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1");
    Ok(
        with_db!(db, pool => sqlx::query_as::<_, Customer>(sqlx::AssertSqlSafe(sql.clone())).bind(id).fetch_optional(pool).await)?,
    )
}

/// Creates the customer or changes its budget. A change of period starts a new window
/// (spend of the old window no longer counts).
pub async fn upsert_customer_budget(
    db: &Db,
    project: &ProjectId,
    external_id: &str,
    budget: Nanos,
    period: BudgetPeriod,
) -> Result<Customer, ProjectError> {
    let external_id = validate_external_id(external_id)?;
    if budget.is_negative() {
        return Err(invalid("budget", "must not be negative"));
    }
    let now = UnixMillis::now();
    let (start, end) = period.window(now);
    const SQL: &str = "INSERT INTO customers (id, project_id, external_id, budget_nanos, budget_period, period_start, \
        period_end, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
        ON CONFLICT (project_id, external_id) DO UPDATE SET budget_nanos = excluded.budget_nanos, \
        spent_nanos = CASE WHEN customers.budget_period = excluded.budget_period THEN customers.spent_nanos ELSE 0 END, \
        period_start = CASE WHEN customers.budget_period = excluded.budget_period THEN customers.period_start ELSE excluded.period_start END, \
        period_end = CASE WHEN customers.budget_period = excluded.budget_period THEN customers.period_end ELSE excluded.period_end END, \
        budget_period = excluded.budget_period";
    with_db!(db, pool => sqlx::query(SQL).bind(CustomerId::generate()).bind(project).bind(external_id)
        .bind(budget.0).bind(period.as_str()).bind(start).bind(end).bind(now.0)
        .execute(pool).await.map(|_| ()))?;
    find_customer(db, project, external_id).await?.ok_or(ProjectError::NotFound("customer"))
}

pub async fn set_customer_blocked(
    db: &Db,
    project: &ProjectId,
    external_id: &str,
    blocked: bool,
) -> Result<bool, DbError> {
    const SQL: &str =
        "UPDATE customers SET blocked = $1, billing_hold = FALSE WHERE project_id = $2 AND external_id = $3";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(blocked).bind(project).bind(external_id)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// Whether an error is a duplicate (for callers mapping it to 409).
pub fn is_duplicate(e: &ProjectError) -> bool {
    matches!(e, ProjectError::Db(DbError::Query(q)) if is_unique_violation(q))
}
