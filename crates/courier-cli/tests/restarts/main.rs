//! Servers restarted mid-stream: `courier bench` (producers + relay in one process, a
//! consumer group member in another) runs at a steady load while PostgreSQL or NATS is
//! taken down and brought back; the run must end with every message applied exactly once.
//! While the server is down the processes must stay up and must not spin (their CPU use
//! over the outage is measured).
//!
//! These tests stop and start the SHARED local servers (as `.ci/run` starts them), so they
//! run one at a time (a process-wide lock) and always leave the server running. They need
//! COURIER_TEST_POSTGRES_URL and COURIER_TEST_NATS_URL pointing at this machine; without
//! them they skip, except under CI where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};
use support::*;

/// Messages per run: ~10 s of load at the bench's 300 msg/s.
const MESSAGES: u64 = 3000;
/// How long a server stays down: long enough for the clients to notice and retry.
const OUTAGE: Duration = Duration::from_secs(3);
/// NATS stays down longer: past async-nats' 5 s JetStream ack timeout, so the relay's
/// publishes fail and are retried (deduplicated by message id), not merely delayed.
const NATS_OUTAGE: Duration = Duration::from_secs(8);
/// Most CPU (in cores) the bench and its consumer may use while the server is down: a
/// loop retrying without backoff burns a whole core.
const MAX_CORES_WHILE_DOWN: f64 = 0.5;
/// Most log lines per second while the server is down: each retrying loop (relay,
/// heartbeat, each partition's fetcher, producers, listener) backs off to one attempt
/// every second or more.
const MAX_LOG_LINES_PER_S: f64 = 30.0;

/// Wait until a fifth of the messages were handled (the stream is well under way).
fn wait_for_progress(bench: &mut Bench, pg: &str) {
    let prefix = bench.prefix.clone();
    wait_for(
        "the consumer to handle a fifth of the messages",
        Duration::from_secs(90),
        || {
            bench.assert_running();
            effects(pg, &prefix) >= (MESSAGES / 5) as i64
        },
    );
}

/// Keep the server down for `outage` and check the bench stays up and calm meanwhile:
/// little CPU, warnings at a backed-off rate.
fn ride_out_outage(bench: &mut Bench, what: &str, outage: Duration) {
    let cpu = bench.cpu_seconds();
    let logged = bench.stderr().len();
    let start = Instant::now();
    // The outage itself, not a synchronisation: the server is down for this long.
    std::thread::sleep(outage);
    let secs = start.elapsed().as_secs_f64();
    let cores = (bench.cpu_seconds() - cpu) / secs;
    let stderr = bench.stderr();
    let during = stderr.get(logged..).unwrap_or_default();
    let lines = during.lines().count() as f64;
    bench.assert_running();
    eprintln!(
        "while {what} was down the bench used {cores:.2} cores and wrote {lines} log lines in {secs:.1} s:\n{}",
        during.chars().take(3000).collect::<String>()
    );
    assert!(
        cores < MAX_CORES_WHILE_DOWN,
        "while {what} was down the bench used {cores:.2} cores: a retry loop without backoff?\n{stderr}"
    );
    assert!(
        lines / secs <= MAX_LOG_LINES_PER_S,
        "while {what} was down the bench logged {lines} lines in {secs:.1} s: retries without backoff?\n{during}"
    );
}

fn check(report: &serde_json::Value, started: Instant) {
    assert_eq!(report["messages"], MESSAGES, "{report}");
    eprintln!(
        "run ok in {:?}: lost {}, duplicates applied {}, p99 {} ms",
        started.elapsed(),
        report["lost"],
        report["duplicates_applied"],
        report["latency_ms"]["p99"]
    );
}

#[test]
fn nats_killed_and_restarted_under_postgres_services() {
    let (Some(pg), Some(url)) = (pg(), nats()) else {
        return;
    };
    let Some(nats) = Nats::local(&url) else {
        return;
    };
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut bench = Bench::start(MESSAGES, &["--db", &pg, "--broker", &url]);
    wait_for_progress(&mut bench, &pg);
    let down = nats.kill9();
    ride_out_outage(&mut bench, "NATS", NATS_OUTAGE);
    down.start();
    let report = bench.finish();
    check(&report, started);
}

#[test]
fn postgres_restarted_under_nats_broker() {
    let (Some(pg), Some(url)) = (pg(), nats()) else {
        return;
    };
    let Some(server) = Postgres::local(&pg) else {
        return;
    };
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut bench = Bench::start(MESSAGES, &["--db", &pg, "--broker", &url]);
    wait_for_progress(&mut bench, &pg);
    let down = server.stop(PgMode::Fast);
    ride_out_outage(&mut bench, "PostgreSQL", OUTAGE);
    down.start();
    let report = bench.finish();
    check(&report, started);
}

#[test]
fn postgres_crashed_and_restarted_under_postgres_broker() {
    let Some(pg) = pg() else {
        return;
    };
    let Some(server) = Postgres::local(&pg) else {
        return;
    };
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut bench = Bench::start(MESSAGES, &["--db", &pg, "--broker", &pg]);
    wait_for_progress(&mut bench, &pg);
    let down = server.stop(PgMode::Immediate);
    ride_out_outage(&mut bench, "PostgreSQL", OUTAGE);
    down.start();
    let report = bench.finish();
    check(&report, started);
}

#[test]
fn rabbitmq_restarted_under_postgres_services() {
    let (Some(pg), Some(url)) = (pg(), amqp()) else {
        return;
    };
    let Some(rabbit) = Rabbit::local(&url) else {
        return;
    };
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut bench = Bench::start(MESSAGES, &["--db", &pg, "--broker", &url]);
    wait_for_progress(&mut bench, &pg);
    let down = rabbit.stop();
    ride_out_outage(&mut bench, "RabbitMQ", OUTAGE);
    down.start();
    let report = bench.finish();
    check(&report, started);
}
