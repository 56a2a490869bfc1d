//! The HTTP server: accepts connections and serves the router on each over HTTP/1.1, with
//! every read a client controls bounded in time, so a client trickling bytes cannot hold a
//! connection open:
//! - a request's head must arrive within [`RequestLimits::header_read_timeout`] (which also
//!   closes a kept-alive connection idle that long before its next request);
//! - its body within [`RequestLimits::body_read_timeout`] of the head: a deadline, not an
//!   idle timeout between reads, which a trickle would keep resetting ([`deadline_body`]).
//!
//! On shutdown it stops accepting and lets each connection finish the requests it has
//! (graceful); [`Connections::drop_all`] then closes whatever is still open.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_core::config::RequestLimits;
use tower::{Service, ServiceExt};

/// The connections being served.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    tasks: TaskTracker,
    dropped: CancellationToken,
}

impl Connections {
    /// Resolves once every connection has closed (after accepting has stopped).
    pub async fn closed(&self) {
        self.tasks.close();
        self.tasks.wait().await
    }

    /// Closes every connection still open, whatever it is doing.
    pub fn drop_all(&self) {
        self.dropped.cancel();
    }
}

/// Accepts connections on `listener` and serves `app` on each until `stop` is cancelled;
/// then each connection is asked to close once its request in progress is answered.
pub async fn accept(
    listener: TcpListener,
    app: Router,
    limits: RequestLimits,
    stop: CancellationToken,
    connections: Connections,
) {
    let mut make_service = app.into_make_service_with_connect_info::<SocketAddr>();
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        // Streams write many small chunks: without TCP_NODELAY, Nagle's algorithm holds each
        // one back until the client's delayed ACK (~40 ms per chunk, measured in BENCHMARKS.md).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let Ok(service) = make_service.call(remote).await;
        let service = TowerToHyperService::new(service.map_request(|r: Request<Incoming>| r.map(Body::new)));
        let (stop, dropped) = (stop.clone(), connections.dropped.clone());
        connections.tasks.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
            let connection = http.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => Some(served),
                () = stop.cancelled() => None,
                () = dropped.cancelled() => return,
            };
            let served = match served {
                Some(served) => served,
                None => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        served = connection => served,
                        () = dropped.cancelled() => return,
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// What the listener's errors call for: a connection that failed before it was accepted is
/// skipped; anything else (out of file descriptors) is waited out a little, not spun on.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Middleware: the request's body must have arrived within `timeout` of its head; past it,
/// reading it fails (a `400` from the handler that reads it, and the connection closes).
pub async fn deadline_body(
    axum::extract::State(timeout): axum::extract::State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    let deadline = Box::pin(tokio::time::sleep(timeout));
    next.run(request.map(|body| Body::new(DeadlineBody { inner: body, deadline, timeout }))).await
}

/// A body that fails once its deadline has passed.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0} seconds")]
struct BodyTooSlow(u64);

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        // What has arrived is taken first: a body complete at the deadline is not failed.
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow(this.timeout.as_secs())))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
