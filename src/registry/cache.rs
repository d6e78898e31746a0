//! The cache folders: where each file of a model lives on disk (sire's own
//! cache, or Hugging Face's hub cache for `hf://` files), safe folder
//! creation, file locks, and the sha256 sidecars that spare re-hashing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::catalogue::{Entry, FileSpec};
use super::source::Source;
use crate::{Error, Result};

/// The two caches the registry uses.
///
/// | cache | first of |
/// |---|---|
/// | sire's (`https://`, `http://`, `file://` files) | `SIRE_CACHE_HOME`, `$XDG_CACHE_HOME/sire`, `~/.cache/sire` |
/// | Hugging Face's (`hf://` files) | `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub` |
///
/// In sire's cache each model type has a folder (`torchscript/`,
/// `safetensors/`, `lora/`, ...) and a file lives at its catalogue path
/// under it. The hub cache has the layout of the Python `huggingface_hub`
/// (`models--org--name/{blobs,snapshots,refs}`, locks under `.locks/`), so
/// the two share what either downloaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheDirs {
    /// sire's own cache.
    pub sire: PathBuf,
    /// Hugging Face's hub cache.
    pub hf: PathBuf,
}

impl CacheDirs {
    /// The folders the environment names (see the table above).
    pub fn from_env() -> CacheDirs {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = var("HOME").unwrap_or_else(|| PathBuf::from("/"));
        let xdg = var("XDG_CACHE_HOME").unwrap_or_else(|| home.join(".cache"));
        let sire = var("SIRE_CACHE_HOME").unwrap_or_else(|| xdg.join("sire"));
        let hf = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .unwrap_or_else(|| xdg.join("huggingface").join("hub"));
        CacheDirs { sire, hf }
    }

    /// `models--org--name` for a repository id.
    pub(crate) fn repo_folder(&self, repo: &str) -> PathBuf {
        self.hf.join(format!("models--{}", repo.replace('/', "--")))
    }
}

/// Where one file of a model lives.
#[derive(Debug, Clone)]
pub(crate) enum Place {
    /// In sire's cache: `root/<type>/<path>`.
    Sire { root: PathBuf, rel: String },
    /// In the hub cache, under `repo_dir`: `snapshots/<commit>/<path>`, the
    /// commit known when the revision is one or `refs/<revision>` exists.
    Hf { repo_dir: PathBuf, repo: String, path: String, revision: String },
}

impl Place {
    pub(crate) fn of(dirs: &CacheDirs, entry: &Entry, file: &FileSpec) -> Place {
        match &file.source {
            Some(Source::Hf { repo, path, revision }) => Place::Hf {
                repo_dir: dirs.repo_folder(repo),
                repo: repo.clone(),
                path: path.clone(),
                revision: revision.clone(),
            },
            _ => Place::Sire { root: dirs.sire.join(entry.model_type.as_str()), rel: file.path.clone() },
        }
    }

    /// The file's path when it is known without the network.
    pub(crate) fn local(&self) -> Option<PathBuf> {
        match self {
            Place::Sire { root, rel } => Some(root.join(rel)),
            Place::Hf { repo_dir, path, revision, .. } => {
                let commit = if is_commit(revision) {
                    revision.clone()
                } else {
                    let r = fs::read_to_string(ref_path(repo_dir, revision)?).ok()?;
                    let r = r.trim().to_string();
                    if !is_commit(&r) {
                        return None;
                    }
                    r
                };
                Some(repo_dir.join("snapshots").join(commit).join(path))
            }
        }
    }
}

/// A full commit sha: 40 lowercase hex digits.
pub(crate) fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `repo_dir/refs/<revision>`, when the revision is a plain relative path
/// (only normal components) so that the result stays under `refs/`.
pub(crate) fn ref_path(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let rel = Path::new(revision);
    if revision.is_empty()
        || revision.contains('\\')
        || !rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    let refs = repo_dir.join("refs");
    let path = refs.join(rel);
    path.starts_with(&refs).then_some(path)
}

