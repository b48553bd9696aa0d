//! A vessel's network: its own network namespace, joined by every container
//! it runs, with egress by policy ([`vessel_core::NetworkPolicy`]) and
//! published ports.
//!
//! Rootful, each vessel gets a *routed* veth pair (no bridge, so no shared
//! L2 to poison): `vsl<slot>` on the host with the pair's even address, `eth0`
//! in the vessel with the odd one, a default route to the host, NAT out.
//! IPv6 is off unless [`NetConfig::ipv6_pool`] turns it on; then the pair
//! also gets a /127 of that pool and the same policy holds for IPv6.
//! The namespace is made and configured by host root (so it is owned by the
//! host's user namespace: container root, in a user namespace of its own,
//! holds no capability over it and cannot change its routes, addresses or
//! filters, nor open raw or packet sockets). The policy is enforced by
//! nftables in the *host's* namespace (table `inet vessel`, one chain per
//! vessel on its veth), where nothing the vessel runs can reach: source
//! addresses are checked, inbound connections are dropped, egress is what
//! the policy allows, and every refusal is counted. Names resolve through a
//! resolver vessel runs on the host end of the veth (module `dns`): it answers
//! only allowed names and admits the addresses it returned into the
//! vessel's set for their TTL. Published ports are host sockets relayed into
//! the vessel (module `ports`).
//!
//! Built on the kernel through maintained parts: rtnetlink for links,
//! addresses and routes; libnftables (nftables' own front end, the `nft`
//! tool's library, in process; it applies a whole ruleset change as one
//! atomic transaction) for rules;
//! hickory-proto to parse and write DNS messages.
//!
//! State lives in `/run/vessel/net` (a tmpfs: nothing survives a reboot,
//! as nothing of a vessel's network does): one flocked `slot-<n>` file per
//! live network and its namespace `ns-<n>`. A slot whose file is not locked
//! belongs to a dead process; [`remove_leftovers`] (a new manager calls it)
//! removes what it left.

mod config;
mod dns;
// libnftables' C API, bound by hand: one justified block.
#[allow(unsafe_code)]
mod libnft;
mod link;
mod nft;
mod pasta;
mod ports;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ipnet::{Ipv4Net, Ipv6Net};
use nix::fcntl::{Flock, FlockArg};
use vessel_core::NetworkPolicy;
use vessel_core::sync::{Locked, still_linked};

use crate::RuntimeError;

pub use config::NetConfig;
pub use dns::RefusedName;

/// Where slots and namespaces live: `/run/vessel/net`, or rootless the
/// user's runtime dir (its namespaces are pinned in the rootless process's
/// private mount namespace, and vanish with it).
pub fn run_dir() -> PathBuf {
    if crate::rootless::mode().is_rootless() {
        let base = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        return base.join("vessel/net");
    }
    PathBuf::from("/run/vessel/net")
}

/// Runs `f` on a thread that joined network namespace `netns` (a socket it
/// makes, libnftables' netlink socket included, stays in it),
/// or here when `None`. Fails, running nothing, if `netns` cannot be joined:
/// never silently in the wrong namespace.
pub(crate) fn in_ns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> T + Send) -> Result<T, RuntimeError> {
    let Some(netns) = netns else { return Ok(f()) };
    let ns = fs::File::open(netns).map_err(RuntimeError::io("open", netns))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| RuntimeError::io("join the network namespace", netns)(e.into()))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Where a rootless vessel's resolver listens, in its own namespace.
const ROOTLESS_RESOLVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

/// What a vessel's network refused, for telling an agent why a connection
/// failed rather than letting it time out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetworkStats {
    /// Packets of new connections (and spoofed ones) the policy dropped.
    pub denied_packets: u64,
    /// Destinations denied recently (the last hour, up to 64).
    pub denied_destinations: Vec<IpAddr>,
    /// Names the resolver refused, with how many times.
    pub refused_names: Vec<RefusedName>,
    /// Queries the resolver answered.
    pub answered_queries: u64,
}

/// One vessel's network slot: names and addresses derived from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) n: u32,
    pub(crate) host: Ipv4Addr,
    pub(crate) vessel: Ipv4Addr,
    /// The IPv6 pair (host end, vessel end) when IPv6 is on (rootless, on
    /// but unused: pasta gives the vessel the host's address).
    pub(crate) v6: Option<(Ipv6Addr, Ipv6Addr)>,
}

