//! One small tokio runtime for the network backends (Postgres, S3), so that synchronous code
//! (the worker threads, the [`crate::store::JobStore`] trait) can wait on them.
//!
//! [`block_on`] works from a plain thread, from inside a multi-thread runtime (the HTTP
//! handlers: the wait happens in `block_in_place`, so the runtime's other tasks keep running)
//! and from a current-thread runtime (on a scoped helper thread).

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kino-io")
            .enable_all()
            .build()
            .expect("cannot start the I/O runtime (out of threads?)")
    })
}

/// The I/O runtime's handle (to spawn background tasks such as a LISTEN loop).
pub fn handle() -> &'static Handle {
    runtime().handle()
}

/// Runs `fut` on the I/O runtime and waits for it.
pub fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Err(_) => runtime().block_on(fut),
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| runtime().block_on(fut)),
        Ok(_) => std::thread::scope(|s| {
            s.spawn(|| runtime().block_on(fut))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        }),
    }
}
