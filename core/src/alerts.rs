//! Budget alerts: a project says which shares of a customer's budget it wants to hear about
//! (say 50, 80 and 100 %) and whether to hear about calls refused for want of budget; each
//! fires at most once per customer and budget period, and goes to a signed webhook and to
//! mailboxes.
//!
//! The hot path knows nothing of alerts. [`scan`] (run every few seconds by the workers)
//! reads the usage events written since its last position, looks at the customers they
//! touched, and records the alerts now due. A unique index on (customer, period, kind)
//! makes each fire once, however many replicas scan at once. Each alert gets one
//! [`Delivery`] per channel, which a job sends and retries (see `tollgate-jobs`).
//!
//! Webhooks are signed like Stripe's: the header
//! `Tollgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.

use crate::crypto::{MasterKey, SealedFor, random_token};
use crate::db::{Db, DbError};
use crate::health::Limits;
use crate::ids::{AlertId, CustomerId, DeliveryId, ProjectId};
use crate::money::Nanos;
use crate::time::UnixMillis;
use crate::with_db;

/// The header carrying a webhook's signature.
pub const SIGNATURE_HEADER: &str = "Tollgate-Signature";
/// The refusal reason (in the usage ledger) that a `refused` alert is about.
pub const BUDGET_REFUSAL: &str = "insufficient budget";
/// Deliveries are given up after this many attempts.
pub const MAX_ATTEMPTS: i64 = 10;
/// The longest wait between two attempts.
pub const MAX_BACKOFF_SECS: u64 = 6 * 60 * 60;
/// A delivery claimed by a worker that has not reported back after this long is claimed again.
pub const CLAIM_SECS: i64 = 120;
/// The scanner re-reads this much before its position, for events committed late.
const SCAN_OVERLAP_MS: i64 = 60_000;
/// On its very first run the scanner looks back this far, not over all history.
const FIRST_SCAN_LOOKBACK_MS: i64 = 24 * 60 * 60 * 1000;
const DEFAULT_THRESHOLDS: [i64; 3] = [50, 80, 100];

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the stored webhook secret cannot be decrypted with this master key")]
    Secret,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for AlertError {
    fn from(e: sqlx::Error) -> Self {
        AlertError::Db(e.into())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> AlertError {
    AlertError::Invalid { field, reason: reason.into() }
}

/// A project's alert settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    /// Percentages of the budget, ascending, without repeats.
    pub thresholds: Vec<i64>,
    pub on_refused: bool,
    pub webhook_url: Option<String>,
    pub email_to: Vec<String>,
    /// `None` until the settings are first saved (the secret is made then).
    pub webhook_secret: Option<String>,
}

impl AlertSettings {
    /// Whether the project saved settings: until then no alert fires (the scan reads only
    /// projects with settings), whatever the defaults say.
    pub fn saved(&self) -> bool {
        self.webhook_secret.is_some()
    }

    /// Whether anything can fire: settings saved, with a threshold or the refused alert.
    pub fn on(&self) -> bool {
        self.saved() && (!self.thresholds.is_empty() || self.on_refused)
    }
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            thresholds: DEFAULT_THRESHOLDS.to_vec(),
            on_refused: true,
            webhook_url: None,
            email_to: Vec::new(),
            webhook_secret: None,
        }
    }
}

/// What a tenant submits; parsed and checked by [`AlertSettingsInput::parse`].
#[derive(Debug, Clone, Default)]
pub struct AlertSettingsInput {
    pub thresholds: String,
    pub on_refused: bool,
    pub webhook_url: String,
    pub email_to: String,
}

/// The checked form of [`AlertSettingsInput`].
struct ParsedInput {
    thresholds: Vec<i64>,
    webhook_url: Option<String>,
    email_to: Vec<String>,
}

impl AlertSettingsInput {
    /// Checks every field; nothing is saved unless all are valid.
    fn parse(&self) -> Result<ParsedInput, AlertError> {
        Ok(ParsedInput {
            thresholds: parse_thresholds(&self.thresholds)?,
            webhook_url: parse_webhook_url(&self.webhook_url)?,
            email_to: parse_recipients(&self.email_to)?,
        })
    }
}