impl Slot {
    fn new(pool: Ipv4Net, pool6: Option<Ipv6Net>, n: u32) -> Self {
        let base = u32::from(pool.network()) + 2 * n;
        let v6 = pool6.map(|p| {
            let base = u128::from(p.network()) + 2 * u128::from(n);
            (Ipv6Addr::from(base), Ipv6Addr::from(base + 1))
        });
        Self { n, host: Ipv4Addr::from(base), vessel: Ipv4Addr::from(base + 1), v6 }
    }

    /// The host end of its veth.
    pub(crate) fn veth(n: u32) -> String {
        format!("vsl{n}")
    }

    fn netns_path(n: u32) -> PathBuf {
        run_dir().join(format!("ns-{n}"))
    }

    /// Its own sysfs (showing its interfaces, not the host's), bound
    /// read-only at every container's `/sys`.
    fn sysfs_path(n: u32) -> PathBuf {
        run_dir().join(format!("sys-{n}"))
    }

    fn lock_path(n: u32) -> PathBuf {
        run_dir().join(format!("slot-{n}"))
    }
}

/// Why networks cannot be made here, if they cannot.
pub fn unavailable() -> Option<String> {
    if crate::rootless::mode().is_rootless() {
        if pasta::binary().is_none() {
            return Some("rootless, a vessel network needs pasta (Debian package passt)".into());
        }
    } else if !nix::unistd::Uid::effective().is_root() {
        return Some("a vessel network needs root, or rootless mode".into());
    }
    if !nft::available() {
        return Some("libnftables (Debian package libnftables1, part of nftables) is not installed".into());
    }
    None
}

/// A vessel's live network. Dropping it without [`VesselNet::close`] still
/// removes everything, best effort.
#[derive(Debug)]
pub struct VesselNet {
    slot: Slot,
    config: NetConfig,
    /// Held while the network lives: tells other processes the slot is taken.
    lock: Option<Flock<fs::File>>,
    policy: Arc<Mutex<NetworkPolicy>>,
    resolver: tokio::sync::Mutex<dns::Resolver>,
    ports: Mutex<BTreeMap<u16, ports::Published>>,
    /// Rootless: its pasta, while attached.
    pasta: Mutex<Option<std::process::Child>>,
    /// Whether the veth, filter and resolver exist (a vessel whose policy
    /// is `None` has its namespace alone until it publishes a port or
    /// gets another policy: its processes are in it from the start).
    attached: std::sync::atomic::AtomicBool,
}

impl VesselNet {
    /// Makes a network with `policy`: the namespace, and unless the policy
    /// is `None`, the veth, rules and resolver. Nothing is left behind if a
    /// step fails.
    pub async fn create(config: &NetConfig, policy: &NetworkPolicy) -> Result<Self, RuntimeError> {
        let mut net = Self::create_unconnected(config, policy).await?;
        match net.connect().await {
            Ok(()) => Ok(net),
            Err(e) => {
                net.teardown().await;
                Err(e)
            }
        }
    }

    /// Makes the namespace alone (loopback only), with `policy` in force
    /// but not yet connected: [`VesselNet::connect`] does that, which a
    /// caller overlaps with making the container that joins it (see
    /// `RunRequest::before_start`). Nothing is left behind if a step fails.
    pub async fn create_unconnected(config: &NetConfig, policy: &NetworkPolicy) -> Result<Self, RuntimeError> {
        if let Some(why) = unavailable() {
            return Err(RuntimeError::Unavailable { backend: "network", reason: why });
        }
        policy.validate().map_err(|e| RuntimeError::InvalidRequest(e.to_string()))?;
        let slots = config.slots()?;
        let dir = run_dir();
        fs::create_dir_all(&dir).map_err(RuntimeError::io("create", &dir))?;
        let (n, lock) = take_slot(slots)?;
        let slot = Slot::new(config.pool, config.ipv6_pool, n);
        let mut net = Self {
            slot,
            config: config.clone(),
            lock: Some(lock),
            policy: Arc::new(Mutex::new(policy.clone())),
            resolver: Default::default(),
            ports: Mutex::default(),
            attached: Default::default(),
            pasta: Mutex::default(),
        };
        match net.build().await {
            Ok(()) => Ok(net),
            Err(e) => {
                net.teardown().await;
                Err(e)
            }
        }
    }

