//! An instance's private folder under the spill root ([`PrivateDir`]) and
//! the reclaiming of dead instances' folders ([`reclaim`]); see the parent
//! module's documentation.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::OPEN_FLAGS;
use crate::error::{Error, Result};
use crate::tier::ffi;

/// Prefix of the names of instance folders under a spill root (and 32
/// random hex digits).
const FOLDER_PREFIX: &str = "sire-";

/// Checks that `dir` is still a folder no one else can change: a directory
/// (not a symlink) of this process's user that neither its group nor others
/// may write to. (An instance's own folder is 0700; the files in it are 0600.)
pub(super) fn check_private_dir(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    let me = ffi::euid();
    if !meta.file_type().is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the spill folder {} is no longer private (a directory of uid {me} that only its owner may \
                 write to): it is {} of uid {}, mode {:o}",
                dir.display(),
                if meta.file_type().is_symlink() {
                    "a symlink"
                } else if meta.file_type().is_dir() {
                    "a directory"
                } else {
                    "not a directory"
                },
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// An instance's private folder under the spill root: `sire-<32 random hex
/// digits>`, created 0700 and verified (a directory of this process's user,
/// no symlink), and locked (`flock` on the folder itself) for as long as this
/// value lives. Dropping it removes the folder.
#[derive(Debug)]
pub(crate) struct PrivateDir {
    path: PathBuf,
    /// The folder, open and locked (exclusive) for the instance's life:
    /// [`reclaim`] leaves the folder alone while it is.
    _lock: File,
}

impl PrivateDir {
    /// Creates a new private folder under `root` (made absolute first; created
    /// 0700 if missing), after reclaiming the folders of dead instances there.
    ///
    /// The root may belong to another user and be writable by others (a
    /// shared `/tmp/sire`): nothing in it is trusted. The folder is made with
    /// `mkdir` under a hidden name (which fails rather than reuse anything),
    /// checked and locked through a descriptor opened `O_NOFOLLOW`, and only
    /// then renamed to the name [`reclaim`] looks for.
    pub(crate) fn create(root: &Path) -> Result<PrivateDir> {
        let fail = |path: &Path, source: io::Error| Error::SpillDir { path: path.to_owned(), source };
        let root = std::path::absolute(root).map_err(|e| fail(root, e))?;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&root).map_err(|e| fail(&root, e))?;
        let meta = fs::metadata(&root).map_err(|e| fail(&root, e))?;
        if !meta.is_dir() {
            return Err(fail(&root, io::Error::new(io::ErrorKind::NotADirectory, "not a directory")));
        }
        let open_to_others = meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0;
        if meta.uid() != ffi::euid() && open_to_others {
            tracing::warn!(
                root = %root.display(),
                owner = meta.uid(),
                mode = format!("{:o}", meta.mode() & 0o7777),
                "the spill root belongs to another user who lets others rename its entries (no sticky bit); \
                 sire's folder in it is private and every file is checked when read, but prefer a root of your own"
            );
        }
        reclaim(&root);
        for _ in 0..8 {
            let id = ffi::random_u128().map_err(|e| fail(&root, e))?;
            let name = format!("{FOLDER_PREFIX}{id:032x}");
            let pending = root.join(format!(".{name}"));
            match fs::DirBuilder::new().mode(0o700).create(&pending) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(fail(&pending, e)),
            }
            let path = root.join(name);
            let made = Self::secure(&pending).and_then(|lock| {
                // `rename` would replace an empty directory at `path`: make
                // sure nothing is there (the name is random; this is a check).
                if fs::symlink_metadata(&path).is_ok() {
                    return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the folder name is taken"));
                }
                fs::rename(&pending, &path)?;
                Ok(lock)
            });
            return match made {
                Ok(lock) => Ok(PrivateDir { path, _lock: lock }),
                Err(e) => {
                    remove_if_ours(&pending);
                    Err(fail(&pending, e))
                }
            };
        }
        Err(fail(&root, io::Error::new(io::ErrorKind::AlreadyExists, "no free folder name after 8 tries")))
    }

    /// Opens the folder just made (`O_NOFOLLOW`, so that what is checked is
    /// what is changed), checks it is a directory of this user, sets its mode
    /// to exactly 0700 (the umask may have taken bits away) and locks it.
    fn secure(path: &Path) -> io::Result<File> {
        let dir = OpenOptions::new().read(true).custom_flags(OPEN_FLAGS | libc::O_DIRECTORY).open(path)?;
        let meta = dir.metadata()?;
        let me = ffi::euid();
        if !meta.is_dir() || meta.uid() != me {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the new folder belongs to uid {}, not to this process's user (uid {me})",
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o7777 != 0o700 {
            dir.set_permissions(fs::Permissions::from_mode(0o700))?;
        }
        dir.try_lock().map_err(|e| match e {
            fs::TryLockError::Error(e) => e,
            fs::TryLockError::WouldBlock => {
                io::Error::new(io::ErrorKind::WouldBlock, "the new folder is locked")
            }
        })?;
        Ok(dir)
    }

    /// The folder (absolute).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        remove_if_ours(&self.path);
    }
}

/// Removes `dir` and everything in it if it is a directory (not a symlink) of
/// this process's user. `remove_dir_all` follows no symlink inside it.
fn remove_if_ours(dir: &Path) -> bool {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_dir() && meta.uid() == ffi::euid() => fs::remove_dir_all(dir).is_ok(),
        _ => false,
    }
}

/// Removes the folders of dead instances under `root` and returns how many.
///
/// A folder is removed only if its name is `sire-<32 hex digits>`, it is a
/// directory (not a symlink) of this process's user with mode 0700, and it
/// can be locked: its instance is gone (a live one holds the lock on it).
/// Anything else is left alone.
pub(crate) fn reclaim(root: &Path) -> usize {
    let Ok(entries) = fs::read_dir(root) else { return 0 };
    let me = ffi::euid();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(hex) = name.to_str().and_then(|n| n.strip_prefix(FOLDER_PREFIX)) else { continue };
        if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            continue;
        }
        let path = entry.path();
        let Ok(dir) = OpenOptions::new().read(true).custom_flags(OPEN_FLAGS | libc::O_DIRECTORY).open(&path)
        else {
            continue; // not a directory, or a symlink
        };
        match dir.metadata() {
            Ok(m) if m.is_dir() && m.uid() == me && m.mode() & 0o7777 == 0o700 => {}
            _ => continue,
        }
        if dir.try_lock().is_err() {
            continue; // a live instance holds it
        }
        // The name still means the folder locked (not a replacement).
        match (fs::symlink_metadata(&path), dir.metadata()) {
            (Ok(now), Ok(locked)) if now.dev() == locked.dev() && now.ino() == locked.ino() => {}
            _ => continue,
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => {
                removed += 1;
                tracing::info!(folder = %path.display(), "removed the spill folder of a dead instance");
            }
            Err(e) => {
                tracing::warn!(folder = %path.display(), error = %e, "could not remove the spill folder of a dead instance")
            }
        }
    }
    removed
}
