//! `/api/v1/customers`: a tenant's backend sets its customers' budgets.
//!
//! A customer is addressed by the tenant's own id (`id` in bodies, the path segment in URLs).
//! Amounts are decimal strings in the project's currency (`"10.00"`), also given in nano-units
//! (`budget_nanos`) on the way out.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tollgate_core::customers::{self, CustomerInput, CustomerRow, DeleteError};
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::projects::{Project, validate_external_id};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type};
use utoipa::{IntoParams, ToSchema};

use super::error::{
    ApiError, CustomerNotFound, FieldError, IdempotencyInProgress, Problem, RateLimited, Unauthorized,
    UnsupportedMediaType, json_body, path_param, query_params,
};
use super::idempotency::IdempotencyKey;
use crate::state::AppState;

const TAG: &str = "Customers";

fn budget_detail(c: &CustomerRow, project: &Project) -> String {
    format!("budget {} {} per {} (API)", Nanos(c.budget_nanos), project.currency, c.budget_period)
}

/// How a budget renews: each calendar `month` or `day` (UTC), every 30 days from when it was
/// set (`rolling`), or never (`lifetime`).
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code, reason = "describes the `period` strings; never built")]
pub enum Period {
    Month,
    Day,
    Rolling,
    Lifetime,
}

/// A customer, with what it has spent and may still spend in its current period.
#[derive(Debug, Serialize, ToSchema)]
pub struct Customer {
    /// Your id for the customer.
    #[schema(example = "customer-42")]
    pub id: String,
    /// The customer's name, if you gave one.
    pub name: Option<String>,
    /// The customer's email address, if you gave one.
    pub email: Option<String>,
    /// The budget of each period, in the project's currency.
    #[schema(example = "10.00")]
    pub budget: String,
    /// `budget` in nano-units (10⁻⁹ of the currency).
    #[schema(example = 10_000_000_000i64)]
    pub budget_nanos: i64,
    /// How the budget renews.
    #[schema(value_type = Period)]
    pub period: String,
    /// When the current period started (Unix milliseconds).
    pub period_start: i64,
    /// When the current period ends (Unix milliseconds).
    pub period_end: i64,
    /// Settled spend of the current period.
    #[schema(example = "1.25")]
    pub spent: String,
    /// `spent` in nano-units.
    pub spent_nanos: i64,
    /// Held by calls in flight until they settle (nano-units).
    pub reserved_nanos: i64,
    /// What the customer may still spend this period: budget less spent and reserved, never
    /// below zero.
    #[schema(example = "8.75")]
    pub remaining: String,
    /// `remaining` in nano-units.
    pub remaining_nanos: i64,
    /// The project's currency (ISO 4217, lowercase).
    #[schema(example = "usd")]
    pub currency: String,
    /// A blocked customer's calls are refused by the proxy.
    pub blocked: bool,
    /// When the customer was created (Unix milliseconds).
    pub created_at: i64,
}

impl Customer {
    fn new(c: &CustomerRow, project: &Project) -> Self {
        Customer {
            id: c.external_id.clone(),
            name: c.name.clone(),
            email: c.email.clone(),
            budget: Nanos(c.budget_nanos).to_string(),
            budget_nanos: c.budget_nanos,
            period: c.budget_period.clone(),
            period_start: c.period_start,
            period_end: c.period_end,
            spent: Nanos(c.spent_nanos).to_string(),
            spent_nanos: c.spent_nanos,
            reserved_nanos: c.reserved_nanos,
            remaining: c.remaining().to_string(),
            remaining_nanos: c.remaining().0,
            currency: project.currency.clone(),
            blocked: c.blocked,
            created_at: c.created_at,
        }
    }
}

/// One page of customers in id order.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerPage {
    pub data: Vec<Customer>,
    /// The `cursor` of the next page; null on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// The schema of an amount in a request: a decimal string, or a whole number.
fn amount_schema() -> Schema {
    let one_of = OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("A decimal amount with up to 9 decimals, such as \"10.00\""))
                .examples(["10.00"]),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .description(Some("A whole amount")),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null).description(Some("The same as leaving `budget` out")))
        .description(Some("The budget of each period, in the project's currency; not negative"))
        .build();
    Schema::OneOf(one_of)
}

