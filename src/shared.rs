//! The daemon's side of the replicated store (SPEC.md §2 rules 6, 8 and 10; §7): where the store
//! lives, the `config …` and `admin …` requests, and what a backup holds.
//!
//! Requests here touch only the store, never the cluster state, so the state loop hands them to
//! [`answer`] on a task of their own: a write waits for the disk, not the loop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use confmesh_replication::model::Namespace;
use confmesh_replication::service::{Service as Replication, WriteError};
use confmesh_replication::store::{Snapshot, Store, StoreError};
use serde_json::{Value, json};

use crate::b2bua::RoutingConfig;
use crate::control::{Reply, Request};
use crate::eventlog::wall_ms;

/// TCP port of the store's sync sessions, on overlay addresses (so they travel inside AH).
pub const REPLICATION_PORT: u16 = 7002;
/// The store's file under `state_dir`.
pub const STORE_FILE: &str = "store.redb";
/// Where backups go unless told otherwise, under `state_dir`.
pub const BACKUP_DIR: &str = "backups";
/// Backup member holding the store's content (a JSON [`Snapshot`]).
pub const STORE_MEMBER: &str = "store.json";
/// Backup member holding the configuration file.
pub const CONFIG_MEMBER: &str = "confmesh.toml";
/// Administrator accounts are shared configuration under this prefix, value `{"argon2id": PHC}`.
/// They are served only through `admin …` requests, never by `config …`.
const ADMIN_PREFIX: &str = "admin/";

/// Opens (or creates) this peer's store; a damaged file is refused, never used.
pub async fn open_store(state_dir: &Path, mgmt: Ipv4Addr) -> Result<Arc<Store>, StoreError> {
    let path = state_dir.join(STORE_FILE);
    tokio::task::spawn_blocking(move || Store::open(&path, u32::from(mgmt)))
        .await
        .map_err(|e| StoreError::Io {
            path: state_dir.join(STORE_FILE),
            detail: e.to_string(),
        })?
        .map(Arc::new)
}

/// Whether [`answer`] handles `request`.
pub fn is_store_request(request: &Request) -> bool {
    matches!(
        request,
        Request::ConfigGet { .. }
            | Request::ConfigSet { .. }
            | Request::ConfigDelete { .. }
            | Request::ConfigList { .. }
            | Request::AdminHash { .. }
            | Request::AdminAdd { .. }
            | Request::AdminRemove { .. }
            | Request::AdminList
    )
}

/// How long a write that waits for other peers waits at most; it stays durable locally and
/// replicates later if they do not answer in time.
const WAIT_PEERS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers a shared-configuration or administrator request; writes return once durable locally,
/// or also on `wait_peers` other peers when asked (which needs the sync sessions, `replication`).
pub async fn answer(
    store: Arc<Store>,
    replication: Option<Arc<Replication>>,
    request: Request,
) -> Reply {
    let replication = replication.as_deref();
    match request {
        Request::ConfigGet { key } => {
            check_config_key(&key)?;
            get(&store, &key)?
                .ok_or_else(|| format!("not found: no shared configuration key {key}"))
        }
        Request::ConfigSet {
            key,
            value,
            wait_peers,
        } => {
            check_config_key(&key)?;
            check_value(&key, &value)?;
            write(&store, replication, &key, Some(value), wait_peers).await
        }
        Request::ConfigDelete { key, wait_peers } => {
            check_config_key(&key)?;
            if get(&store, &key)?.is_none() {
                return Err(format!("not found: no shared configuration key {key}"));
            }
            write(&store, replication, &key, None, wait_peers).await
        }
        Request::ConfigList { prefix } => {
            let entries = store
                .list(Namespace::Config, &prefix)
                .map_err(|e| e.to_string())?;
            let map = entries
                .into_iter()
                .filter(|(k, _)| !k.starts_with(ADMIN_PREFIX))
                .collect();
            Ok(Value::Object(map))
        }
        Request::AdminHash { name } => match get(&store, &admin_key(&name)?)? {
            Some(v) => v
                .get("argon2id")
                .cloned()
                .ok_or_else(|| format!("account {name} has no usable password hash")),
            None => Err(format!("not found: no administrator {name}")),
        },
        Request::AdminAdd { name, hash } => {
            if !hash.starts_with("$argon2id$") {
                return Err(
                    "the password hash must be an Argon2id PHC string (use `confmesh admin add`)"
                        .into(),
                );
            }
            write(
                &store,
                None,
                &admin_key(&name)?,
                Some(json!({ "argon2id": hash })),
                0,
            )
            .await
        }
        Request::AdminRemove { name } => {
            let key = admin_key(&name)?;
            if get(&store, &key)?.is_none() {
                return Err(format!("not found: no administrator {name}"));
            }
            write(&store, None, &key, None, 0).await
        }
        Request::AdminList => {
            let entries = store
                .list(Namespace::Config, ADMIN_PREFIX)
                .map_err(|e| e.to_string())?;
            Ok(entries
                .into_iter()
                .map(|(k, _)| Value::String(k[ADMIN_PREFIX.len()..].to_owned()))
                .collect())
        }
        other => Err(format!("not a shared-configuration request: {other:?}")),
    }
}

fn get(store: &Store, key: &str) -> Result<Option<Value>, String> {
    store.get(Namespace::Config, key).map_err(|e| e.to_string())
}

