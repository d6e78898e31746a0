//! Completion records: one small file per finished task in a results
//! directory, `<key>.done`, written atomically (temporary file, fsync,
//! rename) and private (0600), so that a rerun skips what finished.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Error, Location, Result};

/// The results directory: records are looked up and written there.
#[derive(Debug, Clone)]
pub(crate) struct Records {
    dir: PathBuf,
}

impl Records {
    /// Opens (creating it, 0700, if missing) the directory `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Records> {
        let err = |source| Error::Record { task: None, path: dir.to_path_buf(), source };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
        if !fs::metadata(dir).map_err(err)?.is_dir() {
            return Err(err(std::io::Error::other("not a directory")));
        }
        Ok(Records { dir: dir.to_path_buf() })
    }

    /// The record file of task `key`.
    pub(crate) fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.done", file_stem(key)))
    }

    /// Whether task `key` finished in an earlier run.
    pub(crate) fn is_done(&self, key: &str) -> bool {
        fs::symlink_metadata(self.path(key)).is_ok_and(|m| m.is_file())
    }

    /// Records that task `key` finished: a small JSON document, written to a
    /// temporary file, synced, renamed into place. The directory is not
    /// synced: a rename lost to a power failure only makes a rerun do the
    /// task again, and skipping that fsync halves the cost per task.
    pub(crate) fn write(&self, key: &str, device: Location, attempts: u32, duration: Duration) -> Result<()> {
        let path = self.path(key);
        let err = |source| Error::Record { task: Some(key.to_string()), path: path.clone(), source };
        let body = serde_json::json!({
            "task": key,
            "device": device.to_string(),
            "attempts": attempts,
            "seconds": duration.as_secs_f64(),
        });
        let tmp = self.dir.join(format!(
            ".{}.{}.{:?}.tmp",
            file_stem(key),
            std::process::id(),
            std::thread::current().id()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(body.to_string().as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            err(e)
        })
    }
}

/// A file name for a key: ASCII letters, digits, `-`, `_` and `.` (not
/// leading) kept, every other byte `%XX`; a long result is cut and ends with
/// a hash of the whole key, so names stay unique and under file-name limits.
pub(crate) fn file_stem(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for (i, b) in key.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    const MAX: usize = 160;
    if out.len() > MAX {
        out.truncate(MAX);
        out.push_str(&format!("~{:016x}", xxhash_rust::xxh3::xxh3_64(key.as_bytes())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn file_names_are_safe_and_distinct() {
        assert_eq!(file_stem("img_001.png"), "img_001.png");
        assert_eq!(file_stem("a/b c"), "a%2Fb%20c");
        assert_eq!(file_stem("../x"), "%2E.%2Fx");
        assert_eq!(file_stem(""), "%");
        assert_ne!(file_stem("a/b"), file_stem("a%2Fb"));
        let long_a = "a".repeat(300);
        let long_b = format!("{}b", "a".repeat(299));
        assert!(file_stem(&long_a).len() < 200);
        assert_ne!(file_stem(&long_a), file_stem(&long_b));
    }

    #[test]
    fn records_are_private_and_found() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(&dir.path().join("results")).unwrap();
        assert!(!records.is_done("t/1"));
        records.write("t/1", Location::Cpu, 2, Duration::from_millis(5)).unwrap();
        assert!(records.is_done("t/1"));
        let meta = fs::metadata(records.path("t/1")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dir_mode = fs::metadata(dir.path().join("results")).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let body: serde_json::Value =
            serde_json::from_slice(&fs::read(records.path("t/1")).unwrap()).unwrap();
        assert_eq!(body["task"], "t/1");
        assert_eq!(body["attempts"], 2);
        // Only the record itself is left: no temporary file.
        assert_eq!(fs::read_dir(dir.path().join("results")).unwrap().count(), 1);
    }
}
