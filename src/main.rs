//! The `agentbus` command: parse the CLI, load the config, run the chosen command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agentbus::appservice::registration::{self, Registration};
use agentbus::cli::admin;
use agentbus::cli::say::{SayRequest, say};
use agentbus::config::{ChannelId, Config};
use agentbus::ops::checks::{self, CheckFailure, EXIT_CONFIG, EXIT_LOCAL_SETUP};
use agentbus::router::explain::RouteQuery;
use agentbus::server::{Services, serve};
use agentbus::store::RunOutcome;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

/// Under load glibc's malloc took a third of the CPU (sled copies tree nodes on update);
/// mimalloc keeps per-thread free lists.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A Matrix application service that makes Matrix the bus for a team of AI agents:
/// every agent is a virtual Matrix user you can DM or @mention from any Matrix client.
#[derive(Parser)]
#[command(name = "agentbus", version, propagate_version = true)]
struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "AGENTBUS_CONFIG",
        default_value = "agentbus.yaml"
    )]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "AGENTBUS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appservice: check the homeserver, set up the agents, answer messages.
    Serve,
    /// Write the registration file the homeserver loads (app_service_config_files).
    Registration {
        /// Where to write it; `-` for standard output.
        #[arg(short, long, default_value = "registration.yaml")]
        output: PathBuf,
    },
    /// Validate the config and run the startup checks, then exit (0 when all pass).
    ///
    /// Exit codes: 2 config invalid, 3 homeserver unreachable, 4 as_token rejected,
    /// 5 homeserver cannot reach agentbus, 6 local setup (store, port, token file).
    Check,
    /// Post a message as a human user and print the agents' replies as they arrive.
    ///
    /// Example: agentbus say --room '#project:localhost' --as demo "@coder hello"
    Say {
        /// Room ID (!…) or alias (#…:server).
        #[arg(long)]
        room: String,
        /// The human user to log in as: a localpart or full user ID.
        #[arg(long = "as", value_name = "USER")]
        user: String,
        /// Password of that user.
        #[arg(long, env = "AGENTBUS_PASSWORD", hide_env_values = true)]
        password: String,
        /// Homeserver URL (default: homeserver.url from the config).
        #[arg(long)]
        homeserver: Option<String>,
        /// Exit after this many replies.
        #[arg(long, default_value_t = 1)]
        replies: usize,
        /// Give up waiting for replies after this long.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The message.
        text: String,
    },
    /// Explain who would answer a message, and why, without sending anything.
    ///
    /// Asks the running agentbus (admin API); when none is running, routes with the store
    /// and the homeserver directly. Example:
    /// agentbus route --room '#project:localhost' --sender @alice:localhost "帮我看看这段代码"
    Route {
        /// Room ID (!…) or alias (#…:server).
        #[arg(long)]
        room: String,
        /// The sender's user ID.
        #[arg(long)]
        sender: String,
        /// A user the message mentions with a pill (m.mentions); repeatable.
        #[arg(long = "mention", value_name = "USER")]
        mentions: Vec<String>,
        /// The message replies to this event ($…) or to a message of this user (@…).
        #[arg(long)]
        reply_to: Option<String>,
        /// The message is in the thread with this root event.
        #[arg(long)]
        thread: Option<String>,
        /// Print the decision as JSON (the admin API's answer).
        #[arg(long)]
        json: bool,
        /// The message text.
        text: String,
    },
    /// DM pairing: list requests, approve a code, revoke an approval.
    Pairing {
        #[command(subcommand)]
        command: PairingCommand,
    },
    /// Scheduled tasks and heartbeats: list them, run one now.
    Tasks {
        #[command(subcommand)]
        command: TasksCommand,
    },
}

