//! `sync-engine publish`: one well-formed event, for trying the engine by hand.

use std::process::ExitCode;

use protocol::{Envelope, EventType, Origin};
use serde_json::{Map, Value};

use crate::cli::PublishArgs;
use crate::config::Config;

use super::{config_path, runtime};

pub fn run(args: &PublishArgs) -> anyhow::Result<ExitCode> {
    // Publishing needs NATS only: no secret has to be set for it.
    let config = Config::load(config_path(&args.config).as_deref(), std::env::vars())?;
    let origin =
        Origin::parse(&args.origin).ok_or_else(|| anyhow::anyhow!("--origin {:?}", args.origin))?;
    let event_type = EventType::parse(&args.event_type)
        .ok_or_else(|| anyhow::anyhow!("--type {:?}", args.event_type))?;
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if !protocol::envelope::is_valid_event_id(&id) {
        anyhow::bail!("--id {id:?}: 1-128 characters of A-Za-z0-9_:- (no dots)");
    }
    let mapping = match origin {
        Origin::BetterAuth => config.targets.better_auth.mapping(),
        Origin::Payload => config.targets.payload.mapping(),
    };
    let mut canonical = protocol::user::CanonicalFields::new();
    canonical.insert(protocol::user::ID.into(), Value::String(args.user.clone()));
    if let Some(email) = &args.email {
        canonical.insert(protocol::user::EMAIL.into(), Value::String(email.clone()));
    }
    if let Some(name) = &args.name {
        canonical.insert(protocol::user::NAME.into(), Value::String(name.clone()));
    }
    let data: Map<String, Value> = mapping.from_canonical(&canonical);
    let envelope = Envelope {
        id: id.clone(),
        origin,
        event_type,
        timestamp: args
            .timestamp
            .unwrap_or_else(crate::adapters::clock::now_ms),
        data,
    };
    // Check it the way the engine will, so a manual event is never a dead letter by mistake.
    protocol::user::Event::parse(&envelope.to_bytes(), usize::MAX, &config.mappings()).map_err(
        |bad| {
            anyhow::anyhow!(
                "the event would be rejected: {bad} (add --email for Better Auth writes)"
            )
        },
    )?;
    let subject = subject_for(&config, origin, event_type, &args.user);
    runtime()?.block_on(async {
        let client = crate::adapters::nats::connect(&config.nats).await?;
        let js = async_nats::jetstream::new(client);
        crate::adapters::nats::ensure_layout_streams(&js, &config).await?;
        publish(&js, &subject, &id, envelope.to_bytes()).await
    })?;
    println!("published {id} to {subject}");
    Ok(ExitCode::SUCCESS)
}

/// The subject an application publishes `event_type` of `user` on: [`subject_base`] followed by
/// the user's token (PROTOCOL.md §1, *Partitions*), as the plugins do.
pub fn subject_for(config: &Config, origin: Origin, event_type: EventType, user: &str) -> String {
    let base = subject_base(config, origin, event_type);
    format!("{base}.{}", protocol::partition::subject_token(user))
}

/// The first configured subject of `origin`, `>` replaced by `created|updated|deleted|resync`.
pub fn subject_base(config: &Config, origin: Origin, event_type: EventType) -> String {
    let patterns = match origin {
        Origin::BetterAuth => &config.nats.better_auth_subjects,
        Origin::Payload => &config.nats.payload_subjects,
    };
    let base = patterns
        .first()
        .map(|p| p.trim_end_matches(".>").trim_end_matches(".*"))
        .unwrap_or("user");
    let verb = event_type.verb();
    format!("{base}.{verb}")
}

/// Publishes with `Nats-Msg-Id` and waits for JetStream's acknowledgement.
pub async fn publish(
    js: &async_nats::jetstream::Context,
    subject: &str,
    msg_id: &str,
    body: impl Into<bytes::Bytes>,
) -> anyhow::Result<()> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    js.publish_with_headers(subject.to_string(), headers, body.into())
        .await
        .map_err(|e| anyhow::anyhow!("publish to {subject} failed: {e}"))?
        .await
        .map_err(|e| anyhow::anyhow!("JetStream did not store the event on {subject}: {e}"))?;
    Ok(())
}
