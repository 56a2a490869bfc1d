//! The guided first run: the overview's checklist of what a project still lacks before its
//! first call works (read from the database each time, so it completes itself), and the
//! snippets of a first call (curl, Python, JavaScript) with a model the project can call.

use tollgate_core::first_run;
use tollgate_core::money::Nanos;
use tollgate_core::pricing::{shipped_models, shipped_price};
use tollgate_core::projects::{self, Project, ProviderKind, ProviderSummary};

use super::error::WebError;
use crate::state::AppState;

/// One step of the first run.
pub struct Step {
    /// Names the step in the page (`step-<id>`).
    pub id: &'static str,
    /// What to do (`Create a key`).
    pub label: &'static str,
    pub done: bool,
    /// How to do it, or what was found, in a sentence.
    pub hint: String,
    /// The page that does it (none for what only the operator can change).
    pub href: Option<String>,
}

/// The steps of the first run, in the order they are done.
pub struct Checklist {
    pub steps: Vec<Step>,
}

impl Checklist {
    pub fn done(&self) -> bool {
        self.steps.iter().all(|s| s.done)
    }

    pub fn done_count(&self) -> usize {
        self.steps.iter().filter(|s| s.done).count()
    }
}

/// The checklist of `project`, as it stands now.
pub async fn checklist(state: &AppState, project: &Project) -> Result<Checklist, WebError> {
    let progress = first_run::progress(&state.db, &project.id).await?;
    let page = |path: &str| Some(format!("/projects/{}{path}", project.id));
    let public_url = state.config.public_url.trim_end_matches('/');
    let https = crate::middleware::hsts::served_over_https(public_url);
    let steps = vec![
        Step {
            id: "provider",
            label: "Connect a provider and test it",
            done: progress.provider_tested,
            hint: match (progress.provider_connected, progress.provider_tested) {
                (_, true) => "A connection answered its test.".to_owned(),
                (true, false) => "Press Test beside a connection: no test of one has succeeded yet.".to_owned(),
                (false, false) => "Add your OpenAI, Anthropic or OpenAI-compatible API key, then test it.".to_owned(),
            },
            href: page("/providers"),
        },
        Step {
            id: "budget",
            label: "Set a default budget",
            done: project.default_budget_nanos > 0,
            hint: if project.default_budget_nanos > 0 {
                format!(
                    "A new customer gets {} per {}.",
                    super::format::money(project.default_budget_nanos, &project.currency),
                    project.default_budget_period
                )
            } else {
                "It is 0: a customer seen for the first time cannot spend anything, so their calls are refused."
                    .to_owned()
            },
            href: page("/settings"),
        },
        Step {
            id: "key",
            label: "Create a key",
            done: progress.key_created,
            hint: "Your app sends it as Authorization: Bearer; it is shown once.".to_owned(),
            href: page("/keys"),
        },
        Step {
            id: "first-call",
            label: "Receive the first call",
            done: progress.first_call,
            hint: "Run the snippet below with your key.".to_owned(),
            href: page("#first-call"),
        },
        Step {
            id: "stripe",
            label: "Connect Stripe",
            done: progress.stripe_connected,
            hint: "Your customers' usage is billed through your Stripe account.".to_owned(),
            href: page("/billing"),
        },
        Step {
            id: "public-url",
            label: "Serve Tollgate at a public HTTPS URL",
            done: https,
            hint: if https {
                format!("Tollgate's public URL is {public_url}.")
            } else {
                format!(
                    "Tollgate's public URL is {public_url}: the operator of this Tollgate sets an https:// address \
                     (TOLLGATE_PUBLIC_URL) where your app can reach it."
                )
            },
            href: None,
        },
    ];
    Ok(Checklist { steps })
}

/// The customer the snippets name (a new one gets the project's default budget).
pub const EXAMPLE_CUSTOMER: &str = "customer-42";
/// The model the snippets name when the project can call none yet.
const PLACEHOLDER_MODEL: &str = "gpt-4o-mini";

/// A first call, three ways, ready to paste.
pub struct Snippets {
    /// This Tollgate's OpenAI-compatible API (`https://…/v1`).
    pub api: String,
    pub curl: String,
    pub python: String,
    pub javascript: String,
    /// Whether the model is one the project can call (else a placeholder).
    pub model_callable: bool,
    pub model: String,
}

/// The snippets of `project` at this Tollgate's public URL, with `key` (else an environment
/// variable).
pub async fn snippets(state: &AppState, project: &Project, key: Option<&str>) -> Result<Snippets, WebError> {
    let providers = projects::list_provider_summaries(&state.db, &project.id).await?;
    let overrides = projects::overridden_models(&state.db, &project.id).await?;
    let model = callable_model(&providers, &overrides, project.shipped_price_rate());
    let base_url = state.config.public_url.trim_end_matches('/');
    Ok(Snippets::new(base_url, key, model.as_deref().unwrap_or(PLACEHOLDER_MODEL), model.is_some()))
}

/// A model a chat completion of the project can be routed and priced for: of the first
/// OpenAI or OpenAI-compatible connection that serves one, an exact name, else the project's
/// priced model or the cheapest shipped model that matches a prefix. `shipped_rate`: what one
/// USD of a shipped price is in the project's currency (None: shipped prices do not apply).
pub fn callable_model(
    providers: &[ProviderSummary],
    overrides: &[String],
    shipped_rate: Option<Nanos>,
) -> Option<String> {
    let priced = |model: &str| {
        overrides.iter().any(|o| o == model) || (shipped_rate.is_some() && shipped_price(model).is_some())
    };
    let speaks_chat = |p: &&ProviderSummary| {
        matches!(ProviderKind::parse(&p.kind), Some(ProviderKind::OpenAi | ProviderKind::OpenAiCompatible))
    };
    for provider in providers.iter().filter(speaks_chat) {
        for pattern in provider.models.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            match pattern.strip_suffix('*') {
                None if priced(pattern) => return Some(pattern.to_owned()),
                None => {}
                Some(prefix) => {
                    if let Some(model) = overrides.iter().find(|o| o.starts_with(prefix)) {
                        return Some(model.clone());
                    }
                    if shipped_rate.is_some() {
                        let cheapest = shipped_models()
                            .into_iter()
                            .filter(|m| m.starts_with(prefix))
                            .filter_map(|m| shipped_price(m).map(|p| (p.input.saturating_add(p.output), m)))
                            .min();
                        if let Some((_, model)) = cheapest {
                            return Some(model.to_owned());
                        }
                    }
                }
            }
        }
    }
    None
}

