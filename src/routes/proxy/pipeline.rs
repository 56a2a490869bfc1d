//! The path every metered call takes, whatever its API. A [`Dialect`] says how one API's
//! requests and answers look; this module does the rest, the same way for each:
//!
//! 1. Authenticate the key, parse the request, name the customer, price the model, route it.
//!    Admit it only if its worst case is bounded by what the request shows ([`super::admission`]):
//!    else refuse it, or — if the project allows such calls — hold its per-call ceiling.
//! 2. Reserve the worst case: input (counted) + max output × `n`, with the project's markup
//!    (at least the ceiling, for a call admitted under it). The max output is the call's own,
//!    else the project's default max output (else the model's limit), capped at the model's
//!    limit. When it does not fit: `reject` answers 402; `clamp` lowers the call's max output
//!    to what the remaining budget pays for (if at least the project's minimum and what the
//!    request needs to stay valid), else 402. The forwarded request names exactly the max
//!    output reserved for, in one field, whatever the client sent.
//! 3. Forward, only where the egress policy allows (`tollgate_core::egress`: public addresses
//!    or the operator's allowance, and a path the base URL cannot steer). Upstream errors come
//!    back with their status and body, a redirect as an error (never followed); the reservation
//!    is released. Nothing is retried (a retry could be charged twice).
//! 4. Settle from the provider's usage (for streams, watched in the events as they pass),
//!    else from what was delivered. Settlement runs on its own task, so it completes even
//!    when the client has gone. Long streams renew their reservation so it cannot expire
//!    under them.
//!
//! Each call's work is bounded, whatever the client or the (tenant-chosen) upstream sends:
//! - a large body is parsed and counted off the async threads ([`super::offload`]), and a
//!   call whose input's *least* possible count already cannot fit the customer's budget is
//!   refused before anything is counted exactly ([`estimate::Counter`]);
//! - an upstream's JSON answer is read up to [`MAX_UPSTREAM_BODY_BYTES`], one streamed event
//!   up to [`sse::MAX_EVENT_BYTES`];
//! - a stream stops as soon as its client leaves, and is cut once what it delivered counts
//!   past its max output (× `n`) plus the operator's margin; every call is cut at the
//!   operator's maximum duration, and when shutdown's grace period runs out. A call cut is
//!   settled for what it delivered (a JSON answer that never arrived whole: released).

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use futures::StreamExt;
use secrecy::ExposeSecret;
use serde_json::Value;
use tollgate_core::egress::{self, Refused};
use tollgate_core::estimate::{self, Counter};
use tollgate_core::ids::CustomerId;
use tollgate_core::ledger::{
    self, CallStatus, Hold, Reservation, ReserveOutcome, Settlement, UsageRecord, UsageSource,
};
use tollgate_core::money::Nanos;
use tollgate_core::pricing::{Price, TokenUsage, Tokenizer, tokens_cost, with_markup};
use tollgate_core::projects::{self, BudgetPolicy, CallConfig, Project, ProjectError, Provider, ProviderKind};
use tollgate_core::time::UnixMillis;
use tracing::Instrument;

use super::admission::Unbounded;
use super::error::{ErrorShape, ProxyError};
use super::offload::INLINE_BYTES;
use super::{CUSTOMER_HEADER, auth, sse};
use crate::middleware::request_id::RequestId;
use crate::state::AppState;

/// A reservation outlives any quiet stretch of a call (upstream read timeout included)
/// before housekeeping may free it; streams renew theirs every [`RENEW_EVERY`].
const RESERVATION_TTL_SECS: i64 = 30 * 60;
const RENEW_EVERY: Duration = Duration::from_secs(5 * 60);
/// A stream that sends nothing for this long is given up (and settled for what it sent).
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The `anthropic-version` sent upstream when the client named none.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// The largest answer read from an upstream (a JSON answer, or an error's body): far above
/// any provider's (a chat answer of 128 choices of 16k tokens is about 8 MB), far below
/// what would strain the server.
pub const MAX_UPSTREAM_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Bodies above this size are checked against the customer's budget before their exact
/// count: the check costs a database read, which pays where the count it may save costs
/// more (tens of milliseconds of CPU from here on; see [`super::offload::INLINE_BYTES`]).
const PRECHECK_BYTES: usize = 256 * 1024;
/// Tokens a stream may deliver past its max output × `n` (and the operator's margin) before
/// it is cut: what one event or a tokenizer's disagreement on a short answer may add.
const STREAM_OUTPUT_SLACK: i64 = 256;

/// The fields of a request the pipeline interprets; everything else passes through.
#[derive(Debug, Clone)]
pub struct CallShape {
    pub model: String,
    pub stream: bool,
    /// Completions asked for (`n`); output is reserved for each.
    pub n: i64,
    /// The request's own max output, if it set one.
    pub max_output: Option<i64>,
    /// False for APIs that produce no output tokens (embeddings): nothing to clamp.
    pub produces_output: bool,
}

/// What a stream has shown of its cost so far.
#[derive(Debug, Default)]
pub struct StreamWatch {
    /// The provider's final usage for the whole call, once it has been seen.
    pub usage: Option<TokenUsage>,
    /// The provider's input counts, when it reports them before the end (Anthropic's
    /// `message_start`); used when the stream breaks off before the final usage.
    pub input: Option<TokenUsage>,
    /// Text delivered so far, counted when no final usage arrives.
    pub delivered: String,
}

