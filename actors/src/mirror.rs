//! The mirror actor: keeps a PostgreSQL users table (a backend's own) in step with Better
//! Auth's events, through its own durable consumer.
//!
//! It is a sink of its own: its consumer reads Better Auth's subjects in stream order, so one
//! user's changes arrive in order, and an outage of the mirror database never holds back the
//! webhook sinks. Each message is applied and only then acknowledged. The table itself makes
//! the writes idempotent and ordered: a row remembers the `(timestamp, event id)` of the event
//! that last wrote it, and an event that is not newer changes nothing, so a replay, a
//! redelivery or an older event that arrives late is a no-op (see [`MirrorStore`]).

use std::sync::Arc;
use std::time::Duration;

use protocol::user::Event;
use protocol::{EventType, Origin};
use ractor::{Actor, ActorProcessingErr, ActorRef};

pub use crate::mirror_change::{MirrorChange, MirrorChangeKind, MirrorOutcome};
use crate::ports::{EventSource, Incoming, MirrorStore, Ports};
use crate::settings::PipelineSettings;
use crate::stats::Stats;

#[derive(Debug)]
pub enum MirrorMsg {
    /// Read and apply the next batch.
    Poll,
    /// Stop reading (shutdown).
    Pause,
}

pub struct MirrorArgs {
    pub source: Arc<dyn EventSource>,
    pub store: Arc<dyn MirrorStore>,
    pub ports: Ports,
    pub settings: Arc<PipelineSettings>,
    pub stats: Arc<Stats>,
    pub default_organization_id: String,
}

pub struct MirrorState {
    args: MirrorArgs,
    paused: bool,
}

#[derive(Debug, Default)]
pub struct MirrorActor;

/// How long one read waits for messages.
const POLL_WAIT: Duration = Duration::from_secs(1);
/// Pause after a failed read or write, so a down database is not hammered.
const RETRY_DELAY: Duration = Duration::from_millis(500);

impl Actor for MirrorActor {
    type Msg = MirrorMsg;
    type State = MirrorState;
    type Arguments = MirrorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MirrorMsg>,
        args: MirrorArgs,
    ) -> Result<MirrorState, ActorProcessingErr> {
        myself.cast(MirrorMsg::Poll)?;
        Ok(MirrorState {
            args,
            paused: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<MirrorMsg>,
        message: MirrorMsg,
        state: &mut MirrorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MirrorMsg::Pause => state.paused = true,
            MirrorMsg::Poll if state.paused => {}
            MirrorMsg::Poll => {
                let args = &state.args;
                let batch = match args
                    .source
                    .next_batch(args.settings.fetch_batch, POLL_WAIT)
                    .await
                {
                    Ok(batch) => batch,
                    Err(error) => {
                        tracing::warn!(message = "Reading the mirror consumer failed; retrying.", %error);
                        myself.send_after(RETRY_DELAY, || MirrorMsg::Poll);
                        return Ok(());
                    }
                };
                let mut batch = batch.into_iter();
                for incoming in batch.by_ref() {
                    if let Err(error) = apply_one(args, incoming).await {
                        // The rest of the batch goes back unsettled with it (dropping a
                        // message naks it), to come again once the database answers.
                        tracing::warn!(message = "Mirror write failed; retrying.", %error);
                        break;
                    }
                }
                let n_returned = batch.count();
                if n_returned > 0 {
                    tracing::debug!(message = "Mirror batch handed back.", n_returned);
                }
                myself.send_after(
                    if n_returned > 0 {
                        RETRY_DELAY
                    } else {
                        Duration::ZERO
                    },
                    || MirrorMsg::Poll,
                );
            }
        }
        Ok(())
    }
}

/// Applies one message and settles it. An error means it was handed back unsettled.
async fn apply_one(args: &MirrorArgs, incoming: Incoming) -> Result<(), crate::PortError> {
    let stats = &args.stats;
    let event = match Event::parse(
        &incoming.payload,
        args.settings.max_message_bytes,
        &args.settings.mappings,
    ) {
        Ok(event) => event,
        Err(bad) => {
            // The same message reaches the Payload sink's ingestion, which stores it as the
            // dead letter (one per message, so a replay republishes it once).
            tracing::debug!(message = "Bad event skipped by the mirror.", subject = %incoming.subject, reason = %bad.reason());
            Stats::add(&stats.acked);
            incoming.ack().await;
            return Ok(());
        }
    };
    let change = (event.envelope.origin == Origin::BetterAuth)
        .then(|| MirrorChange::from_event(&event, &args.default_organization_id))
        .flatten();
    let Some(change) = change else {
        // A resync request is no change, and not mirrored either.
        if event.envelope.event_type == EventType::Resync {
            incoming.ack().await;
            return Ok(());
        }
        // Not Better Auth's user (a Payload event on Better Auth's subjects): not mirrored.
        Stats::add(&stats.skipped_unlinked);
        incoming.ack().await;
        return Ok(());
    };
    match args.store.apply(&change).await? {
        MirrorOutcome::Applied => Stats::add(&stats.mirror_applied),
        MirrorOutcome::Stale => Stats::add(&stats.mirror_stale),
        MirrorOutcome::AppliedWithoutEmail => {
            Stats::add(&stats.mirror_applied);
            Stats::add(&stats.mirror_email_conflicts);
            tracing::warn!(message = "Mirror row written without its email: a newer row holds it.", user = %change.auth_id, event_id = %change.event_id);
        }
    }
    Stats::add(&stats.acked);
    incoming.ack().await;
    Ok(())
}
