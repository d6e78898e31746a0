//! Getting one file of a model into the cache, and checking what is there:
//! the existence check, the lock, the check again under the lock, the
//! transfer into a partial file, the sha256 check, the rename into place;
//! for hub files, the blob, the snapshot link and the ref.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::cache::{self, inspect, make_dirs, FileLock, Place};
use super::catalogue::{Entry, FileSpec};
use super::http::copy_local;
use super::pickle;
use super::source::{resolve_url, Source};
use super::Registry;
use crate::{Error, Result};

/// The state of one file of a model on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FileState {
    /// Present, and its sha256 is the catalogue's.
    Valid,
    /// Not in the cache.
    Missing,
    /// Present, but its sha256 is not the catalogue's.
    Mismatch,
    /// Present, and the catalogue gives no sha256 to check it against
    /// (usable only when unhashed files are allowed).
    Unhashed,
    /// Present, hash checked, but a pickle, and pickles are not allowed.
    Pickle,
    /// Could not be checked: an unsafe path in the cache (a symlink out of
    /// it, not a regular file), a permission error, a malformed archive...
    /// ([`FileStatus::error`] says what).
    Error,
}

/// One file of a model, as found on disk.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct FileStatus {
    /// The file's path in the catalogue.
    pub path: String,
    /// Where it is (or would be) on disk, when known without the network.
    pub local: Option<PathBuf>,
    /// What was found there.
    pub state: FileState,
    /// Its size, when present.
    pub size: Option<u64>,
    /// The sha256 of what is there, when present.
    pub sha256: Option<String>,
    /// Why the file could not be checked (state [`FileState::Error`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Registry {
    /// Looks at one file without the network; a file that cannot be
    /// checked is a status in state [`FileState::Error`], not an error.
    pub(crate) fn file_status(&self, entry: &Entry, file: &FileSpec) -> FileStatus {
        self.check_file(entry, file).unwrap_or_else(|e| FileStatus {
            path: file.path.clone(),
            local: Place::of(&self.dirs, entry, file).local(),
            state: FileState::Error,
            size: None,
            sha256: None,
            error: Some(e.to_string()),
        })
    }

    /// Looks at one file without the network.
    pub(crate) fn check_file(&self, entry: &Entry, file: &FileSpec) -> Result<FileStatus> {
        let place = Place::of(&self.dirs, entry, file);
        let local = place.local();
        let mut status = FileStatus {
            path: file.path.clone(),
            local: local.clone(),
            state: FileState::Missing,
            size: None,
            sha256: None,
            error: None,
        };
        let Some(path) = local else { return Ok(status) };
        let Some(meta) = inspect(&entry.key, &place, &path)? else { return Ok(status) };
        let sha = cache::sha256_cached(&self.dirs, &path, &meta)?;
        status.size = Some(meta.len());
        status.state = match &file.sha256 {
            Some(expected) if *expected != sha => FileState::Mismatch,
            _ if !self.allow_pickle && self.is_pickle(&path)?.is_some() => FileState::Pickle,
            None => FileState::Unhashed,
            Some(_) => FileState::Valid,
        };
        status.sha256 = Some(sha);
        Ok(status)
    }

    fn is_pickle(&self, path: &Path) -> Result<Option<&'static str>> {
        let format = pickle::sniff(path).map_err(|e| Error::Cache { path: path.into(), source: e })?;
        Ok(format.pickle_name())
    }

    /// Whether a file in this state can be used.
    pub(crate) fn usable(&self, state: FileState) -> bool {
        state == FileState::Valid || (state == FileState::Unhashed && self.allow_unhashed)
    }

    /// The error that a file in an unusable state is.
    pub(crate) fn state_error(&self, entry: &Entry, file: &FileSpec, status: &FileStatus) -> Error {
        let key = entry.key.clone();
        let path = status.local.clone().unwrap_or_default();
        match status.state {
            FileState::Mismatch => Error::HashMismatch {
                key,
                path,
                size: status.size.unwrap_or(0),
                expected: file.sha256.clone().unwrap_or_default(),
                actual: status.sha256.clone().unwrap_or_default(),
                removed: false,
            },
            FileState::Pickle => {
                let what = self.is_pickle(&path).ok().flatten().unwrap_or("a pickle").to_string();
                Error::Pickle { key, path, what }
            }
            FileState::Unhashed => Error::Unhashed { key, file: file.path.clone() },
            FileState::Error => Error::InvalidEntry {
                key,
                reason: format!("file `{}`: {}", file.path, status.error.as_deref().unwrap_or("unreadable")),
            },
            FileState::Missing | FileState::Valid => {
                Error::NotDownloaded { key, file: file.path.clone(), path: status.local.clone() }
            }
        }
    }

    /// Makes one file present and valid, downloading it when needed, and
    /// returns its path.
    pub(crate) fn fetch(&self, entry: &Entry, file: &FileSpec) -> Result<PathBuf> {
        let key = &entry.key;
        if file.sha256.is_none() && !self.allow_unhashed {
            return Err(Error::Unhashed { key: key.clone(), file: file.path.clone() });
        }
        if let Some(path) = self.present(entry, file)? {
            return Ok(path);
        }
        let source = file.source.as_ref().ok_or_else(|| Error::NotDownloaded {
            key: key.clone(),
            file: file.path.clone(),
            path: Place::of(&self.dirs, entry, file).local(),
        })?;
        let path = match Place::of(&self.dirs, entry, file) {
            Place::Sire { root, rel } => self.fetch_to_sire(entry, file, source, &root, &rel)?,
            Place::Hf { repo_dir, repo, path, revision } => {
                self.fetch_to_hub(entry, file, &repo_dir, &repo, &path, &revision)?
            }
        };
        let status = self.check_file(entry, file)?;
        if !self.usable(status.state) {
            return Err(self.state_error(entry, file, &status));
        }
        Ok(path)
    }

    /// The file's path if it is there and usable; an error if it is there,
    /// hash-checked, and refused (a pickle); `None` if it must be fetched.
    fn present(&self, entry: &Entry, file: &FileSpec) -> Result<Option<PathBuf>> {
        let status = self.check_file(entry, file)?;
        match status.state {
            s if self.usable(s) => Ok(status.local),
            FileState::Pickle => Err(self.state_error(entry, file, &status)),
            _ => Ok(None),
        }
    }

    fn fetch_to_sire(
        &self,
        entry: &Entry,
        file: &FileSpec,
        source: &Source,
        root: &Path,
        rel: &str,
    ) -> Result<PathBuf> {
        let key = &entry.key;
        let target = root.join(rel);
        let parent = Path::new(rel).parent().unwrap_or(Path::new(""));
        make_dirs(key, root, parent)?;
        let _lock = FileLock::acquire(
            &self.dirs.sire.join(".locks").join(entry.model_type.as_str()).join(format!("{rel}.lock")),
            self.lock_timeout,
        )?;
        // Another process may have fetched it while this one waited.
        if let Some(path) = self.present(entry, file)? {
            return Ok(path);
        }
        if fs::symlink_metadata(&target).is_ok() {
            tracing::warn!(file = %target.display(), "replacing a cached file that does not match the catalogue");
            cache::forget(&self.dirs, &target);
            fs::remove_file(&target).map_err(|e| Error::Cache { path: target.clone(), source: e })?;
        }
        let partial = PathBuf::from(format!("{}.incomplete", target.display()));
        let identity =
            format!("{}\n{}", file.url.as_deref().unwrap_or(""), file.sha256.as_deref().unwrap_or("-"));
        let sha = self.transfer(entry, file, source, &partial, &identity, None)?;
        self.install(&partial, &target, &sha)?;
        Ok(target)
    }

    fn fetch_to_hub(
        &self,
        entry: &Entry,
        file: &FileSpec,
        repo_dir: &Path,
        repo: &str,
        path: &str,
        revision: &str,
    ) -> Result<PathBuf> {
        let key = &entry.key;
        if self.offline {
            return Err(Error::NotDownloaded {
                key: key.clone(),
                file: file.path.clone(),
                path: Place::of(&self.dirs, entry, file).local(),
            });
        }
        let url = resolve_url(&self.net.endpoint, repo, revision, path);
        let hub = self.net.hub_head(key, &url, revision)?;
        let folder = repo_dir.file_name().map(PathBuf::from).unwrap_or_default();
        make_dirs(key, &self.dirs.hf, &folder.join("blobs"))?;
        let pointer_dir = Path::new(&hub.commit).join(Path::new(path).parent().unwrap_or(Path::new("")));
        make_dirs(key, &repo_dir.join("snapshots"), &pointer_dir)?;
        if revision != hub.commit {
            let reference = cache::ref_path(repo_dir, revision).ok_or_else(|| Error::UnsafePath {
                key: key.clone(),
                path: revision.to_string(),
                reason: "the revision would leave the repository's refs/ folder".into(),
            })?;
            let refs = Path::new("refs").join(Path::new(revision).parent().unwrap_or(Path::new("")));
            make_dirs(key, repo_dir, &refs)?;
            let current = fs::read_to_string(&reference).unwrap_or_default();
            if current.trim() != hub.commit {
                cache::write_atomic(&reference, hub.commit.as_bytes())
                    .map_err(|e| Error::Cache { path: reference.clone(), source: e })?;
            }
        }
        let _lock = FileLock::acquire(
            &self.dirs.hf.join(".locks").join(&folder).join(format!("{}.lock", hub.etag)),
            self.lock_timeout,
        )?;
        let pointer = repo_dir.join("snapshots").join(&hub.commit).join(path);
        if let Some(found) = self.present(entry, file)? {
            return Ok(found);
        }
        let blob = repo_dir.join("blobs").join(&hub.etag);
        let reusable = match fs::symlink_metadata(&blob) {
            Ok(m) if m.is_file() => {
                let sha = cache::sha256_cached(&self.dirs, &blob, &m)?;
                if file.sha256.as_ref().is_none_or(|e| *e == sha) {
                    true
                } else {
                    tracing::warn!(blob = %blob.display(), "replacing a hub blob that does not match the catalogue");
                    false
                }
            }
            Ok(_) => false,
            Err(_) => false,
        };
        if !reusable {
            if fs::symlink_metadata(&blob).is_ok() {
                cache::forget(&self.dirs, &blob);
                fs::remove_file(&blob).map_err(|e| Error::Cache { path: blob.clone(), source: e })?;
            }
            let partial = PathBuf::from(format!("{}.incomplete", blob.display()));
            let source = Source::Http(hub.location.clone());
            let identity = format!("hf:{repo}:{}\n{}", hub.etag, file.sha256.as_deref().unwrap_or("-"));
            let sha = self.transfer(entry, file, &source, &partial, &identity, Some(path))?;
            self.install(&partial, &blob, &sha)?;
        }
        // The relative link the Python client makes: ../../blobs/<etag>, one
        // more `..` per folder of the path.
        let depth = Path::new(path).components().count() - 1;
        let link = PathBuf::from("../".repeat(2 + depth)).join("blobs").join(&hub.etag);
        match fs::symlink_metadata(&pointer) {
            Ok(m) if m.file_type().is_symlink() || m.is_file() => {
                fs::remove_file(&pointer).map_err(|e| Error::Cache { path: pointer.clone(), source: e })?
            }
            _ => {}
        }
        std::os::unix::fs::symlink(&link, &pointer)
            .map_err(|e| Error::Cache { path: pointer.clone(), source: e })?;
        Ok(pointer)
    }

    /// Downloads (or copies) into the partial file and checks the sha256;
    /// a mismatch removes the partial file. A mismatch of a file that was
    /// resumed is retried once from the start.
    fn transfer(
        &self,
        entry: &Entry,
        file: &FileSpec,
        source: &Source,
        partial: &Path,
        identity: &str,
        label: Option<&str>,
    ) -> Result<String> {
        let (sha, _, mismatch) = self.transfer_once(entry, file, source, partial, identity, label)?;
        if !mismatch {
            return Ok(sha);
        }
        tracing::warn!(key = %entry.key, file = %file.path, "sha256 mismatch after a resumed download; downloading again from the start");
        match self.transfer_once(entry, file, source, partial, identity, label)? {
            (sha, _, false) => Ok(sha),
            (actual, size, true) => Err(Error::HashMismatch {
                key: entry.key.clone(),
                path: partial.to_path_buf(),
                size,
                expected: file.sha256.clone().unwrap_or_default(),
                actual,
                removed: true,
            }),
        }
    }

    /// One download (or copy) into the partial file, its sha256 checked:
    /// the sha256, and whether a mismatch followed a resume (then the
    /// partial file is gone and the sha256 is not the catalogue's).
    fn transfer_once(
        &self,
        entry: &Entry,
        file: &FileSpec,
        source: &Source,
        partial: &Path,
        identity: &str,
        label: Option<&str>,
    ) -> Result<(String, u64, bool)> {
        let key = &entry.key;
        let label = format!("{key}: {}", label.unwrap_or(&file.path));
        let span = tracing::info_span!("download", key = %key, file = %file.path);
        let _enter = span.enter();
        let started = std::time::Instant::now();
        let (sha, size, resumed) = match source {
            Source::File(src) => {
                let (sha, size) = copy_local(key, src, partial, self.net.max_size)?;
                (sha, size, false)
            }
            Source::Http(url) => {
                if url.to_ascii_lowercase().starts_with("http://") {
                    tracing::warn!(key = %key, url = %url, "downloading over plain http (no transport security; the sha256 check still applies)");
                }
                let t = self.net.transfer(key, url, partial, identity, &label)?;
                (t.sha256, t.size, t.resumed)
            }
            Source::Hf { .. } => unreachable!("hub files are resolved to an http location first"),
        };
        tracing::info!(bytes = size, elapsed = ?started.elapsed(), to = %partial.display(), "downloaded");
        if let Some(expected) = &file.sha256 {
            if *expected != sha {
                let _ = fs::remove_file(partial);
                let _ = fs::remove_file(super::http::partial_sidecar(partial));
                if resumed {
                    return Ok((sha, size, true));
                }
                return Err(Error::HashMismatch {
                    key: key.clone(),
                    path: partial.to_path_buf(),
                    size,
                    expected: expected.clone(),
                    actual: sha,
                    removed: true,
                });
            }
        }
        Ok((sha, size, false))
    }

    /// Renames a checked partial file into place, syncs the folder, and
    /// records its sha256.
    fn install(&self, partial: &Path, target: &Path, sha256: &str) -> Result<()> {
        let err = |e| Error::Cache { path: target.to_path_buf(), source: e };
        crate::faults::hit(crate::faults::Point::DownloadRename)?;
        fs::rename(partial, target).map_err(err)?;
        cache::sync_dir(target.parent().unwrap_or(Path::new("."))).map_err(err)?;
        let meta = fs::metadata(target).map_err(err)?;
        cache::remember(&self.dirs, target, &meta, sha256);
        Ok(())
    }
}
