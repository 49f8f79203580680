//! The `confmesh` command: runs the daemon or talks to a running one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use confmesh::config::Config;

/// Cluster fabric of a conference-routing appliance.
#[derive(Parser)]
#[command(name = "confmesh", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and print what it resolves to, without starting anything.
    Check {
        /// The configuration file (SPEC.md §7).
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("confmesh: {e}");
                ExitCode::from(2)
            }
        },
    }
}
