//! NATS JetStream: the stream, one durable pull consumer per sink, and the event source port.

use std::sync::Arc;
use std::time::Duration;

use actors::ports::{Acker, BoxFuture, EventSource, Incoming};
use actors::{PortError, Sink};
use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::ConnectOptions;
use futures::{FutureExt, StreamExt};
use protocol::Origin;
use tokio::sync::Mutex;

use crate::config::{NatsAuth, NatsConfig};
use crate::redact;

use super::errors;

/// How often the engine tries to reach NATS while it is down at startup.
const CONNECT_RETRY: Duration = Duration::from_secs(1);

/// How often that is logged at WARN.
const CONNECT_WARN_EVERY: Duration = Duration::from_secs(5);

/// The client options of the configuration: its name, credentials and TLS, and a log line
/// naming the server (never its credentials) for each change of the connection.
pub async fn options(config: &NatsConfig, auth: &NatsAuth) -> anyhow::Result<ConnectOptions> {
    let shown = redact::url(&config.url);
    let events_url = shown.clone();
    let mut options = ConnectOptions::new()
        .name("sync-engine")
        .connection_timeout(Duration::from_secs(5))
        // Reconnect forever: an engine that gives up on NATS would need a restart.
        .max_reconnects(None)
        .event_callback(move |event| {
            let url = events_url.clone();
            async move { log_event(&url, event) }
        });
    if config.tls_required {
        options = options.require_tls(true);
    }
    let tls = config.tls_files();
    if let Some(ca_file) = tls.ca_file {
        options = options.add_root_certificates(ca_file.into());
    }
    if let (Some(cert), Some(key)) = (tls.client_cert_file, tls.client_key_file) {
        options = options.add_client_certificate(cert.into(), key.into());
    }
    options = match auth {
        NatsAuth::None => options,
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.expose().to_string())
        }
        NatsAuth::Token(token) => options.token(token.expose().to_string()),
        NatsAuth::NKey(seed) => options.nkey(seed.expose().to_string()),
        NatsAuth::Creds(path) => options
            .credentials_file(path)
            .await
            .map_err(|error| anyhow::anyhow!("nats.creds_file: cannot use {path}: {error}"))?,
    };
    Ok(options)
}

fn log_event(url: &str, event: async_nats::Event) {
    use async_nats::Event;
    match event {
        Event::Connected => tracing::info!(message = "Connected to NATS.", url),
        Event::Disconnected => {
            tracing::warn!(message = "Lost the NATS connection; reconnecting.", url)
        }
        Event::ClientError(error) => {
            tracing::warn!(message = "NATS connection error.", url, error = %redact::text(&error.to_string()))
        }
        Event::ServerError(error) => {
            tracing::warn!(message = "NATS server error.", url, error = %redact::text(&error.to_string()))
        }
        other => tracing::info!(message = "NATS connection event.", url, event = %other),
    }
}

/// Connects once, for the commands that need NATS now (publish, dlq replay, backfill,
/// reconcile): credentials come from the process environment.
pub async fn connect(config: &NatsConfig) -> anyhow::Result<async_nats::Client> {
    let auth = config
        .auth(&|var| std::env::var(var).ok())
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let options = options(config, &auth).await?;
    options
        .connect(&config.url)
        .await
        .map_err(|error| connect_error(config, &error))
}

/// The engine's connection: while NATS cannot be reached it keeps trying, with a WARN naming
/// the server every few seconds; credentials or TLS that NATS refuses end the wait at once,
/// since no retry can mend them.
pub async fn connect_until_up(
    config: &NatsConfig,
    auth: &NatsAuth,
) -> anyhow::Result<async_nats::Client> {
    let mut last_warned: Option<tokio::time::Instant> = None;
    loop {
        let options = options(config, auth).await?;
        let error = match options.connect(&config.url).await {
            Ok(client) => return Ok(client),
            Err(error) => error,
        };
        if is_fatal(&error) {
            return Err(connect_error(config, &error));
        }
        if last_warned.is_none_or(|at| at.elapsed() >= CONNECT_WARN_EVERY) {
            last_warned = Some(tokio::time::Instant::now());
            tracing::warn!(
                message = "Cannot reach NATS; retrying. /readyz answers 503 until connected.",
                url = %redact::url(&config.url),
                error = %describe(&error),
            );
        }
        tokio::time::sleep(CONNECT_RETRY).await;
    }
}

