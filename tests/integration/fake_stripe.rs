//! A stand-in for Stripe's API over real HTTP, answering as Stripe does for the endpoints
//! Tollgate calls: keys are checked (401 with Stripe's error body otherwise), `Stripe-Account`
//! picks the connected account, and every request is recorded for the test to inspect.
//! It grows with the billing work (meters, meter events, customers, subscriptions).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub key: Option<String>,
    pub account: Option<String>,
}

#[derive(Default)]
struct Inner {
    /// Key → the account it belongs to.
    keys: HashMap<String, String>,
    seen: Vec<SeenRequest>,
}

#[derive(Clone)]
pub struct FakeStripe {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    server: Arc<tokio::task::JoinHandle<()>>,
}

fn stripe_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(json!({ "error": { "type": kind, "message": message } }))).into_response()
}

impl FakeStripe {
    /// Starts the fake with `keys` (key, account id) accepted.
    pub async fn start(keys: &[(&str, &str)]) -> anyhow::Result<Self> {
        let inner = Arc::new(Mutex::new(Inner {
            keys: keys.iter().map(|(k, a)| ((*k).to_owned(), (*a).to_owned())).collect(),
            seen: Vec::new(),
        }));
        let app = axum::Router::new().route("/v1/account", get(account)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, inner, server: Arc::new(server) })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.inner.lock().unwrap().seen.clone()
    }

    /// Stops answering (connections are refused), as when Stripe is unreachable.
    pub fn stop(&self) {
        self.server.abort();
    }
}

/// Who is calling: the key's account, or the message of Stripe's 401.
fn authenticate(inner: &Mutex<Inner>, method: &str, path: &str, headers: &HeaderMap) -> Result<String, String> {
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let account = headers.get("stripe-account").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut inner = inner.lock().unwrap();
    inner.seen.push(SeenRequest {
        method: method.into(),
        path: path.into(),
        key: key.clone(),
        account: account.clone(),
    });
    let Some(own) = key.as_ref().and_then(|k| inner.keys.get(k)).cloned() else {
        let shown = key.as_deref().map(|k| format!("{}***", k.chars().take(8).collect::<String>())).unwrap_or_default();
        return Err(format!("Invalid API Key provided: {shown}"));
    };
    Ok(account.unwrap_or(own))
}

async fn account(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap) -> Response {
    match authenticate(&inner, "GET", "/v1/account", &headers) {
        Ok(account) => Json(json!({
            "id": account, "object": "account", "email": "billing@tenant.example", "country": "US",
            "charges_enabled": true, "type": "standard"
        }))
        .into_response(),
        Err(message) => stripe_error(StatusCode::UNAUTHORIZED, "invalid_request_error", &message),
    }
}
