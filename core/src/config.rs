//! Settings, read once at start from environment variables (`TOLLGATE_*`) over an optional
//! TOML file, and validated into [`Config`]. Every error names the setting and where its
//! value came from; secret values are never part of an error or of `Debug` output.
//!
//! With no configuration at all Tollgate serves on [`DEFAULT_LISTEN`] with SQLite under
//! `./data` (see the README's configuration table).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::crypto::MasterKey;
use crate::egress::EgressAllow;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Info for Tollgate; sqlx's per-statement notices only when asked for.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn";

/// Development serves plain HTTP with generated secrets; production demands explicit ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// How hard SQLite pushes each commit to disk (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqliteSync {
    /// fsync the WAL on every commit: a committed ledger write survives power loss.
    Full,
    /// fsync at checkpoints only: survives a process crash, not a power cut.
    Normal,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub listen: SocketAddr,
    /// The URL tenants' apps and browsers use to reach this server (links, snippets, cookies).
    pub public_url: String,
    pub data_dir: PathBuf,
    pub database_url: SecretString,
    pub database_max_connections: u32,
    pub sqlite_synchronous: SqliteSync,
    /// `None` means: use (or create) `master.key` in the data directory (development only).
    pub master_key: Option<MasterKey>,
    pub log_format: LogFormat,
    pub log_filter: String,
    /// How long shutdown waits for in-flight requests and streams before it cuts them.
    pub shutdown_grace: Duration,
    /// Whether `serve` also runs the background job workers in its own process.
    pub run_workers: bool,
    /// The name this process serves under across restarts (default: host and listening
    /// address). A process that starts under the name of one that died releases what the dead
    /// one held at once (see `tollgate_core::instances`); two live processes must not share one.
    pub instance_name: Option<String>,
    /// Where mail goes: `smtps://user:pass@host:465` (TLS), `smtp://user:pass@host:587?tls=required`
    /// (STARTTLS), or `smtp://host:25` (plain, for a relay on a trusted network). None: links
    /// that would be mailed are written to the log instead.
    pub smtp_url: Option<SecretString>,
    /// The sender of that mail.
    pub smtp_from: String,
    /// Requests per second each key may make to the management API (bursts of twice that).
    pub api_rate_per_second: u32,
    /// The first wait before an alert delivery that failed is tried again; each later wait is
    /// four times longer (capped at six hours).
    pub alert_retry_base: Duration,
    /// Deprecated (use `egress_allow`): whether alert webhooks may go to any address,
    /// private ones included. Off by default.
    pub webhooks_allow_private: bool,
    /// The private destinations (networks, host names) tenants' providers and webhooks may be
    /// at, beyond public addresses (see [`crate::egress`]). Empty by default, so a tenant
    /// cannot make this server call into the network it runs in.
    pub egress_allow: EgressAllow,
    /// Where Stripe's API is (`https://api.stripe.com`); tests point it at a fake.
    pub stripe_api_base: String,
    /// The operator's Stripe platform key (`sk_…`), for projects billed through Stripe Connect
    /// (calls made on the tenant's connected account with the `Stripe-Account` header).
    pub stripe_platform_key: Option<SecretString>,
    /// The signing secret of the platform's Connect webhook endpoint (`whsec_…`), which
    /// receives the events of every connected account.
    pub stripe_connect_webhook_secret: Option<SecretString>,
    /// The signing secret of the platform's event destination for connected accounts'
    /// thin events (`whsec_…`; Stripe reports meter errors only there), which names each event's
    /// account in `context`. It must differ from the Connect webhook endpoint's.
    pub stripe_connect_event_secret: Option<SecretString>,
    /// The platform's Connect client id (`ca_…`): with the platform key, tenants connect their
    /// Stripe account through Stripe's OAuth.
    pub stripe_connect_client_id: Option<String>,
    /// Where Stripe's OAuth pages and token endpoint are (`https://connect.stripe.com`); tests
    /// point it at a fake.
    pub stripe_oauth_base: String,
    /// How often each worker process compares delivered usage with Stripe's meter summaries.
    pub stripe_reconcile_interval: Duration,
    /// Usage older than this when it is first sent to Stripe is stamped this long ago instead,
    /// so that it still lands on an invoice: Stripe keeps an ended period's invoice a draft,
    /// open to late usage, for its finalization grace period (an hour by default). Less than
    /// the grace period of every account billed (50 minutes by default).
    pub stripe_late_usage_window: Duration,
    /// Meter events each worker sends a second per project; `None`: four fifths of Stripe's
    /// limit for the project's mode (800 live, 20 in test mode).
    pub stripe_meter_events_per_second: Option<u32>,
    /// Accounts and sessions (see `accounts`).
    pub accounts: AccountSettings,
    /// Bounds on what one request, or one upstream, may take of the server.
    pub limits: RequestLimits,
    /// How many keys, projects and customers this process keeps in memory at most.
    pub memory: MemoryBounds,
}

