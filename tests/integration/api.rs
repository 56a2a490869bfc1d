//! The management API: a tenant's backend manages customers and budgets with its secret key;
//! bad input gets problem+json and writes nothing; one project never sees another's customers.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::ledger;
use tollgate_core::money::Nanos;
use tollgate_core::projects::{self, KeyKind};
use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult};
use crate::proxy::{Setup, setup};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        customers_are_created_read_updated_and_deleted,
        bad_requests_get_problem_json_and_write_nothing,
        the_list_pages_with_cursors,
        keys_and_projects_are_kept_apart,
        a_budget_set_through_the_api_holds_on_the_proxy,
        a_deleted_customer_is_created_afresh_by_its_next_call,
        usage_is_exported_as_json_and_csv,
        keys_are_made_listed_and_revoked_and_settings_read,
        each_key_is_rate_limited_with_retry_after,
        an_idempotency_key_replays_the_first_answer,
        odd_input_gets_a_problem_never_a_server_error,
        the_openapi_document_is_served_without_a_key,
    ]
}

impl Setup {
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self.app.client.request(method, self.app.url(path)).bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let text = response.text().await?;
        if !status.is_success() {
            assert_eq!(content_type, "application/problem+json", "{status}: {text}");
        }
        Ok((status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? }))
    }
}

async fn count_customers(s: &Setup) -> anyhow::Result<i64> {
    Ok(
        with_db!(&s.app.state.db, pool => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM customers").fetch_one(pool).await)?,
    )
}

async fn customers_are_created_read_updated_and_deleted(db: TestDatabase) -> TestResult {
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    use reqwest::Method;
    let (status, created) = s
        .api(Method::POST, "/api/v1/customers", Some(json!({"id": "cust-1", "name": "Grace", "email": "grace@example.com", "budget": "10.00", "period": "month"})))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["id"], "cust-1");
    assert_eq!(created["budget"], "10.00");
    assert_eq!(created["budget_nanos"], 10_000_000_000i64);
    assert_eq!(created["remaining"], "10.00");
    assert_eq!(created["currency"], "usd");
    // The same id again updates (an upsert), it does not duplicate.
    let (status, again) = s
        .api(Method::POST, "/api/v1/customers", Some(json!({"id": "cust-1", "budget": "12.50", "period": "day"})))
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (again["budget"].clone(), again["period"].clone(), again["name"].clone()),
        (json!("12.50"), json!("day"), json!("Grace"))
    );
    let (status, got) = s.api(Method::GET, "/api/v1/customers/cust-1", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["email"], "grace@example.com");
    let (status, patched) =
        s.api(Method::PATCH, "/api/v1/customers/cust-1", Some(json!({"period": "rolling"}))).await?;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!((patched["period"].clone(), patched["budget"].clone()), (json!("rolling"), json!("12.50")));
    let (status, blocked) = s.api(Method::POST, "/api/v1/customers/cust-1/block", None).await?;
    assert_eq!((status, blocked["blocked"].clone()), (StatusCode::OK, json!(true)));
    let (_, unblocked) = s.api(Method::POST, "/api/v1/customers/cust-1/unblock", None).await?;
    assert_eq!(unblocked["blocked"], false);
    let (status, _) = s.api(Method::DELETE, "/api/v1/customers/cust-1", None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Every change is in the organization's audit log, by key.
    let actions: Vec<(String, String)> = with_db!(&s.app.state.db, pool => sqlx::query_as(
        "SELECT action, actor_email FROM audit_log ORDER BY created_at, id").fetch_all(pool).await)?;
    let names: Vec<&str> = actions.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        names,
        [
            "customer.saved",
            "customer.saved",
            "customer.saved",
            "customer.blocked",
            "customer.unblocked",
            "customer.deleted"
        ]
    );
    assert!(actions.iter().all(|(_, who)| who.starts_with("API key key_")), "{actions:?}");
    let (status, problem) = s.api(Method::GET, "/api/v1/customers/cust-1", None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(problem["status"], 404);
    assert_eq!(problem["type"], "urn:tollgate:problem:not-found");
    s.app.stop().await
}

