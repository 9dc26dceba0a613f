//! The `stager-api` binary: configuration in, HTTP server out.

use std::net::TcpListener;

use anyhow::Context;
use clap::{Parser, Subcommand};
use stager_api::config::{Parts, StagerSettings, parse_listen};
use stager_api::startup::Application;
use tailor::config::{Secret, TailorSettings};
use tailor::embedded::{EmbeddedPostgres, EmbeddedRegistry, RegistryOptions};
use tailor::secrets::CredentialsKey;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "stager-api",
    version,
    about = "HTTP face of tailor: staging requests in, pinned images out"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with configuration from the environment (the default).
    Serve,
    /// Single-node default: starts an ephemeral PostgreSQL and a local internal registry, then
    /// serves. Ctrl-C stops and deletes everything it started.
    Embedded(EmbeddedArgs),
    /// Validate the configuration in the environment and exit (0 when valid).
    CheckConfig {
        /// Also check that the database and the internal registry answer.
        #[arg(long)]
        probe: bool,
    },
}

#[derive(clap::Args)]
struct EmbeddedArgs {
    /// Address to listen on.
    #[arg(long, env = "STAGER_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Registry that references without a host refer to.
    #[arg(long, env = "TAILOR_DEFAULT_REGISTRY", default_value = "docker.io")]
    default_registry: String,
    /// A registry (host:port) to speak plain HTTP to, e.g. a local one you copy from;
    /// repeatable, or a comma list in TAILOR_INSECURE_REGISTRIES.
    #[arg(
        long = "insecure",
        value_name = "HOST:PORT",
        env = "TAILOR_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure: Vec<String>,
    /// Also start a local upstream registry holding a small demo image, so that a first
    /// staging works without the internet.
    #[arg(long)]
    demo: bool,
    /// Run the embedded PostgreSQL on this port (a free one otherwise).
    #[arg(long, value_name = "PORT")]
    postgres_port: Option<u16>,
    /// Run the embedded internal registry on this port (a free one otherwise).
    #[arg(long, value_name = "PORT")]
    registry_port: Option<u16>,
    /// Run the demo registry (`--demo`) on this port (a free one otherwise).
    #[arg(long, value_name = "PORT")]
    demo_port: Option<u16>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tailor::tls::install_crypto_provider();
    tailor::telemetry::init();
    // The future runs on this (the main) thread: the embedded children's parent-death signal
    // follows the thread that started them.
    let runtime = tokio::runtime::Runtime::new().expect("a Tokio runtime");
    match runtime.block_on(run(cli.command.unwrap_or(Command::Serve))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line, the same shape everywhere, never a backtrace (whatever RUST_BACKTRACE).
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let settings = StagerSettings::from_env().map_err(config_error)?;
            let listener = bind(&settings)?;
            serve(settings, listener, |_| {}).await
        }
        Command::Embedded(args) => embedded(args).await,
        Command::CheckConfig { probe } => {
            // Built as `serve` builds it: what parses here, serve accepts.
            let settings = StagerSettings::from_env().map_err(config_error)?;
            if probe {
                probe_dependencies(&settings).await?;
            }
            println!("{}", settings.egress_policy(settings.listen).describe());
            println!("configuration is valid");
            Ok(())
        }
    }
}

fn config_error(error: tailor::config::ConfigError) -> anyhow::Error {
    anyhow::anyhow!("{} ({})", error, error.code())
}

fn bind(settings: &StagerSettings) -> anyhow::Result<TcpListener> {
    TcpListener::bind(settings.listen).map_err(|e| {
        anyhow::anyhow!(
            "STAGER_LISTEN {}: {e}; choose another address",
            settings.listen
        )
    })
}

/// `check-config --probe`: the database answers a query and the internal registry its API root.
async fn probe_dependencies(settings: &StagerSettings) -> anyhow::Result<()> {
    settings
        .tailor
        .probe(|part| println!("{part}: answers"))
        .await
        .map_err(|error| match error {
            tailor::config::ProbeError::Config(error) => config_error(error),
            unanswered => anyhow::anyhow!(unanswered),
        })
}

/// Serves on `listener` until SIGINT/SIGTERM; `ready` runs once the API answers.
async fn serve(
    settings: StagerSettings,
    listener: TcpListener,
    ready: impl FnOnce(&str),
) -> anyhow::Result<()> {
    let mut worker_settings = settings.worker.clone();
    let db = tailor::db::connect(settings.tailor.database_url.expose(), settings.connections)
        .await
        .context("connecting to DATABASE_URL")?;
    tailor::db::migrate(&db)
        .await
        .context("running database migrations")?;

    let shutdown = CancellationToken::new();
    let app = Application::build_on(&settings, db.clone(), listener)
        .with_context(|| format!("serving on STAGER_LISTEN={}", settings.listen))?;
    // The workers' destinations may not include this very listener.
    worker_settings.egress = settings.egress_policy(app.addr());
    tracing::info!("{}", worker_settings.egress.describe());
    let workers = if settings.workers > 0 {
        tracing::info!(count = settings.workers, "starting in-process workers");
        Some(tokio::spawn(tailor::staging::worker::run(
            db,
            worker_settings,
            settings.workers,
            shutdown.clone(),
        )))
    } else {
        None
    };

    // One line on stdout, for scripts and tests that start us on port 0; logs go to stderr.
    println!("stager-api listening on {}", app.base_url());
    tracing::info!(addr = %app.addr(), "stager-api listening");
    ready(&app.base_url());
    // Returns after SIGINT/SIGTERM, once in-flight requests are answered.
    let served = app.run_until_stopped().await;
    shutdown.cancel();
    if let Some(workers) = workers {
        tracing::info!("draining workers");
        let _ = workers.await;
    }
    served?;
    tracing::info!("stager-api stopped");
    Ok(())
}

