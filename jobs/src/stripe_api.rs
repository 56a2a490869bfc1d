//! Calls to Stripe's API on a tenant's account: async-stripe's typed requests (its split
//! crates, `stripe_billing`, `stripe_core`, …) sent through our own implementation of its
//! client trait ([`stripe_client_core::StripeClient`]) over the process's pooled HTTP client.
//! One attempt per call (retries are the caller's, with its own backoff), and every error
//! classified from the status and Stripe's headers (`Stripe-Should-Retry`, `Retry-After`,
//! `Request-Id`) so the caller knows whether retrying helps.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use stripe_client_core::{
    CustomizedStripeRequest, IdempotencyKey, RequestBuilder, RequestStrategy, StripeMethod, StripeRequest,
};

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
    #[error("Stripe answered {status}: {message}{}", request_suffix(.request_id))]
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
        /// Stripe's `Request-Id`, which Stripe's support and the Dashboard's logs find the
        /// request by.
        request_id: Option<String>,
    },
    #[error("Stripe's answer could not be read: {0}")]
    Decode(String),
    #[error("the request to Stripe could not be made: {0}")]
    Request(String),
}

fn request_suffix(request_id: &Option<String>) -> String {
    request_id.as_deref().map(|id| format!(" (request {id})")).unwrap_or_default()
}

impl StripeApiError {
    /// Whether the same call may succeed later: transport errors, 409 (a concurrent request
    /// with the same idempotency key), 429 and 5xx, unless Stripe says not to.
    pub fn is_retryable(&self) -> bool {
        match self {
            StripeApiError::Transport(_) => true,
            StripeApiError::Api { should_retry: Some(answer), .. } => *answer,
            StripeApiError::Api { status, .. } => matches!(status, 409 | 429) || *status >= 500,
            StripeApiError::Decode(_) | StripeApiError::Request(_) => false,
        }
    }
}

/// The typed requests' `send` hands over a body its types could not read through this.
impl stripe_client_core::StripeClientErr for StripeApiError {
    fn deserialize_err(msg: impl std::fmt::Display) -> Self {
        StripeApiError::Decode(msg.to_string())
    }
}

/// Stripe's error body (`{"error": {"type", "code", "message", …}}`), read leniently: a code
/// this build does not know is still shown as Stripe sent it.
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
/// change with each tenant account's default version: the one the async-stripe types were
/// generated for (`stripe_shared::version::VERSION`, 1.0.0-rc.10; a unit test holds the two
/// together).
pub const STRIPE_VERSION: &str = "2026-09-30.endive";

impl StripeApi {
    pub fn new(http: reqwest::Client, base: &str) -> Self {
        Self { http, base: base.trim_end_matches('/').to_owned() }
    }

    /// The client async-stripe's typed requests are sent through (`request.send(&client)`),
    /// acting with `credentials`.
    pub fn on<'a>(&'a self, credentials: &'a Credentials) -> OnAccount<'a> {
        OnAccount { api: self, credentials }
    }