/// The most entries each in-memory cache of the server holds (see `tollgate::memory`): past
/// it the entry written longest ago is dropped, and read again from the database when needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBounds {
    /// Project keys the proxy looked up (live, revoked or unknown), and as many keys' last
    /// recorded use.
    pub keys: usize,
    /// Projects' call configurations (providers with their keys, prices).
    pub projects: usize,
    /// Customers (id and budget period by external id), across projects.
    pub customers: usize,
    /// Management API keys with a rate-limit bucket.
    pub api_rate_keys: usize,
}

impl Default for MemoryBounds {
    fn default() -> Self {
        Self { keys: 10_000, projects: 2_000, customers: 50_000, api_rate_keys: 10_000 }
    }
}

/// Who may sign up, how long a dashboard session lives, and where a client's address is read.
#[derive(Debug, Clone)]
pub struct AccountSettings {
    /// Whether anyone may create an organization at `/signup`; false: invitations only (and
    /// `tollgate admin create-org`).
    pub signup_open: bool,
    /// A dashboard session ends this long after its login, however active (beside the idle
    /// expiry).
    pub session_lifetime: Duration,
    /// Reverse proxies whose `X-Forwarded-For` is believed: a request from one of these is from
    /// the right-most address of that header that is not itself one of these.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The longest an email's logins wait between attempts once many have failed (the
    /// per-email backoff never locks an account for longer).
    pub login_backoff_max: Duration,
}

impl Default for AccountSettings {
    fn default() -> Self {
        Self {
            signup_open: true,
            session_lifetime: Duration::from_secs(30 * 24 * 3600),
            trusted_proxies: Vec::new(),
            login_backoff_max: Duration::from_secs(30),
        }
    }
}

impl AccountSettings {
    /// Whether `ip` is one of the trusted reverse proxies.
    pub fn is_trusted_proxy(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// Bounds on the work and the time one request, or one tenant's upstream, may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// How long a client has to send a request's headers (and how long a kept-alive
    /// connection may stay idle before its next request).
    pub header_read_timeout: Duration,
    /// How long a client has to send a request's whole body, from its headers on.
    pub body_read_timeout: Duration,
    /// The longest one proxied call may take upstream, JSON or streamed, before it is cut
    /// (and settled for what it delivered).
    pub upstream_max_duration: Duration,
    /// How far past its max output (× `n`), in percent, a stream may deliver before it is cut.
    pub stream_output_margin_percent: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            upstream_max_duration: Duration::from_secs(30 * 60),
            stream_output_margin_percent: 50,
        }
    }
}

impl Config {
    /// Reads the configuration from the process environment, and from the TOML file named
    /// by `file` (or by `TOLLGATE_CONFIG`) when there is one.
    pub fn from_env(file: Option<&Path>) -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("TOLLGATE_")).collect();
        Self::load(file, &vars)
    }

    /// Like [`Config::from_env`], with the environment given explicitly (for tests).
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let file = file.map(Path::to_path_buf).or_else(|| env.get("TOLLGATE_CONFIG").map(PathBuf::from));
        let mut raw = match &file {
            Some(path) => RawConfig::from_file(path)?,
            None => Sourced::default(),
        };
        raw.overlay_env(env)?;
        raw.validate()
    }

    /// The master key: the configured one, or (development only) the one kept in
    /// `<data_dir>/master.key`, created on first start.
    pub fn resolve_master_key(&self) -> Result<MasterKey, crate::crypto::KeyError> {
        match &self.master_key {
            Some(key) => Ok(key.clone()),
            None => MasterKey::load_or_create(&self.data_dir.join("master.key")),
        }
    }

    pub fn is_sqlite(&self) -> bool {
        self.database_url.expose_secret().starts_with("sqlite:")
    }

    /// The database URL with any password replaced, safe to log.
    pub fn database_url_redacted(&self) -> String {
        redact_url(self.database_url.expose_secret())
    }
}

/// Replaces the password part of `scheme://user:password@host/…` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("{setting} ({source_name}): {reason}")]
    Invalid { setting: &'static str, source_name: String, reason: String },
    #[error("{setting} is required in production mode: {hint}")]
    Required { setting: &'static str, hint: &'static str },
}

/// The file's shape: the same names as the environment variables, lower case, without
/// the `TOLLGATE_` prefix. Unknown keys are an error, not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mode: Option<String>,
    listen: Option<String>,
    public_url: Option<String>,
    data_dir: Option<String>,
    database_url: Option<String>,
    database_max_connections: Option<u32>,
    sqlite_synchronous: Option<String>,
    master_key: Option<String>,
    log_format: Option<String>,
    log: Option<String>,
    shutdown_grace_seconds: Option<u64>,
    workers: Option<bool>,
    instance_name: Option<String>,
    smtp_url: Option<String>,
    smtp_from: Option<String>,
    api_rate_per_second: Option<u32>,
    alert_retry_base_seconds: Option<u64>,
    webhooks_allow_private: Option<bool>,
    egress_allow: Option<String>,
    stripe_api_base: Option<String>,
    stripe_platform_key: Option<String>,
    stripe_connect_webhook_secret: Option<String>,
    stripe_connect_event_secret: Option<String>,
    stripe_connect_client_id: Option<String>,
    stripe_oauth_base: Option<String>,
    stripe_reconcile_seconds: Option<u64>,
    stripe_late_usage_seconds: Option<u64>,
    stripe_meter_events_per_second: Option<u32>,
    signup_open: Option<bool>,
    session_lifetime_seconds: Option<u64>,
    trusted_proxies: Option<String>,
    login_backoff_max_seconds: Option<u64>,
    header_read_timeout_seconds: Option<u64>,
    body_read_timeout_seconds: Option<u64>,
    upstream_max_seconds: Option<u64>,
    stream_output_margin_percent: Option<u32>,
    cache_max_keys: Option<usize>,
    cache_max_projects: Option<usize>,
    cache_max_customers: Option<usize>,
    api_rate_max_keys: Option<usize>,
}

