//! `POST /v1/chat/completions`: OpenAI chat, JSON or SSE, through the budget.
//!
//! 1. Authenticate the key, parse the request, name the customer, price the model, route it.
//! 2. Reserve the worst case: input (counted) + max output × `n`, with the project's markup.
//!    When it does not fit: `reject` answers 402; `clamp` lowers the call's max output to what
//!    the remaining budget pays for (if at least the project's minimum), else 402.
//! 3. Forward. Upstream errors come back with their status and body; the reservation is
//!    released. Nothing is retried (a retry could be charged twice).
//! 4. Settle from the provider's `usage` (streams: asked for with
//!    `stream_options.include_usage`, and that chunk hidden from clients that did not ask),
//!    else from what was delivered. Settlement runs on its own task, so it completes even
//!    when the client has gone.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tollgate_core::estimate;
use tollgate_core::ledger::{self, CallStatus, Reservation, ReserveOutcome, UsageRecord, UsageSource};
use tollgate_core::money::Nanos;
use tollgate_core::pricing::{Price, TokenUsage, tokens_cost, with_markup};
use tollgate_core::projects::{self, BudgetPolicy, Customer, Project, Provider, ProviderKind};
use tollgate_core::time::UnixMillis;

use super::error::ProxyError;
use super::{CUSTOMER_HEADER, auth};
use crate::middleware::request_id::RequestId;
use crate::state::AppState;

const ENDPOINT: &str = "chat.completions";
/// A reservation outlives any call (upstream read timeout included) before housekeeping frees it.
const RESERVATION_TTL_SECS: i64 = 30 * 60;

