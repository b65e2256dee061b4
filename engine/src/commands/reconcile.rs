//! `sync-engine reconcile`: compares what Better Auth and Payload actually hold, and optionally
//! publishes the events that bring Payload in line with Better Auth.
//!
//! The engine keeps the two sides in step only for changes it sees as events; a change made
//! while a hook was broken, a restore from backup or a manual SQL edit never becomes one. This
//! command looks at both user tables directly, matching Payload's `better_auth_user_id` to
//! Better Auth's `id`. Better Auth is the identity provider, so it is the reference: a user
//! missing from Payload is created, a differing one updated with Better Auth's values, and a
//! Payload user whose Better Auth user no longer exists is deleted. The fixes are ordinary
//! Better Auth events stamped with the row's own `updatedAt` (an edit made elsewhere during the
//! run still wins the merge), each followed by a resync request (PROTOCOL.md §1): whatever the
//! engine believed Payload held, Payload is sent the engine's user, so a row edited, deleted or
//! restored behind the engine's back is repaired too.
//!
//! Exit codes: 0 in sync, 1 differences found (also with `--fix`: the fixes take effect when
//! the engine delivers them), 2 on error.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use protocol::{Envelope, EventType, Origin};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::adapters::user_tables::{
    now_ms, snake_case, BetterAuthUser, CheckedTable, PayloadColumns, PayloadUser, UserDb,
    PAGE_ROWS,
};
use crate::cli::ReconcileArgs;
use crate::config::Config;

use super::backfill::{better_auth_columns, committed_at, user_data};
use super::{config_path, runtime};

/// Exit code when the tables differ.
const EXIT_DIFFERENT: u8 = 1;
/// Exit code when the comparison could not be made.
const EXIT_ERROR: u8 = 2;

pub fn run(args: &ReconcileArgs) -> anyhow::Result<ExitCode> {
    // Errors exit 2 here, not 1: 1 means "the tables differ" to scripts.
    let result = Config::load(config_path(&args.config).as_deref(), std::env::vars())
        .map_err(anyhow::Error::from)
        .and_then(|config| runtime()?.block_on(reconcile(&config, args)));
    match result {
        Ok(code) => Ok(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            Ok(ExitCode::from(EXIT_ERROR))
        }
    }
}

/// A Better Auth user that Payload does not have.
#[derive(Debug, Serialize)]
pub(super) struct Missing {
    id: String,
    email: Option<String>,
    name: Option<String>,
}

/// A Payload user linked to a Better Auth user that does not exist.
#[derive(Debug, Serialize)]
pub(super) struct Extra {
    payload_id: String,
    better_auth_user_id: String,
    email: Option<String>,
    full_name: Option<String>,
}

#[derive(Debug, Serialize)]
struct FieldDifference {
    /// The canonical field: `email` or `name`.
    field: &'static str,
    better_auth: Option<String>,
    payload: Option<String>,
}

/// A user both sides have, with different values.
#[derive(Debug, Serialize)]
pub(super) struct Differing {
    id: String,
    payload_id: String,
    differences: Vec<FieldDifference>,
}

/// Several Payload users linked to one Better Auth user: no event can fix that.
#[derive(Debug, Serialize)]
pub(super) struct Duplicate {
    better_auth_user_id: String,
    payload_ids: Vec<String>,
}

/// A repair published by `--fix`: a change, and the resync request after it.
#[derive(Debug, Serialize)]
pub(super) struct Fix {
    #[serde(rename = "type")]
    event_type: &'static str,
    user: String,
    event_id: String,
    subject: String,
    /// The resync request's event id (the `webhook-id` of the delivery it causes).
    resync_id: String,
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) in_sync: bool,
    better_auth_users: usize,
    payload_users: usize,
    /// Payload users without a Better Auth id: not synced, so not compared.
    unlinked_payload_users: usize,
    pub(super) missing: Vec<Missing>,
    pub(super) extra: Vec<Extra>,
    pub(super) differing: Vec<Differing>,
    pub(super) duplicates: Vec<Duplicate>,
    pub(super) fixes: Vec<Fix>,
    /// Differences `--fix` could not turn into an event, with the reason.
    pub(super) not_fixed: Vec<String>,
}

async fn reconcile(config: &Config, args: &ReconcileArgs) -> anyhow::Result<ExitCode> {
    let tables = Tables::open(config, args).await?;
    if let Some(every) = args.every {
        return super::reconcile_schedule::run(config, args, &tables, every).await;
    }
    let report = pass(config, args, &tables).await?;
    print(&report, args.json)?;
    Ok(if report.in_sync {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERENT)
    })
}

