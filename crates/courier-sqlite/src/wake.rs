//! Cross-process wake-up: a commit to a SQLite file in WAL mode writes its `-wal` file;
//! inotify on the file's directory turns that into a wake-up within microseconds, so
//! readers never wait on a slow fixed poll. A fallback poll still runs in case an event
//! is missed (or inotify is unavailable).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use tokio::sync::watch;

/// Wakes everyone in this process who waits on one database file.
#[derive(Debug)]
pub(crate) struct FileWaker {
    tx: watch::Sender<u64>,
}

impl FileWaker {
    /// Tell local waiters that the file changed (used right after a local commit).
    pub(crate) fn bump(&self) {
        self.tx.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that sees every later bump.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<FileWaker>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Weak<FileWaker>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The process-wide waker of `path` (one inotify watch per file and process).
pub(crate) fn waker_for(path: &Path) -> Arc<FileWaker> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut reg = match registry().lock() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    };
    if let Some(w) = reg.get(&key).and_then(Weak::upgrade) {
        return w;
    }
    let (tx, _) = watch::channel(0u64);
    let waker = Arc::new(FileWaker { tx });
    watch_file(&key, Arc::downgrade(&waker));
    reg.insert(key, Arc::downgrade(&waker));
    waker
}

#[cfg(target_os = "linux")]
fn watch_file(path: &Path, waker: Weak<FileWaker>) {
    use futures::StreamExt;
    use inotify::{Inotify, WatchMask};

    let Some(dir) = path.parent().map(|d| {
        if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        }
    }) else {
        return;
    };
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let wal = format!("{name}-wal");
    let inotify = match Inotify::init() {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; falling back to polling");
            return;
        }
    };
    if let Err(e) = inotify
        .watches()
        .add(dir, WatchMask::MODIFY | WatchMask::CREATE)
    {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch directory; falling back to polling");
        return;
    }
    let mut stream = match inotify.into_event_stream(vec![0u8; 4096]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "inotify stream failed; falling back to polling");
            return;
        }
    };
    tokio::spawn(async move {
        while let Some(ev) = stream.next().await {
            let Some(w) = waker.upgrade() else { return };
            if let Ok(ev) = ev
                && ev.name.is_some_and(|n| n.to_string_lossy() == wal.as_str())
            {
                w.bump();
            }
        }
    });
}

#[cfg(not(target_os = "linux"))]
fn watch_file(_path: &Path, _waker: Weak<FileWaker>) {}
