//! Calls to Stripe's API on a tenant's account, over the process's pooled HTTP client: one
//! attempt per call (retries are the caller's, with its own backoff), and every error
//! classified from the status and Stripe's headers so the caller knows whether retrying helps.

use std::time::Duration;

use serde::Deserialize;

/// Stripe's API (or a stand-in at another base URL).
#[derive(Clone)]
pub struct StripeApi {
    http: reqwest::Client,
    base: String,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeApiError {
    #[error("Stripe could not be reached: {0}")]
    Transport(String),
    #[error("Stripe answered {status}: {message}")]
    Api {
        status: u16,
        /// Stripe's error `type` (`invalid_request_error`, `api_error`, …) and `code`.
        kind: Option<String>,
        code: Option<String>,
        message: String,
        /// Seconds, from `Retry-After`.
        retry_after: Option<u64>,
        /// `Stripe-Should-Retry`, when sent.
        should_retry: Option<bool>,
    },
    #[error("Stripe's answer could not be read: {0}")]
    Decode(String),
}

impl StripeApiError {
    /// Whether the same call may succeed later: transport errors, 409 (a concurrent request
    /// with the same idempotency key), 429 and 5xx, unless Stripe says not to.
    pub fn is_retryable(&self) -> bool {
        match self {
            StripeApiError::Transport(_) => true,
            StripeApiError::Api { should_retry: Some(answer), .. } => *answer,
            StripeApiError::Api { status, .. } => matches!(status, 409 | 429) || *status >= 500,
            StripeApiError::Decode(_) => false,
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
    message: Option<String>,
}

/// What "test connection" shows of an account.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct AccountInfo {
    pub id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub country: Option<String>,
    #[serde(default)]
    pub charges_enabled: Option<bool>,
}

const TIMEOUT: Duration = Duration::from_secs(20);

/// How Tollgate acts on a tenant's Stripe account: the tenant's own key, or the operator's
/// platform key on the tenant's connected account (`Stripe-Account`).
#[derive(Clone)]
pub struct Credentials {
    pub key: secrecy::SecretString,
    pub account: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("key", &"***").field("account", &self.account).finish()
    }
}

/// Stripe's list envelope.
#[derive(Debug, Clone, Deserialize)]
pub struct List<T> {
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
}

/// An object Tollgate only needs the id of (product, price, customer).
#[derive(Debug, Clone, Deserialize)]
pub struct Created {
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Meter {
    pub id: String,
    pub event_name: String,
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub status: String,
    /// When the subscription began (Unix seconds): its first period starts here.
    #[serde(default)]
    pub start_date: Option<i64>,
}

/// One of a meter's event summaries. `aggregated_value` is a floating-point number (stripe-node
/// `Billing.MeterEventSummary.aggregated_value: number`, async-stripe `f64`): Stripe sums in
/// doubles, so past 2^53 nano-units it is a rounded total.
#[derive(Debug, Clone, Deserialize)]
pub struct EventSummary {
    pub aggregated_value: serde_json::Number,
    pub start_time: i64,
    pub end_time: i64,
}

impl EventSummary {
    pub fn value(&self) -> Option<f64> {
        self.aggregated_value.as_f64().filter(|v| v.is_finite())
    }
}

enum Method<'a> {
    Get(&'a [(&'a str, String)]),
    Post { form: &'a [(String, String)], idempotency_key: Option<&'a str> },
}

/// Why Tollgate cannot act on a project's Stripe account (shown to the tenant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoCredentials {
    #[error("Stripe is not connected")]
    NotConnected,
    #[error("this server has no Stripe platform key (TOLLGATE_STRIPE_PLATFORM_KEY) for Connect")]
    NoPlatformKey,
}

/// How Tollgate acts on `project`'s Stripe account: the tenant's own key, or the operator's
/// platform key (`platform_key`) on the tenant's connected account.
pub async fn credentials(
    db: &tollgate_core::Db,
    master: &tollgate_core::crypto::MasterKey,
    platform_key: Option<&secrecy::SecretString>,
    project: &tollgate_core::ids::ProjectId,
) -> Result<Result<Credentials, NoCredentials>, tollgate_core::stripe::StripeError> {
    use tollgate_core::stripe::Access;
    Ok(match tollgate_core::stripe::access(db, master, project).await? {
        Some(Access::Key(key)) => Ok(Credentials { key: secrecy::SecretString::from(key), account: None }),
        Some(Access::Connect { account }) => match platform_key {
            Some(key) => Ok(Credentials { key: key.clone(), account: Some(account) }),
            None => Err(NoCredentials::NoPlatformKey),
        },
        None => Err(NoCredentials::NotConnected),
    })
}

/// The API version every call names (`Stripe-Version`), so the shapes Tollgate reads do not
/// change with each tenant account's default version: the one the async-stripe types in
/// the tests were generated for (`stripe_shared::version::VERSION` in 1.0.0-rc.10).
pub const STRIPE_VERSION: &str = "2026-09-30.endive";

