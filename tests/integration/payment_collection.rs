//! Payment collection (issue 21): the project's setting reaches each subscription Stripe makes
//! (sent invoices due after some days, or charged automatically), the payment-method setup and
//! customer portal links come from the management API and the dashboard (and are refused
//! clearly when they cannot be made), and a project of either kind ends at a paid invoice.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tollgate_core::payment_collection::{self, Collection};
use tollgate_core::stripe;

use crate::billing::{ACCOUNT, Billing, WHSEC, billing_setup_with};
use crate::dashboard::{Browser, PASSWORD};
use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        the_collection_setting_reaches_the_subscriptions_stripe_makes,
        setup_and_portal_links_come_from_the_api_and_the_dashboard,
        links_are_refused_for_an_unprovisioned_customer_or_an_unconnected_project,
        send_invoice_and_charge_automatically_each_reach_a_paid_invoice,
        a_card_saved_through_the_setup_link_pays_the_next_invoice,
        stripe_tax_waits_for_the_location_the_setup_link_collects,
    ]
}

async fn setup(db: &TestDatabase) -> anyhow::Result<Billing> {
    billing_setup_with(db, |env| {
        env.insert("TOLLGATE_STRIPE_LATE_USAGE_SECONDS".into(), "2".into());
    })
    .await
}

impl Billing {
    async fn dashboard(&self) -> anyhow::Result<Browser<'_>> {
        let browser = Browser::new(&self.s.app)?;
        browser.log_in("ada@example.com", PASSWORD).await?;
        Ok(browser)
    }

    /// The dashboard path of `customer`'s page (by the tenant's id).
    async fn customer_page(&self, customer: &str) -> anyhow::Result<String> {
        let row = tollgate_core::customers::find(&self.s.app.state.db, &self.s.project.id, customer)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no customer {customer}"))?;
        Ok(format!("/projects/{}/customers/{}", self.s.project.id, row.id))
    }

    /// The subscription Stripe made for `customer`.
    async fn subscription(&self, customer: &str) -> anyhow::Result<Value> {
        let stripe_customer = self.stripe_customer(customer).await?;
        self.fake
            .subscriptions(ACCOUNT)
            .into_iter()
            .find(|s| s["customer"] == stripe_customer.as_str())
            .ok_or_else(|| anyhow::anyhow!("no subscription for {customer}"))
    }
}

async fn the_collection_setting_reaches_the_subscriptions_stripe_makes(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    b.connect_with_key().await?;
    // Unless the tenant chose, invoices are sent, due in 30 days.
    b.calls("sent", 1, 10).await?;
    b.provision().await?;
    let sent = b.subscription("sent").await?;
    assert_eq!((sent["collection_method"].as_str(), sent["days_until_due"].as_i64()), (Some("send_invoice"), Some(30)));
    let seen = b.fake.seen();
    let made = seen.iter().find(|r| r.path == "/v1/subscriptions").ok_or_else(|| anyhow::anyhow!("no subscription"))?;
    assert!(made.form.contains(&("days_until_due".to_owned(), "30".to_owned())), "{:?}", made.form);

    // The tenant chooses on the billing page; the page says the change is for new subscriptions.
    let browser = b.dashboard().await?;
    let billing = format!("/projects/{}/billing", b.s.project.id);
    let page = browser.get(&billing).await?;
    assert!(page.body.contains("applies to subscriptions made after it"), "{}", page.body);
    let refused = browser
        .submit(
            &billing,
            &format!("{billing}/collection"),
            &[("collection_method", "send_invoice"), ("days_until_due", "400")],
        )
        .await?;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert!(refused.body.contains("Days until due"), "{}", refused.body);
    let saved = browser
        .submit(
            &billing,
            &format!("{billing}/collection"),
            &[("collection_method", "charge_automatically"), ("days_until_due", "30")],
        )
        .await?;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let page = browser.get(&billing).await?;
    assert!(page.body.contains("Now: <strong>charge automatically</strong>"), "{}", page.body);
    let (status, settings) = b.s.api(Method::GET, "/api/v1/project", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (settings["collection_method"].as_str(), &settings["days_until_due"]),
        (Some("charge_automatically"), &Value::Null)
    );

    b.calls("charged", 1, 10).await?;
    b.provision().await?;
    let charged = b.subscription("charged").await?;
    assert_eq!(
        (charged["collection_method"].as_str(), &charged["days_until_due"]),
        (Some("charge_automatically"), &Value::Null)
    );
    // The earlier subscription keeps its method.
    assert_eq!(b.subscription("sent").await?["collection_method"], "send_invoice");

    // Back to sent invoices, due in 7 days.
    payment_collection::set_collection(
        &b.s.app.state.db,
        &b.s.project.id,
        Collection::SendInvoice { days_until_due: 7 },
    )
    .await?;
    b.calls("weekly", 1, 10).await?;
    b.provision().await?;
    assert_eq!(b.subscription("weekly").await?["days_until_due"], 7);
    b.s.app.stop().await
}