/// Checks that the file at `root/rel` is reached without symlinks (for the
/// hub cache: only through the final snapshot link, which must point into the
/// repository's `blobs/`) and returns its metadata, or `None` if absent.
pub(crate) fn inspect(key: &str, place: &Place, path: &Path) -> Result<Option<fs::Metadata>> {
    let (root, final_link_ok, blobs) = match place {
        Place::Sire { root, .. } => (root.clone(), false, None),
        Place::Hf { repo_dir, .. } => (repo_dir.join("snapshots"), true, Some(repo_dir.join("blobs"))),
    };
    let rel = match path.strip_prefix(&root) {
        Ok(r) => r,
        Err(_) => return unsafe_path(key, path, "not under its cache folder"),
    };
    let mut cur = root.clone();
    let n = rel.components().count();
    for (i, c) in rel.components().enumerate() {
        cur.push(c);
        let meta = match fs::symlink_metadata(&cur) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Cache { path: cur, source: e }),
        };
        let last = i + 1 == n;
        if meta.file_type().is_symlink() {
            if !(last && final_link_ok) {
                return unsafe_path(key, &cur, "a symlink in the cache leads out of it");
            }
            let target = match fs::canonicalize(&cur) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::Cache { path: cur, source: e }),
            };
            let blobs = blobs.as_ref().and_then(|b| fs::canonicalize(b).ok());
            if blobs.is_none_or(|b| target.parent() != Some(b.as_path())) {
                return unsafe_path(
                    key,
                    &cur,
                    "the snapshot link does not point into the repository's blobs/",
                );
            }
            let meta = fs::metadata(&target).map_err(|e| Error::Cache { path: target.clone(), source: e })?;
            if !meta.is_file() {
                return unsafe_path(key, &target, "not a regular file");
            }
            return Ok(Some(meta));
        }
        if last {
            if !meta.is_file() {
                return unsafe_path(key, &cur, "not a regular file");
            }
            return Ok(Some(meta));
        } else if !meta.is_dir() {
            return unsafe_path(key, &cur, "not a directory");
        }
    }
    Ok(None)
}

fn unsafe_path<T>(key: &str, path: &Path, reason: &str) -> Result<T> {
    Err(Error::UnsafePath { key: key.into(), path: path.display().to_string(), reason: reason.into() })
}

/// Creates `root/rel`'s folders (0700), refusing any symlink below `root`.
pub(crate) fn make_dirs(key: &str, root: &Path, rel: &Path) -> Result<()> {
    let mkdir = |p: &Path| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(p)
            .map_err(|e| Error::Cache { path: p.into(), source: e })
    };
    mkdir(root)?;
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return unsafe_path(key, &cur, "a symlink in the cache leads out of it")
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return unsafe_path(key, &cur, "not a directory"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match fs::DirBuilder::new().mode(0o700).create(&cur) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::Cache { path: cur, source: e }),
                }
            }
            Err(e) => return Err(Error::Cache { path: cur, source: e }),
        }
    }
    Ok(())
}

/// An exclusive `flock` on a lock file, released on drop. The same lock the
/// Python `huggingface_hub` takes (`filelock` uses `flock`).
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Takes the lock, waiting for it (and saying so) at most `timeout`
    /// ([`Error::LockTimeout`], naming the lock file).
    pub(crate) fn acquire(path: &Path, timeout: Duration) -> Result<FileLock> {
        let cache_err = |e: io::Error| Error::Cache { path: path.to_path_buf(), source: e };
        if let Some(dir) = path.parent() {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(cache_err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(cache_err)?;
        use std::os::fd::AsRawFd;
        let started = Instant::now();
        let mut said = false;
        loop {
            // SAFETY: `file` is an open descriptor owned by this function.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {}
                _ => return Err(cache_err(e)),
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(Error::LockTimeout { path: path.to_path_buf(), waited });
            }
            if !said {
                tracing::info!("waiting for lock {}", path.display());
                said = true;
            }
            std::thread::sleep(Duration::from_millis(50).min(timeout - waited));
        }
        Ok(FileLock { _file: file })
    }
}

