//! The fake Stripe's Connect OAuth and restricted keys, each rule from Stripe's documentation:
//!
//! - OAuth for Standard accounts (<https://docs.stripe.com/connect/oauth-standard-accounts>,
//!   <https://docs.stripe.com/connect/oauth-reference>): `GET /oauth/authorize` with
//!   `response_type=code`, the platform's `client_id`, `scope=read_write`, `state` and
//!   `redirect_uri` sends the browser back to the redirect URI with `code` and the same `state`,
//!   or with `error=access_denied&error_description=The user denied your request` when the user
//!   declines; `POST /oauth/token` (`grant_type=authorization_code`, `code`, the platform's secret
//!   key) answers `stripe_user_id`, `livemode`, `scope`, `token_type` and connects the account to
//!   the platform; a code is used once: an unknown or used one gets 400 `invalid_grant`
//!   ("Authorization code does not exist" / "… has already been used").
//! - Restricted keys (<https://docs.stripe.com/keys#limit-access>): a restricted key (`rk_…`) has
//!   a set of permissions (None, Read or Write per resource; Write includes Read); a call outside
//!   them gets 403 `invalid_request_error` whose message names the permission: "The provided key
//!   'rk_test_***…' does not have the required permissions for this endpoint on account 'acct_…'.
//!   Having the 'rak_…' permission would allow this request to continue." `GET /v1/account` needs
//!   `rak_accounts_kyc_id_numbers_read`, which the keys Tollgate recommends do not have.
//! - The list endpoints "Test connection" calls (`GET /v1/customers`, `/v1/products`,
//!   `/v1/prices`, `/v1/subscriptions`, `/v1/invoices`, with `limit`): Stripe's list envelope.

use std::collections::HashSet;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{Account, FakeStripe, Inner, Shared, list, request, stripe_error};

/// The OAuth side: client ids, who approves on Stripe's page, and the codes handed out.
#[derive(Default)]
pub(super) struct OAuth {
    /// Connect client id (`ca_…`) → the platform key it belongs to.
    clients: Vec<(String, String)>,
    /// The account whose user approves on the authorize page; `None`: the user declines.
    approver: Option<String>,
    /// code → (platform key, account, used).
    codes: Vec<(String, String, String, bool)>,
}

/// The Dashboard's resource behind a path, as Stripe's permission names spell it.
fn resource(path: &str) -> Option<&'static str> {
    // API v2's events are read with the Events permission, as v1's (`rak_event_read`).
    if path.starts_with("/v2/core/events") {
        return Some("event");
    }
    let rest = path.strip_prefix("/v1/")?;
    Some(match rest.split('/').next()? {
        "account" => return None,
        "billing" if rest.starts_with("billing/meter_events") => "billing_meter_event",
        "billing" => "billing_meter",
        "customers" => "customer",
        "products" => "product",
        "prices" => "plan",
        "subscriptions" => "subscription",
        "invoices" => "invoice",
        "invoiceitems" => "invoiceitem",
        "setup_intents" => "setup_intent",
        "checkout" => "checkout_session",
        "billing_portal" => "billing_portal_session",
        _ => "other",
    })
}

/// Stripe's refusal of a restricted key's call outside its permissions, or `Ok`.
pub(super) fn permitted(
    inner: &Inner,
    headers: &HeaderMap,
    method: &Method,
    path: &str,
    account: &str,
) -> Result<(), (StatusCode, Value)> {
    let Some(key) = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
    else {
        return Ok(());
    };
    let Some(granted) = inner.permissions.get(key) else { return Ok(()) };
    let needed = match resource(path) {
        None => "rak_accounts_kyc_id_numbers_read".to_owned(),
        Some(r) if *method == Method::GET => format!("rak_{r}_read"),
        Some(r) => format!("rak_{r}_write"),
    };
    let write = needed.strip_suffix("_read").map(|r| format!("{r}_write"));
    if granted.contains(&needed) || write.is_some_and(|w| granted.contains(&w)) {
        return Ok(());
    }
    let shown: String = key.chars().take(8).collect();
    let tail: String = key.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
    Err(stripe_error(
        StatusCode::FORBIDDEN,
        "invalid_request_error",
        None,
        &format!(
            "The provided key '{shown}***{tail}' does not have the required permissions for this endpoint on account \
             '{account}'. Having the '{needed}' permission would allow this request to continue."
        ),
    ))
}

impl FakeStripe {
    /// Registers a restricted key of `account` with these permissions (`rak_customer_write`, …).
    pub fn add_restricted_key(&self, key: &str, account: &str, permissions: &[&str]) {
        let mut inner = self.inner.lock().unwrap();
        inner.keys.insert(key.to_owned(), account.to_owned());
        inner.permissions.insert(key.to_owned(), permissions.iter().map(|p| (*p).to_owned()).collect::<HashSet<_>>());
    }

