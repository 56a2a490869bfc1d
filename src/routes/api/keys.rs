//! `/api/v1/keys` and `/api/v1/project`: a tenant's backend creates, lists and revokes the
//! project's keys (a new key is shown once), and reads the project's settings.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tollgate_core::ids::KeyId;
use tollgate_core::money::Nanos;
use tollgate_core::projects::{self, KeyKind, KeySummary, Project};
use utoipa::ToSchema;

use super::customers::Period;
use super::error::{
    ApiError, IdempotencyInProgress, Problem, RateLimited, Unauthorized, UnsupportedMediaType, json_body, path_param,
};
use super::idempotency::IdempotencyKey;
use crate::state::AppState;

/// What a key may do: `secret` keys are for servers (the proxy and this API); `publishable`
/// keys may ship in browsers and apps, and each call made with one needs a customer token.
#[derive(ToSchema)]
#[schema(as = KeyKind, rename_all = "lowercase")]
#[allow(dead_code, reason = "describes the `kind` strings; never built")]
pub enum KeyKindName {
    Secret,
    Publishable,
}

/// A key of the project (its secret is shown only when it is created).
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKey {
    #[schema(value_type = String, example = "key_0190c2a4e3b87c3a9f1d2b3c4d5e6f70")]
    id: KeyId,
    name: String,
    #[schema(value_type = KeyKindName)]
    kind: String,
    /// The key's first characters, to recognise it by.
    #[schema(example = "tg_sk_4f2a")]
    prefix: String,
    /// Unix milliseconds.
    created_at: i64,
    /// Unix milliseconds; null if never used (updated at most once a minute).
    #[schema(required = true)]
    last_used_at: Option<i64>,
    /// Unix milliseconds; null while the key is live.
    #[schema(required = true)]
    revoked_at: Option<i64>,
}

impl From<KeySummary> for ApiKey {
    fn from(k: KeySummary) -> Self {
        ApiKey {
            id: k.id,
            name: k.name,
            kind: k.kind,
            prefix: k.prefix,
            created_at: k.created_at,
            last_used_at: k.last_used_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// A new key, with its secret: shown this once, as only its hash is stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewApiKey {
    #[serde(flatten)]
    summary: ApiKey,
    /// The key itself (`tg_sk_…` or `tg_pk_…`).
    #[schema(example = "tg_sk_4f2a…")]
    key: String,
}

/// The project's keys, live ones first, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    data: Vec<ApiKey>,
}

/// A key to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKeyRequest {
    /// Where the key is used, e.g. "web backend": at most 100 printable characters.
    #[schema(max_length = 100, example = "web backend")]
    name: Option<String>,
    /// `secret` unless given.
    #[schema(value_type = Option<KeyKindName>)]
    kind: Option<String>,
}

/// The key `id` of `project`, as listed.
async fn listed(state: &AppState, project: &Project, id: &KeyId) -> Result<ApiKey, ApiError> {
    let key = projects::list_keys(&state.db, &project.id).await?.into_iter().find(|k| &k.id == id);
    key.map(ApiKey::from).ok_or_else(|| {
        tracing::error!(key = %id, "a key just written is not in its project's list");
        ApiError::Internal
    })
}

/// Create a key
///
/// The answer carries the key itself, this once.
#[utoipa::path(
    post,
    path = "/api/v1/keys",
    operation_id = "create_key",
    tag = "Keys",
    params(IdempotencyKey),
    request_body = NewKeyRequest,
    responses(
        (status = 201, description = "The key, with its secret", body = NewApiKey,
            headers(("Idempotent-Replayed" = String, description = "`true` on the stored answer to a retry"))),
        (status = 401, response = Unauthorized),
        (status = 409, response = IdempotencyInProgress),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "The body is not valid (`errors` names the fields), or the \
            Idempotency-Key is malformed or was used for another request", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<NewApiKey>), ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let body: NewKeyRequest = json_body(body)?;
    let kind = match body.kind.as_deref() {
        None | Some("secret") => KeyKind::Secret,
        Some("publishable") => KeyKind::Publishable,
        Some(_) => return Err(ApiError::field("kind", "must be secret or publishable")),
    };
    let name = body.name.as_deref().unwrap_or("");
    if name.chars().any(char::is_control) {
        return Err(ApiError::field("name", "must be printable characters"));
    }
    let created = projects::create_key(&state.db, &project.id, kind, name).await?;
    super::audit(&state, &project, &actor, "key.created", &project.name, &format!("key {}… (API)", created.prefix))
        .await?;
    let summary = listed(&state, &project, &created.id).await?;
    Ok((StatusCode::CREATED, Json(NewApiKey { summary, key: created.plaintext })))
}

/// List keys
///
/// The project's keys, live ones first, newest first; revoked keys included.
#[utoipa::path(
    get,
    path = "/api/v1/keys",
    operation_id = "list_keys",
    tag = "Keys",
    responses(
        (status = 200, description = "The project's keys", body = KeyList),
        (status = 401, response = Unauthorized),
        (status = 429, response = RateLimited),
    )
)]
pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<KeyList>, ApiError> {
    let project = super::project(&state, &headers).await?;
    let keys = projects::list_keys(&state.db, &project.id).await?;
    Ok(Json(KeyList { data: keys.into_iter().map(ApiKey::from).collect() }))
}