/// "50, 80,100" → [50, 80, 100]. Each a whole percentage from 1 to 1000, at most 10.
pub fn parse_thresholds(text: &str) -> Result<Vec<i64>, AlertError> {
    let mut out = Vec::new();
    for part in text.split([',', ' ']).map(str::trim).filter(|p| !p.is_empty()) {
        let part = part.strip_suffix('%').unwrap_or(part);
        let pct: i64 =
            part.parse().map_err(|_| invalid("thresholds", format!("{part:?} is not a whole percentage (like 80)")))?;
        if !(1..=1000).contains(&pct) {
            return Err(invalid("thresholds", format!("{pct}% is out of range: use 1 to 1000")));
        }
        out.push(pct);
    }
    out.sort_unstable();
    out.dedup();
    if out.len() > 10 {
        return Err(invalid("thresholds", "at most 10 thresholds"));
    }
    Ok(out)
}

/// An http(s) URL with a host, or nothing.
pub fn parse_webhook_url(text: &str) -> Result<Option<String>, AlertError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > 2000 || text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid("webhook_url", "must be at most 2000 characters, without spaces or control characters"));
    }
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| invalid("webhook_url", "must start with https:// (or http://)"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.contains('@') || host.chars().any(char::is_whitespace) {
        return Err(invalid("webhook_url", "must name a host (and no user or password)"));
    }
    Ok(Some(text.to_owned()))
}

/// "a@x.com, b@y.org" → the addresses; at most 10.
pub fn parse_recipients(text: &str) -> Result<Vec<String>, AlertError> {
    let mut out: Vec<String> = Vec::new();
    for part in text.split([',', ';', ' ', '\n']).map(str::trim).filter(|p| !p.is_empty()) {
        let valid = part.len() <= 254
            && part.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
            })
            && !part.contains(['<', '>', '"'])
            && !part.chars().any(char::is_control);
        if !valid {
            return Err(invalid("email_to", format!("{part:?} is not an email address")));
        }
        if !out.iter().any(|o| o.eq_ignore_ascii_case(part)) {
            out.push(part.to_owned());
        }
    }
    if out.len() > 10 {
        return Err(invalid("email_to", "at most 10 addresses"));
    }
    Ok(out)
}