/// Raw settings plus where each came from, so errors can point at the right place.
#[derive(Default)]
struct Sourced {
    raw: RawConfig,
    sources: HashMap<&'static str, String>,
}

/// (file key, environment variable) for every setting.
const SETTINGS: &[(&str, &str)] = &[
    ("mode", "TOLLGATE_MODE"),
    ("listen", "TOLLGATE_LISTEN"),
    ("public_url", "TOLLGATE_PUBLIC_URL"),
    ("data_dir", "TOLLGATE_DATA_DIR"),
    ("database_url", "TOLLGATE_DATABASE_URL"),
    ("database_max_connections", "TOLLGATE_DATABASE_MAX_CONNECTIONS"),
    ("sqlite_synchronous", "TOLLGATE_SQLITE_SYNCHRONOUS"),
    ("master_key", "TOLLGATE_MASTER_KEY"),
    ("log_format", "TOLLGATE_LOG_FORMAT"),
    ("log", "TOLLGATE_LOG"),
    ("shutdown_grace_seconds", "TOLLGATE_SHUTDOWN_GRACE_SECONDS"),
    ("workers", "TOLLGATE_WORKERS"),
    ("instance_name", "TOLLGATE_INSTANCE_NAME"),
    ("smtp_url", "TOLLGATE_SMTP_URL"),
    ("smtp_from", "TOLLGATE_SMTP_FROM"),
    ("api_rate_per_second", "TOLLGATE_API_RATE_PER_SECOND"),
    ("alert_retry_base_seconds", "TOLLGATE_ALERT_RETRY_BASE_SECONDS"),
    ("webhooks_allow_private", "TOLLGATE_WEBHOOKS_ALLOW_PRIVATE"),
    ("egress_allow", "TOLLGATE_EGRESS_ALLOW"),
    ("stripe_api_base", "TOLLGATE_STRIPE_API_BASE"),
    ("stripe_platform_key", "TOLLGATE_STRIPE_PLATFORM_KEY"),
    ("stripe_connect_webhook_secret", "TOLLGATE_STRIPE_CONNECT_WEBHOOK_SECRET"),
    ("stripe_connect_event_secret", "TOLLGATE_STRIPE_CONNECT_EVENT_SECRET"),
    ("stripe_connect_client_id", "TOLLGATE_STRIPE_CONNECT_CLIENT_ID"),
    ("stripe_oauth_base", "TOLLGATE_STRIPE_OAUTH_BASE"),
    ("stripe_reconcile_seconds", "TOLLGATE_STRIPE_RECONCILE_SECONDS"),
    ("stripe_late_usage_seconds", "TOLLGATE_STRIPE_LATE_USAGE_SECONDS"),
    ("stripe_meter_events_per_second", "TOLLGATE_STRIPE_METER_EVENTS_PER_SECOND"),
    ("signup_open", "TOLLGATE_SIGNUP_OPEN"),
    ("session_lifetime_seconds", "TOLLGATE_SESSION_LIFETIME_SECONDS"),
    ("trusted_proxies", "TOLLGATE_TRUSTED_PROXIES"),
    ("login_backoff_max_seconds", "TOLLGATE_LOGIN_BACKOFF_MAX_SECONDS"),
    ("header_read_timeout_seconds", "TOLLGATE_HEADER_READ_TIMEOUT_SECONDS"),
    ("body_read_timeout_seconds", "TOLLGATE_BODY_READ_TIMEOUT_SECONDS"),
    ("upstream_max_seconds", "TOLLGATE_UPSTREAM_MAX_SECONDS"),
    ("stream_output_margin_percent", "TOLLGATE_STREAM_OUTPUT_MARGIN_PERCENT"),
    ("cache_max_keys", "TOLLGATE_CACHE_MAX_KEYS"),
    ("cache_max_projects", "TOLLGATE_CACHE_MAX_PROJECTS"),
    ("cache_max_customers", "TOLLGATE_CACHE_MAX_CUSTOMERS"),
    ("api_rate_max_keys", "TOLLGATE_API_RATE_MAX_KEYS"),
];

fn env_name(key: &str) -> &'static str {
    SETTINGS.iter().find(|(k, _)| *k == key).map(|(_, e)| *e).unwrap_or("TOLLGATE_?")
}

