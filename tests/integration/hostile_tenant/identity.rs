//! What names a thing cannot be borrowed: a customer token issued before its customer was
//! deleted does not bring the customer back, and Stripe's ids (which a tenant's own webhook
//! endpoint receives, signed with the tenant's own secret) are unique per project, so one
//! tenant cannot spend another's event or invoice ids first.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::accounts::{self, NewOrganization};
use tollgate_core::projects::{self, BudgetPolicy, KeyKind, NewProject};
use tollgate_core::signature;
use tollgate_core::stripe;
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult};
use crate::proxy::{OUTPUT_NANOS_PER_TOKEN, setup};
use crate::stripe_webhooks::{deliver, invoice_event, now};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        an_old_customer_token_does_not_bring_a_deleted_customer_back,
        another_tenant_cannot_take_a_projects_stripe_ids_first,
    ]
}

/// Finding 9: a customer token outlives the customer it names (up to a day). Deleting the
/// customer and then calling with the token created the customer again, with the project's
/// default budget: an end user the tenant removed kept spending.
async fn an_old_customer_token_does_not_bring_a_deleted_customer_back(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    let state = &s.app.state;
    // New customers get a budget of 1,000 output tokens' worth.
    with_db!(&state.db, pool => sqlx::query("UPDATE projects SET default_budget_nanos = $1 WHERE id = $2")
        .bind(1_000 * OUTPUT_NANOS_PER_TOKEN).bind(&s.project.id).execute(pool).await.map(drop))?;
    let pk = projects::create_key(&state.db, &s.project.id, KeyKind::Publishable, "web").await?.plaintext;
    let mint = |customer: &'static str| {
        let request = s
            .app
            .client
            .post(s.app.url("/api/v1/customer-tokens"))
            .bearer_auth(&s.key)
            .json(&json!({"customer": customer, "ttl_seconds": 3600}));
        async move {
            let body: Value = request.send().await?.json().await?;
            anyhow::Ok(body["token"].as_str().unwrap_or_default().to_owned())
        }
    };
    let call = |token: String| {
        let request = s
            .app
            .client
            .post(s.app.url("/v1/chat/completions"))
            .bearer_auth(&pk)
            .header("x-tollgate-customer-token", token)
            .json(&json!({"model": "mock-model", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}));
        async move {
            let response = request.send().await?;
            anyhow::Ok((response.status(), response.json::<Value>().await.unwrap_or(Value::Null)))
        }
    };
    let old = mint("mallory").await?;
    assert_eq!(call(old.clone()).await?.0, StatusCode::OK, "the token works while its customer exists");

    let deleted = s.app.client.delete(s.app.url("/api/v1/customers/mallory")).bearer_auth(&s.key).send().await?;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let (status, body) = call(old.clone()).await?;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::FORBIDDEN, json!("customer_deleted")), "{body}");
    assert_eq!(body["error"]["type"], "permission_error", "{body}");
    assert!(projects::find_customer(&state.db, &s.project.id, "mallory").await?.is_none(), "the customer came back");
    assert_eq!(s.mock.requests().len(), 1, "the refused call reached the provider");

    // The tenant decides to let the customer back: a token minted now works (even within
    // the same second as the deletion), and the old one then reaches the customer again.
    let new = mint("mallory").await?;
    assert_eq!(call(new).await?.0, StatusCode::OK);
    assert!(projects::find_customer(&state.db, &s.project.id, "mallory").await?.is_some());
    assert_eq!(call(old).await?.0, StatusCode::OK, "a token of a customer that exists works");
    // Housekeeping forgets deletions older than any token.
    let remembered: i64 = with_db!(&state.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM deleted_customers").fetch_one(pool).await)?;
    assert_eq!(remembered, 1);
    let later = tollgate_core::time::UnixMillis::now().plus_secs(tollgate_core::tokens::MAX_TTL_SECS + 1);
    tollgate_jobs::housekeeping::run(&state.db, later).await?;
    let remembered: i64 = with_db!(&state.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM deleted_customers").fetch_one(pool).await)?;
    assert_eq!(remembered, 0);
    s.app.stop().await
}

/// Finding 9: `stripe_events` and `stripe_invoices` were keyed by Stripe's id alone. A
/// stranger's project, whose webhook secret the stranger chose, could store `evt_…`/`in_…`
/// ids first; the victim's genuine event was then acknowledged as a repeat and never
/// processed, and its invoice never recorded (no block on a failed payment, no invoice
/// shown).
async fn another_tenant_cannot_take_a_projects_stripe_ids_first(db: TestDatabase) -> TestResult {
    const VICTIM_SECRET: &str = "whsec_victim_0123456789abcdef";
    const STRANGER_SECRET: &str = "whsec_stranger_0123456789abcd";
    let s = setup(&db, BudgetPolicy::Reject).await?;
    let state = s.app.state.clone();
    stripe::connect_with_key(&state.db, &state.master_key, &s.project.id, "rk_test_51Hvictim00001234", VICTIM_SECRET)
        .await?;
    let stranger = accounts::create_organization_with_owner(
        &state.db,
        NewOrganization { name: "Stranger", owner_email: "eve@example.net", owner_password: "correct horse battery" },
    )
    .await?;
    let theirs = projects::create_project(
        &state.db,
        &stranger.org_id,
        &NewProject { name: "Bait".into(), ..Default::default() },
    )
    .await?;
    stripe::connect_with_key(&state.db, &state.master_key, &theirs.id, "rk_test_51Hstranger001234", STRANGER_SECRET)
        .await?;
    s.budget("acme-1", 100).await?;
    let customer = projects::find_customer(&state.db, &s.project.id, "acme-1").await?.expect("customer");
    assert!(stripe::link_customer(&state.db, &s.project.id, &customer.id, "cus_V1").await?);

    // The stranger stores the ids first, through its own endpoint, signed with its own secret.
    let t = 1_795_000_000;
    let bait = invoice_event("evt_shared", "invoice.paid", t + 100, "in_shared", "cus_V1", "paid");
    let (status, answer) =
        deliver(&s, theirs.id.as_str(), &bait, Some(signature::header(STRANGER_SECRET, now(), bait.as_bytes())))
            .await?;
    assert_eq!((status, answer["duplicate"].clone()), (StatusCode::OK, json!(false)), "{answer}");
    // The victim's genuine event with the same ids: a failed payment.
    let real = invoice_event("evt_shared", "invoice.payment_failed", t, "in_shared", "cus_V1", "open");
    let (status, answer) =
        deliver(&s, s.project.id.as_str(), &real, Some(signature::header(VICTIM_SECRET, now(), real.as_bytes())))
            .await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["duplicate"], false, "the victim's event was taken for a repeat: {answer}");
    stripe::process_pending(&state.db, 100).await?;

    let mine = stripe::invoices(&state.db, &s.project.id, None, 10).await?;
    let summary: Vec<(&str, &str, bool)> =
        mine.iter().map(|i| (i.id.as_str(), i.status.as_str(), i.payment_failed)).collect();
    assert_eq!(summary, [("in_shared", "open", true)], "the victim's own invoice state");
    let customer = projects::find_customer(&state.db, &s.project.id, "acme-1").await?.expect("customer");
    assert!(customer.blocked, "the failed payment blocks the victim's customer");
    let bait_invoices = stripe::invoices(&state.db, &theirs.id, None, 10).await?;
    assert_eq!(bait_invoices.len(), 1, "the stranger sees only its own record");
    assert_eq!(bait_invoices[0].customer_external_id, None, "and none of the victim's customers");
    s.app.stop().await
}
