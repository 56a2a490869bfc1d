//! Stripe billing's stored side: each project's connection to its Stripe account (secrets
//! encrypted at rest), and the intake of Stripe's webhook events, each stored once by its id
//! before Stripe is told it arrived, for a job to process.

use crate::crypto::{MasterKey, SealedFor};
use crate::db::{Db, DbError};
use crate::ids::ProjectId;
use crate::time::UnixMillis;
use crate::with_db;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("a stored Stripe secret cannot be decrypted with this master key")]
    Secret,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for StripeError {
    fn from(e: sqlx::Error) -> Self {
        StripeError::Db(e.into())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> StripeError {
    StripeError::Invalid { field, reason: reason.into() }
}

/// A project's connection as shown (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Connection {
    pub mode: String,
    pub block_on_payment_failure: bool,
    pub account_id: Option<String>,
    pub key_hint: Option<String>,
    pub livemode: bool,
    pub last_check_at: Option<i64>,
    pub last_check_error: Option<String>,
    /// What the last check that passed found (account, mode, the calls allowed).
    pub last_check_detail: Option<String>,
    pub updated_at: i64,
}

/// Whether a secret or restricted key is for live or test mode; `None` if it is no such key.
pub fn key_livemode(key: &str) -> Option<bool> {
    let rest = ["sk_live_", "rk_live_"].iter().find_map(|p| key.strip_prefix(p)).map(|r| (true, r));
    let rest = rest.or_else(|| ["sk_test_", "rk_test_"].iter().find_map(|p| key.strip_prefix(p)).map(|r| (false, r)));
    let (live, rest) = rest?;
    (rest.len() >= 8 && rest.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(live)
}

/// `rk_test_…wxyz`: enough to recognise a key, not to use it.
fn hint(key: &str) -> String {
    let prefix: String = key.chars().take(8).collect();
    let tail: String = key.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
    format!("{prefix}…{tail}")
}

pub fn check_webhook_secret(secret: &str) -> Result<(), StripeError> {
    let valid = secret.strip_prefix("whsec_").is_some_and(|r| r.len() >= 16 && r.bytes().all(|b| b.is_ascii_graphic()));
    if valid { Ok(()) } else { Err(invalid("webhook_secret", "must be the endpoint's signing secret (whsec_…)")) }
}

/// Connects the project with a secret or restricted key the tenant pasted (`sk_…`/`rk_…`,
/// test or live) and the webhook endpoint's signing secret (`whsec_…`). Both are encrypted.
pub async fn connect_with_key(
    db: &Db,
    master: &MasterKey,
    project: &ProjectId,
    secret_key: &str,
    webhook_secret: &str,
) -> Result<Connection, StripeError> {
    let (secret_key, webhook_secret) = (secret_key.trim(), webhook_secret.trim());
    let livemode = key_livemode(secret_key).ok_or_else(|| {
        invalid("secret_key", "must be a Stripe secret or restricted key (sk_test_…, rk_test_…, sk_live_…, rk_live_…)")
    })?;
    check_webhook_secret(webhook_secret)?;
    const SQL: &str = "INSERT INTO stripe_connections (project_id, mode, account_id, secret_key_sealed, key_hint, \
            webhook_secret_sealed, livemode, created_at, updated_at) \
        VALUES ($1, 'key', NULL, $2, $3, $4, $5, $6, $6) \
        ON CONFLICT (project_id) DO UPDATE SET mode = 'key', account_id = NULL, \
            secret_key_sealed = excluded.secret_key_sealed, key_hint = excluded.key_hint, \
            webhook_secret_sealed = excluded.webhook_secret_sealed, livemode = excluded.livemode, \
            last_check_at = NULL, last_check_error = NULL, last_check_detail = NULL, \
            updated_at = excluded.updated_at";
    let now = UnixMillis::now().0;
    let (sealed_key, sealed_webhook) = (
        master.seal(secret_key, &SealedFor::stripe_secret_key(project)),
        master.seal(webhook_secret, &SealedFor::stripe_webhook_secret(project)),
    );
    with_db!(db, pool => sqlx::query(SQL).bind(project).bind(&sealed_key).bind(hint(secret_key))
        .bind(&sealed_webhook).bind(livemode).bind(now).execute(pool).await.map(|_| ()))?;
    connection(db, project).await?.ok_or_else(|| invalid("project", "no such project"))
}

/// Whether `id` has the shape of a Stripe account id (`acct_…`).
pub fn is_account_id(id: &str) -> bool {
    id.strip_prefix("acct_")
        .is_some_and(|r| !r.is_empty() && r.len() <= 64 && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Connects the project through Stripe Connect: the operator's platform key acts on the
/// tenant's connected account `account_id` (its events reach the platform's Connect endpoint,
/// so there is no per-project signing secret). `livemode` is the platform key's mode.
pub async fn connect_with_account(
    db: &Db,
    master: &MasterKey,
    project: &ProjectId,
    account_id: &str,
    livemode: bool,
) -> Result<Connection, StripeError> {
    let account_id = account_id.trim();
    if !is_account_id(account_id) {
        return Err(invalid("account_id", "must be a Stripe account id (acct_…)"));
    }
    const SQL: &str = "INSERT INTO stripe_connections (project_id, mode, account_id, secret_key_sealed, key_hint, \
            webhook_secret_sealed, livemode, created_at, updated_at) \
        VALUES ($1, 'connect', $2, NULL, NULL, $3, $4, $5, $5) \
        ON CONFLICT (project_id) DO UPDATE SET mode = 'connect', account_id = excluded.account_id, \
            secret_key_sealed = NULL, key_hint = NULL, webhook_secret_sealed = excluded.webhook_secret_sealed, \
            livemode = excluded.livemode, last_check_at = NULL, last_check_error = NULL, last_check_detail = NULL, \
            updated_at = excluded.updated_at";
    let now = UnixMillis::now().0;
    let stored = with_db!(db, pool => sqlx::query(SQL).bind(project).bind(account_id).bind(master.seal("", &SealedFor::stripe_webhook_secret(project)))
        .bind(livemode).bind(now).execute(pool).await.map(|_| ()));
    match stored {
        Ok(()) => {}
        Err(e) if crate::db::is_unique_violation(&e) => {
            return Err(invalid("account_id", "this Stripe account already bills another project"));
        }
        Err(e) => return Err(e.into()),
    }
    connection(db, project).await?.ok_or_else(|| invalid("project", "no such project"))
}

/// How Tollgate reaches a project's Stripe account.
#[derive(Clone, PartialEq, Eq)]
pub enum Access {
    /// The tenant's own (restricted) key.
    Key(String),
    /// The operator's platform key on this connected account.
    Connect { account: String },
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Key(_) => f.write_str("Key(***)"),
            Access::Connect { account } => f.debug_struct("Connect").field("account", account).finish(),
        }
    }
}

/// How Tollgate reaches the project's Stripe account, if it is connected.
pub async fn access(db: &Db, master: &MasterKey, project: &ProjectId) -> Result<Option<Access>, StripeError> {
    const SQL: &str = "SELECT mode, account_id, secret_key_sealed FROM stripe_connections WHERE project_id = $1";
    let row: Option<(String, Option<String>, Option<String>)> = with_db!(db, pool =>
        sqlx::query_as::<_, (String, Option<String>, Option<String>)>(SQL).bind(project).fetch_optional(pool).await)?;
    Ok(match row {
        Some((mode, Some(account), _)) if mode == "connect" => Some(Access::Connect { account }),
        Some((_, _, Some(sealed))) => Some(Access::Key(
            master.open(&sealed, &SealedFor::stripe_secret_key(project)).map_err(|_| StripeError::Secret)?,
        )),
        _ => None,
    })
}

/// The project a Connect account's events belong to, and its mode.
pub async fn project_for_account(db: &Db, account_id: &str) -> Result<Option<(ProjectId, bool)>, StripeError> {
    const SQL: &str = "SELECT project_id, livemode FROM stripe_connections WHERE mode = 'connect' AND account_id = $1";
    Ok(with_db!(db, pool => sqlx::query_as::<_, (ProjectId, bool)>(SQL).bind(account_id).fetch_optional(pool).await)?)
}

/// The project's connection, if it has one.
pub async fn connection(db: &Db, project: &ProjectId) -> Result<Option<Connection>, StripeError> {
    const SQL: &str = "SELECT mode, block_on_payment_failure, account_id, key_hint, livemode, last_check_at, last_check_error, \
        last_check_detail, updated_at FROM stripe_connections WHERE project_id = $1";
    Ok(with_db!(db, pool => sqlx::query_as::<_, Connection>(SQL).bind(project).fetch_optional(pool).await)?)
}

/// Removes the project's connection and what belonged to its Stripe account (see
/// [`crate::stripe_connect::clear_account`]); its stored events stay, for the record.
pub async fn disconnect(db: &Db, project: &ProjectId) -> Result<bool, StripeError> {
    Ok(crate::stripe_connect::clear_account(db, project).await?)
}

/// The webhook signing secret and live mode of the project's connection.
pub async fn webhook_secret(
    db: &Db,
    master: &MasterKey,
    project: &ProjectId,
) -> Result<Option<(String, bool)>, StripeError> {
    const SQL: &str =
        "SELECT webhook_secret_sealed, livemode FROM stripe_connections WHERE project_id = $1 AND mode = 'key'";
    let row: Option<(String, bool)> =
        with_db!(db, pool => sqlx::query_as::<_, (String, bool)>(SQL).bind(project).fetch_optional(pool).await)?;
    match row {
        Some((sealed, livemode)) => Ok(Some((
            master.open(&sealed, &SealedFor::stripe_webhook_secret(project)).map_err(|_| StripeError::Secret)?,
            livemode,
        ))),
        None => Ok(None),
    }
}

/// Sets (or, with `None`, removes) the signing secret of the project's event destination: the
/// destination Stripe sends the v2 thin event `v1.billing.meter.error_report_triggered` to, whose
/// secret is its own (`whsec_…`, not the webhook endpoint's: a secret shared by both would let
/// either endpoint's deliveries pass at the other). Returns whether the project has a
/// connection to set it on.
pub async fn set_event_secret(
    db: &Db,
    master: &MasterKey,
    project: &ProjectId,
    secret: Option<&str>,
) -> Result<bool, StripeError> {
    let secret = secret.map(str::trim).filter(|s| !s.is_empty());
    if let Some(secret) = secret {
        check_webhook_secret(secret)
            .map_err(|_| invalid("event_secret", "must be the event destination's signing secret (whsec_…)"))?;
        if webhook_secret(db, master, project).await?.is_some_and(|(webhook, _)| webhook == secret) {
            return Err(invalid(
                "event_secret",
                "is the webhook endpoint's signing secret; the event destination has a secret of its own",
            ));
        }
    }
    const SQL: &str = "UPDATE stripe_connections SET event_secret_sealed = $1, updated_at = $2 WHERE project_id = $3";
    let sealed = secret.map(|s| master.seal(s, &SealedFor::stripe_event_secret(project)));
    let now = UnixMillis::now().0;
    let n = with_db!(db, pool => sqlx::query(SQL).bind(&sealed).bind(now).bind(project)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// The event destination's signing secret and the live mode of the project's connection (a
/// project connected with its own key; Connect projects' thin events reach the platform's
/// destination).
pub async fn event_secret(
    db: &Db,
    master: &MasterKey,
    project: &ProjectId,
) -> Result<Option<(String, bool)>, StripeError> {
    const SQL: &str = "SELECT event_secret_sealed, livemode FROM stripe_connections \
        WHERE project_id = $1 AND mode = 'key' AND event_secret_sealed IS NOT NULL";
    let row: Option<(String, bool)> =
        with_db!(db, pool => sqlx::query_as::<_, (String, bool)>(SQL).bind(project).fetch_optional(pool).await)?;
    match row {
        Some((sealed, livemode)) => Ok(Some((
            master.open(&sealed, &SealedFor::stripe_event_secret(project)).map_err(|_| StripeError::Secret)?,
            livemode,
        ))),
        None => Ok(None),
    }
}

/// Whether the project's event destination secret is set (for pages; the secret stays sealed).
pub async fn has_event_secret(db: &Db, project: &ProjectId) -> Result<bool, StripeError> {
    const SQL: &str = "SELECT CAST(COUNT(*) AS BIGINT) FROM stripe_connections WHERE project_id = $1 AND event_secret_sealed IS NOT NULL";
    let n: i64 = with_db!(db, pool => sqlx::query_scalar::<_, i64>(SQL).bind(project).fetch_one(pool).await)?;
    Ok(n > 0)
}

/// The key Tollgate calls Stripe with for the project (`None` without a key connection).
pub async fn secret_key(db: &Db, master: &MasterKey, project: &ProjectId) -> Result<Option<String>, StripeError> {
    const SQL: &str = "SELECT secret_key_sealed FROM stripe_connections WHERE project_id = $1";
    let sealed: Option<Option<String>> =
        with_db!(db, pool => sqlx::query_scalar::<_, Option<String>>(SQL).bind(project).fetch_optional(pool).await)?;
    match sealed.flatten() {
        Some(sealed) => {
            Ok(Some(master.open(&sealed, &SealedFor::stripe_secret_key(project)).map_err(|_| StripeError::Secret)?))
        }
        None => Ok(None),
    }
}

/// Records the outcome of a connection check: what it found when Stripe answered, else the error.
pub async fn record_check(db: &Db, project: &ProjectId, outcome: Result<&str, &str>) -> Result<(), StripeError> {
    const SQL: &str = "UPDATE stripe_connections SET last_check_at = $1, last_check_error = $2, \
        last_check_detail = $3 WHERE project_id = $4";
    let now = UnixMillis::now().0;
    let cut = |e: &str| e.chars().take(500).collect::<String>();
    let (detail, error) = match outcome {
        Ok(detail) => (Some(cut(detail)), None),
        Err(error) => (None, Some(cut(error))),
    };
    with_db!(db, pool => sqlx::query(SQL).bind(now).bind(&error).bind(&detail).bind(project).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// The fields of a webhook event Tollgate files it by: a v1 snapshot event, or a v2 thin
/// event (whose `created` is an RFC 3339 time).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct EventEnvelope {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub livemode: bool,
    #[serde(deserialize_with = "unix_seconds")]
    pub created: i64,
    /// The connected account it happened on (Connect events only).
    #[serde(default)]
    pub account: Option<String>,
    /// `event` for a v1 snapshot event, `v2.core.event` for a thin event.
    #[serde(default)]
    pub object: Option<String>,
}

impl EventEnvelope {
    /// Whether this is a v2 thin event (which goes to an event destination, not a webhook
    /// endpoint).
    pub fn is_thin(&self) -> bool {
        self.object.as_deref() == Some(THIN_EVENT_OBJECT)
    }
}

/// The `object` of a thin event ("v2.core.event", https://docs.stripe.com/api/v2/core/events/object).
pub const THIN_EVENT_OBJECT: &str = "v2.core.event";

/// A thin event as an event destination receives it: "a compact notification" without the
/// object's data (https://docs.stripe.com/event-destinations#thin-events; stripe-python
/// `stripe.v2._event.ThinEvent`: `id`, `type`, `created` (RFC 3339), `livemode`, `context`,
/// `related_object {id, type, url}`, `reason`). `context` names the connected account an event
/// of a Connect platform's destination happened on ("Authentication context needed to fetch the
/// event or related object"): Connect thin events have no `account`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ThinEvent {
    pub object: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub livemode: bool,
    #[serde(deserialize_with = "unix_seconds")]
    pub created: i64,
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default)]
    pub related_object: Option<RelatedObject>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct RelatedObject {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// Stores a thin event once by id within `project`, for the job that fetches the full event
/// from Stripe (`context`: the connected account to fetch it on).
pub async fn store_thin_event(
    db: &Db,
    project: &ProjectId,
    event: &ThinEvent,
    payload: &str,
) -> Result<Intake, StripeError> {
    const SQL: &str = "INSERT INTO stripe_events (id, project_id, type, livemode, created, payload, received_at, \
            thin, context) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (project_id, id) DO NOTHING";
    let now = UnixMillis::now().0;
    let inserted = with_db!(db, pool => sqlx::query(SQL).bind(&event.id).bind(project).bind(&event.kind)
        .bind(event.livemode).bind(event.created).bind(payload).bind(now).bind(true).bind(&event.context)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(if inserted == 1 { Intake::Stored } else { Intake::AlreadyStored })
}

/// A stored thin event whose full event has not been fetched and processed yet.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingThinEvent {
    pub id: String,
    pub project_id: ProjectId,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub context: Option<String>,
    pub attempts: i64,
}

/// Thin events due for fetching, oldest first, each claimed for a minute (its next attempt
/// pushed back) so that two workers do not fetch it at once.
pub async fn claim_thin_events(db: &Db, now: UnixMillis, limit: i64) -> Result<Vec<PendingThinEvent>, StripeError> {
    const DUE: &str = "SELECT id, project_id, type, context, attempts FROM stripe_events \
        WHERE thin AND processed_at IS NULL AND next_attempt_at <= $1 ORDER BY received_at, id LIMIT $2";
    const CLAIM: &str = "UPDATE stripe_events SET next_attempt_at = $1 \
        WHERE project_id = $2 AND id = $3 AND processed_at IS NULL AND next_attempt_at <= $4";
    let due: Vec<PendingThinEvent> = with_db!(db, pool =>
        sqlx::query_as::<_, PendingThinEvent>(DUE).bind(now.0).bind(limit).fetch_all(pool).await)?;
    let mut claimed = Vec::with_capacity(due.len());
    for event in due {
        let n = with_db!(db, pool => sqlx::query(CLAIM).bind(now.0 + 60_000).bind(&event.project_id).bind(&event.id)
            .bind(now.0).execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 1 {
            claimed.push(event);
        }
    }
    Ok(claimed)
}

/// How fetching and processing a thin event ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThinOutcome {
    /// Processed (or set aside with `error` when it cannot be: Stripe refused it for good).
    Done { error: Option<String> },
    /// Stripe could not be asked now: tried again at `next_at` (Unix ms).
    Retry { error: String, next_at: i64 },
}

pub async fn record_thin_event(
    db: &Db,
    project: &ProjectId,
    id: &str,
    outcome: &ThinOutcome,
) -> Result<(), StripeError> {
    let now = UnixMillis::now().0;
    let cut = |e: &str| e.chars().take(500).collect::<String>();
    match outcome {
        ThinOutcome::Done { error } => {
            const DONE: &str = "UPDATE stripe_events SET processed_at = $1, attempts = attempts + 1, last_error = $2 \
                WHERE project_id = $3 AND id = $4";
            with_db!(db, pool => sqlx::query(DONE).bind(now).bind(error.as_deref().map(cut)).bind(project).bind(id)
                .execute(pool).await.map(|_| ()))?;
        }
        ThinOutcome::Retry { error, next_at } => {
            const RETRY: &str = "UPDATE stripe_events SET next_attempt_at = $1, attempts = attempts + 1, \
                last_error = $2 WHERE project_id = $3 AND id = $4";
            with_db!(db, pool => sqlx::query(RETRY).bind(next_at).bind(cut(error)).bind(project).bind(id)
                .execute(pool).await.map(|_| ()))?;
        }
    }
    Ok(())
}

fn unix_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Time {
        Seconds(i64),
        Text(String),
    }
    match Time::deserialize(d)? {
        Time::Seconds(s) => Ok(s),
        Time::Text(t) => crate::period::rfc3339_utc_seconds(&t)
            .ok_or_else(|| serde::de::Error::custom(format!("`created` is not a UTC time: {t:?}"))),
    }
}

/// Whether an event was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    Stored,
    /// Stripe sent it before (it retries until acknowledged, and may repeat anyway).
    AlreadyStored,
}

/// Stores `event` (its raw `payload`) once by id within `project`, for the processing job.
/// Ids are unique per project, not globally: another tenant's endpoint storing the same id
/// first must not make this project's event a repeat.
pub async fn store_event(
    db: &Db,
    project: &ProjectId,
    event: &EventEnvelope,
    payload: &str,
) -> Result<Intake, StripeError> {
    const SQL: &str = "INSERT INTO stripe_events (id, project_id, type, livemode, created, payload, received_at) \
        VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (project_id, id) DO NOTHING";
    let now = UnixMillis::now().0;
    let inserted = with_db!(db, pool => sqlx::query(SQL).bind(&event.id).bind(project).bind(&event.kind)
        .bind(event.livemode).bind(event.created).bind(payload).bind(now).execute(pool).await
        .map(|r| r.rows_affected()))?;
    Ok(if inserted == 1 { Intake::Stored } else { Intake::AlreadyStored })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_their_mode() {
        assert_eq!(key_livemode("rk_test_51Habcdefgh"), Some(false));
        assert_eq!(key_livemode("sk_live_51Habcdefgh"), Some(true));
        assert_eq!(key_livemode("pk_test_51Habcdefgh"), None, "a publishable key cannot bill");
        assert_eq!(key_livemode("sk_test_"), None);
        assert_eq!(key_livemode("sk_test_abc def ghij"), None);
        assert_eq!(hint("rk_test_51Habcdefghwxyz"), "rk_test_…wxyz");
    }
}

// ---------------------------------------------------------------------------------------
// Processing stored events.

/// The fields of an invoice Tollgate mirrors (Stripe's `Invoice` object: `attempted`,
/// `attempt_count`, `next_payment_attempt`, `amount_remaining` as in stripe-node's
/// `Invoice` type and https://docs.stripe.com/api/invoices/object; `paid` exists only in API
/// versions before 2025-03-31.basil, so it is read when present and never required).
#[derive(Debug, Clone, serde::Deserialize)]
struct InvoiceObject {
    id: String,
    customer: Option<String>,
    number: Option<String>,
    status: Option<String>,
    currency: String,
    #[serde(default)]
    amount_due: i64,
    #[serde(default)]
    amount_paid: i64,
    amount_remaining: Option<i64>,
    hosted_invoice_url: Option<String>,
    /// Whether an attempt has been made to pay the invoice.
    #[serde(default)]
    attempted: bool,
    /// Payment attempts made, from the retry schedule's point of view.
    #[serde(default)]
    attempt_count: i64,
    /// When Stripe tries again (Unix seconds), if it will.
    next_payment_attempt: Option<i64>,
    paid: Option<bool>,
    /// The period whose usage the invoice bills (Unix seconds).
    period_start: Option<i64>,
    period_end: Option<i64>,
    /// Its first page of lines (Stripe puts up to ten in an event; Tollgate's subscription
    /// has one).
    lines: Option<InvoiceLines>,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
struct InvoiceLines {
    #[serde(default)]
    data: Vec<InvoiceLine>,
}

/// A line of an invoice: its amount in minor units, its quantity (for a metered price, the
/// meter's usage in the period) and its price — under `pricing.price_details` since API
/// 2025-03-31.basil, under `price` before (stripe-node's `InvoiceLineItem`).
#[derive(Debug, Clone, serde::Deserialize)]
struct InvoiceLine {
    #[serde(default)]
    amount: i64,
    quantity: Option<i64>,
    pricing: Option<LinePricing>,
    price: Option<LinePrice>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct LinePricing {
    price_details: Option<PriceDetails>,
    unit_amount_decimal: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct PriceDetails {
    price: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct LinePrice {
    id: String,
    unit_amount_decimal: Option<String>,
}

impl InvoiceLine {
    fn price(&self) -> Option<&str> {
        self.pricing
            .as_ref()
            .and_then(|p| p.price_details.as_ref())
            .and_then(|d| d.price.as_deref())
            .or(self.price.as_ref().map(|p| p.id.as_str()))
    }

    fn unit_amount_decimal(&self) -> Option<&str> {
        self.pricing
            .as_ref()
            .and_then(|p| p.unit_amount_decimal.as_deref())
            .or(self.price.as_ref().and_then(|p| p.unit_amount_decimal.as_deref()))
    }
}

/// `quantity × unit_amount_decimal` rounded half up to a whole minor unit, as Stripe prices a
/// line (once per line); `None` for a unit Tollgate cannot read.
pub fn line_amount(quantity: i64, unit_amount_decimal: &str) -> Option<i64> {
    let (whole, fraction) = unit_amount_decimal.split_once('.').unwrap_or((unit_amount_decimal, ""));
    if whole.is_empty() && fraction.is_empty() || !whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scale = 10_i128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let numerator: i128 = format!("{whole}{fraction}").parse().ok()?;
    let exact = i128::from(quantity).checked_mul(numerator)?;
    i64::try_from((2 * exact + scale).div_euclid(2 * scale)).ok()
}

impl InvoiceObject {
    /// Whether a payment was attempted and the invoice is still open with money owed: read
    /// from the invoice alone, so no event (an `invoice.updated` after
    /// `invoice.payment_failed`, say) can clear it without a payment.
    fn payment_failed(&self, status: &str) -> bool {
        status == "open"
            && self.attempted
            && self.attempt_count > 0
            && self.paid != Some(true)
            && self.amount_remaining.unwrap_or(self.amount_due - self.amount_paid) > 0
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
struct EventData<T> {
    object: T,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct Event<T> {
    #[serde(rename = "type")]
    kind: String,
    created: i64,
    data: EventData<T>,
}

/// How far along an invoice is; a snapshot never moves an invoice back.
fn status_rank(status: &str) -> i64 {
    match status {
        "draft" => 0,
        "open" => 1,
        "uncollectible" => 2,
        "paid" | "void" => 3,
        _ => 0,
    }
}

/// What processing one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// An invoice snapshot was applied (or was older than the one held).
    Invoice { id: String, applied: bool },
    /// A subscription's status was applied (or was older than the one held).
    Subscription { id: String, applied: bool },
    /// A payment-method setup session was completed: its card is to become the customer's
    /// default for invoices (`recorded`: the first time it was reported).
    SetupCompleted { id: String, recorded: bool },
    /// A customer was deleted in Stripe (`applied`: it was one of the project's).
    CustomerDeleted { id: String, applied: bool },
    /// A type Tollgate does not act on.
    Ignored,
}

/// Processes up to `limit` stored events not processed yet, oldest first. An event that
/// cannot be processed keeps its error and is tried again next time.
pub async fn process_pending(db: &Db, limit: i64) -> Result<Vec<(String, Processed)>, StripeError> {
    const PENDING: &str = "SELECT id, project_id, type, payload FROM stripe_events \
        WHERE processed_at IS NULL AND NOT thin ORDER BY received_at, id LIMIT $1";
    let pending: Vec<(String, ProjectId, String, String)> = with_db!(db, pool =>
        sqlx::query_as::<_, (String, ProjectId, String, String)>(PENDING).bind(limit).fetch_all(pool).await)?;
    let mut done = Vec::new();
    for (id, project, kind, payload) in pending {
        let outcome = match kind.as_str() {
            "invoice.created"
            | "invoice.finalized"
            | "invoice.paid"
            | "invoice.payment_failed"
            | "invoice.voided"
            | "invoice.updated"
            | "invoice.marked_uncollectible" => apply_invoice(db, &project, &payload).await,
            "customer.subscription.created"
            | "customer.subscription.updated"
            | "customer.subscription.deleted"
            | "customer.subscription.paused"
            | "customer.subscription.resumed" => apply_subscription(db, &project, &payload).await,
            "customer.deleted" => apply_customer_deleted(db, &project, &payload).await,
            "checkout.session.completed" => apply_checkout_completed(db, &project, &payload).await,
            _ => Ok(Processed::Ignored),
        };
        let now = UnixMillis::now().0;
        match outcome {
            Ok(processed) => {
                const DONE: &str = "UPDATE stripe_events SET processed_at = $1, attempts = attempts + 1, \
                    last_error = NULL WHERE project_id = $2 AND id = $3";
                with_db!(db, pool => sqlx::query(DONE).bind(now).bind(&project).bind(&id).execute(pool).await.map(|_| ()))?;
                done.push((id, processed));
            }
            Err(StripeError::Invalid { reason, .. }) => {
                // A payload Tollgate cannot read will not get better: recorded, and set aside.
                tracing::warn!(event = %id, %reason, "stripe event cannot be processed");
                const BAD: &str = "UPDATE stripe_events SET processed_at = $1, attempts = attempts + 1, \
                    last_error = $2 WHERE project_id = $3 AND id = $4";
                with_db!(db, pool => sqlx::query(BAD).bind(now).bind(&reason).bind(&project).bind(&id)
                    .execute(pool).await.map(|_| ()))?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

async fn apply_invoice(db: &Db, project: &ProjectId, payload: &str) -> Result<Processed, StripeError> {
    let event: Event<InvoiceObject> =
        serde_json::from_str(payload).map_err(|e| invalid("payload", format!("not an invoice event: {e}")))?;
    let invoice = event.data.object;
    let status = invoice.status.clone().unwrap_or_else(|| "draft".to_owned());
    let rank = status_rank(&status);
    let payment_failed = invoice.payment_failed(&status);
    let stripe_customer = invoice.customer.clone().unwrap_or_default();
    // Insert, or replace only with a snapshot further along: a later status, or the same
    // status after more payment attempts, or as far along and as new or newer.
    const UPSERT: &str = "INSERT INTO stripe_invoices (id, project_id, stripe_customer_id, customer_id, number, \
            status, status_rank, payment_failed, currency, amount_due, amount_paid, hosted_invoice_url, state_at, \
            updated_at, attempt_count, next_payment_attempt) \
        VALUES ($1, $2, $3, (SELECT id FROM customers WHERE project_id = $2 AND stripe_customer_id = $3), \
            $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
        ON CONFLICT (project_id, id) DO UPDATE SET customer_id = excluded.customer_id, number = excluded.number, \
            status = excluded.status, status_rank = excluded.status_rank, payment_failed = excluded.payment_failed, \
            currency = excluded.currency, amount_due = excluded.amount_due, amount_paid = excluded.amount_paid, \
            hosted_invoice_url = excluded.hosted_invoice_url, state_at = excluded.state_at, \
            updated_at = excluded.updated_at, attempt_count = excluded.attempt_count, \
            next_payment_attempt = excluded.next_payment_attempt \
        WHERE excluded.status_rank > stripe_invoices.status_rank \
            OR (excluded.status_rank = stripe_invoices.status_rank \
                AND (excluded.attempt_count > stripe_invoices.attempt_count \
                    OR (excluded.attempt_count = stripe_invoices.attempt_count \
                        AND excluded.state_at >= stripe_invoices.state_at)))";
    let now = UnixMillis::now().0;
    let applied = with_db!(db, pool => sqlx::query(UPSERT)
        .bind(&invoice.id).bind(project).bind(&stripe_customer).bind(&invoice.number).bind(&status).bind(rank)
        .bind(payment_failed).bind(&invoice.currency).bind(invoice.amount_due).bind(invoice.amount_paid)
        .bind(&invoice.hosted_invoice_url).bind(event.created).bind(now).bind(invoice.attempt_count)
        .bind(invoice.next_payment_attempt)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    if applied > 0 {
        reconcile_hold(db, project, &stripe_customer).await?;
        if rank > 0 && status != "void" {
            reconcile_invoice(db, project, &stripe_customer, &invoice).await?;
        }
    }
    Ok(Processed::Invoice { id: invoice.id, applied: applied > 0 })
}

/// Compares a finalized invoice's metered line (Tollgate's price) with what Tollgate delivered
/// for the customer with a timestamp inside the invoice's period, and records both. An
/// invoice without Tollgate's price (a one-off, another product) is left alone.
async fn reconcile_invoice(
    db: &Db,
    project: &ProjectId,
    stripe_customer: &str,
    invoice: &InvoiceObject,
) -> Result<(), StripeError> {
    let (Some(start), Some(end)) = (invoice.period_start, invoice.period_end) else { return Ok(()) };
    const PRICE: &str = "SELECT price_id FROM stripe_connections WHERE project_id = $1";
    let price: Option<String> =
        with_db!(db, pool => sqlx::query_scalar::<_, Option<String>>(PRICE).bind(project).fetch_optional(pool).await)?
            .flatten();
    let Some(price) = price else { return Ok(()) };
    let lines: Vec<&InvoiceLine> = invoice
        .lines
        .as_ref()
        .map(|l| l.data.iter().filter(|line| line.price() == Some(price.as_str())).collect())
        .unwrap_or_default();
    let Some(unit) = lines.first().and_then(|l| l.unit_amount_decimal()) else { return Ok(()) };
    let metered_quantity: i64 = lines.iter().map(|l| l.quantity.unwrap_or(0)).sum();
    let metered_amount: i64 = lines.iter().map(|l| l.amount).sum();
    const DELIVERED: &str = "SELECT CAST(COALESCE(SUM(value_nanos), 0) AS BIGINT) FROM meter_batches \
        WHERE project_id = $1 AND stripe_customer_id = $2 AND status = 'delivered' \
          AND COALESCE(meter_timestamp, last_at / 1000) >= $3 AND COALESCE(meter_timestamp, last_at / 1000) < $4";
    let expected_quantity: i64 = with_db!(db, pool => sqlx::query_scalar::<_, i64>(DELIVERED).bind(project)
        .bind(stripe_customer).bind(start).bind(end).fetch_one(pool).await)?;
    let expected_amount = line_amount(expected_quantity, unit);
    const SQL: &str = "UPDATE stripe_invoices SET period_start = $1, period_end = $2, metered_quantity = $3, \
        metered_amount = $4, expected_quantity = $5, expected_amount = $6 WHERE project_id = $7 AND id = $8";
    with_db!(db, pool => sqlx::query(SQL).bind(start).bind(end).bind(metered_quantity).bind(metered_amount)
        .bind(expected_quantity).bind(expected_amount).bind(project).bind(&invoice.id).execute(pool).await.map(drop))?;
    let matches = metered_quantity == expected_quantity && Some(metered_amount) == expected_amount;
    metrics::counter!("tollgate_stripe_invoices_reconciled_total", "result" => if matches { "match" } else { "drift" })
        .increment(1);
    if !matches {
        tracing::warn!(%project, invoice = %invoice.id, metered_quantity, expected_quantity,
            "a finalized invoice does not match what Tollgate delivered for its period");
    }
    Ok(())
}

/// `customer.deleted`: the Stripe customer is gone, with its subscriptions; what it had not
/// been invoiced for is shown as usage Stripe cannot invoice (see [`crate::one_off`]).
async fn apply_customer_deleted(db: &Db, project: &ProjectId, payload: &str) -> Result<Processed, StripeError> {
    #[derive(serde::Deserialize)]
    struct Deleted {
        id: String,
    }
    let event: Event<Deleted> =
        serde_json::from_str(payload).map_err(|e| invalid("payload", format!("not a customer event: {e}")))?;
    let id = event.data.object.id;
    let applied = crate::one_off::record_customer_deleted(db, project, &id).await?;
    Ok(Processed::CustomerDeleted { id, applied: applied > 0 })
}

/// `checkout.session.completed`: for a setup session (a payment-method setup link), the card
/// it saved is to become the customer's default for invoices, which Checkout does not do
/// (see [`crate::payment_collection::record_setup_completed`]). Other sessions are not Tollgate's.
async fn apply_checkout_completed(db: &Db, project: &ProjectId, payload: &str) -> Result<Processed, StripeError> {
    #[derive(serde::Deserialize)]
    struct Session {
        id: String,
        mode: Option<String>,
        customer: Option<String>,
        setup_intent: Option<String>,
    }
    let event: Event<Session> =
        serde_json::from_str(payload).map_err(|e| invalid("payload", format!("not a Checkout session event: {e}")))?;
    let session = event.data.object;
    let (Some("setup"), Some(customer), Some(setup_intent)) =
        (session.mode.as_deref(), session.customer.as_deref(), session.setup_intent.as_deref())
    else {
        return Ok(Processed::Ignored);
    };
    let recorded =
        crate::payment_collection::record_setup_completed(db, project, &session.id, customer, setup_intent).await?;
    Ok(Processed::SetupCompleted { id: session.id, recorded })
}

/// The fields of a subscription Tollgate mirrors.
#[derive(Debug, Clone, serde::Deserialize)]
struct SubscriptionObject {
    id: String,
    customer: String,
    status: String,
}

/// Mirrors the status of a subscription provisioning made (or one of a linked customer's):
/// the newest snapshot wins, and a canceled subscription stays canceled.
async fn apply_subscription(db: &Db, project: &ProjectId, payload: &str) -> Result<Processed, StripeError> {
    let event: Event<SubscriptionObject> =
        serde_json::from_str(payload).map_err(|e| invalid("payload", format!("not a subscription event: {e}")))?;
    let subscription = event.data.object;
    let status =
        if event.kind == "customer.subscription.deleted" { "canceled".to_owned() } else { subscription.status };
    const SQL: &str = "UPDATE customers SET stripe_subscription_id = $1, stripe_subscription_status = $2, \
            stripe_subscription_state_at = $3 \
        WHERE project_id = $4 AND stripe_customer_id = $5 AND stripe_subscription_id = $1 \
          AND (stripe_subscription_state_at IS NULL OR stripe_subscription_state_at <= $3) \
          AND (stripe_subscription_status IS NULL OR stripe_subscription_status <> 'canceled')";
    let applied = with_db!(db, pool => sqlx::query(SQL).bind(&subscription.id).bind(&status).bind(event.created)
        .bind(project).bind(&subscription.customer).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(Processed::Subscription { id: subscription.id, applied: applied > 0 })
}

/// Applies the project's policy to the customer billed by `stripe_customer`, from the state of
/// their invoices (not from the event that got here): blocked while an open invoice has a
/// failed payment and the policy says so; unblocked once none has, if billing blocked them.
async fn reconcile_hold(db: &Db, project: &ProjectId, stripe_customer: &str) -> Result<(), StripeError> {
    const HOLD: &str = "UPDATE customers SET blocked = TRUE, billing_hold = TRUE \
        WHERE project_id = $1 AND stripe_customer_id = $2 AND NOT blocked \
          AND EXISTS (SELECT 1 FROM stripe_connections s WHERE s.project_id = $1 AND s.block_on_payment_failure) \
          AND EXISTS (SELECT 1 FROM stripe_invoices i WHERE i.project_id = $1 AND i.stripe_customer_id = $2 \
                      AND i.status = 'open' AND i.payment_failed)";
    const LIFT: &str = "UPDATE customers SET blocked = FALSE, billing_hold = FALSE \
        WHERE project_id = $1 AND stripe_customer_id = $2 AND billing_hold \
          AND NOT (EXISTS (SELECT 1 FROM stripe_connections s WHERE s.project_id = $1 AND s.block_on_payment_failure) \
               AND EXISTS (SELECT 1 FROM stripe_invoices i WHERE i.project_id = $1 AND i.stripe_customer_id = $2 \
                           AND i.status = 'open' AND i.payment_failed))";
    for (sql, action) in [(HOLD, "blocked: an invoice payment failed"), (LIFT, "unblocked: no failed payment left")] {
        let changed = with_db!(db, pool => sqlx::query(sql).bind(project).bind(stripe_customer)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        if changed > 0 {
            tracing::info!(%project, stripe_customer, "customer {action}");
        }
    }
    Ok(())
}

/// Whether a failed invoice payment blocks the customer (the project's billing policy).
pub async fn set_block_on_payment_failure(db: &Db, project: &ProjectId, block: bool) -> Result<bool, StripeError> {
    const SQL: &str =
        "UPDATE stripe_connections SET block_on_payment_failure = $1, updated_at = $2 WHERE project_id = $3";
    let now = UnixMillis::now().0;
    let n = with_db!(db, pool => sqlx::query(SQL).bind(block).bind(now).bind(project)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    const LINKED: &str =
        "SELECT DISTINCT stripe_customer_id FROM customers WHERE project_id = $1 AND stripe_customer_id IS NOT NULL";
    let linked: Vec<String> =
        with_db!(db, pool => sqlx::query_scalar::<_, String>(LINKED).bind(project).fetch_all(pool).await)?;
    for stripe_customer in linked {
        reconcile_hold(db, project, &stripe_customer).await?;
    }
    Ok(n > 0)
}

/// One mirrored invoice, for pages.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InvoiceRow {
    pub id: String,
    pub number: Option<String>,
    pub stripe_customer_id: String,
    pub customer_id: Option<crate::ids::CustomerId>,
    pub customer_external_id: Option<String>,
    pub status: String,
    pub payment_failed: bool,
    pub currency: String,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub hosted_invoice_url: Option<String>,
    pub state_at: i64,
    /// The invoice's metered usage and its amount (Tollgate's price), once finalized.
    pub metered_quantity: Option<i64>,
    pub metered_amount: Option<i64>,
    /// What Tollgate delivered for the invoice's period, and its amount at the line's price.
    pub expected_quantity: Option<i64>,
    pub expected_amount: Option<i64>,
}

/// How a finalized invoice compares with the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvoiceCheck {
    /// Not finalized yet, or without Tollgate's price.
    Unchecked,
    /// The metered line is exactly what Tollgate delivered for the period.
    Matches,
    /// Stripe's line counts less (`missing` > 0: usage delivered for the period is not on the
    /// invoice) or more (`missing` < 0) than Tollgate delivered, in nano-units.
    Drift { missing: i64 },
}

impl InvoiceRow {
    pub fn check(&self) -> InvoiceCheck {
        match (self.metered_quantity, self.expected_quantity) {
            (Some(metered), Some(expected)) if metered == expected && self.metered_amount == self.expected_amount => {
                InvoiceCheck::Matches
            }
            (Some(metered), Some(expected)) => InvoiceCheck::Drift { missing: expected - metered },
            _ => InvoiceCheck::Unchecked,
        }
    }
}

/// The project's invoices, newest first; only one customer's if `customer` is given.
pub async fn invoices(
    db: &Db,
    project: &ProjectId,
    customer: Option<&crate::ids::CustomerId>,
    limit: i64,
) -> Result<Vec<InvoiceRow>, StripeError> {
    const SQL: &str = "SELECT i.id, i.number, i.stripe_customer_id, i.customer_id, \
            c.external_id AS customer_external_id, i.status, i.payment_failed, i.currency, i.amount_due, \
            i.amount_paid, i.hosted_invoice_url, i.state_at, i.metered_quantity, i.metered_amount, \
            i.expected_quantity, i.expected_amount \
        FROM stripe_invoices i LEFT JOIN customers c ON c.id = i.customer_id \
        WHERE i.project_id = $1 AND ($2 IS NULL OR i.customer_id = $2) \
        ORDER BY i.state_at DESC, i.id DESC LIMIT $3";
    let customer = customer.map(|c| c.as_str().to_owned());
    Ok(with_db!(db, pool => sqlx::query_as::<_, InvoiceRow>(SQL).bind(project).bind(&customer).bind(limit)
        .fetch_all(pool).await)?)
}

/// Links an end-customer to an existing Stripe customer (`cus_…`) the tenant gives.
pub async fn link_customer(
    db: &Db,
    project: &ProjectId,
    customer: &crate::ids::CustomerId,
    stripe_customer_id: &str,
) -> Result<bool, StripeError> {
    let id = stripe_customer_id.trim();
    if !(id.starts_with("cus_") && id.len() > 4 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')) {
        return Err(invalid("stripe_customer_id", "must be a Stripe customer id (cus_…)"));
    }
    const SQL: &str = "UPDATE customers SET stripe_customer_id = $1 WHERE id = $2 AND project_id = $3";
    let linked = with_db!(db, pool => sqlx::query(SQL).bind(id).bind(customer).bind(project)
        .execute(pool).await.map(|r| r.rows_affected()));
    match linked {
        Ok(n) => {
            // Invoices that arrived before the link now find their customer.
            const ADOPT: &str = "UPDATE stripe_invoices SET customer_id = $1 \
                WHERE project_id = $2 AND stripe_customer_id = $3 AND customer_id IS NULL";
            with_db!(db, pool => sqlx::query(ADOPT).bind(customer).bind(project).bind(id).execute(pool).await.map(|_| ()))?;
            reconcile_hold(db, project, id).await?;
            Ok(n > 0)
        }
        Err(e) if crate::db::is_unique_violation(&e) => {
            Err(invalid("stripe_customer_id", "is already linked to another customer of this project"))
        }
        Err(e) => Err(e.into()),
    }
}
