//! A vessel's network: its policy (pinned in the manifest), the live
//! network every container of the vessel joins (made at the first command
//! that needs it, removed on close), published ports and what was refused.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use vessel_core::NetworkPolicy;
use vessel_core::sync::Locked;
use vessel_runtime::net::{NetworkStats, VesselNet};

use super::{OpenVessel, Vessel};
use crate::error::{Result, VesselError};

/// The policy and, once a command needed it, the network.
#[derive(Debug)]
pub(crate) struct NetState {
    pub(super) policy: NetworkPolicy,
    pub(super) net: Option<VesselNet>,
}

impl NetState {
    pub(super) fn new(policy: NetworkPolicy) -> Self {
        Self { policy, net: None }
    }
}

/// A vessel's network as [`Vessel::network_info`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetworkInfo {
    /// The policy in force (and pinned in the manifest).
    pub policy: NetworkPolicy,
    /// The vessel's address, once its network exists.
    pub address: Option<IpAddr>,
    /// Its IPv6 address, once its network exists with IPv6 on
    /// ([`crate::NetConfig::ipv6_pool`]; rootful).
    pub address6: Option<std::net::Ipv6Addr>,
    /// The host end of its veth, once its network exists (rootful).
    pub interface: Option<String>,
    /// Its network's slot on this host, once it has a namespace (what
    /// `vessel_runtime::net::slot_exists` takes).
    pub slot: Option<u32>,
    /// Published ports: the vessel's port to the host address serving it.
    pub published: BTreeMap<u16, SocketAddr>,
}

/// The network policy pinned in `manifest` (none pinned: loopback only).
pub fn network_policy(manifest: &vessel_core::VesselManifest) -> Result<NetworkPolicy> {
    crate::limits::network_policy(&manifest.labels)
}

/// Refuses a policy this host cannot enforce, before anything changes.
pub(crate) fn check_available(policy: &NetworkPolicy) -> Result<()> {
    policy.validate()?;
    match vessel_runtime::net::unavailable() {
        Some(reason) if !policy.is_none() => {
            Err(VesselError::Runtime(vessel_runtime::RuntimeError::Unavailable { backend: "network", reason }))
        }
        _ => Ok(()),
    }
}

impl OpenVessel {
    /// The network a container of the vessel gets: its own namespace once
    /// it has one (made here at the first need), else loopback only; and,
    /// while that namespace is not yet connected, what connects it, for the
    /// run to await before the command starts (so connecting overlaps the
    /// container's creation; see `RunRequest::before_start`).
    pub(super) async fn run_network(
        self: &Arc<Self>,
    ) -> Result<(vessel_runtime::Network, Option<vessel_runtime::BeforeStart<'static>>)> {
        let mut st = self.network.lock().await;
        if st.net.is_none() {
            if st.policy.is_none() {
                return Ok((vessel_runtime::Network::None, None));
            }
            st.net = Some(VesselNet::create_unconnected(&self.manager.network, &st.policy).await?);
        }
        let net = st.net.as_ref().expect("made above");
        let network =
            vessel_runtime::Network::Join { netns: net.netns(), nameserver: net.nameserver(), sysfs: net.sysfs() };
        if net.connected() {
            return Ok((network, None));
        }
        let me = Arc::clone(self);
        let connect: vessel_runtime::BeforeStart<'static> = Box::pin(async move {
            let mut st = me.network.lock().await;
            let Some(net) = st.net.as_ref() else {
                return Err(vessel_runtime::RuntimeError::InvalidRequest("the vessel's network was removed".into()));
            };
            let connected = net.connect().await;
            if connected.is_err()
                && let Some(net) = st.net.take()
            {
                // Nothing runs in it yet (every run waits for this): the
                // next command makes a new one.
                net.close().await;
            }
            connected
        });
        Ok((network, Some(connect)))
    }

    /// Makes the network now (publishing needs one), first stopping a
    /// sandbox that runs without it, which only an idle one may.
    async fn ensure_network(&self, st: &mut NetState) -> Result<()> {
        if st.net.is_some() {
            return Ok(());
        }
        self.leave_unnetworked_sandbox().await?;
        st.net = Some(VesselNet::create(&self.manager.network, &st.policy).await?);
        Ok(())
    }

    /// A sandbox started without a network cannot be moved into one: stop
    /// it if no background process runs in it (the next command starts a
    /// new one, in the network); refuse otherwise.
    async fn leave_unnetworked_sandbox(&self) -> Result<()> {
        if !self.sandbox_running().await {
            return Ok(());
        }
        if self.background_running() {
            return Err(VesselError::InvalidInput(
                "the vessel's background processes run without a network, and a running process cannot \
                 change network namespace: stop them (or close and reopen the vessel), then set the network"
                    .into(),
            ));
        }
        self.stop_sandbox(super::process::StopReason::SandboxLost).await;
        Ok(())
    }

    /// Removes the network (on close).
    pub(super) async fn close_network(&self) {
        if let Some(net) = self.network.lock().await.net.take() {
            net.close().await;
        }
    }
}