/// A customer to create, or to update if `id` exists: fields left out keep their value on
/// update. `budget` is required on creation; `period` is `month` unless given.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCustomer {
    /// Your id for the customer: 1 to 200 printable characters.
    #[schema(value_type = String, required = true, min_length = 1, max_length = 200, example = "customer-42")]
    id: Option<String>,
    /// At most 200 printable characters.
    #[schema(max_length = 200, example = "Grace Hopper")]
    name: Option<String>,
    /// An email address (an `@` and no spaces), at most 254 bytes.
    #[schema(max_length = 254, pattern = r"^\S*@\S*$", example = "grace@example.com")]
    email: Option<String>,
    #[schema(schema_with = amount_schema)]
    budget: Option<Value>,
    /// How the budget renews: `month` for a new customer unless given; a change starts a new
    /// period.
    #[schema(value_type = Option<Period>)]
    period: Option<String>,
}

/// The fields of a customer to change; those left out keep their value.
#[derive(Debug, Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerChanges {
    /// If given, the id in the path: a customer's id cannot change.
    #[schema(max_length = 200)]
    id: Option<String>,
    /// At most 200 printable characters.
    #[schema(max_length = 200)]
    name: Option<String>,
    /// An email address (an `@` and no spaces), at most 254 bytes.
    #[schema(max_length = 254, pattern = r"^\S*@\S*$")]
    email: Option<String>,
    #[schema(schema_with = amount_schema)]
    budget: Option<Value>,
    /// How the budget renews; a change starts a new period.
    #[schema(value_type = Option<Period>)]
    period: Option<String>,
}

impl From<NewCustomer> for CustomerChanges {
    fn from(b: NewCustomer) -> Self {
        CustomerChanges { id: b.id, name: b.name, email: b.email, budget: b.budget, period: b.period }
    }
}

