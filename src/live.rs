//! Live cluster changes written back to the configuration file (SPEC.md §2 rules 6–7).
//!
//! `confmesh peers add|remove` and `confmesh standalone` change the running daemon without a
//! restart, and the configuration file stays the one source of truth: each change edits the file
//! (keeping the operator's comments and layout), is validated as a whole exactly as at start-up,
//! and only then replaces the file atomically. A change that would not validate changes nothing.

use std::net::Ipv4Addr;
use std::path::Path;

use toml_edit::{Array, DocumentMut, Item, Table, value};

use crate::config::{Config, ConfigError};

/// A change an operator makes to the cluster membership of this peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a peer's management address to the list.
    Add(Ipv4Addr),
    /// Remove a peer (alive or dead) from the list.
    Remove(Ipv4Addr),
    /// Leave the cluster: empty the list and drop the pre-shared key file setting.
    Standalone,
}

/// Applies `change` to the configuration text, returning the new text and what it validates to.
pub fn edit(
    text: &str,
    change: MembershipChange,
    default_serial: impl FnOnce() -> Option<String>,
) -> Result<(String, Config), ConfigError> {
    let mut doc: DocumentMut = text.parse().map_err(|e| ConfigError {
        field: String::new(),
        message: format!("the configuration file no longer parses: {e}"),
    })?;
    if !doc.contains_table("cluster") {
        doc.insert("cluster", Item::Table(Table::new()));
    }
    let cluster = doc["cluster"].as_table_mut().ok_or_else(|| ConfigError {
        field: "cluster".into(),
        message: "is not a table; write it as [cluster]".into(),
    })?;
    let mut peers: Vec<String> = cluster
        .get("peers")
        .and_then(Item::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mgmt = doc
        .get("peer")
        .and_then(|p| p.get("mgmt_addr"))
        .and_then(Item::as_str)
        .map(str::to_owned);
    let cluster = doc["cluster"].as_table_mut().expect("checked above");
    match change {
        MembershipChange::Add(addr) => {
            if peers.iter().any(|p| p.parse() == Ok(addr)) {
                return Err(ConfigError {
                    field: "cluster.peers".into(),
                    message: format!("{addr} is already a peer"),
                });
            }
            // Joining from standalone: the list starts with this peer itself.
            if peers.is_empty() {
                peers.extend(mgmt);
            }
            peers.push(addr.to_string());
        }
        MembershipChange::Remove(addr) => {
            let before = peers.len();
            peers.retain(|p| p.parse() != Ok(addr));
            if peers.len() == before {
                return Err(ConfigError {
                    field: "cluster.peers".into(),
                    message: format!("{addr} is not in the peer list"),
                });
            }
            if mgmt.as_deref().and_then(|m| m.parse().ok()) == Some(addr) {
                return Err(ConfigError {
                    field: "cluster.peers".into(),
                    message: "cannot remove this peer itself; use `confmesh standalone` to leave the cluster".into(),
                });
            }
            // A list of only this peer is standalone.
            if peers.len() == 1 {
                peers.clear();
                cluster.remove("psk_file");
            }
        }
        MembershipChange::Standalone => {
            peers.clear();
            cluster.remove("psk_file");
        }
    }
    let mut array = Array::new();
    for p in &peers {
        array.push(p.as_str());
    }
    cluster.insert("peers", value(array));
    let text = doc.to_string();
    let config = Config::parse(&text, default_serial)?;
    Ok((text, config))
}

/// Replaces the file at `path` with `text` atomically (write, fsync, rename), so a crash leaves
/// either the old or the new configuration, never half of one.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("toml.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        std::fs::set_permissions(&tmp, meta.permissions())?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"# operator's comment stays
[peer]
hostname = "c1"
serial = "CM1"
mgmt_addr = "10.96.0.1"
rendezvous_addrs = ["10.96.1.1"]

[cluster]
peers = ["10.96.0.1", "10.96.0.2"]
psk_file = "/etc/confmesh/psk"
licence = "full"
"#;

    fn serial() -> Option<String> {
        Some("CMX".into())
    }

    #[test]
    fn add_remove_standalone() {
        let (text, c) = edit(
            TWO,
            MembershipChange::Add("10.96.0.3".parse().unwrap()),
            serial,
        )
        .unwrap();
        assert!(text.starts_with("# operator's comment stays"));
        assert_eq!(c.cluster.unwrap().peers.len(), 3);
        let (text, c) = edit(
            &text,
            MembershipChange::Remove("10.96.0.2".parse().unwrap()),
            serial,
        )
        .unwrap();
        assert_eq!(
            c.cluster.unwrap().peers,
            vec![
                "10.96.0.1".parse::<Ipv4Addr>().unwrap(),
                "10.96.0.3".parse().unwrap()
            ]
        );
        let (text, c) = edit(&text, MembershipChange::Standalone, serial).unwrap();
        assert!(c.cluster.is_none());
        assert!(!text.contains("psk_file"));
    }

    #[test]
    fn refusals_change_nothing() {
        let e = edit(
            TWO,
            MembershipChange::Add("10.96.0.2".parse().unwrap()),
            serial,
        )
        .unwrap_err();
        assert!(e.message.contains("already"));
        let e = edit(
            TWO,
            MembershipChange::Remove("10.96.0.9".parse().unwrap()),
            serial,
        )
        .unwrap_err();
        assert!(e.message.contains("not in the peer list"));
        let e = edit(
            TWO,
            MembershipChange::Remove("10.96.0.1".parse().unwrap()),
            serial,
        )
        .unwrap_err();
        assert!(e.message.contains("standalone"));
        // Select licence: a third peer is refused by validation, naming the licence.
        let select = TWO.replace("\"full\"", "\"select\"");
        let e = edit(
            &select,
            MembershipChange::Add("10.96.0.3".parse().unwrap()),
            serial,
        )
        .unwrap_err();
        assert_eq!(e.field, "cluster.licence");
    }

    #[test]
    fn removing_the_last_other_peer_goes_standalone() {
        let (_, c) = edit(
            TWO,
            MembershipChange::Remove("10.96.0.2".parse().unwrap()),
            serial,
        )
        .unwrap();
        assert!(c.cluster.is_none());
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confmesh.toml");
        std::fs::write(&path, "old").unwrap();
        write_atomically(&path, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert!(!dir.path().join("confmesh.toml.tmp").exists());
    }
}