impl Vessel {
    /// The vessel's network: policy, address, published ports.
    pub async fn network_info(&self) -> NetworkInfo {
        let st = self.inner.network.lock().await;
        NetworkInfo {
            policy: st.policy.clone(),
            address: st.net.as_ref().and_then(VesselNet::address),
            address6: st.net.as_ref().and_then(VesselNet::address6),
            interface: st.net.as_ref().and_then(VesselNet::interface),
            slot: st.net.as_ref().map(VesselNet::slot),
            published: st.net.as_ref().map(VesselNet::published).unwrap_or_default(),
        }
    }

    /// Changes the vessel's network policy, pinned in its manifest at once.
    /// On a live network, new connections follow it immediately (one
    /// atomic filter change); established connections and running
    /// processes are untouched. A vessel that had no network gets one at
    /// its next command; if its background processes already run without
    /// one, this is refused (they cannot change namespace) and nothing
    /// changes.
    pub async fn set_network(&self, policy: NetworkPolicy) -> Result<()> {
        check_available(&policy)?;
        let inner = &self.inner;
        let state = inner.state.read().await;
        if state.closed {
            return Err(VesselError::Closed(inner.id.clone()));
        }
        let mut st = inner.network.lock().await;
        if st.net.is_none() && !policy.is_none() {
            inner.leave_unnetworked_sandbox().await?;
        }
        if let Some(net) = &st.net {
            net.set_policy(&policy).await?;
        }
        let mut manifest = inner.manifest();
        crate::limits::set_network_label(&mut manifest.labels, &policy);
        manifest.update_time = chrono::Utc::now();
        if let Err(e) = inner.commit_manifest(&manifest).await {
            if let Some(net) = &st.net
                && let Err(undo) = net.set_policy(&st.policy).await
            {
                tracing::warn!(vessel = %inner.id, error = %undo, "could not restore the network policy");
            }
            return Err(e);
        }
        *inner.manifest.locked() = manifest;
        st.policy = policy;
        drop(state);
        Ok(())
    }

    /// Publishes the vessel's TCP `port` on a host port (on loopback unless
    /// the manager's network config says otherwise) and returns the
    /// address to connect to; the same address if it is already published.
    /// Gives the vessel its network if it had none yet (under policy
    /// `None`, inbound through published ports still works).
    pub async fn publish(&self, port: u16) -> Result<SocketAddr> {
        if port == 0 {
            return Err(VesselError::InvalidInput("port 0 cannot be published".into()));
        }
        if let Some(reason) = vessel_runtime::net::unavailable() {
            return Err(VesselError::Runtime(vessel_runtime::RuntimeError::Unavailable { backend: "network", reason }));
        }
        let inner = &self.inner;
        let state = inner.state.read().await;
        if state.closed {
            return Err(VesselError::Closed(inner.id.clone()));
        }
        let mut st = inner.network.lock().await;
        inner.ensure_network(&mut st).await?;
        let net = st.net.as_ref().expect("made above");
        Ok(net.publish(port).await?)
    }

    /// Stops publishing `port`; `false` if it was not published.
    pub async fn unpublish(&self, port: u16) -> bool {
        self.inner.network.lock().await.net.as_ref().is_some_and(|n| n.unpublish(port))
    }

    /// What the vessel's network refused (denied connections, refused
    /// names), so an agent can be told why, not left with a timeout.
    pub async fn network_stats(&self) -> NetworkStats {
        match self.inner.network.lock().await.net.as_ref() {
            Some(n) => n.stats().await,
            None => NetworkStats::default(),
        }
    }
}
