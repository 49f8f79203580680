//! The B2BUA as the daemon runs it: routing on the replicated store, admission on the bandwidth
//! service, configuration followed live.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<confmesh_replication::store::Store>,
//! #               ledger: confmesh::bandwidth::BandwidthLedgerHandle,
//! #               replication: std::sync::Arc<confmesh_replication::service::Service>)
//! #               -> Result<(), Box<dyn std::error::Error>> {
//! use confmesh::b2bua::{B2buaSettings, start_on_store};
//! let settings = B2buaSettings::on_rendezvous(&["10.96.1.1".parse()?], "conductor1");
//! let b2bua = start_on_store(store, ledger, settings).await?;
//! b2bua.set_replication(Some(replication)); // when clustered; `None` again when standalone
//! let _conferences = b2bua.conferences(); // status JSON `conferences`
//! b2bua.shutdown().await;
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use confmesh_replication::service::Service;
use confmesh_replication::store::Store;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::driver::{B2buaService, B2buaSettings, B2buaStatus};
use super::routing::BandwidthLedger;
use super::store_directory::{
    DirectoryStats, MAINTAIN_INTERVAL, RoutingConfigLoader, StoreDirectory,
};
use crate::status::ConferenceStatus;

/// Why the B2BUA could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StartError {
    /// A SIP socket could not be bound: the address is not on this host, or port 5060 is in use.
    #[error(
        "cannot listen for SIP on {addrs:?} (check peer.rendezvous_addrs and that nothing else uses port 5060): {source}"
    )]
    Bind {
        /// The addresses asked for.
        addrs: Vec<SocketAddr>,
        /// The OS error.
        source: io::Error,
    },
}

/// A running B2BUA on the replicated store. Dropping it without [`StoreB2bua::shutdown`] stops its
/// tasks without waiting for them.
pub struct StoreB2bua {
    b2bua: B2buaService,
    directory: StoreDirectory,
    loader: RoutingConfigLoader,
    maintain: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

/// Starts the B2BUA of this peer: SIP on `settings.listen`, routing from the shared configuration
/// in `store` (reloaded on every change), conference placement and participant counts in the
/// store's `conference` namespace, bandwidth admission by `ledger` (the bandwidth service's
/// [`crate::bandwidth::BandwidthService::ledger`] in the daemon). Call
/// [`StoreB2bua::set_replication`] while clustered.
pub async fn start_on_store<L: BandwidthLedger>(
    store: Arc<Store>,
    ledger: L,
    settings: B2buaSettings,
) -> Result<StoreB2bua, StartError> {
    let (stop, stop_rx) = watch::channel(false);
    let loader = RoutingConfigLoader::start(store.clone(), stop_rx.clone());
    let directory = StoreDirectory::new(store);
    let addrs = settings.listen.clone();
    let b2bua = B2buaService::start(settings, directory.clone(), ledger, loader.subscribe())
        .await
        .map_err(|source| StartError::Bind { addrs, source })?;
    let maintain = tokio::spawn(maintain_loop(directory.clone(), stop_rx));
    Ok(StoreB2bua {
        b2bua,
        directory,
        loader,
        maintain,
        stop,
    })
}

async fn maintain_loop(directory: StoreDirectory, mut stop: watch::Receiver<bool>) {
    // The first tick is immediate: counts left behind by a previous run go at once.
    let mut tick = tokio::time::interval(MAINTAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = directory.maintain().await {
            tracing::warn!(error = %e, "conference status maintenance failed; retrying later");
        }
    }
}

impl StoreB2bua {
    /// Hands the replication service over while clustered (placement claims then wait for the
    /// connected peers), `None` when standalone.
    pub fn set_replication(&self, service: Option<Arc<Service>>) {
        self.directory.set_replication(service);
    }

    /// The bound SIP addresses.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        self.b2bua.local_addrs()
    }

    /// Calls, counters and bridge health (at most 200 ms old), conferences and placement
    /// counters (read from the store now).
    pub fn status(&self) -> B2buaStatus {
        B2buaStatus {
            conferences: self.conferences(),
            directory: Some(self.directory.stats()),
            ..self.b2bua.status()
        }
    }

    /// The conferences of the cluster with their bridge and calls (status JSON `conferences`);
    /// empty, with an error logged, if the store cannot be read.
    pub fn conferences(&self) -> Vec<ConferenceStatus> {
        self.directory.conferences().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read conference status from the store");
            Vec::new()
        })
    }

    /// Placement counters (claims, lost claims, conflicts, repairs).
    pub fn directory_stats(&self) -> DirectoryStats {
        self.directory.stats()
    }

    /// The directory itself, for tests and tools that inspect placement.
    pub fn directory(&self) -> &StoreDirectory {
        &self.directory
    }

    /// Stops SIP, the configuration loader and the maintenance task, and waits for them. Calls in
    /// progress are abandoned; their counts expire from the store unless this peer restarts first.
    pub async fn shutdown(self) {
        let StoreB2bua {
            b2bua,
            loader,
            maintain,
            stop,
            ..
        } = self;
        let _ = stop.send(true);
        let _ = maintain.await;
        b2bua.shutdown().await;
        loader.join().await;
    }
}
