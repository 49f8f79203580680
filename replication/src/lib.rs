//! The replicated store of confmesh: shared configuration and conference status, multi-master,
//! last-writer-wins by hybrid logical clock, durable on local disk before it is acknowledged.
//!
//! # Why this design
//! A 2-peer cluster must keep serving when one peer is down (SPEC §2), so this is not a consensus
//! log: every peer accepts writes alone, and peers converge by exchanging what the others lack.
//! Conflicts on one key are resolved by the highest [`hlc::Hlc`] stamp (wall time, logical
//! counter, origin id), which every peer computes the same way; the logical part makes a write that
//! follows another (its writer had seen it) win even if the writer's clock is behind. Deletes are
//! tombstones, collected only once every peer acknowledged them. A peer behind what was collected
//! (one that was removed and re-added) receives a snapshot instead of incremental changes.
//!
//! # Layout
//! - [`hlc`]: the hybrid logical clock that orders writes cluster-wide.
//! - [`model`]: namespaces, entries, version vectors, the last-writer-wins rule. Peer-specific
//!   settings (SPEC §2 rule 8) have no namespace and cannot be stored.
//! - [`store`]: the durable store (redb behind a write-ahead journal): group commit, change sets,
//!   tombstone collection, snapshots, damaged-file detection.
//! - [`sync`]: the sans-IO sync session between two peers (checked frames, catch-up by version
//!   vector, live stream, acknowledgements, backpressure, keepalive).
//! - [`service`]: the tokio driver: TCP listener and dialers, one session per peer, writes that
//!   wait for k peers, status.
//!
//! # How the daemon uses it
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::{net::{Ipv4Addr, SocketAddr}, sync::Arc, time::Duration};
//! use confmesh_replication::{model::Namespace, service::Service, store::Store};
//!
//! // Origin id = the low 32 bits of the peer's management IPv4 address.
//! let me = u32::from(Ipv4Addr::new(10, 96, 0, 1));
//! let store = Arc::new(Store::open("/var/lib/confmesh/store.redb".as_ref(), me)?);
//! let peers: Vec<(u32, SocketAddr)> = vec![
//!     (u32::from(Ipv4Addr::new(10, 96, 0, 2)), "10.97.0.2:7500".parse()?), // overlay addresses
//! ];
//! let svc = Service::start(store, "10.97.0.1:7500".parse()?, peers).await?;
//! // `config set`: returns once durable locally (0 = do not wait for peers).
//! svc.write(Namespace::Config, "bridge/b1", Some(serde_json::json!({"capacity": 20})), 0, Duration::ZERO).await?;
//! let _ = svc.get(Namespace::Config, "bridge/b1")?;
//! let _status = serde_json::to_value(svc.status())?; // per-peer lag, queue, bytes, entries, last sync
//! // Join (SPEC §2 rule 6): back up `svc.store().snapshot()?` first, then
//! // the cluster's content flows in as a snapshot; local writes wait for it
//! svc.store().join_async().await?;
//! // Restore: `svc.store().replace_all_async(snapshot_from_backup).await?`.
//! svc.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod hlc;
mod journal;
pub mod model;
mod overlay;
pub mod service;
pub mod store;
pub mod sync;
