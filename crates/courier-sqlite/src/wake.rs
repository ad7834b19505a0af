//! Cross-process wake-up: a commit to a SQLite file in WAL mode writes its `-wal` file;
//! inotify on that file turns the write into a wake-up within microseconds, so readers
//! never wait on a slow fixed poll. A fallback poll still runs in case an event is missed
//! (or inotify is unavailable).
//!
//! One inotify instance per process, read by one plain thread (so it outlives any tokio
//! runtime), with one watch per `-wal` file: a process is woken only by the files it uses.

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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The process-wide waker of `path`.
pub(crate) fn waker_for(path: &Path) -> Arc<FileWaker> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut reg = lock(registry());
    if let Some(w) = reg.get(&key).and_then(Weak::upgrade) {
        return w;
    }
    let (tx, _) = watch::channel(0u64);
    let waker = Arc::new(FileWaker { tx });
    platform::watch_wal(&key, Arc::downgrade(&waker));
    reg.insert(key, Arc::downgrade(&waker));
    waker
}

#[cfg(target_os = "linux")]
mod platform {
    use super::{FileWaker, lock};
    use inotify::{Inotify, WatchDescriptor, WatchMask, Watches};
    use std::collections::HashMap;
    use std::ffi::OsString;
    use std::path::Path;
    use std::sync::{Arc, Mutex, OnceLock, Weak};

    /// Who to wake for a watch: the waker, and the file name when the watch is on a
    /// directory (fallback while the `-wal` file does not exist yet).
    type Targets = HashMap<WatchDescriptor, Vec<(Option<OsString>, Weak<FileWaker>)>>;

    struct Watcher {
        watches: Watches,
        targets: Arc<Mutex<Targets>>,
    }

    fn watcher() -> Option<&'static Mutex<Watcher>> {
        static W: OnceLock<Option<Mutex<Watcher>>> = OnceLock::new();
        W.get_or_init(|| {
            let mut inotify = match Inotify::init() {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(error = %e, "inotify unavailable; falling back to polling");
                    return None;
                }
            };
            let watches = inotify.watches();
            let targets: Arc<Mutex<Targets>> = Arc::default();
            let t = targets.clone();
            let spawned = std::thread::Builder::new()
                .name("courier-inotify".into())
                .spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let events = match inotify.read_events_blocking(&mut buf) {
                            Ok(ev) => ev,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                tracing::warn!(error = %e, "inotify read failed; falling back to polling");
                                return;
                            }
                        };
                        let mut wake: Vec<Arc<FileWaker>> = Vec::new();
                        {
                            let targets = lock(&t);
                            for ev in events {
                                let Some(list) = targets.get(&ev.wd) else { continue };
                                for (name, w) in list {
                                    if name.as_deref().is_some_and(|n| Some(n) != ev.name) {
                                        continue;
                                    }
                                    if let Some(w) = w.upgrade()
                                        && !wake.iter().any(|x| Arc::ptr_eq(x, &w))
                                    {
                                        wake.push(w);
                                    }
                                }
                            }
                        }
                        for w in wake {
                            w.bump();
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the inotify thread; falling back to polling");
                return None;
            }
            Some(Mutex::new(Watcher { watches, targets }))
        })
        .as_ref()
    }

    pub(super) fn watch_wal(db: &Path, waker: Weak<FileWaker>) {
        let Some(w) = watcher() else { return };
        let mut w = lock(w);
        let Some(name) = db.file_name() else { return };
        let mut wal_name = name.to_os_string();
        wal_name.push("-wal");
        let wal = db.with_file_name(&wal_name);
        // The -wal file exists while any connection has the database open (we opened
        // one before asking), so watch it directly; fall back to its directory.
        let (wd, filter) = match w.watches.add(&wal, WatchMask::MODIFY) {
            Ok(wd) => (wd, None),
            Err(_) => {
                let dir = db
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                match w.watches.add(
                    dir,
                    WatchMask::MODIFY | WatchMask::CREATE | WatchMask::MASK_ADD,
                ) {
                    Ok(wd) => (wd, Some(wal_name)),
                    Err(e) => {
                        tracing::warn!(error = %e, file = %db.display(), "cannot watch; falling back to polling");
                        return;
                    }
                }
            }
        };
        let mut targets = lock(&w.targets);
        let list = targets.entry(wd).or_default();
        list.retain(|(_, x)| x.strong_count() > 0);
        list.push((filter, waker));
    }
}

#[cfg(not(target_os = "linux"))]
mod platform {
    use super::FileWaker;
    use std::path::Path;
    use std::sync::Weak;

    pub(super) fn watch_wal(_db: &Path, _waker: Weak<FileWaker>) {}
}
