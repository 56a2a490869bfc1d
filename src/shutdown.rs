//! Shutdown on SIGTERM or Ctrl-C, as one cancellation token every part listens to, and the
//! proxied calls in flight, which shutdown waits for up to its grace period and then cuts.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The proxied calls in flight (each one's task, streams included), and the signal that cuts
/// them: a call cut stops waiting for its upstream and is settled for what it delivered.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    tasks: TaskTracker,
    cut: CancellationToken,
}

impl InFlight {
    /// Runs a call's task, tracked.
    pub fn spawn<F>(&self, call: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(call)
    }

    /// Resolves once the calls are cut.
    pub async fn cut_signal(&self) {
        self.cut.cancelled().await
    }

    /// Cuts every call in flight, and every call started from now on.
    pub fn cut(&self) {
        self.cut.cancel();
    }

    /// Resolves once no call is in flight (calls started meanwhile are waited for too).
    pub async fn finished(&self) {
        self.tasks.close();
        self.tasks.wait().await
    }
}

/// A token cancelled on the first SIGTERM or Ctrl-C.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: no new connections; finishing in-flight requests");
        trigger.cancel();
    });
    token
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
