//! `sync-engine dlq list|replay|purge`.

use std::process::ExitCode;

use crate::adapters::store::{DeadLetterRow, SqlStore};
use crate::cli::{ConfigArg, DlqArgs, DlqCommand};
use crate::config::Config;

use super::{config_path, runtime};

pub fn run(args: &DlqArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        match &args.command {
            DlqCommand::List { config, json } => {
                let (_, store) = open(config).await?;
                let rows = store.dead_letters(None).await?;
                if *json {
                    for row in &rows {
                        println!("{}", serde_json::to_string(&json_row(row))?);
                    }
                } else {
                    print_table(&rows);
                }
                Ok(ExitCode::SUCCESS)
            }
            DlqCommand::Replay { config, id, all } => {
                let (config, store) = open(config).await?;
                let rows = store.dead_letters(if *all { None } else { *id }).await?;
                if rows.is_empty() {
                    anyhow::bail!(
                        "no dead letter {}",
                        id.map(|i| i.to_string()).unwrap_or_default()
                    );
                }
                let client = crate::adapters::nats::connect(&config.nats).await?;
                let js = async_nats::jetstream::new(client);
                let mut replayed = 0;
                for row in rows {
                    // A failed delivery is replayed as a new event (new id): the old id may be
                    // remembered as processed, or applied by a receiver in an attempt whose
                    // answer was lost. A bad message goes again byte for byte.
                    let (raw, msg_id) = match row.event_id.as_deref() {
                        Some(event_id) if row.reason.starts_with("delivery_") => {
                            let id = protocol::envelope::replay_id(event_id, row.id as u64);
                            match protocol::envelope::with_id(&row.raw, &id) {
                                Some(raw) => (raw, id),
                                None => (
                                    row.raw.clone(),
                                    format!("replay-{}-{}", row.id, uuid::Uuid::new_v4()),
                                ),
                            }
                        }
                        _ => (
                            row.raw.clone(),
                            format!("replay-{}-{}", row.id, uuid::Uuid::new_v4()),
                        ),
                    };
                    super::publish::publish(&js, &row.subject, &msg_id, raw).await?;
                    store.purge_dead_letters(Some(row.id)).await?;
                    replayed += 1;
                    println!("replayed dead letter {} to {}", row.id, row.subject);
                }
                println!("{replayed} replayed");
                Ok(ExitCode::SUCCESS)
            }
            DlqCommand::Purge { config, id, all } => {
                let (_, store) = open(config).await?;
                let n = store
                    .purge_dead_letters(if *all { None } else { *id })
                    .await?;
                println!("{n} purged");
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

async fn open(args: &ConfigArg) -> anyhow::Result<(Config, SqlStore)> {
    // Dead letters need the store and NATS, not the webhook secrets.
    let config = Config::load(config_path(args).as_deref(), std::env::vars())?;
    let store = SqlStore::connect(&config.store.url).await?;
    Ok((config, store))
}

fn json_row(row: &DeadLetterRow) -> serde_json::Value {
    serde_json::json!({
        "id": row.id,
        "subject": row.subject,
        "reason": row.reason,
        "event_id": row.event_id,
        "sink": row.sink,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "received_at": row.received_at,
        "raw": String::from_utf8_lossy(&row.raw),
    })
}

fn print_table(rows: &[DeadLetterRow]) {
    println!(
        "{:>6}  {:<28}  {:<24}  {:<36}  {:<11}  {:>8}  last_error",
        "id", "subject", "reason", "event_id", "sink", "attempts"
    );
    for row in rows {
        println!(
            "{:>6}  {:<28}  {:<24}  {:<36}  {:<11}  {:>8}  {}",
            row.id,
            row.subject,
            row.reason,
            row.event_id.as_deref().unwrap_or("-"),
            row.sink.as_deref().unwrap_or("-"),
            row.attempts,
            row.last_error
                .as_deref()
                .unwrap_or("-")
                .chars()
                .take(80)
                .collect::<String>(),
        );
    }
    println!("{} dead letter(s)", rows.len());
}
