//! The routes that announce VIPs: one blackhole route per announced address in the
//! `[announce]` table, tagged with the balancer's own route protocol number. A BGP speaker
//! (BIRD's kernel protocol with `learn`) imports them from that table and exports them; the
//! table is in no routing rule, so the routes never forward anything here.
//!
//! Written by one task (`spawn`): the event loop hands it the set to hold, the task makes the
//! table say exactly that (a dump, then adds and deletes) and reports failures back.

use std::{collections::BTreeSet, net::IpAddr};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
    AddressFamily,
};
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::sync::{mpsc, watch};

/// The route protocol number of the balancer's routes (`ip route ... proto 250`): only
/// routes with it are touched, so the table may hold others. (Numbers above 200 are free for
/// local use; /etc/iproute2/rt_protos can name it.)
pub const ROUTE_PROTOCOL: u8 = 250;

/// One netlink connection and the table it writes.
pub struct Routes {
    handle: Handle,
    table: u32,
}

impl Routes {
    /// Opens the connection; its I/O runs as a task on the current runtime.
    pub fn new(table: u32) -> std::io::Result<Routes> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Routes { handle, table })
    }

    /// Makes the table hold a route for exactly `wanted` (of the balancer's own routes).
    pub async fn set(&self, wanted: &BTreeSet<IpAddr>) -> Result<(), String> {
        let held = self.held().await?;
        for address in wanted.difference(&held) {
            self.handle
                .route()
                .add(self.message(*address))
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    format!("adding the route of {address} to table {}: {e}", self.table)
                })?;
        }
        for address in held.difference(wanted) {
            match self
                .handle
                .route()
                .del(self.message(*address))
                .execute()
                .await
            {
                Ok(()) => {}
                // Gone already (someone removed it by hand): what was wanted.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
                Err(e) => {
                    return Err(format!(
                        "removing the route of {address} from table {}: {e}",
                        self.table
                    ))
                }
            }
        }
        Ok(())
    }

    /// The addresses the table holds a balancer route for.
    pub async fn held(&self) -> Result<BTreeSet<IpAddr>, String> {
        let mut held = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut dump = RouteMessageBuilder::<IpAddr>::new().build();
            dump.header.address_family = family;
            let mut routes = self.handle.route().get(dump).execute();
            while let Some(route) = routes
                .try_next()
                .await
                .map_err(|e| format!("listing the routes of table {}: {e}", self.table))?
            {
                if let Some(address) = self.ours(&route) {
                    held.insert(address);
                }
            }
        }
        Ok(held)
    }

    /// The announced address `route` is for, if it is one of the balancer's in its table.
    fn ours(&self, route: &RouteMessage) -> Option<IpAddr> {
        let table = route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(route.header.table));
        if table != self.table || route.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
            return None;
        }
        let full = match route.header.address_family {
            AddressFamily::Inet => 32,
            _ => 128,
        };
        if route.header.destination_prefix_length != full {
            return None;
        }
        route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        })
    }

    /// `blackhole ADDRESS/32 table TABLE proto 250` (/128 for IPv6).
    fn message(&self, address: IpAddr) -> RouteMessage {
        let full = if address.is_ipv4() { 32 } else { 128 };
        RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(address, full)
            .expect("a host prefix is valid")
            .table_id(self.table)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .kind(RouteType::BlackHole)
            .build()
    }
}

/// The task that writes the routes: send it the set to hold; it reports what failed.
pub struct RouteWriter {
    wanted: watch::Sender<Option<BTreeSet<IpAddr>>>,
    task: tokio::task::JoinHandle<()>,
    routes: std::sync::Arc<Routes>,
}

impl RouteWriter {
    /// Starts the task for `table`; failures come back on `failures`.
    pub fn spawn(table: u32, failures: mpsc::UnboundedSender<String>) -> std::io::Result<Self> {
        let routes = std::sync::Arc::new(Routes::new(table)?);
        let (wanted, mut changes) = watch::channel(None::<BTreeSet<IpAddr>>);
        let writer = routes.clone();
        let task = tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(set) = changes.borrow_and_update().clone() else {
                    continue;
                };
                if let Err(e) = writer.set(&set).await {
                    let _ = failures.send(e);
                }
            }
        });
        Ok(RouteWriter {
            wanted,
            task,
            routes,
        })
    }

    /// Hold `set` from now on (the latest set wins when they come faster than written).
    pub fn set(&self, set: BTreeSet<IpAddr>) {
        self.wanted.send_replace(Some(set));
    }

    /// Stops the task and removes every route: what shutdown does before it detaches.
    /// Returns how many routes were removed.
    pub async fn withdraw_all(self) -> Result<usize, String> {
        self.task.abort();
        let _ = self.task.await;
        let held = self.routes.held().await?.len();
        self.routes.set(&BTreeSet::new()).await?;
        Ok(held)
    }
}
