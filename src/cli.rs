//! The command line: `tollgate [serve]`, `worker`, `migrate`, `admin …`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;
use std::sync::Arc;
use tollgate_core::accounts::{self, NewOrganization};
use tollgate_core::crypto::MasterKey;
use tollgate_core::ids::{OrgId, ProjectId};
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::projects::{self, BudgetPolicy, KeyKind, NewProject, NewProvider, ProviderKind};
use tollgate_core::{Config, Db};
use tollgate_jobs::mail::Mailer;
use tollgate_jobs::{AlertServices, JobStore, WorkerOptions};

use crate::{Application, shutdown, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An LLM gateway that blocks end-customer overspend before the call and bills usage through Stripe"
)]
struct Cli {
    /// A TOML configuration file (environment variables override it). Also TOLLGATE_CONFIG.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the proxy, dashboard and API, with job workers in-process (the default).
    Serve,
    /// Run only the background job workers (to scale them apart from the server).
    Worker,
    /// Bring the database schema up to date, then exit.
    Migrate,
    /// Operator tasks from the shell.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create an organization (tenant) with its owner user.
    CreateOrg {
        /// The organization's display name.
        #[arg(long)]
        name: String,
        /// The owner's email address (their login).
        #[arg(long)]
        owner_email: String,
        /// Read the owner's password from the first line of standard input
        /// (otherwise from TOLLGATE_OWNER_PASSWORD).
        #[arg(long)]
        owner_password_stdin: bool,
    },
    /// List organizations with their owner.
    ListOrgs,
    /// Create a project in an organization.
    CreateProject {
        #[arg(long)]
        org: String,
        #[arg(long)]
        name: String,
        /// clamp (lower max output to what the budget pays for) or reject (402).
        #[arg(long, default_value = "clamp")]
        policy: String,
        /// Markup on provider cost in basis points (2500 = +25 %).
        #[arg(long, default_value_t = 0)]
        markup_bps: i64,
        /// Budget of a customer seen for the first time, in currency units (e.g. 5.00).
        #[arg(long, default_value = "0")]
        default_budget: String,
        /// month, day, rolling or lifetime.
        #[arg(long, default_value = "month")]
        period: String,
        /// ISO 4217 code (usd, eur, jpy, kwd, …); fixed once the project exists.
        #[arg(long, default_value = "usd")]
        currency: String,
        /// Outside USD: units of the currency one USD is worth, so the shipped (USD) prices
        /// apply; without it only the project's own prices do.
        #[arg(long)]
        usd_rate: Option<String>,
    },
    /// Connect a provider to a project (its API key from stdin or TOLLGATE_PROVIDER_API_KEY).
    AddProvider {
        #[arg(long)]
        project: String,
        /// openai, anthropic or openai_compatible.
        #[arg(long)]
        kind: String,
        /// Required for openai_compatible; defaults to the provider's public API otherwise.
        #[arg(long)]
        base_url: Option<String>,
        /// Comma-separated models (or prefixes ending in *) routed to this provider.
        #[arg(long)]
        models: String,
        #[arg(long)]
        api_key_stdin: bool,
    },
    /// Create a project key; it is printed once and stored only as a hash.
    CreateKey {
        #[arg(long)]
        project: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Create a customer or set its budget.
    SetBudget {
        #[arg(long)]
        project: String,
        /// The tenant's own id for the customer.
        #[arg(long)]
        customer: String,
        /// In currency units (e.g. 5.00).
        #[arg(long)]
        amount: String,
        #[arg(long, default_value = "month")]
        period: String,
    },
    /// Print a new random master key for TOLLGATE_MASTER_KEY.
    GenerateMasterKey,
}

/// Parses the command line, runs the command, and turns its outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // generate-master-key needs neither configuration nor a runtime.
    if let Some(Command::Admin(AdminCommand::GenerateMasterKey)) = cli.command {
        println!("{}", MasterKey::generate().to_base64());
        return ExitCode::SUCCESS;
    }
    let config = match Config::from_env(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tollgate: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logs(config.log_format, &config.log_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command.unwrap_or(Command::Serve), config));
    // A blocking job still running (a token count) does not hold the exit: the runtime is
    // left to the process's end after a moment instead of waited for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Worker => worker(config).await,
        Command::Migrate => migrate(config).await,
        Command::Admin(admin) => run_admin(admin, config).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        database = %config.database_url_redacted(),
        mode = ?config.mode,
        workers = config.run_workers,
        "starting tollgate {}",
        env!("CARGO_PKG_VERSION")
    );
    let app = Application::build(config).await?;
    tracing::info!("listening on http://{}", app.local_addr());
    app.run(shutdown::on_signal()).await
}

async fn worker(config: Config) -> anyhow::Result<()> {
    let db = Db::connect(&config).await?;
    let pending = db.pending_migrations().await?;
    if !pending.is_empty() {
        anyhow::bail!("the database has {} pending migrations: run `tollgate migrate` first", pending.len());
    }
    let jobs = JobStore::open(config.database_url.expose_secret(), config.sqlite_synchronous).await?;
    let options = WorkerOptions { grace: config.shutdown_grace, ..WorkerOptions::default() };
    let master_key = config.resolve_master_key()?;
    let mailer = Arc::new(Mailer::from_config(&config)?);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let alerts = AlertServices::new(&config, master_key.clone(), mailer)?;
    let http = reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(10)).build()?;
    let billing = tollgate_jobs::BillingServices::new(&config, master_key, http);
    tracing::info!(process = %options.process_name, "job workers starting");
    let result =
        tollgate_jobs::run_workers(db.clone(), jobs.clone(), alerts, billing, options, shutdown::on_signal()).await;
    jobs.close().await;
    db.close().await;
    result
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    let db = Db::connect(&config).await?;
    let before = db.pending_migrations().await?.len();
    db.migrate().await?;
    JobStore::open(config.database_url.expose_secret(), config.sqlite_synchronous).await?.close().await;
    db.close().await;
    println!(
        "database {} is up to date ({before} migration{} applied)",
        config.database_url_redacted(),
        if before == 1 { "" } else { "s" }
    );
    Ok(())
}

