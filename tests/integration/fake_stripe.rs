//! A stand-in for Stripe's API over real HTTP, answering as Stripe does for the endpoints
//! Tollgate calls, with Stripe's documented rules:
//!
//! - keys are checked (401 with Stripe's error body); a platform key acts on its connected
//!   accounts with `Stripe-Account` (403 for any other), and every object lives in the account
//!   it was made on;
//! - form bodies in Stripe's bracket notation; `Idempotency-Key` (per account) replays the answer
//!   of a request whose endpoint ran — successes, refusals and 500s alike, as Stripe's API v1
//!   does — with `Idempotent-Replayed: true`, saves nothing for a request refused before it ran
//!   (parameter validation, rate limits), answers 409 `idempotency_key_in_use` while the first
//!   request with the key is still being answered, and refuses the key with other parameters;
//! - meters (event names unique), products, metered prices tied to a meter, customers,
//!   subscriptions; meter events refused for an unknown meter, a timestamp more than
//!   35 days old or 5 minutes ahead, or an identifier already used (deduplicated), and accepted
//!   for an unknown customer, then reported later (see `meter_errors`); meter event
//!   summaries summing what was accepted, with minute-aligned bounds (hour or day with
//!   `value_grouping_window`, one summary per window);
//! - faults on demand: 429 rate limits and other statuses for the next meter events, going down
//!   (connections refused) and coming back on the same port with the same state;
//! - signed webhook events sent to a URL, as Stripe sends them; thin events sent to an event
//!   destination, and the full event served by `GET /v2/core/events/{id}` (see `meter_errors`).
//!
//! Within Stripe's limits, each rule from Stripe's documentation (cited where it is enforced):
//!
//! - a meter event value of more than 15 significant digits is refused (400, `payload[value]`);
//! - one meter event request at a time per customer and meter: another one for the same pair
//!   while the first is being answered gets 429 `lock_timeout` with `Stripe-Should-Retry: true`;
//! - rate limits per account and mode, over a sliding second: test-mode keys (`sk_test_`,
//!   `rk_test_`) get the basic limit (25 requests a second), meter events included; live keys
//!   100 a second, and meter events 1,000 a second on their own limiter (429 `rate_limit`);
//! - an identifier is deduplicated for a rolling 24 hours (`set_identifier_window`), not for ever;
//! - meter event summaries are eventually consistent (`set_summary_lag`: what was accepted more
//!   recently is not counted yet) and `aggregated_value` is a floating-point number, summed in
//!   doubles as Stripe's aggregation does.
//!
//! Every request is recorded for the test to inspect.
//!
//! Not modelled: pagination (`limit`, `starting_after`; every list is one page), `expand`,
//! updates and deletions (but `delete_customer`), API v2 meter event streams, async errors other
//! than an unknown customer, the concurrency limiter across endpoints,
//! key expiry after 24 hours (`forget_idempotency_keys` stands for it).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

pub mod connect;
pub mod invoice_items;
pub mod invoices;
pub mod meter_errors;
pub mod payments;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub key: Option<String>,
    pub account: Option<String>,
    pub idempotency_key: Option<String>,
    /// The `Stripe-Version` header (without it, Stripe answers in the account's default
    /// version: https://docs.stripe.com/api/versioning).
    pub version: Option<String>,
    pub form: Vec<(String, String)>,
}

/// A meter event as the fake received it.
#[derive(Debug, Clone)]
pub struct MeterEvent {
    pub identifier: String,
    pub event_name: String,
    pub stripe_customer_id: String,
    pub value: i64,
    pub timestamp: i64,
    /// When the fake received it (the identifier's deduplication and the summaries' lag
    /// count from here).
    pub received: Instant,
}

#[derive(Default)]
struct Account {
    /// Checkout and customer portal sessions (see `payments`).
    checkout_sessions: Vec<Value>,
    portal_sessions: Vec<Value>,
    /// Whether the account's customer portal settings were saved (its default configuration).
    portal_configured: bool,
    meters: Vec<Value>,
    products: Vec<Value>,
    prices: Vec<Value>,
    customers: Vec<Value>,
    subscriptions: Vec<Value>,
    /// Accepted meter events.
    meter_events: Vec<MeterEvent>,
    /// Every meter event POST, accepted or not.
    meter_event_attempts: Vec<MeterEvent>,
    /// Invoices made at the end of subscription periods (see `invoices`), and through the
    /// API (see `invoice_items`).
    invoices: Vec<Value>,
    /// Invoice items, pending until an invoice takes them.
    invoice_items: Vec<Value>,
    /// SetupIntents of completed setup sessions, and the payment methods they attached.
    setup_intents: Vec<Value>,
    payment_methods: Vec<Value>,
    /// Meter events accepted and found invalid, for the next error report (see `meter_errors`).
    async_errors: Vec<meter_errors::AsyncMeterError>,
    /// Full v2 events, served by `GET /v2/core/events/{id}`.
    v2_events: Vec<Value>,
    /// Identifiers of meter events accepted and found invalid later, and when.
    reported_identifiers: Vec<(String, Instant)>,
}

struct Saved {
    path: String,
    form: Vec<(String, String)>,
    status: StatusCode,
    body: Value,
}

#[derive(Default)]
struct Inner {
    /// Key → its own account.
    keys: HashMap<String, String>,
    /// Platform key → the accounts connected to the platform.
    connected: HashMap<String, HashSet<String>>,
    accounts: HashMap<String, Account>,
    idempotency: HashMap<(String, String), Saved>,
    /// (account, Idempotency-Key) of the requests still being answered.
    in_flight: HashSet<(String, String)>,
    seen: Vec<SeenRequest>,
    rate_limited: usize,
    failing: Option<(usize, u16)>,
    /// How long a meter event's answer takes, after the event is accepted.
    meter_event_latency: Duration,
    /// (account, event name, customer) of the meter event requests being answered.
    meter_locks: HashSet<(String, String, String)>,
    /// Meter event requests being answered, and the most there ever were at once.
    meter_in_flight: usize,
    meter_in_flight_max: usize,
    /// Meter events refused because another one for the customer and meter was in flight.
    lock_timeouts: usize,
    /// Requests refused by the rate limiter (not the ones asked for with `set_rate_limit`).
    rate_limit_refusals: usize,
    /// When each recent request of an (account, limiter) arrived, over the last second.
    recent: HashMap<(String, Limiter), VecDeque<Instant>>,
    /// The basic limit for test-mode keys (25 a second).
    test_mode_limit: usize,
    /// How long an identifier is remembered (a rolling 24 hours).
    identifier_window: Duration,
    /// How long an accepted meter event takes to count in the summaries.
    summary_lag: Duration,
    next_id: u64,
    /// Restricted key → its permissions (see `connect`).
    permissions: HashMap<String, HashSet<String>>,
    /// Connect OAuth (see `connect`).
    oauth: connect::OAuth,
    /// Account → its event destination (URL, signing secret), thin payloads.
    destinations: HashMap<String, (String, String)>,
    /// Sampled errors per code in a meter error report.
    error_samples: usize,
}

