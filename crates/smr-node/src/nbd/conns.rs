//! The connections an NBD server holds: a limit in total and per client
//! address, and which idle connection gives way when a new client needs its
//! slot.
//!
//! Clients such as the kernel's or `nbdfuse` stay connected, idle, for as
//! long as a device is in use, so an idle connection is not closed for being
//! idle alone (unless [`ServerConfig::idle_timeout`] asks for it). It is
//! closed when a new client would go over a limit and it has been idle (no
//! request in flight, none received) for at least
//! [`ServerConfig::evict_idle_after`]: connections opened and left idle,
//! by mistake or to lock others out, cannot keep new clients away for
//! longer than that.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::server::ServerConfig;

/// What one connection is doing, shared by its tasks and the table.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last request received or answered.
    last: AtomicU64,
    /// Requests in flight.
    busy: AtomicUsize,
    close: Notify,
}

impl Activity {
    /// Activity of a connection that has just begun; times count from
    /// `epoch`.
    pub(crate) fn new(epoch: Instant) -> Self {
        let a = Activity {
            epoch,
            last: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            close: Notify::new(),
        };
        a.touch();
        a
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records that the client did something now.
    pub(crate) fn touch(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Marks a request in flight until the guard drops (the caller touched
    /// the activity when it read the request).
    pub(crate) fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// How long nothing happened, or `None` while requests are in flight.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.last.load(Ordering::Relaxed);
        Some(Duration::from_millis(self.now_ms().saturating_sub(last)))
    }

    /// Resolves once the table asked this connection to close.
    pub(crate) async fn closed(&self) {
        self.close.notified().await;
    }
}

/// A request in flight (see [`Activity::begin`]).
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Entry {
    addr: Option<IpAddr>,
    activity: Arc<Activity>,
}

/// Every connection of a server.
pub(crate) struct Table {
    epoch: Instant,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
}

/// Why a new connection was turned away.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// [`ServerConfig::max_connections`] busy or recently active connections.
    Total(usize),
    /// [`ServerConfig::max_connections_per_address`] of them from this address.
    PerAddress(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Total(n) => write!(f, "all {n} connections are in use"),
            Refusal::PerAddress(n) => write!(f, "{n} connections from this address are in use"),
        }
    }
}

/// A connection's place in the table; leaving drops it.
pub(crate) struct Slot {
    table: Arc<Table>,
    id: u64,
    /// The connection's activity.
    pub(crate) activity: Arc<Activity>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.table.conns.lock() {
            c.remove(&self.id);
        }
    }
}

impl Table {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Table {
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        })
    }

    /// Connections held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.conns.lock().map_or(0, |c| c.len())
    }

    /// Takes a slot for a client at `addr` (`None` for UNIX sockets, which
    /// have no per-address limit), closing the longest-idle connection that
    /// went over a limit if one has been idle long enough.
    pub(crate) fn admit(
        self: &Arc<Self>,
        addr: Option<IpAddr>,
        config: &ServerConfig,
    ) -> Result<Slot, Refusal> {
        let mut conns = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let per_addr = config.max_connections_per_address.max(1);
        let total = config.max_connections.max(1);
        let from_addr = |e: &Entry| addr.is_some() && e.addr == addr;
        let same = conns.values().filter(|e| from_addr(e)).count();
        let over = if same >= per_addr {
            Some(Refusal::PerAddress(per_addr))
        } else if conns.len() >= total {
            Some(Refusal::Total(total))
        } else {
            None
        };
        if let Some(refusal) = over {
            let victim = conns
                .iter()
                .filter(|(_, e)| matches!(refusal, Refusal::Total(_)) || from_addr(e))
                .filter_map(|(id, e)| e.activity.idle_for().map(|idle| (idle, *id)))
                .filter(|(idle, _)| *idle >= config.evict_idle_after)
                // Longest idle; of equals, the oldest connection.
                .max_by_key(|(idle, id)| (*idle, std::cmp::Reverse(*id)));
            let Some((idle, id)) = victim else {
                return Err(refusal);
            };
            if let Some(e) = conns.remove(&id) {
                tracing::info!(
                    addr = ?e.addr,
                    idle_ms = idle.as_millis() as u64,
                    "NBD: closing an idle connection for a new client ({refusal})"
                );
                e.activity.close.notify_one();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(self.epoch));
        conns.insert(
            id,
            Entry {
                addr,
                activity: activity.clone(),
            },
        );
        Ok(Slot {
            table: self.clone(),
            id,
            activity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(total: usize, per: usize, evict_ms: u64) -> ServerConfig {
        ServerConfig {
            max_connections: total,
            max_connections_per_address: per,
            evict_idle_after: Duration::from_millis(evict_ms),
            ..ServerConfig::default()
        }
    }

    #[test]
    fn limits_hold_until_a_connection_has_been_idle_long_enough() {
        let t = Table::new();
        let a: Option<IpAddr> = Some([10, 0, 0, 1].into());
        let b: Option<IpAddr> = Some([10, 0, 0, 2].into());
        let c = config(3, 2, 60_000);
        let a1 = t.admit(a, &c).unwrap();
        let _a2 = t.admit(a, &c).unwrap();
        assert_eq!(t.admit(a, &c).err(), Some(Refusal::PerAddress(2)));
        let _b1 = t.admit(b, &c).unwrap();
        assert_eq!(t.admit(None, &c).err(), Some(Refusal::Total(3)));
        drop(a1);
        assert_eq!(t.len(), 2);
        assert!(t.admit(a, &c).is_ok(), "a freed slot is taken again");
    }

    #[test]
    fn the_longest_idle_connection_gives_way_but_never_a_busy_one() {
        let t = Table::new();
        let a: Option<IpAddr> = Some([10, 0, 0, 1].into());
        let c = config(8, 2, 20);
        let old = t.admit(a, &c).unwrap();
        let busy = t.admit(a, &c).unwrap();
        let _working = busy.activity.begin();
        std::thread::sleep(Duration::from_millis(40));
        let new = t.admit(a, &c).expect("the idle one gives way");
        assert_eq!(t.len(), 2);
        // The idle one was told to close; the busy one was not.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), old.activity.closed())
                .await
                .expect("closed");
            let busy_closed =
                tokio::time::timeout(Duration::from_millis(50), busy.activity.closed()).await;
            assert!(busy_closed.is_err(), "a busy connection is never closed");
        });
        // Both left busy: the next is refused however long it waits.
        let _also_working = new.activity.begin();
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(t.admit(a, &c).err(), Some(Refusal::PerAddress(2)));
        drop(new);
    }
}