/// Revoke a key
///
/// The key stops working at once on this replica, and within 2 seconds on the others.
#[utoipa::path(
    post,
    path = "/api/v1/keys/{id}/revoke",
    operation_id = "revoke_key",
    tag = "Keys",
    params(("id" = String, Path, description = "The key's id (`key_…`)", example = "key_0190c2a4e3b87c3a9f1d2b3c4d5e6f70"), IdempotencyKey),
    responses(
        (status = 200, description = "The key, revoked", body = ApiKey,
            headers(("Idempotent-Replayed" = String, description = "`true` on the stored answer to a retry"))),
        (status = 401, response = Unauthorized),
        (status = 404, description = "No live key with this id in the project", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, response = IdempotencyInProgress),
        (status = 422, description = "The Idempotency-Key is malformed or was used for another request",
            body = Problem, content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ApiKey>, ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let id = path_param(path)?;
    let missing = || ApiError::NotFound(format!("No live key `{id}` in this project."));
    let key = KeyId::parse(&id).ok_or_else(missing)?;
    if !projects::revoke_key(&state.db, &project.id, &key).await? {
        return Err(missing());
    }
    state.forget_project(&project.id);
    super::audit(&state, &project, &actor, "key.revoked", &project.name, &format!("{key} (API)")).await?;
    Ok(Json(listed(&state, &project, &key).await?))
}

/// How the proxy treats a call whose worst case does not fit the customer's budget: `clamp`
/// lowers its max output to what the budget pays for, `reject` refuses it (402).
#[derive(ToSchema)]
#[schema(as = BudgetPolicy, rename_all = "lowercase")]
#[allow(dead_code, reason = "describes the `budget_policy` strings; never built")]
pub enum BudgetPolicyName {
    Clamp,
    Reject,
}

/// The project's settings (changed in the dashboard).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectSettings {
    #[schema(value_type = String, example = "prj_0190c2a4e3b87c3a9f1d2b3c4d5e6f70")]
    id: tollgate_core::ids::ProjectId,
    name: String,
    /// ISO 4217, lowercase.
    #[schema(example = "usd")]
    currency: String,
    #[schema(value_type = BudgetPolicyName)]
    budget_policy: String,
    /// The least max output a clamped call may be lowered to; below it the call is refused.
    min_output_tokens: i64,
    /// The max output a call that names none is reserved for and forwarded with (capped at
    /// the model's limit); null: the model's limit.
    #[schema(required = true)]
    default_max_output_tokens: Option<i64>,
    /// The markup on provider prices, in basis points (1000 = 10 %).
    markup_bps: i64,
    /// The budget a customer gets when first seen.
    #[schema(example = "5.00")]
    default_budget: String,
    default_budget_nanos: i64,
    #[schema(value_type = Period)]
    default_budget_period: String,
    /// Whether a call may name its customer in OpenAI's `user` field (Anthropic:
    /// `metadata.user_id`).
    customer_from_user: bool,
    /// The customer of calls that name none; null if such calls are refused.
    #[schema(required = true)]
    default_customer: Option<String>,
    /// The safety margin on bounded (not counted) input tokens, in basis points.
    estimate_margin_bps: i64,
    /// Whether a call cut off by the death of the Tollgate process serving it is billed at
    /// what it had reserved (else it is recorded as interrupted and not billed).
    bill_interrupted: bool,
    /// What a call whose cost Tollgate cannot bound from the request (a document by URL, a
    /// file by id, a hosted tool, an unknown field) reserves; null if such calls are refused.
    #[schema(required = true, example = "0.50")]
    unbounded_call_ceiling: Option<String>,
    #[schema(required = true)]
    unbounded_call_ceiling_nanos: Option<i64>,
    /// How Stripe collects the invoices of subscriptions made from now on (set on the
    /// dashboard's billing page).
    #[schema(value_type = CollectionMethod)]
    collection_method: String,
    /// Days until a sent invoice is due; null when charging automatically.
    #[schema(required = true, example = 30)]
    days_until_due: Option<i64>,
}

/// `send_invoice`: Stripe emails each invoice with its hosted payment page, due after
/// `days_until_due` days. `charge_automatically`: Stripe charges the customer's saved payment
/// method (see the payment-method setup and customer portal links).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code, reason = "describes the `collection_method` strings; never built")]
pub enum CollectionMethod {
    SendInvoice,
    ChargeAutomatically,
}

/// Read the project's settings
#[utoipa::path(
    get,
    path = "/api/v1/project",
    operation_id = "get_project",
    tag = "Project",
    responses(
        (status = 200, description = "The settings of the key's project", body = ProjectSettings),
        (status = 401, response = Unauthorized),
        (status = 429, response = RateLimited),
    )
)]
pub async fn project(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<ProjectSettings>, ApiError> {
    let p = super::project(&state, &headers).await?;
    let collection = tollgate_core::payment_collection::collection(&state.db, &p.id).await?;
    Ok(Json(ProjectSettings {
        collection_method: collection.method().to_owned(),
        days_until_due: collection.days_until_due(),
        default_budget: Nanos(p.default_budget_nanos).to_string(),
        id: p.id,
        name: p.name,
        currency: p.currency,
        budget_policy: p.budget_policy,
        min_output_tokens: p.min_output_tokens,
        default_max_output_tokens: p.default_max_output_tokens,
        markup_bps: p.markup_bps,
        default_budget_nanos: p.default_budget_nanos,
        default_budget_period: p.default_budget_period,
        customer_from_user: p.customer_from_user,
        default_customer: p.default_customer,
        estimate_margin_bps: p.estimate_margin_bps,
        bill_interrupted: p.bill_interrupted,
        unbounded_call_ceiling: p.unbounded_call_ceiling_nanos.map(|c| Nanos(c).to_string()),
        unbounded_call_ceiling_nanos: p.unbounded_call_ceiling_nanos,
    }))
}
