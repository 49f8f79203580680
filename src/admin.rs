//! The admin HTTP API, status page and `/metrics` (SPEC.md §7), served with axum.
//!
//! Handlers hold no cluster state: they pass requests to the daemon's state loop over the same
//! channel as the control socket, so HTTP and CLI see and change exactly the same thing.
//! `/api/…` and the page need HTTP Basic authentication against the administrator accounts
//! (shared configuration, Argon2id hashes only). Argon2id is deliberately slow, so a verified
//! credential is remembered in memory for a short while, keyed by a SHA-256 of the password and
//! the stored hash, so that a busy client does not pay it per request and a changed or removed
//! account stops working at once.
//!
//! What a remote client can drive is bounded: at most [`MAX_CONNECTIONS`] connections at once
//! (more are closed on accept), [`HANDSHAKE_TIMEOUT`] for a TLS handshake and
//! [`HEADER_READ_TIMEOUT`] for request headers, and at most [`VERIFY_CONCURRENCY`] Argon2id
//! verifications (≈19 MiB each) at a time; a request that cannot get one within [`VERIFY_WAIT`]
//! is answered 503 with `Retry-After`. An unknown account name is verified against a fixed
//! dummy hash with the same parameters, so the answer takes as long as for a wrong password.
//!
//! With `[admin] tls_cert_file` and `tls_key_file` set, every connection is TLS (rustls, ring
//! provider) and credentials never cross the network in clear; without them it is plain HTTP.
//!
//! A configuration reload changes both without a restart ([`AdminControl::reconfigure`]): a new
//! `listen` address is bound before the old listener is closed, so an address that cannot be
//! bound is refused (naming `admin.listen`) while the old one keeps serving; new certificate and
//! key files (rotation) are in force for every connection accepted after the reload returns.
//! Connections already open finish on the listener and TLS session they were accepted with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::config::{AdminSettings, AdminTls, ConfigError};
use crate::control::{Call, Request};
use crate::status::Status;

/// How long a verified credential is trusted without running Argon2id again.
pub const CREDENTIAL_CACHE_TTL: Duration = Duration::from_secs(60);
/// Cached credentials at most; the cache is cleared when full (accounts are few).
const CREDENTIAL_CACHE_MAX: usize = 256;
/// Largest request body accepted (a configuration value).
pub const MAX_BODY: usize = 64 * 1024;
/// Connections served at once; one more is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's headers; hyper runs it whenever it waits for a request,
/// so an idle keep-alive connection is closed after it too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may finish their requests once the daemon stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Argon2id verifications run at once (each holds ≈19 MiB and a blocking thread).
pub const VERIFY_CONCURRENCY: usize = 2;
/// How long a request waits for a verification slot before it is answered 503.
pub const VERIFY_WAIT: Duration = Duration::from_secs(2);
/// `Retry-After` (seconds) of that 503.
const VERIFY_RETRY_AFTER: &str = "1";
/// The hash an unknown account name is verified against: Argon2id with the default parameters
/// that [`hash_password`] uses (checked by a test), of a password nobody knows. The result is
/// ignored; it only makes an unknown name cost what a wrong password costs.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$p5OGeSlhiVDS4iewDmD+Gg$kdPIDw+d6ZCwxUMx0p51zPuo+ufuzdoXcT1vTHxks2A";

