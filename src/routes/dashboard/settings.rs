//! A project's settings (budget policy, markup, default budget, how calls name customers),
//! its price overrides, and its deletion. Every change drops the proxy's cached copy of the
//! project, so it applies to the next call on this replica.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::Role;
use tollgate_core::audit;
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::pricing::{Price, Tokenizer, parse_per_million, shipped_models, shipped_price};
use tollgate_core::projects::{self, BudgetPolicy, PriceOverride, Project, ProjectSettings};

use super::error::WebError;
use super::projects::{load_project, problem_message, project_error};
use super::session::Member;
use crate::state::AppState;

/// The settings form, as typed (re-shown as typed when something is wrong).
#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub struct SettingsForm {
    csrf: String,
    name: String,
    policy: String,
    min_output_tokens: String,
    default_max_output_tokens: String,
    markup: String,
    default_budget: String,
    default_period: String,
    customer_from_user: Option<String>,
    default_customer: String,
    estimate_margin: String,
    bill_interrupted: Option<String>,
    unbounded_call_ceiling: String,
    usd_rate: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "settings.html")]
pub struct SettingsPage {
    me: Member,
    project: Project,
    form: SettingsView,
    saved: bool,
    errors: Vec<String>,
}

pub struct SettingsView {
    name: String,
    policy: String,
    min_output_tokens: String,
    default_max_output_tokens: String,
    markup: String,
    default_budget: String,
    default_period: String,
    customer_from_user: bool,
    default_customer: String,
    estimate_margin: String,
    bill_interrupted: bool,
    unbounded_call_ceiling: String,
    usd_rate: String,
}

/// Basis points shown as a percentage (`2500` → `25.00`).
fn percent(bps: i64) -> String {
    Nanos(bps.saturating_mul(10_000_000)).to_string()
}

/// A percentage typed as a decimal (`12.5`) in basis points; None unless whole basis points.
fn parse_percent(text: &str) -> Option<i64> {
    let nanos: Nanos = text.trim().parse().ok()?;
    (nanos.0 % 10_000_000 == 0).then_some(nanos.0 / 10_000_000)
}

impl SettingsView {
    fn of(project: &Project) -> Self {
        Self {
            name: project.name.clone(),
            policy: project.budget_policy.clone(),
            min_output_tokens: project.min_output_tokens.to_string(),
            default_max_output_tokens: project.default_max_output_tokens.map(|t| t.to_string()).unwrap_or_default(),
            markup: percent(project.markup_bps),
            default_budget: Nanos(project.default_budget_nanos).to_string(),
            default_period: project.default_budget_period.clone(),
            customer_from_user: project.customer_from_user,
            default_customer: project.default_customer.clone().unwrap_or_default(),
            estimate_margin: percent(project.estimate_margin_bps),
            bill_interrupted: project.bill_interrupted,
            unbounded_call_ceiling: project.unbounded_call_ceiling().map(|c| c.to_string()).unwrap_or_default(),
            usd_rate: project.usd_rate_nanos.map(|r| Nanos(r).to_string()).unwrap_or_default(),
        }
    }

    fn typed(form: SettingsForm) -> Self {
        Self {
            name: form.name,
            policy: form.policy,
            min_output_tokens: form.min_output_tokens,
            default_max_output_tokens: form.default_max_output_tokens,
            markup: form.markup,
            default_budget: form.default_budget,
            default_period: form.default_period,
            customer_from_user: form.customer_from_user.is_some(),
            default_customer: form.default_customer,
            estimate_margin: form.estimate_margin,
            bill_interrupted: form.bill_interrupted.is_some(),
            unbounded_call_ceiling: form.unbounded_call_ceiling,
            usd_rate: form.usd_rate,
        }
    }
}

