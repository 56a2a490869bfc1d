//! The official Stripe SDK (async-stripe) pointed at the fake Stripe: every answer it gets must
//! parse into the SDK's own types, so the fake answers as Stripe does — and the rules Tollgate
//! relies on (identifier dedupe, the timestamp window, `Stripe-Account` scoping, Idempotency-Key
//! replay, summaries) hold for Stripe's own client too. Tollgate sends the same typed requests
//! through its own client ([`tollgate_jobs::stripe_api`]), checked here for the headers it sends
//! and the answers and errors it reads.

use std::collections::HashMap;

use stripe::{AccountId, ApiErrorsCode, Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError};
use stripe::{ApiErrorsType, StripeRequest};
use stripe_billing::SubscriptionStatus;
use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterCustomerMapping, CreateBillingMeterCustomerMappingType,
    CreateBillingMeterDefaultAggregation, CreateBillingMeterDefaultAggregationFormula, CreateBillingMeterValueSettings,
    ListBillingMeter, RetrieveBillingMeter,
};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_summary::ListIdBillingMeterEventSummary;
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_billing::invoice::{ListInvoice, RetrieveInvoice};
use stripe_billing::subscription::{CreateSubscription, CreateSubscriptionItems, RetrieveSubscription};
use stripe_checkout::CheckoutSessionMode;
use stripe_checkout::checkout_session::CreateCheckoutSession;
use stripe_core::customer::{CreateCustomer, RetrieveCustomer, RetrieveCustomerReturned};
use stripe_product::PriceBillingScheme;
use stripe_product::price::{
    CreatePrice, CreatePriceRecurring, CreatePriceRecurringInterval, CreatePriceRecurringUsageType,
};
use stripe_product::product::CreateProduct;
use stripe_types::Currency;

use crate::fake_stripe::FakeStripe;
use crate::helpers::PlainCase;
use crate::plain_cases;

pub fn cases() -> Vec<PlainCase> {
    plain_cases![
        fake_stripe_answers_the_official_sdk,
        tollgates_stripe_client_sends_stripes_headers_and_reads_its_errors
    ]
}

const PLATFORM_KEY: &str = "sk_test_51Hplatformkey001";
const CONNECTED: &str = "acct_connected1";

/// The SDK's client on the fake: `url` takes the base with a trailing slash (the SDK appends
/// `v1/…`), `account_id` sends `Stripe-Account` on every request.
fn client(fake: &FakeStripe, account: Option<&str>) -> anyhow::Result<Client> {
    let mut builder = ClientBuilder::new(PLATFORM_KEY).url(format!("{}/", fake.base_url()));
    if let Some(account) = account {
        builder = builder.account_id(AccountId::from(account));
    }
    Ok(builder.build()?)
}

/// Stripe's error as the SDK hands it over: (HTTP status, type, code, message).
fn stripe_error(error: &StripeError) -> (u16, Option<ApiErrorsType>, Option<ApiErrorsCode>, String) {
    match error {
        StripeError::Stripe(errors, status) => {
            (*status, Some(errors.type_.clone()), errors.code.clone(), errors.message.clone().unwrap_or_default())
        }
        other => (0, None, None, other.to_string()),
    }
}

fn refused<T: std::fmt::Debug>(result: Result<T, StripeError>, what: &str) -> anyhow::Result<StripeError> {
    match result {
        Ok(answer) => anyhow::bail!("{what} was accepted: {answer:?}"),
        Err(error) => Ok(error),
    }
}

