//! The deduplication actor: drops events whose id their sink already accepted.
//!
//! One store round trip per batch. Ids are only *read* here; the user actor marks an id once
//! its sink accepted the event (§5.2), so a failed delivery never counts as processed.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

pub use crate::messages::DedupMsg;
use crate::messages::RouterMsg;
use crate::ports::Ports;
use crate::slot::Slot;
use crate::stats::Stats;

pub struct DedupArgs {
    pub ports: Ports,
    pub router: Slot<RouterMsg>,
    pub stats: Arc<Stats>,
}

#[derive(Debug, Default)]
pub struct DedupActor;

/// Backoff while the dedup store cannot answer.
const STORE_RETRY_INITIAL: Duration = Duration::from_millis(50);
const STORE_RETRY_MAX: Duration = Duration::from_secs(2);

impl Actor for DedupActor {
    type Msg = DedupMsg;
    type State = DedupArgs;
    type Arguments = DedupArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DedupMsg>,
        args: DedupArgs,
    ) -> Result<DedupArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<DedupMsg>,
        message: DedupMsg,
        state: &mut DedupArgs,
    ) -> Result<(), ActorProcessingErr> {
        crate::ports::maybe_panic(state.ports.chaos.as_ref(), "dedup");
        let DedupMsg::Check(batch) = message;
        // A batch holds one sink's messages: it comes from one consumer.
        let Some(sink) = batch.first().map(|r| r.sink) else {
            return Ok(());
        };
        let ids: Vec<String> = batch.iter().map(|r| r.event.envelope.id.clone()).collect();
        // While the store cannot answer, wait here rather than hand the batch back: handing it
        // back would let later events of the same users overtake it. Everything behind waits
        // too, which is right: nothing can be deduplicated until the store is back.
        let mut delay = STORE_RETRY_INITIAL;
        let seen = loop {
            match state.ports.dedup.seen(sink, &ids).await {
                Ok(seen) => break seen,
                Err(error) => {
                    tracing::warn!(message = "Dedup store unavailable; retrying.", %error, retry_in_ms = delay.as_millis() as u64);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(STORE_RETRY_MAX);
                }
            }
        };
        for (routed, seen) in batch.into_iter().zip(seen) {
            if seen {
                tracing::debug!(message = "Duplicate skipped.", event_id = %routed.event.envelope.id, %sink);
                Stats::add(&state.stats.duplicates);
                Stats::add(&state.stats.acked);
                routed.incoming.ack().await;
            } else {
                state.router.cast(RouterMsg::Route(routed));
            }
        }
        Ok(())
    }
}
