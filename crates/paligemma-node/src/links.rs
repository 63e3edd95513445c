//! Whether the node can reach the routers and peers it was told to connect to. Zenoh
//! reconnects by itself (every declaration comes back with the link), but says
//! nothing; a robot's operator must see "the router is gone" in the log and in the
//! diagnostics rather than only an unexplained silence.
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The node's links, as last seen.
#[derive(Default)]
pub struct Links {
    inner: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Routers and peers connected, when last counted.
    connected: usize,
    /// When the last link went, while none is back.
    lost_at: Option<Instant>,
    /// Times the node was cut off from every router and peer.
    losses: u64,
}

/// What [`Links::snapshot`] tells the diagnostics.
pub struct LinkStatus {
    pub connected: usize,
    pub losses: u64,
    /// How long the node has had no link, while it has none.
    pub lost_for: Option<Duration>,
}

impl Links {
    /// Records a count of connected routers and peers; a loss and a return are logged
    /// once each.
    pub fn update(&self, connected: usize) {
        let mut seen = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match (seen.connected, connected) {
            (0, 0) | (1.., 1..) => {}
            (1.., 0) => {
                seen.lost_at = Some(Instant::now());
                seen.losses += 1;
                tracing::warn!(
                    "zenoh: no router or peer connected any more; trying to reconnect (see [zenoh] reconnect_max_ms)"
                );
            }
            (0, n) => match seen.lost_at.take() {
                Some(t) => tracing::info!(
                    "zenoh: connected again ({n} router(s) and peer(s)) after {:.1} s",
                    t.elapsed().as_secs_f64()
                ),
                None => tracing::info!("zenoh: connected ({n} router(s) and peer(s))"),
            },
        }
        seen.connected = connected;
    }

    pub fn snapshot(&self) -> LinkStatus {
        let seen = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        LinkStatus {
            connected: seen.connected,
            losses: seen.losses,
            lost_for: seen.lost_at.map(|t| t.elapsed()),
        }
    }
}

/// Counts the session's routers and peers every 250 ms into `links`.
pub async fn watch(session: zenoh::Session, links: std::sync::Arc<Links>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let info = session.info();
        let connected = info.routers_zid().await.count() + info.peers_zid().await.count();
        links.update(connected);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_counted_once_and_cleared_by_a_return() {
        let links = Links::default();
        links.update(0); // not connected yet: not a loss
        links.update(1);
        assert_eq!(links.snapshot().losses, 0);
        links.update(0);
        links.update(0);
        let s = links.snapshot();
        assert_eq!((s.connected, s.losses), (0, 1));
        assert!(s.lost_for.is_some());
        links.update(2);
        let s = links.snapshot();
        assert_eq!((s.connected, s.losses), (2, 1));
        assert!(s.lost_for.is_none());
    }
}
