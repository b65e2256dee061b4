//! The ingestion actor: one per sink, reading that sink's durable consumer.
//!
//! It validates each message (a bad one becomes a dead letter and is acknowledged, §4), skips
//! Payload users not linked to Better Auth, and hands the rest to the deduplication actor in
//! batches. Each message takes a unit of `max_in_flight` before it is read further; when none
//! is free the actor waits, and so does the consumer: that is the engine's backpressure.

use std::sync::Arc;
use std::time::Duration;

use protocol::user::Event;
use protocol::Origin;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Semaphore;

use crate::messages::DedupMsg;
pub use crate::messages::Routed;
use crate::ports::{DeadLetter, EventSource, Incoming, Ports};
use crate::settings::PipelineSettings;
use crate::sink::Sink;
use crate::slot::Slot;
use crate::stats::Stats;

#[derive(Debug)]
pub enum IngestMsg {
    /// Read the next batch.
    Poll,
    /// Stop reading (shutdown); messages already read go on.
    Pause,
}

pub struct IngestArgs {
    pub sink: Sink,
    pub source: Arc<dyn EventSource>,
    pub permits: Arc<Semaphore>,
    pub dedup: Slot<DedupMsg>,
    pub ports: Ports,
    pub settings: Arc<PipelineSettings>,
    pub stats: Arc<Stats>,
}

pub struct IngestState {
    args: IngestArgs,
    paused: bool,
}

#[derive(Debug, Default)]
pub struct IngestActor;

/// How long one read waits for messages before it polls again.
const POLL_WAIT: Duration = Duration::from_secs(1);
/// Pause after a failed read, so a down server is not hammered.
const READ_RETRY_DELAY: Duration = Duration::from_millis(500);

impl Actor for IngestActor {
    type Msg = IngestMsg;
    type State = IngestState;
    type Arguments = IngestArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<IngestMsg>,
        args: IngestArgs,
    ) -> Result<IngestState, ActorProcessingErr> {
        myself.cast(IngestMsg::Poll)?;
        Ok(IngestState {
            args,
            paused: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<IngestMsg>,
        message: IngestMsg,
        state: &mut IngestState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            IngestMsg::Pause => state.paused = true,
            IngestMsg::Poll if state.paused => {}
            IngestMsg::Poll => {
                crate::ports::maybe_panic(state.args.ports.chaos.as_ref(), "ingest");
                let args = &state.args;
                match args
                    .source
                    .next_batch(args.settings.fetch_batch, POLL_WAIT)
                    .await
                {
                    Ok(batch) => {
                        let routed = ingest_batch(args, batch).await;
                        if !routed.is_empty() {
                            args.dedup.cast(DedupMsg::Check(routed));
                        }
                        myself.cast(IngestMsg::Poll)?;
                    }
                    Err(error) => {
                        tracing::warn!(message = "Reading the consumer failed; retrying.", sink = %args.sink, %error);
                        myself.send_after(READ_RETRY_DELAY, || IngestMsg::Poll);
                    }
                }
            }
        }
        Ok(())
    }
}

async fn ingest_batch(args: &IngestArgs, batch: Vec<Incoming>) -> Vec<Routed> {
    let mut routed = Vec::with_capacity(batch.len());
    for incoming in batch {
        let Ok(permit) = args.permits.clone().acquire_owned().await else {
            // The semaphore is never closed; a message we cannot hold goes back to the source.
            continue;
        };
        let incoming = incoming.with_permit(permit);
        if args.settings.faults.ack_before_durable {
            // The broken variant (see `EngineFaults`): settle now, whatever happens next.
            incoming.ack_early().await;
        }
        if args
            .settings
            .max_deliver
            .is_some_and(|max| incoming.delivered >= max)
        {
            // The source will not deliver it again: kept as a dead letter, never dropped.
            let error = format!(
                "delivered {} times (nats.max_deliver); dead-lettered to be replayed",
                incoming.delivered
            );
            let sink = Some(args.sink);
            dead_letter(args, incoming, "max_deliver".into(), sink, Some(error)).await;
            continue;
        }
        match Event::parse(
            &incoming.payload,
            args.settings.max_message_bytes,
            &args.settings.mappings,
        ) {
            Err(bad) => dead_letter(args, incoming, bad.reason(), None, None).await,
            Ok(event) => {
                Stats::add(match event.envelope.origin {
                    Origin::BetterAuth => &args.stats.received_better_auth,
                    Origin::Payload => &args.stats.received_payload,
                });
                if event.key.is_none() {
                    Stats::add(&args.stats.skipped_unlinked);
                    Stats::add(&args.stats.acked);
                    incoming.ack().await;
                    continue;
                }
                routed.push(Routed {
                    sink: args.sink,
                    event,
                    incoming,
                });
            }
        }
    }
    routed
}

/// Stores the message as a dead letter, then acknowledges it; if the store fails, the source
/// keeps it and tries again.
async fn dead_letter(
    args: &IngestArgs,
    incoming: Incoming,
    reason: String,
    sink: Option<Sink>,
    last_error: Option<String>,
) {
    let letter = DeadLetter {
        subject: incoming.subject.clone(),
        raw: incoming.payload.clone(),
        reason: reason.clone(),
        event_id: salvage_event_id(&incoming.payload),
        sink: sink.map(|s| s.as_str().to_string()),
        attempts: 0,
        last_error,
        received_at_ms: args.ports.clock.now_ms(),
    };
    tracing::warn!(message = "Event dead-lettered.", subject = %incoming.subject, %reason);
    match args.ports.store.dead_letter(letter).await {
        Ok(()) => {
            args.stats
                .dead_letters
                .add(&[reason.as_str(), args.sink.as_str()]);
            Stats::add(&args.stats.acked);
            incoming.ack().await;
        }
        Err(error) => {
            tracing::warn!(message = "Storing a dead letter failed.", %error);
            incoming.nak(READ_RETRY_DELAY).await;
        }
    }
}

/// The id of a bad message, when it has a usable one, so a dead letter can be found by it.
fn salvage_event_id(payload: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let id = value.get("id")?.as_str()?;
    protocol::envelope::is_valid_event_id(id).then(|| id.to_string())
}