fn join_thresholds(thresholds: &[i64]) -> String {
    thresholds.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

#[derive(sqlx::FromRow)]
struct SettingsRow {
    thresholds: String,
    on_refused: bool,
    webhook_url: Option<String>,
    webhook_secret_sealed: String,
    email_to: Option<String>,
}

impl SettingsRow {
    fn open(self, key: &MasterKey, project: &ProjectId) -> Result<AlertSettings, AlertError> {
        Ok(AlertSettings {
            thresholds: parse_thresholds(&self.thresholds).unwrap_or_default(),
            on_refused: self.on_refused,
            webhook_url: self.webhook_url,
            email_to: parse_recipients(self.email_to.as_deref().unwrap_or_default()).unwrap_or_default(),
            webhook_secret: Some(
                key.open(&self.webhook_secret_sealed, &SealedFor::alert_webhook_secret(project))
                    .map_err(|_| AlertError::Secret)?,
            ),
        })
    }
}

/// The project's settings, or the defaults (and no secret) if it never saved any.
pub async fn settings(db: &Db, key: &MasterKey, project: &ProjectId) -> Result<AlertSettings, AlertError> {
    const SQL: &str = "SELECT thresholds, on_refused, webhook_url, webhook_secret_sealed, email_to \
                       FROM alert_settings WHERE project_id = $1";
    let row: Option<SettingsRow> =
        with_db!(db, pool => sqlx::query_as::<_, SettingsRow>(SQL).bind(project).fetch_optional(pool).await)?;
    match row {
        Some(row) => row.open(key, project),
        None => Ok(AlertSettings::default()),
    }
}

fn new_secret() -> String {
    format!("tgwhsec_{}", random_token())
}

/// Saves the project's settings, making its webhook secret the first time.
pub async fn save_settings(
    db: &Db,
    key: &MasterKey,
    project: &ProjectId,
    input: &AlertSettingsInput,
) -> Result<AlertSettings, AlertError> {
    let ParsedInput { thresholds, webhook_url, email_to } = input.parse()?;
    const SQL: &str = "INSERT INTO alert_settings \
            (project_id, thresholds, on_refused, webhook_url, webhook_secret_sealed, email_to, updated_at) \
        VALUES ($1, $2, $3, $4, $5, $6, $7) \
        ON CONFLICT (project_id) DO UPDATE SET thresholds = excluded.thresholds, on_refused = excluded.on_refused, \
            webhook_url = excluded.webhook_url, email_to = excluded.email_to, updated_at = excluded.updated_at";
    let sealed = key.seal(&new_secret(), &SealedFor::alert_webhook_secret(project));
    let emails = (!email_to.is_empty()).then(|| email_to.join(","));
    let now = UnixMillis::now().0;
    with_db!(db, pool => sqlx::query(SQL)
        .bind(project).bind(join_thresholds(&thresholds)).bind(input.on_refused).bind(&webhook_url)
        .bind(&sealed).bind(&emails).bind(now)
        .execute(pool).await.map(|_| ()))?;
    settings(db, key, project).await
}

/// Replaces the webhook secret (the old one stops verifying at once). Saves the defaults
/// first if the project never saved settings.
pub async fn roll_secret(db: &Db, key: &MasterKey, project: &ProjectId) -> Result<String, AlertError> {
    let secret = new_secret();
    const SQL: &str = "UPDATE alert_settings SET webhook_secret_sealed = $1, updated_at = $2 WHERE project_id = $3";
    let sealed = key.seal(&secret, &SealedFor::alert_webhook_secret(project));
    let now = UnixMillis::now().0;
    let updated = with_db!(db, pool => sqlx::query(SQL).bind(&sealed).bind(now).bind(project)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    if updated == 0 {
        let defaults = AlertSettings::default();
        let input = AlertSettingsInput {
            thresholds: join_thresholds(&defaults.thresholds),
            on_refused: defaults.on_refused,
            ..Default::default()
        };
        save_settings(db, key, project, &input).await?;
        with_db!(db, pool => sqlx::query(SQL).bind(&sealed).bind(now).bind(project)
            .execute(pool).await.map(|_| ()))?;
    }
    Ok(secret)
}

/// The value of the [`SIGNATURE_HEADER`] for `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    crate::signature::header(secret, timestamp, body)
}

// ---------------------------------------------------------------------------------------
// Scanning: which alerts are due.

/// What kind of alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    /// Spend reached this percentage of the budget.
    Threshold(i64),
    /// A call was refused for want of budget.
    Refused,
}

impl AlertKind {
    fn columns(self) -> (&'static str, i64) {
        match self {
            AlertKind::Threshold(pct) => ("threshold", pct),
            AlertKind::Refused => ("refused", 0),
        }
    }

    fn from_columns(kind: &str, pct: i64) -> Self {
        if kind == "refused" { AlertKind::Refused } else { AlertKind::Threshold(pct) }
    }

    /// The event type a webhook receiver sees.
    pub fn event_type(self) -> &'static str {
        match self {
            AlertKind::Threshold(_) => "budget.threshold_reached",
            AlertKind::Refused => "budget.call_refused",
        }
    }
}

