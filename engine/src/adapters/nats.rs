//! NATS JetStream: the stream, one durable pull consumer per sink, and the event source port.

use std::sync::Arc;
use std::time::Duration;

use actors::ports::{Acker, BoxFuture, EventSource, Incoming};
use actors::{PortError, Sink};
use async_nats::jetstream::{self, consumer, stream, AckKind};
use futures::{FutureExt, StreamExt};
use tokio::sync::Mutex;

use crate::config::NatsConfig;

/// Connects to NATS, naming the server in the error but nothing else of the URL.
pub async fn connect(config: &NatsConfig) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("sync-engine")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .connect(&config.url)
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "cannot connect to NATS at {}: {error}",
                redact_url(&config.url)
            )
        })
}

/// `nats://user:pass@host` → `nats://host`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Every subject the stream must capture.
pub fn stream_subjects(config: &NatsConfig) -> Vec<String> {
    let mut subjects = config.better_auth_subjects.clone();
    subjects.extend(config.payload_subjects.iter().cloned());
    subjects
}

/// Creates the stream if missing; an existing stream must already capture our subjects.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> anyhow::Result<stream::Stream> {
    let wanted = stream_subjects(config);
    match js.get_stream(&config.stream).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| anyhow::anyhow!("cannot read stream {}: {e}", config.stream))?;
            let have = info.config.subjects.clone();
            let missing: Vec<&String> = wanted
                .iter()
                .filter(|w| !have.iter().any(|h| subject_covers(h, w)))
                .collect();
            if !missing.is_empty() {
                anyhow::bail!(
                    "stream {} exists with subjects {:?}, which do not capture {:?}; fix nats.stream or the stream's subjects",
                    config.stream,
                    have,
                    missing
                );
            }
            Ok(existing)
        }
        Err(_) => js
            .create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: wanted.clone(),
                storage: stream::StorageType::File,
                // Publishers set Nats-Msg-Id; JetStream drops their retries within this window.
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot create stream {} with subjects {:?}: {e} (another stream may already capture them)",
                    config.stream,
                    wanted
                )
            }),
    }
}

/// Whether subject pattern `have` captures every subject `want` does.
pub fn subject_covers(have: &str, want: &str) -> bool {
    let have: Vec<&str> = have.split('.').collect();
    let want: Vec<&str> = want.split('.').collect();
    for (i, token) in have.iter().enumerate() {
        match *token {
            ">" => return want.len() > i,
            "*" => {
                if want.get(i).is_none_or(|w| *w == ">") {
                    return false;
                }
            }
            literal => {
                if want.get(i) != Some(&literal) {
                    return false;
                }
            }
        }
    }
    have.len() == want.len()
}

/// The durable consumer name of a sink.
pub fn consumer_name(prefix: &str, sink: Sink) -> String {
    format!("{prefix}-{}", sink.as_str())
}

/// Creates (or finds) the durable pull consumer of `sink`, reading its source's subjects.
pub async fn ensure_consumer(
    stream: &stream::Stream,
    config: &NatsConfig,
    sink: Sink,
    max_ack_pending: usize,
) -> anyhow::Result<consumer::PullConsumer> {
    let name = consumer_name(&config.durable_prefix, sink);
    let subjects = match sink.source() {
        protocol::Origin::BetterAuth => &config.better_auth_subjects,
        protocol::Origin::Payload => &config.payload_subjects,
    };
    ensure_named_consumer(stream, config, name, subjects, max_ack_pending).await
}

/// The users mirror's durable consumer, `<prefix>-mirror`, on Better Auth's subjects.
pub async fn ensure_mirror_consumer(
    stream: &stream::Stream,
    config: &NatsConfig,
    max_ack_pending: usize,
) -> anyhow::Result<consumer::PullConsumer> {
    let name = format!("{}-mirror", config.durable_prefix);
    ensure_named_consumer(
        stream,
        config,
        name,
        &config.better_auth_subjects,
        max_ack_pending,
    )
    .await
}

async fn ensure_named_consumer(
    stream: &stream::Stream,
    config: &NatsConfig,
    name: String,
    subjects: &[String],
    max_ack_pending: usize,
) -> anyhow::Result<consumer::PullConsumer> {
    let (filter_subject, filter_subjects) = match subjects {
        [one] => (one.clone(), Vec::new()),
        // Several filter subjects need NATS 2.10; the server says so if it is older.
        many => (String::new(), many.to_vec()),
    };
    let consumer_config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        filter_subject,
        filter_subjects,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: config.max_deliver,
        max_ack_pending: max_ack_pending as i64,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&name, consumer_config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create consumer {name} on {subjects:?}: {e}"))
}

/// The event source of one sink: a continuous pull from its durable consumer.
pub struct NatsSource {
    messages: Mutex<consumer::pull::Stream>,
}

impl NatsSource {
    pub async fn new(consumer: &consumer::PullConsumer, batch: usize) -> anyhow::Result<Self> {
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("cannot start pulling: {e}"))?;
        Ok(NatsSource {
            messages: Mutex::new(messages),
        })
    }
}

struct NatsAcker(jetstream::message::Acker);

impl Acker for NatsAcker {
    fn ack(&self) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async move {
            self.0
                .ack()
                .await
                .map_err(|e| PortError::unavailable("nats", e))
        })
    }

    fn nak(&self, delay: Duration) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async move {
            let delay = (!delay.is_zero()).then_some(delay);
            self.0
                .ack_with(AckKind::Nak(delay))
                .await
                .map_err(|e| PortError::unavailable("nats", e))
        })
    }

    fn progress(&self) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async move {
            self.0
                .ack_with(AckKind::Progress)
                .await
                .map_err(|e| PortError::unavailable("nats", e))
        })
    }
}

fn to_incoming(message: jetstream::Message) -> Incoming {
    let delivered = message
        .info()
        .map(|i| i.delivered.max(1) as u64)
        .unwrap_or(1);
    let (message, acker) = message.split();
    Incoming::new(
        message.subject.to_string(),
        message.payload,
        delivered,
        Arc::new(NatsAcker(acker)),
    )
}

impl EventSource for NatsSource {
    fn next_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Incoming>, PortError>> {
        Box::pin(async move {
            let mut messages = self.messages.lock().await;
            let first = match tokio::time::timeout(wait, messages.next()).await {
                Err(_) => return Ok(Vec::new()),
                Ok(None) => {
                    return Err(PortError::unavailable("nats", "the consumer stream ended"))
                }
                Ok(Some(Err(error))) => return Err(PortError::unavailable("nats", error)),
                Ok(Some(Ok(message))) => message,
            };
            let mut batch = vec![to_incoming(first)];
            while batch.len() < max {
                match messages.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.push(to_incoming(message)),
                    Some(Some(Err(error))) => {
                        tracing::debug!(message = "Pull status while batching.", %error);
                        break;
                    }
                    _ => break,
                }
            }
            Ok(batch)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_coverage() {
        assert!(subject_covers("user.>", "user.>"));
        assert!(subject_covers(">", "payload.user.>"));
        assert!(subject_covers("user.>", "user.updated"));
        assert!(!subject_covers("user.*", "user.>"));
        assert!(!subject_covers("user.updated", "user.>"));
        assert!(!subject_covers("payload.user.>", "user.>"));
    }

    #[test]
    fn urls_lose_credentials() {
        assert_eq!(redact_url("nats://u:p@host:4222"), "nats://host:4222");
        assert_eq!(redact_url("nats://host:4222"), "nats://host:4222");
    }
}