#[derive(Subcommand)]
enum TasksCommand {
    /// Every task with its last and next run, outcome and failures.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Run task NAME now (in the running agentbus) and say how it went.
    Run {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PairingCommand {
    /// Pending pairing requests and approved senders.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Approve the sender who was given CODE.
    Approve { code: String },
    /// Forget an approval: the sender has to pair again.
    Revoke {
        /// The sender's ID, e.g. @eve:example.org.
        sender: String,
        #[arg(long, default_value = "matrix")]
        channel: ChannelId,
    },
}

fn main() -> ExitCode {
    // First, before any thread or file exists: everything agentbus creates from here on
    // — the data directory, the store's files (also those fjall and sled create
    // themselves), the tokens file — is its user's alone, whatever umask it was started with.
    agentbus::store::private::restrict_umask();
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Say { .. }
        | Command::Route { .. }
        | Command::Pairing { .. }
        | Command::Tasks { .. } => "warn",
        _ => "warn,agentbus=info",
    };
    init_tracing(cli.log_format, default_filter);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{failure}");
            ExitCode::from(u8::try_from(failure.code).unwrap_or(1))
        }
    }
}

fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> Result<(), CheckFailure> {
    match cli.command {
        Command::Serve => {
            let config = load_config(&cli.config)?;
            raise_open_files_limit();
            let listener = bind(&config).await?;
            tracing::info!(address = %config.appservice.bind, "appservice API listening");
            let data_dir = config.store.path.clone();
            let services = Services::build(config)?;
            if let Some(warning) = checks::data_dir_warning(&data_dir) {
                tracing::warn!(path = %data_dir.display(), "{warning}");
            }
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            serve(services, listener, shutdown).await
        }
        Command::Registration { output } => {
            let config = load_config(&cli.config)?;
            let yaml = Registration::from_config(&config).to_yaml();
            if output.as_os_str() == "-" {
                print!("{yaml}");
            } else {
                registration::write_private(&output, yaml.as_bytes()).map_err(|e| {
                    CheckFailure::new(
                        EXIT_LOCAL_SETUP,
                        format!("✗ cannot write {}: {e}", output.display()),
                    )
                })?;
                eprintln!(
                    "wrote {} — add it to the homeserver's app_service_config_files and restart the homeserver",
                    output.display()
                );
            }
            Ok(())
        }
        Command::Check => agentbus::cli::check::check(load_config(&cli.config)?).await,
        Command::Route {
            room,
            sender,
            mentions,
            reply_to,
            thread,
            json,
            text,
        } => {
            let config = load_config(&cli.config)?;
            let query = RouteQuery {
                room,
                sender,
                text,
                formatted_body: None,
                mentions: (!mentions.is_empty()).then_some(mentions),
                room_mention: false,
                reply_to,
                thread,
            };
            let decision = admin::route(&config, &query).await?;
            if json {
                print_json(&decision);
            } else {
                let targets = if decision.targets.is_empty() {
                    "(nobody)".to_owned()
                } else {
                    decision
                        .targets
                        .iter()
                        .map(|t| format!("@{t}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!("targets:  {targets}");
                println!(
                    "strategy: {}",
                    serde_json::to_value(decision.strategy)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                );
                println!("reason:   {}", decision.reason);
            }
            Ok(())
        }
        Command::Pairing { command } => pairing(&cli.config, command).await,
        Command::Tasks { command } => tasks(&cli.config, command).await,
        Command::Say {
            room,
            user,
            password,
            homeserver,
            replies,
            timeout,
            text,
        } => {
            let homeserver = match homeserver {
                Some(url) => url,
                None => Config::load(&cli.config)
                    .map_err(|e| {
                        CheckFailure::new(EXIT_CONFIG, format!("✗ {e}\n(or pass --homeserver URL)"))
                    })?
                    .homeserver
                    .url
                    .to_string(),
            };
            let room = room.as_str().try_into().map_err(|e| {
                CheckFailure::new(
                    EXIT_CONFIG,
                    format!("✗ --room {room:?} is not a room ID or alias: {e}"),
                )
            })?;
            let request = SayRequest {
                homeserver,
                user,
                password,
                room,
                text,
                replies,
                timeout,
            };
            let seen = say(&request, |reply| {
                println!("{}: {}", reply.sender, reply.body)
            })
            .await
            .map_err(|e| CheckFailure::new(1, format!("✗ {e}")))?;
            if seen.is_empty() {
                return Err(CheckFailure::new(
                    1,
                    format!("✗ no reply within {}", humantime::format_duration(timeout)),
                ));
            }
            Ok(())
        }
    }
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("answers serialise")
    );
}

async fn pairing(path: &Path, command: PairingCommand) -> Result<(), CheckFailure> {
    let config = load_config(path)?;
    match command {
        PairingCommand::List { json } => {
            let state = admin::pairing_list(&config).await?;
            if json {
                print_json(&state);
                return Ok(());
            }
            println!("pending ({}):", state.pending.len());
            for request in &state.pending {
                println!(
                    "  {}  {} on {}",
                    request.code, request.sender, request.channel
                );
            }
            println!("approved ({}):", state.approved.len());
            for paired in &state.approved {
                println!("  {} on {}", paired.sender, paired.channel);
            }
        }
        PairingCommand::Approve { code } => {
            let request = admin::pairing_approve(&config, &code).await?;
            println!(
                "✓ approved {} on {}; agents now answer their direct messages",
                request.sender, request.channel
            );
        }
        PairingCommand::Revoke { sender, channel } => {
            admin::pairing_revoke(&config, &channel, &sender).await?;
            println!("✓ revoked {sender} on {channel}");
        }
    }
    Ok(())
}

async fn tasks(path: &Path, command: TasksCommand) -> Result<(), CheckFailure> {
    let config = load_config(path)?;
    let line = |task: &agentbus::ops::schedule::TaskView| {
        let outcome = match &task.last_outcome {
            None => "-".to_owned(),
            Some(RunOutcome::Ok { posted: true }) => "ok".to_owned(),
            Some(RunOutcome::Ok { posted: false }) => "ok (nothing posted)".to_owned(),
            Some(RunOutcome::Failed { error }) => format!("failed: {error}"),
        };
        let state = if !task.enabled {
            "disabled"
        } else if task.paused {
            "paused"
        } else if task.running {
            "running"
        } else {
            "active"
        };
        format!(
            "{}  [{}] {} in {}  {state}  last: {} ({outcome})  next: {}  failures: {}",
            task.name,
            task.kind,
            task.schedule,
            task.room,
            task.last_run.as_deref().unwrap_or("never"),
            task.next_run.as_deref().unwrap_or("-"),
            task.failures,
        )
    };
    match command {
        TasksCommand::List { json } => {
            let tasks = admin::tasks_list(&config).await?;
            if json {
                print_json(&tasks);
                return Ok(());
            }
            if tasks.is_empty() {
                println!("no scheduled tasks or heartbeats are configured");
            }
            for task in &tasks {
                println!("{}", line(task));
            }
        }
        TasksCommand::Run { name, json } => {
            let task = admin::tasks_run(&config, &name).await?;
            if json {
                print_json(&task);
            } else {
                println!("{}", line(&task));
            }
            if let Some(RunOutcome::Failed { error }) = &task.last_outcome {
                return Err(CheckFailure::new(
                    admin::EXIT_REFUSED,
                    format!("✗ {name} failed: {error}"),
                ));
            }
        }
    }
    Ok(())
}

/// Loads and validates the config and resolves the appservice tokens.
fn load_config(path: &Path) -> Result<Config, CheckFailure> {
    let mut config = Config::load(path)
        .map_err(|e| CheckFailure::new(EXIT_CONFIG, format!("✗ config invalid: {e}")))?;
    registration::ensure_tokens(&mut config).map_err(|e| {
        CheckFailure::new(
            EXIT_LOCAL_SETUP,
            format!("✗ cannot load or save the appservice tokens: {e}"),
        )
    })?;
    Ok(config)
}

/// Raises the soft open-file limit to the hard one, and says what they are: every
/// connection to the listener takes a descriptor.
fn raise_open_files_limit() {
    let show = |limit: Option<u64>| limit.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    match agentbus::net::listener::raise_open_files_limit() {
        Ok(limit) => tracing::info!(
            soft_before = %show(limit.soft_before),
            soft = %show(limit.soft),
            hard = %show(limit.hard),
            "open-file limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "could not raise the open-file limit to the hard limit; connections may run out of descriptors"
        ),
    }
}

async fn bind(config: &Config) -> Result<tokio::net::TcpListener, CheckFailure> {
    tokio::net::TcpListener::bind(config.appservice.bind)
        .await
        .map_err(|e| {
            CheckFailure::new(
                EXIT_LOCAL_SETUP,
                format!(
                    "✗ cannot listen on {} (appservice.bind): {e}",
                    config.appservice.bind
                ),
            )
        })
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    shutdown.cancel();
}
