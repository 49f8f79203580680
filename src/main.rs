//! The `confmesh` command: runs the daemon or talks to a running one (SPEC.md §7).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use confmesh::config::Config;
use confmesh::control::{self, Request};
use confmesh::daemon::{self, Options};
use confmesh::eventlog::LogKind;
use confmesh::status::Status;

/// Cluster fabric of a conference-routing appliance.
#[derive(Parser)]
#[command(name = "confmesh", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How a client subcommand finds the daemon's control socket.
#[derive(Args)]
struct Target {
    /// The daemon's control socket.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// The daemon's configuration file (its control_socket is used).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// The configuration file (SPEC.md §7).
        #[arg(long)]
        config: PathBuf,
        /// Append every SA's keys to this file (debugging with Wireshark; keep it secret).
        #[arg(long)]
        keylog: Option<PathBuf>,
    },
    /// Validate a configuration file and print what it resolves to, without starting anything.
    Check {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the cluster as this peer sees it.
    Status {
        /// Print the SPEC.md §7 JSON document instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Change the peer list live.
    Peers {
        #[command(subcommand)]
        op: PeersOp,
        #[command(flatten)]
        target: Target,
    },
    /// Leave the cluster: empty the peer list and stop talking to the other peers.
    Standalone {
        #[command(flatten)]
        target: Target,
    },
    /// List raised alarms.
    Alarms {
        #[command(flatten)]
        target: Target,
    },
    /// Print this peer's event or configuration log.
    Log {
        /// Which log.
        #[arg(value_enum)]
        kind: LogArg,
        #[command(flatten)]
        target: Target,
    },
    /// Re-read the configuration file and pre-shared key and apply changes live (same as SIGHUP).
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Shared configuration (replicated to every peer).
    Config {
        #[command(subcommand)]
        op: ConfigOp,
        #[command(flatten)]
        target: Target,
    },
    /// Administrator accounts of the admin API (shared configuration).
    Admin {
        #[command(subcommand)]
        op: AdminOp,
        #[command(flatten)]
        target: Target,
    },
    /// Back up this peer: configuration file and store, no logs.
    Backup {
        /// Encrypt the backup with the password in this file.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Directory to write it to (default: <state_dir>/backups).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Restore a backup taken on this peer, live.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The password file, for an encrypted backup.
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Inject delay, jitter, loss, duplication and reordering on the outbound path to a peer
    /// (tests and diagnosis on kernels without netem; all zero clears).
    Faults {
        /// The peer's management address.
        peer: Ipv4Addr,
        /// One-way delay to add, ms.
        #[arg(long, default_value_t = 0)]
        delay_ms: u32,
        /// Random jitter to add, ms.
        #[arg(long, default_value_t = 0)]
        jitter_ms: u32,
        /// Loss, percent.
        #[arg(long, default_value_t = 0.0)]
        loss_pct: f64,
        /// Duplication, percent.
        #[arg(long, default_value_t = 0.0)]
        duplicate_pct: f64,
        /// Reordering, percent (such a packet is held back so that later ones overtake it).
        #[arg(long, default_value_t = 0.0)]
        reorder_pct: f64,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum PeersOp {
    /// Add a peer by management address.
    Add {
        /// The peer's management address.
        addr: Ipv4Addr,
    },
    /// Remove a peer (alive or dead) by management address.
    Remove {
        /// The peer's management address.
        addr: Ipv4Addr,
    },
}

#[derive(Subcommand)]
enum ConfigOp {
    /// Print one value as JSON.
    Get {
        /// The key, e.g. bridge/b1.
        key: String,
    },
    /// Set a value; returns once it is durable on this peer (and on --wait-peers others).
    Set {
        /// The key.
        key: String,
        /// The value as JSON, e.g. '{"uri": "sip:10.96.4.1:5060", "capacity": 20}'.
        value: String,
        /// Also wait (up to 5 s) until this many other peers have it.
        #[arg(long, default_value_t = 0)]
        wait_peers: usize,
    },
    /// Delete a key.
    Delete {
        /// The key.
        key: String,
        /// Also wait (up to 5 s) until this many other peers have the deletion.
        #[arg(long, default_value_t = 0)]
        wait_peers: usize,
    },
    /// Print every key under a prefix, one "KEY JSON" line each.
    List {
        /// Key prefix (default: all).
        #[arg(default_value = "")]
        prefix: String,
    },
}

#[derive(Subcommand)]
enum AdminOp {
    /// Create or replace an account.
    Add {
        /// Account name.
        name: String,
        /// File holding the password (hashed here with Argon2id; never sent anywhere).
        #[arg(long)]
        password_file: PathBuf,
    },
    /// Remove an account.
    Remove {
        /// Account name.
        name: String,
    },
    /// List the account names.
    List,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogArg {
    Events,
    Config,
}

/// Environment variable that overrides the version reported to peers. For tests of the
/// version-mismatch rule only: a real upgrade changes the binary.
const VERSION_OVERRIDE_ENV: &str = "CONFMESH_TEST_REPORTED_VERSION";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, keylog } => run(config, keylog),
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Status { json, target } => client(target, Request::Status, |v| {
            if json {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            } else {
                match serde_json::from_value::<Status>(v) {
                    Ok(s) => s.to_table(),
                    Err(e) => format!("unreadable status from the daemon: {e}"),
                }
            }
        }),
        Command::Peers { op, target } => {
            let req = match op {
                PeersOp::Add { addr } => Request::PeersAdd { addr },
                PeersOp::Remove { addr } => Request::PeersRemove { addr },
            };
            client(target, req, |v| {
                format!("ok: now {}", v.as_str().unwrap_or("?"))
            })
        }
        Command::Standalone { target } => {
            client(target, Request::Standalone, |_| "ok: now standalone".into())
        }
        Command::Alarms { target } => client(target, Request::Alarms, |v| {
            let alarms = v.as_array().cloned().unwrap_or_default();
            if alarms.is_empty() {
                return "no alarms".into();
            }
            alarms
                .iter()
                .map(|a| {
                    format!(
                        "{} {} with {}: {}",
                        a["raised_at"].as_str().unwrap_or(""),
                        a["kind"].as_str().unwrap_or(""),
                        a["peer"].as_str().unwrap_or(""),
                        a["detail"].as_str().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }),
        Command::Log { kind, target } => {
            let kind = match kind {
                LogArg::Events => LogKind::Events,
                LogArg::Config => LogKind::Config,
            };
            client(target, Request::Log { kind }, one_per_line)
        }
        Command::Reload { target } => client(target, Request::Reload, |_| "ok: reloaded".into()),
        Command::Config { op, target } => config_command(op, target),
        Command::Admin { op, target } => admin_command(op, target),
        Command::Backup {
            password_file,
            dir,
            target,
        } => {
            let (password_file, dir) = (password_file.map(absolute), dir.map(absolute));
            client(target, Request::Backup { dir, password_file }, |v| {
                v["backup"].as_str().unwrap_or("").to_owned()
            })
        }
        Command::Restore {
            file,
            password_file,
            target,
        } => {
            let req = Request::Restore {
                file: absolute(file),
                password_file: password_file.map(absolute),
            };
            client(target, req, |v| {
                format!("restored {}", v["restored"].as_str().unwrap_or(""))
            })
        }
        Command::Faults {
            peer,
            delay_ms,
            jitter_ms,
            loss_pct,
            duplicate_pct,
            reorder_pct,
            target,
        } => client(
            target,
            Request::Faults {
                peer,
                delay_ms,
                jitter_ms,
                loss_pct,
                duplicate_pct,
                reorder_pct,
            },
            |_| "ok".into(),
        ),
    }
}

fn config_command(op: ConfigOp, target: Target) -> ExitCode {
    match op {
        ConfigOp::Get { key } => client(target, Request::ConfigGet { key }, |v| v.to_string()),
        ConfigOp::Set {
            key,
            value,
            wait_peers,
        } => match serde_json::from_str(&value) {
            Ok(value) => client(
                target,
                Request::ConfigSet {
                    key,
                    value,
                    wait_peers,
                },
                |_| String::new(),
            ),
            Err(e) => fail(format!(
                "the value is not JSON ({e}); quote strings, e.g. '\"text\"'"
            )),
        },
        ConfigOp::Delete { key, wait_peers } => {
            client(target, Request::ConfigDelete { key, wait_peers }, |_| {
                String::new()
            })
        }
        ConfigOp::List { prefix } => client(target, Request::ConfigList { prefix }, |v| {
            v.as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default()
        }),
    }
}

fn admin_command(op: AdminOp, target: Target) -> ExitCode {
    match op {
        AdminOp::Add {
            name,
            password_file,
        } => {
            let password = match std::fs::read_to_string(&password_file) {
                Ok(p) => zeroize::Zeroizing::new(p),
                Err(e) => return fail(format!("cannot read {}: {e}", password_file.display())),
            };
            let password = password.trim_end_matches(['\n', '\r']);
            if password.len() < 8 {
                return fail(format!(
                    "the password in {} is shorter than 8 characters",
                    password_file.display()
                ));
            }
            match confmesh::admin::hash_password(password) {
                Ok(hash) => client(target, Request::AdminAdd { name, hash }, |_| String::new()),
                Err(e) => fail(e),
            }
        }
        AdminOp::Remove { name } => {
            client(target, Request::AdminRemove { name }, |_| String::new())
        }
        AdminOp::List => client(target, Request::AdminList, one_per_line),
    }
}

/// Paths go to the daemon, which may run in another directory.
fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

/// A daemon answer that is a list of strings (log lines, account names), one per line.
fn one_per_line(v: serde_json::Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("confmesh: {e}");
    ExitCode::FAILURE
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn run(config: PathBuf, keylog: Option<PathBuf>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let version = std::env::var(VERSION_OVERRIDE_ENV)
        .unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_owned());
    match runtime().block_on(daemon::run(Options {
        config_path: config,
        keylog,
        version,
    })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn client(
    target: Target,
    request: Request,
    render: impl FnOnce(serde_json::Value) -> String,
) -> ExitCode {
    let socket = match (target.socket, target.config) {
        (Some(s), _) => s,
        (None, Some(c)) => match daemon::control_socket_of(&c) {
            Ok(s) => s,
            Err(e) => return fail(e),
        },
        (None, None) => PathBuf::from("/var/lib/confmesh/confmesh.sock"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(control::call(&socket, &request)) {
        Ok(v) => {
            let text = render(v);
            if !text.is_empty() {
                println!("{}", text.trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