/// Refused credentials and TLS failures (a certificate that does not verify comes as an I/O
/// error): retrying the same settings cannot succeed.
fn is_fatal(error: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind as Kind;
    matches!(
        error.kind(),
        Kind::Authentication | Kind::AuthorizationViolation | Kind::Tls | Kind::ServerParse
    ) || errors::tls_cause(error).is_some()
}

fn connect_error(config: &NatsConfig, error: &async_nats::ConnectError) -> anyhow::Error {
    anyhow::anyhow!(
        "nats.url: cannot connect to NATS at {}: {}",
        redact::url(&config.url),
        describe(error)
    )
}

fn describe(error: &async_nats::ConnectError) -> String {
    errors::describe(error)
}

/// The stream holding `origin`'s events: `<nats.stream>_BETTER_AUTH` or `<nats.stream>_PAYLOAD`.
///
/// Each origin has a stream of its own so that each sink's consumer reads a whole stream with no
/// filter subject. A filtered consumer costs the server a scan per message on nats-server
/// 2.9.0–2.9.14 once its pending count is recounted mid-block (by a consumer info, or on creation
/// at a start sequence): measured at 18 ms per message, a drain of about 50 events/s for
/// minutes after a reconnection or a restart (BENCHMARKS.md, "the slow drain").
pub fn stream_name(config: &NatsConfig, origin: Origin) -> String {
    stream_name_for(&config.stream, origin)
}

/// [`stream_name`] of the base name `stream`.
pub fn stream_name_for(stream: &str, origin: Origin) -> String {
    let suffix = match origin {
        Origin::BetterAuth => "BETTER_AUTH",
        Origin::Payload => "PAYLOAD",
    };
    format!("{stream}_{suffix}")
}

/// The subjects `origin` publishes on, which its stream captures.
pub fn origin_subjects(config: &NatsConfig, origin: Origin) -> &[String] {
    match origin {
        Origin::BetterAuth => &config.better_auth_subjects,
        Origin::Payload => &config.payload_subjects,
    }
}

/// The stream holding `origin`'s events of partition `part` (`None`: unpartitioned):
/// `<stream>_<ORIGIN>_P<n>`.
pub fn part_stream_name(config: &NatsConfig, origin: Origin, part: Option<u32>) -> String {
    match part {
        None => stream_name(config, origin),
        Some(p) => format!("{}_P{p}", stream_name(config, origin)),
    }
}

/// The subjects the stream of `origin`'s partition `part` captures: the ones the server's
/// mapping makes, `<prefix>.<type>.<token>.<part>`, one per event type, so that nothing else
/// the mapping carries (the engine's probe) lands in the stream.
fn part_subjects(config: &NatsConfig, origin: Origin, part: Option<u32>) -> Vec<String> {
    let subjects = origin_subjects(config, origin);
    let (Some(p), Some(prefix)) = (part, crate::config::partition_prefix(subjects)) else {
        return subjects.to_vec();
    };
    protocol::EventType::ALL
        .iter()
        .map(|t| format!("{prefix}.{}.*.{p}", t.verb()))
        .collect()
}

/// The engine's two streams, one per origin.
#[derive(Clone)]
pub struct Streams {
    better_auth: stream::Stream,
    payload: stream::Stream,
}

impl Streams {
    /// The stream holding `origin`'s events.
    pub fn of(&self, origin: Origin) -> &stream::Stream {
        match origin {
            Origin::BetterAuth => &self.better_auth,
            Origin::Payload => &self.payload,
        }
    }
}