/// The alerts due for a customer in its current state: each threshold its spend has reached
/// (a customer without budget has no percentages), and `Refused` when `refused` says a
/// call was refused for budget in this period. An `exhausted` customer (what is left pays for
/// no call, see [`crate::health`]) has reached 100 %: under `clamp` its spend stops short of
/// the budget, by less than a call.
pub fn due(
    settings_thresholds: &[i64],
    on_refused: bool,
    budget: i64,
    spent: i64,
    exhausted: bool,
    refused: bool,
) -> Vec<AlertKind> {
    let mut kinds: Vec<AlertKind> = if budget > 0 {
        settings_thresholds
            .iter()
            .filter(|&&pct| {
                i128::from(spent) * 100 >= i128::from(budget) * i128::from(pct) || (exhausted && pct <= 100)
            })
            .map(|&pct| AlertKind::Threshold(pct))
            .collect()
    } else {
        Vec::new()
    };
    if refused && on_refused {
        kinds.push(AlertKind::Refused);
    }
    kinds
}

#[derive(sqlx::FromRow)]
struct Touched {
    customer_id: CustomerId,
    project_id: ProjectId,
    budget_nanos: i64,
    spent_nanos: i64,
    period_start: i64,
    period_end: i64,
    thresholds: String,
    on_refused: bool,
    webhook_url: Option<String>,
    email_to: Option<String>,
    refused: i64,
}

/// What one scan did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    pub customers_checked: usize,
    pub alerts_fired: usize,
    /// Deliveries made by this scan, to be queued.
    pub deliveries: Vec<DeliveryId>,
}

const SCANNER: &str = "alerts";

/// Records the alerts due for customers with usage since the last scan, and their deliveries.
pub async fn scan(db: &Db, now: UnixMillis) -> Result<ScanReport, DbError> {
    const POSITION: &str = "SELECT position FROM scan_positions WHERE name = $1";
    let position: Option<i64> =
        with_db!(db, pool => sqlx::query_scalar(POSITION).bind(SCANNER).fetch_optional(pool).await)?;
    let from = position.map_or(now.0 - FIRST_SCAN_LOOKBACK_MS, |p| p - SCAN_OVERLAP_MS);
    // Only projects with alert settings; the (project, time) index finds their recent events.
    const TOUCHED: &str = "SELECT c.id AS customer_id, c.project_id, c.budget_nanos, c.spent_nanos, \
            c.period_start, c.period_end, s.thresholds, s.on_refused, s.webhook_url, s.email_to, \
            CAST(MAX(CASE WHEN e.status = 'refused' AND e.reason = $3 AND e.created_at >= c.period_start \
                THEN 1 ELSE 0 END) AS BIGINT) AS refused \
        FROM alert_settings s \
        JOIN usage_events e ON e.project_id = s.project_id AND e.created_at > $1 AND e.created_at <= $2 \
        JOIN customers c ON c.id = e.customer_id \
        GROUP BY c.id, c.project_id, c.budget_nanos, c.spent_nanos, c.period_start, c.period_end, \
            s.thresholds, s.on_refused, s.webhook_url, s.email_to";
    let touched: Vec<Touched> = with_db!(db, pool => sqlx::query_as::<_, Touched>(TOUCHED)
        .bind(from).bind(now.0).bind(BUDGET_REFUSAL).fetch_all(pool).await)?;

    let mut report = ScanReport { customers_checked: touched.len(), ..Default::default() };
    // Each project's cheapest call, once per scan (for whether a customer is exhausted).
    let mut limits: std::collections::HashMap<ProjectId, Limits> = std::collections::HashMap::new();
    for customer in touched {
        let thresholds = parse_thresholds(&customer.thresholds).unwrap_or_default();
        let limit = match limits.get(&customer.project_id) {
            Some(limit) => *limit,
            None => {
                let limit = project_limits(db, &customer.project_id).await?;
                limits.insert(customer.project_id.clone(), limit);
                limit
            }
        };
        let exhausted = limit.exhausted(Nanos(customer.budget_nanos), Nanos(customer.spent_nanos));
        let kinds = due(
            &thresholds,
            customer.on_refused,
            customer.budget_nanos,
            customer.spent_nanos,
            exhausted,
            customer.refused != 0,
        );
        for kind in kinds {
            if let Some(deliveries) = fire(db, &customer, kind, now).await? {
                report.alerts_fired += 1;
                report.deliveries.extend(deliveries);
            }
        }
    }
    const ADVANCE: &str = "INSERT INTO scan_positions (name, position) VALUES ($1, $2) \
        ON CONFLICT (name) DO UPDATE SET position = CASE WHEN excluded.position > scan_positions.position \
            THEN excluded.position ELSE scan_positions.position END";
    with_db!(db, pool => sqlx::query(ADVANCE).bind(SCANNER).bind(now.0).execute(pool).await.map(|_| ()))?;
    Ok(report)
}

