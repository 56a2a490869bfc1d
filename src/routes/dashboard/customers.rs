//! A project's customers: a searchable, sortable, paged list with each one's spend as a bar
//! against its budget and its budget health (filterable: a shareable URL); creating and
//! editing (id, name, email, budget, period); blocking; and each customer's page with spend
//! against budget, a daily chart, spend by model and recent calls (refused and clamped ones
//! marked; searchable by request id).

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::Role;
use tollgate_core::audit;
use tollgate_core::customers::{self, CustomerInput, CustomerRow, ListFilter, Sort};
use tollgate_core::health::{self, Health, Limits};
use tollgate_core::ids::CustomerId;
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::projects::Project;
use tollgate_core::time::UnixMillis;
use tollgate_core::usage::{self, CallRow};

use super::error::{WebError, urlencode};
use super::format;
use super::projects::{load_project, problem_message, project_error};
use super::session::{CsrfForm, Member};
use crate::state::AppState;

const PAGE_SIZE: i64 = 50;

/// The create / edit form, as typed.
#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub struct CustomerForm {
    csrf: String,
    external_id: String,
    name: String,
    email: String,
    budget: String,
    period: String,
    #[serde(skip)]
    locked_id: bool,
}

impl CustomerForm {
    fn of(c: &CustomerRow) -> Self {
        Self {
            csrf: String::new(),
            external_id: c.external_id.clone(),
            name: c.name.clone().unwrap_or_default(),
            email: c.email.clone().unwrap_or_default(),
            budget: Nanos(c.budget_nanos).to_string(),
            period: c.budget_period.clone(),
            locked_id: true,
        }
    }

    fn new_for(project: &Project) -> Self {
        Self {
            budget: Nanos(project.default_budget_nanos).to_string(),
            period: project.default_budget_period.clone(),
            ..Self::default()
        }
    }

    fn input(&self) -> Result<CustomerInput, Vec<String>> {
        let budget = self.budget.trim().parse::<Nanos>().ok();
        let period = BudgetPeriod::parse(&self.period);
        let mut errors = Vec::new();
        if budget.is_none() {
            errors.push("Budget: must be an amount such as 10 or 2.50".to_owned());
        }
        if period.is_none() {
            errors.push("Period: choose month, day, rolling or lifetime".to_owned());
        }
        let (Some(budget), Some(period)) = (budget, period) else { return Err(errors) };
        let optional = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        let input = CustomerInput {
            external_id: self.external_id.clone(),
            name: optional(&self.name),
            email: optional(&self.email),
            budget,
            period,
        };
        let problems: Vec<String> = input.problems().into_iter().map(|e| problem_message(&e)).collect();
        if problems.is_empty() { Ok(input) } else { Err(problems) }
    }
}

pub struct ListRow {
    id: CustomerId,
    external_id: String,
    name: String,
    spent: format::Money,
    budget: format::Money,
    remaining: format::Money,
    period: String,
    bar: SpendBar,
}

/// A customer's spend against its budget, as a bar and a badge.
pub struct SpendBar {
    /// The share spent, in whole percent (may pass 100 when the budget was lowered).
    pub percent: i64,
    /// The filled part of the bar, 0 to 100 (the SVG's width attribute: no inline style).
    pub width: i64,
    /// [`Health::as_str`], for CSS classes.
    pub status: &'static str,
    /// [`Health::label`].
    pub label: &'static str,
}

impl SpendBar {
    fn of(c: &CustomerRow, limits: &Limits) -> Self {
        let health = c.health(limits);
        let percent = c.percent_used();
        Self { percent, width: percent.clamp(0, 100), status: health.as_str(), label: health.label() }
    }
}

/// A status of the filter: its value in the URL and its label.
pub struct StatusOption {
    value: &'static str,
    label: &'static str,
}

fn status_options() -> Vec<StatusOption> {
    Health::ALL.into_iter().map(|h| StatusOption { value: h.as_str(), label: h.label() }).collect()
}