async fn run_admin(command: AdminCommand, config: Config) -> anyhow::Result<()> {
    let db = Db::connect(&config).await?;
    db.migrate().await?;
    let result = match command {
        AdminCommand::CreateOrg { name, owner_email, owner_password_stdin } => {
            let password = read_owner_password(owner_password_stdin)?;
            let created = accounts::create_organization_with_owner(
                &db,
                NewOrganization { name: &name, owner_email: &owner_email, owner_password: &password },
            )
            .await?;
            println!("organization {} created; owner {}", created.org_id, created.owner_id);
            Ok(())
        }
        AdminCommand::ListOrgs => {
            for org in accounts::list_organizations(&db).await? {
                println!("{}\t{}\t{}", org.id, org.name, org.owner_email.as_deref().unwrap_or("-"));
            }
            Ok(())
        }
        AdminCommand::CreateProject { org, name, policy, markup_bps, default_budget, period, currency, usd_rate } => {
            let org = OrgId::parse(&org).ok_or_else(|| anyhow::anyhow!("--org: not an organization id (org_…)"))?;
            let policy = match policy.as_str() {
                "clamp" => BudgetPolicy::Clamp,
                "reject" => BudgetPolicy::Reject,
                other => anyhow::bail!("--policy: expected clamp or reject, got {other:?}"),
            };
            let new = NewProject {
                name,
                policy,
                markup_bps,
                default_budget: parse_amount("--default-budget", &default_budget)?,
                default_period: parse_period(&period)?,
                currency: tollgate_core::currency::Currency::parse(&currency)
                    .map_err(|e| anyhow::anyhow!("--currency: {e}"))?,
                usd_rate: usd_rate.map(|rate| parse_amount("--usd-rate", &rate)).transpose()?,
                ..NewProject::default()
            };
            let project = projects::create_project(&db, &org, &new).await?;
            println!("project {} created", project.id);
            Ok(())
        }
        AdminCommand::AddProvider { project, kind, base_url, models, api_key_stdin } => {
            let project = parse_project(&project)?;
            let kind = ProviderKind::parse(&kind)
                .ok_or_else(|| anyhow::anyhow!("--kind: expected openai, anthropic or openai_compatible"))?;
            let api_key = read_secret(api_key_stdin, "TOLLGATE_PROVIDER_API_KEY", "the provider's API key")?;
            let new = NewProvider {
                kind,
                name: String::new(),
                base_url,
                api_key,
                models: models.split(',').map(str::to_owned).collect(),
            };
            let master_key = config.resolve_master_key()?;
            let id = projects::add_provider(&db, &master_key, &project, &new).await?;
            println!("provider {id} connected");
            Ok(())
        }
        AdminCommand::CreateKey { project, name } => {
            let project = parse_project(&project)?;
            let key = projects::create_key(&db, &project, KeyKind::Secret, &name).await?;
            println!("{}", key.plaintext);
            eprintln!("key {} created: shown once, stored only as a hash", key.id);
            Ok(())
        }
        AdminCommand::SetBudget { project, customer, amount, period } => {
            let project = parse_project(&project)?;
            let amount = parse_amount("--amount", &amount)?;
            let c = projects::upsert_customer_budget(&db, &project, &customer, amount, parse_period(&period)?).await?;
            println!("customer {} ({}) budget {} per {}", c.id, c.external_id, Nanos(c.budget_nanos), c.budget_period);
            Ok(())
        }
        AdminCommand::GenerateMasterKey => Ok(()),
    };
    db.close().await;
    result
}

fn read_owner_password(from_stdin: bool) -> anyhow::Result<String> {
    read_secret(from_stdin, "TOLLGATE_OWNER_PASSWORD", "the owner's password")
}

/// A secret from the first line of standard input, or else from the environment variable `var`.
fn read_secret(from_stdin: bool, var: &str, what: &str) -> anyhow::Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let secret = line.trim_end_matches(['\r', '\n']).to_owned();
        if secret.is_empty() {
            anyhow::bail!("no {what} on standard input");
        }
        return Ok(secret);
    }
    std::env::var(var).map_err(|_| anyhow::anyhow!("give {what} on standard input (the --…-stdin flag) or in {var}"))
}

fn parse_project(text: &str) -> anyhow::Result<ProjectId> {
    ProjectId::parse(text).ok_or_else(|| anyhow::anyhow!("--project: not a project id (prj_…)"))
}

fn parse_amount(flag: &str, text: &str) -> anyhow::Result<Nanos> {
    let amount: Nanos = text.parse().map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
    anyhow::ensure!(!amount.is_negative(), "{flag}: must not be negative");
    Ok(amount)
}

fn parse_period(text: &str) -> anyhow::Result<BudgetPeriod> {
    BudgetPeriod::parse(text).ok_or_else(|| anyhow::anyhow!("--period: expected month, day, rolling or lifetime"))
}
