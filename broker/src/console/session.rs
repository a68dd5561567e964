//! Console sign-in: the admin token is exchanged once for a session cookie, so the browser
//! never keeps the token where scripts can read it and it never appears in a URL.
//!
//! - The cookie is `HttpOnly` (scripts cannot read it) and `SameSite=Strict` (no other site's
//!   page can make the browser send it), scoped to `/ui`.
//! - Writes also need the session's CSRF token in `X-CSRF-Token`: a cross-site form cannot set
//!   that header, and a cross-origin script cannot read the token. A request whose `Origin`
//!   is not this host is refused as well.
//! - Sessions live in memory: a restart signs everyone out. Each request checks the token the
//!   session was opened with against the hub's, so a new admin token ends old sessions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::ConsoleState;
use crate::api::ApiError;

/// The cookie's name.
pub const COOKIE: &str = "fleethub_console";
/// The header a write carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts from sign-in.
const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at once; the oldest goes first beyond this.
const MAX_SESSIONS: usize = 1024;
/// What a wrong token costs its sender (a brake on guessing, not a lock-out).
const REFUSAL_DELAY: Duration = Duration::from_millis(300);

struct Session {
    csrf: String,
    /// The admin token it was opened with.
    token: String,
    opened: Instant,
}

/// The signed-in browsers.
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

/// A session found for a request: its CSRF token.
#[derive(Clone)]
pub struct Current {
    pub csrf: String,
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Sessions {
    fn open(&self, token: &str) -> (String, String) {
        let (id, csrf) = (random_token(), random_token());
        let mut map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.opened.elapsed() < LIFETIME);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.opened)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                token: token.to_string(),
                opened: Instant::now(),
            },
        );
        (id, csrf)
    }

    fn close(&self, id: &str) {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// The live session of `id`, if its token is still the hub's admin token.
    fn find(&self, id: &str, hub: &crate::hub::Hub) -> Option<Current> {
        let mut map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let s = map.get(id)?;
        if s.opened.elapsed() >= LIFETIME || !hub.is_admin_token(&s.token) {
            map.remove(id);
            return None;
        }
        Some(Current {
            csrf: s.csrf.clone(),
        })
    }
}

/// The session id in the request's cookies.
fn cookie_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// A request's `Origin`, when it has one, must be this host (http or https).
fn origin_ok(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok();
    match (origin, host) {
        (Some(o), Some(h)) => {
            o.strip_prefix("http://") == Some(h) || o.strip_prefix("https://") == Some(h)
        }
        _ => false,
    }
}

fn forbidden(message: &str) -> Response {
    ApiError::Forbidden(message.into()).into_response()
}

fn cookie(value: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("fleethub_console=; Path=/ui; Max-Age=0"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    token: String,
}

/// What the page learns about its session (never the token or the cookie).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    signed_in: bool,
    csrf_token: String,
    hub_id: String,
    version: &'static str,
}

fn view(state: &ConsoleState, csrf: String) -> SessionView {
    SessionView {
        signed_in: true,
        csrf_token: csrf,
        hub_id: state.hub.config.hub_id.to_string(),
        version: env!("CARGO_PKG_VERSION"),
    }
}

/// `POST /ui/session {token}`: 200 with the CSRF token and a cookie, or 401.
pub async fn sign_in(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    body: Result<Json<SignIn>, JsonRejection>,
) -> Response {
    if !origin_ok(&headers) {
        return forbidden("sign-in from another origin");
    }
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let token = body.token.trim();
    if !state.hub.is_admin_token(token) {
        tokio::time::sleep(REFUSAL_DELAY).await;
        tracing::warn!("console sign-in refused: wrong admin token");
        return ApiError::Unauthorized.into_response();
    }
    let (id, csrf) = state.sessions.open(token);
    tracing::info!("console sign-in");
    let mut response = Json(view(&state, csrf)).into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie(&id, LIFETIME.as_secs()));
    response
}

/// `GET /ui/session`: the current session, or `{"signedIn": false}` (the page then shows
/// sign-in; a 401 here would be an error in the browser's console on every first visit).
pub async fn current(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    match cookie_id(&headers).and_then(|id| state.sessions.find(id, &state.hub)) {
        Some(s) => Json(view(&state, s.csrf)).into_response(),
        None => Json(serde_json::json!({ "signedIn": false })).into_response(),
    }
}

/// `DELETE /ui/session`: signs out (a write: needs the CSRF token).
pub async fn sign_out(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    let Some(id) = cookie_id(&headers) else {
        return ApiError::Unauthorized.into_response();
    };
    let Some(s) = state.sessions.find(id, &state.hub) else {
        return ApiError::Unauthorized.into_response();
    };
    if !csrf_ok(&headers, &s) {
        return forbidden("missing or wrong X-CSRF-Token");
    }
    state.sessions.close(id);
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie("", 0));
    response
}

fn csrf_ok(headers: &HeaderMap, s: &Current) -> bool {
    origin_ok(headers)
        && headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| crate::sas::same_secret(t, &s.csrf))
}

/// In front of the console's API and live streams: a session cookie, and for anything but a
/// read, the session's CSRF token and this host as origin.
pub async fn require(State(state): State<ConsoleState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let Some(s) = cookie_id(headers).and_then(|id| state.sessions.find(id, &state.hub)) else {
        return ApiError::Unauthorized.into_response();
    };
    let read = matches!(*request.method(), Method::GET | Method::HEAD);
    if !read && !csrf_ok(headers, &s) {
        return forbidden("missing or wrong X-CSRF-Token");
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cookie_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; fleethub_console=abc; b=2"),
        );
        assert_eq!(cookie_id(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("fleethub_consoleX=abc"),
        );
        assert_eq!(cookie_id(&h), None);
    }

    #[test]
    fn origin_must_be_this_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(
            origin_ok(&h),
            "no Origin: a same-origin GET or a non-browser client"
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(origin_ok(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!origin_ok(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!origin_ok(&h));
    }
}
