//! `sync-engine backfill`: one `user.created` event for every user already in Better Auth.
//!
//! The engine only learns about users through events, so users created before Better Auth
//! published to NATS would never reach Payload. Backfill reads Better Auth's user table a page
//! at a time in key order and publishes with bounded concurrency. It runs once per source:
//! each user's event id is derived from the user id (JetStream drops a republished one within
//! its duplicate window, the engine's dedup after that), and a checkpoint in a JetStream
//! stream (the last user id whose event JetStream acknowledged, in key order) lets an
//! interrupted run resume and a finished one publish nothing on a second run.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use protocol::{Envelope, EventType, Origin};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::adapters::user_tables::{
    iso_ms, now_ms, BetterAuthColumns, BetterAuthUser, UserDb, PAGE_ROWS,
};
use crate::cli::BackfillArgs;
use crate::config::Config;
use crate::redact::without_userinfo;

use super::{config_path, runtime};

/// The JetStream stream holding one checkpoint per (source, table, stream, subject): the last
/// message of subject `sync_engine.backfill.<key>`.
pub const CHECKPOINT_STREAM: &str = "SYNC_ENGINE_BACKFILL";
const CHECKPOINT_SUBJECT_PREFIX: &str = "sync_engine.backfill";

/// Invalid rows named one by one on standard error before only being counted.
const INVALID_SHOWN_MAX: u64 = 20;

/// Checkpoints written at most this often (and at the end of every run).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

pub fn run(args: &BackfillArgs) -> anyhow::Result<ExitCode> {
    // Backfill needs NATS and Better Auth's database, not the webhook secrets.
    let config = Config::load(config_path(&args.config).as_deref(), std::env::vars())?;
    runtime()?.block_on(backfill(&config, args))
}

/// What one run did, printed at the end whatever happened.
#[derive(Debug, Default)]
struct Summary {
    /// Users in the table.
    total: u64,
    /// Rows read in this run.
    read: u64,
    /// Events JetStream stored (or, in a dry run, would have been published).
    published: u64,
    /// Users at or before the checkpoint, and events JetStream reported as duplicates.
    skipped: u64,
    /// Rows that cannot be a valid event (no email, a date that is no date…).
    invalid: u64,
}

