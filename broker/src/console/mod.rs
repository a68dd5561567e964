//! The web console at `/ui`: a page and its script and stylesheet, embedded in the binary,
//! over the same API the CLI uses.
//!
//! - The page signs in once with the admin token ([`session`]); after that the browser holds
//!   only an HttpOnly cookie, and the console calls the API under `/ui/api/…` with it. The API
//!   itself stays bearer-only: the two ways in lead to the very same handlers.
//! - Live figures come as server-sent events ([`live`]).
//! - The assets are written by hand (no build step, no CDN): nothing to build to run the hub,
//!   and the page works on a hub with no way out to the internet.

use std::sync::Arc;

use axum::extract::{Path, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::Digest;

pub mod live;
pub mod session;

use crate::hub::SharedHub;

/// What the console's handlers work with.
#[derive(Clone)]
pub struct ConsoleState {
    pub hub: SharedHub,
    pub sessions: Arc<session::Sessions>,
}

/// One embedded file.
pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Everything the console loads. The page is served at `/ui`, the rest at `/ui/assets/{name}`.
pub const ASSETS: [Asset; 3] = [
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_str!("assets/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/app.css"),
    },
];

/// Scripts and styles only from this hub, no frames, no inline script: a value an attacker
/// slipped into a twin or a device id can at worst be shown, never run.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes: the page and assets (public), sign-in, and behind the session the
/// live streams and `resources` (the API's routes, unchanged) under `/ui/api`.
pub fn router(hub: SharedHub, resources: Router<SharedHub>) -> Router {
    let state = ConsoleState {
        hub: hub.clone(),
        sessions: Arc::default(),
    };
    let api = resources.with_state(hub);
    let signed_in = Router::new()
        .route("/ui/live/overview", get(live::overview_stream))
        .route("/ui/live/devices/{device}", get(live::telemetry_stream))
        .nest_service("/ui/api", api)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            session::require,
        ));
    Router::new()
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/assets/{name}", get(asset))
        .route(
            "/ui/session",
            get(session::current)
                .post(session::sign_in)
                .delete(session::sign_out),
        )
        .merge(signed_in)
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

fn etag(body: &str) -> String {
    let digest = sha2::Sha256::digest(body.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

/// Each asset's ETag, by its place in [`ASSETS`]: hashed once, the assets never change.
fn etags() -> &'static [String] {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    TAGS.get_or_init(|| ASSETS.iter().map(|a| etag(a.body)).collect())
}

fn serve(index: usize, headers: &HeaderMap) -> Response {
    let asset = &ASSETS[index];
    let tag = etags()[index].clone();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == tag);
    let cache = [
        (header::CACHE_CONTROL, "no-cache".to_string()),
        (header::ETAG, tag),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (
        [(header::CONTENT_TYPE, asset.content_type.to_string())],
        cache,
        asset.body,
    )
        .into_response()
}

async fn page(headers: HeaderMap) -> Response {
    serve(0, &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match (1..ASSETS.len()).find(|&i| ASSETS[i].name == name) {
        Some(i) => serve(i, &headers),
        None => {
            crate::api::ApiError::NotFound(format!("no console asset '{name}'")).into_response()
        }
    }
}