/// Writes (`Some`) or deletes (`None`) a shared-configuration key; answered once durable here and,
/// if `wait_peers` > 0, on that many other peers (which needs the sync sessions, `replication`).
async fn write(
    store: &Store,
    replication: Option<&Replication>,
    key: &str,
    value: Option<Value>,
    wait_peers: usize,
) -> Reply {
    let stamp = if wait_peers == 0 {
        store
            .write_async(Namespace::Config, key, value, wall_ms())
            .await
            .map_err(|e| e.to_string())?
    } else {
        let Some(r) = replication else {
            return Err(format!(
                "--wait-peers {wait_peers}: this peer is standalone, there is no other peer to wait for"
            ));
        };
        r.write(Namespace::Config, key, value, wait_peers, WAIT_PEERS_TIMEOUT).await.map_err(|e| match e {
            WriteError::TooFewPeers { configured, .. } => {
                format!("--wait-peers {wait_peers}: the cluster has only {configured} other peers; nothing was written")
            }
            WriteError::NotReplicated { acked_by, .. } => format!(
                "written and durable on this peer, but only {acked_by} of {wait_peers} other peers had it after {}s; it will replicate when they are back",
                WAIT_PEERS_TIMEOUT.as_secs()
            ),
            other => other.to_string(),
        })?
    };
    Ok(json!({ "key": key, "stamp": stamp.to_string() }))
}

fn check_config_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "bad key {key:?}: keys are non-empty and have no spaces, e.g. bridge/b1"
        ));
    }
    if key.starts_with(ADMIN_PREFIX) {
        return Err(
            "administrator accounts are managed with `confmesh admin add|remove|list`".into(),
        );
    }
    Ok(())
}

fn admin_key(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        return Err(format!(
            "bad account name {name:?}: use 1-64 letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(format!("{ADMIN_PREFIX}{name}"))
}

/// Refuses values the router could not use, naming the field, before they replicate anywhere.
fn check_value(key: &str, value: &Value) -> Result<(), String> {
    let (_, errors) = RoutingConfig::from_entries(std::iter::once((key, value)));
    match errors.first() {
        Some(e) => Err(e.to_string()),
        None => Ok(()),
    }
}

/// The store's content for a backup member.
pub fn export(store: &Store) -> Result<Vec<u8>, String> {
    let snapshot = store.snapshot().map_err(|e| e.to_string())?;
    serde_json::to_vec(&snapshot).map_err(|e| e.to_string())
}

/// Reads a backup's store member.
pub fn import(bytes: &[u8]) -> Result<Snapshot, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("the backup's store is unreadable: {e}"))
}

/// The default backup directory of a peer.
pub fn backup_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(BACKUP_DIR)
}

/// Reads a password file for backups: trimmed of its final newline, never empty.
pub fn read_password(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let raw = zeroize::Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?,
    );
    let end = raw
        .iter()
        .rposition(|&b| b != b'\n' && b != b'\r')
        .map_or(0, |i| i + 1);
    if end == 0 {
        return Err(format!("the password file {} is empty", path.display()));
    }
    Ok(zeroize::Zeroizing::new(raw[..end].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn config_and_admin_requests() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path(), Ipv4Addr::new(10, 96, 0, 1))
            .await
            .unwrap();
        let ask = |r| answer(store.clone(), None, r);
        let bridge = json!({"uri": "sip:10.96.4.1:5060", "capacity": 20});
        ask(Request::ConfigSet {
            key: "bridge/b1".into(),
            value: bridge.clone(),
            wait_peers: 0,
        })
        .await
        .unwrap();
        let standalone = ask(Request::ConfigSet {
            key: "bridge/b1".into(),
            value: bridge.clone(),
            wait_peers: 1,
        })
        .await
        .unwrap_err();
        assert!(standalone.contains("standalone"), "{standalone}");
        assert_eq!(
            ask(Request::ConfigGet {
                key: "bridge/b1".into()
            })
            .await
            .unwrap(),
            bridge
        );
        let bad = ask(Request::ConfigSet {
            key: "bridge/b2".into(),
            value: json!({"uri": "sip:10.96.4.2"}),
            wait_peers: 0,
        })
        .await
        .unwrap_err();
        assert!(
            bad.contains("bridge/b2") && bad.contains("capacity"),
            "{bad}"
        );
        assert!(
            ask(Request::ConfigGet { key: "nope".into() })
                .await
                .unwrap_err()
                .starts_with("not found")
        );
        assert!(
            ask(Request::ConfigSet {
                key: "admin/x".into(),
                value: json!(1),
                wait_peers: 0
            })
            .await
            .is_err()
        );
        ask(Request::AdminAdd {
            name: "ops".into(),
            hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        })
        .await
        .unwrap();
        assert!(
            ask(Request::AdminAdd {
                name: "ops".into(),
                hash: "plain".into()
            })
            .await
            .is_err()
        );
        assert_eq!(ask(Request::AdminList).await.unwrap(), json!(["ops"]));
        assert!(
            ask(Request::AdminHash { name: "ops".into() })
                .await
                .unwrap()
                .as_str()
                .unwrap()
                .starts_with("$argon2id$")
        );
        let list = ask(Request::ConfigList {
            prefix: String::new(),
        })
        .await
        .unwrap();
        assert_eq!(
            list,
            json!({"bridge/b1": bridge}),
            "accounts stay out of config list"
        );
        ask(Request::ConfigDelete {
            key: "bridge/b1".into(),
            wait_peers: 0,
        })
        .await
        .unwrap();
        assert!(
            ask(Request::ConfigDelete {
                key: "bridge/b1".into(),
                wait_peers: 0
            })
            .await
            .unwrap_err()
            .starts_with("not found")
        );
        ask(Request::AdminRemove { name: "ops".into() })
            .await
            .unwrap();
        assert!(
            ask(Request::AdminHash { name: "ops".into() })
                .await
                .is_err()
        );
        let snap = import(&export(&store).unwrap()).unwrap();
        assert_eq!(snap.entries.len(), 2, "two tombstones");
    }
}
