//! Where a gateway is in its life, as orchestrators and load balancers ask it:
//! starting (sources loading), ready, or draining (SIGTERM received). `/livez`,
//! `/readyz` and the gRPC health service all read it from here.

use tokio::sync::watch;

/// A phase of a gateway's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Building its first configuration: sources load, certificates are read.
    Starting,
    /// Serving.
    Ready,
    /// Asked to stop: still serving what arrives, but telling load balancers to send
    /// nothing new, until the drain period ends.
    Draining,
}

impl Phase {
    /// The word `/readyz` answers with.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
        }
    }
}

/// The phase, shared by everything that reports it. A phase only moves forward:
/// a draining gateway never becomes ready again.
#[derive(Debug)]
pub struct Lifecycle {
    phase: watch::Sender<Phase>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            phase: watch::Sender::new(Phase::Starting),
        }
    }
}

impl Lifecycle {
    /// The phase now.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// The first configuration is built and every port is served.
    pub fn ready(&self) {
        self.phase.send_if_modified(|p| {
            let moved = *p == Phase::Starting;
            if moved {
                *p = Phase::Ready;
            }
            moved
        });
    }

    /// Stop being ready, for good.
    pub fn drain(&self) {
        self.phase.send_if_modified(|p| {
            let moved = *p != Phase::Draining;
            *p = Phase::Draining;
            moved
        });
    }

    /// Notified on every change of phase.
    pub fn watch(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draining_gateway_never_becomes_ready_again() {
        let l = Lifecycle::default();
        assert_eq!(l.phase(), Phase::Starting);
        l.ready();
        assert_eq!(l.phase(), Phase::Ready);
        l.drain();
        l.ready();
        assert_eq!(l.phase(), Phase::Draining);
    }

    #[test]
    fn a_gateway_asked_to_stop_while_starting_drains() {
        let l = Lifecycle::default();
        l.drain();
        l.ready();
        assert_eq!(l.phase(), Phase::Draining);
    }
}
