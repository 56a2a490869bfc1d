//! The command line: `tollgate [serve]`, `worker`, `migrate`, `admin …`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;
use tollgate_core::accounts::{self, NewOrganization};
use tollgate_core::crypto::MasterKey;
use tollgate_core::{Config, Db};
use tollgate_jobs::{JobStore, WorkerOptions};

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
    tracing::info!(process = %options.process_name, "job workers starting");
    let result = tollgate_jobs::run_workers(db.clone(), jobs.clone(), options, shutdown::on_signal()).await;
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
        AdminCommand::GenerateMasterKey => Ok(()),
    };
    db.close().await;
    result
}

fn read_owner_password(from_stdin: bool) -> anyhow::Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let password = line.trim_end_matches(['\r', '\n']).to_owned();
        if password.is_empty() {
            anyhow::bail!("no password on standard input");
        }
        return Ok(password);
    }
    std::env::var("TOLLGATE_OWNER_PASSWORD").map_err(|_| {
        anyhow::anyhow!(
            "give the owner's password on standard input (--owner-password-stdin) or in TOLLGATE_OWNER_PASSWORD"
        )
    })
}
