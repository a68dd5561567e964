//! Serving the API with limits an unauthenticated client cannot get around: a cap on
//! connections held at once (more are closed as they arrive), a deadline for a request's
//! headers that also ends idle keep-alive connections (slowloris), a deadline for its body,
//! and a body size limit. `axum::serve` has none of these; hyper has them. Every limit is read
//! from the hub where it applies, so a configuration reload changes them at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::hub::SharedHub;

/// One open API connection, counted while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `app` on `listener` until `stop` turns true, then lets the requests in progress
/// finish (the server bounds how long it waits).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    hub: SharedHub,
    mut stop: watch::Receiver<bool>,
) {
    let app = app
        // The body limit is this middleware's (image uploads keep their own).
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            limit_body,
        ));
    let open = Arc::new(AtomicUsize::new(0));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let limits = &hub.api_limits;
        if open.fetch_add(1, Ordering::Relaxed) >= limits.max_connections.load(Ordering::Relaxed) {
            open.fetch_sub(1, Ordering::Relaxed);
            hub.metrics.api_connections_refused.inc();
            drop(stream);
            continue;
        }
        let counted = Open(open.clone());
        let header_timeout =
            Duration::from_secs(limits.header_read_timeout_secs.load(Ordering::Relaxed));
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop.clone();
        connections.spawn(async move {
            let _counted = counted;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
}

/// A request body must arrive within `[api] body_read_timeout_secs` and be at most
/// `[api] max_body_bytes` (413 past it); image uploads are limited by their own route.
async fn limit_body(State(hub): State<SharedHub>, request: Request, next: Next) -> Response {
    let limits = &hub.api_limits;
    let timeout = Duration::from_secs(limits.body_read_timeout_secs.load(Ordering::Relaxed));
    let (parts, body) = request.into_parts();
    let body = tower_http::timeout::TimeoutBody::new(timeout, body);
    let upload = parts.method == axum::http::Method::POST && parts.uri.path() == "/images";
    let body = if upload {
        Body::new(body)
    } else {
        let max = limits.max_body_bytes.load(Ordering::Relaxed);
        Body::new(http_body_util::Limited::new(body, max))
    };
    next.run(Request::from_parts(parts, body)).await
}