/// Everything known about a call once it is admitted.
struct Call {
    state: AppState,
    project: Project,
    customer: Customer,
    provider: Provider,
    price: Price,
    model: String,
    request_id: String,
    reservation: Reservation,
    input_estimate: i64,
    started: Instant,
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ProxyError> {
    let started = Instant::now();
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ProxyError::PayloadTooLarge(format!(
            "The request body is larger than {} MB.",
            super::MAX_BODY_BYTES / (1024 * 1024)
        )),
        _ => ProxyError::invalid(e.body_text(), "invalid_body", None),
    })?;
    let project = auth::authenticate(&state, &headers).await?;
    let mut request: Value = serde_json::from_slice(&body).map_err(|e| {
        ProxyError::invalid(format!("We could not parse the JSON body of your request: {e}"), "invalid_json", None)
    })?;
    let parsed = ChatRequest::parse(&request)?;
    let external_id = customer_of_call(&project, &headers, &request)?;

    let price = projects::price_for(&state.db, &project.id, &parsed.model).await?.ok_or_else(|| {
        ProxyError::invalid(
            format!("The model `{}` has no price in this project, so Tollgate cannot meter it. Add a price override for it.", parsed.model),
            "model_not_priced",
            Some("model"),
        )
    })?;
    let provider = projects::list_providers(&state.db, &state.master_key, &project.id)
        .await?
        .into_iter()
        .find(|p| p.serves(&parsed.model))
        .ok_or_else(|| {
            ProxyError::invalid(
                format!("No provider connection of this project serves the model `{}`.", parsed.model),
                "model_not_routed",
                Some("model"),
            )
        })?;
    if provider.kind == ProviderKind::Anthropic {
        return Err(ProxyError::invalid(
            format!("The model `{}` is routed to an Anthropic connection: call it through /v1/messages.", parsed.model),
            "wrong_endpoint",
            Some("model"),
        ));
    }
    let customer = projects::customer_for_call(&state.db, &project, &external_id).await?;
    let refusal = |reason: &str| UsageRecord {
        project_id: project.id.clone(),
        customer_id: Some(customer.id.clone()),
        request_id: request_id.0.clone(),
        endpoint: ENDPOINT.to_owned(),
        model: parsed.model.clone(),
        status: CallStatus::Refused,
        reason: Some(reason.to_owned()),
        tokens: TokenUsage::default(),
        reserved: Nanos::ZERO,
        cost: Nanos::ZERO,
        billed: Nanos::ZERO,
        source: UsageSource::None,
        latency_ms: started.elapsed().as_millis() as i64,
    };
    if customer.blocked {
        ledger::settle(&state.db, None, &refusal("customer blocked")).await?;
        return Err(ProxyError::Forbidden {
            message: format!("The customer `{external_id}` is blocked in this project."),
            code: "customer_blocked",
        });
    }

    // The worst case, as a function of the max output tokens.
    let input_estimate = estimate::with_margin(
        price.tokenizer,
        estimate::chat_input_tokens(price.tokenizer, &request),
        project.estimate_margin_bps,
    );
    let input_cost = tokens_cost(input_estimate, price.input);
    let worst_case = |max_output: i64| {
        let output_cost = tokens_cost(max_output.saturating_mul(parsed.n), price.output);
        with_markup(input_cost.checked_add(output_cost).unwrap_or(Nanos(i64::MAX)), project.markup_bps)
    };
    let requested_output = parsed.max_output.unwrap_or(price.max_output_tokens);
    let mut max_output = requested_output;
    let expires = UnixMillis::now().plus_secs(RESERVATION_TTL_SECS);
    let mut reservation = None;
    for _ in 0..4 {
        match ledger::reserve(&state.db, &customer, worst_case(max_output), &request_id.0, expires).await? {
            ReserveOutcome::Reserved { reservation: r, .. } => {
                reservation = Some(r);
                break;
            }
            ReserveOutcome::Blocked => {
                ledger::settle(&state.db, None, &refusal("customer blocked")).await?;
                return Err(ProxyError::Forbidden {
                    message: format!("The customer `{external_id}` is blocked in this project."),
                    code: "customer_blocked",
                });
            }
            ReserveOutcome::Insufficient { remaining } => {
                let affordable = largest_affordable(requested_output, remaining, &worst_case);
                let refuse = project.policy() == BudgetPolicy::Reject
                    || affordable < project.min_output_tokens.max(1)
                    || worst_case(0) > remaining;
                if refuse {
                    let needed = worst_case(if project.policy() == BudgetPolicy::Reject {
                        requested_output
                    } else {
                        project.min_output_tokens.max(1)
                    });
                    ledger::settle(&state.db, None, &refusal("insufficient budget")).await?;
                    return Err(ProxyError::InsufficientBudget {
                        remaining,
                        needed,
                        currency: project.currency.clone(),
                    });
                }
                // Another call may have moved the budget since; the next attempt re-checks atomically.
                max_output = affordable.min(max_output);
            }
        }
    }
    let Some(reservation) = reservation else {
        ledger::settle(&state.db, None, &refusal("insufficient budget")).await?;
        return Err(ProxyError::InsufficientBudget {
            remaining: Nanos::ZERO,
            needed: worst_case(project.min_output_tokens.max(1)),
            currency: project.currency.clone(),
        });
    };
    let clamped = max_output < requested_output;
    if clamped || parsed.max_output.is_none() {
        // Name the limit explicitly, so the provider cannot generate past what was reserved.
        let field = if request.get("max_tokens").is_some() { "max_tokens" } else { "max_completion_tokens" };
        request[field] = json!(max_output);
    }
    let client_wants_usage = request.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    if parsed.stream {
        request["stream_options"] = json!({ "include_usage": true });
    }

    let call = Call {
        state: state.clone(),
        project,
        customer,
        provider,
        price,
        model: parsed.model,
        request_id: request_id.0,
        reservation,
        input_estimate,
        started,
    };
    let upstream = call
        .state
        .http
        .post(format!("{}/chat/completions", call.provider.base_url))
        .bearer_auth(call.provider.api_key.expose_secret())
        .json(&request)
        .send()
        .await;
    let upstream = match upstream {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, provider = %call.provider.id, "upstream unreachable");
            call.release("upstream unreachable").await;
            return Err(ProxyError::UpstreamUnreachable(format!("The provider could not be reached: {e}")));
        }
    };
    let status = upstream.status();
    if !status.is_success() {
        let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
        let body = upstream.bytes().await.unwrap_or_default();
        call.release(&format!("upstream answered {}", status.as_u16())).await;
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        if let Some(ct) = content_type {
            response.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        return Ok(response);
    }
    if parsed.stream {
        Ok(stream_response(call, upstream, client_wants_usage, max_output, clamped))
    } else {
        json_response(call, upstream, max_output, clamped).await
    }
}