/// One API's wire format, as far as metering needs to know it.
pub trait Dialect: Send + Sync + 'static {
    /// The endpoint's name on usage events.
    const ENDPOINT: &'static str;
    /// The error shape the endpoint's callers expect.
    const ERRORS: ErrorShape;
    /// Where calls of a model routed to a connection that does not speak this API should go.
    const OTHER_ENDPOINT: &'static str;

    /// Whether a connection of this kind speaks this API.
    fn speaks(kind: ProviderKind) -> bool;
    /// This API's path under a provider's base URL (`chat/completions`).
    const UPSTREAM_PATH: &'static str;
    fn parse(request: &Value) -> Result<CallShape, ProxyError>;
    /// The request field that names the end-user, for projects that take the customer from it.
    fn user(request: &Value) -> Option<&str>;
    /// The first part of the request whose cost Tollgate cannot bound (see [`super::admission`]).
    fn unbounded(request: &Value) -> Option<Unbounded>;
    /// Input tokens of the request to `model` (exact or bounded from above), or a bound on
    /// them in the direction `counter` says (see [`estimate::Counter`]).
    fn input_tokens(counter: Counter, model: &str, request: &Value) -> i64;
    /// The least max output the request stays valid with at the provider (what clamping may
    /// not go below).
    fn least_output(_request: &Value) -> i64 {
        1
    }
    /// Makes the request name exactly `max_output` as its output limit (the one reserved for),
    /// in the one field `kind`'s upstream reads, removing any other limit field.
    fn limit_output(request: &mut Value, max_output: i64, kind: ProviderKind);
    /// Adjusts a streamed request so the upstream reports usage; returns whether the client
    /// itself asked for what was added (so it must not be hidden from it).
    fn prepare_stream(_request: &mut Value) -> bool {
        true
    }
    /// Usage in a JSON answer.
    fn usage(body: &Value) -> Option<TokenUsage>;
    /// Generated text in a JSON answer (counted when it has no usage).
    fn delivered(body: &Value) -> String;
    /// Reads one streamed event into `watch`; returns whether to forward it to the client.
    fn watch(event: &sse::Event, data: Option<&Value>, watch: &mut StreamWatch, client_wants_usage: bool) -> bool;
}

/// The handler of every metered endpoint: `post(pipeline::handle::<Chat>)`.
///
/// The call runs on a task of its own: a client that goes away mid-call (its request future
/// dropped) does not cut the call off between its reservation and its settlement. The call
/// finishes with the provider and is settled (a reservation left behind would block budget
/// until it expired); a stream's client leaving is seen by the stream itself.
pub async fn handle<D: Dialect>(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // In the request's span, so what the call logs still names its request; tracked, so
    // shutdown can cut it and wait for its settlement.
    let in_flight = state.in_flight.clone();
    match in_flight.spawn(run::<D>(state, request_id, headers, body).in_current_span()).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => e.into_response_shaped(D::ERRORS),
        Err(e) => {
            tracing::error!(error = %e, "a proxied call's task failed");
            ProxyError::Internal.into_response_shaped(D::ERRORS)
        }
    }
}

/// The request body, or the error that explains why there is none.
pub fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ProxyError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        _ => ProxyError::invalid(e.body_text(), "invalid_body", None),
    })
}

fn too_large() -> ProxyError {
    ProxyError::PayloadTooLarge(format!(
        "The request body is larger than {} MB.",
        super::MAX_BODY_BYTES / (1024 * 1024)
    ))
}

/// Refuses a request whose declared length is over [`super::MAX_BODY_BYTES`] from its headers,
/// before a byte of its body is read (a client sending `Expect: 100-continue` sends none). A
/// body without a declared length is refused once it crosses the limit ([`body_bytes`]).
pub async fn refuse_declared_too_large(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > super::MAX_BODY_BYTES as u64) {
        let shape =
            if request.uri().path().starts_with("/v1/messages") { ErrorShape::Anthropic } else { ErrorShape::OpenAi };
        return too_large().into_response_shaped(shape);
    }
    next.run(request).await
}

/// The body as a JSON value.
pub fn json_body(body: &[u8]) -> Result<Value, ProxyError> {
    serde_json::from_slice(body).map_err(|e| {
        ProxyError::invalid(format!("We could not parse the JSON body of your request: {e}"), "invalid_json", None)
    })
}

/// The provider connection that serves `model` for API `D`.
pub async fn route<D: Dialect>(state: &AppState, project: &Project, model: &str) -> Result<Provider, ProxyError> {
    let config = state.proxy_cache.config(&state.db, &state.master_key, &project.id).await?;
    route_in::<D>(&config, model).cloned()
}