/// Creates each origin's stream if missing; an existing one must capture exactly its origin's
/// subjects.
pub async fn ensure_streams(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> anyhow::Result<Streams> {
    ensure_part_streams(js, config, None).await
}

/// [`ensure_streams`] of partition `part` (`None`: unpartitioned).
pub async fn ensure_part_streams(
    js: &jetstream::Context,
    config: &NatsConfig,
    part: Option<u32>,
) -> anyhow::Result<Streams> {
    Ok(Streams {
        better_auth: ensure_stream(js, config, Origin::BetterAuth, part).await?,
        payload: ensure_stream(js, config, Origin::Payload, part).await?,
    })
}

async fn ensure_stream(
    js: &jetstream::Context,
    config: &NatsConfig,
    origin: Origin,
    part: Option<u32>,
) -> anyhow::Result<stream::Stream> {
    let name = part_stream_name(config, origin, part);
    let wanted = part_subjects(config, origin, part);
    let Ok(mut existing) = js.get_stream(&name).await else {
        return create_stream(js, config, name, wanted).await;
    };
    let info = existing
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read stream {name}: {e}"))?;
    let have = info.config.subjects.clone();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|w| !have.iter().any(|h| subject_covers(h, w)))
        .collect();
    let extra: Vec<&String> = have
        .iter()
        .filter(|h| !wanted.iter().any(|w| subject_covers(w, h)))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        anyhow::bail!(
            "stream {name} exists with subjects {have:?}, but it must capture exactly {wanted:?} \
             (missing {missing:?}, extra {extra:?}); fix nats.stream, the subjects, \
             cluster.partitions or the stream"
        );
    }
    Ok(existing)
}

/// Every stream of the configured layout: the unpartitioned pair, or each partition's (for
/// the commands that publish: whichever engine holds a partition, its streams exist).
pub async fn ensure_layout_streams(
    js: &jetstream::Context,
    config: &crate::config::Config,
) -> anyhow::Result<()> {
    if config.cluster.partitions == 0 {
        ensure_streams(js, &config.nats).await?;
    }
    for part in 0..config.cluster.partitions {
        ensure_part_streams(js, &config.nats, Some(part)).await?;
    }
    Ok(())
}