/// Both applications' user tables, checked once.
pub(super) struct Tables {
    ba_db: UserDb,
    payload_db: UserDb,
    ba_table: CheckedTable,
    payload_table: CheckedTable,
}

impl Tables {
    async fn open(config: &Config, args: &ReconcileArgs) -> anyhow::Result<Tables> {
        let ba_db = UserDb::connect(&args.better_auth, "--better-auth").await?;
        let payload_db = UserDb::connect(&args.payload, "--payload").await?;
        let ba_table = ba_db
            .better_auth_table(&args.ba_table, &better_auth_columns(config))
            .await?;
        let payload_table = payload_db
            .payload_table(&args.payload_table, &payload_columns(config))
            .await?;
        Ok(Tables {
            ba_db,
            payload_db,
            ba_table,
            payload_table,
        })
    }

    /// Every Better Auth user, by id, read a page at a time.
    async fn better_auth_users(&self) -> anyhow::Result<BTreeMap<String, BetterAuthUser>> {
        let mut users = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .ba_db
                .better_auth_page(&self.ba_table, after.as_deref(), PAGE_ROWS)
                .await?;
            let Some(last) = page.last() else {
                return Ok(users);
            };
            after = Some(last.id.clone());
            users.extend(page.into_iter().map(|user| (user.id.clone(), user)));
        }
    }
}

/// One comparison of the two tables, and with `--fix` the events that repair what differs.
pub(super) async fn pass(
    config: &Config,
    args: &ReconcileArgs,
    tables: &Tables,
) -> anyhow::Result<Report> {
    let ba_users = tables.better_auth_users().await?;
    let payload_users = tables
        .payload_db
        .payload_users(&tables.payload_table)
        .await?;
    let mut report = compare(&ba_users, &payload_users);
    if args.fix && !report.in_sync {
        fix(config, tables, &ba_users, &mut report).await?;
    }
    Ok(report)
}

/// The report as a table and lines, or as JSON (one line per report).
pub(super) fn print(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print_report(report);
    }
    Ok(())
}

/// Payload's column names: the snake_case of the Payload fields that `targets.payload.fields`
/// maps `id`, `email` and `name` to (`better_auth_user_id`, `email`, `full_name` by default).
fn payload_columns(config: &Config) -> PayloadColumns {
    let fields = &config.targets.payload.fields;
    let column = |canonical: &str, default: &str| {
        snake_case(fields.get(canonical).map(String::as_str).unwrap_or(default))
    };
    PayloadColumns {
        id: "id".into(),
        better_auth_user_id: column(protocol::user::ID, "betterAuthUserId"),
        email: column(protocol::user::EMAIL, "email"),
        full_name: column("name", "fullName"),
    }
}

/// `None` and `""` are the same value: Payload stores an unset name either way.
fn normalized(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or("")
}

fn compare(ba_users: &BTreeMap<String, BetterAuthUser>, payload_users: &[PayloadUser]) -> Report {
    let mut linked: BTreeMap<&str, Vec<&PayloadUser>> = BTreeMap::new();
    let mut unlinked = 0;
    for user in payload_users {
        match user.better_auth_user_id.as_deref() {
            Some(id) if !id.is_empty() => linked.entry(id).or_default().push(user),
            _ => unlinked += 1,
        }
    }
    let mut report = Report {
        in_sync: true,
        better_auth_users: ba_users.len(),
        payload_users: payload_users.len(),
        unlinked_payload_users: unlinked,
        missing: Vec::new(),
        extra: Vec::new(),
        differing: Vec::new(),
        duplicates: Vec::new(),
        fixes: Vec::new(),
        not_fixed: Vec::new(),
    };
    for (id, ba) in ba_users {
        let Some(payload) = linked.get(id.as_str()) else {
            report.missing.push(Missing {
                id: id.clone(),
                email: ba.email.clone(),
                name: ba.name.clone(),
            });
            continue;
        };
        if payload.len() > 1 {
            report.duplicates.push(Duplicate {
                better_auth_user_id: id.clone(),
                payload_ids: payload.iter().map(|p| p.id.clone()).collect(),
            });
        }
        let Some(payload) = payload.first() else {
            continue;
        };
        let mut differences = Vec::new();
        if normalized(&ba.email) != normalized(&payload.email) {
            differences.push(FieldDifference {
                field: "email",
                better_auth: ba.email.clone(),
                payload: payload.email.clone(),
            });
        }
        if normalized(&ba.name) != normalized(&payload.full_name) {
            differences.push(FieldDifference {
                field: "name",
                better_auth: ba.name.clone(),
                payload: payload.full_name.clone(),
            });
        }
        if !differences.is_empty() {
            report.differing.push(Differing {
                id: id.clone(),
                payload_id: payload.id.clone(),
                differences,
            });
        }
    }
    for (id, payload) in &linked {
        if !ba_users.contains_key(*id) {
            for user in payload {
                report.extra.push(Extra {
                    payload_id: user.id.clone(),
                    better_auth_user_id: id.to_string(),
                    email: user.email.clone(),
                    full_name: user.full_name.clone(),
                });
            }
        }
    }
    report.in_sync = report.missing.is_empty()
        && report.extra.is_empty()
        && report.differing.is_empty()
        && report.duplicates.is_empty();
    report
}