/// Stripe's rate limiters, per account: the basic one, and live mode's own for meter events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Limiter {
    TestBasic,
    LiveBasic,
    LiveMeterEvents,
}

/// How long Stripe keeps a meter event identifier for deduplication.
pub const IDENTIFIER_WINDOW: Duration = Duration::from_secs(24 * 3_600);
/// Test mode's basic rate limit (requests a second).
pub const TEST_MODE_LIMIT: usize = 25;
/// The most significant digits a meter event value may have.
pub const MAX_VALUE_DIGITS: usize = 15;

impl Inner {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_fake{:08}", self.next_id)
    }
}

type Shared = Arc<Mutex<Inner>>;

/// The fake Stripe server.
pub struct FakeStripe {
    pub addr: SocketAddr,
    inner: Shared,
    running: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

fn stripe_error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> (StatusCode, Value) {
    let mut error = json!({ "type": kind, "message": message });
    if let Some(code) = code {
        error["code"] = json!(code);
        error["doc_url"] = json!(format!("https://stripe.com/docs/error-codes/{}", code.replace('_', "-")));
    }
    (status, json!({ "error": error }))
}

/// A parameter refused before the endpoint ran (Stripe names it in `param`; no idempotent
/// result is saved for it).
fn invalid(param: &str, code: Option<&str>, message: &str) -> (StatusCode, Value) {
    let (status, mut body) = stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", code, message);
    body["error"]["param"] = json!(param);
    (status, body)
}

/// Whether Stripe keeps this answer for its Idempotency-Key: the endpoint ran (success, a
/// refusal while running, a 500), not a request refused before (a parameter, the rate limiter).
fn kept_for_idempotency(status: StatusCode, body: &Value) -> bool {
    status.is_success()
        || status.is_server_error()
        || (status != StatusCode::TOO_MANY_REQUESTS && body["error"].get("param").is_none())
}

fn now() -> i64 {
    tollgate_core::time::UnixMillis::now().0 / 1000
}

impl FakeStripe {
    /// Starts the fake with `keys` (key, account id) accepted.
    pub async fn start(keys: &[(&str, &str)]) -> anyhow::Result<Self> {
        let inner = Arc::new(Mutex::new(Inner {
            keys: keys.iter().map(|(k, a)| ((*k).to_owned(), (*a).to_owned())).collect(),
            test_mode_limit: TEST_MODE_LIMIT,
            identifier_window: IDENTIFIER_WINDOW,
            error_samples: meter_errors::ERROR_SAMPLES,
            ..Inner::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let fake = Self { addr, inner, running: Mutex::new(None) };
        fake.serve(listener);
        Ok(fake)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/v1/account", get(account))
            .route("/v1/billing/meters", post(create_meter).get(list_meters))
            .route("/v1/billing/meters/{id}", get(get_meter))
            .route("/v1/billing/meters/{id}/event_summaries", get(event_summaries))
            .route("/v1/billing/meter_events", post(create_meter_event))
            .route("/v1/products", post(create_product))
            .route("/v1/prices", post(create_price))
            .route("/v1/customers", post(create_customer))
            .route(
                "/v1/customers/{id}",
                get(get_customer).post(payments::update_customer).delete(invoice_items::delete_customer),
            )
            .route("/v1/setup_intents/{id}", get(payments::get_setup_intent))
            .route("/v1/invoiceitems", post(invoice_items::create_invoice_item))
            .route("/v1/invoices", post(invoice_items::create_invoice))
            .route("/v1/invoices/{id}/finalize", post(invoice_items::finalize_invoice))
            .route("/v1/subscriptions", post(create_subscription))
            .route("/v1/subscriptions/{id}", get(get_subscription))
            .route("/v1/invoices/{id}", get(invoices::get_invoice))
            .route("/v1/checkout/sessions", post(payments::create_checkout_session))
            .route("/v1/billing_portal/sessions", post(payments::create_portal_session))
            .route("/v2/core/events/{id}", get(meter_errors::get_v2_event))
            .merge(connect::routes())
            .with_state(self.inner.clone());
        let stop = CancellationToken::new();
        let signal = stop.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(signal).await;
        });
        *self.running.lock().unwrap() = Some((stop, server));
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes `key` a platform key (of account `platform`), for Stripe Connect.
    pub fn add_platform_key(&self, key: &str, platform: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.keys.insert(key.to_owned(), platform.to_owned());
        inner.connected.entry(key.to_owned()).or_default();
    }

    /// Connects `account` to the platform whose key is `platform_key`.
    pub fn add_connected_account(&self, platform_key: &str, account: &str) {
        self.inner.lock().unwrap().connected.entry(platform_key.to_owned()).or_default().insert(account.to_owned());
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.inner.lock().unwrap().seen.clone()
    }

    /// Meter events accepted on `account`.
    pub fn meter_events(&self, account: &str) -> Vec<MeterEvent> {
        self.inner.lock().unwrap().accounts.get(account).map(|a| a.meter_events.clone()).unwrap_or_default()
    }

    /// Every meter event sent to `account`, accepted or refused.
    pub fn meter_event_attempts(&self, account: &str) -> Vec<MeterEvent> {
        self.inner.lock().unwrap().accounts.get(account).map(|a| a.meter_event_attempts.clone()).unwrap_or_default()
    }

    fn objects(&self, account: &str, pick: fn(&Account) -> &Vec<Value>) -> Vec<Value> {
        self.inner.lock().unwrap().accounts.get(account).map(|a| pick(a).clone()).unwrap_or_default()
    }

    pub fn products(&self, account: &str) -> Vec<Value> {
        self.objects(account, |a| &a.products)
    }

    pub fn meters(&self, account: &str) -> Vec<Value> {
        self.objects(account, |a| &a.meters)
    }

    pub fn prices(&self, account: &str) -> Vec<Value> {
        self.objects(account, |a| &a.prices)
    }

    pub fn customers(&self, account: &str) -> Vec<Value> {
        self.objects(account, |a| &a.customers)
    }

    pub fn subscriptions(&self, account: &str) -> Vec<Value> {
        self.objects(account, |a| &a.subscriptions)
    }

    /// The next `n` meter events are refused with 429, as when over Stripe's rate limit: Stripe's
    /// body (`invalid_request_error`, code `rate_limit`), no `Stripe-Should-Retry` header (Stripe
    /// documents none for rate limits; its SDKs back off on 429 by status), nothing kept for the
    /// request's Idempotency-Key.
    pub fn set_rate_limit(&self, n: usize) {
        self.inner.lock().unwrap().rate_limited = n;
    }

    /// The next `n` meter events are answered with `status`. 5xx: Stripe's `api_error`, raised
    /// while the endpoint runs, so kept for the request's Idempotency-Key and replayed to a
    /// retry with the same key (as Stripe documents for 500s). 4xx: an invalid parameter,
    /// refused before the endpoint runs, so the key stays free.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.inner.lock().unwrap().failing = Some((n, status));
    }

    /// Answers meter events only `latency` after accepting them (a worker can die in between).
    pub fn set_meter_event_latency(&self, latency: Duration) {
        self.inner.lock().unwrap().meter_event_latency = latency;
    }

    /// Forgets the idempotency keys (Stripe keeps them 24 hours), so that only the meter
    /// event identifiers' deduplication stands between a resend and a double count.
    pub fn forget_idempotency_keys(&self) {
        self.inner.lock().unwrap().idempotency.clear();
    }

    /// How long identifiers are deduplicated (24 hours unless set): a shorter window stands for
    /// time passing.
    pub fn set_identifier_window(&self, window: Duration) {
        self.inner.lock().unwrap().identifier_window = window;
    }

    /// How long an accepted meter event takes to count in the summaries (none unless set).
    pub fn set_summary_lag(&self, lag: Duration) {
        self.inner.lock().unwrap().summary_lag = lag;
    }

    /// Test mode's basic rate limit, per second (25 unless set).
    pub fn set_test_mode_limit(&self, per_second: usize) {
        self.inner.lock().unwrap().test_mode_limit = per_second;
    }

    /// Meter events refused with 429 `lock_timeout` (another in flight for the customer and meter).
    pub fn lock_timeouts(&self) -> usize {
        self.inner.lock().unwrap().lock_timeouts
    }

    /// Requests refused by the rate limiter.
    pub fn rate_limit_refusals(&self) -> usize {
        self.inner.lock().unwrap().rate_limit_refusals
    }

    /// The most meter event requests the fake was answering at once.
    pub fn meter_events_in_flight_max(&self) -> usize {
        self.inner.lock().unwrap().meter_in_flight_max
    }

    /// Stops answering: open connections are closed and new ones refused.
    pub async fn go_down(&self) -> anyhow::Result<()> {
        let running = self.running.lock().unwrap().take();
        if let Some((stop, server)) = running {
            stop.cancel();
            server.await?;
        }
        Ok(())
    }

    /// Answers again, on the same port, with the same state.
    pub async fn come_back(&self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }

    /// Stops answering for good (connections are refused), as when Stripe is unreachable.
    pub fn stop(&self) {
        if let Some((stop, server)) = self.running.lock().unwrap().take() {
            stop.cancel();
            server.abort();
        }
    }

    /// An invoice of `customer` on `account`, as Stripe's `invoice` object.
    pub fn make_invoice(&self, account: &str, customer: &str, status: &str, amount_due: i64) -> Value {
        let id = self.inner.lock().unwrap().id("in");
        let paid = if status == "paid" { amount_due } else { 0 };
        json!({
            "id": id, "object": "invoice", "account_name": account, "customer": customer, "status": status,
            "number": format!("FAKE-{}", &id[id.len() - 4..]), "currency": "usd", "amount_due": amount_due,
            "amount_paid": paid, "amount_remaining": amount_due - paid, "livemode": false, "created": now(),
            "attempted": status == "paid", "attempt_count": i64::from(status == "paid"), "next_payment_attempt": null,
            "hosted_invoice_url": format!("https://invoice.stripe.com/i/{id}"),
        })
    }

    /// Sends `object` as a `kind` event (on `account`, for Connect) to `url`, signed with
    /// `secret` as Stripe signs; returns the answer's status and body.
    pub async fn send_event(
        &self,
        url: &str,
        secret: &str,
        kind: &str,
        object: Value,
        account: Option<&str>,
    ) -> anyhow::Result<(StatusCode, String)> {
        let id = self.inner.lock().unwrap().id("evt");
        let object = invoice_as_of(kind, object);
        let mut event = json!({
            "id": id, "object": "event", "type": kind, "created": now(), "livemode": false,
            "api_version": "2026-09-30.endive", "pending_webhooks": 1,
            "request": {"id": null, "idempotency_key": null}, "data": {"object": object},
        });
        if let Some(account) = account {
            event["account"] = json!(account);
        }
        self.send_raw(url, secret, &event).await
    }

    /// Sends `event` as it is to `url`, signed with `secret` as Stripe signs.
    pub async fn send_raw(&self, url: &str, secret: &str, event: &Value) -> anyhow::Result<(StatusCode, String)> {
        let body = event.to_string();
        let signature = tollgate_core::signature::header(secret, now(), body.as_bytes());
        let response = reqwest::Client::new()
            .post(url)
            .header("stripe-signature", signature)
            .header("content-type", "application/json; charset=utf-8")
            .body(body)
            .send()
            .await?;
        Ok((response.status(), response.text().await?))
    }
}

/// An invoice as Stripe has it when it sends `kind`: `invoice.payment_failed` follows one
/// more payment attempt (`attempted`, `attempt_count`, and a `next_payment_attempt` under
/// Smart Retries); `invoice.paid` leaves nothing remaining. (Fields as in stripe-node's
/// `Invoice` type; https://docs.stripe.com/billing/revenue-recovery/smart-retries.)
fn invoice_as_of(kind: &str, mut object: Value) -> Value {
    if object["object"] != "invoice" {
        return object;
    }
    match kind {
        "invoice.payment_failed" => {
            let attempts = object["attempt_count"].as_i64().unwrap_or(0) + 1;
            object["attempted"] = json!(true);
            object["attempt_count"] = json!(attempts);
            object["next_payment_attempt"] = json!(now() + 3 * 24 * 3600);
        }
        "invoice.paid" => {
            object["attempted"] = json!(true);
            object["attempt_count"] = json!(object["attempt_count"].as_i64().unwrap_or(0).max(1));
            object["amount_paid"] = object["amount_due"].clone();
            object["amount_remaining"] = json!(0);
            object["next_payment_attempt"] = Value::Null;
        }
        _ => {}
    }
    object
}

/// Stripe's bracket notation (`a[b][0][c]=v`) as JSON; numeric keys make arrays.
fn nest(form: &[(String, String)]) -> Value {
    let mut root = Map::new();
    for (name, value) in form {
        let mut parts: Vec<String> = Vec::new();
        let (head, rest) = name.split_once('[').map_or((name.as_str(), ""), |(h, r)| (h, r));
        parts.push(head.to_owned());
        for part in rest.split('[').filter(|p| !p.is_empty()) {
            parts.push(part.trim_end_matches(']').to_owned());
        }
        let mut node = &mut root;
        for (i, part) in parts.iter().enumerate() {
            if i == parts.len() - 1 {
                node.insert(part.clone(), Value::String(value.clone()));
            } else {
                let child = node.entry(part.clone()).or_insert_with(|| Value::Object(Map::new()));
                node = child.as_object_mut().expect("a form name used as both value and object");
            }
        }
    }
    arrays(Value::Object(root))
}

fn arrays(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let numeric = !map.is_empty() && map.keys().all(|k| k.parse::<usize>().is_ok());
            if numeric {
                let sorted: BTreeMap<usize, Value> =
                    map.into_iter().map(|(k, v)| (k.parse().unwrap_or(0), arrays(v))).collect();
                Value::Array(sorted.into_values().collect())
            } else {
                Value::Object(map.into_iter().map(|(k, v)| (k, arrays(v))).collect())
            }
        }
        other => other,
    }
}