async fn create_stream(
    js: &jetstream::Context,
    config: &NatsConfig,
    name: String,
    subjects: Vec<String>,
) -> anyhow::Result<stream::Stream> {
    let created = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: subjects.clone(),
            storage: stream::StorageType::File,
            // Publishers set Nats-Msg-Id; JetStream drops their retries within this window.
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await;
    match created {
        Ok(stream) => Ok(stream),
        Err(e) => {
            // The layout before each origin had its own stream: one stream named nats.stream.
            let hint = match js.get_stream(&config.stream).await {
                Ok(_) => format!(
                    "; stream {} holds both applications' events (the earlier layout): let an \
                     earlier engine drain it, then delete it",
                    config.stream
                ),
                Err(_) => " (another stream may already capture them)".to_string(),
            };
            Err(anyhow::anyhow!(
                "cannot create stream {name} with subjects {subjects:?}: {e}{hint}"
            ))
        }
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

/// The durable consumer name `<prefix>-<name>` of the unpartitioned streams, or
/// `<prefix>-<name>-p<part>` of a partition's (a lease holder adds `-t<token>`).
pub fn part_consumer_name(prefix: &str, name: &str, part: Option<u32>) -> String {
    match part {
        None => format!("{prefix}-{name}"),
        Some(p) => format!("{prefix}-{name}-p{p}"),
    }
}

/// Creates (or finds) the durable pull consumer of `sink`, reading its source's whole stream.
pub async fn ensure_consumer(
    streams: &Streams,
    config: &NatsConfig,
    sink: Sink,
    max_ack_pending: usize,
) -> anyhow::Result<consumer::PullConsumer> {
    let name = consumer_name(&config.durable_prefix, sink);
    ensure_named_consumer(streams.of(sink.source()), config, name, max_ack_pending).await
}

/// The users mirror's durable consumer, `<prefix>-mirror`, on Better Auth's stream.
pub async fn ensure_mirror_consumer(
    streams: &Streams,
    config: &NatsConfig,
    max_ack_pending: usize,
) -> anyhow::Result<consumer::PullConsumer> {
    let name = format!("{}-mirror", config.durable_prefix);
    let stream = streams.of(Origin::BetterAuth);
    ensure_named_consumer(stream, config, name, max_ack_pending).await
}

/// Creates (or finds) the durable consumer `name`; one that an earlier run left holding
/// messages is made again at its ack floor.
pub async fn ensure_named_consumer(
    stream: &stream::Stream,
    config: &NatsConfig,
    name: String,
    max_ack_pending: usize,
) -> anyhow::Result<consumer::PullConsumer> {
    let consumer_config = consumer_config(config, &name, max_ack_pending);
    let mut consumer = stream
        .get_or_create_consumer(&name, consumer_config.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot create consumer {name}: {e}"))?;
    let info = consumer
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read consumer {name}: {e}"))?
        .clone();
    if info.num_ack_pending == 0 {
        return Ok(consumer);
    }
    recreate_at_ack_floor(stream, consumer_config, &info).await
}

/// No filter subject: the consumer reads its origin's whole stream (see [`stream_name`]).
fn consumer_config(
    config: &NatsConfig,
    name: &str,
    max_ack_pending: usize,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_string()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: config.max_deliver,
        max_ack_pending: max_ack_pending as i64,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

/// An earlier run died holding messages unacknowledged: they would come back only after
/// `ack_wait`, and anything read meanwhile could overtake them. The consumer is made again at
/// its ack floor instead, so every message not yet acknowledged comes back at once, in stream
/// order; what was already done is dropped by dedup and the state machine.
async fn recreate_at_ack_floor(
    stream: &stream::Stream,
    mut consumer_config: consumer::pull::Config,
    info: &consumer::Info,
) -> anyhow::Result<consumer::PullConsumer> {
    let name = info.name.clone();
    let start_sequence = info.ack_floor.stream_sequence + 1;
    tracing::warn!(
        message = "Messages of an earlier run are unacknowledged; the consumer starts again at its ack floor so they come back at once, in order.",
        consumer = %name,
        n_pending = info.num_ack_pending,
        start_sequence,
    );
    consumer_config.deliver_policy = consumer::DeliverPolicy::ByStartSequence { start_sequence };
    stream
        .delete_consumer(&name)
        .await
        .map_err(|e| anyhow::anyhow!("cannot delete consumer {name} to recover it: {e}"))?;
    stream
        .create_consumer(consumer_config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot recreate consumer {name} at its ack floor: {e}"))
}

/// The verb of the engine's mapping probe: mapped like any event, captured by no stream.
const PROBE_VERB: &str = "sync-engine-probe";
/// Probes per origin: enough that a server mapping to another number of partitions gives
/// itself away (every probe's partition is checked against the engine's own).
const PROBES: usize = 64;

/// The server's `mappings` block for `partitions` partitions: each origin's
/// `<prefix>.<type>.<token>` gets the partition of its token as a fourth token.
pub fn mapping_config(config: &NatsConfig, partitions: u32) -> String {
    let mut text = String::from("mappings = {\n");
    for origin in Origin::ALL {
        if let Some(prefix) = crate::config::partition_prefix(origin_subjects(config, origin)) {
            text.push_str(&format!(
                "  \"{prefix}.*.*\": \"{prefix}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({partitions},2)}}}}\"\n"
            ));
        }
    }
    text.push('}');
    text
}

/// Checks that the server maps each origin's subjects to `partitions` partitions as the engine
/// computes them (PROTOCOL.md §1, *Partitions*): a probe per token through core NATS, which
/// the mapping rewrites and no stream captures.
pub async fn check_mapping(
    client: &async_nats::Client,
    config: &NatsConfig,
    partitions: u32,
) -> anyhow::Result<()> {
    let fix = || {
        format!(
            "the NATS server must map the subjects to cluster.partitions = {partitions}; its configuration needs\n{}",
            mapping_config(config, partitions)
        )
    };
    for origin in Origin::ALL {
        let Some(prefix) = crate::config::partition_prefix(origin_subjects(config, origin)) else {
            anyhow::bail!("{origin:?}'s subjects cannot be partitioned");
        };
        let mut probes = client
            .subscribe(format!("{prefix}.{PROBE_VERB}.>"))
            .await
            .map_err(|e| anyhow::anyhow!("cannot subscribe to the mapping probe: {e}"))?;
        for i in 0..PROBES {
            let subject = format!("{prefix}.{PROBE_VERB}.probe{i}");
            client
                .publish(subject, bytes::Bytes::new())
                .await
                .map_err(|e| anyhow::anyhow!("cannot publish the mapping probe: {e}"))?;
        }
        client
            .flush()
            .await
            .map_err(|e| anyhow::anyhow!("cannot flush the probe: {e}"))?;
        for _ in 0..PROBES {
            let Ok(Some(probe)) = tokio::time::timeout(Duration::from_secs(2), probes.next()).await
            else {
                anyhow::bail!("the mapping probe on {prefix} got no answer; {}", fix());
            };
            let tokens: Vec<&str> = probe.subject.split('.').collect();
            let (Some(token), Some(got)) = (tokens.iter().rev().nth(1), tokens.last()) else {
                anyhow::bail!("unexpected probe subject {}", probe.subject);
            };
            if tokens.len() != prefix.split('.').count() + 3 {
                anyhow::bail!("{} is not mapped to a partition; {}", probe.subject, fix());
            }
            let want = protocol::partition::partition_of(token, partitions).to_string();
            if *got != want {
                anyhow::bail!(
                    "the server maps {prefix}.{PROBE_VERB}.{token} to partition {got}, the engine to {want}; {}",
                    fix()
                );
            }
        }
    }
    Ok(())
}

/// The durable consumer of a lease holder: `<base>-t<token>`. A new holder reads from a consumer
/// of its own name, never from its predecessor's, so an engine that lost its lease and has not
/// noticed yet can pull nothing more: its pull requests name a consumer that no longer exists.
pub fn leased_consumer_name(base: &str, token: i64) -> String {
    format!("{base}-t{token}")
}

/// Takes over the consumer `base` of a leased partition under `token`: the earlier holders'
/// consumers (`base`, `base-t<n>`) are deleted, and the new one starts at the lowest of their
/// ack floors, so every message they left unacknowledged comes back at once, in stream order
/// (the same recovery as after a crash; what was done already is dropped by the state).
pub async fn take_over_consumer(
    stream: &stream::Stream,
    config: &NatsConfig,
    base: &str,
    token: i64,
    max_ack_pending: usize,
) -> anyhow::Result<consumer::PullConsumer> {
    let name = leased_consumer_name(base, token);
    let mut start: Option<u64> = None;
    let mut names = stream.consumer_names();
    let mut earlier = Vec::new();
    let leased = format!("{base}-t");
    while let Some(found) = names.next().await {
        let found =
            found.map_err(|e| anyhow::anyhow!("cannot list the consumers of {base}: {e}"))?;
        if found == base || found.strip_prefix(&leased).is_some_and(is_digits) {
            earlier.push(found);
        }
    }
    for found in earlier {
        let info: consumer::Info = stream
            .consumer_info(&found)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read consumer {found}: {e}"))?;
        let floor = info.ack_floor.stream_sequence + 1;
        start = Some(start.map_or(floor, |s| s.min(floor)));
        stream
            .delete_consumer(&found)
            .await
            .map_err(|e| anyhow::anyhow!("cannot delete consumer {found} to take it over: {e}"))?;
    }
    let mut consumer_config = consumer_config(config, &name, max_ack_pending);
    if let Some(start_sequence) = start {
        consumer_config.deliver_policy =
            consumer::DeliverPolicy::ByStartSequence { start_sequence };
    }
    tracing::debug!(message = "Consumer taken over.", consumer = %name, start_sequence = ?start);
    stream
        .create_consumer(consumer_config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create consumer {name}: {e}"))
}

fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
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
    // Read before `split`, which moves the reply subject into the acker.
    let reply = message
        .reply
        .as_ref()
        .map(|r| r.to_string())
        .unwrap_or_default();
    let (message, acker) = message.split();
    Incoming::from_jetstream(
        message.subject.to_string(),
        message.payload,
        &reply,
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
}
