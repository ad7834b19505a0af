//! The three FTGO services with `--db postgres://…`: real processes of the built binary,
//! each in a fresh schema of its own in one PostgreSQL database (created by the service,
//! dropped at the end), the broker on an embedded SQLite file.
//!
//! Needs `COURIER_TEST_POSTGRES_URL` (or `COURIER_TEST_PG_URL`), e.g.
//! `postgres://postgres@127.0.0.1/test`; without it the test prints why and passes,
//! except when `CI` is set, where it fails.

// Tests: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// Shared with tests/demo; not every helper is used here.
#[allow(dead_code)]
#[path = "../demo/support.rs"]
mod support;

use sqlx::postgres::PgPool;
use std::process::Command;
use support::{FTGO, Ftgo, state_events};

const SERVICES: [&str; 3] = ["restaurant-service", "consumer-service", "order-service"];

/// The server's URL, or `None` (with the reason printed) when the test should skip.
fn pg_url() -> Option<String> {
    for var in ["COURIER_TEST_POSTGRES_URL", "COURIER_TEST_PG_URL"] {
        if let Ok(url) = std::env::var(var)
            && !url.is_empty()
        {
            return Some(url);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "COURIER_TEST_POSTGRES_URL must be set in CI"
    );
    eprintln!(
        "skipping: set COURIER_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1/test to run \
         the services on PostgreSQL"
    );
    None
}

/// `url` with the connection option `search_path=<schema>`.
fn in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

/// This run's schema of `service`: unique per run, a valid identifier.
fn schema(run: &str, service: &str) -> String {
    format!("{run}_{}", service.trim_end_matches("-service"))
}

/// Drops the run's schemas when the test ends, passed or failed.
struct DropSchemas {
    url: String,
    schemas: Vec<String>,
}

impl Drop for DropSchemas {
    fn drop(&mut self) {
        let (url, schemas) = (self.url.clone(), std::mem::take(&mut self.schemas));
        // Drop runs inside the test's runtime: clean up on a thread with its own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let pool = PgPool::connect(&url).await.unwrap();
                for s in schemas {
                    let ddl = format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE");
                    sqlx::query(sqlx::AssertSqlSafe(ddl))
                        .execute(&pool)
                        .await
                        .unwrap();
                }
            });
        });
        if cleanup.join().is_err() {
            eprintln!("could not drop this run's schemas");
        }
    }
}

#[tokio::test]
async fn the_services_run_on_postgresql_each_in_its_own_schema() {
    let Some(url) = pg_url() else { return };
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let run = format!("ftgo_test_{}_{millis}", std::process::id());
    // Declared before the services: dropped after they are killed.
    let _cleanup = DropSchemas {
        url: url.clone(),
        schemas: SERVICES.iter().map(|s| schema(&run, s)).collect(),
    };
    let f = Ftgo::start_with(|_, name| in_schema(&url, &schema(&run, name)));

    let ann = f.consumer("Ann").await;
    let sam = f.suspended_consumer("Sam").await;
    let r = f
        .restaurant(&["north"], &[("dal", 8.5), ("naan", 3.0)])
        .await;
    let valid = f.order(&ann, &r, "north", &[("dal", 2)]).await;
    let suspended = f.order(&sam, &r, "north", &[("dal", 1)]).await;

    let v = f.final_order(&valid).await;
    assert_eq!(v["state"], "VALIDATED", "{v}");
    assert_eq!(v["total"], 17.0, "{v}");
    let o = f.final_order(&suspended).await;
    assert_eq!(o["state"], "REJECTED", "{o}");
    let reason = o["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("suspended"), "{o}");
    let states: Vec<String> = state_events(&f, &valid)
        .await
        .iter()
        .map(|e| e["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        states.first().map(String::as_str),
        Some("PENDING"),
        "{states:?}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("VALIDATED"),
        "{states:?}"
    );
    let (_, shown) = f
        .get(&format!("{}/restaurants/{r}", f.restaurant.url))
        .await;
    let menu: Vec<&str> = shown["menu"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(menu, ["dal", "naan"], "the menu keeps its order: {shown}");

    // The rows are in PostgreSQL, in the order service's schema, next to Courier's.
    let pool = PgPool::connect(&url).await.unwrap();
    let order_schema = schema(&run, "order-service");
    let sql = format!("SELECT state, total_cents FROM \"{order_schema}\".orders WHERE id = $1");
    let row: (String, i64) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&valid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row, ("VALIDATED".to_owned(), 1700));
    let courier_tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables
         WHERE table_schema = $1 AND table_name IN ('courier_outbox', 'courier_correlation')",
    )
    .bind(&order_schema)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(courier_tables, 2);
    pool.close().await;
}

#[test]
fn an_unreachable_database_is_an_error_naming_it_without_its_password() {
    let tmp = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let out = Command::new(FTGO)
        .args([
            "consumer-service",
            "--db",
            "postgres://ann:s3cret@127.0.0.1:1/ftgo",
            "--broker",
        ])
        .arg(format!("sqlite:{}", tmp.path().join("broker.db").display()))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("postgres://ann:***@127.0.0.1:1/ftgo"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = Command::new(FTGO)
        .args([
            "order-service",
            "--db",
            "mysql://ann:s3cret@127.0.0.1/ftgo",
            "--broker",
        ])
        .arg(format!("sqlite:{}", tmp.path().join("broker.db").display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("mysql://ann:***@127.0.0.1/ftgo"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}