impl RawConfig {
    fn from_file(path: &Path) -> Result<Sourced, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File { path: path.display().to_string(), reason: e.to_string() })?;
        let raw: RawConfig = toml::from_str(&text)
            .map_err(|e| ConfigError::File { path: path.display().to_string(), reason: e.message().to_owned() })?;
        let mut sources = HashMap::new();
        let file_source = |key: &str| format!("`{key}` in {}", path.display());
        for (key, _) in SETTINGS {
            sources.insert(*key, file_source(key));
        }
        Ok(Sourced { raw, sources })
    }
}

impl Sourced {
    fn overlay_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        for (key, var) in SETTINGS {
            let Some(value) = env.get(*var) else { continue };
            self.sources.insert(key, var.to_string());
            let invalid = |reason: String| ConfigError::Invalid { setting: key, source_name: var.to_string(), reason };
            let r = &mut self.raw;
            let text = Some(value.clone());
            match *key {
                "mode" => r.mode = text,
                "listen" => r.listen = text,
                "public_url" => r.public_url = text,
                "data_dir" => r.data_dir = text,
                "database_url" => r.database_url = text,
                "sqlite_synchronous" => r.sqlite_synchronous = text,
                "master_key" => r.master_key = text,
                "log_format" => r.log_format = text,
                "log" => r.log = text,
                "smtp_url" => r.smtp_url = text,
                "smtp_from" => r.smtp_from = text,
                "instance_name" => r.instance_name = text,
                "egress_allow" => r.egress_allow = text,
                "stripe_api_base" => r.stripe_api_base = text,
                "stripe_platform_key" => r.stripe_platform_key = text,
                "stripe_connect_webhook_secret" => r.stripe_connect_webhook_secret = text,
                "stripe_connect_event_secret" => r.stripe_connect_event_secret = text,
                "stripe_connect_client_id" => r.stripe_connect_client_id = text,
                "stripe_oauth_base" => r.stripe_oauth_base = text,
                "stripe_late_usage_seconds" => {
                    r.stripe_late_usage_seconds = Some(
                        value
                            .trim()
                            .parse()
                            .map_err(|_| invalid(format!("expected a number of seconds, got {value:?}")))?,
                    )
                }
                "stripe_reconcile_seconds" => {
                    r.stripe_reconcile_seconds = Some(
                        value
                            .trim()
                            .parse()
                            .map_err(|_| invalid(format!("expected a number of seconds, got {value:?}")))?,
                    )
                }
                "database_max_connections" => {
                    r.database_max_connections = Some(
                        value.trim().parse().map_err(|_| invalid(format!("expected a whole number, got {value:?}")))?,
                    )
                }
                "shutdown_grace_seconds" => {
                    r.shutdown_grace_seconds = Some(
                        value
                            .trim()
                            .parse()
                            .map_err(|_| invalid(format!("expected a number of seconds, got {value:?}")))?,
                    )
                }
                "stripe_meter_events_per_second" => {
                    r.stripe_meter_events_per_second = Some(
                        value.trim().parse().map_err(|_| invalid(format!("expected a whole number, got {value:?}")))?,
                    )
                }
                "api_rate_per_second" => {
                    r.api_rate_per_second = Some(
                        value.trim().parse().map_err(|_| invalid(format!("expected a whole number, got {value:?}")))?,
                    )
                }
                "alert_retry_base_seconds" => {
                    r.alert_retry_base_seconds = Some(
                        value
                            .trim()
                            .parse()
                            .map_err(|_| invalid(format!("expected a number of seconds, got {value:?}")))?,
                    )
                }
                "webhooks_allow_private" => {
                    r.webhooks_allow_private = Some(
                        parse_bool(value).ok_or_else(|| invalid(format!("expected true or false, got {value:?}")))?,
                    )
                }
                "workers" => {
                    r.workers = Some(
                        parse_bool(value).ok_or_else(|| invalid(format!("expected true or false, got {value:?}")))?,
                    )
                }
                "signup_open" => {
                    r.signup_open = Some(
                        parse_bool(value).ok_or_else(|| invalid(format!("expected true or false, got {value:?}")))?,
                    )
                }
                "trusted_proxies" => r.trusted_proxies = text,
                "session_lifetime_seconds"
                | "login_backoff_max_seconds"
                | "header_read_timeout_seconds"
                | "body_read_timeout_seconds"
                | "upstream_max_seconds" => {
                    let seconds = Some(
                        value
                            .trim()
                            .parse()
                            .map_err(|_| invalid(format!("expected a number of seconds, got {value:?}")))?,
                    );
                    match *key {
                        "session_lifetime_seconds" => r.session_lifetime_seconds = seconds,
                        "login_backoff_max_seconds" => r.login_backoff_max_seconds = seconds,
                        "header_read_timeout_seconds" => r.header_read_timeout_seconds = seconds,
                        "body_read_timeout_seconds" => r.body_read_timeout_seconds = seconds,
                        _ => r.upstream_max_seconds = seconds,
                    }
                }
                "stream_output_margin_percent" => {
                    r.stream_output_margin_percent = Some(
                        value.trim().parse().map_err(|_| invalid(format!("expected a whole number, got {value:?}")))?,
                    )
                }
                "cache_max_keys" | "cache_max_projects" | "cache_max_customers" | "api_rate_max_keys" => {
                    let count = Some(
                        value.trim().parse().map_err(|_| invalid(format!("expected a whole number, got {value:?}")))?,
                    );
                    match *key {
                        "cache_max_keys" => r.cache_max_keys = count,
                        "cache_max_projects" => r.cache_max_projects = count,
                        "cache_max_customers" => r.cache_max_customers = count,
                        _ => r.api_rate_max_keys = count,
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn source(&self, key: &'static str) -> String {
        self.sources.get(key).cloned().unwrap_or_else(|| env_name(key).to_owned())
    }

    fn invalid(&self, key: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { setting: key, source_name: self.source(key), reason: reason.into() }
    }

    fn validate(self) -> Result<Config, ConfigError> {
        let r = &self.raw;
        let mode = match r.mode.as_deref().map(str::trim) {
            None | Some("development") | Some("dev") => Mode::Development,
            Some("production") | Some("prod") => Mode::Production,
            Some(other) => {
                return Err(self.invalid("mode", format!("expected development or production, got {other:?}")));
            }
        };
        let listen_text = r.listen.as_deref().unwrap_or(DEFAULT_LISTEN).trim();
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            self.invalid("listen", format!("expected an address like 127.0.0.1:8080, got {listen_text:?}"))
        })?;
        let public_url = match r.public_url.as_deref().map(str::trim) {
            Some(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(self.invalid("public_url", format!("expected an http:// or https:// URL, got {url:?}")));
                }
                url.trim_end_matches('/').to_owned()
            }
            None => format!("http://{listen}"),
        };
        let data_dir = PathBuf::from(r.data_dir.as_deref().unwrap_or(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(self.invalid("data_dir", "must not be empty"));
        }
        let database_url = match r.database_url.as_deref().map(str::trim) {
            Some(url)
                if url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://") =>
            {
                url.to_owned()
            }
            Some(url) => {
                return Err(self.invalid(
                    "database_url",
                    format!("expected a sqlite: or postgres:// URL, got {:?}", redact_url(url)),
                ));
            }
            None => format!("sqlite://{}", data_dir.join("tollgate.db").display()),
        };
        let database_max_connections = r.database_max_connections.unwrap_or(10);
        if database_max_connections == 0 {
            return Err(self.invalid("database_max_connections", "must be at least 1"));
        }
        let sqlite_synchronous = match r.sqlite_synchronous.as_deref().map(str::trim) {
            None | Some("full") => SqliteSync::Full,
            Some("normal") => SqliteSync::Normal,
            Some(other) => {
                return Err(self.invalid("sqlite_synchronous", format!("expected full or normal, got {other:?}")));
            }
        };
        let master_key = match r.master_key.as_deref() {
            Some(text) => Some(
                MasterKey::from_base64(text)
                    .map_err(|e| self.invalid("master_key", format!("{e} (the value is not shown)")))?,
            ),
            None if mode == Mode::Production => {
                return Err(ConfigError::Required {
                    setting: "TOLLGATE_MASTER_KEY",
                    hint: "generate one with `tollgate admin generate-master-key` and keep it safe: it decrypts every stored provider and Stripe secret",
                });
            }
            None => None,
        };
        let log_format = match r.log_format.as_deref().map(str::trim) {
            None | Some("human") | Some("text") => LogFormat::Human,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(self.invalid("log_format", format!("expected human or json, got {other:?}"))),
        };
        let log_filter = r.log.clone().unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned());
        let shutdown_grace = Duration::from_secs(r.shutdown_grace_seconds.unwrap_or(30));
        let smtp_url = match r.smtp_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            Some(url) if url.starts_with("smtp://") || url.starts_with("smtps://") => {
                Some(SecretString::from(url.to_owned()))
            }
            Some(url) => {
                return Err(
                    self.invalid("smtp_url", format!("expected an smtp:// or smtps:// URL, got {:?}", redact_url(url)))
                );
            }
            None => None,
        };
        let smtp_from = match r.smtp_from.as_deref().map(str::trim).filter(|f| !f.is_empty()) {
            Some(from) if from.contains('@') => from.to_owned(),
            Some(from) => return Err(self.invalid("smtp_from", format!("expected an email address, got {from:?}"))),
            None => format!("Tollgate <tollgate@{}>", listen.ip()),
        };
        let api_rate_per_second = r.api_rate_per_second.unwrap_or(50);
        if api_rate_per_second == 0 {
            return Err(self.invalid("api_rate_per_second", "must be at least 1"));
        }
        let alert_retry_base = Duration::from_secs(r.alert_retry_base_seconds.unwrap_or(10));
        if alert_retry_base.is_zero() {
            return Err(self.invalid("alert_retry_base_seconds", "must be at least 1"));
        }
        let stripe_api_base = match r.stripe_api_base.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            None => "https://api.stripe.com".to_owned(),
            Some(url)
                if (url.starts_with("https://") || url.starts_with("http://"))
                    && !url.trim_end_matches('/').contains("/v1") =>
            {
                url.trim_end_matches('/').to_owned()
            }
            Some(url) => {
                return Err(
                    self.invalid("stripe_api_base", format!("expected an http(s) URL without /v1, got {url:?}"))
                );
            }
        };
        let secret =
            |value: &Option<String>| value.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
        let stripe_platform_key = secret(&r.stripe_platform_key);
        if let Some(key) = &stripe_platform_key
            && crate::stripe::key_livemode(key).is_none()
        {
            return Err(self.invalid("stripe_platform_key", "must be a Stripe secret key (sk_test_… or sk_live_…)"));
        }
        let stripe_connect_webhook_secret = secret(&r.stripe_connect_webhook_secret);
        if let Some(secret) = &stripe_connect_webhook_secret
            && !secret.starts_with("whsec_")
        {
            return Err(self.invalid("stripe_connect_webhook_secret", "must be a webhook signing secret (whsec_…)"));
        }
        let stripe_connect_event_secret = secret(&r.stripe_connect_event_secret);
        if let Some(secret) = &stripe_connect_event_secret {
            if !secret.starts_with("whsec_") {
                return Err(self.invalid(
                    "stripe_connect_event_secret",
                    "must be the event destination's signing secret (whsec_…)",
                ));
            }
            if stripe_connect_webhook_secret.as_ref() == Some(secret) {
                return Err(self.invalid(
                    "stripe_connect_event_secret",
                    "is the Connect webhook endpoint's secret; the event destination has a secret of its own",
                ));
            }
        }
        let egress_allow = EgressAllow::parse(r.egress_allow.as_deref().unwrap_or_default())
            .map_err(|e| self.invalid("egress_allow", e))?;
        let stripe_connect_client_id = secret(&r.stripe_connect_client_id);
        if let Some(id) = &stripe_connect_client_id
            && !(id.starts_with("ca_") && id.len() > 3 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        {
            return Err(self.invalid("stripe_connect_client_id", "must be the platform's Connect client id (ca_…)"));
        }
        let stripe_oauth_base = match r.stripe_oauth_base.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            None => crate::stripe_connect::DEFAULT_OAUTH_BASE.to_owned(),
            Some(url) if url.starts_with("https://") || url.starts_with("http://") => {
                url.trim_end_matches('/').to_owned()
            }
            Some(url) => return Err(self.invalid("stripe_oauth_base", format!("expected an http(s) URL, got {url:?}"))),
        };
        let stripe_reconcile_interval = Duration::from_secs(r.stripe_reconcile_seconds.unwrap_or(300));
        if stripe_reconcile_interval.is_zero() {
            return Err(self.invalid("stripe_reconcile_seconds", "must be at least 1"));
        }
        // Stripe's grace period is at most 72 hours; the window must stay inside it.
        let stripe_late_usage_window = Duration::from_secs(r.stripe_late_usage_seconds.unwrap_or(50 * 60));
        if stripe_late_usage_window.is_zero() || stripe_late_usage_window > Duration::from_secs(72 * 3600) {
            return Err(self.invalid("stripe_late_usage_seconds", "must be between 1 and 259200 (72 hours)"));
        }
        if r.stripe_meter_events_per_second == Some(0) {
            return Err(self.invalid("stripe_meter_events_per_second", "must be at least 1"));
        }
        let accounts = self.account_settings()?;
        let limits = self.request_limits()?;
        let memory = self.memory_bounds()?;
        Ok(Config {
            mode,
            listen,
            public_url,
            data_dir,
            database_url: SecretString::from(database_url),
            database_max_connections,
            sqlite_synchronous,
            master_key,
            log_format,
            log_filter,
            shutdown_grace,
            run_workers: r.workers.unwrap_or(true),
            instance_name: r.instance_name.as_deref().map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned),
            smtp_url,
            smtp_from,
            api_rate_per_second,
            alert_retry_base,
            webhooks_allow_private: r.webhooks_allow_private.unwrap_or(false),
            egress_allow,
            stripe_api_base,
            stripe_platform_key: stripe_platform_key.map(SecretString::from),
            stripe_connect_webhook_secret: stripe_connect_webhook_secret.map(SecretString::from),
            stripe_connect_event_secret: stripe_connect_event_secret.map(SecretString::from),
            stripe_connect_client_id,
            stripe_oauth_base,
            stripe_reconcile_interval,
            stripe_late_usage_window,
            stripe_meter_events_per_second: r.stripe_meter_events_per_second,
            accounts,
            limits,
            memory,
        })
    }

    fn memory_bounds(&self) -> Result<MemoryBounds, ConfigError> {
        let r = &self.raw;
        let default = MemoryBounds::default();
        let count = |key: &'static str, value: Option<usize>, default: usize| match value {
            Some(0) => Err(self.invalid(key, "must be at least 1")),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        Ok(MemoryBounds {
            keys: count("cache_max_keys", r.cache_max_keys, default.keys)?,
            projects: count("cache_max_projects", r.cache_max_projects, default.projects)?,
            customers: count("cache_max_customers", r.cache_max_customers, default.customers)?,
            api_rate_keys: count("api_rate_max_keys", r.api_rate_max_keys, default.api_rate_keys)?,
        })
    }

    fn account_settings(&self) -> Result<AccountSettings, ConfigError> {
        let r = &self.raw;
        let defaults = AccountSettings::default();
        let session_lifetime = r.session_lifetime_seconds.map(Duration::from_secs).unwrap_or(defaults.session_lifetime);
        if session_lifetime.is_zero() {
            return Err(self.invalid("session_lifetime_seconds", "must be at least 1"));
        }
        let login_backoff_max =
            r.login_backoff_max_seconds.map(Duration::from_secs).unwrap_or(defaults.login_backoff_max);
        if login_backoff_max.is_zero() {
            return Err(self.invalid("login_backoff_max_seconds", "must be at least 1"));
        }
        let mut trusted_proxies = Vec::new();
        for item in r.trusted_proxies.as_deref().unwrap_or("").split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let net = item
                .parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    self.invalid(
                        "trusted_proxies",
                        format!("expected addresses or CIDRs separated by commas, got {item:?}"),
                    )
                })?;
            trusted_proxies.push(net.trunc());
        }
        Ok(AccountSettings {
            signup_open: r.signup_open.unwrap_or(defaults.signup_open),
            session_lifetime,
            trusted_proxies,
            login_backoff_max,
        })
    }

    fn request_limits(&self) -> Result<RequestLimits, ConfigError> {
        let r = &self.raw;
        let default = RequestLimits::default();
        let seconds = |key: &'static str, value: Option<u64>, default: Duration| match value {
            Some(0) => Err(self.invalid(key, "must be at least 1")),
            Some(s) => Ok(Duration::from_secs(s)),
            None => Ok(default),
        };
        Ok(RequestLimits {
            header_read_timeout: seconds(
                "header_read_timeout_seconds",
                r.header_read_timeout_seconds,
                default.header_read_timeout,
            )?,
            body_read_timeout: seconds(
                "body_read_timeout_seconds",
                r.body_read_timeout_seconds,
                default.body_read_timeout,
            )?,
            upstream_max_duration: seconds(
                "upstream_max_seconds",
                r.upstream_max_seconds,
                default.upstream_max_duration,
            )?,
            stream_output_margin_percent: r
                .stream_output_margin_percent
                .unwrap_or(default.stream_output_margin_percent),
        })
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn no_configuration_means_local_sqlite_in_development() {
        let c = Config::load(None, &env(&[])).unwrap();
        assert_eq!(c.mode, Mode::Development);
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.database_url.expose_secret(), "sqlite://./data/tollgate.db");
        assert_eq!(c.public_url, "http://127.0.0.1:8080");
        assert!(c.master_key.is_none());
        assert!(c.run_workers);
    }

    #[test]
    fn errors_name_the_setting_and_its_source() {
        let e = Config::load(None, &env(&[("TOLLGATE_LISTEN", "not-an-address")])).unwrap_err();
        assert!(e.to_string().starts_with("listen (TOLLGATE_LISTEN):"), "{e}");
        let e = Config::load(None, &env(&[("TOLLGATE_DATABASE_MAX_CONNECTIONS", "many")])).unwrap_err();
        assert!(e.to_string().contains("TOLLGATE_DATABASE_MAX_CONNECTIONS"), "{e}");
        let e = Config::load(None, &env(&[("TOLLGATE_DATABASE_URL", "mysql://u:hunter2@h/db")])).unwrap_err();
        assert!(e.to_string().contains("database_url"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "password leaked: {e}");
    }

    #[test]
    fn production_requires_a_master_key() {
        let e = Config::load(None, &env(&[("TOLLGATE_MODE", "production")])).unwrap_err();
        assert!(e.to_string().contains("TOLLGATE_MASTER_KEY"), "{e}");
    }

    #[test]
    fn a_bad_master_key_is_named_but_not_shown() {
        let e = Config::load(None, &env(&[("TOLLGATE_MASTER_KEY", "c2VjcmV0LXZhbHVl")])).unwrap_err();
        assert!(e.to_string().contains("master_key"), "{e}");
        assert!(!e.to_string().contains("c2VjcmV0LXZhbHVl"), "{e}");
    }

    #[test]
    fn file_values_are_overridden_by_env_and_unknown_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:9000\"\ndatabase_max_connections = 3\n").unwrap();
        let c = Config::load(Some(&path), &env(&[("TOLLGATE_LISTEN", "127.0.0.1:9001")])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(c.database_max_connections, 3);

        std::fs::write(&path, "lissten = \"0.0.0.0:9000\"\n").unwrap();
        let e = Config::load(Some(&path), &env(&[])).unwrap_err();
        assert!(e.to_string().contains("lissten"), "{e}");

        std::fs::write(&path, "database_max_connections = 0\n").unwrap();
        let e = Config::load(Some(&path), &env(&[])).unwrap_err();
        assert!(e.to_string().contains("`database_max_connections` in"), "{e}");
    }

    #[test]
    fn account_settings_are_read_and_checked() {
        let c = Config::load(None, &env(&[])).unwrap();
        assert!(c.accounts.signup_open);
        assert_eq!(c.accounts.session_lifetime, Duration::from_secs(30 * 24 * 3600));
        assert!(c.accounts.trusted_proxies.is_empty());
        let c = Config::load(
            None,
            &env(&[
                ("TOLLGATE_SIGNUP_OPEN", "false"),
                ("TOLLGATE_SESSION_LIFETIME_SECONDS", "60"),
                ("TOLLGATE_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1 ,::1"),
            ]),
        )
        .unwrap();
        assert!(!c.accounts.signup_open);
        assert_eq!(c.accounts.session_lifetime, Duration::from_secs(60));
        assert!(c.accounts.is_trusted_proxy("10.1.2.3".parse().unwrap()));
        assert!(c.accounts.is_trusted_proxy("::ffff:127.0.0.1".parse().unwrap()));
        assert!(c.accounts.is_trusted_proxy("::1".parse().unwrap()));
        assert!(!c.accounts.is_trusted_proxy("11.0.0.1".parse().unwrap()));
        let e = Config::load(None, &env(&[("TOLLGATE_TRUSTED_PROXIES", "10.0.0.0/8,proxy.internal")])).unwrap_err();
        assert!(e.to_string().contains("TOLLGATE_TRUSTED_PROXIES") && e.to_string().contains("proxy.internal"), "{e}");
    }

    #[test]
    fn egress_allowances_are_parsed_and_a_bad_one_named() {
        let c = Config::load(None, &env(&[])).unwrap();
        assert!(c.egress_allow.is_empty(), "nothing private is allowed by default");
        let c = Config::load(None, &env(&[("TOLLGATE_EGRESS_ALLOW", "10.0.0.0/8, models.internal")])).unwrap();
        assert_eq!(c.egress_allow.to_string(), "10.0.0.0/8,models.internal");
        let e = Config::load(None, &env(&[("TOLLGATE_EGRESS_ALLOW", "10.0.0.0/99")])).unwrap_err();
        assert!(e.to_string().starts_with("egress_allow (TOLLGATE_EGRESS_ALLOW):"), "{e}");
    }

    #[test]
    fn the_meter_event_pace_is_per_mode_unless_set_and_never_zero() {
        assert_eq!(Config::load(None, &env(&[])).unwrap().stripe_meter_events_per_second, None);
        let c = Config::load(None, &env(&[("TOLLGATE_STRIPE_METER_EVENTS_PER_SECOND", "10")])).unwrap();
        assert_eq!(c.stripe_meter_events_per_second, Some(10));
        let e = Config::load(None, &env(&[("TOLLGATE_STRIPE_METER_EVENTS_PER_SECOND", "0")])).unwrap_err();
        assert!(e.to_string().contains("TOLLGATE_STRIPE_METER_EVENTS_PER_SECOND"), "{e}");
    }

    #[test]
    fn request_limits_have_defaults_and_refuse_zero() {
        let c = Config::load(None, &env(&[])).unwrap();
        assert_eq!(c.limits, RequestLimits::default());
        assert_eq!(c.limits.upstream_max_duration, Duration::from_secs(1800));
        let c = Config::load(
            None,
            &env(&[("TOLLGATE_HEADER_READ_TIMEOUT_SECONDS", "5"), ("TOLLGATE_STREAM_OUTPUT_MARGIN_PERCENT", "0")]),
        )
        .unwrap();
        assert_eq!((c.limits.header_read_timeout, c.limits.stream_output_margin_percent), (Duration::from_secs(5), 0));
        let e = Config::load(None, &env(&[("TOLLGATE_BODY_READ_TIMEOUT_SECONDS", "0")])).unwrap_err();
        assert!(e.to_string().contains("TOLLGATE_BODY_READ_TIMEOUT_SECONDS"), "{e}");
    }

    #[test]
    fn memory_bounds_have_defaults_and_refuse_zero() {
        assert_eq!(Config::load(None, &env(&[])).unwrap().memory, MemoryBounds::default());
        let c = Config::load(None, &env(&[("TOLLGATE_CACHE_MAX_CUSTOMERS", "7"), ("TOLLGATE_API_RATE_MAX_KEYS", "3")]))
            .unwrap();
        assert_eq!((c.memory.customers, c.memory.api_rate_keys, c.memory.keys), (7, 3, MemoryBounds::default().keys));
        let e = Config::load(None, &env(&[("TOLLGATE_CACHE_MAX_KEYS", "0")])).unwrap_err();
        assert!(e.to_string().contains("TOLLGATE_CACHE_MAX_KEYS"), "{e}");
        let e = Config::load(None, &env(&[("TOLLGATE_CACHE_MAX_PROJECTS", "lots")])).unwrap_err();
        assert!(e.to_string().contains("TOLLGATE_CACHE_MAX_PROJECTS"), "{e}");
    }

    #[test]
    fn redacts_database_passwords() {
        assert_eq!(redact_url("postgres://u:pw@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://./data/x.db"), "sqlite://./data/x.db");
    }
}
