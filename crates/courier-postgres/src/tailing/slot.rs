//! The replication slot and publication behind log tailing: names, idempotent creation,
//! dropping, and how much WAL the slot holds.

use crate::PgStore;
use crate::error::map;
use courier_core::{Error, ErrorKind, Result};

/// Longest slot name PostgreSQL accepts (`NAMEDATALEN - 1`).
const MAX_NAME: usize = 63;

/// `name` if PostgreSQL accepts it as a replication slot name (`[a-z0-9_]{1,63}`).
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Config,
            format!(
                "{name:?} is not a valid replication slot name: use 1 to 63 lower-case letters, digits or underscores"
            ),
        ))
    }
}

/// The default slot (and publication) name of the outbox in `schema` of `database`:
/// `courier_` + the schema (made a valid name, shortened) + a hash of both, so that two
/// outboxes on one server never share a slot.
pub(crate) fn default_name(database: &str, schema: &str) -> String {
    let mut clean: String = schema
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    clean.truncate(40);
    // FNV-1a: stable across Rust versions and processes (unlike DefaultHasher).
    let mut h: u32 = 0x811c_9dc5;
    for b in database.bytes().chain([0]).chain(schema.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("courier_{clean}_{h:08x}")
}

/// `ident` quoted as an SQL identifier.
pub(crate) fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Create the publication (inserts into this schema's `courier_outbox` only) and then the
/// logical slot (`pgoutput`), each unless it exists. The publication comes first: a slot
/// decodes WAL with the catalog as it was when the WAL was written.
pub(crate) async fn ensure(store: &PgStore, name: &str) -> Result<()> {
    let pool = store.pool();
    let describe = &store.inner.describe;
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(pool)
        .await
        .map_err(store.err("reading wal_level"))?;
    if wal_level != "logical" {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "log tailing needs wal_level = logical on {describe} (it is {wal_level}): set it in \
                 postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL, \
                 or use the polling relay"
            ),
        ));
    }

    let schema = store.schema();
    let exists: Option<bool> = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_publication_tables
                        WHERE pubname = $1 AND schemaname = $2 AND tablename = 'courier_outbox')
         FROM pg_publication WHERE pubname = $1",
    )
    .bind(name)
    .bind(schema)
    .fetch_optional(pool)
    .await
    .map_err(store.err("looking up the outbox publication"))?;
    match exists {
        Some(true) => {}
        Some(false) => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "publication {name} in {describe} does not publish {schema}.courier_outbox: \
                     another outbox uses this slot name; pick another one"
                ),
            ));
        }
        None => {
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {}.courier_outbox WITH (publish = 'insert')",
                quote_ident(name),
                quote_ident(schema)
            );
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await
                && !is_duplicate(&e)
            {
                return Err(map(format!("creating publication {name} in {describe}"), e));
            }
        }
    }

    let slot: Option<(Option<String>, Option<String>, String)> = sqlx::query_as(
        "SELECT plugin::text, database::text, current_database()::text
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
    .map_err(store.err("looking up the replication slot"))?;
    match slot {
        Some((plugin, database, current)) => {
            if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(&current) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "replication slot {name} exists but is not a pgoutput slot of database \
                         {current} (plugin {plugin:?}, database {database:?}); pick another slot name"
                    ),
                ));
            }
        }
        None => {
            // Waits until the transactions running now have finished.
            if let Err(e) = sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(name)
                .execute(pool)
                .await
                && !is_duplicate(&e)
            {
                let code = db_code(&e);
                let err = map(format!("creating replication slot {name} in {describe}"), e);
                if code.as_deref() == Some("53400") {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "{err}: every replication slot is in use; drop unused ones \
                             (SELECT pg_drop_replication_slot(name)) or raise max_replication_slots"
                        ),
                    ));
                }
                return Err(err);
            }
        }
    }
    Ok(())
}

pub(super) fn db_code(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Another process created the same object at the same moment.
fn is_duplicate(e: &sqlx::Error) -> bool {
    // duplicate_object; unique_violation on the catalog.
    matches!(db_code(e).as_deref(), Some("42710" | "23505"))
}

/// Drop slot `name` and its publication. `Ok(false)` when there was no such slot.
pub(crate) async fn drop(store: &PgStore, name: &str) -> Result<bool> {
    check_name(name)?;
    let describe = &store.inner.describe;
    let exists: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1")
            .bind(name)
            .fetch_optional(store.pool())
            .await
            .map_err(store.err("looking up the replication slot"))?;
    let mut dropped = false;
    if exists.is_some() {
        match sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(name)
            .execute(store.pool())
            .await
        {
            Ok(_) => dropped = true,
            // Dropped by someone else in between (undefined_object).
            Err(e) if db_code(&e).as_deref() == Some("42704") => {}
            Err(e) => {
                return Err(map(
                    format!(
                        "dropping replication slot {name} in {describe} (stop the relay that uses it first)"
                    ),
                    e,
                ));
            }
        }
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP PUBLICATION IF EXISTS {}",
        quote_ident(name)
    )))
    .execute(store.pool())
    .await
    .map_err(store.err("dropping the outbox publication"))?;
    Ok(dropped)
}

/// Wait (up to 5 s) until no session reads slot `name` (this process's stream ends in
/// the background when stopped).
pub(crate) async fn wait_inactive(store: &PgStore, name: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(name)
                .fetch_optional(store.pool())
                .await
                .map_err(store.err("looking up the replication slot"))?;
        if active != Some(true) || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Bytes of WAL the slot holds back (from its confirmed position to the current one), or
/// `None` when the slot does not exist.
pub(crate) async fn lag_bytes(store: &PgStore, name: &str) -> Result<Option<u64>> {
    let lag: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(name)
    .fetch_optional(store.pool())
    .await
    .map_err(store.err("reading the replication slot's lag"))?;
    Ok(lag.map(|l| l.unwrap_or(0).max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let a = default_name("test", "courier_t_0123");
        assert!(a.starts_with("courier_courier_t_0123_"), "{a}");
        check_name(&a).unwrap();
        assert_ne!(a, default_name("other", "courier_t_0123"));
        let long = default_name("d", &"Ü-x".repeat(50));
        check_name(&long).unwrap();
        assert!(check_name("Bad").is_err());
        assert!(check_name("").is_err());
        assert!(check_name(&"a".repeat(64)).is_err());
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
