//! A replaceable actor reference: when a supervisor restarts a child, the actors that talk
//! to it find the new one here instead of holding a dead reference.

use std::fmt;
use std::sync::{Arc, RwLock};

use ractor::{ActorRef, Message};

pub struct Slot<M: Message>(Arc<RwLock<Option<ActorRef<M>>>>);

impl<M: Message> Clone for Slot<M> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<M: Message> Default for Slot<M> {
    fn default() -> Self {
        Slot(Arc::new(RwLock::new(None)))
    }
}

impl<M: Message> fmt::Debug for Slot<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Slot")
    }
}

impl<M: Message> Slot<M> {
    pub fn set(&self, actor: ActorRef<M>) {
        if let Ok(mut guard) = self.0.write() {
            *guard = Some(actor);
        }
    }

    pub fn get(&self) -> Option<ActorRef<M>> {
        self.0.read().ok().and_then(|guard| guard.clone())
    }

    /// Sends `message`; `false` when no live actor took it (it is dropped, and with it any
    /// message it carried is handed back to the source).
    pub fn cast(&self, message: M) -> bool {
        match self.get() {
            Some(actor) => actor.cast(message).is_ok(),
            None => false,
        }
    }
}