    async fn build(&mut self) -> Result<(), RuntimeError> {
        link::namespace(&Slot::netns_path(self.slot.n), self.slot.v6.is_some()).await?;
        if !crate::rootless::mode().is_rootless() {
            link::sysfs(&Slot::netns_path(self.slot.n), &Slot::sysfs_path(self.slot.n))?;
        }
        Ok(())
    }

    /// Connects the namespace to the host under the policy in force (the
    /// veth or pasta, rules, resolver), unless it is connected or the
    /// policy is `None`. Concurrent calls make one connection. After a
    /// failed one, remove the network ([`VesselNet::close`]): what it made
    /// is left for that, and another call would fail on it.
    pub async fn connect(&self) -> Result<(), RuntimeError> {
        let policy = self.policy();
        if policy.is_none() || self.connected() {
            return Ok(());
        }
        self.attach(&policy).await
    }

    /// Connects the namespace to the host under `policy`, once.
    async fn attach(&self, policy: &NetworkPolicy) -> Result<(), RuntimeError> {
        let mut resolver = self.resolver.lock().await;
        if self.attached.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let (slot, netns) = (self.slot, Slot::netns_path(self.slot.n));
        let (config, upstreams) = (&self.config, self.config.upstreams());
        if let Some(inside) = self.inside() {
            // Filter and resolver first, then the uplink: never a moment open.
            let forbidden = nft::Forbidden::of(config);
            nft::create_inside(&inside, slot, &forbidden, policy)?;
            let addr = SocketAddr::new(IpAddr::V4(ROOTLESS_RESOLVER), 53);
            *resolver = dns::Resolver::start(slot, addr, Some(inside), upstreams, self.policy.clone(), forbidden)?;
            let ns = netns.clone();
            let ipv6 = slot.v6.is_some();
            let child = tokio::task::spawn_blocking(move || pasta::start(slot.n, &ns, ipv6))
                .await
                .map_err(|e| RuntimeError::InvalidRequest(format!("starting pasta: {e}")))??;
            *self.pasta.locked() = Some(child);
        } else {
            // The filter and the veth in parallel (the filter was ~5 ms of
            // the ~7 ms a network takes): the filter is keyed by the veth's
            // name, not its existence, and the host end's addresses come
            // from the pools, which it forbids already.
            let forbidden = nft::Forbidden::of(config);
            let filter = {
                let (forbidden, policy) = (forbidden.clone(), policy.clone());
                tokio::task::spawn_blocking(move || nft::create(slot, &forbidden, &policy))
            };
            let linked = link::attach(slot, &netns).await;
            let filtered = filter.await.map_err(|e| RuntimeError::InvalidRequest(format!("adding the filter: {e}")))?;
            linked?;
            filtered?;
            let addr = SocketAddr::new(IpAddr::V4(slot.host), 53);
            *resolver = dns::Resolver::start(slot, addr, None, upstreams, self.policy.clone(), forbidden)?;
        }
        self.attached.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Its slot: the host-wide number its names and addresses derive from.
    pub fn slot(&self) -> u32 {
        self.slot.n
    }

    /// The sysfs of its namespace, for the containers' `/sys` (rootful;
    /// rootless containers get the host's, read-only, as before: a sysfs
    /// the rootless process mounts does not bind into them here).
    pub fn sysfs(&self) -> Option<PathBuf> {
        (!crate::rootless::mode().is_rootless()).then(|| Slot::sysfs_path(self.slot.n))
    }

    /// The namespace every container of the vessel joins.
    pub fn netns(&self) -> PathBuf {
        Slot::netns_path(self.slot.n)
    }

    /// Rootless: the vessel's namespace, where its filter and resolver are.
    fn inside(&self) -> Option<PathBuf> {
        crate::rootless::mode().is_rootless().then(|| self.netns())
    }

    /// The resolver the vessel's `/etc/resolv.conf` names.
    pub fn nameserver(&self) -> IpAddr {
        match self.inside() {
            Some(_) => IpAddr::V4(ROOTLESS_RESOLVER),
            None => IpAddr::V4(self.slot.host),
        }
    }

    /// Whether it is connected (its processes may reach what the policy allows).
    pub fn connected(&self) -> bool {
        self.attached.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The vessel's own address, once it is connected.
    pub fn address(&self) -> Option<IpAddr> {
        // Rootless, pasta gives it the host's address: none of its own.
        (self.connected() && self.inside().is_none()).then_some(IpAddr::V4(self.slot.vessel))
    }

    /// The vessel's own IPv6 address, once it is connected with IPv6 on.
    pub fn address6(&self) -> Option<Ipv6Addr> {
        self.address().and(self.slot.v6.map(|(_, v)| v))
    }

    /// The host end of its veth, once connected (leak checks, debugging).
    pub fn interface(&self) -> Option<String> {
        self.connected().then(|| Slot::veth(self.slot.n))
    }

    /// The policy in force.
    pub fn policy(&self) -> NetworkPolicy {
        self.policy.locked().clone()
    }

    /// Replaces the policy; new connections follow it at once (one nftables
    /// transaction), established ones and running processes are untouched.
    /// `None` cuts all egress (the namespace stays: loopback still works).
    pub async fn set_policy(&self, policy: &NetworkPolicy) -> Result<(), RuntimeError> {
        policy.validate().map_err(|e| RuntimeError::InvalidRequest(e.to_string()))?;
        if !self.connected() {
            *self.policy.locked() = policy.clone();
            return if policy.is_none() { Ok(()) } else { self.attach(policy).await };
        }
        let mut held = self.policy.locked();
        nft::apply(self.slot, &nft::Forbidden::of(&self.config), policy, self.inside().as_deref())?;
        *held = policy.clone();
        Ok(())
    }

    /// What the network refused so far.
    pub async fn stats(&self) -> NetworkStats {
        if !self.connected() {
            return NetworkStats::default();
        }
        let (denied_packets, denied_destinations) = nft::denied(self.slot, self.inside().as_deref());
        let (refused_names, answered_queries) = self.resolver.lock().await.stats();
        NetworkStats { denied_packets, denied_destinations, refused_names, answered_queries }
    }

    /// Publishes the vessel's TCP `port` on a host port of
    /// [`NetConfig::publish_host`] and returns that address; publishing a
    /// port twice returns the same address.
    pub async fn publish(&self, port: u16) -> Result<SocketAddr, RuntimeError> {
        if port == 0 {
            return Err(RuntimeError::InvalidRequest("port 0 cannot be published".into()));
        }
        if let Some(p) = self.ports.locked().get(&port) {
            return Ok(p.addr);
        }
        let policy = self.policy();
        self.attach(&policy).await?;
        // Rootless, the relay connects from inside the vessel's namespace.
        let inside = self.inside();
        let ip = if inside.is_some() { Ipv4Addr::LOCALHOST } else { self.slot.vessel };
        let target = SocketAddr::new(IpAddr::V4(ip), port);
        let published = ports::Published::start(self.config.publish_host, target, inside).await?;
        let addr = published.addr;
        self.ports.locked().entry(port).or_insert(published);
        Ok(self.ports.locked().get(&port).map_or(addr, |p| p.addr))
    }

    /// Stops publishing `port`; `false` if it was not published.
    pub fn unpublish(&self, port: u16) -> bool {
        self.ports.locked().remove(&port).is_some()
    }

    /// The published ports: vessel port to host address.
    pub fn published(&self) -> BTreeMap<u16, SocketAddr> {
        self.ports.locked().iter().map(|(p, v)| (*p, v.addr)).collect()
    }

    /// Removes everything: relays, resolver, rules, veth, namespace, slot.
    pub async fn close(mut self) {
        self.teardown().await;
    }

    /// Stops what runs for the network: relays, resolver, pasta.
    fn stop_services(&mut self) {
        self.ports.locked().clear();
        self.resolver.get_mut().stop();
        if let Some(child) = self.pasta.locked().take() {
            pasta::stop(self.slot.n, child);
        }
    }

    async fn teardown(&mut self) {
        self.stop_services();
        if self.lock.is_some() {
            remove_slot(self.slot.n).await;
            self.lock = None;
        }
    }
}

impl Drop for VesselNet {
    fn drop(&mut self) {
        if self.lock.is_none() {
            return;
        }
        self.stop_services();
        let n = self.slot.n;
        let lock = self.lock.take();
        // Dropped without close (a panic, a cancelled future): the slot
        // stays locked until its things are gone, so no one reuses it half-removed.
        let remove = async move {
            remove_slot(n).await;
            drop(lock);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(remove);
            }
            Err(_) => {
                let _ = std::thread::spawn(move || {
                    if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        rt.block_on(remove);
                    }
                })
                .join();
            }
        }
    }
}