/// The connection of `config` that serves `model` for API `D` (the first that does).
fn route_in<'c, D: Dialect>(config: &'c CallConfig, model: &str) -> Result<&'c Provider, ProxyError> {
    let mut serving = config.providers.iter().filter(|p| p.serves(model));
    let first = serving.next();
    if let Some(provider) = first.into_iter().chain(serving).find(|p| D::speaks(p.kind)) {
        return Ok(provider);
    }
    Err(match first {
        Some(p) => ProxyError::invalid(
            format!(
                "The model `{model}` is routed to a {} connection, which does not speak this API: call it through {}.",
                p.kind.as_str(),
                D::OTHER_ENDPOINT
            ),
            "wrong_endpoint",
            Some("model"),
        ),
        None if config.credential_unreadable(model) => ProxyError::invalid(
            format!(
                "The provider connection serving the model `{model}` has a credential Tollgate cannot decrypt for it: enter its API key again."
            ),
            "provider_credential_unreadable",
            Some("model"),
        ),
        None => ProxyError::invalid(
            format!("No provider connection of this project serves the model `{model}`."),
            "model_not_routed",
            Some("model"),
        ),
    })
}

/// A request to `path` under `provider`'s base URL, with the provider's credential (and, for
/// Anthropic, the API version and betas the client asked for). Refused when the base URL
/// breaks the rules or names an address the egress policy refuses (a host name is checked
/// again when it is resolved: see [`upstream_failed`]).
pub fn upstream_request(
    state: &AppState,
    provider: &Provider,
    path: &str,
    client_headers: &HeaderMap,
) -> Result<reqwest::RequestBuilder, ProxyError> {
    let url = egress::provider_endpoint(&provider.base_url, path)?;
    let request = state.egress.post(url).map_err(|refused| ProxyError::from(&refused))?;
    Ok(match provider.kind {
        ProviderKind::Anthropic => {
            let version = client_headers
                .get("anthropic-version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or(ANTHROPIC_VERSION)
                .to_owned();
            let mut request =
                request.header("x-api-key", provider.api_key.expose_secret()).header("anthropic-version", version);
            if let Some(beta) = client_headers.get("anthropic-beta").and_then(|v| v.to_str().ok()) {
                request = request.header("anthropic-beta", beta.to_owned());
            }
            request
        }
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => request.bearer_auth(provider.api_key.expose_secret()),
    })
}

/// The error for a request to a provider that failed: refused by the egress policy when its
/// host resolved only to refused addresses, else unreachable.
pub fn upstream_failed(e: &reqwest::Error) -> ProxyError {
    match Refused::find(e) {
        Some(refused) => refused.into(),
        None => ProxyError::UpstreamUnreachable(format!("The provider could not be reached: {e}")),
    }
}

/// An upstream answer passed to the client with its status and body; a redirect is an
/// error instead (never followed, and its body never shown).
/// (cut to [`MAX_UPSTREAM_BODY_BYTES`]: an error's body is never that long).
pub async fn passthrough(upstream: reqwest::Response) -> Result<Response, ProxyError> {
    if upstream.status().is_redirection() {
        return Err(ProxyError::UpstreamRedirect(upstream.status().as_u16()));
    }
    let status = StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    let body = match read_capped(upstream, MAX_UPSTREAM_BODY_BYTES).await {
        Ok(body) => body,
        Err(UpstreamBody::TooLarge) => return Err(upstream_too_large()),
        Err(UpstreamBody::Broken(_)) => Bytes::new(),
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Ok(response)
}

/// Why an upstream's answer could not be read.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Longer than the cap (declared so, or found so while reading).
    TooLarge,
    /// The connection broke off.
    Broken(reqwest::Error),
}

/// The whole body of `upstream`, up to `cap` bytes: one over it stops the reading (and drops
/// the connection), so an upstream cannot make the server hold more than `cap`.
pub async fn read_capped(upstream: reqwest::Response, cap: usize) -> Result<Bytes, UpstreamBody> {
    if upstream.content_length().is_some_and(|n| n > cap as u64) {
        return Err(UpstreamBody::TooLarge);
    }
    let mut body = Vec::new();
    let mut chunks = upstream.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(UpstreamBody::Broken)?;
        if body.len() + chunk.len() > cap {
            return Err(UpstreamBody::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

pub fn upstream_too_large() -> ProxyError {
    ProxyError::UpstreamTooLarge(format!(
        "The provider's answer is larger than {} MB: Tollgate does not read it.",
        MAX_UPSTREAM_BODY_BYTES / (1024 * 1024)
    ))
}

/// What stops a call before its upstream is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The call reached the operator's maximum duration.
    Deadline,
    /// The server is shutting down and the grace period is over.
    Shutdown,
}

impl Cut {
    fn reason(self) -> &'static str {
        match self {
            Cut::Deadline => "the call reached its maximum duration",
            Cut::Shutdown => "the server shut down",
        }
    }

    fn error(self, max: Duration) -> ProxyError {
        match self {
            Cut::Deadline => ProxyError::UpstreamTimeout(format!(
                "The provider did not finish within {} seconds, the longest a call may take here.",
                max.as_secs()
            )),
            Cut::Shutdown => ProxyError::ShuttingDown,
        }
    }
}

async fn run<D: Dialect>(
    state: AppState,
    request_id: RequestId,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ProxyError> {
    let started = Instant::now();
    let body = body_bytes(body)?;
    let caller = auth::authenticate(&state, &headers).await?;
    let project = caller.project;
    // Work on the body grows with it: a large one is parsed and counted on the offload pool.
    let size = body.len();
    let mut request = state.offload.run(size, move || json_body(&body)).await??;
    let shape = D::parse(&request)?;
    let token_issued_at = caller.token_issued_at;
    let external_id = match caller.token_customer {
        Some(customer) => token_customer_of_call(&headers, customer)?,
        None => customer_of_call(&project, &headers, D::user(&request))?,
    };
    let config = state.proxy_cache.config(&state.db, &state.master_key, &project.id).await?;
    let price = config.price(&shape.model).ok_or_else(|| {
        let how = if tollgate_core::pricing::shipped_price(&shape.model).is_some() {
            format!(
                "Tollgate's shipped price for it is in USD and this project bills in {}: set the project's USD \
                 exchange rate, or add a price override for it.",
                project.currency.to_ascii_uppercase()
            )
        } else {
            "Add a price override for it.".to_owned()
        };
        ProxyError::invalid(
            format!("The model `{}` has no price in this project, so Tollgate cannot meter it. {how}", shape.model),
            "model_not_priced",
            Some("model"),
        )
    })?;
    let provider = route_in::<D>(&config, &shape.model)?;
    let mut customer = state
        .proxy_cache
        .customer(&state.db, &state.ledger, &project, &external_id, token_issued_at)
        .await
        .map_err(|e| deleted_since_token(e, &external_id))?;
    let refusal = |customer: &CustomerId, reason: &str| {
        let record = UsageRecord {
            project_id: project.id.clone(),
            customer_id: Some(customer.clone()),
            request_id: request_id.0.clone(),
            endpoint: D::ENDPOINT.to_owned(),
            model: shape.model.clone(),
            status: CallStatus::Refused,
            reason: Some(reason.to_owned()),
            tokens: TokenUsage::default(),
            reserved: Nanos::ZERO,
            cost: Nanos::ZERO,
            billed: Nanos::ZERO,
            source: UsageSource::None,
            latency_ms: started.elapsed().as_millis() as i64,
            clamped: false,
        };
        state.ledger.settle(Settlement::new(None, record))
    };
    let blocked = || customer_blocked(&external_id);

    // Where the call goes, checked before anything is held (a host name is checked again when
    // it is resolved).
    let upstream = match upstream_request(&state, provider, D::UPSTREAM_PATH, &headers) {
        Ok(upstream) => upstream,
        Err(e) => {
            refusal(&customer.id, "destination refused").await?;
            return Err(e);
        }
    };

    // The admission rule: what Tollgate cannot bound is refused, or held at the project's ceiling.
    let ceiling = match D::unbounded(&request) {
        None => Nanos::ZERO,
        Some(unbounded) => match project.unbounded_call_ceiling() {
            Some(ceiling) => ceiling,
            None => {
                refusal(&customer.id, &unbounded.reason()).await?;
                return Err(unbounded.error());
            }
        },
    };

    // The worst case, as a function of the input tokens and the max output tokens.
    let worst_case_of = |input_tokens: i64, max_output: i64| {
        let input = estimate::with_margin(price.tokenizer, input_tokens, project.estimate_margin_bps);
        let input_cost = tokens_cost(input, price.worst_input_rate());
        let output_cost = tokens_cost(max_output.saturating_mul(shape.n), price.output);
        with_markup(input_cost.checked_add(output_cost).unwrap_or(Nanos(i64::MAX)), project.markup_bps).max(ceiling)
    };
    // Never more than the model can produce: a larger request is capped, and reserved capped.
    let requested_output = if shape.produces_output {
        let asked = shape.max_output.or(project.default_max_output_tokens).unwrap_or(price.max_output_tokens);
        asked.min(price.max_output_tokens).max(1)
    } else {
        0
    };
    let minimum_output =
        if shape.produces_output { project.min_output_tokens.max(D::least_output(&request)).max(1) } else { 0 };

    // A large input is bounded before it is counted: when even its least possible count
    // cannot fit what the customer could have, it is refused without counting it exactly.
    if size > PRECHECK_BYTES {
        let (tokenizer, model) = (price.tokenizer, shape.model.clone());
        let (back, least) = state
            .offload
            .run(size, move || {
                let least = D::input_tokens(Counter::at_least(tokenizer), &model, &request);
                (request, least)
            })
            .await?;
        request = back;
        // The output the call needs at least: all it asks for under `reject`, its minimum under `clamp`.
        let least_output = match project.policy() {
            BudgetPolicy::Reject => requested_output,
            BudgetPolicy::Clamp => requested_output.min(minimum_output),
        };
        let needed = worst_case_of(least, least_output);
        match ledger::most_available(&state.db, &customer.id).await? {
            Some(available) if available.blocked => {
                refusal(&customer.id, "customer blocked").await?;
                return Err(blocked());
            }
            Some(available) if needed > available.amount => {
                refusal(&customer.id, "insufficient budget").await?;
                return Err(ProxyError::InsufficientBudget {
                    remaining: available.amount.max(Nanos::ZERO),
                    needed,
                    currency: project.currency.clone(),
                });
            }
            _ => {}
        }
    }
    let (tokenizer, model) = (price.tokenizer, shape.model.clone());
    let (back, input_tokens) = state
        .offload
        .run(size, move || {
            let tokens = D::input_tokens(Counter::exact(tokenizer), &model, &request);
            (request, tokens)
        })
        .await?;
    request = back;
    let input_estimate = estimate::with_margin(price.tokenizer, input_tokens, project.estimate_margin_bps);
    let worst_case = |max_output: i64| worst_case_of(input_tokens, max_output);
    let mut max_output = requested_output;
    let expires = UnixMillis::now().plus_secs(RESERVATION_TTL_SECS);
    let mut reservation = None;
    for _ in 0..5 {
        let hold =
            Hold::new(customer.id.clone(), customer.period, worst_case(max_output), request_id.0.clone(), expires)
                .for_call(D::ENDPOINT, &shape.model);
        match state.ledger.reserve_leased(hold).await? {
            ReserveOutcome::Reserved { reservation: r, .. } => {
                reservation = Some(r);
                break;
            }
            ReserveOutcome::Blocked => {
                refusal(&customer.id, "customer blocked").await?;
                return Err(blocked());
            }
            ReserveOutcome::Unknown => {
                // Deleted (the next lookup creates it afresh) or its period changed: look again.
                state.proxy_cache.forget_customer(&project.id, &external_id);
                customer = state
                    .proxy_cache
                    .customer(&state.db, &state.ledger, &project, &external_id, token_issued_at)
                    .await
                    .map_err(|e| deleted_since_token(e, &external_id))?;
            }
            ReserveOutcome::Insufficient { remaining } => {
                let affordable = largest_affordable(requested_output, remaining, &worst_case);
                let refuse = project.policy() == BudgetPolicy::Reject
                    || !shape.produces_output
                    || affordable < minimum_output
                    || worst_case(0) > remaining;
                if refuse {
                    let needed = worst_case(if project.policy() == BudgetPolicy::Reject {
                        requested_output
                    } else {
                        minimum_output
                    });
                    refusal(&customer.id, "insufficient budget").await?;
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
        refusal(&customer.id, "insufficient budget").await?;
        return Err(ProxyError::InsufficientBudget {
            remaining: Nanos::ZERO,
            needed: worst_case(minimum_output),
            currency: project.currency.clone(),
        });
    };
    let clamped = max_output < requested_output;
    if shape.produces_output {
        // Name the reserved limit, and only it, so the provider cannot generate past it.
        D::limit_output(&mut request, max_output, provider.kind);
    }
    let client_wants_usage = if shape.stream { D::prepare_stream(&mut request) } else { true };

    let max_duration = state.config.limits.upstream_max_duration;
    let call = Call {
        state: state.clone(),
        project,
        customer: customer.id,
        price,
        endpoint: D::ENDPOINT,
        model: shape.model,
        request_id: request_id.0,
        reservation,
        input_estimate,
        started,
        deadline: tokio::time::Instant::from_std(started) + max_duration,
        max_output: max_output.saturating_mul(shape.n),
        budget: BudgetHeaders { max_output, clamped },
    };
    let payload = match state.offload.run(size, move || serde_json::to_vec(&request)).await {
        Ok(Ok(payload)) => payload,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "could not serialize a request for its upstream");
            call.release("internal error").await;
            return Err(ProxyError::Internal);
        }
        Err(e) => {
            call.release("internal error").await;
            return Err(e);
        }
    };
    let sending = upstream.header(header::CONTENT_TYPE, "application/json").body(payload).send();
    let upstream = tokio::select! {
        sent = sending => sent,
        cut = call.cut() => {
            call.release(cut.reason()).await;
            return Err(cut.error(max_duration));
        }
    };
    let upstream = match upstream {
        Ok(r) => r,
        Err(e) => {
            let error = upstream_failed(&e);
            let reason = match error {
                ProxyError::DestinationRefused { .. } => "destination refused",
                _ => "upstream unreachable",
            };
            tracing::warn!(error = %e, provider = %provider.id, "{reason}");
            call.release(reason).await;
            return Err(error);
        }
    };
    if !upstream.status().is_success() {
        let reason = format!("upstream answered {}", upstream.status().as_u16());
        let response = tokio::select! {
            response = passthrough(upstream) => response,
            cut = call.cut() => {
                call.release(cut.reason()).await;
                return Err(cut.error(max_duration));
            }
        };
        call.release(&reason).await;
        return response;
    }
    if shape.stream {
        Ok(stream_response::<D>(call, upstream, client_wants_usage))
    } else {
        json_response::<D>(call, upstream).await
    }
}

/// The customer a call is charged to: the header, else (if enabled) the request's user
/// field, else the project's default customer.
fn customer_of_call(project: &Project, headers: &HeaderMap, user: Option<&str>) -> Result<String, ProxyError> {
    if let Some(value) = headers.get(CUSTOMER_HEADER) {
        // UTF-8 is accepted (ids like `José`), not only the visible ASCII of `to_str`.
        let id = std::str::from_utf8(value.as_bytes()).map_err(|_| {
            ProxyError::invalid("The X-Tollgate-Customer header must be UTF-8 text.", "invalid_customer", None)
        })?;
        return Ok(id.to_owned());
    }
    if project.customer_from_user
        && let Some(user) = user.filter(|u| !u.trim().is_empty())
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

/// The customer of a call made with a publishable key: the one its token names. A customer
/// header naming anyone else is refused, so a client cannot spend another customer's budget.
fn token_customer_of_call(headers: &HeaderMap, customer: String) -> Result<String, ProxyError> {
    if let Some(value) = headers.get(CUSTOMER_HEADER)
        && value.as_bytes() != customer.as_bytes()
    {
        return Err(ProxyError::Forbidden {
            message: "The customer token names another customer than the X-Tollgate-Customer header.".to_owned(),
            code: "customer_mismatch",
        });
    }
    Ok(customer)
}

/// A customer that could not be found or created: with a customer token, it was deleted
/// after the token was issued, and the token does not bring it back.
fn deleted_since_token(error: ProjectError, external_id: &str) -> ProxyError {
    match error {
        ProjectError::NotFound("customer") => ProxyError::Forbidden {
            message: format!(
                "The customer `{external_id}` was deleted after this customer token was issued; a token minted once the customer exists again will work."
            ),
            code: "customer_deleted",
        },
        other => other.into(),
    }
}

fn customer_blocked(external_id: &str) -> ProxyError {
    ProxyError::Forbidden {
        message: format!("The customer `{external_id}` is blocked in this project."),
        code: "customer_blocked",
    }
}

/// Refuses a call that reserves nothing (token counting) for a blocked customer, as a metered
/// call would be refused. A call that names no customer, or one not yet known, goes on (and
/// creates nothing).
pub async fn refuse_blocked_customer(
    state: &AppState,
    caller: &auth::Caller,
    headers: &HeaderMap,
    user: Option<&str>,
) -> Result<(), ProxyError> {
    let external_id = match &caller.token_customer {
        Some(customer) => token_customer_of_call(headers, customer.clone())?,
        None => match customer_of_call(&caller.project, headers, user) {
            Ok(id) => id,
            Err(_) => return Ok(()),
        },
    };
    let Ok(id) = projects::validate_external_id(&external_id) else { return Ok(()) };
    match projects::find_customer(&state.db, &caller.project.id, id).await? {
        Some(customer) if customer.blocked => Err(customer_blocked(&external_id)),
        _ => Ok(()),
    }
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

#[derive(Debug, Clone, Copy)]
struct BudgetHeaders {
    max_output: i64,
    clamped: bool,
}

/// Everything known about a call once it is admitted.
struct Call {
    state: AppState,
    project: Project,
    customer: CustomerId,
    price: Price,
    endpoint: &'static str,
    model: String,
    request_id: String,
    reservation: Reservation,
    input_estimate: i64,
    started: Instant,
    /// When the call is cut, however far it got (the operator's maximum duration).
    deadline: tokio::time::Instant,
    /// The output reserved for: the max output × `n`.
    max_output: i64,
    budget: BudgetHeaders,
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
            customer_id: Some(self.customer.clone()),
            request_id: self.request_id.clone(),
            endpoint: self.endpoint.to_owned(),
            model: self.model.clone(),
            status,
            reason,
            tokens,
            reserved: self.reservation.amount,
            cost,
            billed: with_markup(cost, self.project.markup_bps),
            source,
            latency_ms: self.started.elapsed().as_millis() as i64,
            clamped: self.budget.clamped,
        }
    }

    /// Tokens counted by Tollgate when the provider reported no final usage: the provider's
    /// input counts if it gave them, else the estimate; the output as delivered.
    async fn counted(&self, input: Option<TokenUsage>, delivered: String) -> TokenUsage {
        let (tokenizer, bytes) = (self.price.tokenizer, delivered.len() as i64);
        let output =
            match self.state.offload.run(delivered.len(), move || estimate::count_text(tokenizer, &delivered)).await {
                Ok(tokens) => tokens,
                // Its bytes: never fewer than its tokens.
                Err(_) => bytes,
            };
        let input = input.unwrap_or(TokenUsage { input: self.input_estimate, ..TokenUsage::default() });
        TokenUsage { output: output.max(input.output), ..input }
    }

    /// Resolves when the call must stop waiting for its upstream: at its deadline, or when
    /// shutdown cuts the calls still in flight.
    async fn cut(&self) -> Cut {
        tokio::select! {
            () = tokio::time::sleep_until(self.deadline) => Cut::Deadline,
            () = self.state.in_flight.cut_signal() => Cut::Shutdown,
        }
    }

    /// Settles on a task of its own (it must finish even if the client is gone) and waits for
    /// it to commit. Returns what was billed and what the customer has left, or the error that
    /// kept it from being metered (the reservation then expires).
    async fn finish(self, record: UsageRecord) -> Result<(Nanos, Option<Nanos>), ProxyError> {
        let billed = record.billed;
        let ledger = self.state.ledger.clone();
        let settlement = Settlement::new(Some(self.reservation), record);
        let settled = tokio::spawn(async move { ledger.settle(settlement).await }).await;
        match settled {
            Ok(Ok(remaining)) => Ok((billed, remaining)),
            Ok(Err(e)) => {
                tracing::error!(error = %e, request_id = %self.request_id, "settlement failed; the reservation expires instead");
                Err(ProxyError::Internal)
            }
            Err(e) => {
                tracing::error!(error = %e, request_id = %self.request_id, "settlement task failed");
                Err(ProxyError::Internal)
            }
        }
    }

    async fn release(self, reason: &str) {
        let record = self.record(CallStatus::Failed, Some(reason.to_owned()), TokenUsage::default(), UsageSource::None);
        let _ = self.finish(record).await;
    }
}

fn money_header(n: Nanos) -> Option<HeaderValue> {
    HeaderValue::from_str(&n.to_string()).ok()
}

fn insert_budget_headers(
    headers: &mut HeaderMap,
    billed: Option<Nanos>,
    remaining: Option<Nanos>,
    budget: BudgetHeaders,
) {
    if let Some(v) = billed.and_then(money_header) {
        headers.insert("x-tollgate-cost", v);
    }
    if let Some(v) = remaining.and_then(money_header) {
        headers.insert("x-tollgate-remaining", v);
    }
    if budget.clamped
        && let Ok(v) = HeaderValue::from_str(&budget.max_output.to_string())
    {
        headers.insert("x-tollgate-max-output-clamped", v);
    }
}

async fn json_response<D: Dialect>(call: Call, upstream: reqwest::Response) -> Result<Response, ProxyError> {
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    let read = tokio::select! {
        read = read_capped(upstream, MAX_UPSTREAM_BODY_BYTES) => read,
        cut = call.cut() => {
            let error = cut.error(call.state.config.limits.upstream_max_duration);
            call.release(cut.reason()).await;
            return Err(error);
        }
    };
    let body = match read {
        Ok(b) => b,
        Err(UpstreamBody::TooLarge) => {
            tracing::warn!(request_id = %call.request_id, "upstream answer over the size limit: released");
            call.release("upstream answer too large").await;
            return Err(upstream_too_large());
        }
        Err(UpstreamBody::Broken(e)) => {
            tracing::warn!(error = %e, "upstream body failed");
            call.release("upstream body failed").await;
            return Err(ProxyError::UpstreamUnreachable(format!("The provider's answer broke off: {e}")));
        }
    };
    let answer = body.clone();
    let parsed = call.state.offload.run(body.len(), move || serde_json::from_slice::<Value>(&answer).ok()).await;
    let parsed = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            call.release("internal error").await;
            return Err(e);
        }
    };
    let (tokens, source) = match parsed.as_ref().and_then(D::usage) {
        Some(t) => (t, UsageSource::Provider),
        None => {
            let delivered = parsed.as_ref().map(D::delivered).unwrap_or_default();
            (call.counted(None, delivered).await, UsageSource::Counted)
        }
    };
    let budget = call.budget;
    let record = call.record(CallStatus::Settled, None, tokens, source);
    // Fail closed: an answer whose cost the ledger could not record is not handed out.
    let (billed, remaining) = call.finish(record).await?;
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    if let Some(ct) = content_type {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    insert_budget_headers(headers, Some(billed), remaining, budget);
    Ok(response)
}

/// Streams the upstream's SSE to the client while watching it for usage; settles when the
/// upstream ends, fails or is cut, or the client goes away (then the upstream is dropped,
/// which stops generation, and the call is settled for what was generated).
fn stream_response<D: Dialect>(call: Call, upstream: reqwest::Response, client_wants_usage: bool) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    let reserved = call.reservation.amount;
    let budget = call.budget;
    let in_flight = call.state.in_flight.clone();
    in_flight.spawn(pump::<D>(call, upstream, tx, client_wants_usage).in_current_span());
    let body =
        Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(v) = money_header(reserved) {
        headers.insert("x-tollgate-reserved", v);
    }
    insert_budget_headers(headers, None, None, budget);
    response
}

/// How a stream ended, when it did not simply end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    ClientGone,
    Broken,
    Stalled,
    EventTooLarge,
    /// What it delivered counts past its max output and the margin.
    PastMaxOutput,
    Cut(Cut),
}

impl StreamEnd {
    fn reason(self) -> &'static str {
        match self {
            StreamEnd::ClientGone => "client disconnected",
            StreamEnd::Broken => "upstream stream broke",
            StreamEnd::Stalled => "upstream stream stalled",
            StreamEnd::EventTooLarge => "upstream event too large",
            StreamEnd::PastMaxOutput => "the stream passed its max output",
            StreamEnd::Cut(cut) => cut.reason(),
        }
    }
}