/// The project's budget-health lines (the defaults for a project gone since).
async fn project_limits(db: &Db, project: &ProjectId) -> Result<Limits, DbError> {
    match crate::projects::get_project(db, project).await {
        Ok(Some(project)) => crate::health::limits(db, &project).await,
        Ok(None) => Ok(Limits::default()),
        Err(crate::projects::ProjectError::Db(e)) => Err(e),
        Err(e) => {
            tracing::warn!(error = %e, %project, "cannot read a project for its alerts");
            Ok(Limits::default())
        }
    }
}

/// Records `kind` for the customer's current period unless it already fired, with one
/// delivery per channel; `None` if it had fired.
async fn fire(db: &Db, c: &Touched, kind: AlertKind, now: UnixMillis) -> Result<Option<Vec<DeliveryId>>, DbError> {
    const ALERT: &str = "INSERT INTO alerts (id, project_id, customer_id, kind, threshold_pct, period_start, \
            period_end, budget_nanos, spent_nanos, created_at) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
        ON CONFLICT (customer_id, period_start, kind, threshold_pct) DO NOTHING";
    const DELIVERY: &str = "INSERT INTO alert_deliveries (id, alert_id, project_id, channel, target, status, \
            attempts, next_attempt_at, created_at, updated_at) \
        VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6, $6)";
    let id = AlertId::generate();
    let (kind_name, pct) = kind.columns();
    let mut targets: Vec<(&str, String)> = Vec::new();
    if let Some(url) = &c.webhook_url {
        targets.push(("webhook", url.clone()));
    }
    for address in parse_recipients(c.email_to.as_deref().unwrap_or_default()).unwrap_or_default() {
        targets.push(("email", address));
    }
    let fired = with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        let inserted = sqlx::query(ALERT)
            .bind(&id).bind(&c.project_id).bind(&c.customer_id).bind(kind_name).bind(pct)
            .bind(c.period_start).bind(c.period_end).bind(c.budget_nanos).bind(c.spent_nanos).bind(now.0)
            .execute(&mut *tx).await?.rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            return Ok::<_, sqlx::Error>(None);
        }
        let mut deliveries = Vec::new();
        for (channel, target) in &targets {
            let delivery = DeliveryId::generate();
            sqlx::query(DELIVERY).bind(&delivery).bind(&id).bind(&c.project_id).bind(*channel).bind(target)
                .bind(now.0).execute(&mut *tx).await?;
            deliveries.push(delivery);
        }
        tx.commit().await?;
        Ok(Some(deliveries))
    }
    .await)?;
    if fired.is_some() {
        tracing::info!(alert = %id, customer = %c.customer_id, kind = kind_name, pct, "budget alert fired");
    }
    Ok(fired)
}

// ---------------------------------------------------------------------------------------
// Deliveries: claimed by a job, sent, recorded.

/// Everything needed to send one delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: DeliveryId,
    pub channel: String,
    pub target: String,
    /// Attempts made before this one.
    pub attempts: i64,
    pub alert: AlertId,
    pub kind: AlertKind,
    pub project_id: ProjectId,
    pub project_name: String,
    pub currency: String,
    pub customer_external_id: String,
    pub customer_name: Option<String>,
    pub budget: Nanos,
    pub spent: Nanos,
    pub period_start: i64,
    pub period_end: i64,
    pub fired_at: i64,
    pub webhook_secret_sealed: Option<String>,
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: DeliveryId,
    channel: String,
    target: String,
    attempts: i64,
    alert_id: AlertId,
    kind: String,
    threshold_pct: i64,
    project_id: ProjectId,
    project_name: String,
    currency: String,
    external_id: String,
    customer_name: Option<String>,
    budget_nanos: i64,
    spent_nanos: i64,
    period_start: i64,
    period_end: i64,
    fired_at: i64,
    webhook_secret_sealed: Option<String>,
}