/// One repair `--fix` means to publish: a change of `user`, with its data and time, or why
/// there can be none.
struct Planned {
    event_type: EventType,
    user: String,
    change: Result<(Map<String, Value>, i64), String>,
}

/// Publishes, as Better Auth events, `user.created` for the missing, `user.updated` for the
/// differing and `user.deleted` for the extra users, each followed by a resync request: the
/// change repairs what the engine does not know yet (an edit made in Better Auth by hand), the
/// request what it knows but Payload lost (a row edited, deleted or restored behind its back).
async fn fix(
    config: &Config,
    tables: &Tables,
    ba_users: &BTreeMap<String, BetterAuthUser>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let client = crate::adapters::nats::connect(&config.nats).await?;
    let js = async_nats::jetstream::new(client);
    crate::adapters::nats::ensure_layout_streams(&js, config).await?;

    let changes = report
        .missing
        .iter()
        .map(|m| (EventType::Created, &m.id))
        .chain(report.differing.iter().map(|d| (EventType::Updated, &d.id)));
    let mut planned: Vec<Planned> = changes
        .map(|(event_type, id)| Planned {
            event_type,
            user: id.clone(),
            change: full_user(config, ba_users, id),
        })
        .collect();
    // A user created in Better Auth after its table was read, and delivered to Payload before
    // Payload's was, looks extra. A deletion is final, so Better Auth is read a second time,
    // after Payload, and only a user missing from both reads is deleted.
    let second_look: HashSet<String> = if report.extra.is_empty() {
        HashSet::new()
    } else {
        tables.better_auth_users().await?.into_keys().collect()
    };
    let (to_delete, appeared) = deletions(&report.extra, &second_look);
    for id in appeared {
        report.not_fixed.push(format!(
            "user.deleted of user {id:?}: not published, the user is in Better Auth now (created while reconcile read the tables)"
        ));
    }
    planned.extend(to_delete.into_iter().map(|id| Planned {
        event_type: EventType::Deleted,
        change: Ok((key_only(config, &id), now_ms())),
        user: id,
    }));
    for repair in planned {
        match repair.change {
            Ok((data, timestamp)) => {
                let fix = publish_repair(
                    config,
                    &js,
                    repair.event_type,
                    &repair.user,
                    data,
                    timestamp,
                )
                .await?;
                match fix {
                    Ok(fix) => report.fixes.push(fix),
                    Err(reason) => report.not_fixed.push(reason),
                }
            }
            Err(reason) => report.not_fixed.push(format!(
                "{} of user {:?}: {reason}",
                repair.event_type.as_str(),
                repair.user
            )),
        }
    }
    Ok(())
}

/// Publishes one change and the resync request after it, on the user's subjects (so the
/// engine handles them in that order). `Ok(Err(reason))` when the change would be rejected.
async fn publish_repair(
    config: &Config,
    js: &async_nats::jetstream::Context,
    event_type: EventType,
    user: &str,
    data: Map<String, Value>,
    timestamp: i64,
) -> anyhow::Result<Result<Fix, String>> {
    let mappings = config.mappings();
    let event = |event_type, data, timestamp| Envelope {
        // Fresh: an earlier fix of the same user may be remembered as done by the engine.
        id: format!("reconcile-{}", uuid::Uuid::new_v4()),
        origin: Origin::BetterAuth,
        event_type,
        timestamp,
        data,
    };
    let change = event(event_type, data, timestamp);
    let resync = event(EventType::Resync, key_only(config, user), now_ms());
    for envelope in [&change, &resync] {
        if let Err(bad) = protocol::user::Event::parse(&envelope.to_bytes(), usize::MAX, &mappings)
        {
            return Ok(Err(format!(
                "{} of user {user:?}: the event would be rejected: {bad}",
                envelope.event_type.as_str()
            )));
        }
    }
    let subject = super::publish::subject_for(config, Origin::BetterAuth, event_type, user);
    super::publish::publish(js, &subject, &change.id, change.to_bytes()).await?;
    let resync_subject =
        super::publish::subject_for(config, Origin::BetterAuth, EventType::Resync, user);
    super::publish::publish(js, &resync_subject, &resync.id, resync.to_bytes()).await?;
    Ok(Ok(Fix {
        event_type: event_type.as_str(),
        user: user.to_string(),
        event_id: change.id,
        subject,
        resync_id: resync.id,
    }))
}

