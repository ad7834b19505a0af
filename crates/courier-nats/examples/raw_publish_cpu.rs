//! CPU time per raw JetStream publish, in this client and in nats-server: the floor a
//! relay's cost is read against (BENCHMARKS.md, "The relay target as a CPU budget").
//! Run by `tools/cpu-per-message.sh`.
//!
//! Usage: `raw_publish_cpu NATS_SERVER_PID bare|headers MESSAGES [NATS_URL]`
//! - `bare`: 200-byte payloads, no headers (what `raw_publish_rate_per_s` measures);
//! - `headers`: the same with a bench message's headers and a `Nats-Msg-Id` each
//!   (what the relay sends).
//!
//! Prints the rate and the CPU time (user + system, from `/proc`) per message of this
//! process and of the nats-server process. Linux only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use courier_core::{Headers, Message};
use std::time::Duration;

/// CPU seconds (user + system) of process `pid` (`self` for this one).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/stat: {e}"));
    // Fields after the command name, which ends with the last ')'.
    let rest = &stat[stat.rfind(')').expect("a /proc stat line") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, server, mode, n, ..] = args.as_slice() else {
        eprintln!("usage: raw_publish_cpu NATS_SERVER_PID bare|headers MESSAGES [NATS_URL]");
        std::process::exit(2);
    };
    let n: u64 = n.parse().expect("MESSAGES: a whole number");
    let url = args.get(4).map_or("nats://127.0.0.1:4222", String::as_str);
    let mut sample = Message::new(vec![7u8; 200]);
    sample.headers = Headers::from_json(
        r#"{"content-type":"application/json","created-at":"1763942400000",
            "destination":"bench.cpu","message-type":"event","partition-key":"key-1",
            "type":"bench.Sample","type-version":"1"}"#,
    )
    .unwrap();
    let (client0, server0) = (cpu_seconds("self"), cpu_seconds(server));
    let long = Duration::from_secs(3600);
    let rate = match mode.as_str() {
        "bare" => courier_nats::raw_publish_rate(url, 200, long, n).await,
        "headers" => courier_nats::raw_publish_rate_with_headers(url, &sample, long, n).await,
        other => panic!("mode must be bare or headers, not {other}"),
    }
    .unwrap();
    let (client1, server1) = (cpu_seconds("self"), cpu_seconds(server));
    // The warm-up window is published too.
    let published = (n + 256) as f64;
    println!(
        "{mode}: {rate:.0} msg/s, CPU per message: client {:.2} us, nats-server {:.2} us",
        (client1 - client0) / published * 1e6,
        (server1 - server0) / published * 1e6,
    );
}