/// Hashes a new administrator password with Argon2id (default parameters, random salt) into the
/// PHC string that the shared configuration stores.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut raw = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| "no randomness available".to_owned())?;
    let salt = SaltString::encode_b64(&raw).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks `password` against a stored PHC hash in constant time (argon2's own comparison).
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

#[derive(Clone)]
struct AdminState {
    calls: mpsc::Sender<Call>,
    cache: Arc<Mutex<HashMap<[u8; 32], Instant>>>,
    /// Slots for Argon2id verifications ([`VERIFY_CONCURRENCY`]).
    verify_slots: Arc<Semaphore>,
    /// How long a request waits for a slot ([`VERIFY_WAIT`]; shorter in tests).
    verify_wait: Duration,
    /// Argon2id verifications run, dummy ones included.
    verifications: Arc<AtomicU64>,
}

impl AdminState {
    fn new(calls: mpsc::Sender<Call>) -> Self {
        AdminState {
            calls,
            cache: Arc::new(Mutex::new(HashMap::new())),
            verify_slots: Arc::new(Semaphore::new(VERIFY_CONCURRENCY)),
            verify_wait: VERIFY_WAIT,
            verifications: Arc::new(AtomicU64::new(0)),
        }
    }
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(page))
        .route("/api/v1/status", get(status))
        .route("/api/v1/config", get(config_list))
        .route(
            "/api/v1/config/{*key}",
            get(config_get).put(config_put).delete(config_delete),
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Binds the admin API's listener on `addr`; a refusal names `admin.listen` and says what to do.
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, ConfigError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ConfigError {
            field: "admin.listen".to_owned(),
            message: format!(
                "cannot listen on {addr}: {e}; give an address:port of this host that is not in use"
            ),
        })
}

/// A change a reload makes to the running admin API.
struct Rebind {
    /// A new listener, already bound, to accept on instead of the current one.
    listener: Option<tokio::net::TcpListener>,
    /// The TLS acceptor for connections accepted from now on (`None`: plain HTTP).
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Answered once the accept loop uses the new settings.
    done: oneshot::Sender<()>,
}

/// The daemon's hold on the running admin API: what it listens on and with which TLS identity,
/// and the way to change both on a configuration reload.
pub struct AdminControl {
    settings: AdminSettings,
    rebind: mpsc::Sender<Rebind>,
}

/// The accept loop's end of [`AdminControl`], handed to [`serve`].
pub struct AdminUpdates(mpsc::Receiver<Rebind>);

impl AdminControl {
    /// A control for an admin API started with `settings`, and the end [`serve`] listens on.
    pub fn new(settings: AdminSettings) -> (AdminControl, AdminUpdates) {
        let (rebind, updates) = mpsc::channel(1);
        (AdminControl { settings, rebind }, AdminUpdates(updates))
    }

    /// The settings in force.
    pub fn settings(&self) -> &AdminSettings {
        &self.settings
    }

    /// Puts `new` settings in force: binds a changed `listen` address first — if that fails the
    /// refusal names `admin.listen` and nothing changes, the old listener serving on — then
    /// switches the accept loop to the new listener and TLS identity (the files were read and
    /// checked when the configuration was loaded, so a bad certificate or key never gets here).
    /// Returns what changed, for the configuration log; empty when nothing did.
    pub async fn reconfigure(&mut self, new: &AdminSettings) -> Result<Vec<String>, ConfigError> {
        let listener = if new.listen != self.settings.listen {
            Some(bind(new.listen).await?)
        } else {
            None
        };
        let mut changed = Vec::new();
        if listener.is_some() {
            changed.push(format!(
                "admin.listen {} (was {})",
                new.listen, self.settings.listen
            ));
        }
        match (&self.settings.tls, &new.tls) {
            (None, None) => {}
            (None, Some(t)) => {
                changed.push(format!("admin API on HTTPS with {}", t.cert_file.display()))
            }
            (Some(_), None) => {
                changed.push("admin API on plain HTTP (no tls_cert_file/tls_key_file)".to_owned())
            }
            (Some(old), Some(t)) if old != t => changed.push(format!(
                "admin TLS certificate from {} reloaded",
                t.cert_file.display()
            )),
            (Some(_), Some(_)) => {}
        }
        // The files were read again with the configuration: use what was read even when it looks
        // the same (a key replaced under an unchanged certificate is no different to `==`).
        let tls = new
            .tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.server_config()));
        let (done, applied) = oneshot::channel();
        if self
            .rebind
            .send(Rebind {
                listener,
                tls,
                done,
            })
            .await
            .is_ok()
        {
            // The accept loop is gone only when the daemon is stopping; nothing to wait for then.
            let _ = applied.await;
        }
        self.settings = new.clone();
        Ok(changed)
    }
}

