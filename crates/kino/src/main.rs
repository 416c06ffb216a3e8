//! `kino`: generate videos from text on your own machine, check parity with the reference,
//! benchmark.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kino", version, about = "Open, self-hosted text-to-video", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a video from a prompt.
    Generate(Box<commands::generate::Args>),
    /// Continue a video (any MP4, MOV, WebM, …) with new segments from a model that takes a
    /// first image: `kino extend IN.mp4 "what happens next" --seconds 8 -o OUT.mp4`.
    Extend(Box<commands::extend::Args>),
    /// Edit a video with a VACE model: regenerate a masked region (`--mask MASK.png|MASK.mp4`,
    /// white = regenerate), widen the frame (`--outpaint 1.5x`, `--canvas WxH`), keep a subject
    /// (`--reference subject.png`).
    Edit(Box<commands::edit::Args>),
    /// Show a video's format, size, frames, fps and the parameters it was made with.
    Info(commands::info::Args),
    /// Run one model component on tensors from a file (for checking against the reference).
    Parity(Box<commands::parity::Args>),
    /// Time one transformer forward or VAE decode against PyTorch on the same machine, or
    /// (`video`) a whole video at the 1.3B size with and without a cache and few steps.
    Bench(commands::bench::Args),
    /// List the models Kino knows and whether each is here.
    Models(commands::models::ModelsArgs),
    /// Score how well a shapes-world model follows held-out prompts (or analyse one video).
    Eval(Box<commands::eval::Args>),
    /// Download a model into the Hugging Face cache.
    Pull(commands::models::PullArgs),
    /// Check a video or image: its C2PA manifest (trusted / valid / invalid / absent) and Kino's
    /// invisible watermark.
    Verify(commands::verify::Args),
    /// Embed Kino's watermark in any video and sign it: `kino mark IN.mp4 -o OUT.mp4`.
    Mark(Box<commands::mark::Args>),
    /// Serve the OpenAI Videos API (`base_url=http://HOST:PORT/v1`) with a durable job queue.
    Serve(Box<commands::serve::Args>),
    /// Create or update the Postgres tables of `kino serve --database URL` (run once per upgrade).
    Migrate(commands::migrate::Args),
    /// Write a model's transformer or text encoder as a GGUF file with quantized matrices
    /// (Q8_0, Q6_K, Q5_K, Q4_K); use it with `--model FILE.gguf,FOLDER`.
    Quantize(commands::quantize::Args),
}

fn main() -> ExitCode {
    // The allocator: large buffers back to the system while weights load, kept for reuse while
    // models run (see `kino_engine::memory`).
    kino_engine::memory::manage();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KINO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => commands::generate::run(*a),
        Command::Extend(a) => commands::extend::run(*a),
        Command::Edit(a) => commands::edit::run(*a),
        Command::Info(a) => commands::info::run(a),
        Command::Parity(a) => commands::parity::run(*a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Models(a) => commands::models::list(a),
        Command::Eval(a) => commands::eval::run(*a),
        Command::Pull(a) => commands::models::pull(a),
        Command::Serve(a) => commands::serve::run(*a),
        Command::Migrate(a) => commands::migrate::run(a),
        Command::Quantize(a) => commands::quantize::run(a),
        Command::Verify(a) => commands::verify::run(a),
        Command::Mark(a) => commands::mark::run(*a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
