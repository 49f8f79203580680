//! Sans-IO IKEv1 engine for confmesh: Main Mode with a pre-shared key and Quick Mode with PFS.
//!
//! The engine owns no socket, thread or clock. A driver feeds it datagrams and the current time and
//! takes out datagrams to send, the next deadline and events (SA established, deleted, peer dead),
//! in the style of quinn-proto. That keeps it deterministic and testable without root.
#![forbid(unsafe_code)]