/// The caller, checked as Stripe checks it: the account it acts on, or Stripe's refusal.
fn authenticate(inner: &mut Inner, headers: &HeaderMap) -> Result<String, (StatusCode, Value)> {
    let key = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let account = headers.get("stripe-account").and_then(|v| v.to_str().ok());
    let Some((key, own)) = key.and_then(|k| inner.keys.get(k).map(|own| (k.to_owned(), own.clone()))) else {
        let shown = key.map(|k| format!("{}***", k.chars().take(8).collect::<String>())).unwrap_or_default();
        return Err(stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            &format!("Invalid API Key provided: {shown}"),
        ));
    };
    match account {
        None => Ok(own),
        Some(account) if account == own => Ok(own),
        Some(account) if inner.connected.get(&key).is_some_and(|c| c.contains(account)) => Ok(account.to_owned()),
        Some(account) => Err(stripe_error(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            Some("account_invalid"),
            &format!(
                "The provided key '{}***' does not have access to account '{account}' (or that account does not exist). \
                 Application access may have been revoked.",
                key.chars().take(8).collect::<String>()
            ),
        )),
    }
}

/// What every request goes through: it is recorded, authenticated, and for a POST with an
/// `Idempotency-Key` answered from Stripe's record of that key when it has one. `handle` runs
/// on the account acted on, with the form nested as JSON.
fn request(
    inner: &Shared,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    form: Vec<(String, String)>,
    handle: impl FnOnce(&mut Inner, &str, &Value) -> (StatusCode, Value),
) -> Response {
    answer(inner, method, uri, headers, form, handle).0
}