/// The sha256 of a file, as 64 lowercase hex digits.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let mut f = File::open(path).map_err(|e| Error::Cache { path: path.into(), source: e })?;
    let mut h = Sha256::new();
    hash_reader(&mut f, &mut h).map_err(|e| Error::Cache { path: path.into(), source: e })?;
    Ok(hex(&h.finalize()))
}

pub(crate) fn hash_reader(r: &mut impl Read, h: &mut Sha256) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a sidecar remembers of a hashed file.
#[derive(Serialize, Deserialize, PartialEq, Eq)]
struct Sidecar {
    path: PathBuf,
    size: u64,
    mtime_ns: i128,
    /// Inode, device and change time: a file replaced or rewritten with the
    /// same size and a restored mtime still has new ones.
    ino: u64,
    dev: u64,
    ctime_ns: i128,
    sha256: String,
}

/// The file's real path (links resolved: a hub snapshot link and its blob
/// share one sidecar), or the path as given when it cannot be resolved.
fn real(file: &Path) -> PathBuf {
    fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf())
}

fn sidecar_path(dirs: &CacheDirs, real: &Path) -> PathBuf {
    let id = hex(&Sha256::digest(real.as_os_str().as_encoded_bytes()));
    dirs.sire.join(".validated").join(format!("{}.json", &id[..32]))
}

fn mtime_ns(m: &fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

fn ctime_ns(m: &fs::Metadata) -> i128 {
    m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128
}

impl Sidecar {
    fn of(path: PathBuf, meta: &fs::Metadata, sha256: String) -> Sidecar {
        Sidecar {
            path,
            size: meta.len(),
            mtime_ns: mtime_ns(meta),
            ino: meta.ino(),
            dev: meta.dev(),
            ctime_ns: ctime_ns(meta),
            sha256,
        }
    }
}

/// The sha256 of `file` (whose metadata is `meta`): from its sidecar when
/// the size, modification and change times, inode and device still match,
/// else hashed and remembered.
/// A sidecar that cannot be written (a read-only cache) is skipped.
pub(crate) fn sha256_cached(dirs: &CacheDirs, file: &Path, meta: &fs::Metadata) -> Result<String> {
    let real = real(file);
    let side = sidecar_path(dirs, &real);
    if let Ok(text) = fs::read_to_string(&side) {
        if let Ok(s) = serde_json::from_str::<Sidecar>(&text) {
            let now = Sidecar::of(real.clone(), meta, s.sha256.clone());
            if s == now {
                return Ok(s.sha256);
            }
        }
    }
    let sha256 = sha256_file(file)?;
    remember(dirs, file, meta, &sha256);
    Ok(sha256)
}

/// Writes the sidecar of a file just hashed (best effort).
pub(crate) fn remember(dirs: &CacheDirs, file: &Path, meta: &fs::Metadata, sha256: &str) {
    let real = real(file);
    let side = sidecar_path(dirs, &real);
    let record = Sidecar::of(real, meta, sha256.into());
    let text = serde_json::to_vec(&record).expect("a sidecar serializes");
    if let Err(e) = write_atomic(&side, &text) {
        tracing::debug!(sidecar = %side.display(), error = %e, "could not record a file's sha256");
    }
}

/// Forgets a file's sidecar (call it before removing the file: its real
/// path is resolved through it).
pub(crate) fn forget(dirs: &CacheDirs, file: &Path) {
    let _ = fs::remove_file(sidecar_path(dirs, &real(file)));
}

/// Writes a small file atomically, 0600: a temp file created `O_EXCL |
/// O_NOFOLLOW` next to it, synced, renamed over it.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.{:x}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    ));
    let result = (|| {
        let mut f = create_private(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates a new file 0600 with `O_EXCL | O_NOFOLLOW` (never opening what
/// is there, never through a symlink).
pub(crate) fn create_private(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Opens (or creates, 0600) a partial download to append to; refuses a
/// symlink or anything but a regular file there.
pub(crate) fn open_partial(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a partial download is not a regular file"));
    }
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a partial download belongs to another user",
        ));
    }
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Syncs a folder (after a rename into it).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Total bytes of the regular files under `dir` (symlinks not followed).
pub(crate) fn dir_size(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}