async fn setup_and_portal_links_come_from_the_api_and_the_dashboard(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    b.connect_with_key().await?;
    b.calls("cust-1", 1, 10).await?;
    b.provision().await?;
    let stripe_customer = b.stripe_customer("cust-1").await?;
    let page_path = b.customer_page("cust-1").await?;
    let page_url = format!("{}{page_path}", b.s.app.state.config.public_url.trim_end_matches('/'));

    // From the API: the customer's dashboard page unless the tenant gives its own https URLs.
    let (status, link) = b.s.api(Method::POST, "/api/v1/customers/cust-1/payment-setup", Some(json!({}))).await?;
    assert_eq!(status, StatusCode::CREATED, "{link}");
    let url = link["url"].as_str().unwrap_or_default();
    assert!(url.starts_with("https://checkout.stripe.com/"), "{link}");
    let sessions = b.fake.checkout_sessions(ACCOUNT);
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        (sessions[0]["customer"].as_str(), sessions[0]["mode"].as_str()),
        (Some(stripe_customer.as_str()), Some("setup"))
    );
    assert_eq!(
        (sessions[0]["success_url"].as_str(), sessions[0]["currency"].as_str()),
        (Some(page_url.as_str()), Some("usd"))
    );
    assert_eq!(sessions[0]["url"], url);
    let body = json!({"success_url": "https://app.example.com/saved", "cancel_url": "https://app.example.com/billing"});
    let (status, _) = b.s.api(Method::POST, "/api/v1/customers/cust-1/payment-setup", Some(body)).await?;
    assert_eq!(status, StatusCode::CREATED);
    let last = b.fake.checkout_sessions(ACCOUNT).pop().unwrap_or_default();
    assert_eq!(
        (last["success_url"].as_str(), last["cancel_url"].as_str()),
        (Some("https://app.example.com/saved"), Some("https://app.example.com/billing"))
    );
    let (status, problem) =
        b.s.api(
            Method::POST,
            "/api/v1/customers/cust-1/payment-setup",
            Some(json!({"success_url": "http://app.example.com/"})),
        )
        .await?;
    assert_eq!(
        (status, problem["errors"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("success_url")),
        "{problem}"
    );

    // The portal: refused with Stripe's reason until its settings are saved in Stripe.
    let (status, problem) = b.s.api(Method::POST, "/api/v1/customers/cust-1/billing-portal", Some(json!({}))).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(problem["detail"].as_str().is_some_and(|d| d.contains("default configuration")), "{problem}");
    b.fake.save_portal_settings(ACCOUNT);
    let body = json!({"return_url": "https://app.example.com/account"});
    let (status, link) = b.s.api(Method::POST, "/api/v1/customers/cust-1/billing-portal", Some(body)).await?;
    assert_eq!(status, StatusCode::CREATED, "{link}");
    assert!(link["url"].as_str().is_some_and(|u| u.starts_with("https://billing.stripe.com/")), "{link}");
    let portal = b.fake.portal_sessions(ACCOUNT);
    assert_eq!(
        (portal[0]["customer"].as_str(), portal[0]["return_url"].as_str()),
        (Some(stripe_customer.as_str()), Some("https://app.example.com/account"))
    );

    // From the dashboard: each button makes a link and shows it on the customer's page.
    let browser = b.dashboard().await?;
    let page = browser.submit(&page_path, &format!("{page_path}/payment-setup"), &[]).await?;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let made = b.fake.checkout_sessions(ACCOUNT).pop().unwrap_or_default();
    assert!(page.body.contains(made["url"].as_str().unwrap_or("none")), "{}", page.body);
    assert_eq!(made["success_url"].as_str(), Some(page_url.as_str()));
    let page = browser.submit(&page_path, &format!("{page_path}/billing-portal"), &[]).await?;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let made = b.fake.portal_sessions(ACCOUNT).pop().unwrap_or_default();
    assert!(page.body.contains(made["url"].as_str().unwrap_or("none")), "{}", page.body);
    assert_eq!(made["return_url"].as_str(), Some(page_url.as_str()));
    b.s.app.stop().await
}

