//! The conference-routing B2BUA: calls from the VCS arrive on the rendezvous addresses, are routed
//! by alias to a conference and its bridge, and are bridged as two independent dialogs.
//!
//! - [`routing`]: aliases, rendezvous-hash placement, the [`routing::ConferenceDirectory`] and
//!   [`routing::BandwidthLedger`] traits the replicated store and the bandwidth service implement;
//! - [`core`]: the sans-IO B2BUA (dialogs, CANCEL, re-INVITE, bridge health by OPTIONS);
//! - [`driver`]: [`driver::B2buaService`], the tokio task that owns the sockets and runs the
//!   core, routing each call on the directory and ledger it is given;
//! - [`store_directory`]: the conference directory and the routing configuration on the
//!   replicated store;
//! - [`cluster`]: [`start_on_store`], the entry point the daemon uses.

pub mod cluster;
pub mod core;
pub mod driver;
pub mod routing;
pub mod store_directory;

pub use cluster::{StartError, StoreB2bua, start_on_store};
pub use driver::{B2buaService, B2buaSettings, B2buaStatus, MAX_SHARDS, SIP_PORT};
pub use routing::{
    BandwidthLedger, ConferenceDirectory, MemoryDirectory, MemoryLedger, RoutingConfig,
};
pub use store_directory::{RoutingConfigLoader, StoreDirectory};
