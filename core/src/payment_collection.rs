//! How a project's end-customers pay: the collection method provisioning gives each new
//! subscription (Stripe's `collection_method`: send invoices, due after some days, or charge a
//! saved payment method automatically), and the return URLs of the links that let a customer
//! save a payment method (Stripe Checkout in setup mode) or manage billing (the customer portal).

use crate::db::{Db, DbError};
use crate::ids::ProjectId;
use crate::time::UnixMillis;
use crate::with_db;

/// Days until a sent invoice is due, unless the tenant chose otherwise.
pub const DEFAULT_DAYS_UNTIL_DUE: i64 = 30;
/// Stripe's bound on `days_until_due` is not documented beyond "number of days"; a year is
/// more than any tenant needs and keeps typos out.
pub const MAX_DAYS_UNTIL_DUE: i64 = 365;

/// A project's payment collection setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    /// `collection_method=send_invoice`: Stripe emails each invoice with its hosted payment
    /// page, due `days_until_due` days after it is finalized.
    SendInvoice { days_until_due: i64 },
    /// `collection_method=charge_automatically`: Stripe charges the customer's default payment
    /// method when the invoice is finalized.
    ChargeAutomatically,
}

impl Default for Collection {
    fn default() -> Self {
        Collection::SendInvoice { days_until_due: DEFAULT_DAYS_UNTIL_DUE }
    }
}