async fn links_are_refused_for_an_unprovisioned_customer_or_an_unconnected_project(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    let (status, _) = b.s.api(Method::POST, "/api/v1/customers", Some(json!({"id": "new", "budget": "5.00"}))).await?;
    assert!(status.is_success());
    let page_path = b.customer_page("new").await?;
    let browser = b.dashboard().await?;
    for (kind, connected) in
        [("payment-setup", false), ("billing-portal", false), ("payment-setup", true), ("billing-portal", true)]
    {
        if connected {
            b.connect_with_key().await?;
        }
        let (status, problem) =
            b.s.api(Method::POST, &format!("/api/v1/customers/new/{kind}"), Some(json!({}))).await?;
        assert_eq!(status, StatusCode::CONFLICT, "{problem}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        let reason = if connected { "no Stripe customer yet" } else { "Stripe is not connected" };
        assert!(detail.contains(reason), "{kind}, connected {connected}: {detail}");
        let page = browser.submit(&page_path, &format!("{page_path}/{kind}"), &[]).await?;
        assert_eq!(page.status, StatusCode::CONFLICT, "{}", page.body);
        assert!(page.body.contains("No link made"), "{}", page.body);
    }
    let (status, _) = b.s.api(Method::POST, "/api/v1/customers/nobody/payment-setup", Some(json!({}))).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(b.fake.checkout_sessions(ACCOUNT).is_empty() && b.fake.portal_sessions(ACCOUNT).is_empty());
    b.s.app.stop().await
}

/// One customer subscribed while the project sends invoices, another after it switched to
/// charging automatically: the first pays its invoice on Stripe's hosted page, the second
/// saved a card through the customer portal and is charged when the invoice is finalized.
/// Tollgate hears `invoice.paid` for both.
async fn send_invoice_and_charge_automatically_each_reach_a_paid_invoice(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    b.connect_with_key().await?;
    b.fake.save_portal_settings(ACCOUNT);
    b.calls("sent", 2, 10).await?;
    b.provision().await?;
    payment_collection::set_collection(&b.s.app.state.db, &b.s.project.id, Collection::ChargeAutomatically).await?;
    b.calls("charged", 3, 10).await?;
    b.provision().await?;
    b.deliver().await?;
    let (sent, charged) = (b.stripe_customer("sent").await?, b.stripe_customer("charged").await?);
    // The charged customer goes to the portal (a link from the API) and saves a card there.
    let (status, _) = b.s.api(Method::POST, "/api/v1/customers/charged/billing-portal", Some(json!({}))).await?;
    assert_eq!(status, StatusCode::CREATED);
    b.fake.save_default_payment_method(ACCOUNT, &charged);

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    b.fake.end_periods(ACCOUNT);
    let finalized = b.fake.finalize_invoices(ACCOUNT);
    let of = |customer: &str| finalized.iter().find(|i| i["customer"] == customer).cloned().unwrap_or_default();
    let (sent_invoice, charged_invoice) = (of(&sent), of(&charged));
    assert_eq!(
        (sent_invoice["collection_method"].as_str(), sent_invoice["status"].as_str()),
        (Some("send_invoice"), Some("open"))
    );
    assert!(sent_invoice["due_date"].as_i64().is_some() && sent_invoice["total"].as_i64() > Some(0), "{sent_invoice}");
    assert_eq!(
        (charged_invoice["collection_method"].as_str(), charged_invoice["status"].as_str()),
        (Some("charge_automatically"), Some("paid"))
    );
    // The sent invoice's customer pays on its hosted page.
    let paid = b.fake.pay_invoice(ACCOUNT, sent_invoice["id"].as_str().unwrap_or_default());
    let paid = paid.ok_or_else(|| anyhow::anyhow!("the sent invoice was not open"))?;

    let webhook = b.s.app.url(&format!("/stripe/webhooks/{}", b.s.project.id));
    for invoice in [paid, charged_invoice] {
        let (status, body) = b.fake.send_event(&webhook, WHSEC, "invoice.paid", invoice, None).await?;
        assert!(status.is_success(), "{body}");
    }
    b.process_events().await?;
    let invoices = stripe::invoices(&b.s.app.state.db, &b.s.project.id, None, 10).await?;
    assert_eq!(invoices.len(), 2, "{invoices:?}");
    for invoice in &invoices {
        assert_eq!(invoice.status, "paid", "{invoice:?}");
        assert_eq!(invoice.amount_paid, invoice.amount_due, "{invoice:?}");
        assert!(invoice.amount_paid > 0);
    }
    b.s.app.stop().await
}

/// Charging automatically through the setup link: the customer saves a card on Checkout's
/// page; Stripe attaches it but does not make it the default for invoices, so Tollgate does
/// when Stripe reports the session completed (once, however often it is reported), and the
/// invoice finalized next is charged to it.
async fn a_card_saved_through_the_setup_link_pays_the_next_invoice(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    b.connect_with_key().await?;
    payment_collection::set_collection(&b.s.app.state.db, &b.s.project.id, Collection::ChargeAutomatically).await?;
    b.calls("carded", 2, 10).await?;
    b.provision().await?;
    b.deliver().await?;
    let customer = b.stripe_customer("carded").await?;
    let (status, link) = b.s.api(Method::POST, "/api/v1/customers/carded/payment-setup", Some(json!({}))).await?;
    assert_eq!(status, StatusCode::CREATED, "{link}");
    let session = b.fake.checkout_sessions(ACCOUNT).pop().ok_or_else(|| anyhow::anyhow!("no session"))?;
    let id = session["id"].as_str().unwrap_or_default().to_owned();
    let completed = b.fake.complete_checkout_session(ACCOUNT, &id).ok_or_else(|| anyhow::anyhow!("not open"))?;
    assert_eq!(b.fake.default_payment_method(ACCOUNT, &customer), None, "Checkout alone makes no default");

    let webhook = b.s.app.url(&format!("/stripe/webhooks/{}", b.s.project.id));
    for _ in 0..2 {
        let (status, body) =
            b.fake.send_event(&webhook, WHSEC, "checkout.session.completed", completed.clone(), None).await?;
        assert!(status.is_success(), "{body}");
    }
    b.process_events().await?;
    let made = tollgate_jobs::saved_payment_methods::make_defaults(&b.s.app.state.db, &b.services).await?;
    assert_eq!(made.made_default, 1, "{made:?}");
    let default = b.fake.default_payment_method(ACCOUNT, &customer);
    assert!(default.as_deref().is_some_and(|pm| pm.starts_with("pm_")), "{default:?}");
    let again = tollgate_jobs::saved_payment_methods::make_defaults(&b.s.app.state.db, &b.services).await?;
    assert_eq!(again.made_default, 0, "made default once");

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    b.fake.end_periods(ACCOUNT);
    let finalized = b.fake.finalize_invoices(ACCOUNT);
    let invoice = finalized.iter().find(|i| i["customer"] == customer.as_str()).cloned().unwrap_or_default();
    assert_eq!(
        (invoice["collection_method"].as_str(), invoice["status"].as_str()),
        (Some("charge_automatically"), Some("paid")),
        "{invoice}"
    );
    assert!(invoice["total"].as_i64() > Some(0), "{invoice}");
    b.s.app.stop().await
}

/// Stripe Tax (issue 21), turned on in the dashboard: a customer whose location Stripe does
/// not know gets no subscription (Stripe refuses automatic tax for it) and its usage waits,
/// with what is missing on the billing page; the setup link asks for the billing address, and
/// once the customer saved one there the subscription is made with automatic tax and the
/// usage lands on its invoice.
async fn stripe_tax_waits_for_the_location_the_setup_link_collects(db: TestDatabase) -> TestResult {
    let b = setup(&db).await?;
    b.connect_with_key().await?;
    let browser = b.dashboard().await?;
    let billing = format!("/projects/{}/billing", b.s.project.id);
    let saved = browser
        .submit(
            &billing,
            &format!("{billing}/collection"),
            &[("collection_method", "send_invoice"), ("days_until_due", "30"), ("automatic_tax", "on")],
        )
        .await?;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    assert!(payment_collection::automatic_tax(&b.s.app.state.db, &b.s.project.id).await?);
    assert!(browser.get(&billing).await?.body.contains("Stripe Tax: <strong>on</strong>"));

    b.calls("taxed", 2, 10).await?;
    b.provision().await?;
    let customer = b.stripe_customer("taxed").await?;
    assert!(b.fake.subscriptions(ACCOUNT).is_empty(), "a subscription without a tax location");
    let page = b.billing_page().await?;
    assert!(page.contains("Stripe Tax needs this customer") && page.contains("setup link"), "{page}");
    assert_eq!(b.deliver().await?.delivered, 0, "nothing is sent before the subscription exists");

    let (status, link) = b.s.api(Method::POST, "/api/v1/customers/taxed/payment-setup", Some(json!({}))).await?;
    assert_eq!(status, StatusCode::CREATED, "{link}");
    let session = b.fake.checkout_sessions(ACCOUNT).pop().ok_or_else(|| anyhow::anyhow!("no session"))?;
    assert_eq!(session["billing_address_collection"], "required", "{session}");
    let id = session["id"].as_str().unwrap_or_default().to_owned();
    let completed = b.fake.complete_checkout_session(ACCOUNT, &id).ok_or_else(|| anyhow::anyhow!("not open"))?;
    let webhook = b.s.app.url(&format!("/stripe/webhooks/{}", b.s.project.id));
    let (status, body) = b.fake.send_event(&webhook, WHSEC, "checkout.session.completed", completed, None).await?;
    assert!(status.is_success(), "{body}");
    b.process_events().await?;
    tollgate_jobs::saved_payment_methods::make_defaults(&b.s.app.state.db, &b.services).await?;
    b.provision().await?;
    let subscription = b.subscription("taxed").await?;
    assert_eq!(subscription["automatic_tax"]["enabled"], true, "{subscription}");
    assert_eq!(subscription["customer"], customer.as_str());
    b.deliver().await?;
    b.close_periods().await;
    b.invoiced_as_billed("taxed").await?;
    b.s.app.stop().await
}
