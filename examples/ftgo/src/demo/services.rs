//! The three services as child processes of this executable: started with their own
//! database and the shared broker, ready once they print `listening on ADDR`, killed
//! (SIGKILL) when dropped, so every exit path of the demo, Ctrl-C included, stops them.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// How long a service may take to print `listening on`.
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(30);

/// How to run one service.
#[derive(Debug, Clone)]
pub(crate) struct ServiceSpec {
    /// `restaurant-service`, `consumer-service` or `order-service`.
    pub(crate) name: &'static str,
    /// Its own database, `sqlite:FILE`.
    pub(crate) db: String,
    /// The shared broker URL.
    pub(crate) broker: String,
    /// Its stderr goes here (appended to across restarts).
    pub(crate) log: PathBuf,
}

impl ServiceSpec {
    /// `<dir>/<name>.db` and `<dir>/<name>.log` on `broker`.
    pub(crate) fn new(name: &'static str, dir: &Path, broker: &str) -> Self {
        Self {
            name,
            db: format!("sqlite:{}", dir.join(format!("{name}.db")).display()),
            broker: broker.to_owned(),
            log: dir.join(format!("{name}.log")),
        }
    }
}

/// A running service.
#[derive(Debug)]
pub(crate) struct ServiceProcess {
    pub(crate) spec: ServiceSpec,
    /// Where its REST API listens.
    pub(crate) addr: SocketAddr,
    child: Child,
}

impl ServiceProcess {
    /// Start `spec` listening on `listen` (port 0 = a free port) and wait until it prints
    /// `listening on ADDR`; on exit or stall, the error carries its log's last lines.
    pub(crate) async fn start(spec: &ServiceSpec, listen: SocketAddr) -> anyhow::Result<Self> {
        let exe =
            std::env::current_exe().context("cannot find this executable to run the services")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .with_context(|| format!("cannot open the log file {}", spec.log.display()))?;
        let mut child = Command::new(exe)
            .arg(spec.name)
            .arg("--db")
            .arg(&spec.db)
            .arg("--broker")
            .arg(&spec.broker)
            .arg("--listen")
            .arg(listen.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", spec.name))?;
        let Some(stdout) = child.stdout.take() else {
            anyhow::bail!("{}: no stdout pipe", spec.name);
        };
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(START_DEADLINE, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.trim().strip_prefix("listening on ") {
                    return Ok(Some(addr.parse::<SocketAddr>().with_context(|| {
                        format!(
                            "{} printed an address that does not parse: {line:?}",
                            spec.name
                        )
                    })?));
                }
            }
            anyhow::Ok(None)
        })
        .await;
        let addr = match ready {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let status = match status {
                    Ok(Ok(s)) => s.to_string(),
                    _ => "an unknown status".to_owned(),
                };
                anyhow::bail!(
                    "{} exited ({status}) before it was listening (--listen {listen}).{}",
                    spec.name,
                    log_tail(&spec.log)
                );
            }
            Ok(Err(e)) => {
                let _ = child.kill().await;
                return Err(e.context(format!(
                    "{} did not start.{}",
                    spec.name,
                    log_tail(&spec.log)
                )));
            }
            Err(_) => {
                let _ = child.kill().await;
                anyhow::bail!(
                    "{} did not print `listening on` within {} s.{}",
                    spec.name,
                    START_DEADLINE.as_secs(),
                    log_tail(&spec.log)
                );
            }
        };
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            spec: spec.clone(),
            addr,
            child,
        })
    }

    /// `http://ADDR`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL (kill -9) and reap it: no shutdown code runs in the service.
    pub(crate) async fn kill(&mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("cannot kill {}", self.spec.name))
    }

    /// `Some(status)` when the process has exited on its own.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// The last lines of a log file, as a paragraph for an error message.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return format!(" Its log {} is empty.", path.display());
    }
    let tail = &lines[lines.len().saturating_sub(15)..];
    format!(
        " The last lines of its log {}:\n    {}",
        path.display(),
        tail.join("\n    ")
    )
}
