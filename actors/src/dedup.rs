//! The deduplication actor: drops events whose id their sink already accepted.
//!
//! One store round trip per batch. Ids are only *read* here; the user actor marks an id once
//! its sink accepted the event (§5.2), so a failed delivery never counts as processed.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::ingest::Routed;
use crate::ports::Ports;
use crate::router::RouterMsg;
use crate::slot::Slot;
use crate::stats::Stats;

#[derive(Debug)]
pub enum DedupMsg {
    Check(Vec<Routed>),
}

pub struct DedupArgs {
    pub ports: Ports,
    pub router: Slot<RouterMsg>,
    pub stats: Arc<Stats>,
}

#[derive(Debug, Default)]
pub struct DedupActor;

/// When the dedup store cannot answer, the batch goes back to the source for this long rather
/// than risk delivering duplicates.
const STORE_DOWN_DELAY: Duration = Duration::from_secs(1);

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
        match state.ports.dedup.seen(sink, &ids).await {
            Ok(seen) => {
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
            }
            Err(error) => {
                tracing::warn!(message = "Dedup store unavailable; handing the batch back.", %error);
                for routed in batch {
                    routed.incoming.nak(STORE_DOWN_DELAY).await;
                }
            }
        }
        Ok(())
    }
}
