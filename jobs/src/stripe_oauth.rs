//! Stripe Connect's OAuth token endpoint: exchanging the authorization code Stripe sent back
//! with the member for the connected account's id, with the platform's secret key.
//!
//! `POST https://connect.stripe.com/oauth/token` with `grant_type=authorization_code` and
//! `code`, authenticated with the platform's secret key; the answer names the account in
//! `stripe_user_id`, with `livemode` and `scope`. A code is used once: Stripe answers 400
//! `{"error": "invalid_grant", "error_description": …}` for an unknown, expired or used one.
//! (Stripe, "Connect OAuth reference", <https://docs.stripe.com/connect/oauth-reference>, POST
//! /oauth/token; "Using OAuth with Standard accounts",
//! <https://docs.stripe.com/connect/oauth-standard-accounts>, step 4.)

use std::time::Duration;

use serde::Deserialize;

/// What the token endpoint grants (the access token is not kept: Tollgate acts with the
/// platform key and `Stripe-Account`, as Stripe recommends for Standard accounts).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Grant {
    pub stripe_user_id: String,
    pub livemode: bool,
    #[serde(default)]
    pub scope: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    #[error("Stripe could not be reached: {0}")]
    Transport(String),
    /// Stripe's OAuth error (`invalid_grant`, `invalid_request`, …) and its description.
    #[error("Stripe refused the authorization ({code}): {description}")]
    Refused { code: String, description: String },
    #[error("Stripe's answer could not be read: {0}")]
    Decode(String),
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// Exchanges `code` at `{oauth_base}/oauth/token`.
pub async fn exchange_code(
    http: &reqwest::Client,
    oauth_base: &str,
    platform_key: &secrecy::SecretString,
    code: &str,
) -> Result<Grant, OAuthError> {
    use secrecy::ExposeSecret;
    let url = format!("{}/oauth/token", oauth_base.trim_end_matches('/'));
    let response = http
        .post(url)
        .bearer_auth(platform_key.expose_secret())
        .form(&[("grant_type", "authorization_code"), ("code", code)])
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .map_err(|e| OAuthError::Transport(e.without_url().to_string()))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| OAuthError::Transport(e.without_url().to_string()))?;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|e| OAuthError::Decode(e.to_string()));
    }
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(e) => Err(OAuthError::Refused {
            description: e.error_description.unwrap_or_else(|| format!("HTTP {}", status.as_u16())),
            code: e.error,
        }),
        Err(_) => {
            Err(OAuthError::Refused { code: "http".to_owned(), description: format!("HTTP {}", status.as_u16()) })
        }
    }
}