/// An Idempotency-Key whose first request is still being answered; released when dropped
/// (the answer sent, or the connection gone).
struct InFlight {
    inner: Shared,
    slot: Option<(String, String)>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take()
            && let Ok(mut inner) = self.inner.lock()
        {
            inner.in_flight.remove(&slot);
        }
    }
}

/// Whether two form bodies carry the same parameters: "the idempotency layer compares incoming
/// parameters to those of the original request" (https://docs.stripe.com/api/idempotent_requests),
/// parameters, not the order they come in (an SDK serializing a map, metadata for one, sends its
/// entries in the map's order, which differs between two maps with the same entries).
fn same_parameters(a: &[(String, String)], b: &[(String, String)]) -> bool {
    let sorted = |form: &[(String, String)]| {
        let mut form = form.to_vec();
        form.sort();
        form
    };
    sorted(a) == sorted(b)
}

fn respond(inner: &mut Inner, status: StatusCode, body: Value) -> Response {
    let lock_timeout = body["error"]["code"] == "lock_timeout";
    let mut response = (status, Json(body)).into_response();
    if lock_timeout {
        response.headers_mut().insert("stripe-should-retry", HeaderValue::from_static("true"));
    }
    let request_id = inner.id("req");
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("request-id", value);
    }
    response
}

/// [`request`], with the key held as in flight until the returned guard is dropped.
fn answer(
    shared: &Shared,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    form: Vec<(String, String)>,
    handle: impl FnOnce(&mut Inner, &str, &Value) -> (StatusCode, Value),
) -> (Response, InFlight) {
    let mut flight = InFlight { inner: shared.clone(), slot: None };
    let mut inner = shared.lock().unwrap();
    let path = uri.path().to_owned();
    let idempotency_key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    inner.seen.push(SeenRequest {
        method: method.to_string(),
        path: path.clone(),
        key: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned),
        account: headers.get("stripe-account").and_then(|v| v.to_str().ok()).map(str::to_owned),
        idempotency_key: idempotency_key.clone(),
        version: headers.get("stripe-version").and_then(|v| v.to_str().ok()).map(str::to_owned),
        form: form.clone(),
    });
    let account = match authenticate(&mut inner, headers) {
        Ok(account) => account,
        Err((status, body)) => return (respond(&mut inner, status, body), flight),
    };
    if let Err((status, body)) = connect::permitted(&inner, headers, &method, &path, &account) {
        return (respond(&mut inner, status, body), flight);
    }
    // The rate limiters run before the idempotency layer: a request they refuse did not run.
    if let Err((status, body)) = rate_limit(&mut inner, headers, &account, &path) {
        return (respond(&mut inner, status, body), flight);
    }
    let slot = idempotency_key.filter(|_| method == Method::POST).map(|k| (account.clone(), k));
    if let Some(slot) = &slot {
        if slot.1.len() > 255 {
            let (status, body) = stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "Invalid idempotency key: the key may be at most 255 characters long.",
            );
            return (respond(&mut inner, status, body), flight);
        }
        if inner.in_flight.contains(slot) {
            let (status, body) = stripe_error(
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("idempotency_key_in_use"),
                &format!(
                    "There is currently another in-progress request using this Idempotent Key (that probably means \
                     you submitted twice, and the other request is still going through): {}. Please try again later.",
                    slot.1
                ),
            );
            return (respond(&mut inner, status, body), flight);
        }
        if let Some(saved) = inner.idempotency.get(slot) {
            if saved.path != path || !same_parameters(&saved.form, &form) {
                let (status, body) = stripe_error(
                    StatusCode::BAD_REQUEST,
                    "idempotency_error",
                    None,
                    &format!(
                        "Keys for idempotent requests can only be used with the same parameters they were first used \
                         with. Try using a key other than '{}' if you meant to execute a different request.",
                        slot.1
                    ),
                );
                return (respond(&mut inner, status, body), flight);
            }
            let (status, body) = (saved.status, saved.body.clone());
            let mut response = respond(&mut inner, status, body);
            response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
            return (response, flight);
        }
    }
    let params = nest(&form);
    let (status, body) = handle(&mut inner, &account, &params);
    // Stripe keeps the answer of a request whose endpoint ran; not one refused before it ran.
    if let Some(slot) = slot
        && kept_for_idempotency(status, &body)
    {
        inner.idempotency.insert(slot.clone(), Saved { path, form, status, body: body.clone() });
        inner.in_flight.insert(slot.clone());
        flight.slot = Some(slot);
    }
    (respond(&mut inner, status, body), flight)
}

