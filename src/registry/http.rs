//! The network: HTTP requests with redirects followed by hand (the hub token
//! never leaves the hub's host), the hub's file-resolution `HEAD`, and
//! resumable, size-limited, retried transfers into a partial file that is
//! hashed as it is written.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use super::cache::{hash_reader, hex, open_partial};
use super::source::{host_of, join_location};
use crate::{Error, Result};

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 10;
/// Requests one transfer makes at most, progress or not.
const MAX_REQUESTS: u32 = 1000;

/// Network settings and the HTTP agent.
pub(crate) struct Net {
    agent: ureq::Agent,
    pub(crate) endpoint: String,
    token: Option<String>,
    pub(crate) retries: u32,
    pub(crate) backoff: Duration,
    pub(crate) max_size: u64,
    pub(crate) progress: bool,
}

/// Why a request failed.
enum Failure {
    /// The server answered with an error status.
    Status(u16),
    /// No answer (refused, reset, timed out...).
    Transport(String),
}

/// What the hub says of a file (`HEAD .../resolve/...`).
#[derive(Debug)]
pub(crate) struct HubFile {
    /// The commit the revision resolves to (`X-Repo-Commit`).
    pub(crate) commit: String,
    /// The blob's name: `X-Linked-Etag` or `ETag`, quotes removed.
    pub(crate) etag: String,
    /// Where to GET the bytes (the `Location` of a redirect off the hub, or
    /// the resolve URL itself).
    pub(crate) location: String,
}

impl Net {
    pub(crate) fn new(
        endpoint: String,
        token: Option<String>,
        retries: u32,
        backoff: Duration,
        max_size: u64,
        timeout: Duration,
        progress: bool,
    ) -> Net {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(timeout)
            .timeout_read(timeout)
            .user_agent(concat!("sire/", env!("CARGO_PKG_VERSION")))
            .build();
        Net { agent, endpoint, token, retries, backoff, max_size, progress }
    }