#[derive(Template, WebTemplate)]
#[template(path = "customers.html")]
pub struct CustomersPage {
    me: Member,
    project: Project,
    rows: Vec<ListRow>,
    total: i64,
    q: String,
    q_encoded: String,
    sort: &'static str,
    /// The status filtered on ("" for all), and the choices.
    status: &'static str,
    status_label: &'static str,
    statuses: Vec<StatusOption>,
    /// Why the status asked for was not applied.
    status_error: Option<String>,
    near_limit_pct: i64,
    page: i64,
    pages: i64,
    prev_page: Option<i64>,
    next_page: Option<i64>,
    form: CustomerForm,
    errors: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ListQuery {
    q: String,
    sort: String,
    /// A [`Health`] (`exhausted`, …); empty for all.
    status: String,
    page: Option<i64>,
}

async fn list_page(
    state: &AppState,
    me: Member,
    project: Project,
    query: ListQuery,
    form: CustomerForm,
    errors: Vec<String>,
) -> Result<CustomersPage, WebError> {
    let sort = Sort::parse(&query.sort).unwrap_or_default();
    let page = query.page.unwrap_or(1).max(1);
    let (status, status_error) = match query.status.trim() {
        "" => (None, None),
        text => match Health::parse(text) {
            Some(status) => (Some(status), None),
            None => {
                let choices = Health::ALL.map(Health::label).join(", ");
                (None, Some(format!("Status: choose one of {choices}; all customers are shown.")))
            }
        },
    };
    let limits = health::limits(&state.db, &project).await?;
    let filter = ListFilter { search: &query.q, health: status, limits };
    let (found, total) =
        customers::list(&state.db, &project.id, &filter, sort, PAGE_SIZE, (page - 1) * PAGE_SIZE).await?;
    let pages = ((total + PAGE_SIZE - 1) / PAGE_SIZE).max(1);
    let currency = project.currency.clone();
    let rows = found
        .into_iter()
        .map(|c| ListRow {
            bar: SpendBar::of(&c, &limits),
            spent: format::amount(c.spent_nanos, &currency),
            budget: format::amount(c.budget_nanos, &currency),
            remaining: format::amount(c.remaining().0, &currency),
            id: c.id,
            external_id: c.external_id,
            name: c.name.unwrap_or_default(),
            period: c.budget_period,
        })
        .collect();
    Ok(CustomersPage {
        me,
        project,
        rows,
        total,
        q_encoded: urlencode(&query.q),
        q: query.q,
        sort: sort.as_str(),
        status: status.map_or("", Health::as_str),
        status_label: status.map_or("", Health::label),
        status_error,
        statuses: status_options(),
        near_limit_pct: limits.near_limit_pct,
        page,
        pages,
        prev_page: (page > 1).then_some(page - 1),
        next_page: (page < pages).then_some(page + 1),
        form,
        errors,
    })
}

pub async fn list(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<CustomersPage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    let form = CustomerForm::new_for(&project);
    list_page(&state, me, project, query, form, vec![]).await
}

/// Creates a customer, or updates the one with this id (the edit form posts here too).
pub async fn save(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CustomerForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let input = match form.input() {
        Ok(input) => input,
        Err(errors) => {
            let page = list_page(&state, me, project, ListQuery::default(), form, errors).await?;
            return Ok((StatusCode::BAD_REQUEST, page).into_response());
        }
    };
    let saved = customers::save(&state.db, &project.id, &input).await.map_err(project_error)?;
    state.proxy_cache.forget_customer(&project.id, &saved.external_id);
    state.ledger.forget_lease(&saved.id);
    let detail = format!("budget {} per {}", format::money(saved.budget_nanos, &project.currency), saved.budget_period);
    audit::record(&state.db, me.org_id(), &me.actor(), "customer.saved", &saved.external_id, &detail).await?;
    Ok(Redirect::to(&format!("/projects/{}/customers/{}", project.id, saved.id)).into_response())
}

pub struct CallView {
    pub when: String,
    /// The call's `x-request-id`, as its client saw it.
    pub request_id: String,
    pub customer: String,
    pub model: String,
    pub status: String,
    pub reason: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost: format::Money,
    pub billed: format::Money,
    /// None when not recorded (a call interrupted by its process's end).
    pub latency_ms: Option<i64>,
    /// The budget lowered its max output.
    pub clamped: bool,
}

pub fn call_views(calls: Vec<CallRow>, currency: &str) -> Vec<CallView> {
    calls
        .into_iter()
        .map(|c| CallView {
            latency_ms: (c.status != "interrupted").then_some(c.latency_ms),
            when: format::datetime(c.created_at),
            request_id: c.request_id,
            customer: c.customer_external_id.unwrap_or_default(),
            model: c.model,
            status: c.status,
            reason: c.reason,
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            cost: format::amount(c.cost_nanos, currency),
            billed: format::amount(c.billed_nanos, currency),
            clamped: c.clamped,
        })
        .collect()
}

/// The longest request id searched for (Tollgate's own are 36 characters; a client's may be
/// longer).
const MAX_REQUEST_ID_LEN: usize = 200;

/// A search of a calls table by request id (`?request_id=…`).
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CallsQuery {
    pub request_id: String,
}

impl CallsQuery {
    /// The request id to look for (None: the newest calls), or a form message.
    pub fn request_id(&self) -> Result<Option<&str>, String> {
        let id = self.request_id.trim();
        if id.chars().count() > MAX_REQUEST_ID_LEN || id.chars().any(char::is_control) {
            return Err(format!(
                "Request id: at most {MAX_REQUEST_ID_LEN} printable characters (the x-request-id header of the call)"
            ));
        }
        Ok(Some(id).filter(|id| !id.is_empty()))
    }
}

/// The calls a calls table shows: the newest `limit`, or those of the request id searched
/// for; and the message for a search that cannot be made.
pub async fn searched_calls(
    state: &AppState,
    project: &Project,
    customer: Option<&CustomerId>,
    query: &CallsQuery,
    within: Option<(UnixMillis, UnixMillis)>,
    limit: i64,
) -> Result<(Vec<CallView>, Option<String>), WebError> {
    let (request_id, error) = match query.request_id() {
        Ok(id) => (id, None),
        Err(message) => (None, Some(message)),
    };
    // A request id is looked for whenever it was made.
    let within = if request_id.is_some() { None } else { within };
    let rows = usage::calls(&state.db, &project.id, customer, request_id, within, limit).await?;
    Ok((call_views(rows, &project.currency), error))
}

pub struct ModelView {
    model: String,
    calls: i64,
    input_tokens: i64,
    output_tokens: i64,
    billed: format::Money,
}

#[derive(Template, WebTemplate)]
#[template(path = "customer.html")]
pub struct CustomerPage {
    me: Member,
    project: Project,
    customer: CustomerRow,
    spent: format::Money,
    budget: format::Money,
    remaining: format::Money,
    reserved: format::Money,
    period_start: String,
    period_end: String,
    chart: String,
    models: Vec<ModelView>,
    calls: Vec<CallView>,
    /// The spend bar and budget health.
    bar: SpendBar,
    /// The request id searched for in the calls (as typed), and why it could not be.
    request_id: String,
    request_id_error: Option<String>,
    /// Where the calls search form goes.
    calls_action: String,
    form: CustomerForm,
    pub(super) errors: Vec<String>,
    /// A payment link just made for the customer: what it is, and its URL.
    pub(super) payment_link: Option<(&'static str, String)>,
    stripe: tollgate_core::billing::CustomerStripe,
    stripe_connected: bool,
    invoices: Vec<super::billing::InvoiceView>,
    /// Usage Stripe would invoice nowhere: calls, amount, why.
    uninvoiceable: Option<(i64, String, String, bool)>,
    one_offs: Vec<super::one_off::OneOffView>,
}

async fn load_customer(state: &AppState, project: &Project, id: &str) -> Result<CustomerRow, WebError> {
    let id = CustomerId::parse(id).ok_or(WebError::NotFound)?;
    customers::get(&state.db, &project.id, &id).await?.ok_or(WebError::NotFound)
}

pub async fn show(
    State(state): State<AppState>,
    me: Member,
    Path((id, customer_id)): Path<(String, String)>,
    Query(calls_query): Query<CallsQuery>,
) -> Result<CustomerPage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    let customer = load_customer(&state, &project, &customer_id).await?;
    let currency = project.currency.clone();
    let now = UnixMillis::now();
    let days = usage::daily_spend(&state.db, &project.id, Some(&customer.id), 30, now).await?;
    let models = usage::spend_by_model(&state.db, &project.id, Some(&customer.id), UnixMillis(customer.period_start))
        .await?
        .into_iter()
        .map(|m| ModelView {
            model: m.model,
            calls: m.calls,
            input_tokens: m.input_tokens,
            output_tokens: m.output_tokens,
            billed: format::amount(m.billed_nanos, &currency),
        })
        .collect();
    let (calls, request_id_error) =
        searched_calls(&state, &project, Some(&customer.id), &calls_query, None, 50).await?;
    let limits = health::limits(&state.db, &project).await?;
    let lifetime = customer.budget_period == "lifetime";
    let stripe = tollgate_core::billing::customer_stripe(&state.db, &project.id, &customer.id).await?;
    let stripe_connected = tollgate_core::stripe::connection(&state.db, &project.id)
        .await
        .map_err(super::billing::stripe_error)?
        .is_some();
    let invoices = super::billing::invoice_views(&state, &project, Some(&customer.id)).await?;
    let uninvoiceable = match tollgate_core::billing::project_billing(&state.db, &project.id).await? {
        Some(billing) => tollgate_core::one_off::waiting(&state.db, &project.id, &customer.id, billing.billing_from)
            .await?
            .map(|w| (w.events, format::money(w.nanos, &currency), w.reason(), w.customer_deleted)),
        None => None,
    };
    let one_offs = super::one_off::views(&state, &project, Some(&customer.id)).await?;
    Ok(CustomerPage {
        uninvoiceable,
        one_offs,
        stripe,
        stripe_connected,
        invoices,
        spent: format::amount(customer.spent_nanos, &currency),
        budget: format::amount(customer.budget_nanos, &currency),
        remaining: format::amount(customer.remaining().0, &currency),
        reserved: format::amount(customer.reserved_nanos, &currency),
        period_start: if lifetime { "the start".to_owned() } else { format::datetime(customer.period_start) },
        period_end: if lifetime { "forever".to_owned() } else { format::datetime(customer.period_end) },
        chart: format::spend_chart(&days, &currency),
        models,
        calls,
        bar: SpendBar::of(&customer, &limits),
        request_id: calls_query.request_id,
        request_id_error,
        calls_action: format!("/projects/{}/customers/{}", project.id, customer.id),
        form: CustomerForm::of(&customer),
        errors: vec![],
        payment_link: None,
        customer,
        project,
        me,
    })
}

async fn set_blocked(
    state: AppState,
    me: Member,
    id: String,
    customer_id: String,
    csrf: String,
    blocked: bool,
) -> Result<Redirect, WebError> {
    me.verify_csrf(&csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let customer = load_customer(&state, &project, &customer_id).await?;
    customers::set_blocked(&state.db, &project.id, &customer.id, blocked).await?;
    state.ledger.forget_lease(&customer.id);
    let action = if blocked { "customer.blocked" } else { "customer.unblocked" };
    audit::record(&state.db, me.org_id(), &me.actor(), action, &customer.external_id, &project.name).await?;
    Ok(Redirect::to(&format!("/projects/{}/customers/{}", project.id, customer.id)))
}

pub async fn block(
    State(state): State<AppState>,
    me: Member,
    Path((id, customer_id)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, WebError> {
    set_blocked(state, me, id, customer_id, form.csrf, true).await
}

pub async fn unblock(
    State(state): State<AppState>,
    me: Member,
    Path((id, customer_id)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, WebError> {
    set_blocked(state, me, id, customer_id, form.csrf, false).await
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub struct LinkStripeForm {
    csrf: String,
    stripe_customer_id: String,
}

/// Bills the customer through an existing Stripe customer (`cus_…`) instead of one Tollgate
/// would make; provisioning then subscribes it to the project's metered price.
pub async fn link_stripe(
    State(state): State<AppState>,
    me: Member,
    Path((id, customer_id)): Path<(String, String)>,
    Form(form): Form<LinkStripeForm>,
) -> Result<axum::response::Response, WebError> {
    use axum::response::IntoResponse;
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let customer = load_customer(&state, &project, &customer_id).await?;
    let current = tollgate_core::billing::customer_stripe(&state.db, &project.id, &customer.id).await?;
    if current.stripe_customer_id.is_some() {
        return Err(WebError::BadRequest("this customer is already billed through a Stripe customer".to_owned()));
    }
    match tollgate_core::stripe::link_customer(&state.db, &project.id, &customer.id, &form.stripe_customer_id).await {
        Ok(_) => {
            let detail = format!("{} linked to {}", customer.external_id, form.stripe_customer_id.trim());
            audit::record(&state.db, me.org_id(), &me.actor(), "customer.stripe_linked", &project.name, &detail)
                .await?;
            Ok(Redirect::to(&format!("/projects/{}/customers/{}", project.id, customer.id)).into_response())
        }
        Err(tollgate_core::stripe::StripeError::Invalid { field: _, reason }) => {
            let mut page =
                show(State(state.clone()), me, Path((id, customer_id)), Query(CallsQuery::default())).await?;
            page.errors = vec![format!("Stripe customer: {reason}")];
            Ok((axum::http::StatusCode::BAD_REQUEST, page).into_response())
        }
        Err(e) => Err(super::billing::stripe_error(e)),
    }
}
