//! `kino-server`: the same as `kino serve` (used by the tests, which kill it with SIGKILL).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "kino-server",
    version,
    about = "Kino's OpenAI-compatible video server"
)]
struct Cli {
    #[command(flatten)]
    args: kino_server::cli::ServeArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KINO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match kino_server::cli::run(&cli.args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
