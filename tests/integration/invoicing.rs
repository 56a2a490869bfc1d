//! Every settled call on a finalized invoice (issue 21). Stripe invoices a meter's usage only
//! inside a subscription's periods, and an ended period only until its invoice is finalized
//! (the fake makes invoices by those rules: `fake_stripe::invoices`). Calls made before a
//! customer's subscription existed, and usage delivered after an outage that spanned a
//! period's end, were accepted by Stripe and invoiced nowhere; these tests end the periods,
//! finalize the invoices and compare what the customer is charged with the ledger.

use std::time::Duration;

use tollgate_core::stripe::{self, InvoiceCheck};
use tollgate_core::with_db;

use crate::billing::{ACCOUNT, Billing, KEY, WHSEC, billing_setup_with};
use crate::db_cases;
use crate::fake_stripe::invoices::line_amount;
use crate::helpers::{DbCase, TestDatabase, TestResult};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        calls_made_before_the_subscription_existed_are_on_its_first_invoice,
        usage_delivered_after_an_outage_across_a_period_end_is_on_an_invoice,
        a_finalized_invoice_is_reconciled_with_the_ledger,
        a_canceled_subscription_s_usage_is_shown_and_never_sent,
    ]
}

/// The price's `unit_amount_decimal` for USD: 0.0000001 cent per nano-dollar.
const USD_UNIT: &str = "0.0000001";

/// The late-usage window, scaled down from 50 minutes (Stripe's default grace period is an
/// hour) to two seconds.
async fn setup(db: &TestDatabase) -> anyhow::Result<Billing> {
    let b = billing_setup_with(db, |env| {
        env.insert("TOLLGATE_STRIPE_LATE_USAGE_SECONDS".into(), "2".into());
    })
    .await?;
    b.connect_with_key().await?;
    Ok(b)
}

impl Billing {
    /// Ends the current periods (a second from now, after the usage just sent: periods are
    /// counted in whole seconds) and finalizes their invoices (their grace period over).
    async fn close_periods(&self) {
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        self.fake.end_periods(ACCOUNT);
        self.fake.finalize_invoices(ACCOUNT);
    }

    /// Sends every finalized invoice to Tollgate as Stripe does (`invoice.finalized`) and
    /// processes the events; returns how Tollgate found each against its ledger.
    async fn invoices_reported(&self) -> anyhow::Result<Vec<InvoiceCheck>> {
        let webhook = self.s.app.url(&format!("/stripe/webhooks/{}", self.s.project.id));
        for invoice in self.fake.invoices(ACCOUNT).into_iter().filter(|i| i["status"] != "draft") {
            let (status, body) = self.fake.send_event(&webhook, WHSEC, "invoice.finalized", invoice, None).await?;
            anyhow::ensure!(status.is_success(), "{body}");
        }
        self.process_events().await?;
        let rows = stripe::invoices(&self.s.app.state.db, &self.s.project.id, None, 100).await?;
        Ok(rows.iter().map(tollgate_core::stripe::InvoiceRow::check).collect())
    }

    /// Checks that `customer`'s finalized invoices charge exactly its billed total.
    async fn invoiced_as_billed(&self, customer: &str) -> anyhow::Result<()> {
        let billed = self.ledger().await?.get(customer).copied().unwrap_or(0);
        anyhow::ensure!(billed > 0, "{customer} was billed nothing");
        let stripe_customer = self.stripe_customer(customer).await?;
        let quantity = self.fake.invoiced_quantity(ACCOUNT, &stripe_customer);
        assert_eq!(quantity, billed, "{customer}: invoiced usage against the ledger");
        let invoices = self.fake.invoices(ACCOUNT);
        let lines: i64 = invoices
            .iter()
            .filter(|i| i["customer"] == stripe_customer.as_str() && i["status"] != "draft")
            .map(|i| i["total"].as_i64().unwrap_or(0))
            .sum();
        let per_line: i64 = invoices
            .iter()
            .filter(|i| i["customer"] == stripe_customer.as_str() && i["status"] != "draft")
            .flat_map(|i| i["lines"]["data"].as_array().cloned().unwrap_or_default())
            .map(|l| line_amount(l["quantity"].as_i64().unwrap_or(0), USD_UNIT))
            .sum();
        assert_eq!(lines, per_line, "{customer}: charged the usage, rounded once per line");
        Ok(())
    }
}

/// The subscription is made when provisioning runs, after the customer's first calls (and
/// later still while provisioning fails): those calls were stamped before its start and
/// invoiced nowhere. They are now stamped at its start, on its first invoice.
async fn calls_made_before_the_subscription_existed_are_on_its_first_invoice(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    // Stripe is down: the first calls are made, and provisioning fails.
    b.fake.go_down().await?;
    b.calls("early", 3, 10).await?;
    b.provision().await?;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    b.calls("early", 1, 7).await?;
    b.fake.come_back().await?;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Provisioning backs off after failing; the tenant presses "Retry now".
    tollgate_core::billing::retry_now(&b.s.app.state.db, &b.s.project.id).await?;
    b.provision().await?;
    b.deliver().await?;
    let started: Option<i64> = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar(
        "SELECT stripe_subscription_started_at FROM customers WHERE external_id = 'early'").fetch_one(pool).await)?;
    let started = started.ok_or_else(|| anyhow::anyhow!("the subscription's start is not recorded"))?;
    let stamps: Vec<i64> = b.fake.meter_events(ACCOUNT).iter().map(|e| e.timestamp).collect();
    assert!(!stamps.is_empty() && stamps.iter().all(|t| *t >= started), "{stamps:?} before {started}");
    // Calls after the subscription began keep their own time.
    b.calls("early", 2, 5).await?;
    b.deliver().await?;
    b.close_periods().await;
    b.invoiced_as_billed("early").await?;
    b.s.app.stop().await
}