impl SettingsForm {
    /// The settings this form asks for, or every problem with it.
    fn settings(&self) -> Result<ProjectSettings, Vec<String>> {
        let mut errors = Vec::new();
        let policy = match self.policy.as_str() {
            "clamp" => Some(BudgetPolicy::Clamp),
            "reject" => Some(BudgetPolicy::Reject),
            _ => None,
        };
        if policy.is_none() {
            errors.push("Budget policy: choose clamp or reject".to_owned());
        }
        let min_output = self.min_output_tokens.trim().parse::<i64>().ok();
        if min_output.is_none() {
            errors.push("Minimum output tokens: must be a whole number".to_owned());
        }
        // Empty: the model's own limit.
        let default_max_output = match self.default_max_output_tokens.trim() {
            "" => Some(None),
            typed => typed.parse::<i64>().ok().map(Some),
        };
        if default_max_output.is_none() {
            errors.push("Default max output: must be a whole number, or empty for the model's limit".to_owned());
        }
        let markup = parse_percent(&self.markup);
        if markup.is_none() {
            errors.push("Markup: must be a percentage with at most two decimals, such as 20 or 12.5".to_owned());
        }
        let budget = self.default_budget.trim().parse::<Nanos>().ok();
        if budget.is_none() {
            errors.push("Default budget: must be an amount such as 10 or 2.50".to_owned());
        }
        let period = BudgetPeriod::parse(&self.default_period);
        if period.is_none() {
            errors.push("Default period: choose month, day, rolling or lifetime".to_owned());
        }
        let margin = parse_percent(&self.estimate_margin);
        if margin.is_none() {
            errors.push("Estimate margin: must be a percentage with at most two decimals".to_owned());
        }
        let ceiling = match self.unbounded_call_ceiling.trim() {
            "" => Some(None),
            text => text.parse::<Nanos>().ok().map(Some),
        };
        if ceiling.is_none() {
            errors.push("Per-call ceiling: must be an amount such as 0.50, or empty to refuse such calls".to_owned());
        }
        let usd_rate = match self.usd_rate.trim() {
            "" => Some(None),
            text => text.parse::<Nanos>().ok().map(Some),
        };
        if usd_rate.is_none() {
            errors.push("USD exchange rate: must be a number such as 151.20, or empty".to_owned());
        }
        let default_customer = Some(self.default_customer.trim().to_owned()).filter(|c| !c.is_empty());
        let (
            Some(policy),
            Some(min_output_tokens),
            Some(default_max_output_tokens),
            Some(markup_bps),
            Some(default_budget),
            Some(default_period),
            Some(estimate_margin_bps),
            Some(unbounded_call_ceiling),
            Some(usd_rate),
        ) = (policy, min_output, default_max_output, markup, budget, period, margin, ceiling, usd_rate)
        else {
            return Err(errors);
        };
        let settings = ProjectSettings {
            name: self.name.clone(),
            policy,
            min_output_tokens,
            default_max_output_tokens,
            markup_bps,
            default_budget,
            default_period,
            customer_from_user: self.customer_from_user.is_some(),
            default_customer,
            estimate_margin_bps,
            bill_interrupted: self.bill_interrupted.is_some(),
            unbounded_call_ceiling,
            usd_rate,
        };
        let problems: Vec<String> = settings.problems().iter().map(problem_message).collect();
        if problems.is_empty() { Ok(settings) } else { Err(problems) }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ShowQuery {
    saved: Option<String>,
}

pub async fn show(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    axum::extract::Query(query): axum::extract::Query<ShowQuery>,
) -> Result<SettingsPage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    Ok(SettingsPage { form: SettingsView::of(&project), me, project, saved: query.saved.is_some(), errors: vec![] })
}

pub async fn save(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<SettingsForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let settings = match form.settings() {
        Ok(settings) => settings,
        Err(errors) => {
            let page = SettingsPage { form: SettingsView::typed(form), me, project, saved: false, errors };
            return Ok((StatusCode::BAD_REQUEST, page).into_response());
        }
    };
    let before = ProjectSettings::of(&project);
    let updated =
        projects::update_project(&state.db, me.org_id(), &project.id, &settings).await.map_err(project_error)?;
    state.forget_project(&project.id);
    let detail = describe_changes(&before, &settings);
    audit::record(&state.db, me.org_id(), &me.actor(), "project.settings_changed", &updated.name, &detail).await?;
    // Redirect after the post, so a reload does not submit the form again.
    Ok(Redirect::to(&format!("/projects/{}/settings?saved=1", updated.id)).into_response())
}

/// "markup 0.00 % → 20.00 %; policy clamp → reject" (for the audit log).
fn describe_changes(before: &ProjectSettings, after: &ProjectSettings) -> String {
    let mut changes = Vec::new();
    let mut note = |what: &str, a: String, b: String| {
        if a != b {
            changes.push(format!("{what} {a} → {b}"));
        }
    };
    note("name", before.name.clone(), after.name.trim().to_owned());
    note("policy", format!("{:?}", before.policy).to_lowercase(), format!("{:?}", after.policy).to_lowercase());
    note("min output", before.min_output_tokens.to_string(), after.min_output_tokens.to_string());
    let limit = |t: Option<i64>| t.map_or_else(|| "the model's limit".to_owned(), |t| t.to_string());
    note("default max output", limit(before.default_max_output_tokens), limit(after.default_max_output_tokens));
    note("markup", format!("{} %", percent(before.markup_bps)), format!("{} %", percent(after.markup_bps)));
    note(
        "default budget",
        format!("{} per {}", before.default_budget, before.default_period.as_str()),
        format!("{} per {}", after.default_budget, after.default_period.as_str()),
    );
    note("customer from user", before.customer_from_user.to_string(), after.customer_from_user.to_string());
    note("bill interrupted calls", before.bill_interrupted.to_string(), after.bill_interrupted.to_string());
    note("default customer", format!("{:?}", before.default_customer), format!("{:?}", after.default_customer));
    note(
        "estimate margin",
        format!("{} %", percent(before.estimate_margin_bps)),
        format!("{} %", percent(after.estimate_margin_bps)),
    );
    let ceiling = |c: Option<Nanos>| c.map_or_else(|| "refused".to_owned(), |c| c.to_string());
    note("unbounded call ceiling", ceiling(before.unbounded_call_ceiling), ceiling(after.unbounded_call_ceiling));
    if changes.is_empty() { "no change".to_owned() } else { changes.join("; ") }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DeleteForm {
    csrf: String,
    confirm: String,
}

pub async fn delete(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<DeleteForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    if form.confirm.trim() != project.name {
        let errors = vec!["Type the project's name exactly to delete it.".to_owned()];
        let page = super::confirm::delete_project_page(me, project, errors);
        return Ok((StatusCode::BAD_REQUEST, page).into_response());
    }
    projects::delete_project(&state.db, me.org_id(), &project.id).await?;
    state.forget_project(&project.id);
    audit::record(&state.db, me.org_id(), &me.actor(), "project.deleted", &project.name, project.id.as_str()).await?;
    Ok(Redirect::to("/projects").into_response())
}

// ---------------------------------------------------------------------------------------
// Prices

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub struct PriceForm {
    csrf: String,
    model: String,
    input: String,
    cached_input: String,
    cache_write: String,
    output: String,
    max_output_tokens: String,
}

pub struct OverrideRow {
    model: String,
    input: String,
    cached_input: String,
    cache_write: String,
    output: String,
    max_output_tokens: i64,
}

impl From<PriceOverride> for OverrideRow {
    fn from(o: PriceOverride) -> Self {
        Self {
            model: o.model,
            input: Nanos(o.input).to_string(),
            cached_input: Nanos(o.cached_input).to_string(),
            cache_write: Nanos(o.cache_write).to_string(),
            output: Nanos(o.output).to_string(),
            max_output_tokens: o.max_output_tokens,
        }
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "prices.html")]
pub struct PricesPage {
    me: Member,
    project: Project,
    /// The project's USD rate, as typed in the settings.
    usd_rate: String,
    overrides: Vec<OverrideRow>,
    form: PriceForm,
    errors: Vec<String>,
    /// Every shipped price, in the project's currency, with the project's own beside it.
    shipped: Vec<ShippedRow>,
}

/// A shipped model's price and the project's override of it, input and output per million
/// tokens in the project's currency.
pub struct ShippedRow {
    model: &'static str,
    /// None: the project bills outside USD and set no USD rate.
    shipped: Option<PerMillion>,
    project: Option<PerMillion>,
}

/// Input and output prices per million tokens, as shown.
pub struct PerMillion {
    input: String,
    output: String,
}

impl PerMillion {
    fn of(input: i64, output: i64) -> Self {
        Self { input: Nanos(input).to_string(), output: Nanos(output).to_string() }
    }
}

/// Every shipped model, its price at the project's USD rate and the project's override.
fn shipped_rows(project: &Project, overrides: &[PriceOverride]) -> Vec<ShippedRow> {
    let rate = project.shipped_price_rate();
    shipped_models()
        .into_iter()
        .map(|model| ShippedRow {
            model,
            shipped: rate.zip(shipped_price(model)).map(|(rate, price)| {
                let price = price.converted(rate);
                PerMillion::of(price.input, price.output)
            }),
            project: overrides.iter().find(|o| o.model == model).map(|o| PerMillion::of(o.input, o.output)),
        })
        .collect()
}

async fn prices_page(
    state: &AppState,
    me: Member,
    project: Project,
    form: PriceForm,
    errors: Vec<String>,
) -> Result<PricesPage, WebError> {
    let listed = projects::list_price_overrides(&state.db, &project.id).await?;
    let shipped = shipped_rows(&project, &listed);
    let overrides = listed.into_iter().map(OverrideRow::from).collect();
    let usd_rate = project.usd_rate_nanos.map(|r| Nanos(r).to_string()).unwrap_or_default();
    let form = PriceForm { csrf: String::new(), ..form };
    Ok(PricesPage { me, project, usd_rate, overrides, form, errors, shipped })
}

pub async fn prices(State(state): State<AppState>, me: Member, Path(id): Path<String>) -> Result<PricesPage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    prices_page(&state, me, project, PriceForm::default(), vec![]).await
}

impl PriceForm {
    fn price(&self) -> Result<Price, Vec<String>> {
        let mut errors = Vec::new();
        let mut amount = |label: &str, text: &str, fallback: Option<i64>| {
            let text = text.trim();
            match (text.is_empty(), fallback) {
                (true, Some(f)) => Some(f),
                _ => {
                    let parsed = parse_per_million(text);
                    if parsed.is_none() {
                        errors.push(format!("{label}: must be an amount per million tokens, such as 2.50"));
                    }
                    parsed
                }
            }
        };
        let input = amount("Input", &self.input, None);
        let output = amount("Output", &self.output, None);
        let cached_input = amount("Cached input", &self.cached_input, Some(input.unwrap_or(0)));
        let cache_write = amount("Cache write", &self.cache_write, Some(0));
        let max_output = self.max_output_tokens.trim().parse::<i64>().ok().filter(|m| *m >= 1);
        if max_output.is_none() {
            errors.push("Max output tokens: must be a whole number of at least 1".to_owned());
        }
        match (input, output, cached_input, cache_write, max_output) {
            (Some(input), Some(output), Some(cached_input), Some(cache_write), Some(max_output_tokens))
                if errors.is_empty() =>
            {
                Ok(Price {
                    input,
                    cached_input,
                    output,
                    cache_write,
                    max_output_tokens,
                    tokenizer: shipped_price(self.model.trim()).map_or(Tokenizer::Approximate, |p| p.tokenizer),
                })
            }
            _ => Err(errors),
        }
    }
}

pub async fn set_price(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<PriceForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let result = match form.price() {
        Ok(price) => projects::set_price(&state.db, &project.id, &form.model, &price)
            .await
            .map_err(|e| vec![problem_message(&e)]),
        Err(errors) => Err(errors),
    };
    match result {
        Ok(()) => {
            state.forget_project(&project.id);
            let detail = format!("input {} / output {} per Mtok", form.input.trim(), form.output.trim());
            audit::record(&state.db, me.org_id(), &me.actor(), "price.set", form.model.trim(), &detail).await?;
            Ok(Redirect::to(&format!("/projects/{}/prices", project.id)).into_response())
        }
        Err(errors) => {
            Ok((StatusCode::BAD_REQUEST, prices_page(&state, me, project, form, errors).await?).into_response())
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DeletePriceForm {
    csrf: String,
    model: String,
}

pub async fn delete_price(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<DeletePriceForm>,
) -> Result<Redirect, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    if !projects::delete_price(&state.db, &project.id, &form.model).await? {
        return Err(WebError::NotFound);
    }
    state.forget_project(&project.id);
    audit::record(&state.db, me.org_id(), &me.actor(), "price.removed", &form.model, "override removed").await?;
    Ok(Redirect::to(&format!("/projects/{}/prices", project.id)))
}