/// The fields of a chat request Tollgate interprets; everything else passes through.
struct ChatRequest {
    model: String,
    stream: bool,
    n: i64,
    max_output: Option<i64>,
}

impl ChatRequest {
    fn parse(request: &Value) -> Result<Self, ProxyError> {
        let obj = request
            .as_object()
            .ok_or_else(|| ProxyError::invalid("The request body must be a JSON object.", "invalid_json", None))?;
        let model = match obj.get("model") {
            Some(Value::String(m)) if !m.trim().is_empty() => m.trim().to_owned(),
            _ => {
                return Err(ProxyError::invalid("You must provide a model parameter.", "missing_model", Some("model")));
            }
        };
        if !obj.get("messages").is_some_and(Value::is_array) {
            return Err(ProxyError::invalid(
                "`messages` must be an array of messages.",
                "invalid_messages",
                Some("messages"),
            ));
        }
        let stream = match obj.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ProxyError::invalid("`stream` must be a boolean.", "invalid_type", Some("stream"))),
        };
        let n = match obj.get("n") {
            None | Some(Value::Null) => 1,
            Some(v) => v.as_i64().filter(|n| (1..=128).contains(n)).ok_or_else(|| {
                ProxyError::invalid("`n` must be an integer from 1 to 128.", "invalid_value", Some("n"))
            })?,
        };
        let mut max_output = None;
        for field in ["max_completion_tokens", "max_tokens"] {
            match obj.get(field) {
                None | Some(Value::Null) => {}
                Some(v) => {
                    let limit = v.as_i64().filter(|m| *m >= 1).ok_or_else(|| {
                        ProxyError::invalid(format!("`{field}` must be a positive integer."), "invalid_value", None)
                    })?;
                    max_output = Some(max_output.map_or(limit, |m: i64| m.min(limit)));
                }
            }
        }
        Ok(Self { model, stream, n, max_output })
    }
}

/// The customer a call is charged to: the header, else (if enabled) OpenAI's `user` field,
/// else the project's default customer.
fn customer_of_call(project: &Project, headers: &HeaderMap, request: &Value) -> Result<String, ProxyError> {
    if let Some(value) = headers.get(CUSTOMER_HEADER) {
        let id = value.to_str().map_err(|_| {
            ProxyError::invalid("The X-Tollgate-Customer header must be printable text.", "invalid_customer", None)
        })?;
        return Ok(id.to_owned());
    }
    if project.customer_from_user
        && let Some(user) = request.get("user").and_then(Value::as_str)
    {
        return Ok(user.to_owned());
    }
    if let Some(default) = &project.default_customer {
        return Ok(default.clone());
    }
    Err(ProxyError::invalid(
        "Name the end-customer of this call in the X-Tollgate-Customer header.",
        "missing_customer",
        Some("customer"),
    ))
}

/// The largest max-output (≤ `upper`) whose worst case fits in `remaining`; 0 if none does.
fn largest_affordable(upper: i64, remaining: Nanos, worst_case: &impl Fn(i64) -> Nanos) -> i64 {
    let (mut lo, mut hi) = (0i64, upper.max(0));
    if worst_case(0) > remaining {
        return 0;
    }
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        if worst_case(mid) <= remaining { lo = mid } else { hi = mid - 1 }
    }
    lo
}

