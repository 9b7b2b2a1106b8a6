//! The memory medium behind switches: while `down`, appends and catalog reads fail as a
//! lost network would, so that publishes go to the outbox (the MessageStore the
//! gateway shows) and the readiness probe fails; while `held`, appends wait (a send on
//! its way); other switches fail one operation each.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use intracom::medium::memory::MemoryMedium;
use intracom::medium::{Call, Faults, Faulty};
use intracom::{Error, Result};

/// The memory medium with the switches around it.
pub type FlakyMedium = Faulty<MemoryMedium, Flaky>;

pub struct Flaky {
    pub down: AtomicBool,
    hold: tokio::sync::watch::Sender<bool>,
    held: AtomicUsize,
    /// While set, removing dead letters fails as a lost network would.
    pub dead_remove_down: AtomicBool,
    /// While set, loading or saving a checkpoint fails as a lost network would.
    pub checkpoint_down: AtomicBool,
}

impl Flaky {
    pub fn new() -> FlakyMedium {
        Faulty::new(
            MemoryMedium::new(Default::default()),
            Flaky {
                down: AtomicBool::new(false),
                hold: tokio::sync::watch::Sender::new(false),
                held: AtomicUsize::new(0),
                dead_remove_down: AtomicBool::new(false),
                checkpoint_down: AtomicBool::new(false),
            },
        )
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// While held, an append waits until released.
    pub fn set_held(&self, held: bool) {
        self.hold.send_replace(held);
    }

    /// How many appends wait now.
    pub fn held_appends(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    fn checkpoints_reachable(&self) -> Result<()> {
        refused_while(&self.checkpoint_down)
    }

    fn reachable(&self) -> Result<()> {
        refused_while(&self.down)
    }
}

/// An error as a lost network gives while `switch` is set.
fn refused_while(switch: &AtomicBool) -> Result<()> {
    if switch.load(Ordering::SeqCst) {
        return Err(Error::unavailable("flaky", "connection refused"));
    }
    Ok(())
}

#[async_trait]
impl Faults for Flaky {
    async fn before(&self, call: Call<'_>) -> Result<()> {
        match call {
            Call::Append(_) => {
                let mut hold = self.hold.subscribe();
                if *hold.borrow_and_update() {
                    self.held.fetch_add(1, Ordering::SeqCst);
                    let _ = hold.wait_for(|held| !*held).await;
                    self.held.fetch_sub(1, Ordering::SeqCst);
                }
                self.reachable()
            }
            Call::CatalogLoad => self.reachable(),
            Call::CheckpointLoad | Call::CheckpointSave => self.checkpoints_reachable(),
            Call::DeadRemove => refused_while(&self.dead_remove_down),
            _ => Ok(()),
        }
    }
}