    /// One request, following redirects; the token goes only to the hub's host.
    fn request(
        &self,
        method: &str,
        url: &str,
        range_from: u64,
    ) -> std::result::Result<(ureq::Response, String), Failure> {
        let hub = host_of(&self.endpoint);
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.request(method, &url).set("Accept-Encoding", "identity");
            if range_from > 0 {
                req = req.set("Range", &format!("bytes={range_from}-"));
            }
            if let Some(t) = &self.token {
                if host_of(&url) == hub {
                    req = req.set("Authorization", &format!("Bearer {t}"));
                }
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(code, _)) => return Err(Failure::Status(code)),
                Err(ureq::Error::Transport(t)) => return Err(Failure::Transport(t.to_string())),
            };
            if (300..400).contains(&resp.status()) {
                match resp.header("Location") {
                    Some(loc) => {
                        url = join_location(&url, loc);
                        continue;
                    }
                    None => return Err(Failure::Status(resp.status())),
                }
            }
            return Ok((resp, url));
        }
        Err(Failure::Transport(format!("more than {MAX_REDIRECTS} redirects")))
    }

    fn backoff_sleep(&self, attempt: u32) {
        let d = self.backoff.saturating_mul(1 << attempt.min(10)).min(Duration::from_secs(30));
        std::thread::sleep(d);
    }

    /// `HEAD` on the hub's resolve URL: commit, blob name and download
    /// location. Redirects on the hub are followed; a redirect off it (to a
    /// CDN) is not: its headers describe the file, its `Location` is where
    /// the bytes are. 5xx and failed connections are retried.
    pub(crate) fn hub_head(&self, key: &str, url: &str) -> Result<HubFile> {
        let hub = host_of(&self.endpoint);
        let mut attempt = 0;
        loop {
            let mut target = url.to_string();
            let mut outcome = Err(Failure::Transport("no answer".into()));
            for _ in 0..=MAX_REDIRECTS {
                let mut req = self.agent.head(&target).set("Accept-Encoding", "identity");
                if let Some(t) = &self.token {
                    if host_of(&target) == hub {
                        req = req.set("Authorization", &format!("Bearer {t}"));
                    }
                }
                outcome = match req.call() {
                    Ok(r) => Ok(r),
                    Err(ureq::Error::Status(code, _)) => Err(Failure::Status(code)),
                    Err(ureq::Error::Transport(t)) => Err(Failure::Transport(t.to_string())),
                };
                match &outcome {
                    Ok(r) if (300..400).contains(&r.status()) => match r.header("Location") {
                        Some(loc) if host_of(&join_location(&target, loc)) == host_of(&target) => {
                            target = join_location(&target, loc);
                        }
                        _ => break,
                    },
                    _ => break,
                }
            }
            let reason = match outcome {
                Ok(r) => {
                    let header = |n: &str| r.header(n).map(str::to_string);
                    let commit = header("X-Repo-Commit").ok_or_else(|| Error::InvalidEntry {
                        key: key.into(),
                        reason: format!("{url} is not a Hugging Face hub endpoint (no X-Repo-Commit header)"),
                    })?;
                    let etag = header("X-Linked-Etag").or_else(|| header("ETag")).ok_or_else(|| {
                        Error::InvalidEntry {
                            key: key.into(),
                            reason: format!("{url}: the hub gave no ETag"),
                        }
                    })?;
                    let etag = etag.trim().trim_start_matches("W/").trim_matches('"').to_string();
                    let valid =
                        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                    if !valid(&etag) || !valid(&commit) {
                        return Err(Error::InvalidEntry {
                            key: key.into(),
                            reason: format!(
                                "{url}: the hub's ETag {etag:?} or commit {commit:?} is not a plain name"
                            ),
                        });
                    }
                    let location = if (300..400).contains(&r.status()) {
                        join_location(&target, r.header("Location").unwrap_or(&target))
                    } else {
                        target
                    };
                    return Ok(HubFile { commit, etag, location });
                }
                Err(Failure::Status(code)) if code >= 500 || code == 429 => format!("HTTP {code}"),
                Err(Failure::Status(code)) => {
                    return Err(Error::Http {
                        key: key.into(),
                        method: "HEAD",
                        url: url.into(),
                        status: code,
                    });
                }
                Err(Failure::Transport(e)) => e,
            };
            attempt += 1;
            if attempt > self.retries {
                return Err(Error::Download { key: key.into(), url: url.into(), attempts: attempt, reason });
            }
            tracing::warn!(url, attempt, %reason, "HEAD failed; retrying");
            self.backoff_sleep(attempt - 1);
        }
    }

    /// Downloads `url` into `partial`, resuming what it holds with a Range
    /// request, and returns the sha256 and size of the whole file. Retries
    /// 5xx, 429, failed and cut connections and short bodies, with
    /// exponential backoff, `retries` times in a row without progress; other
    /// statuses fail at once. A body beyond the
    /// size limit removes the partial file.
    pub(crate) fn transfer(
        &self,
        key: &str,
        url: &str,
        partial: &Path,
        label: &str,
    ) -> Result<(String, u64)> {
        let io_err = |e: io::Error| Error::Cache { path: partial.to_path_buf(), source: e };
        let too_large = |size: u64| {
            let _ = std::fs::remove_file(partial);
            Error::DownloadTooLarge { key: key.into(), url: url.into(), size, limit: self.max_size }
        };
        let bar = self.bar(label);
        // Failures in a row without progress; a response that brought bytes
        // resets the count, so a large file on a flaky link gets through.
        let (mut attempt, mut failures, mut best) = (0u32, 0u32, 0u64);
        loop {
            attempt += 1;
            let mut file = open_partial(partial).map_err(io_err)?;
            let offset = file.metadata().map_err(io_err)?.len();
            if offset > self.max_size {
                return Err(too_large(offset));
            }
            if offset > best {
                best = offset;
                failures = 0;
            }
            let reason = match self.request("GET", url, offset) {
                Err(Failure::Status(416)) if offset > 0 => {
                    // The partial file does not fit the remote one: start again.
                    file.set_len(0).map_err(io_err)?;
                    "HTTP 416 for the partial file's range".to_string()
                }
                Err(Failure::Status(code)) if code >= 500 || code == 429 => format!("HTTP {code}"),
                Err(Failure::Status(code)) => {
                    return Err(Error::Http {
                        key: key.into(),
                        method: "GET",
                        url: url.into(),
                        status: code,
                    });
                }
                Err(Failure::Transport(e)) => e,
                Ok((resp, _)) => match self.receive(resp, &mut file, offset, &bar) {
                    Ok(Received::Done(sha, size)) => {
                        file.sync_all().map_err(io_err)?;
                        bar.finish_and_clear();
                        return Ok((sha, size));
                    }
                    Ok(Received::TooLarge(size)) => {
                        bar.finish_and_clear();
                        return Err(too_large(size));
                    }
                    Ok(Received::Retry(reason)) => reason,
                    Err(e) => return Err(io_err(e)),
                },
            };
            failures += 1;
            if failures > self.retries || attempt >= MAX_REQUESTS {
                bar.finish_and_clear();
                return Err(Error::Download { key: key.into(), url: url.into(), attempts: attempt, reason });
            }
            tracing::warn!(url, attempt, %reason, "download interrupted; retrying");
            self.backoff_sleep(failures - 1);
        }
    }

    /// Reads one response into the partial file.
    fn receive(
        &self,
        resp: ureq::Response,
        file: &mut File,
        offset: u64,
        bar: &ProgressBar,
    ) -> io::Result<Received> {
        let status = resp.status();
        let length: Option<u64> = resp.header("Content-Length").and_then(|v| v.trim().parse().ok());
        let start = match status {
            206 => {
                let range = resp.header("Content-Range").unwrap_or("");
                let start = range
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if start != Some(offset) {
                    file.set_len(0)?;
                    return Ok(Received::Retry(format!(
                        "the server sent range {range:?} for offset {offset}"
                    )));
                }
                offset
            }
            200 => {
                file.set_len(0)?;
                0
            }
            other => return Ok(Received::Retry(format!("unexpected HTTP {other}"))),
        };
        if let Some(len) = length {
            if start + len > self.max_size {
                return Ok(Received::TooLarge(start + len));
            }
        }
        let mut hasher = Sha256::new();
        file.seek(SeekFrom::Start(0))?;
        let have = hash_reader(&mut (&mut *file).take(start), &mut hasher)?;
        if have != start {
            file.set_len(0)?;
            return Ok(Received::Retry("the partial file shrank".into()));
        }
        file.seek(SeekFrom::Start(start))?;
        bar.set_length(length.map_or(0, |l| start + l));
        bar.set_position(start);
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 256 << 10];
        let mut size = start;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    file.flush()?;
                    return Ok(Received::Retry(format!("connection cut after {size} bytes: {e}")));
                }
            };
            if size + n as u64 > self.max_size {
                return Ok(Received::TooLarge(size + n as u64));
            }
            file.write_all(&buf[..n])?;
            hasher.update(&buf[..n]);
            size += n as u64;
            bar.set_position(size);
        }
        if let Some(len) = length {
            if size < start + len {
                return Ok(Received::Retry(format!("truncated body: {size} of {} bytes", start + len)));
            }
        }
        Ok(Received::Done(hex(&hasher.finalize()), size))
    }

    fn bar(&self, label: &str) -> ProgressBar {
        let target = if self.progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let bar = ProgressBar::with_draw_target(None, target);
        if let Ok(style) =
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.to_string());
        bar
    }
}

