//! Billing through Stripe, the slow path: provisioning (a meter, a product and a metered price
//! per project; a Stripe customer and a subscription per end-customer), delivery of the meter
//! event outbox, and reconciliation against Stripe's meter event summaries. Each runs on an
//! apalis-cron tick in every worker process; claims in the database (see
//! `tollgate_core::billing`) keep replicas from doing the same work at once, and Stripe's
//! `Idempotency-Key` makes a repeated call create nothing twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use secrecy::SecretString;
use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterCustomerMapping, CreateBillingMeterCustomerMappingType,
    CreateBillingMeterDefaultAggregation, CreateBillingMeterDefaultAggregationFormula, CreateBillingMeterValueSettings,
    ListBillingMeter,
};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_summary::ListIdBillingMeterEventSummary;
use stripe_billing::subscription::{CreateSubscription, CreateSubscriptionAutomaticTax, CreateSubscriptionItems};
use stripe_billing::{BillingMeterStatus, SubscriptionCollectionMethod};
use stripe_core::customer::CreateCustomer;
use stripe_product::PriceBillingScheme;
use stripe_product::price::{
    CreatePrice, CreatePriceRecurring, CreatePriceRecurringInterval, CreatePriceRecurringUsageType,
};
use stripe_product::product::CreateProduct;
use tollgate_core::billing::{self, Attempt, DueBatch, Made, ProjectBilling, StepFailure};
use tollgate_core::crypto::MasterKey;
use tollgate_core::db::DbError;
use tollgate_core::ids::ProjectId;
use tollgate_core::payment_collection;
use tollgate_core::stripe;
use tollgate_core::time::UnixMillis;
use tollgate_core::{Config, Db};

use crate::stripe_api::{Credentials, StripeApi, StripeApiError};

/// What the billing jobs need besides the database.
#[derive(Clone)]
pub struct BillingServices {
    pub api: StripeApi,
    pub master_key: MasterKey,
    /// The operator's platform key, for projects connected through Stripe Connect.
    pub platform_key: Option<SecretString>,
    pub reconcile_interval: Duration,
    /// See `Config::stripe_late_usage_window`.
    pub late_usage_window: Duration,
    /// Meter events a second per project, when the operator sets it; otherwise per mode
    /// ([`default_meter_events_per_second`]).
    pub meter_events_per_second: Option<u32>,
    /// How long after delivery a meter event is taken to be in Stripe's summaries.
    pub summary_settle: Duration,
    /// The pace of meter event requests per project, shared by the runs of this process.
    pub pacer: Arc<Pacer>,
}

impl BillingServices {
    pub fn new(config: &Config, master_key: MasterKey, http: reqwest::Client) -> Self {
        Self {
            api: StripeApi::new(http, &config.stripe_api_base),
            master_key,
            platform_key: config.stripe_platform_key.clone(),
            reconcile_interval: config.stripe_reconcile_interval,
            late_usage_window: config.stripe_late_usage_window,
            meter_events_per_second: config.stripe_meter_events_per_second,
            summary_settle: SUMMARY_SETTLE,
            pacer: Arc::default(),
        }
    }

    fn pace(&self, livemode: bool) -> u32 {
        self.meter_events_per_second.unwrap_or_else(|| default_meter_events_per_second(livemode))
    }
}

/// Stripe's limit on meter events in live mode: "1000 calls per second per Stripe account",
/// a limiter of their own (<https://docs.stripe.com/rate-limits>).
const LIVE_METER_EVENTS_LIMIT: u32 = 1_000;
/// In test mode and sandboxes meter events "count toward the basic limit"
/// (<https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api>), which is
/// 25 requests a second (<https://docs.stripe.com/rate-limits>, "Sandbox: 25 operations").
const TEST_BASIC_LIMIT: u32 = 25;