/// A port given for an embedded part must be free before anything starts.
fn check_free(flag: &str, port: Option<u16>) -> anyhow::Result<()> {
    if let Some(port) = port {
        TcpListener::bind(("127.0.0.1", port))
            .map(drop)
            .map_err(|e| anyhow::anyhow!("{flag} {port}: {e}; choose another port"))?;
    }
    Ok(())
}

async fn embedded(args: EmbeddedArgs) -> anyhow::Result<()> {
    let listen = parse_listen(Some(&args.listen)).map_err(config_error)?;
    // Everything that could be refused is, before anything is started.
    let listener = TcpListener::bind(listen).map_err(|e| {
        anyhow::anyhow!(
            "--listen {listen}: {e}; choose another address with --listen or STAGER_LISTEN"
        )
    })?;
    check_free("--postgres-port", args.postgres_port)?;
    check_free("--registry-port", args.registry_port)?;
    check_free("--demo-port", args.demo_port)?;
    let mut insecure = Vec::new();
    for entry in args
        .insecure
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
    {
        tailor::config::parse_host_port("--insecure", entry).map_err(config_error)?;
        insecure.push(entry.to_owned());
    }

    let postgres = EmbeddedPostgres::start_on(args.postgres_port)
        .context("starting the embedded PostgreSQL")?;
    let registry = EmbeddedRegistry::start(RegistryOptions {
        port: args.registry_port,
        ..RegistryOptions::default()
    })
    .context("starting the embedded registry")?;
    let demo = if args.demo {
        let demo = EmbeddedRegistry::start(RegistryOptions {
            port: args.demo_port,
            ..RegistryOptions::default()
        })
        .context("starting the demo registry")?;
        let seeding = tailor::registry::Registries::unrestricted([demo.host()]);
        stager_api::demo::seed(&seeding.internal(&demo.host(), None))
            .await
            .context("pushing the demo image")?;
        insecure.push(demo.host());
        Some(demo)
    } else {
        None
    };

    // The operator's tokens if given, else one generated for this run (printed below).
    let configured = std::env::var("STAGER_API_TOKENS")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let token = configured
        .is_none()
        .then(|| uuid::Uuid::new_v4().simple().to_string());
    let api_tokens = match &token {
        Some(token) => vec![Secret::new(token.clone())],
        None => stager_api::config::parse_tokens(configured.as_deref()).map_err(config_error)?,
    };
    // A developer's machine: images come from registries on this host too.
    let mut tailor = TailorSettings::from_lookup(|name| match name {
        "DATABASE_URL" => Some(postgres.url("postgres")),
        "TAILOR_INTERNAL_REGISTRY" => Some(registry.host()),
        "TAILOR_DEFAULT_REGISTRY" => Some(args.default_registry.clone()),
        "TAILOR_INSECURE_REGISTRIES" => None,
        _ => std::env::var(name).ok(),
    })
    .map_err(config_error)?;
    tailor.insecure_registries = insecure;
    tailor.insecure_registries.push(registry.host());
    if tailor.egress_allow.is_empty() {
        tailor.egress_allow =
            tailor::egress::Rule::parse_list("127.0.0.0/8, ::1, localhost").expect("valid rules");
    }
    let parts = Parts {
        tailor,
        listen,
        api_tokens,
        workers: stager_api::config::parse_count(
            "STAGER_WORKERS",
            std::env::var("STAGER_WORKERS").ok().as_deref(),
            2,
        )
        .map_err(config_error)?,
        credentials_key: Some(CredentialsKey::generate()),
        tls: None,
    };
    let settings =
        StagerSettings::new(parts, |name| std::env::var(name).ok()).map_err(config_error)?;
    eprintln!("embedded PostgreSQL:        {}", postgres.url("postgres"));
    eprintln!("embedded internal registry: {}", registry.base_url());
    if let Some(demo) = &demo {
        eprintln!("demo upstream registry:     {}", demo.base_url());
    }
    eprintln!(
        "egress: loopback allowed (TAILOR_EGRESS_ALLOW={}), as suits a developer's machine; \
         cloud metadata and the internal registry stay refused",
        settings
            .tailor
            .egress_allow
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let image = match &demo {
        Some(demo) => format!(
            "{}/{}:{}",
            demo.host(),
            stager_api::demo::REPOSITORY,
            stager_api::demo::TAG
        ),
        None => "busybox:1.36".to_owned(),
    };
    let token_line = match &token {
        Some(token) => format!("export TOKEN={token}"),
        None => "export TOKEN=<one of STAGER_API_TOKENS>".to_owned(),
    };
    let offline = demo.is_none();
    let ready = move |base_url: &str| {
        eprintln!(
            "\ntailor is ready. Next steps (Ctrl-C stops everything and deletes its data):\n"
        );
        eprintln!("  {token_line}");
        eprintln!("  export TAILOR={base_url}");
        eprintln!(
            "  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\n    -d '{{\"app_guid\": \"{}\", \"image\": \"{image}\"}}' $TAILOR/stage",
            uuid::Uuid::new_v4()
        );
        eprintln!(
            "  curl -s -H \"Authorization: Bearer $TOKEN\" $TAILOR/stage/<staging_guid from the answer>"
        );
        eprintln!(
            "  skopeo inspect --tls-verify=false docker://<result.pinned_image from the staging>"
        );
        if offline {
            eprintln!(
                "\n  (busybox comes from Docker Hub; start with --demo for an image that needs no internet)"
            );
        }
        eprintln!();
    };
    let result = serve(settings, listener, ready).await;
    // Explicit order: registries, then database; each deletes its temporary directory.
    drop(demo);
    drop(registry);
    drop(postgres);
    result
}