/// OpenAI `usage` → tokens by kind (`input` excludes cached reads).
fn usage_from_openai(usage: &Value) -> Option<TokenUsage> {
    let prompt = usage.get("prompt_tokens")?.as_i64()?;
    let completion = usage.get("completion_tokens").and_then(Value::as_i64).unwrap_or(0);
    let cached = usage.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_i64).unwrap_or(0);
    let reasoning = usage.pointer("/completion_tokens_details/reasoning_tokens").and_then(Value::as_i64).unwrap_or(0);
    Some(TokenUsage {
        input: (prompt - cached).max(0),
        cached_input: cached.clamp(0, prompt.max(0)),
        cache_write: 0,
        output: completion.max(0),
        reasoning: reasoning.max(0),
    })
}

impl Call {
    fn record(
        &self,
        status: CallStatus,
        reason: Option<String>,
        tokens: TokenUsage,
        source: UsageSource,
    ) -> UsageRecord {
        let cost = if status == CallStatus::Settled { self.price.cost(&tokens) } else { Nanos::ZERO };
        UsageRecord {
            project_id: self.project.id.clone(),
            customer_id: Some(self.customer.id.clone()),
            request_id: self.request_id.clone(),
            endpoint: ENDPOINT.to_owned(),
            model: self.model.clone(),
            status,
            reason,
            tokens,
            reserved: self.reservation.amount,
            cost,
            billed: with_markup(cost, self.project.markup_bps),
            source,
            latency_ms: self.started.elapsed().as_millis() as i64,
        }
    }

    /// Settles on a task of its own (it must finish even if the client is gone) and waits for it.
    async fn finish(self, record: UsageRecord) -> (Nanos, Option<Nanos>) {
        let billed = record.billed;
        let db = self.state.db.clone();
        let reservation = self.reservation.clone();
        let settled = tokio::spawn(async move { ledger::settle(&db, Some(&reservation), &record).await }).await;
        let remaining = match settled {
            Ok(Ok(remaining)) => remaining,
            Ok(Err(e)) => {
                tracing::error!(error = %e, request_id = %self.request_id, "settlement failed; the reservation expires instead");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "settlement task failed");
                None
            }
        };
        (billed, remaining)
    }

    async fn release(self, reason: &str) {
        let record = self.record(CallStatus::Failed, Some(reason.to_owned()), TokenUsage::default(), UsageSource::None);
        self.finish(record).await;
    }
}

fn money_header(n: Nanos) -> Option<HeaderValue> {
    HeaderValue::from_str(&n.to_string()).ok()
}

async fn json_response(
    call: Call,
    upstream: reqwest::Response,
    max_output: i64,
    clamped: bool,
) -> Result<Response, ProxyError> {
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    let body = match upstream.bytes().await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "upstream body failed");
            call.release("upstream body failed").await;
            return Err(ProxyError::UpstreamUnreachable(format!("The provider's answer broke off: {e}")));
        }
    };
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let (tokens, source) = match parsed.as_ref().and_then(|v| v.get("usage")).and_then(usage_from_openai) {
        Some(t) => (t, UsageSource::Provider),
        None => {
            // No usage: count what was delivered, and the input as estimated.
            let text: String = parsed
                .as_ref()
                .and_then(|v| v.get("choices"))
                .and_then(Value::as_array)
                .map(|choices| {
                    choices.iter().filter_map(|c| c.pointer("/message/content").and_then(Value::as_str)).collect()
                })
                .unwrap_or_default();
            let output = estimate::count_text(call.price.tokenizer, &text);
            (TokenUsage { input: call.input_estimate, output, ..TokenUsage::default() }, UsageSource::Counted)
        }
    };
    let record = call.record(CallStatus::Settled, None, tokens, source);
    let (billed, remaining) = call.finish(record).await;
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    if let Some(ct) = content_type {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    insert_budget_headers(headers, Some(billed), remaining, max_output, clamped);
    Ok(response)
}

