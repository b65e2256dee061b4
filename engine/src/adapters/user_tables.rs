//! Read access to the applications' own user tables: Better Auth's `user` table and Payload's
//! `users` table, in SQLite or PostgreSQL (chosen by the URL's scheme).
//!
//! The engine normally only sees events; `backfill` and `reconcile` have to look at what each
//! application actually holds, so they read the tables the way the applications create them:
//! Better Auth with quoted camelCase columns (`"emailVerified"`, `"createdAt"`), Payload's SQL
//! adapters with snake_case ones (`full_name`, `better_auth_user_id`). Values are decoded
//! leniently because the same column is stored differently per database (a date is text or an
//! integer in SQLite, `timestamptz` in PostgreSQL; a boolean is 0/1 in SQLite). Nothing here
//! writes to those tables.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::Row;

use crate::redact::url as redact_url;

/// Runs the same code on whichever pool the database has (the SQL uses `$N` placeholders,
/// which SQLite and PostgreSQL both accept).
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            UserDb::Sqlite($pool) => $body,
            UserDb::Postgres($pool) => $body,
        }
    };
}

/// One application's database.
#[derive(Debug, Clone)]
pub enum UserDb {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// How a column's values are selected and decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    Text,
    Integer,
    Timestamp,
    Boolean,
}

/// A table whose columns have been checked: every query against it is built from these.
#[derive(Debug, Clone)]
pub struct CheckedTable {
    /// The table as the user named it, for messages.
    pub name: String,
    /// The quoted (and, in PostgreSQL, schema-qualified) identifier.
    quoted: String,
    /// The select list, in the order the row decoders read it.
    select: String,
    /// The key column, quoted; rows are paged in its order.
    key: String,
    /// An integer key is compared as an integer: as text, `10` sorts before `9`.
    key_numeric: bool,
}

/// Better Auth's column names of the canonical fields (from `targets.better_auth.fields`).
#[derive(Debug, Clone)]
pub struct BetterAuthColumns {
    pub id: String,
    pub email: String,
    pub name: String,
}

/// Payload's column names of the canonical fields: the snake_case of the Payload field names
/// of `targets.payload.fields`, as Payload's SQL adapters name columns.
#[derive(Debug, Clone)]
pub struct PayloadColumns {
    pub id: String,
    pub better_auth_user_id: String,
    pub email: String,
    pub full_name: String,
}

/// One row of Better Auth's user table.
#[derive(Debug, Clone, PartialEq)]
pub struct BetterAuthUser {
    pub id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub email_verified: Option<bool>,
    pub image: Option<String>,
    /// Milliseconds since the epoch.
    pub created_at_ms: Option<i64>,
    pub updated_at_ms: Option<i64>,
    /// Why a value could not be read (e.g. a date that is no date), if one could not.
    pub problem: Option<String>,
}

/// One row of Payload's users table.
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadUser {
    pub id: String,
    pub better_auth_user_id: Option<String>,
    pub email: Option<String>,
    pub full_name: Option<String>,
}