/// Takes a free slot (random start, linear probe), clearing what a dead
/// owner left in it first.
fn take_slot(slots: u32) -> Result<(u32, Flock<fs::File>), RuntimeError> {
    let start = rand::random::<u32>() % slots;
    for i in 0..slots {
        let n = (start + i) % slots;
        let path = Slot::lock_path(n);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(RuntimeError::io("open", &path))?;
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else { continue };
        if !still_linked(&path, &lock) {
            // A sweep removed this slot's file between our open and lock:
            // the slot is free but locked through another inode now.
            continue;
        }
        // Locked by us: whatever is there is a dead owner's.
        if Slot::netns_path(n).exists() || Slot::sysfs_path(n).exists() || link::exists_sync(n) {
            remove_slot_sync(n);
        }
        return Ok((n, lock));
    }
    Err(RuntimeError::InvalidRequest(format!("every one of the {slots} network slots is in use")))
}

/// Removes slot `n`'s rules, veth and namespace (each step tolerates its
/// thing being absent), and its lock file.
async fn remove_slot(n: u32) {
    remove_parts(n).await;
    let _ = fs::remove_file(Slot::lock_path(n));
}

/// [`remove_slot`] but the lock file (its caller holds it and keeps the slot).
async fn remove_parts(n: u32) {
    pasta::remove(n);
    // The filter (one nftables transaction) and the veth (the kernel's slowest step,
    // ~20 ms) go in parallel; neither needs the other gone first.
    let filter = tokio::task::spawn_blocking(move || nft::remove(n));
    link::remove(n).await;
    let _ = filter.await;
    remove_netns(n);
}