async fn bad_requests_get_problem_json_and_write_nothing(db: TestDatabase) -> TestResult {
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    use reqwest::Method;
    for (body, field) in [
        (json!({"budget": "1"}), "id"),
        (json!({"id": "", "budget": "1"}), "id"),
        (json!({"id": "x".repeat(201), "budget": "1"}), "id"),
        (json!({"id": "c"}), "budget"),
        (json!({"id": "c", "budget": "-1"}), "budget"),
        (json!({"id": "c", "budget": "ten"}), "budget"),
        (json!({"id": "c", "budget": 1.5}), "budget"),
        (json!({"id": "c", "budget": "1", "period": "fortnight"}), "period"),
        (json!({"id": "c", "budget": "1", "email": "not an email"}), "email"),
    ] {
        let (status, problem) = s.api(Method::POST, "/api/v1/customers", Some(body.clone())).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {problem}");
        let fields: Vec<&str> =
            problem["errors"].as_array().into_iter().flatten().filter_map(|e| e["field"].as_str()).collect();
        assert!(fields.contains(&field), "{body}: expected a problem with {field}, got {problem}");
        assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    // Not JSON, an unknown field, the wrong content type.
    let (status, _) =
        s.api(Method::POST, "/api/v1/customers", Some(json!({"id": "c", "budget": "1", "colour": "red"}))).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let raw = s
        .app
        .client
        .post(s.app.url("/api/v1/customers"))
        .bearer_auth(&s.key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    assert_eq!(raw.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(raw.headers()["content-type"], "application/problem+json");
    let raw = s.app.client.post(s.app.url("/api/v1/customers")).bearer_auth(&s.key).body("id=c").send().await?;
    assert_eq!(raw.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _) = s.api(Method::GET, "/api/v1/customers?limit=0", None).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = s.api(Method::GET, "/api/v1/customers?cursor=%%%", None).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = s.api(Method::PATCH, "/api/v1/customers/ghost", Some(json!({"budget": "1"}))).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(count_customers(&s).await?, 0, "a refused request wrote a customer");
    s.app.stop().await
}

async fn the_list_pages_with_cursors(db: TestDatabase) -> TestResult {
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    use reqwest::Method;
    for i in 0..7 {
        s.api(Method::POST, "/api/v1/customers", Some(json!({"id": format!("c{i}"), "budget": "1"}))).await?;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/api/v1/customers?limit=3&cursor={c}"),
            None => "/api/v1/customers?limit=3".to_owned(),
        };
        let (status, page) = s.api(Method::GET, &path, None).await?;
        assert_eq!(status, StatusCode::OK);
        seen.extend(page["data"].as_array().into_iter().flatten().filter_map(|c| c["id"].as_str().map(str::to_owned)));
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]);
    s.app.stop().await
}

async fn keys_and_projects_are_kept_apart(db: TestDatabase) -> TestResult {
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    use reqwest::Method;
    s.api(Method::POST, "/api/v1/customers", Some(json!({"id": "mine", "budget": "5"}))).await?;
    // No key, a wrong key, a publishable key: 401 problems.
    let none = s.app.client.get(s.app.url("/api/v1/customers")).send().await?;
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(none.headers()["content-type"], "application/problem+json");
    let wrong = s.app.client.get(s.app.url("/api/v1/customers")).bearer_auth("tg_sk_wrong").send().await?;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let publishable = projects::create_key(&s.app.state.db, &s.project.id, KeyKind::Publishable, "web").await?;
    let refused = s.app.client.get(s.app.url("/api/v1/customers")).bearer_auth(&publishable.plaintext).send().await?;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    // Another project's key sees none of this project's customers.
    let other = projects::create_project(
        &s.app.state.db,
        &s.project.org_id,
        &projects::NewProject { name: "Other".into(), ..Default::default() },
    )
    .await?;
    let other_key = projects::create_key(&s.app.state.db, &other.id, KeyKind::Secret, "k").await?.plaintext;
    let get = |path: &'static str| s.app.client.get(s.app.url(path)).bearer_auth(&other_key).send();
    assert_eq!(get("/api/v1/customers/mine").await?.status(), StatusCode::NOT_FOUND);
    let list: Value = get("/api/v1/customers").await?.json().await?;
    assert_eq!(list["data"], json!([]));
    let deleted = s.app.client.delete(s.app.url("/api/v1/customers/mine")).bearer_auth(&other_key).send().await?;
    assert_eq!(deleted.status(), StatusCode::NOT_FOUND);
    assert_eq!(count_customers(&s).await?, 1);
    s.app.stop().await
}

async fn a_budget_set_through_the_api_holds_on_the_proxy(db: TestDatabase) -> TestResult {
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    use reqwest::Method;
    // 0.05 pays for two 20-token calls (0.02 each), not a third.
    s.api(Method::POST, "/api/v1/customers", Some(json!({"id": "api-cust", "budget": "0.05"}))).await?;
    let hello = json!({"model": "mock-model", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    let statuses = [
        s.chat("api-cust", hello.clone()).await?.status(),
        s.chat("api-cust", hello.clone()).await?.status(),
        s.chat("api-cust", hello.clone()).await?.status(),
    ];
    assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::PAYMENT_REQUIRED]);
    let (_, customer) = s.api(Method::GET, "/api/v1/customers/api-cust", None).await?;
    assert_eq!((customer["spent"].clone(), customer["remaining"].clone()), (json!("0.04"), json!("0.01")));
    // While a call holds budget, the customer cannot be deleted.
    let row = projects::find_customer(&s.app.state.db, &s.project.id, "api-cust")
        .await?
        .ok_or_else(|| anyhow::anyhow!("customer"))?;
    let ledger::ReserveOutcome::Reserved { reservation, .. } =
        ledger::reserve(&s.app.state.db, &row, Nanos(1), "held", UnixMillis::now().plus_secs(60)).await?
    else {
        anyhow::bail!("not reserved");
    };
    let (status, problem) = s.api(Method::DELETE, "/api/v1/customers/api-cust", None).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    ledger::release_expired(&s.app.state.db, UnixMillis::now().plus_secs(120)).await?;
    assert!(!ledger::renew(&s.app.state.db, &reservation, UnixMillis::now()).await?);
    let (status, _) = s.api(Method::DELETE, "/api/v1/customers/api-cust", None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Its usage stays in the ledger.
    let events: i64 = with_db!(&s.app.state.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM usage_events").fetch_one(pool).await)?;
    assert_eq!(events, 3);
    s.app.stop().await
}

/// The proxy keeps which row a customer id names for two seconds; a customer deleted in the
/// meantime — through the API here, or by another replica (no cache told) — is created afresh
/// by its next call, with the project's default budget and nothing spent.
async fn a_deleted_customer_is_created_afresh_by_its_next_call(db: TestDatabase) -> TestResult {
    use reqwest::Method;
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    let hello = json!({"model": "mock-model", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    let (db, project) = (&s.app.state.db, &s.project.id);
    let row_id = |external: &'static str| async move {
        let row = projects::find_customer(db, project, external).await?;
        anyhow::Ok(row.map(|c| (c.id, c.budget_nanos, c.spent_nanos)))
    };
    for (external, through_api) in [("phoenix", true), ("elsewhere", false)] {
        s.api(Method::POST, "/api/v1/customers", Some(json!({"id": external, "budget": "0.05"}))).await?;
        let first = s.chat(external, hello.clone()).await?;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(first.headers()["x-tollgate-remaining"], "0.03");
        let (old_id, ..) = row_id(external).await?.ok_or_else(|| anyhow::anyhow!("no {external}"))?;
        if through_api {
            let (status, _) = s.api(Method::DELETE, &format!("/api/v1/customers/{external}"), None).await?;
            assert_eq!(status, StatusCode::NO_CONTENT);
        } else {
            tollgate_core::customers::delete(db, project, external).await?;
        }
        // The project's default budget is zero: the fresh customer has nothing to spend.
        let refused = s.chat(external, hello.clone()).await?;
        assert_eq!(refused.status(), StatusCode::PAYMENT_REQUIRED, "{external}: {}", refused.text().await?);
        let (new_id, budget, spent) =
            row_id(external).await?.ok_or_else(|| anyhow::anyhow!("{external} not recreated"))?;
        assert_ne!(new_id, old_id, "{external}: a new row");
        assert_eq!((budget, spent), (0, 0), "{external}: the default budget, nothing spent");
        let refusals: i64 = with_db!(db, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM usage_events WHERE customer_id = $1 AND status = 'refused'").bind(&new_id).fetch_one(pool).await)?;
        assert_eq!(refusals, 1, "{external}: the refusal is the new customer's");
        // A budget set afterwards applies to the new row at once.
        s.api(Method::POST, "/api/v1/customers", Some(json!({"id": external, "budget": "0.05"}))).await?;
        let again = s.chat(external, hello.clone()).await?;
        assert_eq!(again.status(), StatusCode::OK);
        assert_eq!(again.headers()["x-tollgate-remaining"], "0.03", "{external}: spend starts from zero");
    }
    s.app.stop().await
}

async fn usage_is_exported_as_json_and_csv(db: TestDatabase) -> TestResult {
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    use reqwest::Method;
    s.api(Method::POST, "/api/v1/customers", Some(json!({"id": "a,b", "budget": "0.05"}))).await?;
    s.api(Method::POST, "/api/v1/customers", Some(json!({"id": "c2", "budget": "1"}))).await?;
    let hello = json!({"model": "mock-model", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    for customer in ["a,b", "a,b", "a,b", "c2"] {
        s.chat(customer, hello.clone()).await?;
    }
    let (status, usage) = s.api(Method::GET, "/api/v1/usage", None).await?;
    assert_eq!(status, StatusCode::OK, "{usage}");
    let rows = usage["data"].as_array().cloned().unwrap_or_default();
    let ab = rows.iter().find(|r| r["customer"] == "a,b").cloned().unwrap_or_default();
    assert_eq!(
        (ab["calls"].clone(), ab["refused"].clone(), ab["billed"].clone(), ab["output_tokens"].clone()),
        (json!(2), json!(1), json!("0.04"), json!(40))
    );
    let (_, one) = s.api(Method::GET, "/api/v1/usage?customer=c2", None).await?;
    assert_eq!(one["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["data"][0]["billed"], "0.02");

    let csv = s.app.client.get(s.app.url("/api/v1/usage?format=csv")).bearer_auth(&s.key).send().await?;
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let text = csv.text().await?;
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("day,customer,model,calls,refused,input_tokens,output_tokens,billed,currency,day_ms")
    );
    assert!(text.contains(",\"a,b\",mock-model,2,1,"), "a comma in an id is quoted: {text}");
    assert!(text.contains(",c2,mock-model,1,0,") && text.contains(",0.02,usd,"), "{text}");
    // Days are ISO 8601 dates (UTC), their Unix milliseconds last; the JSON has both too.
    let today = tollgate::routes::dashboard::format::date(UnixMillis::now().0);
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        let day_ms = fields.last().and_then(|ms| ms.parse::<i64>().ok()).unwrap_or(-1);
        assert_eq!(
            (fields[0], tollgate::routes::dashboard::format::date(day_ms)),
            (today.as_str(), today.clone()),
            "{line}"
        );
    }
    assert_eq!(ab["date"], json!(today), "{ab}");
    for bad in [
        "/api/v1/usage?from=abc",
        "/api/v1/usage?from=10&to=5",
        "/api/v1/usage?format=xml",
        "/api/v1/usage?from=0&to=99999999999",
    ] {
        let (status, problem) = s.api(Method::GET, bad, None).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {problem}");
    }
    s.app.stop().await
}

async fn keys_are_made_listed_and_revoked_and_settings_read(db: TestDatabase) -> TestResult {
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    use reqwest::Method;
    let (status, created) =
        s.api(Method::POST, "/api/v1/keys", Some(json!({"name": "worker", "kind": "secret"}))).await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap_or_default().to_owned();
    assert!(key.starts_with("tg_sk_"));
    assert_eq!(created["prefix"], key[..12]);
    let (_, listed) = s.api(Method::GET, "/api/v1/keys", None).await?;
    let keys = listed["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(keys.len(), 2);
    assert!(!listed.to_string().contains(&key), "a listed key showed its secret");
    let (status, _) = s.api(Method::POST, "/api/v1/keys", Some(json!({"kind": "root"}))).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // The new key works, until revoked: at once.
    let works = s.app.client.get(s.app.url("/api/v1/project")).bearer_auth(&key).send().await?;
    assert_eq!(works.status(), StatusCode::OK);
    let settings: Value = works.json().await?;
    assert_eq!((settings["budget_policy"].clone(), settings["currency"].clone()), (json!("reject"), json!("usd")));
    let id = created["id"].as_str().unwrap_or_default();
    let (status, revoked) = s.api(Method::POST, &format!("/api/v1/keys/{id}/revoke"), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(revoked["revoked_at"].is_i64(), "{revoked}");
    let refused = s.app.client.get(s.app.url("/api/v1/project")).bearer_auth(&key).send().await?;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = s.api(Method::POST, &format!("/api/v1/keys/{id}/revoke"), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "a key is revoked once");
    s.app.stop().await
}

async fn each_key_is_rate_limited_with_retry_after(db: TestDatabase) -> TestResult {
    let app = crate::helpers::spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_API_RATE_PER_SECOND".into(), "1".into());
    })
    .await?;
    let org = tollgate_core::accounts::create_organization_with_owner(
        &app.state.db,
        tollgate_core::accounts::NewOrganization {
            name: "Acme",
            owner_email: "ada@example.com",
            owner_password: "correct horse battery",
        },
    )
    .await?;
    let project = projects::create_project(
        &app.state.db,
        &org.org_id,
        &projects::NewProject { name: "P".into(), ..Default::default() },
    )
    .await?;
    let key = projects::create_key(&app.state.db, &project.id, KeyKind::Secret, "k").await?.plaintext;
    let other = projects::create_key(&app.state.db, &project.id, KeyKind::Secret, "k2").await?.plaintext;
    let get = |key: &str| app.client.get(app.url("/api/v1/project")).bearer_auth(key).send();
    // A burst of twice the rate (2) passes; of ten quick requests, some must wait (all ten
    // passing would take eight seconds).
    let mut limited = None;
    for i in 0..10 {
        let response = get(&key).await?;
        if i < 2 {
            assert_eq!(response.status(), StatusCode::OK, "request {i} of the burst");
        } else if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.ok_or_else(|| anyhow::anyhow!("ten requests at once were never limited"))?;
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_eq!(limited.headers()["content-type"], "application/problem+json");
    assert_eq!(get(&other).await?.status(), StatusCode::OK, "another key has its own budget of requests");
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    assert_eq!(get(&key).await?.status(), StatusCode::OK, "the bucket refills");
    app.stop().await
}

async fn an_idempotency_key_replays_the_first_answer(db: TestDatabase) -> TestResult {
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    let post = |key: &'static str, body: Value| {
        s.app
            .client
            .post(s.app.url("/api/v1/customers"))
            .bearer_auth(&s.key)
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let first = post("create-c1", json!({"id": "c1", "budget": "5"})).await?;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await?;
    // The retry gets the same answer (201, not 200), and nothing is done twice.
    let retry = post("create-c1", json!({"id": "c1", "budget": "5"})).await?;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await?, first);
    let saves: i64 = with_db!(&s.app.state.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE action = 'customer.saved'").fetch_one(pool).await)?;
    assert_eq!(saves, 1, "the retry did the work again");
    // The same key for another request is refused; a refused request is replayed as refused.
    let other = post("create-c1", json!({"id": "c1", "budget": "500"})).await?;
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.headers()["content-type"], "application/problem+json");
    let bad = post("bad", json!({"id": "c2"})).await?;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(post("bad", json!({"id": "c2"})).await?.headers()["idempotent-replayed"], "true");
    // Keys belong to a project: another project's same key is a new request.
    let other_project = projects::create_project(
        &s.app.state.db,
        &s.project.org_id,
        &projects::NewProject { name: "O".into(), ..Default::default() },
    )
    .await?;
    let other_key = projects::create_key(&s.app.state.db, &other_project.id, KeyKind::Secret, "k").await?.plaintext;
    let theirs = s
        .app
        .client
        .post(s.app.url("/api/v1/customers"))
        .bearer_auth(&other_key)
        .header("idempotency-key", "create-c1")
        .json(&json!({"id": "c1", "budget": "7"}))
        .send()
        .await?;
    assert_eq!(theirs.status(), StatusCode::CREATED);
    assert!(theirs.headers().get("idempotent-replayed").is_none());
    let (_, c1) = s.api(reqwest::Method::GET, "/api/v1/customers/c1", None).await?;
    assert_eq!(c1["budget"], "5.00", "the other project's request touched this one");
    s.app.stop().await
}

/// Input the database cannot store (a NUL byte: PostgreSQL refuses it in text), a body that is
/// JSON but not an object, a parameter given twice, a path that is no endpoint: each one a
/// problem that says so, never a 500, and nothing written.
async fn odd_input_gets_a_problem_never_a_server_error(db: TestDatabase) -> TestResult {
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    use reqwest::Method;
    let keys_before = with_db!(&s.app.state.db, pool => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM api_keys").fetch_one(pool).await)?;
    let nul_cursor = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, "a\0b");
    /// Request, and the answer's status and the field it names.
    type Case = (Method, String, Option<Value>, StatusCode, Option<&'static str>);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/api/v1/keys".into(),
            Some(json!({"name": "a\0b"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
        ),
        (
            Method::POST,
            "/api/v1/customers".into(),
            Some(json!({"id": "c", "budget": "1", "email": "a\0@b"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("email"),
        ),
        (Method::GET, "/api/v1/usage?customer=a%00b".into(), None, StatusCode::UNPROCESSABLE_ENTITY, Some("customer")),
        (
            Method::GET,
            format!("/api/v1/customers?cursor={nul_cursor}"),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("cursor"),
        ),
        (Method::GET, "/api/v1/customers/a%00b".into(), None, StatusCode::NOT_FOUND, None),
        (Method::DELETE, "/api/v1/customers/a%00b".into(), None, StatusCode::NOT_FOUND, None),
        (Method::POST, "/api/v1/customers/a%00b/block".into(), None, StatusCode::NOT_FOUND, None),
        (Method::POST, "/api/v1/keys".into(), Some(json!([null, null])), StatusCode::UNPROCESSABLE_ENTITY, None),
        (
            Method::POST,
            "/api/v1/customers".into(),
            Some(json!(["c", null, null, "1", null])),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (Method::GET, "/api/v1/customers?limit=1&limit=2".into(), None, StatusCode::UNPROCESSABLE_ENTITY, None),
        (Method::GET, "/api/v1/customers/".into(), None, StatusCode::NOT_FOUND, None),
        (Method::GET, "/api/v1/nothing/here".into(), None, StatusCode::NOT_FOUND, None),
    ];
    for (method, path, body, expected, field) in cases {
        let (status, problem) = s.api(method.clone(), &path, body).await?;
        assert_eq!(status, expected, "{method} {path}: {problem}");
        assert_eq!(problem["status"], expected.as_u16(), "{method} {path}: {problem}");
        if let Some(field) = field {
            assert_eq!(problem["errors"][0]["field"], field, "{method} {path}: {problem}");
        }
    }
    let keys_after = with_db!(&s.app.state.db, pool => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM api_keys").fetch_one(pool).await)?;
    assert_eq!(keys_after, keys_before);
    assert_eq!(count_customers(&s).await?, 0);
    s.app.stop().await
}

async fn the_openapi_document_is_served_without_a_key(db: TestDatabase) -> TestResult {
    let s = setup(&db, projects::BudgetPolicy::Reject).await?;
    let response = s.app.get("/api/v1/openapi.json").await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let document: Value = response.json().await?;
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["components"]["securitySchemes"]["secret_key"]["scheme"], "bearer");
    // Every route of the API is in it, each answer of an error as problem+json.
    let mut paths: Vec<&str> = document["paths"].as_object().into_iter().flatten().map(|(p, _)| p.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "/api/v1/customer-tokens",
            "/api/v1/customers",
            "/api/v1/customers/{id}",
            "/api/v1/customers/{id}/billing-portal",
            "/api/v1/customers/{id}/block",
            "/api/v1/customers/{id}/payment-setup",
            "/api/v1/customers/{id}/unblock",
            "/api/v1/keys",
            "/api/v1/keys/{id}/revoke",
            "/api/v1/project",
            "/api/v1/usage",
        ]
    );
    for (path, item) in document["paths"].as_object().into_iter().flatten() {
        for (method, operation) in item.as_object().into_iter().flatten() {
            let responses = operation["responses"].as_object().cloned().unwrap_or_default();
            for status in ["401", "429"] {
                assert!(responses.contains_key(status), "{method} {path} lacks {status}");
            }
            if method == "post" {
                let header =
                    operation["parameters"].as_array().into_iter().flatten().any(|p| p["name"] == "Idempotency-Key");
                assert!(header && responses.contains_key("409"), "{method} {path}: Idempotency-Key and its 409");
            }
            for (status, response) in responses.iter().filter(|(s, _)| !s.starts_with('2')) {
                let inline = response["content"].as_object().map(|c| c.keys().cloned().collect::<Vec<_>>());
                let shared = response["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/responses/"));
                let content = inline.or_else(|| {
                    let shared = &document["components"]["responses"][shared?]["content"];
                    shared.as_object().map(|c| c.keys().cloned().collect())
                });
                assert_eq!(content, Some(vec!["application/problem+json".to_owned()]), "{method} {path} {status}");
            }
        }
    }
    s.app.stop().await
}