    /// Sends one request, as the SDK's client would: `Authorization: Bearer`, the pinned
    /// `Stripe-Version`, `Stripe-Account` (the request's own, else the credentials'), and
    /// `Idempotency-Key` when the request's strategy has one. Whatever the strategy, one
    /// attempt: retrying is the caller's decision.
    async fn execute(
        &self,
        credentials: &Credentials,
        request: CustomizedStripeRequest,
    ) -> Result<Bytes, StripeApiError> {
        use secrecy::ExposeSecret;
        let (request, config) = request.into_pieces();
        let method = match request.method {
            StripeMethod::Get => reqwest::Method::GET,
            StripeMethod::Post => reqwest::Method::POST,
            StripeMethod::Delete => reqwest::Method::DELETE,
        };
        let mut url = format!("{}/v1{}", self.base, request.path);
        if let Some(query) = request.query.as_deref().filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(query);
        }
        let mut http = self
            .http
            .request(method.clone(), url)
            .bearer_auth(credentials.key.expose_secret())
            .header("stripe-version", STRIPE_VERSION)
            .timeout(config.timeout.unwrap_or(TIMEOUT));
        if let Some(body) = request.body {
            http = http.header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(body);
        }
        let account = config.account_id.as_ref().map(|a| a.as_str()).or(credentials.account.as_deref());
        if let Some(account) = account {
            http = http.header("stripe-account", account);
        }
        if let Some(key) = config.request_strategy.as_ref().and_then(RequestStrategy::get_key) {
            http = http.header("idempotency-key", key.as_str());
        }
        Self::answer(http, &method, &request.path).await
    }

    /// Sends `http` and reads Stripe's answer: its body, or the error classified from the
    /// status, Stripe's error body and headers.
    async fn answer(
        http: reqwest::RequestBuilder,
        method: &reqwest::Method,
        path: &str,
    ) -> Result<Bytes, StripeApiError> {
        let response = http.send().await.map_err(|e| StripeApiError::Transport(e.without_url().to_string()))?;
        let status = response.status().as_u16();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let retry_after = header("retry-after").and_then(|v| v.trim().parse().ok());
        let should_retry = header("stripe-should-retry").map(|v| v.trim() == "true");
        let request_id = header("request-id");
        // Stripe answered from its record of an earlier request with the same key.
        let replayed = header("idempotent-replayed").is_some_and(|v| v.trim() == "true");
        let body = response.bytes().await.map_err(|e| StripeApiError::Transport(e.without_url().to_string()))?;
        if (200..300).contains(&status) {
            tracing::debug!(%method, path, status, request_id, replayed, "stripe call");
            return Ok(body);
        }
        let detail = serde_json::from_slice::<ErrorBody>(&body).ok().map(|b| b.error);
        let error = StripeApiError::Api {
            status,
            kind: detail.as_ref().and_then(|d| d.kind.clone()),
            code: detail.as_ref().and_then(|d| d.code.clone()),
            message: detail.and_then(|d| d.message).unwrap_or_else(|| format!("HTTP {status}")),
            retry_after,
            should_retry,
            request_id: request_id.clone(),
        };
        tracing::info!(%method, path, status, request_id, replayed, %error, "stripe refused a call");
        Err(error)
    }

    /// `GET /v2/core/events/{id}`: the full event a thin event announced ("Retrieves the
    /// details of an event", https://docs.stripe.com/api/v2/core/events/retrieve); async-stripe
    /// 1.0.0-rc.10 has no v2 types, so it is read as JSON. On a connected account it is asked
    /// for in the event's context, with `Stripe-Context` (the header API v2 takes;
    /// stripe-python's `EventNotification.fetch_event` sends `stripe_context=self.context`).
    pub async fn v2_event(&self, credentials: &Credentials, id: &str) -> Result<serde_json::Value, StripeApiError> {
        use secrecy::ExposeSecret;
        let path = format!("/v2/core/events/{id}");
        let mut http = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(credentials.key.expose_secret())
            .header("stripe-version", STRIPE_VERSION)
            .timeout(TIMEOUT);
        if let Some(account) = &credentials.account {
            http = http.header("stripe-context", account);
        }
        let body = Self::answer(http, &reqwest::Method::GET, &path).await?;
        serde_json::from_slice(&body).map_err(|e| StripeApiError::Decode(e.to_string()))
    }

    /// The account the credentials reach (`GET /v1/account`, async-stripe-connect's
    /// `RetrieveForMyAccountAccount`, built here to spare a crate): what "test connection" calls.
    pub async fn account(&self, credentials: &Credentials) -> Result<stripe_shared::Account, StripeApiError> {
        RequestBuilder::new(StripeMethod::Get, "/account").customize().send(&self.on(credentials)).await
    }
}

/// [`StripeApi`] acting with one set of credentials: what async-stripe's typed requests are
/// sent through.
#[derive(Clone, Copy)]
pub struct OnAccount<'a> {
    api: &'a StripeApi,
    credentials: &'a Credentials,
}

impl stripe_client_core::StripeClient for OnAccount<'_> {
    type Err = StripeApiError;

    fn execute(
        &self,
        req: CustomizedStripeRequest,
    ) -> impl std::future::Future<Output = Result<Bytes, StripeApiError>> + Send {
        self.api.execute(self.credentials, req)
    }
}

impl OnAccount<'_> {
    /// Sends `request` once with `Idempotency-Key: key`, so that repeating a call whose
    /// answer was lost makes nothing twice.
    pub async fn send_idempotent<R>(&self, request: &R, key: &str) -> Result<R::Output, StripeApiError>
    where
        R: StripeRequest,
        R::Output: miniserde::Deserialize,
    {
        let key = IdempotencyKey::new(key).map_err(|e| StripeApiError::Request(e.to_string()))?;
        request.customize().request_strategy(RequestStrategy::Idempotent(key)).send(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, should_retry: Option<bool>) -> StripeApiError {
        StripeApiError::Api {
            status,
            kind: None,
            code: None,
            message: String::new(),
            retry_after: None,
            should_retry,
            request_id: None,
        }
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
        assert!(!StripeApiError::Decode("no".into()).is_retryable());
    }

    #[test]
    fn the_pinned_version_is_the_one_the_types_were_generated_for() {
        assert_eq!(STRIPE_VERSION, stripe_client_core::VERSION.as_str());
    }

    #[test]
    fn an_error_names_stripes_request_id() {
        let mut error = api(400, None);
        if let StripeApiError::Api { request_id, .. } = &mut error {
            *request_id = Some("req_123".into());
        }
        assert!(error.to_string().ends_with("(request req_123)"), "{error}");
        assert!(!api(400, None).to_string().contains("request"));
    }
}