impl StripeApi {
    pub fn new(http: reqwest::Client, base: &str) -> Self {
        Self { http, base: base.trim_end_matches('/').to_owned() }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        credentials: &Credentials,
        path: &str,
        method: Method<'_>,
    ) -> Result<T, StripeApiError> {
        use secrecy::ExposeSecret;
        let url = format!("{}/v1{path}", self.base);
        let mut request = match method {
            Method::Get(query) => self.http.get(url).query(query),
            Method::Post { form, idempotency_key } => {
                let mut request = self.http.post(url).form(form);
                if let Some(key) = idempotency_key {
                    request = request.header("idempotency-key", key);
                }
                request
            }
        };
        request = request
            .bearer_auth(credentials.key.expose_secret())
            .header("stripe-version", STRIPE_VERSION)
            .timeout(TIMEOUT);
        if let Some(account) = &credentials.account {
            request = request.header("stripe-account", account);
        }
        Self::read(request).await
    }

    /// Sends `request` and reads Stripe's answer: the body as `T`, or the error classified.
    async fn read<T: serde::de::DeserializeOwned>(request: reqwest::RequestBuilder) -> Result<T, StripeApiError> {
        let response = request.send().await.map_err(|e| StripeApiError::Transport(e.without_url().to_string()))?;
        let status = response.status().as_u16();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let retry_after = header("retry-after").and_then(|v| v.trim().parse().ok());
        let should_retry = header("stripe-should-retry").map(|v| v.trim() == "true");
        let body = response.bytes().await.map_err(|e| StripeApiError::Transport(e.without_url().to_string()))?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).map_err(|e| StripeApiError::Decode(e.to_string()));
        }
        let detail = serde_json::from_slice::<ErrorBody>(&body).ok().map(|b| b.error);
        Err(StripeApiError::Api {
            status,
            kind: detail.as_ref().and_then(|d| d.kind.clone()),
            code: detail.as_ref().and_then(|d| d.code.clone()),
            message: detail.and_then(|d| d.message).unwrap_or_else(|| format!("HTTP {status}")),
            retry_after,
            should_retry,
        })
    }

    /// `GET /v1{path}?{query}`.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        credentials: &Credentials,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, StripeApiError> {
        self.call(credentials, path, Method::Get(query)).await
    }

    /// `POST /v1{path}` with a form body (Stripe's bracket notation in the names) and an
    /// `Idempotency-Key`, so that repeating a call whose answer was lost makes nothing twice.
    pub async fn post<T: serde::de::DeserializeOwned>(
        &self,
        credentials: &Credentials,
        path: &str,
        form: &[(String, String)],
        idempotency_key: &str,
    ) -> Result<T, StripeApiError> {
        self.call(credentials, path, Method::Post { form, idempotency_key: Some(idempotency_key) }).await
    }

    /// `GET /v2/core/events/{id}`: the full event a thin event announced ("Retrieves the
    /// details of an event", https://docs.stripe.com/api/v2/core/events/retrieve). On a
    /// connected account it is asked for in the event's context, with `Stripe-Context` (the
    /// header API v2 takes; stripe-python's `EventNotification.fetch_event` sends
    /// `stripe_context=self.context`).
    pub async fn v2_event(&self, credentials: &Credentials, id: &str) -> Result<serde_json::Value, StripeApiError> {
        use secrecy::ExposeSecret;
        let mut request = self
            .http
            .get(format!("{}/v2/core/events/{id}", self.base))
            .bearer_auth(credentials.key.expose_secret())
            .header("stripe-version", STRIPE_VERSION)
            .timeout(TIMEOUT);
        if let Some(account) = &credentials.account {
            request = request.header("stripe-context", account);
        }
        Self::read(request).await
    }

    /// The account the credentials reach: what "test connection" calls.
    pub async fn account(&self, credentials: &Credentials) -> Result<AccountInfo, StripeApiError> {
        self.get(credentials, "/account", &[]).await
    }
}

/// Builds a form body from (name, value) pairs.
pub fn form<const N: usize>(pairs: [(&str, String); N]) -> Vec<(String, String)> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, should_retry: Option<bool>) -> StripeApiError {
        StripeApiError::Api { status, kind: None, code: None, message: String::new(), retry_after: None, should_retry }
    }

    #[test]
    fn retryable_errors_are_told_apart() {
        assert!(api(429, None).is_retryable());
        assert!(api(503, None).is_retryable());
        assert!(api(409, None).is_retryable());
        assert!(!api(400, None).is_retryable());
        assert!(!api(401, None).is_retryable());
        assert!(!api(500, Some(false)).is_retryable());
        assert!(api(400, Some(true)).is_retryable());
        assert!(StripeApiError::Transport("reset".into()).is_retryable());
    }
}