fn insert_budget_headers(
    headers: &mut HeaderMap,
    billed: Option<Nanos>,
    remaining: Option<Nanos>,
    max_output: i64,
    clamped: bool,
) {
    if let Some(v) = billed.and_then(money_header) {
        headers.insert("x-tollgate-cost", v);
    }
    if let Some(v) = remaining.and_then(money_header) {
        headers.insert("x-tollgate-remaining", v);
    }
    if clamped && let Ok(v) = HeaderValue::from_str(&max_output.to_string()) {
        headers.insert("x-tollgate-max-output-clamped", v);
    }
}

/// Streams the upstream's SSE to the client while watching it for usage; settles when the
/// upstream ends, fails, or the client goes away (then the upstream is dropped, which stops
/// generation, and the call is settled for what was generated).
fn stream_response(
    call: Call,
    upstream: reqwest::Response,
    client_wants_usage: bool,
    max_output: i64,
    clamped: bool,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    let reserved = call.reservation.amount;
    tokio::spawn(async move {
        let mut upstream = upstream.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        let mut usage: Option<TokenUsage> = None;
        let mut delivered = String::new();
        let mut failure: Option<String> = None;
        'pump: loop {
            let chunk = match tokio::time::timeout(Duration::from_secs(300), upstream.next()).await {
                Ok(Some(Ok(chunk))) => chunk,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    failure = Some(format!("upstream stream broke: {e}"));
                    break;
                }
                Err(_) => {
                    failure = Some("upstream stream stalled".to_owned());
                    break;
                }
            };
            buffer.extend_from_slice(&chunk);
            while let Some(end) = find_event_end(&buffer) {
                let event: Vec<u8> = buffer.drain(..end.1).collect();
                let forward = inspect_event(&event[..end.0], &mut usage, &mut delivered, client_wants_usage);
                if forward && tx.send(Ok(Bytes::from(event))).await.is_err() {
                    failure = Some("client disconnected".to_owned());
                    break 'pump;
                }
            }
        }
        if !buffer.is_empty() && failure.is_none() {
            let _ = tx.send(Ok(Bytes::from(std::mem::take(&mut buffer)))).await;
        }
        drop(upstream);
        let (tokens, source) = match usage {
            Some(t) => (t, UsageSource::Provider),
            None => {
                let output = estimate::count_text(call.price.tokenizer, &delivered);
                (TokenUsage { input: call.input_estimate, output, ..TokenUsage::default() }, UsageSource::Counted)
            }
        };
        let record = call.record(CallStatus::Settled, failure, tokens, source);
        call.finish(record).await;
    });
    let body =
        Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(v) = money_header(reserved) {
        headers.insert("x-tollgate-reserved", v);
    }
    insert_budget_headers(headers, None, None, max_output, clamped);
    response.into_response()
}

/// The end of the first complete SSE event in `buffer`: (end of its text, end including the
/// blank line).
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2));
    let crlf = buffer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Reads one SSE event: records usage and delivered text; returns whether to forward it.
fn inspect_event(
    event: &[u8],
    usage: &mut Option<TokenUsage>,
    delivered: &mut String,
    client_wants_usage: bool,
) -> bool {
    let text = String::from_utf8_lossy(event);
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect::<Vec<_>>()
        .join("\n");
    if data.is_empty() || data == "[DONE]" {
        return true;
    }
    let Ok(chunk) = serde_json::from_str::<Value>(&data) else {
        return true;
    };
    if let Some(choices) = chunk.get("choices").and_then(Value::as_array) {
        for choice in choices {
            if let Some(content) = choice.pointer("/delta/content").and_then(Value::as_str) {
                delivered.push_str(content);
            }
        }
    }
    if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()).and_then(usage_from_openai) {
        *usage = Some(u);
        let usage_only = chunk.get("choices").and_then(Value::as_array).is_none_or(Vec::is_empty);
        if usage_only && !client_wants_usage {
            return false;
        }
    }
    true
}