/// Stripe is down when a period ends and stays down past the invoice's grace period: the
/// usage of the period's last minutes, delivered afterwards with its own time, would reach a
/// finalized period. It is stamped inside the late-usage window instead and lands on the
/// next invoice; nothing is charged twice.
async fn usage_delivered_after_an_outage_across_a_period_end_is_on_an_invoice(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    b.calls("steady", 2, 10).await?;
    b.provision().await?;
    b.deliver().await?;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    b.fake.go_down().await?;
    b.calls("steady", 3, 9).await?;
    b.deliver().await?;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // The period ends during the outage; its invoice is finalized before Stripe is back.
    b.fake.end_periods(ACCOUNT);
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    b.fake.finalize_invoices(ACCOUNT);
    b.fake.come_back().await?;
    // Delivery backs off after the outage; make the waiting batches due now.
    with_db!(&b.s.app.state.db, pool => sqlx::query("UPDATE meter_batches SET next_attempt_at = 0 WHERE status = 'pending'")
        .execute(pool).await.map(drop))?;
    b.deliver().await?;
    let pending: i64 = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM meter_batches WHERE status <> 'delivered'").fetch_one(pool).await)?;
    assert_eq!(pending, 0, "every batch delivered");
    b.close_periods().await;
    b.invoiced_as_billed("steady").await?;
    b.s.app.stop().await
}

/// Issue 21's invoice reconciliation: for each finalized invoice, the metered line against what
/// Tollgate delivered for the customer inside the invoice's period. Zero drift when every
/// call is on it; when Stripe's line counts usage Tollgate did not send (another sender on the
/// meter), the invoice shows the drift and by how much.
async fn a_finalized_invoice_is_reconciled_with_the_ledger(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    b.calls("alice", 3, 10).await?;
    b.calls("bob", 2, 7).await?;
    b.provision().await?;
    b.deliver().await?;
    b.close_periods().await;
    let checks = b.invoices_reported().await?;
    assert_eq!(checks, [InvoiceCheck::Matches, InvoiceCheck::Matches], "both invoices match the ledger");
    let page = b.billing_page().await?;
    assert_eq!(page.matches("matches the ledger").count(), 2, "{page}");

    // Someone else sends usage for Bob on Tollgate's meter: his next invoice counts more.
    let bob = b.stripe_customer("bob").await?;
    let event_name = b.fake.meters(ACCOUNT)[0]["event_name"].as_str().unwrap_or_default().to_owned();
    let sent = reqwest::Client::new()
        .post(format!("{}/v1/billing/meter_events", b.fake.base_url()))
        .bearer_auth(KEY)
        .form(&[
            ("event_name", event_name),
            ("payload[stripe_customer_id]", bob.clone()),
            ("payload[value]", "30000000".to_owned()),
            ("identifier", "someone-else-1".to_owned()),
        ])
        .send()
        .await?;
    assert!(sent.status().is_success(), "{}", sent.text().await?);
    b.calls("bob", 1, 7).await?;
    b.deliver().await?;
    b.close_periods().await;
    let checks = b.invoices_reported().await?;
    assert!(checks.contains(&InvoiceCheck::Drift { missing: -30_000_000 }), "{checks:?}");
    assert_eq!(checks.iter().filter(|c| **c == InvoiceCheck::Matches).count(), 3, "{checks:?}");
    let page = b.billing_page().await?;
    assert!(page.contains("more than Tollgate delivered"), "{page}");
    b.s.app.stop().await
}

/// Issue 21: a customer canceled in Stripe keeps calling. Its usage would be accepted by Stripe
/// and invoiced nowhere; it stays in the outbox and the billing page shows who, why and how
/// much.
async fn a_canceled_subscription_s_usage_is_shown_and_never_sent(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    b.calls("leaver", 2, 10).await?;
    b.calls("stayer", 1, 10).await?;
    b.provision().await?;
    b.deliver().await?;
    let sent_before = b.fake.meter_events(ACCOUNT).len();
    let leaver = b.stripe_customer("leaver").await?;
    let mut subscription = b
        .fake
        .subscriptions(ACCOUNT)
        .into_iter()
        .find(|s| s["customer"] == leaver.as_str())
        .ok_or_else(|| anyhow::anyhow!("no subscription"))?;
    subscription["status"] = serde_json::json!("canceled");
    let webhook = b.s.app.url(&format!("/stripe/webhooks/{}", b.s.project.id));
    let (status, body) =
        b.fake.send_event(&webhook, WHSEC, "customer.subscription.deleted", subscription, None).await?;
    assert!(status.is_success(), "{body}");
    b.process_events().await?;

    b.calls("leaver", 3, 10).await?;
    b.calls("stayer", 1, 10).await?;
    b.deliver().await?;
    let sent: Vec<String> =
        b.fake.meter_events(ACCOUNT).iter().skip(sent_before).map(|e| e.stripe_customer_id.clone()).collect();
    assert!(!sent.is_empty() && !sent.contains(&leaver), "the canceled customer's usage was sent: {sent:?}");
    let page = b.billing_page().await?;
    let section = page.split("id=\"uninvoiceable\"").nth(1).unwrap_or_default();
    assert!(section.contains("leaver") && section.contains("subscription canceled"), "{page}");
    assert!(
        section.contains("<td>3</td>") && section.to_lowercase().contains("0.03 usd"),
        "three calls, their amount: {section}"
    );
    assert!(!section.split("</table>").next().unwrap_or_default().contains("stayer"));
    b.s.app.stop().await
}
