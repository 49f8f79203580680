//! The admin HTTP API, status page and `/metrics` (SPEC.md §7), served with axum.
//!
//! Handlers hold no cluster state: they pass requests to the daemon's state loop over the same
//! channel as the control socket, so HTTP and CLI see and change exactly the same thing.
//! `/api/…` and the page need HTTP Basic authentication against the administrator accounts
//! (shared configuration, Argon2id hashes only). Argon2id is deliberately slow, so a verified
//! credential is remembered in memory for a short while, keyed by a SHA-256 of the password and
//! the stored hash, so that a busy client does not pay it per request and a changed or removed
//! account stops working at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::control::{Call, Request};
use crate::status::Status;

/// How long a verified credential is trusted without running Argon2id again.
pub const CREDENTIAL_CACHE_TTL: Duration = Duration::from_secs(60);
/// Cached credentials at most; the cache is cleared when full (accounts are few).
const CREDENTIAL_CACHE_MAX: usize = 256;
/// Largest request body accepted (a configuration value).
pub const MAX_BODY: usize = 64 * 1024;

/// Hashes a new administrator password with Argon2id (default parameters, random salt) into the
/// PHC string that the shared configuration stores.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut raw = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).map_err(|_| "no randomness available".to_owned())?;
    let salt = SaltString::encode_b64(&raw).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Checks `password` against a stored PHC hash in constant time (argon2's own comparison).
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

#[derive(Clone)]
struct AdminState {
    calls: mpsc::Sender<Call>,
    cache: Arc<Mutex<HashMap<[u8; 32], Instant>>>,
}

/// Serves the admin API on `listener` until `stop` fires.
pub async fn serve(listener: tokio::net::TcpListener, calls: mpsc::Sender<Call>, mut stop: watch::Receiver<bool>) -> std::io::Result<()> {
    let state = AdminState { calls, cache: Arc::new(Mutex::new(HashMap::new())) };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(page))
        .route("/api/v1/status", get(status))
        .route("/api/v1/config", get(config_list))
        .route("/api/v1/config/{*key}", get(config_get).put(config_put).delete(config_delete))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await
}

async fn ask(state: &AdminState, request: Request) -> Result<Value, Response> {
    let (tx, rx) = oneshot::channel();
    if state.calls.send((request, tx)).await.is_err() {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is shutting down"));
    }
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.starts_with("not found") => Err(error(StatusCode::NOT_FOUND, &e)),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, &e)),
        Err(_) => Err(error(StatusCode::SERVICE_UNAVAILABLE, "the daemon dropped the request")),
    }
}

fn error(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

fn unauthorized() -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, "administrator credentials required (HTTP Basic)");
    r.headers_mut().insert(header::WWW_AUTHENTICATE, "Basic realm=\"confmesh\", charset=\"UTF-8\"".parse().expect("static header"));
    r
}

/// Checks HTTP Basic credentials against the administrator accounts.
async fn authenticate(state: &AdminState, headers: &HeaderMap) -> Result<(), Response> {
    let Some((name, password)) = basic_credentials(headers) else { return Err(unauthorized()) };
    let hash = match ask(state, Request::AdminHash { name: name.clone() }).await {
        Ok(Value::String(h)) => h,
        _ => return Err(unauthorized()),
    };
    let key: [u8; 32] = Sha256::new()
        .chain_update(name.as_bytes())
        .chain_update([0])
        .chain_update(password.as_bytes())
        .chain_update([0])
        .chain_update(hash.as_bytes())
        .finalize()
        .into();
    let now = Instant::now();
    if state.cache.lock().expect("cache lock").get(&key).is_some_and(|&until| until > now) {
        return Ok(());
    }
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash)).await.unwrap_or(false);
    if !ok {
        return Err(unauthorized());
    }
    let mut cache = state.cache.lock().expect("cache lock");
    if cache.len() >= CREDENTIAL_CACHE_MAX {
        cache.clear();
    }
    cache.insert(key, now + CREDENTIAL_CACHE_TTL);
    Ok(())
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (name, password) = text.split_once(':')?;
    Some((name.to_owned(), password.to_owned()))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match ask(&state, Request::Metrics).await {
        Ok(Value::String(text)) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Ok(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "metrics were not text"),
        Err(r) => r,
    }
}