/// The most a stream may deliver, counted as [`output_meter`] counts, before it is cut.
fn output_limit(max_output: i64, margin_percent: u32) -> i64 {
    let margin = max_output.saturating_mul(i64::from(margin_percent)) / 100;
    max_output.saturating_add(margin).saturating_add(STREAM_OUTPUT_SLACK)
}

/// The tokenizer a stream's delivered text is metered with for the cut: the model's, or for
/// a model without one, o200k_base (as efficient as any current vocabulary on common text,
/// so it does not count more tokens than the model produced, beyond what the margin covers).
fn output_meter(tokenizer: Tokenizer) -> Tokenizer {
    match tokenizer {
        Tokenizer::Approximate => Tokenizer::O200kBase,
        exact => exact,
    }
}

/// Delivered text is metered in pieces of at least this many bytes.
const METER_PIECE: usize = 256;

/// Where the next piece of `delivered` to meter ends (it starts at `from`), once there is
/// enough of it: before its last space, where a byte-pair tokenizer's pieces start (`" word"`),
/// so that pieces count about what the whole text counts, and each byte is counted once.
/// Text without spaces is cut anywhere once it is four pieces long (one token more, at most).
fn metered_up_to(delivered: &str, from: usize) -> Option<usize> {
    let pending = delivered.get(from..)?;
    if pending.len() < METER_PIECE {
        return None;
    }
    match pending.rfind(' ') {
        Some(space) if space > 0 => Some(from + space),
        _ if pending.len() >= 4 * METER_PIECE => Some(delivered.len()),
        _ => None,
    }
}