impl UserDb {
    /// Opens `url` (`sqlite://path` or `postgres://…`); `what` names the option in errors.
    /// A SQLite file must exist: a typo must not silently read an empty new database.
    pub async fn connect(url: &str, what: &str) -> anyhow::Result<UserDb> {
        let shown = redact_url(url);
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| anyhow::anyhow!("{what} {shown} is not a usable SQLite URL: {e}"))?
                .create_if_missing(false)
                .busy_timeout(Duration::from_secs(10));
            let pool = SqlitePoolOptions::new()
                .max_connections(2)
                .connect_with(options)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open {what} {shown}: {e}"))?;
            Ok(UserDb::Sqlite(pool))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to {what} {shown}: {e}"))?;
            Ok(UserDb::Postgres(pool))
        } else {
            anyhow::bail!("{what} {shown}: expected a sqlite://… or postgres://… URL")
        }
    }

    /// The columns of `table` with their declared types (lowercase); an error when it does not
    /// exist. In PostgreSQL, `schema.table` names a table outside the search path.
    async fn columns(&self, table: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let rows: Vec<(String, String)> = match self {
            UserDb::Sqlite(pool) => {
                sqlx::query_as("SELECT name, type FROM pragma_table_info($1)")
                    .bind(table)
                    .fetch_all(pool)
                    .await
            }
            UserDb::Postgres(pool) => {
                let (schema, name) = split_schema(table);
                sqlx::query_as(
                    "SELECT column_name::text, data_type::text FROM information_schema.columns \
                     WHERE table_name::text = $1 \
                     AND table_schema::text = coalesce($2::text, current_schema()::text)",
                )
                .bind(name)
                .bind(schema)
                .fetch_all(pool)
                .await
            }
        }
        .map_err(|e| anyhow::anyhow!("cannot read the columns of table {table:?}: {e}"))?;
        if rows.is_empty() {
            anyhow::bail!("table {table:?} does not exist (or has no columns)");
        }
        Ok(rows
            .into_iter()
            .map(|(name, kind)| (name, kind.to_lowercase()))
            .collect())
    }

    fn quote_table(&self, table: &str) -> String {
        match self {
            UserDb::Sqlite(_) => quote(table),
            UserDb::Postgres(_) => match split_schema(table) {
                (Some(schema), name) => format!("{}.{}", quote(schema), quote(name)),
                (None, name) => quote(name),
            },
        }
    }

    /// The select expression of `column` under `alias`, or `NULL` when the column is absent
    /// and optional.
    fn select_expr(&self, column: Option<(&str, ColumnKind)>, alias: &str) -> String {
        let Some((column, kind)) = column else {
            return format!("NULL AS {}", quote(alias));
        };
        let q = quote(column);
        let expr = match (self, kind) {
            // Milliseconds since the epoch, whatever the column's time zone handling.
            (UserDb::Postgres(_), ColumnKind::Timestamp) => {
                format!("floor(extract(epoch from {q}) * 1000)::bigint")
            }
            // uuid, varchar, citext… all read as text.
            (UserDb::Postgres(_), ColumnKind::Text) => format!("{q}::text"),
            _ => q,
        };
        format!("{expr} AS {}", quote(alias))
    }

    fn kind_of(&self, declared: &str) -> ColumnKind {
        match self {
            UserDb::Postgres(_) => match declared {
                d if d.starts_with("timestamp") || d == "date" => ColumnKind::Timestamp,
                "boolean" => ColumnKind::Boolean,
                "integer" | "bigint" | "smallint" => ColumnKind::Integer,
                _ => ColumnKind::Text,
            },
            // SQLite stores any value in any column; the declared type only matters for the
            // key (an INTEGER key pages numerically). Values are decoded by what they are.
            UserDb::Sqlite(_) => {
                if declared.contains("int") {
                    ColumnKind::Integer
                } else {
                    ColumnKind::Text
                }
            }
        }
    }

    /// Checks Better Auth's user table and prepares its queries. `id` and `email` are required;
    /// `name`, `emailVerified`, `image`, `createdAt` and `updatedAt` are read when present.
    pub async fn better_auth_table(
        &self,
        table: &str,
        names: &BetterAuthColumns,
    ) -> anyhow::Result<CheckedTable> {
        let columns = self.columns(table).await?;
        let find = |column: &str, required: bool| -> anyhow::Result<Option<(String, ColumnKind)>> {
            match columns.get(column) {
                Some(declared) => Ok(Some((column.to_string(), self.kind_of(declared)))),
                None if required => anyhow::bail!(
                    "table {table:?} has no column {column} (columns: {})",
                    columns.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
                None => Ok(None),
            }
        };
        let id = find(&names.id, true)?;
        let email = find(&names.email, true)?;
        let name = find(&names.name, false)?;
        let verified = find("emailVerified", false)?;
        let image = find("image", false)?;
        let created = find("createdAt", false)?;
        let updated = find("updatedAt", false)?;
        let key_numeric = id.as_ref().is_some_and(|(_, k)| *k == ColumnKind::Integer);
        let select = [
            self.select_expr(as_ref(&id), "id"),
            self.select_expr(as_ref(&email), "email"),
            self.select_expr(as_ref(&name), "name"),
            self.select_expr(as_ref(&verified), "emailVerified"),
            self.select_expr(as_ref(&image), "image"),
            self.select_expr(as_ref(&created), "createdAt"),
            self.select_expr(as_ref(&updated), "updatedAt"),
        ]
        .join(", ");
        Ok(self.checked(table, select, &names.id, key_numeric))
    }

    /// Checks Payload's users table and prepares its queries; all four columns are required.
    pub async fn payload_table(
        &self,
        table: &str,
        names: &PayloadColumns,
    ) -> anyhow::Result<CheckedTable> {
        let columns = self.columns(table).await?;
        let mut select = Vec::new();
        for (column, alias) in [
            (&names.id, "id"),
            (&names.better_auth_user_id, "better_auth_user_id"),
            (&names.email, "email"),
            (&names.full_name, "full_name"),
        ] {
            let Some(declared) = columns.get(column) else {
                anyhow::bail!(
                    "table {table:?} has no column {column} (columns: {})",
                    columns.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            };
            let kind = match self.kind_of(declared) {
                // Ids read as text; an integer key still sorts as an integer below.
                ColumnKind::Integer => ColumnKind::Text,
                other => other,
            };
            select.push(self.select_expr(Some((column, kind)), alias));
        }
        let key_numeric = columns
            .get(&names.id)
            .is_some_and(|d| self.kind_of(d) == ColumnKind::Integer);
        Ok(self.checked(table, select.join(", "), &names.id, key_numeric))
    }

    fn checked(&self, table: &str, select: String, key: &str, key_numeric: bool) -> CheckedTable {
        let quoted_key = quote(key);
        let key = match self {
            // Compared and ordered as text, the same way on both sides of `>` (a uuid key too).
            UserDb::Postgres(_) if !key_numeric => format!("{quoted_key}::text"),
            _ => quoted_key,
        };
        CheckedTable {
            name: table.to_string(),
            quoted: self.quote_table(table),
            select,
            key,
            key_numeric,
        }
    }

    /// How many rows have a key after `after` (all rows when `None`).
    pub async fn count_after(
        &self,
        table: &CheckedTable,
        after: Option<&str>,
    ) -> anyhow::Result<u64> {
        let (filter, bind) = key_filter(table, after)?;
        let sql = format!("SELECT COUNT(*) FROM {} {filter}", table.quoted);
        let count: i64 = on_db!(self, pool => {
            let mut query = sqlx::query_scalar(&sql);
            if let Some(key) = &bind {
                query = query.bind(key);
            }
            query.fetch_one(pool).await
        })
        .map_err(|e| anyhow::anyhow!("cannot count the rows of table {:?}: {e}", table.name))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Up to `limit` rows of Better Auth's user table with a key after `after`, in key order.
    pub async fn better_auth_page(
        &self,
        table: &CheckedTable,
        after: Option<&str>,
        limit: u32,
    ) -> anyhow::Result<Vec<BetterAuthUser>> {
        self.page(table, after, limit).await
    }

    /// Every row of Payload's users table, in key order, read a page at a time.
    pub async fn payload_users(&self, table: &CheckedTable) -> anyhow::Result<Vec<PayloadUser>> {
        let mut users: Vec<PayloadUser> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page: Vec<PayloadUser> = self.page(table, after.as_deref(), PAGE_ROWS).await?;
            match page.last() {
                Some(last) => after = Some(last.id.clone()),
                None => return Ok(users),
            }
            users.extend(page);
        }
    }

    /// Up to `limit` rows with a key after `after`, in key order, read as `T`.
    async fn page<T: FromUserRow>(
        &self,
        table: &CheckedTable,
        after: Option<&str>,
        limit: u32,
    ) -> anyhow::Result<Vec<T>> {
        let (filter, bind) = key_filter(table, after)?;
        let sql = page_sql(table, &filter, limit);
        let rows = on_db!(self, pool => {
            let mut query = sqlx::query(&sql);
            if let Some(key) = &bind {
                query = query.bind(key);
            }
            query
                .fetch_all(pool)
                .await
                .map(|rows| rows.iter().map(T::from_row).collect::<Option<Vec<_>>>())
        })
        .map_err(|e| anyhow::anyhow!("cannot read table {:?}: {e}", table.name))?;
        // A row whose key cannot be read would end the paging early, silently.
        rows.ok_or_else(|| {
            anyhow::anyhow!(
                "table {:?} has a row whose id is neither text nor an integer",
                table.name
            )
        })
    }
}

/// A user read from one row of either kind of database.
trait FromUserRow: Sized {
    fn from_row(row: &(impl Cell + Row)) -> Option<Self>;
}

impl FromUserRow for BetterAuthUser {
    fn from_row(row: &(impl Cell + Row)) -> Option<Self> {
        better_auth_user(row)
    }
}

impl FromUserRow for PayloadUser {
    fn from_row(row: &(impl Cell + Row)) -> Option<Self> {
        payload_user(row)
    }
}

/// Rows per query when paging through a table.
pub const PAGE_ROWS: u32 = 1000;

fn as_ref(column: &Option<(String, ColumnKind)>) -> Option<(&str, ColumnKind)> {
    column.as_ref().map(|(name, kind)| (name.as_str(), *kind))
}

fn page_sql(table: &CheckedTable, filter: &str, limit: u32) -> String {
    format!(
        "SELECT {} FROM {} {filter}ORDER BY {} LIMIT {limit}",
        table.select, table.quoted, table.key
    )
}

/// The `WHERE` clause selecting keys after `after`, and the text to bind to its `$1`. An
/// integer key is compared as an integer (as text, `10` sorts before `9`); it is checked to be
/// one and written into the SQL, so no caller text reaches the SQL unchecked.
fn key_filter(
    table: &CheckedTable,
    after: Option<&str>,
) -> anyhow::Result<(String, Option<String>)> {
    match after {
        None => Ok((String::new(), None)),
        Some(key) if table.key_numeric => {
            let key: i64 = key.parse().map_err(|_| {
                anyhow::anyhow!(
                    "the key {key:?} of table {:?} should be an integer",
                    table.name
                )
            })?;
            Ok((format!("WHERE {} > {key} ", table.key), None))
        }
        Some(key) => Ok((format!("WHERE {} > $1 ", table.key), Some(key.to_string()))),
    }
}

/// Reads a cell as whatever it holds: the same column can hold text in one database and an
/// integer in another (or, in SQLite, in another row).
trait Cell {
    fn text(&self, column: &str) -> Option<String>;
    fn integer(&self, column: &str) -> Option<i64>;
    fn real(&self, column: &str) -> Option<f64>;
    fn boolean(&self, column: &str) -> Option<bool>;
}

macro_rules! impl_cell {
    ($row:ty) => {
        impl Cell for $row {
            fn text(&self, column: &str) -> Option<String> {
                self.try_get::<Option<String>, _>(column).ok().flatten()
            }
            fn integer(&self, column: &str) -> Option<i64> {
                // PostgreSQL's integer widths are distinct types (a serial id is int4).
                self.try_get::<Option<i64>, _>(column)
                    .ok()
                    .flatten()
                    .or_else(|| {
                        self.try_get::<Option<i32>, _>(column)
                            .ok()
                            .flatten()
                            .map(i64::from)
                    })
                    .or_else(|| {
                        self.try_get::<Option<i16>, _>(column)
                            .ok()
                            .flatten()
                            .map(i64::from)
                    })
            }
            fn real(&self, column: &str) -> Option<f64> {
                self.try_get::<Option<f64>, _>(column).ok().flatten()
            }
            fn boolean(&self, column: &str) -> Option<bool> {
                self.try_get::<Option<bool>, _>(column).ok().flatten()
            }
        }
    };
}
impl_cell!(SqliteRow);
impl_cell!(PgRow);

fn any_text(row: &impl Cell, column: &str) -> Option<String> {
    row.text(column)
        .or_else(|| row.integer(column).map(|i| i.to_string()))
        .or_else(|| row.real(column).map(|f| f.to_string()))
}

fn any_bool(row: &impl Cell, column: &str) -> Option<bool> {
    row.boolean(column)
        .or_else(|| row.integer(column).map(|i| i != 0))
        .or_else(|| {
            row.text(column)
                .and_then(|t| match t.trim().to_ascii_lowercase().as_str() {
                    "true" | "t" | "1" => Some(true),
                    "false" | "f" | "0" => Some(false),
                    _ => None,
                })
        })
}

/// A date cell as milliseconds since the epoch: an integer (seconds or milliseconds), a real,
/// or ISO 8601 text. `Err` holds the value that is no date.
fn any_time(row: &impl Cell, column: &str) -> Result<Option<i64>, String> {
    if let Some(i) = row.integer(column) {
        return Ok(Some(epoch_number_to_ms(i as f64)));
    }
    if let Some(f) = row.real(column) {
        return Ok(Some(epoch_number_to_ms(f)));
    }
    match row.text(column) {
        None => Ok(None),
        Some(text) => parse_time_ms(&text)
            .map(Some)
            .ok_or_else(|| format!("{column} {text:?} is not a date")),
    }
}

/// Below 10^11 a number is seconds (that is the year 5138 in seconds, 1973 in milliseconds).
fn epoch_number_to_ms(n: f64) -> i64 {
    if n.abs() < 1e11 {
        (n * 1000.0).round() as i64
    } else {
        n.round() as i64
    }
}

fn better_auth_user(row: &(impl Cell + Row)) -> Option<BetterAuthUser> {
    let id = any_text(row, "id")?;
    let mut problems = Vec::new();
    let mut time = |column: &str| match any_time(row, column) {
        Ok(ms) => ms,
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    let created_at_ms = time("createdAt");
    let updated_at_ms = time("updatedAt");
    Some(BetterAuthUser {
        email: any_text(row, "email"),
        name: any_text(row, "name"),
        email_verified: any_bool(row, "emailVerified"),
        image: any_text(row, "image"),
        created_at_ms,
        updated_at_ms,
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
        id,
    })
}

fn payload_user(row: &(impl Cell + Row)) -> Option<PayloadUser> {
    Some(PayloadUser {
        id: any_text(row, "id")?,
        better_auth_user_id: any_text(row, "better_auth_user_id"),
        email: any_text(row, "email"),
        full_name: any_text(row, "full_name"),
    })
}

/// `"name"`, with embedded quotes doubled: the table and column names come from the command
/// line and the configuration.
pub fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

fn split_schema(table: &str) -> (Option<&str>, &str) {
    match table.split_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table),
    }
}

