//! CPU work that grows with a request (parsing a large body, counting its tokens, counting
//! what a long answer delivered) kept off the async worker threads: above [`INLINE_BYTES`]
//! it runs on Tokio's blocking threads, at most one job per core at a time, so requests
//! that are all parsing and counting can slow each other but never the server's other work
//! (health checks, the ledger, the dashboard).

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::error::ProxyError;

/// Work on inputs up to this size runs inline. Measured in the dev profile (dependencies at
/// `opt-level = 1`; `counting_costs` in `tollgate-core`'s estimate tests), on a busy machine:
/// the exact count of prose takes 25-150 µs a kilobyte, of random words (every piece merged)
/// ~150 µs; a round trip through the blocking pool 50-100 µs. Sending a 1 KB prompt to the
/// pool would double its cost (and queue it behind large ones); at 16 KB the trip is a few
/// percent of the work, and the longest step left on a worker stays a few milliseconds.
pub const INLINE_BYTES: usize = 16 * 1024;

/// The blocking jobs of the proxy, bounded.
#[derive(Debug)]
pub struct Offload {
    permits: Arc<Semaphore>,
}

impl Offload {
    /// At most `jobs` at a time (at least one).
    pub fn new(jobs: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(jobs.max(1))) }
    }

    /// One job per core this process may use.
    pub fn per_core() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, usize::from))
    }

    /// Runs `work` on an input of `size` bytes: inline when small, else on a blocking
    /// thread once one of the permits is free (waiting for it without holding a worker).
    /// A caller that stops waiting leaves the job to finish; it holds its permit until then.
    pub async fn run<T: Send + 'static>(
        &self,
        size: usize,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ProxyError> {
        if size <= INLINE_BYTES {
            return Ok(work());
        }
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| ProxyError::Internal)?;
        let job = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        });
        job.await.map_err(|e| {
            tracing::error!(error = %e, "a blocking job of the proxy failed");
            ProxyError::Internal
        })
    }
}