/// Stripe's rate limiters, over a sliding second per account acted on. Sources:
/// <https://docs.stripe.com/rate-limits> ("Live mode: 100 operations", "Sandbox: 25
/// operations"; "Calls to the Meter events endpoint in live mode are subject to a separate rate
/// limit … 1000 calls per second per Stripe account") and
/// <https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api> ("In test mode
/// and sandbox mode, calls to the meter event and meter event stream endpoint count toward the
/// basic limit"). The mode is the key's (`sk_live_`/`rk_live_` live, anything else test). The
/// refusal is Stripe's 429 `rate_limit` body, as `set_rate_limit` answers.
fn rate_limit(inner: &mut Inner, headers: &HeaderMap, account: &str, path: &str) -> Result<(), (StatusCode, Value)> {
    let key = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let live = key.contains("sk_live_") || key.contains("rk_live_");
    let (limiter, limit) = match (live, path == "/v1/billing/meter_events") {
        (true, true) => (Limiter::LiveMeterEvents, 1_000),
        (true, false) => (Limiter::LiveBasic, 100),
        (false, _) => (Limiter::TestBasic, inner.test_mode_limit),
    };
    let now = Instant::now();
    let recent = inner.recent.entry((account.to_owned(), limiter)).or_default();
    while recent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
        recent.pop_front();
    }
    if recent.len() >= limit {
        inner.rate_limit_refusals += 1;
        return Err(rate_limited());
    }
    recent.push_back(now);
    Ok(())
}

fn rate_limited() -> (StatusCode, Value) {
    stripe_error(
        StatusCode::TOO_MANY_REQUESTS,
        "invalid_request_error",
        Some("rate_limit"),
        "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
    )
}

/// Significant digits of a whole number written in decimal (sign and leading zeros aside).
fn significant_digits(value: &str) -> usize {
    let digits = value.trim_start_matches(['-', '+']).trim_start_matches('0');
    digits.chars().filter(char::is_ascii_digit).count()
}

fn text<'a>(params: &'a Value, name: &str) -> Option<&'a str> {
    params.get(name).and_then(Value::as_str)
}

fn missing(name: &str) -> (StatusCode, Value) {
    invalid(name, Some("parameter_missing"), &format!("Missing required param: {name}."))
}

/// An error about the object a parameter names: Stripe answers 400 (404 is for the object
/// of the URL), with the parameter.
fn with_param((_, mut body): (StatusCode, Value), param: &str) -> (StatusCode, Value) {
    body["error"]["param"] = json!(param);
    (StatusCode::BAD_REQUEST, body)
}

fn no_such(kind: &str, id: &str) -> (StatusCode, Value) {
    stripe_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("resource_missing"),
        &format!("No such {kind}: '{id}'"),
    )
}

fn metadata(params: &Value) -> Value {
    params.get("metadata").cloned().unwrap_or_else(|| json!({}))
}

type Form = axum::extract::Form<Vec<(String, String)>>;

async fn account(State(inner): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    request(&inner, method, &uri, &headers, vec![], |_, account, _| {
        (
            StatusCode::OK,
            // Stripe's Account (stripe-node `Account`): the names a Dashboard shows are the
            // settings' display name and the business profile's name.
            json!({
                "id": account, "object": "account", "email": "billing@tenant.example", "country": "US",
                "charges_enabled": true, "payouts_enabled": true, "details_submitted": true,
                "default_currency": "usd", "created": 1_700_000_000, "type": "standard", "metadata": {},
                "business_type": "company",
                "business_profile": {
                    "annual_revenue": null, "estimated_worker_count": null, "mcc": null,
                    "minority_owned_business_designation": null, "monthly_estimated_revenue": null,
                    "name": "Tenant Co LLC", "product_description": null,
                    "specified_commercial_transactions_act_url": null, "support_address": null,
                    "support_email": null, "support_phone": null, "support_url": null, "url": null
                },
                "settings": {
                    "bacs_debit_payments": null, "card_issuing": null, "invoices": null, "payouts": null,
                    "paypay_payments": null, "sepa_debit_payments": null, "treasury": null,
                    "branding": { "icon": null, "logo": null, "primary_color": null, "secondary_color": null },
                    "card_payments": {
                        "decline_on": { "avs_failure": false, "cvc_failure": false },
                        "statement_descriptor_prefix": null, "statement_descriptor_prefix_kana": null,
                        "statement_descriptor_prefix_kanji": null
                    },
                    "dashboard": { "display_name": "Tenant Co", "timezone": "Etc/UTC" },
                    "payments": {
                        "statement_descriptor": null, "statement_descriptor_kana": null,
                        "statement_descriptor_kanji": null, "statement_descriptor_prefix_kana": null,
                        "statement_descriptor_prefix_kanji": null
                    }
                }
            }),
        )
    })
}