/// Takes delivery `id` for one attempt if it is still pending and has had exactly
/// `attempts` attempts (so two copies of a job cannot both send), counting the attempt.
/// A claim that is never reported back expires after [`CLAIM_SECS`].
pub async fn claim(db: &Db, id: &DeliveryId, attempts: i64, now: UnixMillis) -> Result<Option<Delivery>, DbError> {
    const CLAIM: &str = "UPDATE alert_deliveries SET attempts = attempts + 1, next_attempt_at = $1, updated_at = $2 \
        WHERE id = $3 AND status = 'pending' AND attempts = $4";
    let claimed = with_db!(db, pool => sqlx::query(CLAIM).bind(now.plus_secs(CLAIM_SECS).0).bind(now.0).bind(id)
        .bind(attempts).execute(pool).await.map(|r| r.rows_affected()))?;
    if claimed == 0 {
        return Ok(None);
    }
    const LOAD: &str = "SELECT d.id, d.channel, d.target, d.attempts - 1 AS attempts, a.id AS alert_id, a.kind, \
            a.threshold_pct, p.id AS project_id, p.name AS project_name, p.currency, c.external_id, \
            c.name AS customer_name, a.budget_nanos, a.spent_nanos, a.period_start, a.period_end, \
            a.created_at AS fired_at, s.webhook_secret_sealed \
        FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id JOIN projects p ON p.id = d.project_id \
        JOIN customers c ON c.id = a.customer_id LEFT JOIN alert_settings s ON s.project_id = d.project_id \
        WHERE d.id = $1";
    let row: Option<DeliveryRow> =
        with_db!(db, pool => sqlx::query_as::<_, DeliveryRow>(LOAD).bind(id).fetch_optional(pool).await)?;
    Ok(row.map(|r| Delivery {
        id: r.id,
        channel: r.channel,
        target: r.target,
        attempts: r.attempts,
        alert: r.alert_id,
        kind: AlertKind::from_columns(&r.kind, r.threshold_pct),
        project_id: r.project_id,
        project_name: r.project_name,
        currency: r.currency,
        customer_external_id: r.external_id,
        customer_name: r.customer_name,
        budget: Nanos(r.budget_nanos),
        spent: Nanos(r.spent_nanos),
        period_start: r.period_start,
        period_end: r.period_end,
        fired_at: r.fired_at,
        webhook_secret_sealed: r.webhook_secret_sealed,
    }))
}

impl Delivery {
    /// The webhook body: the same bytes on every attempt (its `id` lets a receiver drop repeats).
    pub fn payload(&self) -> serde_json::Value {
        let threshold = match self.kind {
            AlertKind::Threshold(pct) => serde_json::json!(pct),
            AlertKind::Refused => serde_json::Value::Null,
        };
        serde_json::json!({
            "id": self.alert.as_str(),
            "type": self.kind.event_type(),
            "created": self.fired_at / 1000,
            "data": {
                "project": { "id": self.project_id.as_str(), "name": self.project_name },
                "customer": { "id": self.customer_external_id, "name": self.customer_name },
                "threshold_percent": threshold,
                "currency": self.currency,
                "budget_nanos": self.budget.0,
                "spent_nanos": self.spent.0,
                "budget": self.budget.to_string(),
                "spent": self.spent.to_string(),
                "period": { "start": self.period_start / 1000, "end": self.period_end / 1000 },
            }
        })
    }