impl Collection {
    /// Stripe's `collection_method`.
    pub fn method(&self) -> &'static str {
        match self {
            Collection::SendInvoice { .. } => "send_invoice",
            Collection::ChargeAutomatically => "charge_automatically",
        }
    }

    /// Days until a sent invoice is due (`None` when charging automatically, where Stripe
    /// refuses `days_until_due`).
    pub fn days_until_due(&self) -> Option<i64> {
        match self {
            Collection::SendInvoice { days_until_due } => Some(*days_until_due),
            Collection::ChargeAutomatically => None,
        }
    }

    /// The setting from what a tenant chose (`method`, and `days_until_due` for sent invoices).
    pub fn parse(method: &str, days_until_due: Option<i64>) -> Result<Self, CollectionError> {
        match method.trim() {
            "send_invoice" => {
                let days = days_until_due.unwrap_or(DEFAULT_DAYS_UNTIL_DUE);
                if (0..=MAX_DAYS_UNTIL_DUE).contains(&days) {
                    Ok(Collection::SendInvoice { days_until_due: days })
                } else {
                    Err(CollectionError::Invalid {
                        field: "days_until_due",
                        reason: format!("must be a whole number of days from 0 to {MAX_DAYS_UNTIL_DUE}"),
                    })
                }
            }
            "charge_automatically" => Ok(Collection::ChargeAutomatically),
            _ => Err(CollectionError::Invalid {
                field: "collection_method",
                reason: "must be send_invoice or charge_automatically".to_owned(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollectionError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for CollectionError {
    fn from(e: sqlx::Error) -> Self {
        CollectionError::Db(e.into())
    }
}

/// The project's setting (sent invoices due in 30 days unless the tenant chose otherwise).
pub async fn collection(db: &Db, project: &ProjectId) -> Result<Collection, DbError> {
    const SQL: &str = "SELECT collection_method, days_until_due FROM payment_collection WHERE project_id = $1";
    let row: Option<(String, i64)> =
        with_db!(db, pool => sqlx::query_as::<_, (String, i64)>(SQL).bind(project).fetch_optional(pool).await)?;
    Ok(match row {
        Some((method, days)) => Collection::parse(&method, Some(days)).unwrap_or_default(),
        None => Collection::default(),
    })
}

/// Sets the project's setting; subscriptions made from now on get it.
pub async fn set_collection(db: &Db, project: &ProjectId, collection: Collection) -> Result<(), DbError> {
    const SQL: &str = "INSERT INTO payment_collection (project_id, collection_method, days_until_due, updated_at) \
        VALUES ($1, $2, $3, $4) ON CONFLICT (project_id) DO UPDATE SET \
        collection_method = excluded.collection_method, days_until_due = excluded.days_until_due, \
        updated_at = excluded.updated_at";
    let days = collection.days_until_due().unwrap_or(DEFAULT_DAYS_UNTIL_DUE);
    with_db!(db, pool => sqlx::query(SQL).bind(project).bind(collection.method()).bind(days)
        .bind(UnixMillis::now().0).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// Whether the project bills with Stripe Tax (`automatic_tax[enabled]=true` on the
/// subscriptions and one-off invoices it makes, the billing address asked for on the setup
/// link). Off unless the tenant turned it on: Stripe Tax must be activated in Stripe first.
pub async fn automatic_tax(db: &Db, project: &ProjectId) -> Result<bool, DbError> {
    const SQL: &str = "SELECT automatic_tax FROM payment_collection WHERE project_id = $1";
    let on: Option<bool> =
        with_db!(db, pool => sqlx::query_scalar::<_, bool>(SQL).bind(project).fetch_optional(pool).await)?;
    Ok(on.unwrap_or(false))
}

/// Turns Stripe Tax on or off for what is made from now on.
pub async fn set_automatic_tax(db: &Db, project: &ProjectId, on: bool) -> Result<(), DbError> {
    const SQL: &str = "INSERT INTO payment_collection (project_id, collection_method, days_until_due, updated_at, \
            automatic_tax) VALUES ($1, 'send_invoice', $2, $3, $4) \
        ON CONFLICT (project_id) DO UPDATE SET automatic_tax = excluded.automatic_tax, updated_at = excluded.updated_at";
    with_db!(db, pool => sqlx::query(SQL).bind(project).bind(DEFAULT_DAYS_UNTIL_DUE).bind(UnixMillis::now().0)
        .bind(on).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// A return URL a tenant gives for a link (where Stripe sends the customer back): an absolute
/// `https` URL with a host and no credentials, at most 2,000 characters.
pub fn check_return_url(field: &'static str, url: &str) -> Result<String, CollectionError> {
    let invalid = |reason: &str| CollectionError::Invalid { field, reason: reason.to_owned() };
    let url = url.trim();
    if url.len() > 2_000 {
        return Err(invalid("must be at most 2000 characters"));
    }
    let parsed = url::Url::parse(url).map_err(|_| invalid("must be an absolute https URL"))?;
    if parsed.scheme() != "https" || parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("must be an absolute https URL"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid("must not carry credentials"));
    }
    Ok(parsed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_give_stripes_parameters() {
        assert_eq!(Collection::parse("send_invoice", None).unwrap(), Collection::SendInvoice { days_until_due: 30 });
        assert_eq!(Collection::parse("charge_automatically", Some(9)).unwrap(), Collection::ChargeAutomatically);
        assert!(Collection::parse("send_invoice", Some(-1)).is_err());
        assert!(Collection::parse("send_invoice", Some(366)).is_err());
        assert!(Collection::parse("paypal", None).is_err());
        let sent = Collection::SendInvoice { days_until_due: 14 };
        assert_eq!((sent.method(), sent.days_until_due()), ("send_invoice", Some(14)));
        let charged = Collection::ChargeAutomatically;
        assert_eq!((charged.method(), charged.days_until_due()), ("charge_automatically", None));
    }

    #[test]
    fn return_urls_are_https() {
        assert!(check_return_url("return_url", "https://app.example.com/billing?done=1").is_ok());
        assert!(check_return_url("return_url", "http://app.example.com/").is_err());
        assert!(check_return_url("return_url", "javascript:alert(1)").is_err());
        assert!(check_return_url("return_url", "https://user:pw@app.example.com/").is_err());
        assert!(check_return_url("return_url", "/relative").is_err());
    }
}

// ---------------------------------------------------------------------------------------
// Cards saved through a setup link.

/// A completed setup session whose payment method is to become its customer's default for
/// invoices.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SavedPaymentMethod {
    pub project_id: ProjectId,
    pub checkout_session: String,
    pub stripe_customer_id: String,
    pub setup_intent: String,
    pub attempts: i64,
}

/// Records a completed setup session (`checkout.session.completed`, `mode=setup`); a
/// session reported again is recorded once.
pub async fn record_setup_completed(
    db: &Db,
    project: &ProjectId,
    session: &str,
    stripe_customer: &str,
    setup_intent: &str,
) -> Result<bool, DbError> {
    const SQL: &str = "INSERT INTO saved_payment_methods (project_id, checkout_session, stripe_customer_id, \
            setup_intent, status, next_attempt_at, created_at) VALUES ($1, $2, $3, $4, 'pending', 0, $5) \
        ON CONFLICT (project_id, checkout_session) DO NOTHING";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(project).bind(session).bind(stripe_customer)
        .bind(setup_intent).bind(UnixMillis::now().0).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// Saved payment methods to make defaults now, each claimed for a minute.
pub async fn claim_saved_payment_methods(db: &Db, limit: i64) -> Result<Vec<SavedPaymentMethod>, DbError> {
    const DUE: &str = "SELECT project_id, checkout_session, stripe_customer_id, setup_intent, attempts \
        FROM saved_payment_methods WHERE status = 'pending' AND next_attempt_at <= $1 ORDER BY created_at LIMIT $2";
    const CLAIM: &str = "UPDATE saved_payment_methods SET next_attempt_at = $1, attempts = attempts + 1 \
        WHERE project_id = $2 AND checkout_session = $3 AND status = 'pending' AND next_attempt_at <= $4";
    let now = UnixMillis::now().0;
    let due: Vec<SavedPaymentMethod> =
        with_db!(db, pool => sqlx::query_as::<_, SavedPaymentMethod>(DUE).bind(now).bind(limit).fetch_all(pool).await)?;
    let mut claimed = Vec::with_capacity(due.len());
    for mut saved in due {
        let n = with_db!(db, pool => sqlx::query(CLAIM).bind(now + 60_000).bind(&saved.project_id)
            .bind(&saved.checkout_session).bind(now).execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 1 {
            saved.attempts += 1;
            claimed.push(saved);
        }
    }
    Ok(claimed)
}

/// The payment method is the customer's default now (`Ok`), or the attempt failed: retried
/// after `retry_in_ms`, or (None) given up with the error kept.
pub async fn record_saved_payment_method(
    db: &Db,
    saved: &SavedPaymentMethod,
    outcome: Result<&str, (&str, Option<i64>)>,
) -> Result<(), DbError> {
    const DONE: &str = "UPDATE saved_payment_methods SET status = 'done', payment_method = $1, last_error = NULL \
        WHERE project_id = $2 AND checkout_session = $3";
    const FAILED: &str = "UPDATE saved_payment_methods SET status = $1, last_error = $2, next_attempt_at = $3 \
        WHERE project_id = $4 AND checkout_session = $5";
    match outcome {
        Ok(method) => with_db!(db, pool => sqlx::query(DONE).bind(method).bind(&saved.project_id)
            .bind(&saved.checkout_session).execute(pool).await.map(drop))?,
        Err((error, retry_in_ms)) => {
            let status = if retry_in_ms.is_some() { "pending" } else { "failed" };
            let next = retry_in_ms.map_or(i64::MAX / 2, |ms| UnixMillis::now().0 + ms);
            let error: String = error.chars().take(500).collect();
            with_db!(db, pool => sqlx::query(FAILED).bind(status).bind(&error).bind(next).bind(&saved.project_id)
                .bind(&saved.checkout_session).execute(pool).await.map(drop))?
        }
    }
    Ok(())
}