async fn create_meter(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let Some(name) = text(params, "display_name") else { return missing("display_name") };
        let Some(event_name) = text(params, "event_name") else { return missing("event_name") };
        let formula = params["default_aggregation"]["formula"].as_str().unwrap_or_default().to_owned();
        if !matches!(formula.as_str(), "sum" | "count" | "last") {
            return invalid(
                "default_aggregation[formula]",
                Some("parameter_invalid_empty"),
                "Invalid default_aggregation[formula]: must be one of sum, count or last",
            );
        }
        let taken = inner
            .accounts
            .get(account)
            .is_some_and(|a| a.meters.iter().any(|m| m["event_name"] == event_name && m["status"] == "active"));
        if taken {
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                &format!("An active meter with event_name `{event_name}` already exists."),
            );
        }
        let id = inner.id("mtr");
        let meter = json!({
            "id": id, "object": "billing.meter", "created": now(), "updated": now(), "livemode": false,
            "display_name": name, "event_name": event_name, "event_time_window": null, "status": "active",
            "status_transitions": {"deactivated_at": null},
            "default_aggregation": {"formula": formula},
            "customer_mapping": {
                "type": params["customer_mapping"]["type"].as_str().unwrap_or("by_id"),
                "event_payload_key": params["customer_mapping"]["event_payload_key"].as_str().unwrap_or("stripe_customer_id"),
            },
            "value_settings": {"event_payload_key": params["value_settings"]["event_payload_key"].as_str().unwrap_or("value")},
        });
        inner.accounts.entry(account.to_owned()).or_default().meters.push(meter.clone());
        (StatusCode::OK, meter)
    })
}

fn list(data: Vec<Value>, url: &str) -> Value {
    json!({ "object": "list", "data": data, "has_more": false, "url": url })
}

async fn list_meters(State(inner): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let url = uri.path().to_owned();
    request(&inner, method, &uri, &headers, vec![], |inner, account, _| {
        let meters = inner.accounts.get(account).map(|a| a.meters.clone()).unwrap_or_default();
        (StatusCode::OK, list(meters, &url))
    })
}

fn find(objects: &[Value], id: &str) -> Option<Value> {
    objects.iter().find(|o| o["id"] == id).cloned()
}

/// `GET` of one object of the account acted on, or Stripe's 404.
fn get_object(
    inner: &Shared,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    id: &str,
    kind: &str,
    pick: fn(&Account) -> &Vec<Value>,
) -> Response {
    request(inner, method, uri, headers, vec![], |inner, account, _| {
        match inner.accounts.get(account).and_then(|a| find(pick(a), id)) {
            Some(object) => (StatusCode::OK, object),
            None => no_such(kind, id),
        }
    })
}

async fn get_meter(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    get_object(&inner, method, &uri, &headers, &id, "billing.meter", |a| &a.meters)
}

async fn create_product(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let Some(name) = text(params, "name") else { return missing("name") };
        let id = inner.id("prod");
        let product = json!({
            "id": id, "object": "product", "active": true, "created": now(), "updated": now(), "livemode": false,
            "name": name, "metadata": metadata(params), "images": [], "marketing_features": [], "package_dimensions": null,
            "shippable": null, "url": null, "description": null, "type": "service",
        });
        inner.accounts.entry(account.to_owned()).or_default().products.push(product.clone());
        (StatusCode::OK, product)
    })
}

async fn create_price(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let Some(currency) = text(params, "currency") else { return missing("currency") };
        // "Three-letter ISO currency code, in lowercase. Must be a supported currency."
        // (stripe-node `PriceCreateParams.currency`).
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return invalid("currency", None, &format!("Invalid currency: {currency}."));
        }
        // "…accepts a decimal value in cents (or local equivalent) with at most 12 decimal
        // places" (stripe-node `PriceCreateParams.unit_amount_decimal`).
        if let Some(unit) = text(params, "unit_amount_decimal") {
            let (whole, fraction) = unit.split_once('.').unwrap_or((unit, ""));
            let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
            if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 12 {
                return invalid(
                    "unit_amount_decimal",
                    None,
                    &format!("Invalid decimal: {unit}; must contain at most 12 decimal places."),
                );
            }
        }
        let Some(product) = text(params, "product") else { return missing("product") };
        let data = inner.accounts.entry(account.to_owned()).or_default();
        if find(&data.products, product).is_none() {
            return with_param(no_such("product", product), "product");
        }
        let recurring = params.get("recurring").cloned().unwrap_or(Value::Null);
        if recurring["usage_type"] == "metered" {
            let Some(meter) = recurring["meter"].as_str() else { return missing("recurring[meter]") };
            if find(&data.meters, meter).is_none() {
                return with_param(no_such("billing meter", meter), "recurring[meter]");
            }
        }
        let id = inner.id("price");
        let price = json!({
            "id": id, "object": "price", "active": true, "created": now(), "livemode": false, "currency": currency,
            "product": product, "unit_amount_decimal": text(params, "unit_amount_decimal"),
            "unit_amount": null, "billing_scheme": text(params, "billing_scheme").unwrap_or("per_unit"),
            "recurring": {
                "interval": recurring["interval"].as_str().unwrap_or("month"), "interval_count": 1,
                "usage_type": recurring["usage_type"].as_str().unwrap_or("licensed"),
                "meter": recurring["meter"].as_str(), "trial_period_days": null,
            },
            "type": "recurring", "nickname": text(params, "nickname"), "metadata": metadata(params),
            "tax_behavior": "unspecified", "lookup_key": null, "tiers_mode": null, "transform_quantity": null,
            "custom_unit_amount": null,
        });
        inner.accounts.entry(account.to_owned()).or_default().prices.push(price.clone());
        (StatusCode::OK, price)
    })
}

async fn create_customer(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let id = inner.id("cus");
        let customer = json!({
            "id": id, "object": "customer", "created": now(), "livemode": false, "name": text(params, "name"),
            "email": text(params, "email"), "metadata": metadata(params), "balance": 0, "delinquent": false,
            "description": null, "invoice_prefix": "FAKE", "preferred_locales": [],
            "address": params.get("address").cloned().unwrap_or(Value::Null),
        });
        inner.accounts.entry(account.to_owned()).or_default().customers.push(customer.clone());
        (StatusCode::OK, customer)
    })
}

async fn get_customer(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    get_object(&inner, method, &uri, &headers, &id, "customer", |a| &a.customers)
}