async fn fake_stripe_answers_the_official_sdk() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = FakeStripe::start(&[]).await?;
    fake.add_platform_key(PLATFORM_KEY, "acct_platform");
    fake.add_connected_account(PLATFORM_KEY, CONNECTED);
    let stripe = client(&fake, Some(CONNECTED))?;

    // Provisioning, as Tollgate does it: meter, product, metered price, customer, subscription.
    let meter = CreateBillingMeter::new(
        CreateBillingMeterDefaultAggregation::new(CreateBillingMeterDefaultAggregationFormula::Sum),
        "LLM usage",
        "tollgate_usage_sdk",
    )
    .customer_mapping(CreateBillingMeterCustomerMapping::new(
        "stripe_customer_id",
        CreateBillingMeterCustomerMappingType::ById,
    ))
    .value_settings(CreateBillingMeterValueSettings::new("value"))
    .send(&stripe)
    .await?;
    assert_eq!(meter.event_name, "tollgate_usage_sdk");
    assert_eq!(RetrieveBillingMeter::new(meter.id.clone()).send(&stripe).await?.id, meter.id);
    assert_eq!(ListBillingMeter::new().send(&stripe).await?.data.len(), 1);
    // Event names are unique per account.
    let again = CreateBillingMeter::new(
        CreateBillingMeterDefaultAggregation::new(CreateBillingMeterDefaultAggregationFormula::Sum),
        "LLM usage again",
        "tollgate_usage_sdk",
    );
    let (status, _, _, message) = stripe_error(&refused(again.send(&stripe).await, "a second meter")?);
    assert_eq!(status, 400);
    assert!(message.contains("tollgate_usage_sdk"), "{message}");

    let tags = HashMap::from([("tollgate_project".to_owned(), "prj_1".to_owned())]);
    let product = CreateProduct::new("LLM usage").metadata(tags.clone()).send(&stripe).await?;
    assert_eq!(product.metadata, tags);
    let recurring = CreatePriceRecurring {
        usage_type: Some(CreatePriceRecurringUsageType::Metered),
        meter: Some(meter.id.to_string()),
        ..CreatePriceRecurring::new(CreatePriceRecurringInterval::Month)
    };
    let price = CreatePrice::new(Currency::USD)
        .product(product.id.as_str())
        .unit_amount_decimal("0.0000001")
        .billing_scheme(PriceBillingScheme::PerUnit)
        .recurring(recurring.clone())
        .metadata(tags.clone())
        .send(&stripe)
        .await?;
    let price_recurring = price.recurring.clone().ok_or_else(|| anyhow::anyhow!("no recurring"))?;
    assert_eq!(price_recurring.meter.as_deref(), Some(meter.id.as_str()));
    assert_eq!(price.unit_amount_decimal.as_deref(), Some("0.0000001"));
    // A metered price needs a meter of the account.
    let orphan = CreatePrice::new(Currency::USD)
        .product(product.id.as_str())
        .unit_amount_decimal("1")
        .recurring(CreatePriceRecurring { meter: Some("mtr_elsewhere".to_owned()), ..recurring });
    let (status, _, code, _) = stripe_error(&refused(orphan.send(&stripe).await, "a price on no meter")?);
    assert_eq!((status, code), (400, Some(ApiErrorsCode::ResourceMissing)));

    let customer = CreateCustomer::new()
        .name("customer-42")
        .email("grace@example.com")
        .metadata(HashMap::from([("tollgate_customer".to_owned(), "customer-42".to_owned())]))
        .send(&stripe)
        .await?;
    match RetrieveCustomer::new(customer.id.clone()).send(&stripe).await? {
        RetrieveCustomerReturned::Customer(found) => assert_eq!(found.email.as_deref(), Some("grace@example.com")),
        RetrieveCustomerReturned::DeletedCustomer(_) => anyhow::bail!("the customer reads as deleted"),
    }
    let item = CreateSubscriptionItems { price: Some(price.id.to_string()), ..CreateSubscriptionItems::new() };
    let subscription = CreateSubscription::new()
        .customer(customer.id.as_str())
        .items(vec![item])
        .metadata(tags.clone())
        .send(&stripe)
        .await?;
    assert_eq!(subscription.status, SubscriptionStatus::Active);
    assert_eq!(subscription.items.data[0].price.id, price.id);
    let fetched = RetrieveSubscription::new(subscription.id.clone()).send(&stripe).await?;
    assert_eq!(fetched.id, subscription.id);

    // A meter event, accepted once; the same identifier again is refused.
    let now = tollgate_core::time::UnixMillis::now().0 / 1000;
    let payload = HashMap::from([
        ("stripe_customer_id".to_owned(), customer.id.to_string()),
        ("value".to_owned(), "1250".to_owned()),
    ]);
    let event =
        CreateBillingMeterEvent::new("tollgate_usage_sdk", payload.clone()).identifier("mtb_sdk_1").timestamp(now);
    let accepted = event.send(&stripe).await?;
    assert_eq!((accepted.identifier.as_str(), accepted.payload["value"].as_str()), ("mtb_sdk_1", "1250"));
    let (status, kind, code, message) = stripe_error(&refused(event.send(&stripe).await, "a duplicate")?);
    assert_eq!(
        (status, kind, code),
        (400, Some(ApiErrorsType::InvalidRequestError), Some(ApiErrorsCode::ResourceAlreadyExists))
    );
    assert!(message.contains("mtb_sdk_1") && message.contains("already exists"), "{message}");
    // Outside the timestamp window, both ways.
    for timestamp in [now - 36 * 86_400, now + 600] {
        let late = CreateBillingMeterEvent::new("tollgate_usage_sdk", payload.clone())
            .identifier(format!("mtb_sdk_{timestamp}"))
            .timestamp(timestamp);
        let (status, _, _, message) = stripe_error(&refused(late.send(&stripe).await, "out of the window")?);
        assert_eq!(status, 400);
        assert!(message.contains("35 days"), "{message}");
    }

    // Idempotency-Key through the SDK's request strategy: the second send is Stripe's replay of
    // the first answer (no second event), the key with other parameters is refused.
    let key = RequestStrategy::Idempotent(IdempotencyKey::new("tollgate-sdk-batch-2")?);
    let second =
        CreateBillingMeterEvent::new("tollgate_usage_sdk", payload.clone()).identifier("mtb_sdk_2").timestamp(now);
    let first = second.customize().request_strategy(key.clone()).send(&stripe).await?;
    let replayed = second.customize().request_strategy(key.clone()).send(&stripe).await?;
    assert_eq!((first.identifier.as_str(), replayed.created), ("mtb_sdk_2", first.created));
    let other = CreateBillingMeterEvent::new("tollgate_usage_sdk", payload.clone()).identifier("mtb_sdk_3");
    let (status, kind, _, _) =
        stripe_error(&refused(other.customize().request_strategy(key).send(&stripe).await, "a reused key")?);
    assert_eq!((status, kind), (400, Some(ApiErrorsType::IdempotencyError)));
    assert_eq!(fake.meter_events(CONNECTED).len(), 2);

    // Summaries: what was accepted, in minute-aligned bounds.
    let start = now - now.rem_euclid(60);
    let summaries = ListIdBillingMeterEventSummary::new(meter.id.clone(), customer.id.to_string(), start + 60, start)
        .send(&stripe)
        .await?;
    assert_eq!(summaries.data.len(), 1);
    assert_eq!(summaries.data[0].aggregated_value, 2500.0);
    assert_eq!(summaries.data[0].meter, meter.id.as_str());

    // 429 as the SDK reads it.
    fake.set_rate_limit(1);
    let limited = CreateBillingMeterEvent::new("tollgate_usage_sdk", payload).identifier("mtb_sdk_4");
    let (status, _, code, _) = stripe_error(&refused(limited.send(&stripe).await, "over the rate limit")?);
    assert_eq!((status, code), (429, Some(ApiErrorsCode::RateLimit)));

    // Connect scoping: the connected account's objects are not the platform's, and an account
    // not connected to the platform is refused.
    let platform = client(&fake, None)?;
    let elsewhere = ListIdBillingMeterEventSummary::new(meter.id.clone(), customer.id.to_string(), start + 60, start);
    let (status, _, code, _) = stripe_error(&refused(elsewhere.send(&platform).await, "another account's meter")?);
    assert_eq!((status, code), (404, Some(ApiErrorsCode::ResourceMissing)));
    let stranger = client(&fake, Some("acct_stranger"))?;
    let (status, _, _, message) = stripe_error(&refused(CreateCustomer::new().send(&stranger).await, "not scoped")?);
    assert_eq!(status, 403);
    assert!(message.contains("does not have access to account 'acct_stranger'"), "{message}");
    assert!(fake.seen().iter().all(|r| r.key.as_deref() == Some(PLATFORM_KEY)));
    assert_eq!(fake.seen().iter().filter(|r| r.account.as_deref() == Some(CONNECTED)).count(), 20);

    // Stripe's limits as the SDK reads them: a value of 16 digits is refused (400), and so is a
    // second meter event for the customer while the first is being answered (429 lock_timeout).
    let payload = |value: &str| {
        HashMap::from([
            ("stripe_customer_id".to_owned(), customer.id.to_string()),
            ("value".to_owned(), value.to_owned()),
        ])
    };
    let big = CreateBillingMeterEvent::new("tollgate_usage_sdk", payload("1000000000000000")).identifier("mtb_sdk_16");
    let (status, kind, _, message) = stripe_error(&refused(big.send(&stripe).await, "16 digits")?);
    assert_eq!((status, kind), (400, Some(ApiErrorsType::InvalidRequestError)));
    assert!(message.contains("at most 15 digits"), "{message}");
    fake.set_meter_event_latency(std::time::Duration::from_millis(800));
    let sent = fake.meter_event_attempts(CONNECTED).len();
    let first = CreateBillingMeterEvent::new("tollgate_usage_sdk", payload("1")).identifier("mtb_sdk_5");
    let second = CreateBillingMeterEvent::new("tollgate_usage_sdk", payload("1")).identifier("mtb_sdk_6");
    let (first, second) = tokio::join!(first.send(&stripe), async {
        while fake.meter_event_attempts(CONNECTED).len() == sent {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        second.send(&stripe).await
    });
    fake.set_meter_event_latency(std::time::Duration::ZERO);
    assert_eq!(first?.identifier, "mtb_sdk_5");
    let (status, kind, code, _) = stripe_error(&refused(second, "a concurrent meter event")?);
    assert_eq!((status, kind, code), (429, Some(ApiErrorsType::InvalidRequestError), Some(ApiErrorsCode::LockTimeout)));

    // Paying: a Checkout session in setup mode, a customer portal session, and the invoice of
    // the subscription's first period, listed and retrieved (a second on, below the test-mode
    // limit of 25 requests a second the calls above reached).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let checkout = CreateCheckoutSession::new()
        .customer(customer.id.as_str())
        .mode(CheckoutSessionMode::Setup)
        .currency(Currency::USD)
        .success_url("https://app.example.com/done")
        .cancel_url("https://app.example.com/cancel")
        .metadata(tags.clone())
        .send(&stripe)
        .await?;
    assert_eq!((&checkout.mode, checkout.metadata.as_ref()), (&CheckoutSessionMode::Setup, Some(&tags)));
    assert!(checkout.url.as_deref().is_some_and(|u| u.starts_with("https://checkout.stripe.com/")), "{checkout:?}");
    fake.save_portal_settings(CONNECTED);
    let portal = CreateBillingPortalSession::new()
        .customer(customer.id.as_str())
        .return_url("https://app.example.com/back")
        .send(&stripe)
        .await?;
    assert_eq!(
        (portal.customer.as_str(), portal.return_url.as_deref()),
        (customer.id.as_str(), Some("https://app.example.com/back"))
    );
    let drafts = fake.end_periods(CONNECTED);
    assert_eq!(drafts.len(), 1);
    let draft = RetrieveInvoice::new(drafts[0].as_str()).send(&stripe).await?;
    assert_eq!((draft.status, draft.lines.data.len()), (Some(stripe_billing::InvoiceStatus::Draft), 0));
    assert_eq!(fake.finalize_invoices(CONNECTED).len(), 1);
    let listed = ListInvoice::new().limit(1).send(&stripe).await?;
    assert_eq!(listed.data.len(), 1);
    let invoice = &listed.data[0];
    assert_eq!(invoice.id.as_ref().map(|id| id.as_str()), Some(drafts[0].as_str()));
    assert_eq!(invoice.lines.data.len(), 1);
    assert_eq!(invoice.total, fake.invoiced(CONNECTED, customer.id.as_str()));
    let missing = RetrieveInvoice::new("in_missing").send(&stripe).await;
    let (status, _, code, _) = stripe_error(&refused(missing, "an unknown invoice")?);
    assert_eq!((status, code), (404, Some(ApiErrorsCode::ResourceMissing)));

    // The SDK names the API version its types were generated for; Tollgate pins the same one.
    let versions: std::collections::HashSet<Option<String>> = fake.seen().into_iter().map(|r| r.version).collect();
    assert_eq!(versions, [Some(tollgate_jobs::stripe_api::STRIPE_VERSION.to_owned())].into(), "{versions:?}");
    Ok(())
}