/// The pace delivery keeps by default: four fifths of Stripe's limit for the mode (800 a second
/// live, 20 in test mode), leaving the rest to provisioning, reconciliation and the tenant's
/// own calls on the account.
pub fn default_meter_events_per_second(livemode: bool) -> u32 {
    let limit = if livemode { LIVE_METER_EVENTS_LIMIT } else { TEST_BASIC_LIMIT };
    limit * 4 / 5
}

/// Stripe documents no bound on how late a meter event shows in its summaries; delivered
/// usage younger than this is allowed to be missing from them.
const SUMMARY_SETTLE: Duration = Duration::from_secs(15 * 60);

/// Spaces each project's meter event requests at its pace, and holds them back after Stripe
/// asked to wait (a 429, an outage).
///
/// A project whose next turn has come and that is not paused is as good as one never seen, so
/// such entries are dropped whenever the map has doubled since it was last swept: it holds
/// about the projects delivering or paused now, not every project ever billed. Its size is the
/// `tollgate_cache_entries{cache="stripe_pacer"}` gauge.
#[derive(Debug, Default)]
pub struct Pacer {
    projects: Mutex<Paces>,
}

#[derive(Debug, Default)]
struct Paces {
    of: HashMap<ProjectId, Pace>,
    /// Swept when it holds more than this (at least [`Pacer::SWEEP_ABOVE`]).
    sweep_above: usize,
}

#[derive(Debug)]
struct Pace {
    next_turn: Instant,
    paused_until: Instant,
}

impl Pacer {
    /// The fewest entries at which the map is swept.
    const SWEEP_ABOVE: usize = 64;

    fn with<T>(&self, project: &ProjectId, f: impl FnOnce(&mut Pace, Instant) -> T) -> T {
        let now = Instant::now();
        let mut paces = self.projects.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if paces.of.len() > paces.sweep_above.max(Self::SWEEP_ABOVE) {
            paces.of.retain(|_, pace| pace.next_turn > now || pace.paused_until > now);
            paces.sweep_above = paces.of.len() * 2;
        }
        let pace = paces.of.entry(project.clone()).or_insert(Pace { next_turn: now, paused_until: now });
        let answer = f(pace, now);
        metrics::gauge!("tollgate_cache_entries", "cache" => "stripe_pacer").set(paces.of.len() as f64);
        answer
    }

