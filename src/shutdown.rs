//! Graceful shutdown, as in mini-redis: one broadcast channel; every stage holds a [`Shutdown`]
//! and finishes its current work when the signal arrives, so offsets of finished work still get
//! committed on the way out.

use tokio::sync::broadcast;

/// Sends the signal. Dropping it also signals, so a panicking owner cannot leave stages running.
#[derive(Debug, Clone)]
pub struct Trigger(broadcast::Sender<()>);

/// Listens for the signal.
#[derive(Debug)]
pub struct Shutdown {
    notified: bool,
    rx: broadcast::Receiver<()>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = broadcast::channel(1);
    (Trigger(tx), Shutdown { notified: false, rx })
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(());
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown { notified: false, rx: self.0.subscribe() }
    }
}

impl Shutdown {
    pub fn is_shutdown(&self) -> bool {
        self.notified
    }

    /// Waits for the signal (returns at once if it was already received).
    pub async fn recv(&mut self) {
        if self.notified {
            return;
        }
        // Closed (all triggers dropped) counts as a signal too.
        let _ = self.rx.recv().await;
        self.notified = true;
    }
}