/// How one response ended.
enum Received {
    Done(String, u64),
    TooLarge(u64),
    Retry(String),
}

/// Copies a local file (`file://`) into the partial file, hashing it, within
/// the size limit.
pub(crate) fn copy_local(key: &str, src: &Path, partial: &Path, max_size: u64) -> Result<(String, u64)> {
    let url = format!("file://{}", src.display());
    let mut input = File::open(src).map_err(|e| Error::Download {
        key: key.into(),
        url: url.clone(),
        attempts: 1,
        reason: e.to_string(),
    })?;
    let len = input.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max_size {
        return Err(Error::DownloadTooLarge { key: key.into(), url, size: len, limit: max_size });
    }
    let io_err = |e: io::Error| Error::Cache { path: partial.to_path_buf(), source: e };
    let mut out = open_partial(partial).map_err(io_err)?;
    out.set_len(0).map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Download { key: key.into(), url, attempts: 1, reason: e.to_string() })
            }
        };
        size += n as u64;
        if size > max_size {
            let _ = std::fs::remove_file(partial);
            return Err(Error::DownloadTooLarge { key: key.into(), url, size, limit: max_size });
        }
        out.write_all(&buf[..n]).map_err(io_err)?;
        hasher.update(&buf[..n]);
    }
    out.sync_all().map_err(io_err)?;
    Ok((hex(&hasher.finalize()), size))
}