async fn create_subscription(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let Some(customer) = text(params, "customer") else { return missing("customer") };
        let Some(price) = params["items"][0]["price"].as_str() else { return missing("items") };
        let data = inner.accounts.entry(account.to_owned()).or_default();
        if find(&data.customers, customer).is_none() {
            return with_param(no_such("customer", customer), "customer");
        }
        let Some(price_object) = find(&data.prices, price) else {
            return with_param(no_such("price", price), "items[0][price]");
        };
        let (collection_method, days_until_due) = match payments::collection(params) {
            Ok(collection) => collection,
            Err(refusal) => return refusal,
        };
        let automatic_tax = params["automatic_tax"]["enabled"] == "true";
        if automatic_tax && let Some(refusal) = payments::tax_location_refusal(data, customer) {
            return refusal;
        }
        let (id, item) = (inner.id("sub"), inner.id("si"));
        let (start, end) = (now(), now() + 30 * 86_400);
        let recurring = &price_object["recurring"];
        // The legacy `plan` view of the price, which Stripe still puts on every subscription item.
        let plan = json!({
            "id": price, "object": "plan", "active": true, "amount": price_object["unit_amount"],
            "amount_decimal": price_object["unit_amount_decimal"], "billing_scheme": price_object["billing_scheme"],
            "created": price_object["created"], "currency": price_object["currency"], "interval": recurring["interval"],
            "interval_count": recurring["interval_count"], "livemode": false, "metadata": {}, "meter": recurring["meter"],
            "nickname": null, "product": price_object["product"], "tiers_mode": null, "transform_usage": null,
            "trial_period_days": null, "usage_type": recurring["usage_type"],
        });
        let item = json!({
            "id": item, "object": "subscription_item", "price": price_object, "plan": plan, "subscription": id,
            "created": start, "metadata": {}, "discounts": [], "current_period_start": start,
            "current_period_end": end, "tax_rates": [], "billing_thresholds": null,
        });
        let mut subscription = json!({
            "id": id, "object": "subscription", "created": start, "livemode": false, "customer": customer,
            "status": "active", "metadata": metadata(params), "collection_method": collection_method,
            "currency": price_object["currency"], "start_date": start, "billing_cycle_anchor": start,
            "billing_mode": {"type": "classic"}, "billing_schedules": [], "discounts": [],
            "automatic_tax": {"enabled": automatic_tax, "liability": null, "disabled_reason": null},
            "cancel_at_period_end": false, "cancellation_details": {"comment": null, "feedback": null, "reason": null},
            "invoice_settings": {"account_tax_ids": null, "issuer": {"type": "self"}},
            "items": {"object": "list", "has_more": false, "data": [item],
                      "url": format!("/v1/subscription_items?subscription={id}")},
        });
        for empty in [
            "billing_cycle_anchor_config",
            "cancel_at",
            "canceled_at",
            "default_payment_method",
            "description",
            "ended_at",
            "latest_invoice",
            "pending_invoice_item_interval",
            "pending_setup_intent",
            "pending_update",
            "schedule",
            "test_clock",
            "trial_end",
            "trial_start",
        ] {
            subscription[empty] = Value::Null;
        }
        subscription["days_until_due"] = json!(days_until_due);
        inner.accounts.entry(account.to_owned()).or_default().subscriptions.push(subscription.clone());
        (StatusCode::OK, subscription)
    })
}

async fn get_subscription(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    get_object(&inner, method, &uri, &headers, &id, "subscription", |a| &a.subscriptions)
}

/// A meter event request holding its (account, event name, customer) lock; released when
/// dropped (the answer sent, or the connection gone).
struct MeterLock {
    inner: Shared,
    lock: Option<(String, String, String)>,
}

impl Drop for MeterLock {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take()
            && let Ok(mut inner) = self.inner.lock()
        {
            inner.meter_locks.remove(&lock);
            inner.meter_in_flight = inner.meter_in_flight.saturating_sub(1);
        }
    }
}