    /// How many projects it keeps a pace for.
    pub fn len(&self) -> usize {
        self.projects.lock().unwrap_or_else(std::sync::PoisonError::into_inner).of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for the project's next turn at `per_second`; `false` (at once) while it is paused.
    pub async fn turn(&self, project: &ProjectId, per_second: u32) -> bool {
        let spacing = Duration::from_secs(1) / per_second.max(1);
        let turn = self.with(project, |pace, now| {
            (pace.paused_until <= now).then(|| {
                let turn = pace.next_turn.max(now);
                pace.next_turn = turn + spacing;
                turn
            })
        });
        match turn {
            Some(turn) => {
                tokio::time::sleep_until(turn.into()).await;
                true
            }
            None => false,
        }
    }

    /// Holds the project's requests back until `until`.
    pub fn pause_until(&self, project: &ProjectId, until: Instant) {
        self.with(project, |pace, _| pace.paused_until = pace.paused_until.max(until));
    }

    pub fn is_paused(&self, project: &ProjectId) -> bool {
        self.with(project, |pace, now| pace.paused_until > now)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Stripe(#[from] stripe::StripeError),
}

/// How Tollgate acts on the project's Stripe account; the error is shown to the tenant.
async fn credentials(
    db: &Db,
    services: &BillingServices,
    project: &tollgate_core::ids::ProjectId,
) -> Result<Result<Credentials, String>, BillingError> {
    let found =
        crate::stripe_api::credentials(db, &services.master_key, services.platform_key.as_ref(), project).await?;
    Ok(found.map_err(|e| e.to_string()))
}

fn step_failure(what: &str, error: &StripeApiError, attempts: i64) -> StepFailure {
    StepFailure {
        message: format!("{what}: {error}"),
        retry_in_ms: error.is_retryable().then(|| billing::provision_backoff_ms(attempts)),
    }
}

/// What one provisioning run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProvisionReport {
    pub projects: usize,
    pub customers: usize,
    pub failures: usize,
}

/// Provisions what is missing: each claimed project's meter, product and price, then the
/// Stripe customers and subscriptions of the end-customers that need them.
pub async fn provision(db: &Db, services: &BillingServices) -> Result<ProvisionReport, BillingError> {
    let mut report = ProvisionReport::default();
    for project in billing::claim_projects_to_provision(db, UnixMillis::now(), 20).await? {
        let outcome = match credentials(db, services, &project.project_id).await? {
            Ok(credentials) => provision_project(db, &services.api, &credentials, &project).await?,
            Err(message) => Err(StepFailure { message, retry_in_ms: None }),
        };
        report.projects += 1;
        if let Err(failure) = &outcome {
            report.failures += 1;
            tracing::warn!(project = %project.project_id, error = %failure.message, "stripe provisioning failed");
        }
        billing::record_project_outcome(db, &project.project_id, outcome.err().as_ref()).await?;
    }
    for project in billing::provisioned_projects(db).await? {
        let customers = billing::claim_customers_to_provision(db, &project, UnixMillis::now(), 50).await?;
        if customers.is_empty() {
            continue;
        }
        let credentials = match credentials(db, services, &project.project_id).await? {
            Ok(credentials) => credentials,
            Err(message) => {
                for customer in &customers {
                    billing::record_customer_failure(
                        db,
                        &customer.id,
                        &StepFailure { message: message.clone(), retry_in_ms: None },
                    )
                    .await?;
                }
                continue;
            }
        };
        for customer in customers {
            report.customers += 1;
            if let Err(failure) = provision_customer(db, &services.api, &credentials, &project, &customer).await? {
                report.failures += 1;
                tracing::warn!(customer = %customer.id, error = %failure.message, "stripe customer provisioning failed");
                billing::record_customer_failure(db, &customer.id, &failure).await?;
            }
        }
    }
    Ok(report)
}

async fn provision_project(
    db: &Db,
    api: &StripeApi,
    credentials: &Credentials,
    project: &ProjectBilling,
) -> Result<Result<(), StepFailure>, BillingError> {
    let id = project.project_id.as_str();
    let attempts = project.provision_attempts;
    // Keys are per connection (its creation time), so connecting again provisions afresh.
    let key = |what: &str| format!("tollgate-{what}-{id}-{}", project.billing_from);
    let event_name = project.event_name();
    let stripe = api.on(credentials);
    let meter_id = match &project.meter_id {
        Some(meter) => meter.clone(),
        None => {
            // A meter made by an earlier connection of this project is found by its event name.
            let active = ListBillingMeter::new().status(BillingMeterStatus::Active).limit(100);
            let existing = match active.send(&stripe).await {
                Ok(list) => list.data.into_iter().find(|m| m.event_name == event_name),
                Err(e) => return Ok(Err(step_failure("listing meters", &e, attempts))),
            };
            let meter = match existing {
                Some(meter) => meter,
                None => {
                    let create = CreateBillingMeter::new(
                        CreateBillingMeterDefaultAggregation::new(CreateBillingMeterDefaultAggregationFormula::Sum),
                        format!("{} LLM usage (Tollgate)", project.project_name),
                        event_name.clone(),
                    )
                    .customer_mapping(CreateBillingMeterCustomerMapping::new(
                        "stripe_customer_id",
                        CreateBillingMeterCustomerMappingType::ById,
                    ))
                    .value_settings(CreateBillingMeterValueSettings::new("value"));
                    match stripe.send_idempotent(&create, &key("meter")).await {
                        Ok(meter) => meter,
                        Err(e) => return Ok(Err(step_failure("creating the meter", &e, attempts))),
                    }
                }
            };
            let made = Made::Meter { id: meter.id.as_str(), event_name: &meter.event_name };
            billing::record_made(db, &project.project_id, made).await?;
            meter.id.to_string()
        }
    };
    let product_id = match &project.product_id {
        Some(product) => product.clone(),
        None => {
            let create = CreateProduct::new(format!("{} LLM usage", project.project_name))
                .metadata(HashMap::from([("tollgate_project".to_owned(), id.to_owned())]));
            match stripe.send_idempotent(&create, &key("product")).await {
                Ok(product) => {
                    billing::record_made(db, &project.project_id, Made::Product(product.id.as_str())).await?;
                    product.id.to_string()
                }
                Err(e) => return Ok(Err(step_failure("creating the product", &e, attempts))),
            }
        }
    };
    if project.price_id.is_none() {
        let Ok(currency) = project.currency.to_ascii_lowercase().parse::<stripe_types::Currency>();
        let recurring = CreatePriceRecurring {
            usage_type: Some(CreatePriceRecurringUsageType::Metered),
            meter: Some(meter_id.clone()),
            ..CreatePriceRecurring::new(CreatePriceRecurringInterval::Month)
        };
        let create = CreatePrice::new(currency)
            .product(product_id)
            .unit_amount_decimal(tollgate_core::currency::unit_amount_decimal(&project.currency))
            .billing_scheme(PriceBillingScheme::PerUnit)
            .recurring(recurring)
            .nickname("LLM usage, per nano-unit of the currency")
            .metadata(HashMap::from([("tollgate_project".to_owned(), id.to_owned())]));
        match stripe.send_idempotent(&create, &key(&format!("price-{meter_id}"))).await {
            Ok(price) => billing::record_made(db, &project.project_id, Made::Price(price.id.as_str())).await?,
            Err(e) => return Ok(Err(step_failure("creating the metered price", &e, attempts))),
        }
    }
    Ok(Ok(()))
}

async fn provision_customer(
    db: &Db,
    api: &StripeApi,
    credentials: &Credentials,
    project: &ProjectBilling,
    customer: &billing::CustomerToProvision,
) -> Result<Result<(), StepFailure>, BillingError> {
    let attempts = customer.stripe_provision_attempts;
    let Some(price) = &project.price_id else { return Ok(Ok(())) };
    let stripe = api.on(credentials);
    let stripe_customer = match &customer.stripe_customer_id {
        Some(id) => id.clone(),
        None => {
            let mut create = CreateCustomer::new().name(customer.external_id.clone()).metadata(HashMap::from([
                ("tollgate_customer".to_owned(), customer.id.to_string()),
                ("tollgate_external_id".to_owned(), customer.external_id.clone()),
                ("tollgate_project".to_owned(), project.project_id.to_string()),
            ]));
            if let Some(email) = &customer.email {
                create = create.email(email.clone());
            }
            let key = format!("tollgate-customer-{}", customer.idempotency_tag());
            match stripe.send_idempotent(&create, &key).await {
                Ok(made) => {
                    billing::record_stripe_customer(db, &customer.id, made.id.as_str()).await?;
                    made.id.to_string()
                }
                Err(e) => return Ok(Err(step_failure("creating the Stripe customer", &e, attempts))),
            }
        }
    };
    if customer.stripe_subscription_id.is_none() {
        let item = CreateSubscriptionItems { price: Some(price.clone()), ..CreateSubscriptionItems::new() };
        let create = CreateSubscription::new().customer(stripe_customer).items(vec![item]).metadata(HashMap::from([
            ("tollgate_customer".to_owned(), customer.id.to_string()),
            ("tollgate_project".to_owned(), project.project_id.to_string()),
        ]));
        // The project's payment collection, as it is when the subscription is made.
        let collection = payment_collection::collection(db, &project.project_id).await?;
        let mut create = with_collection(create, collection);
        if payment_collection::automatic_tax(db, &project.project_id).await? {
            create = create.automatic_tax(CreateSubscriptionAutomaticTax::new(true));
        }
        let key = format!("tollgate-subscription-{}-{price}", customer.idempotency_tag());
        match stripe.send_idempotent(&create, &key).await {
            Ok(subscription) => {
                billing::record_subscription(
                    db,
                    &customer.id,
                    subscription.id.as_str(),
                    subscription.status.as_str(),
                    Some(subscription.start_date),
                )
                .await?
            }
            Err(StripeApiError::Api { code: Some(code), .. }) if code == "customer_tax_location_invalid" => {
                // Stripe Tax cannot place the customer: nothing is made, and the usage waits.
                // The setup link asks for the billing address; once the customer saves one there,
                // provisioning runs again (`saved_payment_methods`).
                let message = "Stripe Tax needs this customer's location (customer_tax_location_invalid): send them \
                    the payment-method setup link, which asks for their billing address, or set their address in \
                    Stripe and press Retry"
                    .to_owned();
                return Ok(Err(StepFailure { message, retry_in_ms: None }));
            }
            Err(e) => return Ok(Err(step_failure("creating the subscription", &e, attempts))),
        }
    }
    Ok(Ok(()))
}

/// `create` with the project's payment collection: Stripe's `collection_method`, and
/// `days_until_due` for sent invoices (Stripe refuses it when charging automatically).
fn with_collection(create: CreateSubscription, collection: payment_collection::Collection) -> CreateSubscription {
    use payment_collection::Collection;
    match collection {
        Collection::ChargeAutomatically => create.collection_method(SubscriptionCollectionMethod::ChargeAutomatically),
        Collection::SendInvoice { days_until_due } => {
            let create = create.collection_method(SubscriptionCollectionMethod::SendInvoice);
            // Always within 0..=365 (`Collection::parse`).
            match u32::try_from(days_until_due) {
                Ok(days) => create.days_until_due(days),
                Err(_) => create,
            }
        }
    }
}

/// What one delivery run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryReport {
    pub batches_formed: usize,
    pub delivered: usize,
    pub retrying: usize,
    pub failed: usize,
}

/// Meter event requests in flight at once per project, each for a different customer (Stripe
/// takes one at a time per customer and meter).
const DELIVERY_CONCURRENCY: usize = 8;
/// The most batches one run sends per project, so one project cannot hold the others up.
const DELIVERIES_PER_RUN: usize = 2_000;

/// Forms batches from the outbox and sends those due, per provisioned project: one request at
/// a time per customer and meter ("The meter event endpoint allows … one concurrent call per
/// customer per meter", <https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api>),
/// customers side by side, all at the project's pace. After Stripe's rate limiter refused one,
/// the project waits (Stripe's `Retry-After`, or the batch's backoff) before sending more.
pub async fn deliver(db: &Db, services: &BillingServices) -> Result<DeliveryReport, BillingError> {
    let mut report = DeliveryReport::default();
    for project in billing::provisioned_projects(db).await? {
        report.batches_formed += billing::form_batches(db, &project, 1_000).await?;
        if services.pacer.is_paused(&project.project_id) {
            continue;
        }
        let Ok(credentials) = credentials(db, services, &project.project_id).await? else { continue };
        let per_second = services.pace(project.livemode);
        let mut sent = 0;
        let window = i64::try_from(services.late_usage_window.as_secs()).unwrap_or(i64::MAX);
        while sent < DELIVERIES_PER_RUN {
            let batches = billing::claim_due_batches(db, &project.project_id, UnixMillis::now(), 100, window).await?;
            if batches.is_empty() {
                break;
            }
            sent += batches.len();
            let lanes: Vec<Vec<(DueBatch, Option<Attempt>)>> = futures::stream::iter(lanes(batches))
                .map(|lane| deliver_lane(services, &credentials, &project.project_id, per_second, lane))
                .buffer_unordered(DELIVERY_CONCURRENCY)
                .collect()
                .await;
            let mut slow_down = false;
            for (batch, attempt) in lanes.into_iter().flatten() {
                let Some(attempt) = attempt else {
                    billing::release_claim(db, &batch.id).await?;
                    continue;
                };
                billing::record_attempt(db, &batch.id, &attempt).await?;
                match &attempt {
                    Attempt::Delivered => report.delivered += 1,
                    Attempt::Retry { error, .. } => {
                        report.retrying += 1;
                        slow_down = true;
                        tracing::info!(batch = %batch.id, %error, "meter event will be retried");
                    }
                    Attempt::Failed { error } => {
                        report.failed += 1;
                        tracing::warn!(batch = %batch.id, %error, "meter event refused by Stripe");
                    }
                }
            }
            if slow_down {
                // Rate limited or Stripe unavailable: the rest waits for the next run.
                break;
            }
        }
    }
    Ok(report)
}

/// The claimed batches per (Stripe customer, meter), each lane in the order claimed.
fn lanes(batches: Vec<DueBatch>) -> Vec<Vec<DueBatch>> {
    let mut lanes: Vec<Vec<DueBatch>> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    for batch in batches {
        let key = (batch.stripe_customer_id.clone(), batch.event_name.clone());
        match index.get(&key) {
            Some(&lane) => lanes[lane].push(batch),
            None => {
                index.insert(key, lanes.len());
                lanes.push(vec![batch]);
            }
        }
    }
    lanes
}

/// Sends one customer's batches one after the other, each on its turn at the project's pace.
/// Once one is to be retried (or the project is paused), the rest are not sent (`None`); a
/// rate limit pauses the project for the batch's wait (Stripe's `Retry-After` at least).
async fn deliver_lane(
    services: &BillingServices,
    credentials: &Credentials,
    project: &ProjectId,
    per_second: u32,
    lane: Vec<DueBatch>,
) -> Vec<(DueBatch, Option<Attempt>)> {
    let mut outcomes = Vec::with_capacity(lane.len());
    let mut stopped = false;
    for batch in lane {
        if stopped || !services.pacer.turn(project, per_second).await {
            stopped = true;
            outcomes.push((batch, None));
            continue;
        }
        let (attempt, hold) = send_meter_event(&services.api, credentials, &batch).await;
        stopped = matches!(attempt, Attempt::Retry { .. });
        if let Some(hold) = hold {
            let hold = Duration::from_millis(u64::try_from(hold).unwrap_or(0));
            services.pacer.pause_until(project, Instant::now() + hold);
        }
        outcomes.push((batch, Some(attempt)));
    }
    outcomes
}

/// Whether Stripe refused a meter event because it already has one with that identifier
/// (an earlier attempt was accepted, and its answer lost).
fn is_duplicate_identifier(error: &StripeApiError) -> bool {
    match error {
        StripeApiError::Api { status: 400, code, message, .. } => {
            let message = message.to_ascii_lowercase();
            code.as_deref() == Some("resource_already_exists")
                || (message.contains("identifier") && (message.contains("already") || message.contains("duplicate")))
        }
        _ => false,
    }
}

/// One attempt at sending a batch as a meter event.
pub async fn send(api: &StripeApi, credentials: &Credentials, batch: &DueBatch) -> Attempt {
    send_meter_event(api, credentials, batch).await.0
}

/// [`send`], and how long the account's meter events should hold back when Stripe's rate
/// limiter refused it (429 `rate_limit`: the limit is the account's, not the batch's).
async fn send_meter_event(api: &StripeApi, credentials: &Credentials, batch: &DueBatch) -> (Attempt, Option<i64>) {
    let attempt = attempt_meter_event(api, credentials, batch).await;
    match attempt {
        (Attempt::Retry { error, next_at }, true) => {
            let hold = next_at - UnixMillis::now().0;
            (Attempt::Retry { error, next_at }, Some(hold))
        }
        (attempt, _) => (attempt, None),
    }
}

/// One attempt, and whether the rate limiter refused it.
async fn attempt_meter_event(api: &StripeApi, credentials: &Credentials, batch: &DueBatch) -> (Attempt, bool) {
    let now = UnixMillis::now().0;
    if now - batch.last_at > billing::MAX_EVENT_AGE_MS {
        let error = "older than the 35 days Stripe accepts meter events for; bill it by hand".to_owned();
        return (Attempt::Failed { error }, false);
    }
    if batch.value_nanos > billing::MAX_METER_EVENT_VALUE {
        // Batches are split when formed; one formed before that would be refused for its digits.
        let error =
            "more than 15 significant digits, which Stripe refuses in one meter event; bill it by hand".to_owned();
        return (Attempt::Failed { error }, false);
    }
    let payload = HashMap::from([
        ("stripe_customer_id".to_owned(), batch.stripe_customer_id.clone()),
        ("value".to_owned(), batch.value_nanos.to_string()),
    ]);
    let event = CreateBillingMeterEvent::new(batch.event_name.clone(), payload)
        .identifier(batch.identifier())
        .timestamp(batch.timestamp());
    // A key per attempt: Stripe saves what an attempt's request ended with (a 500 included) and
    // would answer every retry with the same key from that record for 24 hours. The identifier,
    // the same on every attempt, is what keeps a retry from being counted twice.
    let idempotency_key = format!("{}-{}", batch.id, batch.attempts);
    match api.on(credentials).send_idempotent(&event, &idempotency_key).await {
        Ok(_) => (Attempt::Delivered, false),
        Err(e) if is_duplicate_identifier(&e) => (Attempt::Delivered, false),
        // A 429 (the rate limiter, or `lock_timeout` while another request for the customer and
        // meter runs) is always worth waiting for, whatever `Stripe-Should-Retry` says; other
        // answers are retried when Stripe says so (`Stripe-Should-Retry`) or their status does.
        Err(e) if e.is_retryable() || matches!(e, StripeApiError::Api { status: 429, .. }) => {
            let retry_after = match &e {
                StripeApiError::Api { retry_after: Some(seconds), .. } => (*seconds as i64).saturating_mul(1000),
                _ => 0,
            };
            let rate_limited =
                matches!(&e, StripeApiError::Api { status: 429, code, .. } if code.as_deref() != Some("lock_timeout"));
            let wait = billing::delivery_backoff_ms(batch.attempts - 1).max(retry_after);
            (Attempt::Retry { error: e.to_string(), next_at: now + wait }, rate_limited)
        }
        Err(e) => (Attempt::Failed { error: e.to_string() }, false),
    }
}

/// Compares, per billed customer, what Tollgate delivered this month with Stripe's meter
/// event summary for the same window, and records the drift: what neither the summary's lag
/// (usage delivered within [`BillingServices::summary_settle`]) nor its floating-point sum
/// explains (see [`billing::summary_drift`]). Returns how many were checked.
pub async fn reconcile(db: &Db, services: &BillingServices) -> Result<usize, BillingError> {
    let now = UnixMillis::now();
    let window = billing::reconcile_window(now);
    let settle = i64::try_from(services.summary_settle.as_millis()).unwrap_or(i64::MAX);
    let settled_before = now.0.saturating_sub(settle);
    let mut checked = 0;
    for project in billing::provisioned_projects(db).await? {
        let Some(meter) = &project.meter_id else { continue };
        let Ok(credentials) = credentials(db, services, &project.project_id).await? else { continue };
        for customer in billing::billed_customers(db, &project.project_id, window.0, window.1, settled_before).await? {
            let summaries = ListIdBillingMeterEventSummary::new(
                meter.as_str(),
                customer.stripe_customer_id.clone(),
                window.1 / 1000,
                window.0 / 1000,
            )
            .limit(100);
            // `aggregated_value` is a floating-point number (stripe-node
            // `Billing.MeterEventSummary.aggregated_value: number`, async-stripe `f64`): Stripe
            // sums in doubles, so past 2^53 nano-units it is a rounded total.
            let stripe_total = match summaries.send(&services.api.on(&credentials)).await {
                Ok(list) if list.has_more => Err("Stripe returned more summaries than one page".to_owned()),
                Ok(list) => list
                    .data
                    .iter()
                    .try_fold(0.0, |sum, s| s.aggregated_value.is_finite().then_some(sum + s.aggregated_value))
                    .ok_or_else(|| "Stripe's summary is not a number".to_owned()),
                Err(e) => Err(e.to_string()),
            };
            billing::record_reconciliation(db, &project.project_id, &customer, window, stripe_total).await?;
            checked += 1;
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_paces_itself_below_stripes_limit_for_the_mode() {
        assert_eq!(default_meter_events_per_second(false), 20);
        assert_eq!(default_meter_events_per_second(true), 800);
    }

    #[tokio::test]
    async fn the_pacer_forgets_projects_whose_turn_has_come() {
        let pacer = Pacer::default();
        for _ in 0..10 * Pacer::SWEEP_ABOVE {
            assert!(pacer.turn(&ProjectId::generate(), 1_000_000).await);
            assert!(pacer.len() <= 2 * Pacer::SWEEP_ABOVE + 1, "{}", pacer.len());
        }
        let paused = ProjectId::generate();
        pacer.pause_until(&paused, Instant::now() + Duration::from_secs(60));
        for _ in 0..10 * Pacer::SWEEP_ABOVE {
            pacer.is_paused(&ProjectId::generate());
        }
        assert!(pacer.is_paused(&paused), "a paused project is kept");
    }

    #[tokio::test]
    async fn the_pacer_spaces_turns_and_holds_them_while_paused() {
        let pacer = Pacer::default();
        let project = ProjectId::generate();
        let start = Instant::now();
        for _ in 0..5 {
            assert!(pacer.turn(&project, 50).await);
        }
        // Five turns at 50 a second: the fifth 80 ms after the first.
        assert!(start.elapsed() >= Duration::from_millis(80), "{:?}", start.elapsed());
        pacer.pause_until(&project, Instant::now() + Duration::from_secs(60));
        assert!(pacer.is_paused(&project));
        assert!(!pacer.turn(&project, 50).await);
        assert!(!pacer.is_paused(&ProjectId::generate()));
    }

    #[test]
    fn claimed_batches_go_in_one_lane_per_customer_and_meter() {
        let batch = |customer: &str| DueBatch {
            id: tollgate_core::ids::MeterBatchId::generate(),
            project_id: ProjectId::generate(),
            stripe_customer_id: customer.to_owned(),
            event_name: "tollgate_usage".to_owned(),
            value_nanos: 1,
            last_at: 0,
            attempts: 1,
            meter_timestamp: None,
            meter_identifier: None,
        };
        let claimed = vec![batch("cus_a"), batch("cus_b"), batch("cus_a"), batch("cus_c"), batch("cus_a")];
        let order: Vec<_> = claimed.iter().map(|b| b.id.clone()).collect();
        let lanes = lanes(claimed);
        let shape: Vec<Vec<&str>> =
            lanes.iter().map(|l| l.iter().map(|b| b.stripe_customer_id.as_str()).collect()).collect();
        assert_eq!(shape, [vec!["cus_a"; 3], vec!["cus_b"], vec!["cus_c"]]);
        assert_eq!(
            lanes[0].iter().map(|b| b.id.clone()).collect::<Vec<_>>(),
            [order[0].clone(), order[2].clone(), order[4].clone()]
        );
    }

    #[test]
    fn a_duplicate_identifier_counts_as_delivered() {
        let api = |status, code: Option<&str>, message: &str| StripeApiError::Api {
            status,
            kind: Some("invalid_request_error".into()),
            code: code.map(str::to_owned),
            message: message.into(),
            retry_after: None,
            should_retry: None,
            request_id: None,
        };
        assert!(is_duplicate_identifier(&api(400, Some("resource_already_exists"), "exists")));
        assert!(is_duplicate_identifier(&api(400, None, "An event with identifier mtb_1 already exists.")));
        assert!(!is_duplicate_identifier(&api(400, None, "No such customer: cus_1")));
        assert!(!is_duplicate_identifier(&api(429, Some("rate_limit"), "Too many requests")));
    }
}