/// `fullName` → `full_name`: how Payload's SQL adapters name the column of a field.
pub fn snake_case(field: &str) -> String {
    let mut out = String::with_capacity(field.len() + 4);
    for (i, c) in field.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses ISO 8601 / RFC 3339 date-times as databases write them: `T` or a space between date
/// and time, optional fraction, and `Z`, `+HH:MM`, `+HHMM`, `+HH` or no offset (UTC). A bare
/// date is midnight UTC; digits alone are an epoch number.
pub fn parse_time_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<f64>().ok().map(epoch_number_to_ms);
    }
    let (local, offset_minutes) = split_offset(text)?;
    let local = if local.len() == 10 {
        format!("{local}T00:00:00")
    } else {
        local.to_string()
    };
    let time = humantime::parse_rfc3339_weak(&local).ok()?;
    let ms = i64::try_from(time.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()?;
    Some(ms - offset_minutes * 60_000)
}

/// Splits a trailing UTC offset off a date-time: (local part, offset in minutes east).
fn split_offset(text: &str) -> Option<(&str, i64)> {
    if let Some(local) = text.strip_suffix(['Z', 'z']) {
        return Some((local, 0));
    }
    // An offset sign can only come after the time (the date's dashes are before index 10).
    let sign_at = text
        .char_indices()
        .skip(10)
        .find(|(_, c)| *c == '+' || *c == '-')
        .map(|(i, _)| i);
    let Some(at) = sign_at else {
        return Some((text, 0));
    };
    let (local, offset) = text.split_at(at);
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let digits: String = offset[1..].chars().filter(|c| *c != ':').collect();
    let (hours, minutes) = match digits.len() {
        2 => (digits.parse::<i64>().ok()?, 0),
        4 => (
            digits[..2].parse::<i64>().ok()?,
            digits[2..].parse::<i64>().ok()?,
        ),
        _ => return None,
    };
    Some((local, sign * (hours * 60 + minutes)))
}