fn parse_budget(value: &Value) -> Result<Nanos, FieldError> {
    let bad = || FieldError {
        field: "budget".into(),
        message: "must be a decimal amount as a string, such as \"10.00\"".into(),
    };
    match value {
        Value::String(text) => text.trim().parse::<Nanos>().map_err(|_| bad()),
        Value::Number(n) if n.is_i64() => n.to_string().parse::<Nanos>().map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// The input this body asks for, over `current` when updating.
fn input(body: CustomerChanges, external_id: String, current: Option<&CustomerRow>) -> Result<CustomerInput, ApiError> {
    let mut errors = Vec::new();
    let budget = match (&body.budget, current) {
        (Some(value), _) => parse_budget(value).map_err(|e| errors.push(e)).ok(),
        (None, Some(c)) => Some(Nanos(c.budget_nanos)),
        (None, None) => {
            errors.push(FieldError { field: "budget".into(), message: "is required".into() });
            None
        }
    };
    let period = match (&body.period, current) {
        (Some(text), _) => BudgetPeriod::parse(text).or_else(|| {
            errors
                .push(FieldError { field: "period".into(), message: "must be month, day, rolling or lifetime".into() });
            None
        }),
        (None, Some(c)) => BudgetPeriod::parse(&c.budget_period),
        (None, None) => Some(BudgetPeriod::Month),
    };
    let keep = |new: Option<String>, old: Option<&Option<String>>| new.or_else(|| old.cloned().flatten());
    let input = CustomerInput {
        external_id,
        name: keep(body.name, current.map(|c| &c.name)),
        email: keep(body.email, current.map(|c| &c.email)),
        budget: budget.unwrap_or(Nanos::ZERO),
        period: period.unwrap_or(BudgetPeriod::Month),
    };
    for problem in input.problems() {
        if let tollgate_core::projects::ProjectError::Invalid { field, reason } = problem {
            let field = if field == "customer" { "id" } else { field };
            errors.push(FieldError { field: field.into(), message: reason });
        }
    }
    // PostgreSQL cannot store a NUL in text: refused here rather than failing in the database.
    if input.email.as_deref().is_some_and(|e| e.chars().any(char::is_control))
        && !errors.iter().any(|e| e.field == "email")
    {
        errors.push(FieldError { field: "email".into(), message: "is not an email address".into() });
    }
    if errors.is_empty() {
        Ok(input)
    } else {
        let detail = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
        Err(ApiError::Invalid { detail, errors })
    }
}

/// Create or update a customer
///
/// Creates the customer `id` (201), or updates it if it exists (200). On update, fields left
/// out keep their value; a change of `period` starts a new period.
#[utoipa::path(
    post,
    path = "/api/v1/customers",
    operation_id = "upsert_customer",
    tag = TAG,
    params(IdempotencyKey),
    request_body = NewCustomer,
    responses(
        (status = 200, description = "The customer existed and is updated", body = Customer,
            headers(("Idempotent-Replayed" = String, description = "`true` on the stored answer to a retry"))),
        (status = 201, description = "The customer is created", body = Customer,
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
pub async fn upsert(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let mut body = CustomerChanges::from(json_body::<NewCustomer>(body)?);
    let external_id = body.id.take().ok_or_else(|| ApiError::field("id", "is required"))?;
    let existing = match validate_external_id(&external_id) {
        Ok(id) => customers::find(&state.db, &project.id, id).await?,
        Err(_) => None,
    };
    let input = input(body, external_id, existing.as_ref())?;
    let saved = customers::save(&state.db, &project.id, &input).await?;
    state.proxy_cache.forget_customer(&project.id, &saved.external_id);
    state.ledger.forget_lease(&saved.id);
    super::audit(&state, &project, &actor, "customer.saved", &saved.external_id, &budget_detail(&saved, &project))
        .await?;
    let status = if existing.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(Customer::new(&saved, &project))).into_response())
}

/// The customer `external_id` of `project`. An id no customer can have is not looked up.
pub(super) async fn found(state: &AppState, project: &Project, external_id: &str) -> Result<CustomerRow, ApiError> {
    let missing = || ApiError::NotFound(format!("No customer `{external_id}` in this project."));
    if validate_external_id(external_id).is_err() {
        return Err(missing());
    }
    customers::find(&state.db, &project.id, external_id).await?.ok_or_else(missing)
}

/// Get a customer
#[utoipa::path(
    get,
    path = "/api/v1/customers/{id}",
    operation_id = "get_customer",
    tag = TAG,
    params(("id" = String, Path, description = "Your id for the customer", example = "customer-42")),
    responses(
        (status = 200, description = "The customer", body = Customer),
        (status = 401, response = Unauthorized),
        (status = 404, response = CustomerNotFound),
        (status = 429, response = RateLimited),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Customer>, ApiError> {
    let project = super::project(&state, &headers).await?;
    let external_id = path_param(path)?;
    let customer = found(&state, &project, &external_id).await?;
    Ok(Json(Customer::new(&customer, &project)))
}

/// Change a customer
///
/// Changes the fields given; the others keep their value. A change of `period` starts a new
/// period.
#[utoipa::path(
    patch,
    path = "/api/v1/customers/{id}",
    operation_id = "update_customer",
    tag = TAG,
    params(("id" = String, Path, description = "Your id for the customer", example = "customer-42")),
    request_body = CustomerChanges,
    responses(
        (status = 200, description = "The customer as changed", body = Customer),
        (status = 401, response = Unauthorized),
        (status = 404, response = CustomerNotFound),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "The body is not valid (`errors` names the fields)", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Customer>, ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let external_id = path_param(path)?;
    let body: CustomerChanges = json_body(body)?;
    if body.id.as_deref().is_some_and(|id| id != external_id) {
        return Err(ApiError::field("id", "cannot be changed"));
    }
    let current = found(&state, &project, &external_id).await?;
    let input = input(body, external_id, Some(&current))?;
    let saved = customers::save(&state.db, &project.id, &input).await?;
    state.proxy_cache.forget_customer(&project.id, &saved.external_id);
    state.ledger.forget_lease(&saved.id);
    super::audit(&state, &project, &actor, "customer.saved", &saved.external_id, &budget_detail(&saved, &project))
        .await?;
    Ok(Json(Customer::new(&saved, &project)))
}

#[derive(Debug, Deserialize, Default, IntoParams)]
#[serde(default)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Customers per page, 1 to 500 (50 unless given).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page; left out for the first page.
    cursor: Option<String>,
}

/// List customers
///
/// A page of the project's customers in id order, and the cursor of the next page (null on the
/// last). Pages stay consistent while customers are added.
#[utoipa::path(
    get,
    path = "/api/v1/customers",
    operation_id = "list_customers",
    tag = TAG,
    params(ListQuery),
    responses(
        (status = 200, description = "A page of customers", body = CustomerPage),
        (status = 401, response = Unauthorized),
        (status = 422, description = "`limit` or `cursor` is not valid", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<CustomerPage>, ApiError> {
    let project = super::project(&state, &headers).await?;
    let query = query_params(query)?;
    let limit = match query.limit.as_deref() {
        None => 50,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=500).contains(l))
            .ok_or_else(|| ApiError::field("limit", "must be a whole number from 1 to 500"))?,
    };
    let after = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(cursor) => Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(cursor)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .filter(|after| validate_external_id(after).is_ok())
                .ok_or_else(|| ApiError::field("cursor", "is not a cursor this API gave out"))?,
        ),
    };
    let mut rows = customers::list_after(&state.db, &project.id, after.as_deref(), limit + 1).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.external_id.as_bytes())))
        .flatten();
    let data = rows.iter().map(|c| Customer::new(c, &project)).collect();
    Ok(Json(CustomerPage { data, next_cursor }))
}

