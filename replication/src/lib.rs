//! The replicated store of confmesh: shared configuration and conference status, multi-master,
//! last-writer-wins by hybrid logical clock, durable on local disk before it is acknowledged.
//!
//! Layout:
//! - [`hlc`]: the hybrid logical clock that orders writes cluster-wide.
//! - [`model`]: namespaces, entries, version vectors, the last-writer-wins rule.
//! - [`sync`]: the sans-IO sync session between two peers (frames, catch-up, live stream, acks).
//! - [`service`]: the tokio driver: TCP listener and dialers, one session per peer, status.
//! - [`store`]: the durable redb store with group commit, change sets, tombstone collection.
#![forbid(unsafe_code)]

pub mod hlc;
pub mod model;
pub mod service;
pub mod store;
pub mod sync;
