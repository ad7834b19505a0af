//! Shared pieces of the restart tests: server URLs, the one-at-a-time lock, the bench
//! child process, and control of the local PostgreSQL and NATS servers.

use serde_json::Value;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The tests restart shared servers: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Take the one-at-a-time lock (a failed earlier test does not poison the others).
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(100);

/// The URL in `var`; skip (None, with a printed reason) when unset, fail under CI.
pub(crate) fn env_url(var: &str, example: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ if std::env::var_os("CI").is_some() => panic!("{var} must be set in CI"),
        _ => {
            eprintln!("skipping: set {var}={example}");
            None
        }
    }
}

pub(crate) fn pg() -> Option<String> {
    env_url(
        "COURIER_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

pub(crate) fn nats() -> Option<String> {
    env_url("COURIER_TEST_NATS_URL", "nats://127.0.0.1:4222")
}

/// Wait until `cond` holds, polling, or panic with `what` after `limit`.
pub(crate) fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
    start.elapsed()
}

fn unique() -> String {
    uuid::Uuid::now_v7().simple().to_string()[16..].to_owned()
}

/// `host:port` of a `scheme://[user[:pw]@]host[:port][/...]` URL.
fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    }
}

fn port_open(addr: &str) -> bool {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

/// True when the URL names a server on this machine (only those can be restarted).
fn is_local(url: &str) -> bool {
    let hp = host_port(url, 0);
    let host = hp.rsplit_once(':').map_or(hp.as_str(), |(h, _)| h);
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

/// Skip (None) when `url` is not a local server this test can restart with `tool`; fail
/// under CI.
fn restartable(url: &str, tool: &str) -> bool {
    let found = Path::new(tool).exists();
    if is_local(url) && found {
        return true;
    }
    let why = format!(
        "skipping: restarting needs the local server and {tool} (url {url}, local {}, tool found {found})",
        is_local(url)
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("{why}");
    false
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// How to take PostgreSQL down.
#[derive(Clone, Copy, Debug)]
pub(crate) enum PgMode {
    /// `pg_ctl -m fast`: sessions are terminated, a clean shutdown checkpoint.
    Fast,
    /// `pg_ctl -m immediate`: like a crash; crash recovery at the next start.
    Immediate,
}

/// The local PostgreSQL cluster (Debian's pg_ctlcluster).
pub(crate) struct Postgres {
    url: String,
    version: String,
}

const PG_CTLCLUSTER: &str = "/usr/bin/pg_ctlcluster";

impl Postgres {
    /// The local cluster behind `url`, or None (printed reason) when it cannot be
    /// restarted from here.
    pub(crate) fn local(url: &str) -> Option<Self> {
        if !restartable(url, PG_CTLCLUSTER) {
            return None;
        }
        let version = std::fs::read_dir("/etc/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .max()?;
        Some(Self {
            url: url.to_owned(),
            version,
        })
    }

    fn ctl(&self, action: &str, mode: Option<PgMode>) -> bool {
        let mut cmd = Command::new(PG_CTLCLUSTER);
        cmd.args(["--skip-systemctl-redirect", &self.version, "main", action]);
        if let Some(m) = mode {
            cmd.args([
                "-m",
                match m {
                    PgMode::Fast => "fast",
                    PgMode::Immediate => "immediate",
                },
            ]);
        }
        let out = cmd.output().expect("running pg_ctlcluster");
        if !out.status.success() {
            eprintln!(
                "pg_ctlcluster {action}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    /// True when a session can be opened and a query answered.
    pub(crate) fn accepts(&self) -> bool {
        rt().block_on(async {
            let Ok(opts) = self.url.parse::<sqlx::postgres::PgConnectOptions>() else {
                return false;
            };
            let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(2), async {
                use sqlx::ConnectOptions;
                opts.connect().await
            })
            .await
            else {
                return false;
            };
            sqlx::query("SELECT 1").execute(&mut c).await.is_ok()
        })
    }

    /// Start the server if it does not answer.
    fn ensure_up(&self) {
        if !self.accepts() {
            self.ctl("start", None);
        }
    }

    /// Stop the server (`mode`) and return a guard that starts it again when dropped
    /// (also on panic).
    pub(crate) fn stop(&self, mode: PgMode) -> PgDown<'_> {
        let guard = PgDown(self);
        assert!(self.ctl("stop", Some(mode)), "stopping PostgreSQL");
        guard
    }
}

/// PostgreSQL is down; dropping this starts it again and waits until it answers.
pub(crate) struct PgDown<'a>(&'a Postgres);

impl PgDown<'_> {
    /// Start the server and wait until it answers.
    pub(crate) fn start(self) -> Duration {
        let start = Instant::now();
        drop(self);
        start.elapsed()
    }
}

impl Drop for PgDown<'_> {
    fn drop(&mut self) {
        self.0.ensure_up();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.0.accepts() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if !std::thread::panicking() {
            assert!(self.0.accepts(), "PostgreSQL did not come back in 60 s");
        }
    }
}

/// Rows in the consumer's effects table of the bench with `prefix` on the PostgreSQL at
/// `url` (0 if none yet or the server is unreachable).
pub(crate) fn effects(url: &str, prefix: &str) -> i64 {
    rt().block_on(async {
        use sqlx::Connection;
        let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(2), sqlx::PgConnection::connect(url)).await
        else {
            return 0;
        };
        let n = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {prefix}_consumer.effects"
        )))
        .fetch_one(&mut c)
        .await
        .unwrap_or(0);
        let _ = c.close().await;
        n
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// NATS

const NATS_SERVER: &str = "/usr/sbin/nats-server";
const START_STOP_DAEMON: &str = "/usr/sbin/start-stop-daemon";

/// The local nats-server (started as `.ci/run` starts it).
pub(crate) struct Nats {
    addr: String,
}

impl Nats {
    pub(crate) fn local(url: &str) -> Option<Self> {
        if !restartable(url, NATS_SERVER) || !restartable(url, START_STOP_DAEMON) {
            return None;
        }
        Some(Self {
            addr: host_port(url, 4222),
        })
    }

    /// The pids of running nats-server processes (found by their executable).
    fn pids() -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|exe| exe == Path::new(NATS_SERVER))
            })
            .collect()
    }

    /// True when the server greets a client (its INFO line).
    pub(crate) fn accepts(&self) -> bool {
        let Some(addr) = self.addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
            return false;
        };
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).is_ok() && &buf == b"INFO"
    }

    fn start(&self) {
        let port = self.addr.rsplit_once(':').map_or("4222", |(_, p)| p);
        let out = Command::new(START_STOP_DAEMON)
            .args(["--start", "--oknodo", "--background", "--exec", NATS_SERVER])
            .args(["--", "-a", "127.0.0.1", "-p", port, "-js"])
            .args([
                "-sd",
                "/var/lib/nats-server",
                "-l",
                "/var/log/nats-server.log",
            ])
            .output()
            .expect("running start-stop-daemon");
        assert!(
            out.status.success(),
            "starting nats-server: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILL the server (no clean shutdown) and return a guard that starts it again
    /// when dropped (also on panic).
    pub(crate) fn kill9(&self) -> NatsDown<'_> {
        let pids = Self::pids();
        assert!(!pids.is_empty(), "no running {NATS_SERVER} to kill");
        for pid in &pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        wait_for("nats-server to die", Duration::from_secs(10), || {
            !port_open(&self.addr) && Self::pids().is_empty()
        });
        NatsDown { nats: self }
    }
}