async fn create_meter_event(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    form: Form,
) -> Response {
    let latency = inner.lock().unwrap().meter_event_latency;
    let mut held = MeterLock { inner: inner.clone(), lock: None };
    let idempotency_key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (response, flight) = answer(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let timestamp = match text(params, "timestamp") {
            Some(t) => match t.parse::<i64>() {
                Ok(t) => t,
                Err(_) => return invalid("timestamp", Some("parameter_invalid_integer"), "Invalid integer: timestamp"),
            },
            None => now(),
        };
        let identifier = text(params, "identifier").map(str::to_owned).unwrap_or_else(|| inner.id("ident"));
        let raw_value = params["payload"]["value"].as_str().unwrap_or_default().to_owned();
        let event = MeterEvent {
            identifier: identifier.clone(),
            event_name: text(params, "event_name").unwrap_or_default().to_owned(),
            stripe_customer_id: params["payload"]["stripe_customer_id"].as_str().unwrap_or_default().to_owned(),
            value: raw_value.parse().unwrap_or(i64::MIN),
            timestamp,
            received: Instant::now(),
        };
        let data = inner.accounts.entry(account.to_owned()).or_default();
        data.meter_event_attempts.push(event.clone());
        if inner.rate_limited > 0 {
            inner.rate_limited -= 1;
            return rate_limited();
        }
        // "The meter event endpoint allows … one concurrent call per customer per meter"
        // (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api, Rate
        // limits). Stripe's answer to a request that finds the object locked by another is 429
        // `lock_timeout` ("This object cannot be accessed right now because another API request
        // or Stripe process is currently accessing it … make your requests serially or at a lower
        // rate", https://docs.stripe.com/error-codes#lock-timeout), which its SDKs retry
        // (stripe-ruby #841, stripe-php #718: "Retry requests on a 429 that's a lock timeout";
        // the code is in Stripe's API definition, async-stripe `ApiErrorsCode::LockTimeout`);
        // sent with `Stripe-Should-Retry: true` (https://docs.stripe.com/error-low-level).
        let lock = (account.to_owned(), event.event_name.clone(), event.stripe_customer_id.clone());
        if inner.meter_locks.contains(&lock) {
            inner.lock_timeouts += 1;
            return stripe_error(
                StatusCode::TOO_MANY_REQUESTS,
                "invalid_request_error",
                Some("lock_timeout"),
                "This object cannot be accessed right now because another API request or Stripe process is \
                 currently accessing it. If you see this error intermittently, retry the request. If you see this \
                 error frequently and are making multiple concurrent requests to a single object, make your \
                 requests serially or at a lower rate.",
            );
        }
        inner.meter_locks.insert(lock.clone());
        inner.meter_in_flight += 1;
        inner.meter_in_flight_max = inner.meter_in_flight_max.max(inner.meter_in_flight);
        held.lock = Some(lock);
        if let Some((n, status)) = inner.failing {
            inner.failing = (n > 1).then_some((n - 1, status));
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return if status.is_server_error() {
                stripe_error(status, "api_error", None, "An unknown error occurred")
            } else {
                (status, invalid("payload[stripe_customer_id]", None, "The customer has been deleted.").1)
            };
        }
        if event.event_name.is_empty() {
            return invalid("event_name", Some("parameter_missing"), "Missing required param: event_name.");
        }
        let data = inner.accounts.entry(account.to_owned()).or_default();
        if !data.meters.iter().any(|m| m["event_name"] == event.event_name.as_str() && m["status"] == "active") {
            return invalid(
                "event_name",
                None,
                &format!("No active meter was found for event_name `{}`.", event.event_name),
            );
        }
        if event.stripe_customer_id.is_empty() {
            return invalid(
                "payload",
                Some("parameter_missing"),
                "The payload must contain the meter's customer mapping key `stripe_customer_id`.",
            );
        }
        // An unknown customer is found only after the event was accepted (see `meter_errors`):
        // checked last, once the event has passed every synchronous rule.
        let customer_known = find(&data.customers, &event.stripe_customer_id).is_some();
        // "Introduces validation that rejects billing meter event values with more than 15
        // significant digits. For the synchronous API, requests with such values now return a
        // 400 error … “The value in the event payload can have at most `max_digits` digits.
        // Received `value`.”" (https://docs.stripe.com/changelog/dahlia/2026-04-22/billing-meter-event-values-validation).
        // Checked before the whole-number rule, so a value too long for any integer type is
        // refused for its digits.
        if significant_digits(&raw_value) > MAX_VALUE_DIGITS {
            return invalid(
                "payload[value]",
                None,
                &format!(
                    "The value in the event payload can have at most {MAX_VALUE_DIGITS} digits. Received {raw_value}."
                ),
            );
        }
        if event.value == i64::MIN {
            return invalid("payload[value]", None, "payload[value] must be a whole number.");
        }
        let now = now();
        if timestamp < now - 35 * 86_400 || timestamp > now + 300 {
            return invalid(
                "timestamp",
                None,
                "The timestamp must be within the past 35 days and no more than 5 minutes in the future.",
            );
        }
        // "We will enforce uniqueness within a rolling period of at least 24 hours. The
        // enforcement of uniqueness primarily addresses issues arising from accidental retries or
        // other problems occurring within extremely brief time intervals" (the `identifier`
        // parameter, https://docs.stripe.com/api/billing/meter-event/create; stripe-node
        // `BillingMeterEventCreateParams.identifier`). An older identifier is a new event.
        let window = inner.identifier_window;
        let data = inner.accounts.entry(account.to_owned()).or_default();
        // An event accepted and found invalid later was accepted all the same: its identifier is
        // taken (a retry of it needs another one).
        let taken = data.meter_events.iter().any(|e| e.identifier == identifier && e.received.elapsed() < window)
            || data.reported_identifiers.iter().any(|(id, at)| *id == identifier && at.elapsed() < window);
        if taken {
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("resource_already_exists"),
                &format!("An event with identifier `{identifier}` already exists."),
            );
        }
        if customer_known {
            data.meter_events.push(event.clone());
        } else {
            let meter = data
                .meters
                .iter()
                .find(|m| m["event_name"] == event.event_name.as_str())
                .and_then(|m| m["id"].as_str())
                .unwrap_or_default()
                .to_owned();
            data.reported_identifiers.push((identifier.clone(), event.received));
            data.async_errors.push(meter_errors::AsyncMeterError {
                meter,
                code: "meter_event_customer_not_found",
                message: format!("No customer found for stripe_customer_id `{}`.", event.stripe_customer_id),
                request_identifier: idempotency_key.clone().unwrap_or_else(|| identifier.clone()),
                at: now,
            });
        }
        (
            StatusCode::OK,
            json!({
                "object": "billing.meter_event", "created": now, "livemode": false, "event_name": event.event_name,
                "identifier": identifier, "timestamp": timestamp,
                "payload": {"stripe_customer_id": event.stripe_customer_id, "value": event.value.to_string()},
            }),
        )
    });
    // The key, and the customer and meter, stay in flight while the answer is held back.
    tokio::time::sleep(latency).await;
    drop(flight);
    drop(held);
    response
}

async fn event_summaries(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let url = uri.path().to_owned();
    request(&inner, method, &uri, &headers, vec![], |inner, account, _| {
        let Some(customer) = query.get("customer") else { return missing("customer") };
        let bound = |name: &str| query.get(name).and_then(|v| v.parse::<i64>().ok());
        let (Some(start), Some(end)) = (bound("start_time"), bound("end_time")) else {
            return missing("start_time or end_time");
        };
        // Bounds aligned with the grouping window (minutes without one, as Stripe requires).
        let (window, unit) = match query.get("value_grouping_window").map(String::as_str) {
            None => (60, "minute"),
            Some("hour") => (3_600, "hour"),
            Some("day") => (86_400, "UTC day"),
            Some(_) => {
                return invalid("value_grouping_window", None, "value_grouping_window must be one of day, hour.");
            }
        };
        if start % window != 0 || end % window != 0 || end <= start {
            return invalid(
                "start_time",
                None,
                &format!(
                    "start_time and end_time must be aligned with {unit} boundaries, and start_time before end_time."
                ),
            );
        }
        let Some(data) = inner.accounts.get(account) else { return no_such("billing.meter", &id) };
        let Some(meter) = find(&data.meters, &id) else { return no_such("billing.meter", &id) };
        // One summary for the range, or one per window (in time order) when grouped.
        // "Stripe processes meter events asynchronously, so aggregated usage in meter event
        // summaries and on upcoming invoices might not immediately reflect recently received meter
        // events" (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api):
        // events received less than the lag ago are not counted yet. `aggregated_value` is a
        // float (stripe-node `Billing.MeterEventSummary.aggregated_value: number`, async-stripe
        // `f64`), summed in doubles: past 2^53 the sum rounds ("double precision loss in the
        // usage aggregation pipeline", the 2026-04-22 changelog above).
        let lag = inner.summary_lag;
        let step = if query.contains_key("value_grouping_window") { window } else { end - start };
        let summaries = (start..end)
            .step_by(usize::try_from(step).unwrap_or(usize::MAX))
            .map(|from| {
                let to = from + step;
                let total: f64 = data
                    .meter_events
                    .iter()
                    .filter(|e| e.event_name == meter["event_name"].as_str().unwrap_or_default())
                    .filter(|e| &e.stripe_customer_id == customer && e.timestamp >= from && e.timestamp < to)
                    .filter(|e| e.received.elapsed() >= lag)
                    .fold(0.0, |sum, e| sum + e.value as f64);
                json!({
                    "id": format!("mtrusg_{customer}_{from}"), "object": "billing.meter_event_summary",
                    "aggregated_value": total, "start_time": from, "end_time": to, "livemode": false, "meter": id,
                })
            })
            .collect();
        (StatusCode::OK, list(summaries, &url))
    })
}