async fn set_blocked(
    state: AppState,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    blocked: bool,
) -> Result<Json<Customer>, ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let external_id = path_param(path)?;
    let customer = found(&state, &project, &external_id).await?;
    customers::set_blocked(&state.db, &project.id, &customer.id, blocked).await?;
    state.ledger.forget_lease(&customer.id);
    let action = if blocked { "customer.blocked" } else { "customer.unblocked" };
    super::audit(&state, &project, &actor, action, &external_id, &project.name).await?;
    let customer = found(&state, &project, &external_id).await?;
    Ok(Json(Customer::new(&customer, &project)))
}

/// Block a customer
///
/// The proxy refuses the customer's calls until it is unblocked.
#[utoipa::path(
    post,
    path = "/api/v1/customers/{id}/block",
    operation_id = "block_customer",
    tag = TAG,
    params(("id" = String, Path, description = "Your id for the customer", example = "customer-42"), IdempotencyKey),
    responses(
        (status = 200, description = "The customer, blocked", body = Customer,
            headers(("Idempotent-Replayed" = String, description = "`true` on the stored answer to a retry"))),
        (status = 401, response = Unauthorized),
        (status = 404, response = CustomerNotFound),
        (status = 409, response = IdempotencyInProgress),
        (status = 422, description = "The Idempotency-Key is malformed or was used for another request",
            body = Problem, content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
    )
)]
pub async fn block(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Customer>, ApiError> {
    set_blocked(state, headers, path, true).await
}

/// Unblock a customer
///
/// The proxy accepts the customer's calls again.
#[utoipa::path(
    post,
    path = "/api/v1/customers/{id}/unblock",
    operation_id = "unblock_customer",
    tag = TAG,
    params(("id" = String, Path, description = "Your id for the customer", example = "customer-42"), IdempotencyKey),
    responses(
        (status = 200, description = "The customer, not blocked", body = Customer,
            headers(("Idempotent-Replayed" = String, description = "`true` on the stored answer to a retry"))),
        (status = 401, response = Unauthorized),
        (status = 404, response = CustomerNotFound),
        (status = 409, response = IdempotencyInProgress),
        (status = 422, description = "The Idempotency-Key is malformed or was used for another request",
            body = Problem, content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
    )
)]
pub async fn unblock(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Customer>, ApiError> {
    set_blocked(state, headers, path, false).await
}

/// Delete a customer
///
/// Its usage stays in the ledger (without the customer), so billed totals do not change.
/// Refused while calls of the customer are in flight.
#[utoipa::path(
    delete,
    path = "/api/v1/customers/{id}",
    operation_id = "delete_customer",
    tag = TAG,
    params(("id" = String, Path, description = "Your id for the customer", example = "customer-42")),
    responses(
        (status = 204, description = "The customer is deleted"),
        (status = 401, response = Unauthorized),
        (status = 404, response = CustomerNotFound),
        (status = 409, description = "The customer has calls in flight; delete it once they have settled",
            body = Problem, content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let external_id = path_param(path)?;
    let missing = || ApiError::NotFound(format!("No customer `{external_id}` in this project."));
    if validate_external_id(&external_id).is_err() {
        return Err(missing());
    }
    match customers::delete(&state.db, &project.id, &external_id).await {
        Ok(()) => {
            // Its next call creates it afresh (other replicas: within the cache's TTL, or at
            // once when their reservation finds the row gone).
            state.proxy_cache.forget_customer(&project.id, &external_id);
            super::audit(&state, &project, &actor, "customer.deleted", &external_id, &project.name).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        Err(DeleteError::NotFound) => Err(missing()),
        Err(DeleteError::CallsInFlight) => {
            Err(ApiError::Conflict("The customer has calls in flight; delete it once they have settled.".into()))
        }
        Err(DeleteError::Db(e)) => Err(e.into()),
    }
}