/// NATS is down; dropping this starts it again and waits until it answers.
pub(crate) struct NatsDown<'a> {
    nats: &'a Nats,
}

impl NatsDown<'_> {
    /// Start the server and wait until it answers.
    pub(crate) fn start(self) -> Duration {
        let start = Instant::now();
        drop(self);
        start.elapsed()
    }
}

impl Drop for NatsDown<'_> {
    fn drop(&mut self) {
        if !self.nats.accepts() {
            self.nats.start();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.nats.accepts() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if !std::thread::panicking() {
            assert!(self.nats.accepts(), "nats-server did not come back in 30 s");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The bench

/// A running `courier bench --json` child process.
pub(crate) struct Bench {
    pub(crate) prefix: String,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Bench {
    /// Start `courier bench` with a steady load and `extra` arguments.
    pub(crate) fn start(messages: u64, extra: &[&str]) -> Self {
        let prefix = format!("courier_r_{}", unique());
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let mut args: Vec<String> = [
            "bench",
            "--rate",
            "300",
            "--messages",
            &messages.to_string(),
            "--timeout-secs",
            "180",
            "--schema-prefix",
            &prefix,
            // The relay-alone measurement has nothing to do with restarts.
            "--relay-messages",
            "0",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(&args)
            .env("RUST_LOG", "warn,lapin=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("starting courier bench");
        Self {
            prefix,
            child: Some(child),
            log,
            _dir: dir,
            args,
        }
    }

    /// What the bench (and its consumer process) wrote to stderr so far.
    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panic (with the log) if the bench already exited.
    pub(crate) fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!(
                "courier bench exited early ({status}); stderr:\n{}",
                self.stderr()
            );
        }
    }

    /// The bench's own process and its children (the consumer process).
    pub(crate) fn pids(&self) -> Vec<u32> {
        let Some(me) = self.child.as_ref().map(Child::id) else {
            return Vec::new();
        };
        let mut pids = vec![me];
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.filter_map(|e| e.ok()) {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if proc_stat(pid).is_some_and(|s| s.ppid == me) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// CPU seconds used so far by the bench and its consumer process.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        self.pids()
            .into_iter()
            .filter_map(proc_stat)
            .map(|s| s.cpu_ticks as f64 / 100.0)
            .sum()
    }

    /// Wait for the bench to exit; assert it succeeded and lost nothing.
    pub(crate) fn finish(mut self) -> Value {
        let mut child = self.child.take().unwrap();
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        let status = child.wait().unwrap();
        let stderr = self.stderr();
        assert!(
            status.success(),
            "courier {:?} failed ({status}):\nstdout: {stdout}\nstderr:\n{stderr}",
            self.args
        );
        let report: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("bench printed no JSON ({e}): {stdout}\n{stderr}"));
        assert_eq!(report["lost"], 0, "{report}\n{stderr}");
        assert_eq!(report["duplicates_applied"], 0, "{report}\n{stderr}");
        report
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::io::stderr().write_all(self.stderr().as_bytes());
        }
    }
}

struct Stat {
    ppid: u32,
    cpu_ticks: u64,
}

/// `/proc/PID/stat`: parent pid and user + system CPU time (clock ticks, 100 per s).
fn proc_stat(pid: u32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        cpu_ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    })
}

// ---------------------------------------------------------------------------------------
// RabbitMQ

pub(crate) fn amqp() -> Option<String> {
    env_url(
        "COURIER_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

const RABBITMQCTL: &str = "/usr/sbin/rabbitmqctl";

/// The local RabbitMQ node: its application is stopped and started (the Erlang node stays
/// up), which closes every connection and the listener, as a broker restart does.
pub(crate) struct Rabbit {
    addr: String,
}

impl Rabbit {
    pub(crate) fn local(url: &str) -> Option<Self> {
        if !restartable(url, RABBITMQCTL) {
            return None;
        }
        Some(Self {
            addr: host_port(url, 5672),
        })
    }

    fn ctl(action: &str) -> bool {
        let out = Command::new(RABBITMQCTL)
            .arg(action)
            .output()
            .expect("running rabbitmqctl");
        if !out.status.success() {
            eprintln!(
                "rabbitmqctl {action}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    /// True when the broker answers the AMQP 0-9-1 protocol header with a frame.
    pub(crate) fn accepts(&self) -> bool {
        let Some(addr) = self.addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
            return false;
        };
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut frame_type = [0u8; 1];
        s.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
            && s.read_exact(&mut frame_type).is_ok()
            && frame_type[0] == 1
    }

    /// Stop the broker application and return a guard that starts it again when dropped
    /// (also on panic).
    pub(crate) fn stop(&self) -> RabbitDown<'_> {
        let guard = RabbitDown(self);
        assert!(Self::ctl("stop_app"), "stopping RabbitMQ");
        guard
    }
}

/// RabbitMQ is down; dropping this starts it again and waits until it answers.
pub(crate) struct RabbitDown<'a>(&'a Rabbit);

impl RabbitDown<'_> {
    /// Start the broker and wait until it answers.
    pub(crate) fn start(self) -> Duration {
        let start = Instant::now();
        drop(self);
        start.elapsed()
    }
}

impl Drop for RabbitDown<'_> {
    fn drop(&mut self) {
        Rabbit::ctl("start_app");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.0.accepts() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if !std::thread::panicking() {
            assert!(self.0.accepts(), "RabbitMQ did not come back in 60 s");
        }
    }
}
