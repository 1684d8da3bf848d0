//! The `postback-proxy` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mimalloc::MiMalloc;
use postback_proxy::{App, Config, ConfigError};

/// mimalloc: the proxy allocates and frees many small buffers per request, and glibc's allocator
/// showed up at about an eighth of the CPU time in profiles.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// A Pingora reverse proxy that answers Treasure Data compatible tracking-pixel postbacks and
/// forwards every other request to the origin.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The configuration file.
    #[arg(short, long, default_value = "conf/postback-proxy.yaml")]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Run in the background (Pingora's daemon mode).
    #[arg(short, long)]
    daemon: bool,
    /// Take over the listening sockets of a running instance through `server.upgrade_sock`.
    #[arg(short, long)]
    upgrade: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return report(&e),
    };
    if args.check {
        let problems = App::validate(config);
        if problems.is_empty() {
            println!("configuration OK");
            return ExitCode::SUCCESS;
        }
        return report(&ConfigError::Invalid(problems));
    }
    let app = match App::build(config) {
        Ok(app) => app,
        Err(problems) => return report(&ConfigError::Invalid(problems)),
    };
    match app.run(args.daemon, args.upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postback-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(2)
}