async fn backfill(config: &Config, args: &BackfillArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let columns = better_auth_columns(config);
    let db = UserDb::connect(&args.from_better_auth, "--from-better-auth").await?;
    let table = db.better_auth_table(&args.table, &columns).await?;

    let client = crate::adapters::nats::connect(&config.nats).await?;
    let js = jetstream::new(client);
    let key = checkpoint_key(config, &args.from_better_auth, &args.table);
    let checkpoints = checkpoint_stream(&js, !args.dry_run).await?;
    if args.restart && !args.dry_run {
        if let Some(stream) = &checkpoints {
            stream
                .purge()
                .filter(format!("{CHECKPOINT_SUBJECT_PREFIX}.{key}"))
                .await
                .map_err(|e| anyhow::anyhow!("cannot forget the checkpoint: {e}"))?;
        }
    }
    let mut after = match (&checkpoints, args.restart) {
        (Some(stream), false) => read_checkpoint(stream, &key).await?,
        _ => None,
    };
    if !args.dry_run {
        crate::adapters::nats::ensure_layout_streams(&js, config).await?;
    }

    let mut summary = Summary {
        total: db.count_after(&table, None).await?,
        ..Summary::default()
    };
    let remaining = match &after {
        Some(last) => db.count_after(&table, Some(last)).await?,
        None => summary.total,
    };
    summary.skipped = summary.total.saturating_sub(remaining);
    if let Some(last) = &after {
        eprintln!(
            "resuming after user {last:?}: {} user(s) already done",
            summary.skipped
        );
    }

    let bar = progress_bar(remaining);
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Ordering::SeqCst);
            }
        });
    }

    // Events in publish order with their ack futures (`None`: an invalid row, nothing to wait
    // for). The checkpoint only moves past a user once everything before it is acknowledged.
    let mut pending: VecDeque<(String, Option<PublishAckFuture>)> = VecDeque::new();
    let mut acked_through: Option<String> = None;
    let mut saved: Option<String> = after.clone();
    let mut last_save = Instant::now();
    let in_flight = args.in_flight as usize;
    let mut sample: Option<(String, Envelope)> = None;
    let mut stopped_early = false;
    // Publishes started in this run (acknowledged or not): what `--rate` and `--limit` count.
    let mut issued: u64 = 0;

    'pages: loop {
        let page = db
            .better_auth_page(&table, after.as_deref(), PAGE_ROWS)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for user in page {
            if interrupted.load(Ordering::SeqCst) || args.limit.is_some_and(|limit| issued >= limit)
            {
                stopped_early = true;
                break 'pages;
            }
            summary.read += 1;
            bar.inc(1);
            let (subject, envelope) = match user_event(config, &user, EventType::Created) {
                Ok(event) => event,
                Err(reason) => {
                    summary.invalid += 1;
                    if summary.invalid <= INVALID_SHOWN_MAX {
                        bar.suspend(|| eprintln!("skipping user {:?}: {reason}", user.id));
                    }
                    pending.push_back((user.id, None));
                    continue;
                }
            };
            if let Some(rate) = args.rate {
                let due = started + Duration::from_secs_f64(issued as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            issued += 1;
            if args.dry_run {
                summary.published += 1;
                sample.get_or_insert((subject, envelope));
                continue;
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", envelope.id.as_str());
            let ack = js
                .publish_with_headers(subject.clone(), headers, envelope.to_bytes().into())
                .await
                .map_err(|e| anyhow::anyhow!("publish to {subject} failed: {e}"))?;
            pending.push_back((user.id, Some(ack)));
            while pending.len() > in_flight || pending.front().is_some_and(|(_, ack)| ack.is_none())
            {
                settle_front(&mut pending, &mut acked_through, &mut summary).await?;
            }
            if last_save.elapsed() >= CHECKPOINT_EVERY {
                save_if_moved(&js, &key, &acked_through, &mut saved).await?;
                last_save = Instant::now();
            }
        }
    }
    while !pending.is_empty() {
        settle_front(&mut pending, &mut acked_through, &mut summary).await?;
    }
    if !args.dry_run {
        save_if_moved(&js, &key, &acked_through, &mut saved).await?;
    }
    bar.finish_and_clear();

    let elapsed = started.elapsed();
    let heading = if args.dry_run {
        "backfill dry run: nothing was published"
    } else if interrupted.load(Ordering::SeqCst) {
        "backfill interrupted: run it again to go on"
    } else if stopped_early {
        "backfill stopped at --limit: run it again to go on"
    } else {
        "backfill done"
    };
    println!("{heading}");
    println!("users in table: {}", summary.total);
    println!("read: {}", summary.read);
    println!(
        "{}: {}",
        if args.dry_run {
            "would publish"
        } else {
            "published"
        },
        summary.published
    );
    println!("skipped (already done): {}", summary.skipped);
    println!("invalid: {}", summary.invalid);
    println!(
        "elapsed: {:.2}s ({:.0} users/s)",
        elapsed.as_secs_f64(),
        summary.read as f64 / elapsed.as_secs_f64().max(1e-3)
    );
    if let Some((subject, envelope)) = sample {
        println!(
            "first event: {subject} {}",
            String::from_utf8_lossy(&envelope.to_bytes())
        );
    }
    Ok(if interrupted.load(Ordering::SeqCst) {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// Waits for the oldest publish; an invalid row at the front is settled at once.
async fn settle_front(
    pending: &mut VecDeque<(String, Option<PublishAckFuture>)>,
    acked_through: &mut Option<String>,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let Some((id, ack)) = pending.pop_front() else {
        return Ok(());
    };
    if let Some(ack) = ack {
        let ack = ack.await.map_err(|e| {
            anyhow::anyhow!("JetStream did not store the event of user {id:?}: {e}")
        })?;
        if ack.duplicate {
            summary.skipped += 1;
        } else {
            summary.published += 1;
        }
    }
    *acked_through = Some(id);
    Ok(())
}

async fn save_if_moved(
    js: &jetstream::Context,
    key: &str,
    acked_through: &Option<String>,
    saved: &mut Option<String>,
) -> anyhow::Result<()> {
    let Some(last) = acked_through else {
        return Ok(());
    };
    if saved.as_ref() == Some(last) {
        return Ok(());
    }
    let value = serde_json::json!({ "last_id": last, "saved_at_ms": now_ms() });
    let subject = format!("{CHECKPOINT_SUBJECT_PREFIX}.{key}");
    js.publish(subject.clone(), serde_json::to_vec(&value)?.into())
        .await
        .map_err(|e| anyhow::anyhow!("cannot save the checkpoint {subject}: {e}"))?
        .await
        .map_err(|e| anyhow::anyhow!("JetStream did not store the checkpoint {subject}: {e}"))?;
    *saved = Some(last.clone());
    Ok(())
}

/// The checkpoint stream; created when `create`, else `None` when it does not exist yet.
/// A plain stream keeping the last message per subject works on every JetStream server (the
/// key-value API of the client does not with NATS 2.9).
async fn checkpoint_stream(
    js: &jetstream::Context,
    create: bool,
) -> anyhow::Result<Option<stream::Stream>> {
    match js.get_stream(CHECKPOINT_STREAM).await {
        Ok(stream) => Ok(Some(stream)),
        Err(_) if !create => Ok(None),
        Err(_) => js
            .get_or_create_stream(stream::Config {
                name: CHECKPOINT_STREAM.to_string(),
                description: Some("sync-engine backfill checkpoints".to_string()),
                subjects: vec![format!("{CHECKPOINT_SUBJECT_PREFIX}.>")],
                max_messages_per_subject: 1,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map(Some)
            .map_err(|e| {
                anyhow::anyhow!("cannot create the checkpoint stream {CHECKPOINT_STREAM}: {e}")
            }),
    }
}

async fn read_checkpoint(stream: &stream::Stream, key: &str) -> anyhow::Result<Option<String>> {
    let subject = format!("{CHECKPOINT_SUBJECT_PREFIX}.{key}");
    let message = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => message,
        Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
            return Ok(None)
        }
        Err(error) => anyhow::bail!("cannot read the checkpoint {subject}: {error}"),
    };
    let value: Value = serde_json::from_slice(&message.payload)
        .map_err(|e| anyhow::anyhow!("the checkpoint {subject} is not JSON: {e}"))?;
    Ok(value
        .get("last_id")
        .and_then(Value::as_str)
        .map(String::from))
}

/// One checkpoint per source database (credentials left out), table, stream and subject: a
/// backfill into another stream starts from the beginning.
pub fn checkpoint_key(config: &Config, source_url: &str, table: &str) -> String {
    let subject = super::publish::subject_base(config, Origin::BetterAuth, EventType::Created);
    let stream = crate::adapters::nats::stream_name(&config.nats, Origin::BetterAuth);
    let mut hash = Sha256::new();
    for part in [
        without_userinfo(source_url).as_str(),
        table,
        stream.as_str(),
        subject.as_str(),
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    format!("cp_{}", &hex(&hash.finalize())[..40])
}

fn progress_bar(len: u64) -> ProgressBar {
    // indicatif draws nothing on a stderr that is not a terminal; being explicit keeps logs of
    // scripted runs free of escape codes whatever the library's default.
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40.cyan/blue} {pos}/{len} users  {per_sec}  ETA {eta}  {elapsed}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Better Auth's column names of id, email and name, from `targets.better_auth.fields`.
pub fn better_auth_columns(config: &Config) -> BetterAuthColumns {
    let fields = &config.targets.better_auth.fields;
    let side = |canonical: &str| {
        fields
            .get(canonical)
            .cloned()
            .unwrap_or_else(|| canonical.to_string())
    };
    BetterAuthColumns {
        id: side(protocol::user::ID),
        email: side(protocol::user::EMAIL),
        name: side("name"),
    }
}

/// `backfill-<user id>` when the id fits the event id alphabet, else a hash of it.
pub fn backfill_event_id(user_id: &str) -> String {
    let plain = format!("backfill-{user_id}");
    if protocol::envelope::is_valid_event_id(&plain) {
        plain
    } else {
        format!(
            "backfill-sha256:{}",
            hex(&Sha256::digest(user_id.as_bytes()))
        )
    }
}

/// The event that reports `user` as Better Auth holds it, with Better Auth's field names, on
/// the subject Better Auth publishes it on. `Err` says why the row cannot be one.
pub fn user_event(
    config: &Config,
    user: &BetterAuthUser,
    event_type: EventType,
) -> Result<(String, Envelope), String> {
    let data = user_data(config, user)?;
    let envelope = Envelope {
        id: backfill_event_id(&user.id),
        origin: Origin::BetterAuth,
        event_type,
        timestamp: committed_at(user),
        data,
    };
    // Checked the way the engine will, so a backfilled user never becomes a dead letter.
    protocol::user::Event::parse(&envelope.to_bytes(), usize::MAX, &config.mappings())
        .map_err(|bad| format!("the event would be rejected: {bad}"))?;
    let subject = super::publish::subject_for(config, Origin::BetterAuth, event_type, &user.id);
    Ok((subject, envelope))
}

/// When the row's state committed (its `updatedAt`, else `createdAt`, else now), the time an
/// event reporting it carries: a newer edit made elsewhere, even during the run, still wins.
pub fn committed_at(user: &BetterAuthUser) -> i64 {
    user.updated_at_ms
        .or(user.created_at_ms)
        .filter(|ms| *ms >= 0)
        .unwrap_or_else(now_ms)
}

/// `data` of a Better Auth event for `user`: id, email, name, emailVerified, image, createdAt
/// and updatedAt (ISO 8601), absent values left out.
pub fn user_data(config: &Config, user: &BetterAuthUser) -> Result<Map<String, Value>, String> {
    if let Some(problem) = &user.problem {
        return Err(problem.clone());
    }
    let email = match user.email.as_deref().map(str::trim) {
        Some(email) if !email.is_empty() => email.to_string(),
        _ => return Err("no email".into()),
    };
    let columns = better_auth_columns(config);
    let mut data = Map::new();
    data.insert(columns.id, Value::String(user.id.clone()));
    data.insert(columns.email, Value::String(email));
    if let Some(name) = &user.name {
        data.insert(columns.name, Value::String(name.clone()));
    }
    if let Some(verified) = user.email_verified {
        data.insert("emailVerified".into(), Value::Bool(verified));
    }
    if let Some(image) = &user.image {
        data.insert("image".into(), Value::String(image.clone()));
    }
    if let Some(ms) = user.created_at_ms {
        data.insert("createdAt".into(), Value::String(iso_ms(ms)));
    }
    if let Some(ms) = user.updated_at_ms {
        data.insert("updatedAt".into(), Value::String(iso_ms(ms)));
    }
    Ok(data)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_deterministic_and_valid() {
        assert_eq!(backfill_event_id("u_123"), "backfill-u_123");
        for id in ["a.b", "ü", "x y", &"z".repeat(200)] {
            let event_id = backfill_event_id(id);
            assert!(protocol::envelope::is_valid_event_id(&event_id), "{id}");
            assert_eq!(event_id, backfill_event_id(id));
            assert!(event_id.starts_with("backfill-sha256:"));
        }
        assert_ne!(backfill_event_id("a.b"), backfill_event_id("a.c"));
    }
}
