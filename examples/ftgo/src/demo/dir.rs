//! The demo's working directory: wiped at the start of each run, but only when it is
//! one the demo made (it carries a marker file) or is empty, so `--dir ~` cannot delete a
//! home directory.

use anyhow::Context as _;
use std::path::Path;

/// The file that marks a directory as the demo's own.
pub(crate) const MARKER: &str = ".ftgo-demo";

/// Make `dir` an empty demo directory: create it, or wipe it when it is empty or carries
/// the marker; refuse any other directory.
pub(crate) fn prepare(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir)
            .with_context(|| format!("--dir {}: cannot read the directory", dir.display()))?;
        let empty = entries.next().is_none();
        if !empty && !dir.join(MARKER).exists() {
            anyhow::bail!(
                "--dir {}: the directory is not empty and was not made by `ftgo demo` \
                 (it has no {MARKER} file); the demo wipes its directory at the start of \
                 each run, so pick a new path or an empty directory",
                dir.display()
            );
        }
        if !empty {
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let path = entry.path();
                let removed = if entry.file_type()?.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
    } else {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--dir {}: cannot create the directory", dir.display()))?;
    }
    std::fs::write(
        dir.join(MARKER),
        "made by `ftgo demo`, which wipes this directory at the start of each run\n",
    )
    .with_context(|| format!("cannot write into {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipes_its_own_directory_and_refuses_others() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("demo");
        prepare(&dir).unwrap();
        std::fs::write(dir.join("broker.db"), "x").unwrap();
        prepare(&dir).unwrap();
        assert!(!dir.join("broker.db").exists());
        assert!(dir.join(MARKER).exists());

        let foreign = tmp.path().join("home");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("thesis.tex"), "x").unwrap();
        let e = prepare(&foreign).unwrap_err().to_string();
        assert!(e.contains("not made by `ftgo demo`"), "{e}");
        assert!(foreign.join("thesis.tex").exists());
    }
}