/// Tollgate's client under the same typed requests: `Stripe-Version`, `Stripe-Account` and
/// `Idempotency-Key` on the wire, a replayed answer read as the first, and Stripe's refusal
/// classified with its `Request-Id`.
async fn tollgates_stripe_client_sends_stripes_headers_and_reads_its_errors() -> anyhow::Result<()> {
    use tollgate_jobs::stripe_api::{Credentials, StripeApi, StripeApiError};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = FakeStripe::start(&[]).await?;
    fake.add_platform_key(PLATFORM_KEY, "acct_platform");
    fake.add_connected_account(PLATFORM_KEY, CONNECTED);
    let api = StripeApi::new(reqwest::Client::new(), &fake.base_url());
    let credentials = Credentials { key: PLATFORM_KEY.to_owned().into(), account: Some(CONNECTED.to_owned()) };
    let stripe = api.on(&credentials);

    let create = CreateCustomer::new().name("customer-7").metadata(HashMap::from([
        ("tollgate_customer".to_owned(), "customer-7".to_owned()),
        ("tollgate_project".to_owned(), "prj_7".to_owned()),
        ("tollgate_external_id".to_owned(), "ext-7".to_owned()),
    ]));
    let first = stripe.send_idempotent(&create, "tollgate-customer-7").await?;
    let again = stripe.send_idempotent(&create, "tollgate-customer-7").await?;
    assert_eq!(first.id, again.id);
    assert_eq!(fake.customers(CONNECTED).len(), 1);
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(
            (
                request.method.as_str(),
                request.path.as_str(),
                request.key.as_deref(),
                request.account.as_deref(),
                request.idempotency_key.as_deref(),
                request.version.as_deref(),
            ),
            (
                "POST",
                "/v1/customers",
                Some(PLATFORM_KEY),
                Some(CONNECTED),
                Some("tollgate-customer-7"),
                Some(tollgate_jobs::stripe_api::STRIPE_VERSION)
            )
        );
        assert!(request.form.contains(&("metadata[tollgate_project]".to_owned(), "prj_7".to_owned())), "{request:?}");
    }

    // A refusal: Stripe's status, type, code and message, and the request id to quote.
    match RetrieveCustomer::new("cus_missing").send(&stripe).await {
        Err(StripeApiError::Api { status, kind, code, message, request_id, .. }) => {
            assert_eq!(
                (status, kind.as_deref(), code.as_deref()),
                (404, Some("invalid_request_error"), Some("resource_missing"))
            );
            assert!(message.contains("cus_missing"), "{message}");
            assert!(request_id.as_deref().is_some_and(|id| id.starts_with("req")), "{request_id:?}");
        }
        other => anyhow::bail!("an unknown customer read as {other:?}"),
    }
    // 429 from the rate limiter: retryable without `Stripe-Should-Retry`.
    fake.set_rate_limit(1);
    let payload =
        HashMap::from([("stripe_customer_id".to_owned(), first.id.to_string()), ("value".to_owned(), "1".to_owned())]);
    let event = CreateBillingMeterEvent::new("tollgate_usage_none", payload).identifier("mtb_client_1");
    let error = match stripe.send_idempotent(&event, "mtb_client_1-1").await {
        Err(error) => error,
        Ok(answer) => anyhow::bail!("a meter event over the rate limit was accepted: {answer:?}"),
    };
    assert!(
        matches!(&error, StripeApiError::Api { status: 429, code: Some(code), .. } if code == "rate_limit"),
        "{error:?}"
    );
    assert!(error.is_retryable());
    // An idempotency key Stripe would refuse is refused before sending.
    let long = "k".repeat(256);
    assert!(matches!(stripe.send_idempotent(&create, &long).await, Err(StripeApiError::Request(_))));
    assert_eq!(fake.seen().len(), 4);
    Ok(())
}
