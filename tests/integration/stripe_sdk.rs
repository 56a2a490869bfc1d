//! The official Stripe SDK (async-stripe) pointed at the fake Stripe: every answer it gets must
//! parse into the SDK's own types, so the fake answers as Stripe does — and the rules Tollgate
//! relies on (identifier dedupe, the timestamp window, `Stripe-Account` scoping, summaries) hold
//! for Stripe's own client too.

use std::collections::HashMap;

use stripe::{AccountId, Client, ClientBuilder, StripeError};
use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterCustomerMapping, CreateBillingMeterCustomerMappingType,
    CreateBillingMeterDefaultAggregation, CreateBillingMeterDefaultAggregationFormula, CreateBillingMeterValueSettings,
};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_summary::ListIdBillingMeterEventSummary;
use stripe_core::customer::CreateCustomer;

use crate::fake_stripe::FakeStripe;
use crate::helpers::PlainCase;
use crate::plain_cases;

pub fn cases() -> Vec<PlainCase> {
    plain_cases![the_official_sdk_reads_the_fakes_answers]
}

const PLATFORM_KEY: &str = "sk_test_51Hplatformkey001";

fn client(fake: &FakeStripe, account: Option<&str>) -> anyhow::Result<Client> {
    let mut builder = ClientBuilder::new(PLATFORM_KEY).url(format!("{}/", fake.base_url()));
    if let Some(account) = account {
        builder = builder.account_id(AccountId::from(account));
    }
    Ok(builder.build()?)
}

fn stripe_message(error: &StripeError) -> (u16, String) {
    match error {
        StripeError::Stripe(errors, status) => (*status, errors.message.clone().unwrap_or_default()),
        other => (0, other.to_string()),
    }
}

async fn the_official_sdk_reads_the_fakes_answers() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = FakeStripe::start(&[]).await?;
    fake.add_platform_key(PLATFORM_KEY, "acct_platform");
    fake.add_connected_account(PLATFORM_KEY, "acct_connected1");
    let stripe = client(&fake, Some("acct_connected1"))?;

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
    let customer = CreateCustomer::new().name("customer-42").email("grace@example.com").send(&stripe).await?;

    let now = tollgate_core::time::UnixMillis::now().0 / 1000;
    let payload = HashMap::from([
        ("stripe_customer_id".to_owned(), customer.id.to_string()),
        ("value".to_owned(), "1250".to_owned()),
    ]);
    let event =
        CreateBillingMeterEvent::new("tollgate_usage_sdk", payload.clone()).identifier("mtb_sdk_1").timestamp(now);
    let accepted = event.send(&stripe).await?;
    assert_eq!((accepted.identifier.as_str(), accepted.payload["value"].as_str()), ("mtb_sdk_1", "1250"));

    // The same identifier again: refused, with Stripe's error as the SDK reads it.
    let duplicate = event.send(&stripe).await.err().ok_or_else(|| anyhow::anyhow!("a duplicate was accepted"))?;
    let (status, message) = stripe_message(&duplicate);
    assert_eq!(status, 400);
    assert!(message.contains("mtb_sdk_1") && message.contains("already exists"), "{message}");
    // Outside the timestamp window, both ways.
    for timestamp in [now - 36 * 86_400, now + 600] {
        let late = CreateBillingMeterEvent::new("tollgate_usage_sdk", payload.clone())
            .identifier(format!("mtb_sdk_{timestamp}"))
            .timestamp(timestamp);
        let refused = late.send(&stripe).await.err().ok_or_else(|| anyhow::anyhow!("{timestamp} was accepted"))?;
        assert!(stripe_message(&refused).1.contains("35 days"), "{refused}");
    }
    assert_eq!(fake.meter_events("acct_connected1").len(), 1);

    let start = now - now.rem_euclid(60);
    let summaries = ListIdBillingMeterEventSummary::new(meter.id.clone(), customer.id.to_string(), start + 60, start)
        .send(&stripe)
        .await?;
    assert_eq!(summaries.data.len(), 1);
    assert_eq!(summaries.data[0].aggregated_value, 1250.0);

    // Connect scoping: the connected account's meter is not the platform's, and an account not
    // connected to the platform is refused.
    let platform = client(&fake, None)?;
    let elsewhere = ListIdBillingMeterEventSummary::new(meter.id.clone(), customer.id.to_string(), start + 60, start)
        .send(&platform)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("the platform saw the connected account's meter"))?;
    assert_eq!(stripe_message(&elsewhere).0, 404);
    let stranger = client(&fake, Some("acct_stranger"))?;
    let refused = CreateCustomer::new().send(&stranger).await.err().ok_or_else(|| anyhow::anyhow!("not scoped"))?;
    let (status, message) = stripe_message(&refused);
    assert_eq!(status, 403);
    assert!(message.contains("does not have access to account 'acct_stranger'"), "{message}");
    Ok(())
}