/// The `data` of an event that names the user and nothing else.
fn key_only(config: &Config, id: &str) -> Map<String, Value> {
    let mut data = Map::new();
    data.insert(
        better_auth_columns(config).id,
        Value::String(id.to_string()),
    );
    data
}

/// The Better Auth ids to delete (once each, however many Payload users carry one), and those
/// not to delete because the second read of Better Auth found them.
fn deletions(extra: &[Extra], second_look: &HashSet<String>) -> (Vec<String>, Vec<String>) {
    let mut seen: HashSet<&str> = HashSet::new();
    let (mut delete, mut appeared) = (Vec::new(), Vec::new());
    for user in extra {
        let id = user.better_auth_user_id.as_str();
        if !seen.insert(id) {
            continue;
        }
        if second_look.contains(id) {
            appeared.push(id.to_string());
        } else {
            delete.push(id.to_string());
        }
    }
    (delete, appeared)
}

/// The user's data as Better Auth holds it, and when that state committed.
fn full_user(
    config: &Config,
    ba_users: &BTreeMap<String, BetterAuthUser>,
    id: &str,
) -> Result<(Map<String, Value>, i64), String> {
    let user = ba_users
        .get(id)
        .ok_or_else(|| "no longer in Better Auth".to_string())?;
    Ok((user_data(config, user)?, committed_at(user)))
}

fn print_report(report: &Report) {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(vec![
        "difference",
        "user",
        "field",
        "Better Auth",
        "Payload",
    ]);
    let shown = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".into());
    for missing in &report.missing {
        table.add_row(vec![
            "missing in Payload".into(),
            missing.id.clone(),
            "".into(),
            format!("{} / {}", shown(&missing.email), shown(&missing.name)),
            "-".into(),
        ]);
    }
    for extra in &report.extra {
        table.add_row(vec![
            "extra in Payload".into(),
            extra.better_auth_user_id.clone(),
            "".into(),
            "-".into(),
            format!(
                "{} / {} (Payload id {})",
                shown(&extra.email),
                shown(&extra.full_name),
                extra.payload_id
            ),
        ]);
    }
    for differing in &report.differing {
        for difference in &differing.differences {
            table.add_row(vec![
                "differs".into(),
                differing.id.clone(),
                difference.field.to_string(),
                shown(&difference.better_auth),
                shown(&difference.payload),
            ]);
        }
    }
    for duplicate in &report.duplicates {
        table.add_row(vec![
            "several Payload users".into(),
            duplicate.better_auth_user_id.clone(),
            "".into(),
            "".into(),
            format!("Payload ids {}", duplicate.payload_ids.join(", ")),
        ]);
    }
    if !report.in_sync {
        println!("{table}");
    }
    println!(
        "{} Better Auth users, {} Payload users ({} not linked to Better Auth, not compared)",
        report.better_auth_users, report.payload_users, report.unlinked_payload_users
    );
    if report.in_sync {
        println!("in sync");
    } else {
        println!(
            "{} missing, {} extra, {} differing, {} with several Payload users",
            report.missing.len(),
            report.extra.len(),
            report.differing.len(),
            report.duplicates.len()
        );
    }
    for fix in &report.fixes {
        println!(
            "published {} for user {} as {} on {}, then the resync request {}",
            fix.event_type, fix.user, fix.event_id, fix.subject, fix.resync_id
        );
    }
    for not_fixed in &report.not_fixed {
        println!("not fixed: {not_fixed}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extra(id: &str, payload_id: &str) -> Extra {
        Extra {
            payload_id: payload_id.into(),
            better_auth_user_id: id.into(),
            email: None,
            full_name: None,
        }
    }

    #[test]
    fn a_user_the_second_look_finds_is_never_deleted() {
        let extras = [extra("gone", "1"), extra("new", "2"), extra("gone", "3")];
        let second_look: HashSet<String> = ["new".to_string(), "other".to_string()].into();
        let (delete, appeared) = deletions(&extras, &second_look);
        assert_eq!(
            delete,
            ["gone"],
            "once, however many Payload users carry it"
        );
        assert_eq!(appeared, ["new"]);
    }
}