/// Serves the admin API on `listener` until `stop` fires: HTTPS with `tls`, plain HTTP without;
/// `updates` switches the listener and TLS identity on a reload (see [`AdminControl`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<AdminTls>,
    updates: AdminUpdates,
    calls: mpsc::Sender<Call>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let tls = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.server_config()));
    serve_app(listener, tls, updates, router(AdminState::new(calls)), stop).await
}

/// The accept loop: one task per connection, at most [`MAX_CONNECTIONS`] of them.
async fn serve_app(
    mut listener: tokio::net::TcpListener,
    mut tls: Option<tokio_rustls::TlsAcceptor>,
    AdminUpdates(mut updates): AdminUpdates,
    app: Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    while !*stop.borrow() {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            Some(rebind) = updates.recv() => {
                // The old listener closes here (connections waiting in its backlog are reset);
                // open connections keep their own tasks and TLS sessions.
                if let Some(new) = rebind.listener {
                    listener = new;
                }
                tls = rebind.tls;
                let _ = rebind.done.send(());
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like: do not spin; the listener stays.
                tracing::warn!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin API: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        connections.spawn(connection(
            tcp,
            tls.clone(),
            app.clone(),
            stop.clone(),
            permit,
        ));
    }
    // Every connection saw `stop` too and is finishing its request; wait for them, bounded.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
    Ok(())
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// One accepted connection: the TLS handshake (bounded in time) when configured, then HTTP/1.1.
async fn connection(
    tcp: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let Some(acceptor) = tls else {
        return http(tcp, app, stop).await;
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => http(stream, app, stop).await,
        // A client speaking plain HTTP to the TLS port ends here: no request is read.
        Ok(Err(e)) => tracing::debug!(error = %e, "admin API: TLS handshake failed"),
        Err(_) => {
            tracing::debug!("admin API: TLS handshake not completed within {HANDSHAKE_TIMEOUT:?}")
        }
    }
}

async fn http<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn ask(state: &AdminState, request: Request) -> Result<Value, Response> {
    let (tx, rx) = oneshot::channel();
    if state.calls.send((request, tx)).await.is_err() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        ));
    }
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.starts_with("not found") => Err(error(StatusCode::NOT_FOUND, &e)),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, &e)),
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon dropped the request",
        )),
    }
}

fn error(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

fn busy() -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many password checks in progress; retry in a second",
    );
    r.headers_mut().insert(
        header::RETRY_AFTER,
        VERIFY_RETRY_AFTER.parse().expect("static header"),
    );
    r
}

fn unauthorized() -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "administrator credentials required (HTTP Basic)",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        "Basic realm=\"confmesh\", charset=\"UTF-8\""
            .parse()
            .expect("static header"),
    );
    r
}