    /// A one-line summary, for mail subjects and logs.
    pub fn summary(&self) -> String {
        let who = self.customer_name.as_deref().unwrap_or(&self.customer_external_id);
        match self.kind {
            AlertKind::Threshold(pct) => format!(
                "{who} has used {pct}% of their budget in {} ({} of {})",
                self.project_name,
                crate::currency::display(self.spent, &self.currency),
                crate::currency::display(self.budget, &self.currency),
            ),
            AlertKind::Refused => format!(
                "A call by {who} in {} was refused: budget exhausted ({} of {} spent)",
                self.project_name,
                crate::currency::display(self.spent, &self.currency),
                crate::currency::display(self.budget, &self.currency),
            ),
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered { status: Option<u16> },
    Failed { status: Option<u16>, error: String },
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    Done,
    /// Try again after this many seconds (attempts made so far in `attempts`).
    RetryIn {
        secs: u64,
        attempts: i64,
    },
    GaveUp,
}

/// The wait before attempt `attempts + 1`: `base`, then four times longer each time, capped.
pub fn backoff_secs(base_secs: u64, attempts: i64) -> u64 {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
    base_secs.saturating_mul(4u64.saturating_pow(exponent)).min(MAX_BACKOFF_SECS)
}

/// Records the outcome of the attempt claimed by [`claim`] and says what comes next.
pub async fn record_attempt(
    db: &Db,
    delivery: &Delivery,
    outcome: &AttemptOutcome,
    base_backoff_secs: u64,
    now: UnixMillis,
) -> Result<NextStep, DbError> {
    let attempts = delivery.attempts + 1;
    let (status, next_at, step, code, error): (&str, Option<i64>, NextStep, Option<u16>, Option<&str>) = match outcome {
        AttemptOutcome::Delivered { status } => ("delivered", None, NextStep::Done, *status, None),
        AttemptOutcome::Failed { status, error } if attempts >= MAX_ATTEMPTS => {
            ("failed", None, NextStep::GaveUp, *status, Some(error))
        }
        AttemptOutcome::Failed { status, error } => {
            let secs = backoff_secs(base_backoff_secs, attempts);
            let at = now.0 + i64::try_from(secs).unwrap_or(i64::MAX / 2) * 1000;
            ("pending", Some(at), NextStep::RetryIn { secs, attempts }, *status, Some(error))
        }
    };
    let delivered_at = matches!(step, NextStep::Done).then_some(now.0);
    let error = error.map(|e| e.chars().take(500).collect::<String>());
    const SQL: &str = "UPDATE alert_deliveries SET status = $1, next_attempt_at = $2, last_status = $3, \
        last_error = $4, delivered_at = $5, updated_at = $6 WHERE id = $7 AND attempts = $8";
    with_db!(db, pool => sqlx::query(SQL).bind(status).bind(next_at).bind(code.map(i64::from)).bind(&error)
        .bind(delivered_at).bind(now.0).bind(&delivery.id).bind(attempts).execute(pool).await.map(|_| ()))?;
    Ok(step)
}

/// Pending deliveries whose next attempt (or whose claim) is overdue by `slack_secs`: their
/// job was lost (a push that failed, a worker that died). Returns (id, attempts so far).
pub async fn overdue(db: &Db, now: UnixMillis, slack_secs: i64) -> Result<Vec<(DeliveryId, i64)>, DbError> {
    const SQL: &str = "SELECT id, attempts FROM alert_deliveries \
        WHERE status = 'pending' AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT 500";
    let rows: Vec<(DeliveryId, i64)> = with_db!(db, pool => sqlx::query_as::<_, (DeliveryId, i64)>(SQL)
        .bind(now.plus_secs(-slack_secs).0).fetch_all(pool).await)?;
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// The delivery log, for the dashboard.

/// One line of the delivery log.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogEntry {
    pub id: DeliveryId,
    pub alert_id: AlertId,
    pub kind: String,
    pub threshold_pct: i64,
    pub customer_id: CustomerId,
    pub customer_external_id: String,
    pub channel: String,
    pub target: String,
    pub status: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<i64>,
    pub delivered_at: Option<i64>,
    pub created_at: i64,
}

impl LogEntry {
    pub fn alert_kind(&self) -> AlertKind {
        AlertKind::from_columns(&self.kind, self.threshold_pct)
    }
}

/// The project's latest deliveries, newest first.
pub async fn delivery_log(db: &Db, project: &ProjectId, limit: i64) -> Result<Vec<LogEntry>, DbError> {
    const SQL: &str = "SELECT d.id, d.alert_id, a.kind, a.threshold_pct, c.id AS customer_id, \
            c.external_id AS customer_external_id, d.channel, d.target, d.status, d.attempts, d.last_status, \
            d.last_error, d.next_attempt_at, d.delivered_at, d.created_at \
        FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id JOIN customers c ON c.id = a.customer_id \
        WHERE d.project_id = $1 ORDER BY d.created_at DESC, d.id DESC LIMIT $2";
    Ok(with_db!(db, pool => sqlx::query_as::<_, LogEntry>(SQL).bind(project).bind(limit).fetch_all(pool).await)?)
}

/// How many alerts the project has fired (also those with no channel to go to).
pub async fn alert_count(db: &Db, project: &ProjectId) -> Result<i64, DbError> {
    const SQL: &str = "SELECT COUNT(*) FROM alerts WHERE project_id = $1";
    Ok(with_db!(db, pool => sqlx::query_scalar::<_, i64>(SQL).bind(project).fetch_one(pool).await)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_sorted_and_checked() {
        assert_eq!(parse_thresholds("80, 50,100%").unwrap(), vec![50, 80, 100]);
        assert_eq!(parse_thresholds("").unwrap(), Vec::<i64>::new());
        assert!(parse_thresholds("abc").is_err());
        assert!(parse_thresholds("0").is_err());
        assert!(parse_thresholds("1001").is_err());
    }

    #[test]
    fn due_alerts_follow_spend() {
        assert_eq!(due(&[50, 80, 100], true, 1000, 499, false, false), vec![]);
        assert_eq!(
            due(&[50, 80, 100], true, 1000, 800, false, false),
            vec![AlertKind::Threshold(50), AlertKind::Threshold(80)]
        );
        assert_eq!(due(&[50], true, 0, 0, false, true), vec![AlertKind::Refused]);
        assert_eq!(due(&[50], false, 0, 0, false, true), vec![]);
        // No overflow on huge budgets.
        assert_eq!(due(&[100], false, i64::MAX, i64::MAX, false, false), vec![AlertKind::Threshold(100)]);
    }

    #[test]
    fn an_exhausted_customer_has_reached_100_percent() {
        // Under clamp, dust is left: 95 % spent, and no call fits what is left.
        assert_eq!(
            due(&[50, 80, 100, 150], true, 1000, 950, true, false),
            vec![AlertKind::Threshold(50), AlertKind::Threshold(80), AlertKind::Threshold(100)]
        );
        assert_eq!(
            due(&[50, 80, 100], true, 1000, 950, false, false),
            vec![AlertKind::Threshold(50), AlertKind::Threshold(80)]
        );
        // A customer without budget has no percentages, exhausted or not.
        assert_eq!(due(&[100], true, 0, 0, true, false), vec![]);
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff_secs(10, 1), 10);
        assert_eq!(backoff_secs(10, 2), 40);
        assert_eq!(backoff_secs(10, 3), 160);
        assert_eq!(backoff_secs(10, 9), MAX_BACKOFF_SECS);
    }

    #[test]
    fn urls_and_recipients_are_checked() {
        assert_eq!(parse_webhook_url(" https://x.example/hook ").unwrap().as_deref(), Some("https://x.example/hook"));
        assert!(parse_webhook_url("ftp://x").is_err());
        assert!(parse_webhook_url("https://user:pw@x/").is_err());
        assert_eq!(parse_recipients("a@x.com, A@x.com;b@y.org").unwrap(), vec!["a@x.com", "b@y.org"]);
        assert!(parse_recipients("nobody").is_err());
    }
}