/// `text` as a JSON string literal, which Python and JavaScript read as the same string.
fn literal(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// `text` in single quotes for a POSIX shell.
fn shell_quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl Snippets {
    pub fn new(base_url: &str, key: Option<&str>, model: &str, model_callable: bool) -> Self {
        let api = format!("{base_url}/v1");
        let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Hello!"}]});
        let curl = format!(
            "curl {api}/chat/completions \\\n  -H {auth} \\\n  -H {customer} \\\n  -H \"Content-Type: application/json\" \\\n  -d {body}",
            auth = match key {
                Some(key) => shell_quoted(&format!("Authorization: Bearer {key}")),
                None => "\"Authorization: Bearer $TOLLGATE_KEY\"".to_owned(),
            },
            customer = shell_quoted(&format!("X-Tollgate-Customer: {EXAMPLE_CUSTOMER}")),
            body = shell_quoted(&body.to_string()),
        );
        let (python_import, python_key) = match key {
            Some(key) => ("", literal(key)),
            None => ("import os\n", "os.environ[\"TOLLGATE_KEY\"]".to_owned()),
        };
        let python = format!(
            "# pip install openai\n{python_import}from openai import OpenAI\n\nclient = OpenAI(\n    base_url={api},\n    \
             api_key={python_key},\n    default_headers={{\"X-Tollgate-Customer\": {customer}}},\n)\n\
             response = client.chat.completions.create(\n    model={model},\n    \
             messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}],\n)\nprint(response.choices[0].message.content)",
            api = literal(&api),
            customer = literal(EXAMPLE_CUSTOMER),
            model = literal(model),
        );
        let javascript = format!(
            "// npm install openai; save as hello.mjs, run with node hello.mjs\nimport OpenAI from \"openai\";\n\n\
             const client = new OpenAI({{\n  baseURL: {api},\n  apiKey: {js_key},\n  \
             defaultHeaders: {{ \"X-Tollgate-Customer\": {customer} }},\n}});\n\
             const response = await client.chat.completions.create({{\n  model: {model},\n  \
             messages: [{{ role: \"user\", content: \"Hello!\" }}],\n}});\nconsole.log(response.choices[0].message.content);",
            api = literal(&api),
            js_key = key.map_or_else(|| "process.env.TOLLGATE_KEY".to_owned(), literal),
            customer = literal(EXAMPLE_CUSTOMER),
            model = literal(model),
        );
        Self { api, curl, python, javascript, model_callable, model: model.to_owned() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(kind: &str, models: &str) -> ProviderSummary {
        ProviderSummary {
            id: tollgate_core::ids::ProviderId::generate(),
            kind: kind.to_owned(),
            name: kind.to_owned(),
            base_url: "https://api.example.com/v1".to_owned(),
            models: models.to_owned(),
            created_at: 0,
        }
    }

    #[test]
    fn the_snippet_model_is_routed_and_priced() {
        let usd = Some(Nanos(1_000_000_000));
        let mock = [connection("openai_compatible", "mock-*")];
        assert_eq!(callable_model(&mock, &["mock-model".to_owned()], usd).as_deref(), Some("mock-model"));
        assert_eq!(callable_model(&mock, &[], usd), None, "no price for any mock model");
        let openai = [connection("anthropic", "claude-*"), connection("openai", "my-tune,gpt-4o*")];
        let model = callable_model(&openai, &[], usd).unwrap_or_default();
        assert!(model.starts_with("gpt-4o") && shipped_price(&model).is_some(), "{model}");
        assert_eq!(callable_model(&openai, &[], None), None, "shipped prices need a USD rate");
        assert_eq!(callable_model(&openai, &["my-tune".to_owned()], None).as_deref(), Some("my-tune"));
        assert_eq!(callable_model(&[connection("anthropic", "claude-*")], &[], usd), None, "not a chat completion");
    }

    #[test]
    fn snippets_quote_what_they_embed() {
        let s = Snippets::new("https://gw.example.com", Some("tg_sk_abc"), "it's", true);
        assert!(s.curl.contains("-H 'Authorization: Bearer tg_sk_abc'"), "{}", s.curl);
        assert!(s.curl.contains(r#""model":"it'\''s""#) && s.curl.ends_with("}'"), "{}", s.curl);
        assert!(s.python.contains("api_key=\"tg_sk_abc\"") && s.python.contains("model=\"it's\""), "{}", s.python);
        assert!(s.javascript.contains("baseURL: \"https://gw.example.com/v1\""), "{}", s.javascript);
        let placeholder = Snippets::new("https://gw.example.com", None, "gpt-4o-mini", false);
        assert!(placeholder.curl.contains("\"Authorization: Bearer $TOLLGATE_KEY\""), "{}", placeholder.curl);
        assert!(
            placeholder.python.contains("import os") && placeholder.python.contains("os.environ[\"TOLLGATE_KEY\"]")
        );
        assert!(placeholder.javascript.contains("apiKey: process.env.TOLLGATE_KEY"));
    }
}