async fn status(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authenticate(&state, &headers).await {
        return r;
    }
    match ask(&state, Request::Status).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

async fn config_list(State(state): State<AdminState>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Response {
    if let Err(r) = authenticate(&state, &headers).await {
        return r;
    }
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    match ask(&state, Request::ConfigList { prefix }).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

async fn config_get(State(state): State<AdminState>, headers: HeaderMap, Path(key): Path<String>) -> Response {
    if let Err(r) = authenticate(&state, &headers).await {
        return r;
    }
    match ask(&state, Request::ConfigGet { key }).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

/// `?wait_peers=N` on a write: also wait until N other peers have it (as `--wait-peers`).
#[derive(Debug, Default, serde::Deserialize)]
struct WaitPeers {
    #[serde(default)]
    wait_peers: usize,
}

async fn config_put(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(WaitPeers { wait_peers }): Query<WaitPeers>,
    body: Bytes,
) -> Response {
    if let Err(r) = authenticate(&state, &headers).await {
        return r;
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the body is not JSON: {e}")),
    };
    match ask(&state, Request::ConfigSet { key, value, wait_peers }).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

async fn config_delete(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(WaitPeers { wait_peers }): Query<WaitPeers>,
) -> Response {
    if let Err(r) = authenticate(&state, &headers).await {
        return r;
    }
    match ask(&state, Request::ConfigDelete { key, wait_peers }).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

async fn page(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authenticate(&state, &headers).await {
        return r;
    }
    match ask(&state, Request::Status).await {
        Ok(v) => match serde_json::from_value::<Status>(v) {
            Ok(s) => Html(render_page(&s)).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        Err(r) => r,
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The status page: the cluster drawn as an SVG (peers on a circle, links with RTT and state),
/// then the peer table and the alarms. Plain HTML, no script, refreshes itself every 5 s.
pub fn render_page(s: &Status) -> String {
    let n = s.peers.len().max(1);
    let pos: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            let a = std::f64::consts::TAU * i as f64 / n as f64 - std::f64::consts::FRAC_PI_2;
            (200.0 + 130.0 * a.cos(), 170.0 + 120.0 * a.sin())
        })
        .collect();
    let me = s.peers.iter().position(|p| p.state == "this-system").unwrap_or(0);
    let mut svg = String::new();
    for (i, p) in s.peers.iter().enumerate() {
        if i == me {
            continue;
        }
        let colour = if p.state == "active" { "#2a8a3e" } else { "#c0392b" };
        let label = match (p.state.as_str(), p.rtt_ms) {
            ("active", Some(rtt)) => format!("{rtt:.1} ms · IKE {}", p.ike.as_deref().unwrap_or("-")),
            _ => p.reason.clone().unwrap_or_else(|| "not active".into()),
        };
        let (x1, y1) = pos[me];
        let (x2, y2) = pos[i];
        svg.push_str(&format!(
            "<line x1='{x1:.0}' y1='{y1:.0}' x2='{x2:.0}' y2='{y2:.0}' stroke='{colour}' stroke-width='3'{dash}/>\
             <text x='{:.0}' y='{:.0}' font-size='12' text-anchor='middle' fill='{colour}'>{}</text>",
            (x1 + x2) / 2.0,
            (y1 + y2) / 2.0 - 6.0,
            escape(&label),
            dash = if p.state == "active" { "" } else { " stroke-dasharray='6 4'" },
        ));
    }
    for (i, p) in s.peers.iter().enumerate() {
        let (x, y) = pos[i];
        let fill = match p.state.as_str() {
            "this-system" => "#1f4e79",
            "active" => "#2a8a3e",
            _ => "#c0392b",
        };
        svg.push_str(&format!(
            "<circle cx='{x:.0}' cy='{y:.0}' r='34' fill='{fill}'/>\
             <text x='{x:.0}' y='{y:.0}' font-size='12' text-anchor='middle' fill='white'>{}</text>\
             <text x='{x:.0}' y='{:.0}' font-size='11' text-anchor='middle' fill='white'>{}</text>",
            escape(p.hostname.as_deref().unwrap_or("?")),
            y + 14.0,
            p.addr
        ));
    }
    let mut rows = String::new();
    for p in &s.peers {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            p.addr,
            p.overlay_addr,
            escape(&p.describe()),
            p.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms")),
            p.clock_skew_ms.map_or("-".into(), |r| format!("{r:.1} ms")),
            p.path_mtu.map_or("-".into(), |m| m.to_string()),
            escape(p.ike.as_deref().unwrap_or("-")),
        ));
    }
    let alarms = if s.alarms.is_empty() {
        "<p>No alarms.</p>".to_owned()
    } else {
        let items: String = s
            .alarms
            .iter()
            .map(|a| format!("<li><b>{}</b> with {} since {}: {}</li>", escape(&a.kind), a.peer, escape(&a.raised_at), escape(&a.detail)))
            .collect();
        format!("<ul>{items}</ul>")
    };
    let conferences: String = s
        .conferences
        .iter()
        .map(|c| format!("<tr><td>{}</td><td>{}</td><td>{}</td></tr>", escape(&c.name), escape(&c.bridge), c.calls))
        .collect();
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>confmesh — {host}</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head><body>\
         <h1>{host} — confmesh {version} ({mode})</h1>\
         <svg width=\"400\" height=\"340\" role=\"img\" aria-label=\"cluster\">{svg}</svg>\
         <h2>Peers</h2><table><tr><th>Peer</th><th>Overlay</th><th>Status</th><th>RTT</th><th>Clock skew</th><th>Path MTU</th><th>IKE</th></tr>{rows}</table>\
         <h2>Alarms</h2>{alarms}\
         <h2>Conferences</h2><table><tr><th>Conference</th><th>Bridge</th><th>Calls</th></tr>{conferences}</table>\
         </body></html>\n",
        host = escape(&s.hostname),
        version = escape(&s.version),
        mode = escape(&s.mode),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_round_trip() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("s3cret!", &h));
        assert!(!verify_password("s3cret", "not a hash"));
    }

    #[test]
    fn basic_header_parsing() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Basic YWRtaW46cGE6c3M=".parse().unwrap());
        assert_eq!(basic_credentials(&h), Some(("admin".into(), "pa:ss".into())));
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert_eq!(basic_credentials(&h), None);
    }

    #[test]
    fn page_escapes_and_draws_every_peer() {
        let s: Status = serde_json::from_value(json!({
            "hostname": "c<1>", "version": "0.1.0", "mode": "cluster",
            "peers": [
                {"addr": "10.96.0.1", "hostname": "c<1>", "overlay_addr": "198.18.0.1", "state": "this-system", "reason": null,
                 "rtt_ms": null, "clock_skew_ms": null, "path_mtu": null, "ike": null, "sas": 0},
                {"addr": "10.96.0.2", "hostname": "c2", "overlay_addr": "198.18.0.2", "state": "active", "reason": null,
                 "rtt_ms": 0.4, "clock_skew_ms": 1.0, "path_mtu": 1500, "ike": "established", "sas": 2}
            ],
            "alarms": []
        }))
        .unwrap();
        let html = render_page(&s);
        assert!(html.contains("c&lt;1&gt;") && !html.contains("c<1>"));
        assert_eq!(html.matches("<circle").count(), 2);
        assert!(html.contains("Active as c2"));
    }
}
