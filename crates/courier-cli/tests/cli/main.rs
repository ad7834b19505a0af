//! Runs the built `courier` binary against temporary SQLite files.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use courier::core::{DeadLetterReason, DeadLetterStatus, MessageStore, NewDeadLetter};
use courier::sqlite::{SqliteBroker, SqliteStore};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tempfile::TempDir;

mod asyncapi;

/// Longest a test waits for a process it expects to finish.
const DEADLINE: Duration = Duration::from_secs(30);

/// A temporary directory with a broker and a service database path, and the binary.
struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn broker(&self) -> String {
        format!("sqlite:{}", self.dir.path().join("broker.db").display())
    }

    fn db(&self) -> String {
        format!("sqlite:{}", self.dir.path().join("service.db").display())
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_courier"));
        c.args(args)
            .current_dir(self.dir.path())
            .env_remove("COURIER_BROKER")
            .env_remove("COURIER_DB")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Run, expect success, return stdout.
    fn ok(&self, args: &[&str]) -> String {
        success(self.run(args), args)
    }

    /// Run, expect failure (status 1), return stderr.
    fn fail(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} should fail; stderr: {stderr}"
        );
        stderr
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }
}

fn success(out: Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Wait for a child to exit, at most `DEADLINE`.
fn wait(child: std::process::Child) -> Output {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(DEADLINE)
        .expect("process did not exit in time")
        .unwrap()
}

#[test]
fn help_lists_every_subcommand_with_examples() {
    let env = Env::new();
    let help = env.ok(&["--help"]);
    for sub in ["channels", "publish", "tail", "dlq", "relay", "bench"] {
        assert!(help.contains(sub), "--help does not mention {sub}:\n{help}");
    }
    for sub in ["channels", "publish", "tail", "dlq", "relay"] {
        let help = env.ok(&[sub, "--help"]);
        assert!(
            help.contains("Example"),
            "{sub} --help has no example:\n{help}"
        );
    }
    assert!(env.ok(&["relay", "--help"]).contains("courier_outbox("));
}

#[test]
fn publish_then_tail_from_beginning_as_json() {
    let env = Env::new();
    let broker = env.broker();
    let mut ids = Vec::new();
    for i in 0..3 {
        let payload = format!("{{\"n\":{i}}}");
        let key = format!("order-{i}");
        let out = env.ok(&[
            "publish",
            "--broker",
            &broker,
            "--channel",
            "orders",
            "--key",
            &key,
            "--type",
            "order.OrderPlaced",
            "--header",
            "x-tenant=acme",
            "--json",
            &payload,
        ]);
        let line = &json_lines(&out)[0];
        assert_eq!(line["channel"], "orders");
        assert!(
            line["partition"].is_u64() && line["offset"].is_u64(),
            "{line}"
        );
        ids.push(line["id"].as_str().unwrap().to_owned());
    }
    let out = env.ok(&[
        "tail",
        "--broker",
        &broker,
        "--channel",
        "orders",
        "--from-beginning",
        "--json",
        "--count",
        "3",
        "--timeout-ms",
        "5000",
    ]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 3, "{out}");
    let mut seen: Vec<&Value> = lines.iter().collect();
    seen.sort_by_key(|l| l["offset"].as_u64());
    for (i, line) in seen.iter().enumerate() {
        assert_eq!(line["channel"], "orders");
        assert_eq!(line["id"], ids[i].as_str());
        assert_eq!(line["headers"]["partition-key"], format!("order-{i}"));
        assert_eq!(line["headers"]["type"], "order.OrderPlaced");
        assert_eq!(line["headers"]["x-tenant"], "acme");
        assert_eq!(line["headers"]["content-type"], "application/json");
        assert_eq!(line["payload"]["n"], i as u64);
    }
    // The human form: partition/offset  id  type  key  payload.
    let out = env.ok(&[
        "tail",
        "--broker",
        &broker,
        "--channel",
        "orders",
        "--from-beginning",
        "--count",
        "1",
    ]);
    assert!(
        out.contains(&ids[0]) && out.contains("order.OrderPlaced  order-0  {\"n\":0}"),
        "{out}"
    );
}

#[test]
fn publish_refuses_bad_names_and_headers() {
    let env = Env::new();
    let broker = env.broker();
    let e = env.fail(&[
        "publish",
        "--broker",
        &broker,
        "--channel",
        "bad name!",
        "x",
    ]);
    assert!(e.contains("bad name!") && e.contains("--channel"), "{e}");
    let e = env.fail(&[
        "publish",
        "--broker",
        &broker,
        "--channel",
        "c",
        "--type=-t",
        "x",
    ]);
    assert!(e.contains("--type") && e.contains("-t"), "{e}");
    let e = env.fail(&[
        "publish",
        "--broker",
        &broker,
        "--channel",
        "c",
        "--header",
        "novalue",
        "x",
    ]);
    assert!(e.contains("NAME=VALUE"), "{e}");
    let e = env.fail(&["publish", "--broker", &broker, "--channel", "c"]);
    assert!(e.contains("stdin was empty"), "{e}");
}

#[test]
fn publish_lines_from_stdin() {
    let env = Env::new();
    let broker = env.broker();
    let args = [
        "publish",
        "--broker",
        &broker,
        "--channel",
        "lines",
        "--lines",
        "--json",
        "-",
    ];
    let out = success(
        env.run_with_stdin(&args, "alpha\n{\"b\":2}\n\n gamma \n"),
        &args,
    );
    assert_eq!(json_lines(&out).len(), 3, "{out}");
    // Without --lines, all of stdin is one message (the final newline dropped).
    let args = ["publish", "--broker", &broker, "--channel", "whole"];
    success(env.run_with_stdin(&args, "one\ntwo\n"), &args);

    let out = env.ok(&[
        "tail",
        "--broker",
        &broker,
        "--channel",
        "lines",
        "--from-beginning",
        "--json",
        "--count",
        "3",
        "--timeout-ms",
        "5000",
    ]);
    let mut payloads: Vec<Value> = json_lines(&out)
        .into_iter()
        .map(|l| l["payload"].clone())
        .collect();
    payloads.sort_by_key(|p| p.to_string());
    assert_eq!(
        payloads,
        vec![
            Value::from(" gamma "),
            Value::from("alpha"),
            serde_json::json!({"b": 2})
        ]
    );
    let out = env.ok(&[
        "tail",
        "--broker",
        &broker,
        "--channel",
        "whole",
        "--from-beginning",
        "--json",
        "--count",
        "1",
        "--timeout-ms",
        "5000",
    ]);
    let line = &json_lines(&out)[0];
    assert_eq!(line["payload"], "one\ntwo");
    assert_eq!(line["headers"]["content-type"], "text/plain");
}

#[test]
fn channels_shows_partitions_and_groups() {
    let env = Env::new();
    let broker = env.broker();
    env.ok(&[
        "publish",
        "--broker",
        &broker,
        "--channel",
        "orders",
        "--partitions",
        "3",
        "--key",
        "k",
        "x",
    ]);
    env.ok(&["publish", "--broker", &broker, "--channel", "orders", "y"]);
    let out = env.ok(&["channels", "--broker", &broker, "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let channels = v.as_array().unwrap();
    assert_eq!(channels.len(), 1, "{out}");
    assert_eq!(channels[0]["channel"], "orders");
    assert_eq!(channels[0]["partitions"], 3);
    assert_eq!(channels[0]["messages"], 2);
    assert_eq!(channels[0]["partition_info"].as_array().unwrap().len(), 3);

    let table = env.ok(&["channels", "--broker", &broker]);
    assert!(
        table.starts_with("CHANNEL") && table.contains("orders"),
        "{table}"
    );
    let e = env.fail(&["channels", "--broker", &broker, "--channel", "nope"]);
    assert!(e.contains("nope"), "{e}");
    // Another partition count for an existing channel is refused.
    let e = env.fail(&[
        "publish",
        "--broker",
        &broker,
        "--channel",
        "orders",
        "--partitions",
        "5",
        "z",
    ]);
    assert!(e.contains("3 partitions"), "{e}");
}

#[test]
fn read_only_commands_never_create_files() {
    let env = Env::new();
    let missing = env.dir.path().join("missing.db");
    let url = format!("sqlite:{}", missing.display());
    let e = env.fail(&["channels", "--broker", &url]);
    assert!(
        e.contains("no broker at") && e.contains("missing.db"),
        "{e}"
    );
    let e = env.fail(&["tail", "--broker", &url, "--channel", "c"]);
    assert!(e.contains("no broker at"), "{e}");
    let e = env.fail(&["dlq", "list", "--db", &url]);
    assert!(
        e.contains("no service database at") && e.contains("missing.db"),
        "{e}"
    );
    assert!(!missing.exists());

    let junk = env.dir.path().join("junk.db");
    std::fs::write(
        &junk,
        "this is not a database, just some text long enough to matter",
    )
    .unwrap();
    let e = env.fail(&["dlq", "list", "--db", &format!("sqlite:{}", junk.display())]);
    assert!(e.contains("junk.db"), "{e}");
    let e = env.fail(&["dlq", "list"]);
    assert!(e.contains("--db"), "{e}");
}

#[test]
fn other_backends_are_refused_clearly() {
    let env = Env::new();
    let e = env.fail(&["channels", "--broker", "kafka://localhost:9092"]);
    assert!(
        e.contains("backend kafka is not available for this command yet")
            && e.contains("sqlite:PATH"),
        "{e}"
    );
    let e = env.fail(&["dlq", "list", "--db", "nats://localhost:4222"]);
    assert!(e.contains("backend nats"), "{e}");
}

#[test]
fn default_broker_and_environment_variables() {
    let env = Env::new();
    env.ok(&["publish", "--channel", "here", "x"]);
    assert!(env.dir.path().join(".courier/broker.db").is_file());
    let out = env.ok(&["channels", "--json"]);
    assert!(out.contains("\"here\""), "{out}");

    let other = Env::new();
    let url = format!(
        "sqlite:{}",
        env.dir.path().join(".courier/broker.db").display()
    );
    let out = other
        .command(&["channels", "--json"])
        .env("COURIER_BROKER", url)
        .output()
        .unwrap();
    assert!(success(out, &["channels"]).contains("\"here\""));
    assert!(!other.dir.path().join(".courier").exists());
}

#[test]
fn tail_times_out_with_status_1_when_fewer_than_count_arrived() {
    let env = Env::new();
    let broker = env.broker();
    env.ok(&["publish", "--broker", &broker, "--channel", "c", "only"]);
    let args = [
        "tail",
        "--broker",
        &broker,
        "--channel",
        "c",
        "--from-beginning",
        "--count",
        "5",
        "--timeout-ms",
        "300",
    ];
    let out = env.run(&args);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only 1 of 5"));
    // Without --count, a timeout is a normal end.
    env.ok(&[
        "tail",
        "--broker",
        &broker,
        "--channel",
        "c",
        "--timeout-ms",
        "100",
    ]);
}

#[test]
fn tail_starts_at_the_head_and_follows_new_messages() {
    let env = Env::new();
    let broker = env.broker();
    env.ok(&["publish", "--broker", &broker, "--channel", "live", "old"]);
    let mut child = env
        .command(&[
            "tail",
            "--broker",
            &broker,
            "--channel",
            "live",
            "--json",
            "--count",
            "1",
            "--timeout-ms",
            "20000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Publish only once tail has read the head.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("following channel live") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "tail ended before it started following"
        );
    }
    env.ok(&["publish", "--broker", &broker, "--channel", "live", "new"]);
    let out = wait(child);
    assert!(out.status.success());
    let lines = json_lines(std::str::from_utf8(&out.stdout).unwrap());
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["payload"], "new");
}

fn dead_letter(
    message_id: &str,
    status: DeadLetterStatus,
    reason: DeadLetterReason,
) -> NewDeadLetter {
    NewDeadLetter {
        subscriber: "shipping".into(),
        channel: "orders".into(),
        message_id: message_id.into(),
        partition_key: Some("order-1".into()),
        message_type: Some("order.OrderPlaced".into()),
        headers_json:
            r#"{"destination":"orders","partition-key":"order-1","type":"order.OrderPlaced"}"#
                .into(),
        payload: bytes::Bytes::from_static(b"{\"id\":1}"),
        reason,
        error: "database is down".into(),
        attempts: 5,
        first_failed_at_ms: 1_700_000_000_000,
        last_failed_at_ms: 1_700_000_001_000,
        status,
    }
}

#[test]
fn dlq_list_show_retry_discard() {
    let env = Env::new();
    let db = env.db();
    let path = env.dir.path().join("service.db");
    env.block_on(async {
        SqliteStore::open(&path).await.unwrap();
    });
    assert_eq!(env.ok(&["dlq", "list", "--db", &db, "--json"]).trim(), "[]");
    assert!(
        env.ok(&["dlq", "list", "--db", &db])
            .contains("no dead letters")
    );
    let e = env.fail(&["dlq", "show", "999", "--db", &db]);
    assert!(e.contains("999") && e.contains("dlq list"), "{e}");

    env.block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        let first = dead_letter(
            "0190b1a0-0000-7000-8000-000000000001",
            DeadLetterStatus::Dead,
            DeadLetterReason::Permanent,
        );
        let parked = dead_letter(
            "0190b1a0-0000-7000-8000-000000000002",
            DeadLetterStatus::Parked,
            DeadLetterReason::Parked,
        );
        store.dead_letter_insert(&mut tx, &first).await.unwrap();
        store.dead_letter_insert(&mut tx, &parked).await.unwrap();
        store.commit(tx).await.unwrap();
    });

    let list = env.ok(&["dlq", "list", "--db", &db]);
    assert!(
        list.contains("shipping") && list.contains("database is down"),
        "{list}"
    );
    assert!(list.contains("2 dead letters; 1 blocked keys"), "{list}");
    let listed: Value = serde_json::from_str(&env.ok(&[
        "dlq",
        "list",
        "--db",
        &db,
        "--json",
        "--subscriber",
        "shipping",
    ]))
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let id = listed[0]["id"].as_i64().unwrap().to_string();
    let parked_id = listed[1]["id"].as_i64().unwrap().to_string();

    let shown: Value =
        serde_json::from_str(&env.ok(&["dlq", "show", &id, "--db", &db, "--json"])).unwrap();
    assert_eq!(shown["payload"]["id"], 1);
    assert_eq!(shown["headers"]["partition-key"], "order-1");
    let text = env.ok(&["dlq", "show", &id, "--db", &db]);
    assert!(
        text.contains("{\"id\":1}") && text.contains("permanent"),
        "{text}"
    );

    // A parked letter follows the one it waits behind.
    let e = env.fail(&["dlq", "retry", &parked_id, "--db", &db]);
    assert!(e.contains("parked"), "{e}");
    let out = env.ok(&["dlq", "retry", &id, "--db", &db]);
    assert!(out.contains("redrive interval"), "{out}");
    let shown: Value =
        serde_json::from_str(&env.ok(&["dlq", "show", &id, "--db", &db, "--json"])).unwrap();
    assert_eq!(shown["status"], "retry");

    let e = env.fail(&["dlq", "discard", &id, "--db", &db]);
    assert!(e.contains("--yes"), "{e}");
    let out = env.ok(&["dlq", "discard", &id, "--db", &db, "--yes"]);
    assert!(out.contains("discarded dead letter"), "{out}");
    env.fail(&["dlq", "show", &id, "--db", &db]);
    // Discarding released the message parked behind its key.
    let shown: Value =
        serde_json::from_str(&env.ok(&["dlq", "show", &parked_id, "--db", &db, "--json"])).unwrap();
    assert_eq!(shown["status"], "retry");
}

