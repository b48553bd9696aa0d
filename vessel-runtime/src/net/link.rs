//! The vessel's namespace and its veth, through rtnetlink.
//!
//! A namespace is made by a thread of its own (`unshare` changes only the
//! calling thread's) and kept alive by a bind mount of it, as `ip netns`
//! and CNI do; work inside it is done by a thread that joined it.

use std::fs;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use nix::sched::{CloneFlags, unshare};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::Slot;
use crate::RuntimeError;

/// The vessel's end of its veth, in its namespace.
const INSIDE: &str = "eth0";

fn call(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> RuntimeError {
    move |e| RuntimeError::Call { backend: "netlink", op, source: Box::new(e) }
}

fn os(op: &'static str) -> impl FnOnce(nix::errno::Errno) -> RuntimeError {
    move |e| RuntimeError::Call { backend: "netlink", op, source: Box::new(std::io::Error::from(e)) }
}

/// A netlink handle for the calling thread's namespace, its connection
/// driven on the current runtime.
fn connect() -> Result<Handle, RuntimeError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| RuntimeError::io("open netlink socket", "")(e))?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn index(handle: &Handle, name: &str) -> Result<Option<u32>, RuntimeError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l.map(|l| l.header.index)),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
        Err(e) => Err(call("get link")(e)),
    }
}

fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

/// Runs `work` on a thread that joined namespace `netns`, with a runtime of
/// its own, and returns its result.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    work: impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<T, RuntimeError>>>> + Send + 'static,
) -> Result<T, RuntimeError> {
    super::in_ns(Some(netns), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RuntimeError::io("start a runtime", ""))?;
        rt.block_on(work())
    })?
}

/// Makes a network namespace and pins it at `path`.
fn make_netns(path: &Path) -> Result<(), RuntimeError> {
    fs::File::create(path).map_err(RuntimeError::io("create", path))?;
    let pinned: PathBuf = path.to_owned();
    std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).map_err(os("unshare a network namespace"))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &pinned,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(os("pin the network namespace"))
    })
    .join()
    .map_err(|_| RuntimeError::InvalidRequest("a network setup thread panicked".into()))?
}

/// Mounts the sysfs of namespace `netns` at `at` (read-only): a sysfs
/// shows the network devices of the namespace its mounter is in.
pub(super) fn sysfs(netns: &Path, at: &Path) -> Result<(), RuntimeError> {
    fs::create_dir_all(at).map_err(RuntimeError::io("create", at))?;
    use nix::mount::MsFlags;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    super::in_ns(Some(netns), || nix::mount::mount(Some("sysfs"), at, Some("sysfs"), flags, None::<&str>))?
        .map_err(os("mount the vessel's sysfs"))
}

fn sysctl(key: &str, value: &str) -> Result<(), RuntimeError> {
    let p = Path::new("/proc/sys/net").join(key);
    fs::write(&p, value).map_err(RuntimeError::io("write", &p))
}

/// Makes the namespace at `netns`, with `lo` up and, unless `ipv6`, IPv6
/// off. Either way router advertisements configure nothing and addresses
/// skip duplicate detection (the link has two ends, both ours).
pub(super) async fn namespace(netns: &Path, ipv6: bool) -> Result<(), RuntimeError> {
    make_netns(netns)?;
    in_netns(netns, move || Box::pin(loopback_inside(ipv6)))
}

async fn loopback_inside(ipv6: bool) -> Result<(), RuntimeError> {
    for key in ["ipv6/conf/all/disable_ipv6", "ipv6/conf/default/disable_ipv6"] {
        let _ = sysctl(key, if ipv6 { "0" } else { "1" });
    }
    // `default` is what interfaces moved in later start with.
    for (key, value) in [("accept_ra", "0"), ("autoconf", "0"), ("accept_dad", "0"), ("router_solicitations", "0")] {
        for conf in ["all", "default"] {
            let _ = sysctl(&format!("ipv6/conf/{conf}/{key}"), value);
        }
    }
    let handle = connect()?;
    let lo = index(&handle, "lo").await?.ok_or_else(|| RuntimeError::InvalidRequest("no lo".into()))?;
    handle.link().set(LinkUnspec::new_with_index(lo).up().build()).execute().await.map_err(call("lo up"))
}

