//! `kino migrate`: creates or updates the Postgres tables of `kino serve --database` (see the
//! `kino-server` crate's `pg` module).

pub use kino_server::cli::MigrateArgs as Args;

pub fn run(a: Args) -> anyhow::Result<()> {
    Ok(kino_server::cli::migrate(&a)?)
}