/// The pump of one stream: reads the upstream's events (each byte framed once, one event at
/// most [`sse::MAX_EVENT_BYTES`]), watches them, forwards them, and stops at the first of:
/// the upstream's end or failure, the client gone (noticed at once, not at the next event),
/// the stream past its max output, or a cut (its maximum duration, or shutdown). Then
/// settles the call for what it delivered.
async fn pump<D: Dialect>(
    call: Call,
    upstream: reqwest::Response,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    client_wants_usage: bool,
) {
    let mut upstream = upstream.bytes_stream();
    let mut framer = sse::Framer::new(sse::MAX_EVENT_BYTES);
    let mut watch = StreamWatch::default();
    let meter = output_meter(call.price.tokenizer);
    let limit = output_limit(call.max_output, call.state.config.limits.stream_output_margin_percent);
    // Tokens of the first `metered` bytes of the delivered text.
    let (mut delivered_tokens, mut metered) = (0i64, 0usize);
    let mut end: Option<StreamEnd> = None;
    let mut renewed = Instant::now();
    'pump: loop {
        let next = tokio::select! {
            biased;
            () = tx.closed() => {
                end = Some(StreamEnd::ClientGone);
                break;
            }
            cut = call.cut() => {
                end = Some(StreamEnd::Cut(cut));
                break;
            }
            next = tokio::time::timeout(STREAM_IDLE_TIMEOUT, upstream.next()) => next,
        };
        let chunk = match next {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, request_id = %call.request_id, "upstream stream broke");
                end = Some(StreamEnd::Broken);
                break;
            }
            Err(_) => {
                end = Some(StreamEnd::Stalled);
                break;
            }
        };
        framer.push(&chunk);
        loop {
            let (raw, text_len) = match framer.next_event() {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(sse::EventTooLarge) => {
                    end = Some(StreamEnd::EventTooLarge);
                    break 'pump;
                }
            };
            let event = sse::Event::parse(&raw[..text_len]);
            let data = if event.data.len() > INLINE_BYTES {
                let text = event.data.clone();
                call.state
                    .offload
                    .run(text.len(), move || serde_json::from_str::<Value>(&text).ok())
                    .await
                    .ok()
                    .flatten()
            } else {
                serde_json::from_str::<Value>(&event.data).ok()
            };
            let forward = D::watch(&event, data.as_ref(), &mut watch, client_wants_usage);
            if let Some(upto) = metered_up_to(&watch.delivered, metered) {
                let text = watch.delivered[metered..upto].to_owned();
                metered = upto;
                let bytes = text.len() as i64;
                let counted = call.state.offload.run(text.len(), move || estimate::count_text(meter, &text)).await;
                delivered_tokens = delivered_tokens.saturating_add(counted.unwrap_or(bytes));
                if delivered_tokens > limit {
                    end = Some(StreamEnd::PastMaxOutput);
                    break 'pump;
                }
            }
            if forward {
                tokio::select! {
                    sent = tx.send(Ok(raw)) => if sent.is_err() {
                        end = Some(StreamEnd::ClientGone);
                        break 'pump;
                    },
                    cut = call.cut() => {
                        end = Some(StreamEnd::Cut(cut));
                        break 'pump;
                    }
                }
            }
        }
        if renewed.elapsed() >= RENEW_EVERY {
            renewed = Instant::now();
            let expires = UnixMillis::now().plus_secs(RESERVATION_TTL_SECS);
            if let Err(e) = ledger::renew(&call.state.db, &call.reservation, expires).await {
                tracing::warn!(error = %e, request_id = %call.request_id, "could not renew a stream's reservation");
            }
        }
    }
    if end.is_none() {
        let rest = framer.rest();
        if !rest.is_empty() {
            let _ = tx.send(Ok(rest)).await;
        }
    }
    // The client's stream ends now, and the upstream's connection is closed (which stops
    // generation), before the call is settled.
    drop(tx);
    drop(upstream);
    let (mut tokens, source) = match watch.usage.take() {
        Some(t) => (t, UsageSource::Provider),
        None => (call.counted(watch.input.take(), std::mem::take(&mut watch.delivered)).await, UsageSource::Counted),
    };
    if end == Some(StreamEnd::PastMaxOutput) {
        // The upstream ignored the limit it was sent: the customer pays what was reserved, not more.
        tokens.output = tokens.output.min(call.max_output);
        tokens.reasoning = tokens.reasoning.min(tokens.output);
    }
    if let Some(end) = end {
        tracing::info!(request_id = %call.request_id, reason = end.reason(), "stream ended early");
    }
    let record = call.record(CallStatus::Settled, end.map(|e| e.reason().to_owned()), tokens, source);
    // The stream is delivered already; a failure is logged (and the reservation expires).
    let _ = call.finish(record).await;
}