/// Connects the namespace at `netns` to the host: the veth pair, their
/// addresses and the vessel's default route.
pub(super) async fn attach(slot: Slot, netns: &Path) -> Result<(), RuntimeError> {
    let handle = connect()?;
    let host = Slot::veth(slot.n);
    let ns = fs::File::open(netns).map_err(RuntimeError::io("open", netns))?;
    // The peer is made in the vessel's namespace, as `eth0`: moving a link
    // between namespaces afterwards waits for an RCU grace period (~45 ms
    // here), creating it there does not.
    let peer = LinkUnspec::new_with_name(INSIDE).setns_by_fd(ns.as_raw_fd()).build();
    let veth = LinkVeth::new(&host, INSIDE).set_info_data(InfoData::Veth(InfoVeth::Peer(peer))).build();
    handle.link().add(veth).execute().await.map_err(call("add veth"))?;
    let host_index =
        index(&handle, &host).await?.ok_or_else(|| RuntimeError::InvalidRequest("veth vanished".into()))?;
    // Without IPv6, none on the host end: no link-local address for the
    // vessel to reach the host by (with it, the input chain drops all but
    // neighbour discovery).
    let _ = sysctl(&format!("ipv6/conf/{host}/disable_ipv6"), if slot.v6.is_some() { "0" } else { "1" });
    handle
        .address()
        .add(host_index, IpAddr::V4(slot.host), 31)
        .execute()
        .await
        .map_err(call("address the host end"))?;
    if let Some((host6, _)) = slot.v6 {
        for (key, value) in [("accept_dad", "0"), ("accept_ra", "0"), ("autoconf", "0")] {
            sysctl(&format!("ipv6/conf/{host}/{key}"), value)?;
        }
        handle
            .address()
            .add(host_index, IpAddr::V6(host6), 127)
            .execute()
            .await
            .map_err(call("address the host end (IPv6)"))?;
        if fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").map_or(true, |v| v.trim() != "1") {
            sysctl("ipv6/conf/all/forwarding", "1")?;
        }
    }
    handle.link().set(LinkUnspec::new_with_index(host_index).up().build()).execute().await.map_err(call("link up"))?;
    // Routing between vessels and the world (like docker, host-wide).
    if fs::read_to_string("/proc/sys/net/ipv4/ip_forward").map_or(true, |v| v.trim() != "1") {
        sysctl("ipv4/ip_forward", "1")?;
    }
    let (vessel, gateway, v6) = (slot.vessel, slot.host, slot.v6);
    in_netns(netns, move || Box::pin(configure_inside(vessel, gateway, v6)))
}

/// Inside the vessel's namespace: `eth0` addressed, up, default routes to
/// the host.
async fn configure_inside(
    vessel: Ipv4Addr,
    gateway: Ipv4Addr,
    v6: Option<(Ipv6Addr, Ipv6Addr)>,
) -> Result<(), RuntimeError> {
    let handle = connect()?;
    let eth = index(&handle, INSIDE).await?.ok_or_else(|| RuntimeError::InvalidRequest("veth peer vanished".into()))?;
    handle.address().add(eth, IpAddr::V4(vessel), 31).execute().await.map_err(call("address eth0"))?;
    if let Some((_, vessel6)) = v6 {
        handle.address().add(eth, IpAddr::V6(vessel6), 127).execute().await.map_err(call("address eth0 (IPv6)"))?;
    }
    handle.link().set(LinkUnspec::new_with_index(eth).up().build()).execute().await.map_err(call("eth0 up"))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).output_interface(eth).build();
    handle.route().add(route).execute().await.map_err(call("default route"))?;
    if let Some((gateway6, _)) = v6 {
        let route = RouteMessageBuilder::<Ipv6Addr>::new().gateway(gateway6).output_interface(eth).build();
        handle.route().add(route).execute().await.map_err(call("default route (IPv6)"))?;
    }
    Ok(())
}

/// Deletes slot `n`'s veth (its peer goes with it); absent is fine.
pub(super) async fn remove(n: u32) {
    let Ok(handle) = connect() else { return };
    if let Ok(Some(i)) = index(&handle, &Slot::veth(n)).await
        && let Err(e) = handle.link().del(i).execute().await
    {
        tracing::warn!(slot = n, error = %e, "could not delete a vessel veth");
    }
}

/// Whether slot `n`'s veth exists in this thread's namespace.
pub(super) fn exists_sync(n: u32) -> bool {
    nix::net::if_::if_nametoindex(Slot::veth(n).as_str()).is_ok()
}
