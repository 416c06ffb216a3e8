//! `kino serve`: the OpenAI-compatible video server (see the `kino-server` crate).

pub use kino_server::cli::ServeArgs as Args;

pub fn run(a: Args) -> anyhow::Result<()> {
    Ok(kino_server::cli::run(&a)?)
}
