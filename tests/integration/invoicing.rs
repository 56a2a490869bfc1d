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
        a_canceled_customer_s_usage_goes_on_one_one_off_invoice,
        a_customer_deleted_in_stripe_gets_a_new_one_whose_first_invoice_carries_its_usage,
    ]
}

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
    pub(crate) async fn close_periods(&self) {
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        self.fake.end_periods(ACCOUNT);
        self.fake.finalize_invoices(ACCOUNT);
    }

    /// Sends every finalized invoice to Tollgate as Stripe does (`invoice.finalized`) and
    /// processes the events; returns how Tollgate found each against its ledger.
    pub(crate) async fn invoices_reported(&self) -> anyhow::Result<Vec<InvoiceCheck>> {
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
    pub(crate) async fn invoiced_as_billed(&self, customer: &str) -> anyhow::Result<()> {
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
            .map(|l| {
                let unit =
                    l["pricing"]["unit_amount_decimal"].as_str().expect("a metered line names its unit").to_owned();
                line_amount(l["quantity"].as_i64().unwrap_or(0), &unit)
            })
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

impl Billing {
    /// Cancels `customer`'s subscription in Stripe and tells Tollgate (the webhook event).
    async fn cancel_in_stripe(&self, customer: &str) -> anyhow::Result<()> {
        let stripe_customer = self.stripe_customer(customer).await?;
        let mut subscription = self
            .fake
            .subscriptions(ACCOUNT)
            .into_iter()
            .find(|s| s["customer"] == stripe_customer.as_str())
            .ok_or_else(|| anyhow::anyhow!("no subscription"))?;
        subscription["status"] = serde_json::json!("canceled");
        self.event("customer.subscription.deleted", subscription).await
    }

    async fn event(&self, kind: &str, object: serde_json::Value) -> anyhow::Result<()> {
        let webhook = self.s.app.url(&format!("/stripe/webhooks/{}", self.s.project.id));
        let (status, body) = self.fake.send_event(&webhook, WHSEC, kind, object, None).await?;
        anyhow::ensure!(status.is_success(), "{body}");
        self.process_events().await?;
        Ok(())
    }

    async fn customer_id(&self, customer: &str) -> anyhow::Result<String> {
        Ok(with_db!(&self.s.app.state.db, pool => sqlx::query_scalar::<_, String>(
            "SELECT id FROM customers WHERE external_id = $1").bind(customer).fetch_one(pool).await)?)
    }

    /// The ledger's billed total of `customer` for usage settled after `since` (Unix ms).
    async fn billed_since(&self, customer: &str, since: i64) -> anyhow::Result<i64> {
        Ok(with_db!(&self.s.app.state.db, pool => sqlx::query_scalar::<_, i64>(
            "SELECT CAST(COALESCE(SUM(u.billed_nanos), 0) AS BIGINT) FROM usage_events u \
             JOIN customers c ON c.id = u.customer_id WHERE c.external_id = $1 AND u.status = 'settled' \
             AND u.created_at > $2").bind(customer).bind(since).fetch_one(pool).await)?)
    }

    /// Posts a billing page form as the project's owner.
    async fn billing_action(&self, action: &str, fields: &[(&str, &str)]) -> anyhow::Result<crate::dashboard::Page> {
        let browser = crate::dashboard::Browser::new(&self.s.app)?;
        browser.log_in("ada@example.com", crate::dashboard::PASSWORD).await?;
        let page = format!("/projects/{}/billing", self.s.project.id);
        browser.submit(&page, &format!("{page}/{action}"), fields).await
    }

    async fn send_one_offs(&self) -> anyhow::Result<tollgate_jobs::one_off::OneOffReport> {
        Ok(tollgate_jobs::one_off::send(&self.s.app.state.db, &self.services).await?)
    }
}

/// Issue 21: usage Stripe cannot invoice is "offered to the tenant as a one-off invoice item,
/// never silently dropped". The tenant asks once; Stripe is down for the first attempt; the
/// retry makes one invoice item of the usage's amount (rounded half up once) on one invoice,
/// collected as the project collects (sent, due in 30 days), which the customer pays.
async fn a_canceled_customer_s_usage_goes_on_one_one_off_invoice(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    b.calls("leaver", 2, 10).await?;
    b.provision().await?;
    b.deliver().await?;
    b.cancel_in_stripe("leaver").await?;
    let canceled_at = tollgate_core::time::UnixMillis::now().0;
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.calls("leaver", 3, 7).await?;
    let waiting = b.billed_since("leaver", canceled_at).await?;
    assert_eq!(waiting, 21_000_000, "three calls of seven tokens");
    let page = b.billing_page().await?;
    assert!(page.contains("Invoice it now"), "{page}");

    let customer = b.customer_id("leaver").await?;
    let browser = crate::dashboard::Browser::new(&b.s.app)?;
    browser.log_in("ada@example.com", crate::dashboard::PASSWORD).await?;
    let shown = browser.get(&format!("/projects/{}/customers/{customer}", b.s.project.id)).await?.body;
    let warning = shown.split("id=\"uninvoiceable\"").nth(1).unwrap_or_default();
    assert!(
        warning.contains("0.02 USD") && warning.contains("3 calls") && warning.contains("subscription canceled"),
        "the customer page shows it: {shown}"
    );
    let asked = b.billing_action("one-off", &[("customer", &customer)]).await?;
    assert_eq!(asked.status, reqwest::StatusCode::SEE_OTHER, "{}", asked.body);
    let again = b.billing_action("one-off", &[("customer", &customer)]).await?;
    assert_eq!(again.status, reqwest::StatusCode::BAD_REQUEST);
    assert!(again.body.contains("no usage waiting"), "asked twice, taken once: {}", again.body);
    let page = b.billing_page().await?;
    assert!(!page.contains("id=\"uninvoiceable\""), "the usage is no longer waiting: {page}");
    assert!(page.contains("id=\"one-off-invoices\"") && page.contains("0.02 USD"), "{page}");

    // Stripe is down: the attempt is retried later, nothing is lost.
    b.fake.go_down().await?;
    let first = b.send_one_offs().await?;
    assert_eq!((first.sent, first.retrying), (0, 1), "{first:?}");
    b.fake.come_back().await?;
    with_db!(&b.s.app.state.db, pool => sqlx::query("UPDATE one_off_invoices SET next_attempt_at = 0")
        .execute(pool).await.map(drop))?;
    let second = b.send_one_offs().await?;
    assert_eq!(second.sent, 1, "{second:?}");
    assert_eq!(b.send_one_offs().await?, tollgate_jobs::one_off::OneOffReport::default(), "sent once");

    let leaver = b.stripe_customer("leaver").await?;
    let items = b.fake.invoice_items(ACCOUNT);
    assert_eq!(items.len(), 1, "{items:#?}");
    // 21,000,000 nano-dollars is 2.1 cents: 2 cents, rounded half up once.
    assert_eq!((items[0]["customer"].as_str(), items[0]["amount"].as_i64()), (Some(leaver.as_str()), Some(2)));
    let manual: Vec<serde_json::Value> =
        b.fake.invoices(ACCOUNT).into_iter().filter(|i| i["billing_reason"] == "manual").collect();
    assert_eq!(manual.len(), 1, "{manual:#?}");
    let invoice = &manual[0];
    assert_eq!(invoice["status"], "open");
    assert_eq!(invoice["total"], 2);
    assert_eq!(invoice["collection_method"], "send_invoice");
    assert!(invoice["due_date"].as_i64().is_some(), "a sent invoice is due: {invoice}");
    let id = invoice["id"].as_str().unwrap_or_default().to_owned();
    let paid = b.fake.pay_invoice(ACCOUNT, &id).ok_or_else(|| anyhow::anyhow!("not payable"))?;
    b.event("invoice.paid", paid).await?;
    let page = b.billing_page().await?;
    let row = page.split(&id).nth(1).unwrap_or_default();
    assert!(page.contains("invoiced") && row.contains("paid"), "{page}");
    b.s.app.stop().await
}

/// Issue 21: a customer deleted in Stripe cannot be invoiced again; its usage is shown with
/// why, a one-off is refused, and "make a new Stripe customer" provisions a new customer and
/// subscription whose first invoice carries exactly the waiting usage.
async fn a_customer_deleted_in_stripe_gets_a_new_one_whose_first_invoice_carries_its_usage(
    db: TestDatabase,
) -> TestResult {
    let b = setup(&db).await?;
    b.calls("gone", 2, 10).await?;
    b.provision().await?;
    b.deliver().await?;
    let old = b.stripe_customer("gone").await?;
    let deleted = b.fake.delete_customer(ACCOUNT, &old).ok_or_else(|| anyhow::anyhow!("no customer"))?;
    b.event("customer.deleted", deleted).await?;
    let deleted_at = tollgate_core::time::UnixMillis::now().0;
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.calls("gone", 2, 9).await?;
    b.deliver().await?;
    assert!(b.fake.meter_events(ACCOUNT).iter().all(|e| e.value != 9_000_000), "sent to a deleted customer");
    let page = b.billing_page().await?;
    let section = page.split("id=\"uninvoiceable\"").nth(1).unwrap_or_default();
    assert!(section.contains("customer deleted in Stripe") && section.contains("Make a new Stripe customer"), "{page}");

    let customer = b.customer_id("gone").await?;
    let refused = b.billing_action("one-off", &[("customer", &customer)]).await?;
    assert_eq!(refused.status, reqwest::StatusCode::BAD_REQUEST);
    assert!(refused.body.contains("deleted in Stripe"), "{}", refused.body);
    let replaced = b.billing_action("new-stripe-customer", &[("customer", &customer)]).await?;
    assert_eq!(replaced.status, reqwest::StatusCode::SEE_OTHER, "{}", replaced.body);
    b.provision().await?;
    let new = b.stripe_customer("gone").await?;
    assert_ne!(new, old, "a new Stripe customer");
    b.deliver().await?;
    b.close_periods().await;
    let waiting = b.billed_since("gone", deleted_at).await?;
    assert_eq!(waiting, 18_000_000);
    assert_eq!(b.fake.invoiced_quantity(ACCOUNT, &new), waiting, "the new customer's first invoice");
    b.s.app.stop().await
}