#[test]
fn relay_publishes_rows_written_by_plain_sql_and_stops_on_sigterm() {
    let env = Env::new();
    let path = env.dir.path().join("service.db");
    env.block_on(async {
        SqliteBroker::open(env.dir.path().join("broker.db"))
            .await
            .unwrap();
        let store = SqliteStore::open(&path).await.unwrap();
        // What a service in another language does: one INSERT in its own transaction.
        sqlx::query(
            "INSERT INTO courier_outbox (message_id, channel, headers, payload, created_at)
             VALUES (?, 'orders', ?, ?, ?)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(r#"{"destination":"orders","partition-key":"order-9","type":"order.OrderPlaced"}"#)
        .bind(b"{\"id\":9}".to_vec())
        .bind(courier::core::now_ms() as i64)
        .execute(store.pool())
        .await
        .unwrap();
    });
    let (db, broker) = (env.db(), env.broker());
    let relay = env
        .command(&[
            "relay",
            "--db",
            &db,
            "--broker",
            &broker,
            "--lease-ms",
            "1000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = env.ok(&[
        "tail",
        "--broker",
        &broker,
        "--channel",
        "orders",
        "--from-beginning",
        "--json",
        "--count",
        "1",
        "--timeout-ms",
        "20000",
    ]);
    let line = &json_lines(&out)[0];
    assert_eq!(line["payload"]["id"], 9);
    assert_eq!(line["headers"]["partition-key"], "order-9");

    let term = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = wait(relay);
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "relay exit {}: {logs}", out.status);
    assert!(
        logs.contains("relay is active") && logs.contains("relay stopped"),
        "{logs}"
    );
    let left: i64 = env.block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        sqlx::query_scalar("SELECT count(*) FROM courier_outbox")
            .fetch_one(store.pool())
            .await
            .unwrap()
    });
    assert_eq!(left, 0);
}

#[test]
fn relay_needs_an_existing_service_database() {
    let env = Env::new();
    let e = env.fail(&["relay", "--db", "sqlite:nope.db", "--broker", &env.broker()]);
    assert!(e.contains("no service database at nope.db"), "{e}");
}