    /// Makes `client_id` the Connect client id of the platform whose key is `platform_key`.
    pub fn add_connect_client(&self, client_id: &str, platform_key: &str) {
        self.inner.lock().unwrap().oauth.clients.push((client_id.to_owned(), platform_key.to_owned()));
    }

    /// Who approves on the next authorize pages: the user of `account`, or (`None`) a user who
    /// declines.
    pub fn set_oauth_approver(&self, account: Option<&str>) {
        self.inner.lock().unwrap().oauth.approver = account.map(str::to_owned);
    }
}

pub(super) fn routes() -> axum::Router<Shared> {
    axum::Router::new()
        .route("/oauth/authorize", get(authorize))
        .route("/oauth/token", post(token))
        .route("/v1/customers", get(list_customers))
        .route("/v1/products", get(list_products))
        .route("/v1/prices", get(list_prices))
        .route("/v1/subscriptions", get(list_subscriptions))
        .route("/v1/invoices", get(list_invoices))
        .route("/v1/invoiceitems", get(list_invoice_items))
        .route("/v1/setup_intents", get(list_setup_intents))
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, axum::Json(json!({"error": error, "error_description": description}))).into_response()
}

async fn authorize(State(inner): State<Shared>, Query(query): Query<Vec<(String, String)>>) -> Response {
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let (client_id, redirect_uri, state) = (param("client_id"), param("redirect_uri"), param("state"));
    let mut inner = inner.lock().unwrap();
    let Some(platform_key) = inner.oauth.clients.iter().find(|(c, _)| *c == client_id).map(|(_, k)| k.clone()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_client", &format!("No such application: '{client_id}'"));
    };
    if param("response_type") != "code" || param("scope") != "read_write" || redirect_uri.is_empty() {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "response_type=code and scope are required");
    }
    let encode = |v: &str| {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let target = match inner.oauth.approver.clone() {
        Some(account) => {
            let code = inner.id("ac");
            inner.oauth.codes.push((code.clone(), platform_key, account, false));
            format!("{redirect_uri}?code={}&scope=read_write&state={}", encode(&code), encode(&state))
        }
        None => format!(
            "{redirect_uri}?error=access_denied&error_description={}&state={}",
            encode("The user denied your request"),
            encode(&state)
        ),
    };
    Redirect::to(&target).into_response()
}

async fn token(
    State(inner): State<Shared>,
    headers: HeaderMap,
    axum::extract::Form(form): axum::extract::Form<Vec<(String, String)>>,
) -> Response {
    let param = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .unwrap_or_else(|| param("client_secret"));
    let mut inner = inner.lock().unwrap();
    if !inner.connected.contains_key(&key) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "Invalid API Key provided");
    }
    if param("grant_type") != "authorization_code" {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "grant_type must be authorization_code");
    }
    let code = param("code");
    let Some(slot) = inner.oauth.codes.iter_mut().find(|(c, k, _, _)| *c == code && *k == key) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            &format!("Authorization code does not exist: {code}"),
        );
    };
    if slot.3 {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            &format!(
                "This authorization code has already been used. All tokens issued with this code have been revoked. ({code})"
            ),
        );
    }
    slot.3 = true;
    let account = slot.2.clone();
    inner.connected.entry(key.clone()).or_default().insert(account.clone());
    inner.accounts.entry(account.clone()).or_default();
    let livemode = key.starts_with("sk_live_");
    let body = json!({
        "access_token": format!("sk_{}_fake_access", if livemode { "live" } else { "test" }),
        "livemode": livemode, "refresh_token": "rt_fake", "token_type": "bearer",
        "stripe_publishable_key": "pk_test_fake", "stripe_user_id": account, "scope": "read_write",
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn list_of(inner: Shared, method: Method, uri: Uri, headers: HeaderMap, pick: fn(&Account) -> &Vec<Value>) -> Response {
    let url = uri.path().to_owned();
    request(&inner, method, &uri, &headers, vec![], |inner, account, _| {
        let all = inner.accounts.get(account).map(|a| pick(a).clone()).unwrap_or_default();
        let limit = uri
            .query()
            .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("limit=")))
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(10);
        (StatusCode::OK, list(all.into_iter().rev().take(limit).collect(), &url))
    })
}

async fn list_customers(State(inner): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    list_of(inner, method, uri, headers, |a| &a.customers)
}

async fn list_products(State(inner): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    list_of(inner, method, uri, headers, |a| &a.products)
}

async fn list_prices(State(inner): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    list_of(inner, method, uri, headers, |a| &a.prices)
}

async fn list_subscriptions(State(inner): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    list_of(inner, method, uri, headers, |a| &a.subscriptions)
}

async fn list_invoices(State(inner): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    list_of(inner, method, uri, headers, |a| &a.invoices)
}

async fn list_invoice_items(State(inner): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    list_of(inner, method, uri, headers, |a| &a.invoice_items)
}

async fn list_setup_intents(State(inner): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    list_of(inner, method, uri, headers, |a| &a.setup_intents)
}
