//! `vessel network` and `vessel port`: a vessel's network policy, what it
//! refused, and its published ports. A published port lives as long as
//! the process holding the vessel, so `port` goes through (and starts)
//! the vessel's keeper, which stays while anything is published.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::args::NetArgs;
use crate::commands::{keeper, print_json, unexpected, with_vessel};
use crate::keeper::client::{call, connect_or_start};
use crate::keeper::wire::{Call, Reply};
use crate::view::NetworkView;
use vessel::Manager;

fn print(view: &NetworkView, json: bool) -> Result<()> {
    if json {
        return print_json(view);
    }
    let mut policy = view.mode.clone();
    for r in &view.rules {
        policy.push(' ');
        policy.push_str(r);
    }
    println!("network: {policy}");
    if let Some(a) = &view.address {
        println!("address: {a}");
    }
    for (port, url) in &view.published {
        println!("published: {port} -> {url}");
    }
    if view.denied_packets > 0 {
        println!("denied: {} packets (to {})", view.denied_packets, view.denied_destinations.join(", "));
    }
    for (name, count) in &view.refused_names {
        println!("refused name: {name} ({count}x)");
    }
    Ok(())
}

/// `vessel network ID [--network MODE] [--allow RULE]...`.
pub(crate) async fn network(mgr: &Manager, id: &str, set: &NetArgs, json: bool) -> Result<()> {
    let policy = set.policy()?;
    let view = match keeper(mgr, id).await? {
        Some(conn) => match call(conn, Call::Network { set: policy.map(|p| p.to_string()) }).await? {
            Reply::Network { network } => network,
            r => return Err(unexpected(r)),
        },
        None => {
            with_vessel(mgr, id, async |v| {
                if let Some(p) = policy {
                    v.set_network(p).await?;
                }
                Ok(NetworkView::of(v).await)
            })
            .await?
        }
    };
    print(&view, json)
}

/// `vessel port ID PORT [--remove]`: prints the published port's URL.
pub(crate) async fn port(
    mgr: &Manager,
    id: &str,
    port: u16,
    remove: bool,
    globals: &[String],
    linger: Duration,
    json: bool,
) -> Result<()> {
    let vid = mgr.resolve_vessel(id).await?;
    let conn = if remove {
        match keeper(mgr, id).await? {
            Some(c) => c,
            None => bail!("vessel {id} publishes no port (nothing holds it open)"),
        }
    } else {
        connect_or_start(mgr, &vid, globals, linger).await?
    };
    let view = match call(conn, Call::Publish { port, remove }).await? {
        Reply::Network { network } => network,
        r => return Err(unexpected(r)),
    };
    if json {
        return print_json(&view);
    }
    if !remove {
        match view.published.get(&port.to_string()) {
            Some(url) => println!("{url}"),
            None => bail!("port {port} was not published"),
        }
    }
    Ok(())
}