/// Checks HTTP Basic credentials against the administrator accounts.
async fn authenticate(state: &AdminState, headers: &HeaderMap) -> Result<(), Response> {
    let Some((name, password)) = basic_credentials(headers) else {
        return Err(unauthorized());
    };
    // An unknown or malformed name is checked against the dummy hash: same cost, same answer.
    let stored = match ask(state, Request::AdminHash { name: name.clone() }).await {
        Ok(Value::String(h)) => Some(h),
        Err(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => return Err(r),
        _ => None,
    };
    let hash = stored.clone().unwrap_or_else(|| DUMMY_HASH.to_owned());
    let key: [u8; 32] = Sha256::new()
        .chain_update(name.as_bytes())
        .chain_update([0])
        .chain_update(password.as_bytes())
        .chain_update([0])
        .chain_update(hash.as_bytes())
        .finalize()
        .into();
    let now = Instant::now();
    if stored.is_some()
        && state
            .cache
            .lock()
            .expect("cache lock")
            .get(&key)
            .is_some_and(|&until| until > now)
    {
        return Ok(());
    }
    let slot = match tokio::time::timeout(
        state.verify_wait,
        state.verify_slots.clone().acquire_owned(),
    )
    .await
    {
        Ok(Ok(slot)) => slot,
        _ => return Err(busy()),
    };
    state.verifications.fetch_add(1, Ordering::Relaxed);
    // The slot moves into the blocking task: a client that hangs up does not free it early.
    let verified = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        verify_password(&password, &hash)
    })
    .await
    .unwrap_or(false);
    if !(verified && stored.is_some()) {
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
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (name, password) = text.split_once(':')?;
    Some((name.to_owned(), password.to_owned()))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match ask(&state, Request::Metrics).await {
        Ok(Value::String(text)) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
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

async fn config_list(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = authenticate(&state, &headers).await {
        return r;
    }
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    match ask(&state, Request::ConfigList { prefix }).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

async fn config_get(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Response {
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
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the body is not JSON: {e}"),
            );
        }
    };
    match ask(
        &state,
        Request::ConfigSet {
            key,
            value,
            wait_peers,
        },
    )
    .await
    {
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
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
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
    let me = s
        .peers
        .iter()
        .position(|p| p.state == "this-system")
        .unwrap_or(0);
    let mut svg = String::new();
    for (i, p) in s.peers.iter().enumerate() {
        if i == me {
            continue;
        }
        let colour = if p.state == "active" {
            "#2a8a3e"
        } else {
            "#c0392b"
        };
        let label = match (p.state.as_str(), p.rtt_ms) {
            ("active", Some(rtt)) => {
                format!("{rtt:.1} ms · IKE {}", p.ike.as_deref().unwrap_or("-"))
            }
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
            .map(|a| {
                format!(
                    "<li><b>{}</b> with {} since {}: {}</li>",
                    escape(&a.kind),
                    a.peer,
                    escape(&a.raised_at),
                    escape(&a.detail)
                )
            })
            .collect();
        format!("<ul>{items}</ul>")
    };
    let conferences: String = s
        .conferences
        .iter()
        .map(|c| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&c.name),
                escape(&c.bridge),
                c.calls
            )
        })
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

    /// A stand-in for the daemon's state loop with one account, `ops`, whose hash is `hash`.
    fn fake_daemon(hash: String) -> mpsc::Sender<Call> {
        let (tx, mut rx) = mpsc::channel::<Call>(8);
        tokio::spawn(async move {
            while let Some((request, reply)) = rx.recv().await {
                let answer = match request {
                    Request::AdminHash { name } if name == "ops" => Ok(json!(hash)),
                    Request::AdminHash { name } => {
                        Err(format!("not found: no administrator {name}"))
                    }
                    Request::Status => Ok(json!({ "hostname": "tls-test" })),
                    Request::Metrics => Ok(json!("confmesh_info 1\n")),
                    _ => Err("not served in this test".to_owned()),
                };
                let _ = reply.send(answer);
            }
        });
        tx
    }

    fn basic(credentials: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        );
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    fn verifications(state: &AdminState) -> u64 {
        state.verifications.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn unknown_name_is_verified_against_the_dummy_and_refused() {
        let state = AdminState::new(fake_daemon(hash_password("pw").unwrap()));
        let refused = authenticate(&state, &basic("nobody:pw")).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert!(refused.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(
            verifications(&state),
            1,
            "an unknown name must cost one Argon2id verification"
        );
        // A name the store refuses outright (bad characters) goes the same way.
        assert_eq!(
            authenticate(&state, &basic("bad name!:pw"))
                .await
                .unwrap_err()
                .status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(verifications(&state), 2);
        // A known name with a wrong password: the same answer, the same work.
        assert_eq!(
            authenticate(&state, &basic("ops:wrong"))
                .await
                .unwrap_err()
                .status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(verifications(&state), 3);
        assert!(authenticate(&state, &basic("ops:pw")).await.is_ok());
        assert_eq!(verifications(&state), 4);
        // Remembered: no second verification, but only for the right password.
        assert!(authenticate(&state, &basic("ops:pw")).await.is_ok());
        assert_eq!(verifications(&state), 4);
        // The dummy hash never lets anyone in, whatever the password.
        assert!(!verify_password("", DUMMY_HASH) && !verify_password("pw", DUMMY_HASH));
    }

    #[test]
    fn dummy_hash_has_the_parameters_of_real_hashes() {
        let real = hash_password("x").unwrap();
        let params = |phc: &str| {
            let h = PasswordHash::new(phc).unwrap();
            let p = argon2::Params::try_from(&h).unwrap();
            (
                h.algorithm.to_string(),
                h.version,
                p.m_cost(),
                p.t_cost(),
                p.p_cost(),
                h.hash.map(|o| o.len()),
            )
        };
        assert_eq!(params(DUMMY_HASH), params(&real));
        assert_eq!(params(DUMMY_HASH).0, "argon2id");
    }

    #[tokio::test]
    async fn verifications_are_bounded_and_the_excess_gets_503() {
        assert_eq!(VERIFY_CONCURRENCY, 2);
        let mut state = AdminState::new(fake_daemon(hash_password("pw").unwrap()));
        assert_eq!(state.verify_slots.available_permits(), VERIFY_CONCURRENCY);
        state.verify_wait = Duration::from_millis(20);
        // Every slot busy (as with VERIFY_CONCURRENCY verifications running): the next request
        // waits verify_wait, runs nothing and is told to come back.
        let held = state
            .verify_slots
            .clone()
            .acquire_many_owned(VERIFY_CONCURRENCY as u32)
            .await
            .unwrap();
        for credentials in ["ops:pw", "nobody:pw"] {
            let r = authenticate(&state, &basic(credentials)).await.unwrap_err();
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "1");
        }
        assert_eq!(verifications(&state), 0);
        drop(held);
        assert!(authenticate(&state, &basic("ops:pw")).await.is_ok());
        assert_eq!(
            state.verify_slots.available_permits(),
            VERIFY_CONCURRENCY,
            "the slot comes back after the verification"
        );
    }

    /// A TCP stream that keeps a copy of every byte sent and received: what a wire tap sees.
    struct Tapped {
        inner: tokio::net::TcpStream,
        seen: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Tapped {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
            let new = buf.filled()[before..].to_vec();
            self.seen.lock().unwrap().extend_from_slice(&new);
            r
        }
    }

    impl AsyncWrite for Tapped {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            data: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
            if let std::task::Poll::Ready(Ok(n)) = r {
                self.seen.lock().unwrap().extend_from_slice(&data[..n]);
            }
            r
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    const PASSWORD: &str = "tls-test-password-7f3a";

    fn request(path: &str) -> String {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("ops:{PASSWORD}"));
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n"
        )
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Both spellings of the password a tap could find: as typed and inside the Basic header.
    fn leaks(seen: &[u8]) -> bool {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("ops:{PASSWORD}"));
        contains(seen, PASSWORD.as_bytes())
            || contains(seen, b64.as_bytes())
            || contains(seen, b"Authorization")
    }

    async fn start(
        tls: Option<AdminTls>,
    ) -> (
        std::net::SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let (addr, stop, task, _control) = start_controlled(tls).await;
        (addr, stop, task)
    }

    /// [`start`], also returning the control a reload uses.
    async fn start_controlled(
        tls: Option<AdminTls>,
    ) -> (
        std::net::SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<std::io::Result<()>>,
        AdminControl,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (control, updates) = AdminControl::new(AdminSettings {
            listen: addr,
            tls: tls.clone(),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(
            listener,
            tls,
            updates,
            fake_daemon(hash_password(PASSWORD).unwrap()),
            stop_rx,
        ));
        (addr, stop_tx, task, control)
    }

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A connection the server closed at once may refuse the write; the answer tells.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        // A peer that closes without close_notify is an error here; what arrived is what counts.
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("answer in time");
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn https_serves_plain_http_is_refused_and_the_password_stays_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert_file, key_file) = (dir.path().join("admin.crt"), dir.path().join("admin.key"));
        std::fs::write(&cert_file, generated.cert.pem()).unwrap();
        std::fs::write(&key_file, generated.key_pair.serialize_pem()).unwrap();
        let tls = AdminTls::load(&cert_file, &key_file).unwrap();
        let (addr, stop, task) = start(Some(tls)).await;

        // A client trusting only this certificate gets the status over TLS; the tap sees no
        // password, no Basic header, no HTTP at all.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tcp = Tapped {
            inner: tokio::net::TcpStream::connect(addr).await.unwrap(),
            seen: seen.clone(),
        };
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = trusting(&generated.cert).connect(name, tcp).await.unwrap();
        let answer = exchange(stream, &request("/api/v1/status")).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("tls-test"), "{answer}");
        let seen = seen.lock().unwrap().clone();
        assert!(seen.len() > 1000, "the tap saw only {} bytes", seen.len());
        assert!(!leaks(&seen), "credentials crossed the wire in clear");
        assert!(
            !contains(&seen, b"HTTP/1.1"),
            "HTTP crossed the wire in clear"
        );

        // Plain HTTP to the TLS port: no HTTP answer, nothing served.
        let answer = exchange(
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
        assert!(
            !answer.contains("HTTP/") && !answer.contains("confmesh_info"),
            "plain HTTP was answered: {answer:?}"
        );

        stop.send(true).unwrap();
        task.await.unwrap().unwrap();

        // The control: the same tap on a plain-HTTP server does see the password, so the check
        // above can fail.
        let (addr, stop, task) = start(None).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tcp = Tapped {
            inner: tokio::net::TcpStream::connect(addr).await.unwrap(),
            seen: seen.clone(),
        };
        let answer = exchange(tcp, &request("/api/v1/status")).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            leaks(&seen.lock().unwrap()),
            "the tap must see credentials sent in clear"
        );
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }

    /// A TLS client that trusts only `cert`.
    fn trusting(cert: &rcgen::Certificate) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(client))
    }

    /// Connects and completes a TLS handshake with `client`; the error says why not.
    async fn tls_connect(
        addr: std::net::SocketAddr,
        client: &tokio_rustls::TlsConnector,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio::time::timeout(Duration::from_secs(10), client.connect(name, tcp))
            .await
            .expect("handshake in time")
    }

    /// The status answer over a fresh TLS connection made with `client`.
    async fn tls_status(addr: std::net::SocketAddr, client: &tokio_rustls::TlsConnector) -> String {
        exchange(
            tls_connect(addr, client).await.unwrap(),
            &request("/api/v1/status"),
        )
        .await
    }

    /// Writes a fresh self-signed certificate and its key to the same two files (a rotation).
    fn issue(cert_file: &std::path::Path, key_file: &std::path::Path) -> rcgen::Certificate {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(cert_file, generated.cert.pem()).unwrap();
        std::fs::write(key_file, generated.key_pair.serialize_pem()).unwrap();
        generated.cert
    }

    #[tokio::test]
    async fn a_reload_rotates_the_certificate_and_moves_the_listener_or_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("admin.crt"), dir.path().join("admin.key"));
        let old_cert = issue(&cert_file, &key_file);
        let (addr, stop, task, mut control) =
            start_controlled(Some(AdminTls::load(&cert_file, &key_file).unwrap())).await;
        let old_client = trusting(&old_cert);
        assert!(
            tls_status(addr, &old_client)
                .await
                .starts_with("HTTP/1.1 200")
        );
        // A connection accepted before the rotation, its handshake done, its request not sent yet.
        let before = tls_connect(addr, &old_client).await.unwrap();

        // Rotation: new files at the same paths, read again as a reload does.
        let new_cert = issue(&cert_file, &key_file);
        let new_client = trusting(&new_cert);
        let same_place = AdminSettings {
            listen: addr,
            tls: Some(AdminTls::load(&cert_file, &key_file).unwrap()),
        };
        let changed = control.reconfigure(&same_place).await.unwrap();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert!(
            changed[0].contains("certificate") && changed[0].contains("reloaded"),
            "{changed:?}"
        );
        let answer = tls_status(addr, &new_client).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("tls-test"),
            "{answer}"
        );
        let refused = tls_connect(addr, &old_client)
            .await
            .expect_err("the old certificate must be gone");
        assert!(refused.to_string().contains("certificate"), "{refused}");
        // The connection from before finishes on the session it has.
        assert!(
            exchange(before, &request("/api/v1/status"))
                .await
                .starts_with("HTTP/1.1 200")
        );

        // A new address (same port, another loopback address): served there, closed here.
        let moved: std::net::SocketAddr = format!("127.0.0.2:{}", addr.port()).parse().unwrap();
        let elsewhere = AdminSettings {
            listen: moved,
            tls: same_place.tls.clone(),
        };
        let changed = control.reconfigure(&elsewhere).await.unwrap();
        assert!(
            changed.iter().any(|c| c.contains("admin.listen 127.0.0.2")),
            "{changed:?}"
        );
        assert!(
            tls_status(moved, &new_client)
                .await
                .starts_with("HTTP/1.1 200")
        );
        let gone = tokio::net::TcpStream::connect(addr)
            .await
            .expect_err("the old address must be closed");
        assert_eq!(gone.kind(), std::io::ErrorKind::ConnectionRefused);
        // Nothing to do when nothing changed (the same files read again: same certificate).
        assert!(control.reconfigure(&elsewhere).await.unwrap().is_empty());

        // An address that cannot be bound (taken): refused, naming the field; the listener in
        // force serves on with the same certificate.
        let taken = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
        let busy = AdminSettings {
            listen: taken.local_addr().unwrap(),
            tls: elsewhere.tls.clone(),
        };
        let e = control.reconfigure(&busy).await.unwrap_err();
        assert_eq!(e.field, "admin.listen");
        assert!(e.message.contains(&busy.listen.to_string()), "{e}");
        assert_eq!(control.settings().listen, moved);
        assert!(
            tls_status(moved, &new_client)
                .await
                .starts_with("HTTP/1.1 200")
        );

        // Back to plain HTTP (TLS files removed from the configuration).
        let plain = AdminSettings {
            listen: moved,
            tls: None,
        };
        assert_eq!(control.reconfigure(&plain).await.unwrap().len(), 1);
        let answer = exchange(
            tokio::net::TcpStream::connect(moved).await.unwrap(),
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("confmesh_info"),
            "{answer}"
        );

        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn connections_beyond_the_bound_are_closed() {
        let (addr, stop, task) = start(None).await;
        // Hold MAX_CONNECTIONS idle connections (each waits for request headers), then one more.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The server takes a slot per accepted connection; wait (bounded) until all are accepted by
        // checking that a served request on a fresh connection is refused.
        let mut refused = false;
        for _ in 0..50 {
            let answer = exchange(
                tokio::net::TcpStream::connect(addr).await.unwrap(),
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            if answer.is_empty() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "connection {} was served", MAX_CONNECTIONS + 1);
        // One held connection closes: its slot is free again and a request is served.
        drop(held.pop());
        let mut served = false;
        for _ in 0..50 {
            let answer = exchange(
                tokio::net::TcpStream::connect(addr).await.unwrap(),
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            if answer.starts_with("HTTP/1.1 200") {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "a freed slot was not reused");
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }

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
        h.insert(
            header::AUTHORIZATION,
            "Basic YWRtaW46cGE6c3M=".parse().unwrap(),
        );
        assert_eq!(
            basic_credentials(&h),
            Some(("admin".into(), "pa:ss".into()))
        );
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
