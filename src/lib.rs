//! confmesh: the cluster fabric of a conference-routing appliance.
//!
//! One daemon runs on each of up to three peer hosts. This crate is the daemon and its CLI; the
//! protocol cores live in their own crates so that they stay sans-IO and testable without root:
//!
//! - `confmesh-ike`: IKEv1 Main Mode + Quick Mode, the keys for everything else;
//! - `confmesh-dataplane`: user-space AH/ESP and the TUN overlay between peers;
//! - `confmesh-replication`: the replicated configuration and conference-status store.
//!
//! Modules here:
//! - [`admin`]: the admin HTTP API, status page and `/metrics`;
//! - [`b2bua`]: the conference-routing SIP B2BUA (routing, dialogs, bridge health);
//! - [`backup`]: backup files of one peer, optionally encrypted, checked before any restore;
//! - [`config`]: the SPEC.md §7 configuration file, validated before anything starts;
//! - [`membership`]: hellos between peers, active/not-active with reasons, alarms;
//! - [`metrics`]: Prometheus text exposition;
//! - [`control`]: the Unix control socket between the CLI and the daemon;
//! - [`daemon`]: the state loop that owns the cluster state and drives the cores;
//! - [`eventlog`]: durable per-peer event and configuration logs, remote syslog;
//! - [`keylog`]: the SPEC.md §7 key log for Wireshark and independent verification;
//! - [`live`]: membership changes applied live and written back to the configuration file;
//! - [`sip`]: SIP parsing, framing, message building, transactions and sockets;
//! - [`status`]: the status document (SPEC.md §7) and its table form.

pub mod admin;
pub mod b2bua;
pub mod backup;
pub mod bandwidth;
pub mod config;
pub mod control;
pub mod daemon;
pub mod eventlog;
pub mod keylog;
pub mod live;
pub mod membership;
pub mod metrics;
pub mod shared;
pub mod sip;
pub mod status;