/// [`remove_parts`] from synchronous code, on a runtime of its own.
fn remove_slot_sync(n: u32) {
    let done = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            rt.block_on(remove_parts(n));
        }
    })
    .join();
    if done.is_err() {
        tracing::warn!(slot = n, "removing a leftover network panicked");
    }
}

fn remove_netns(n: u32) {
    let sys = Slot::sysfs_path(n);
    let _ = nix::mount::umount2(&sys, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&sys);
    let p = Slot::netns_path(n);
    match nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => tracing::warn!(path = %p.display(), error = %e, "could not unmount a vessel network namespace"),
    }
    match fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %p.display(), error = %e, "could not remove a vessel network namespace"),
    }
}

/// Removes the networks of dead processes (slots nobody holds), returning
/// how many. Live networks are never touched.
pub async fn remove_leftovers() -> usize {
    if unavailable().is_some() {
        return 0;
    }
    let Ok(dir) = fs::read_dir(run_dir()) else { return 0 };
    let mut removed = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(|s| s.strip_prefix("slot-")).and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(file) = fs::OpenOptions::new().write(true).open(entry.path()) else { continue };
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else { continue };
        if !still_linked(&entry.path(), &lock) {
            // Removed by another sweep since we opened it, and perhaps
            // taken again by a new owner through a new file.
            continue;
        }
        remove_slot(n).await;
        drop(lock);
        removed += 1;
    }
    removed
}

/// Whether anything of slot `n` is still on the host (leak checks).
pub fn slot_exists(n: u32) -> bool {
    !slot_leftovers(n).is_empty()
}

/// What of slot `n` is still on the host, named (leak checks' messages).
pub fn slot_leftovers(n: u32) -> Vec<&'static str> {
    [
        ("namespace", Slot::netns_path(n).exists()),
        ("sysfs", Slot::sysfs_path(n).exists()),
        ("veth", link::exists_sync(n)),
        ("filter chains", nft::exists(n)),
        ("pasta", pasta::running(n)),
    ]
    .into_iter()
    .filter_map(|(what, there)| there.then_some(what))
    .collect()
}

/// The slot of an interface name `vsl<n>`.
pub fn slot_of(interface: &str) -> Option<u32> {
    interface.strip_prefix("vsl")?.parse().ok()
}