/// Milliseconds since the epoch as ISO 8601 in UTC with milliseconds (`2024-05-01T12:00:00.000Z`),
/// the form Better Auth serializes dates in.
pub fn iso_ms(ms: i64) -> String {
    let time = if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_millis(ms.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    };
    humantime::format_rfc3339_millis(time).to_string()
}

/// Now, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_as_databases_write_them() {
        let base = 1_714_564_800_000; // 2024-05-01T12:00:00Z
        for (text, ms) in [
            ("2024-05-01T12:00:00Z", Some(base)),
            ("2024-05-01T12:00:00.250Z", Some(base + 250)),
            ("2024-05-01 12:00:00", Some(base)),
            ("2024-05-01 14:00:00+02:00", Some(base)),
            ("2024-05-01 14:00:00+02", Some(base)),
            ("2024-05-01T10:30:00-0130", Some(base)),
            ("2024-05-01", Some(base - 12 * 3_600_000)),
            ("1714564800", Some(base)),
            ("1714564800000", Some(base)),
            ("yesterday", None),
            ("", None),
        ] {
            assert_eq!(parse_time_ms(text), ms, "{text:?}");
        }
        assert_eq!(iso_ms(base + 5), "2024-05-01T12:00:00.005Z");
    }

    #[test]
    fn payload_column_names_are_snake_case() {
        assert_eq!(snake_case("fullName"), "full_name");
        assert_eq!(snake_case("betterAuthUserId"), "better_auth_user_id");
        assert_eq!(snake_case("email"), "email");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote("user"), "\"user\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }
}
