//! The network: HTTP requests with redirects followed by hand (the hub token
//! never leaves the hub's host), the hub's file-resolution `HEAD`, and
//! resumable, size-limited, retried transfers into a partial file that is
//! hashed as it is written.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cache::{hash_reader, hex, is_commit, open_partial, write_atomic};
use super::source::{join_location, origin, Origin};
use crate::{Error, Result};

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 10;
/// Requests one transfer makes at most, progress or not.
const MAX_REQUESTS: u32 = 1000;

/// Network settings and the HTTP agent.
pub(crate) struct Net {
    agent: ureq::Agent,
    pub(crate) endpoint: String,
    /// The endpoint's origin (`None`: not an http(s) URL, no token sent).
    hub: Option<Origin>,
    token: Option<String>,
    pub(crate) retries: u32,
    pub(crate) backoff: Duration,
    pub(crate) max_size: u64,
    pub(crate) progress: bool,
    /// The longest one transfer may take, retries included.
    pub(crate) deadline: Option<Duration>,
}

/// Why a request failed.
enum Failure {
    /// The URL (or a redirect's) is refused; not retried.
    Refused(String),
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
        let hub = match origin(&endpoint) {
            Ok(o) => Some(o),
            Err(e) => {
                if token.is_some() {
                    tracing::warn!(endpoint, error = %e, "the hub endpoint is not a plain http(s) URL: the token is never sent");
                }
                None
            }
        };
        Net { agent, endpoint, hub, token, retries, backoff, max_size, progress, deadline: None }
    }

    /// Whether the token may go with a request to `url`: only to the hub
    /// endpoint's scheme, host and port, as the HTTP client parses them (so
    /// over https unless the endpoint itself is plain http).
    fn sends_token(&self, url: &str) -> bool {
        self.hub.as_ref().is_some_and(|hub| origin(url).is_ok_and(|o| o == *hub))
    }

    /// One request, following redirects; the token goes only to the hub's
    /// origin. A URL or redirect that is refused ([`origin`]) is
    /// `Failure::Refused`.
    fn request(
        &self,
        method: &str,
        url: &str,
        range_from: u64,
        if_range: Option<&str>,
    ) -> std::result::Result<(ureq::Response, String), Failure> {
        let mut url = url.to_string();
        origin(&url).map_err(Failure::Refused)?;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.request(method, &url).set("Accept-Encoding", "identity");
            if range_from > 0 {
                req = req.set("Range", &format!("bytes={range_from}-"));
                if let Some(v) = if_range {
                    req = req.set("If-Range", v);
                }
            }
            if let Some(t) = &self.token {
                if self.sends_token(&url) {
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
                        url = join_location(&url, loc).map_err(Failure::Refused)?;
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
    /// the bytes are. 5xx and failed connections are retried. When
    /// `revision` is a commit, the hub must answer with that commit.
    pub(crate) fn hub_head(&self, key: &str, url: &str, revision: &str) -> Result<HubFile> {
        let refused =
            |reason: String| Error::Download { key: key.into(), url: url.into(), attempts: 1, reason };
        let mut attempt = 0;
        loop {
            let mut target = url.to_string();
            origin(&target).map_err(refused)?;
            let mut outcome = Err(Failure::Transport("no answer".into()));
            let mut off_hub = None;
            for _ in 0..=MAX_REDIRECTS {
                let mut req = self.agent.head(&target).set("Accept-Encoding", "identity");
                if let Some(t) = &self.token {
                    if self.sends_token(&target) {
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
                        Some(loc) => {
                            let next = join_location(&target, loc).map_err(refused)?;
                            if origin(&next).ok() == origin(&target).ok() {
                                target = next;
                            } else {
                                off_hub = Some(next);
                                break;
                            }
                        }
                        None => break,
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
                    let commit = commit.trim().to_string();
                    if !valid(&etag) || !is_commit(&commit) {
                        return Err(Error::InvalidEntry {
                            key: key.into(),
                            reason: format!(
                                "{url}: the hub's ETag {etag:?} is not a plain name or its commit {commit:?} is not 40 lowercase hex digits"
                            ),
                        });
                    }
                    if is_commit(revision) && commit != revision {
                        return Err(Error::InvalidEntry {
                            key: key.into(),
                            reason: format!("{url}: asked for commit {revision}, the hub answered {commit}"),
                        });
                    }
                    let location = off_hub.unwrap_or(target);
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
                Err(Failure::Refused(reason)) => return Err(refused(reason)),
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
    /// request, and returns the sha256 and size of the whole file.
    ///
    /// `identity` names what the partial file is a part of (the URL and the
    /// expected sha256); it is kept in a sidecar next to the partial file
    /// with the validator (`ETag` or `Last-Modified`) and size the server
    /// gave, and a partial file of another identity, or without a sidecar,
    /// is discarded. A resume sends `If-Range`; a `206` whose range or total
    /// size does not fit the partial file discards it; a `206` to a request
    /// without Range is refused. Retries 5xx, 429, failed and cut
    /// connections and short bodies, with exponential backoff, `retries`
    /// times in a row without progress; other statuses fail at once. A body
    /// beyond the size limit removes the partial file. The partial file is
    /// created only once the server answers 200 or 206.
    pub(crate) fn transfer(
        &self,
        key: &str,
        url: &str,
        partial: &Path,
        identity: &str,
        label: &str,
    ) -> Result<Transferred> {
        let io_err = |e: io::Error| Error::Cache { path: partial.to_path_buf(), source: e };
        let side = partial_sidecar(partial);
        let discard = || {
            let _ = std::fs::remove_file(partial);
            let _ = std::fs::remove_file(&side);
        };
        let too_large = |size: u64| {
            discard();
            Error::DownloadTooLarge { key: key.into(), url: url.into(), size, limit: self.max_size }
        };
        let recorded = std::fs::read(&side)
            .ok()
            .and_then(|b| serde_json::from_slice::<PartialInfo>(&b).ok())
            .filter(|i| i.identity == identity);
        let mut info = match recorded {
            Some(i) => i,
            None => {
                if std::fs::symlink_metadata(partial).is_ok() {
                    tracing::info!(partial = %partial.display(), "discarding a partial download of another file or version");
                }
                discard();
                PartialInfo { identity: identity.to_string(), validator: None, total: None }
            }
        };
        let bar = self.bar(label);
        // Failures in a row without progress; a response that brought bytes
        // resets the count, so a large file on a flaky link gets through.
        let (mut attempt, mut failures, mut best) = (0u32, 0u32, 0u64);
        let mut resumed = false;
        let deadline = self.deadline.map(|d| (d, Instant::now() + d));
        loop {
            if let Some((d, at)) = deadline {
                if Instant::now() >= at {
                    bar.finish_and_clear();
                    return Err(Error::Download {
                        key: key.into(),
                        url: url.into(),
                        attempts: attempt,
                        reason: format!("the download deadline ({d:?}) passed; the partial file is kept"),
                    });
                }
            }
            attempt += 1;
            let offset = match std::fs::symlink_metadata(partial) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => return Err(io_err(e)),
            };
            if offset > self.max_size {
                return Err(too_large(offset));
            }
            if offset > best {
                best = offset;
                failures = 0;
            }
            let reason = match self.request("GET", url, offset, info.validator.as_deref()) {
                Err(Failure::Status(416)) if offset > 0 => {
                    // The partial file does not fit the remote one: start again.
                    discard();
                    info.validator = None;
                    info.total = None;
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
                Err(Failure::Refused(reason)) => {
                    bar.finish_and_clear();
                    return Err(Error::Download {
                        key: key.into(),
                        url: url.into(),
                        attempts: attempt,
                        reason,
                    });
                }
                Err(Failure::Transport(e)) => e,
                Ok((resp, _)) => {
                    match self.receive(resp, partial, offset, &mut info, &bar, deadline.map(|(_, at)| at)) {
                        Ok(Received::Done(sha, size, from_range)) => {
                            let _ = std::fs::remove_file(&side);
                            bar.finish_and_clear();
                            return Ok(Transferred { sha256: sha, size, resumed: resumed || from_range });
                        }
                        Ok(Received::TooLarge(size)) => {
                            bar.finish_and_clear();
                            return Err(too_large(size));
                        }
                        Ok(Received::Refused(reason)) => {
                            bar.finish_and_clear();
                            discard();
                            return Err(Error::Download {
                                key: key.into(),
                                url: url.into(),
                                attempts: attempt,
                                reason,
                            });
                        }
                        Ok(Received::Retry(reason, from_range)) => {
                            resumed |= from_range;
                            reason
                        }
                        Err(e) => return Err(io_err(e)),
                    }
                }
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

    /// Reads one response into the partial file (created here, once the
    /// status is known to bring bytes).
    fn receive(
        &self,
        resp: ureq::Response,
        partial: &Path,
        offset: u64,
        info: &mut PartialInfo,
        bar: &ProgressBar,
        deadline: Option<Instant>,
    ) -> io::Result<Received> {
        let side = &partial_sidecar(partial);
        let status = resp.status();
        let length: Option<u64> = resp.header("Content-Length").and_then(|v| v.trim().parse().ok());
        let restart = |info: &mut PartialInfo| {
            let _ = std::fs::remove_file(partial);
            let _ = std::fs::remove_file(side);
            info.validator = None;
            info.total = None;
        };
        let (mut file, start) = match status {
            206 if offset == 0 => {
                return Ok(Received::Refused(
                    "the server answered 206 Partial Content to a request without Range".into(),
                ));
            }
            206 => {
                let range = resp.header("Content-Range").unwrap_or("").trim().to_string();
                let parsed = parse_content_range(&range);
                let Some((first, last, total)) = parsed.filter(|(first, _, _)| *first == offset) else {
                    restart(info);
                    return Ok(Received::Retry(
                        format!("the server sent range {range:?} for offset {offset}"),
                        false,
                    ));
                };
                if total.is_some_and(|t| t > self.max_size) {
                    return Ok(Received::TooLarge(total.unwrap_or(u64::MAX)));
                }
                let fits = match (total, info.total) {
                    (Some(t), Some(known)) => t == known && last.checked_add(1) == Some(t),
                    (Some(t), None) => last.checked_add(1) == Some(t),
                    (None, _) => true,
                };
                if !fits {
                    restart(info);
                    return Ok(Received::Retry(
                        format!("the server sent range {range:?}, which does not fit the partial file"),
                        false,
                    ));
                }
                let mut file = open_partial(partial)?;
                if file.metadata()?.len() != first {
                    drop(file);
                    restart(info);
                    return Ok(Received::Retry("the partial file changed".into(), false));
                }
                file.seek(SeekFrom::Start(0))?;
                (file, first)
            }
            200 => {
                let validator = resp
                    .header("ETag")
                    .map(str::trim)
                    .filter(|e| !e.starts_with("W/") && e.len() <= 256)
                    .or_else(|| resp.header("Last-Modified").map(str::trim).filter(|v| v.len() <= 256))
                    .map(str::to_string);
                *info = PartialInfo { identity: info.identity.clone(), validator, total: length };
                write_atomic(side, &serde_json::to_vec(&*info).expect("a sidecar serializes"))?;
                let file = open_partial(partial)?;
                file.set_len(0)?;
                (file, 0)
            }
            other => return Ok(Received::Retry(format!("unexpected HTTP {other}"), false)),
        };
        let resumed = start > 0;
        let end = match length {
            Some(len) => match start.checked_add(len) {
                Some(end) if end <= self.max_size => Some(end),
                Some(end) => return Ok(Received::TooLarge(end)),
                None => return Ok(Received::TooLarge(u64::MAX)),
            },
            None => None,
        };
        let mut hasher = Sha256::new();
        let have = hash_reader(&mut (&mut file).take(start), &mut hasher)?;
        if have != start {
            drop(file);
            restart(info);
            return Ok(Received::Retry("the partial file shrank".into(), false));
        }
        file.seek(SeekFrom::Start(start))?;
        bar.set_length(end.unwrap_or(0));
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
                    return Ok(Received::Retry(format!("connection cut after {size} bytes: {e}"), resumed));
                }
            };
            if deadline.is_some_and(|at| Instant::now() >= at) {
                file.flush()?;
                return Ok(Received::Retry(format!("the deadline passed after {size} bytes"), resumed));
            }
            let next = size.saturating_add(n as u64);
            if next > self.max_size {
                return Ok(Received::TooLarge(next));
            }
            file.write_all(&buf[..n])?;
            hasher.update(&buf[..n]);
            size = next;
            bar.set_position(size);
        }
        if let Some(end) = end {
            if size < end {
                return Ok(Received::Retry(format!("truncated body: {size} of {end} bytes"), resumed));
            }
        }
        file.sync_all()?;
        Ok(Received::Done(hex(&hasher.finalize()), size, resumed))
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

/// How one response ended (`bool`: whether it appended to bytes an
/// earlier response brought).
enum Received {
    Done(String, u64, bool),
    TooLarge(u64),
    Retry(String, bool),
    Refused(String),
}

/// What [`Net::transfer`] brought.
pub(crate) struct Transferred {
    /// The sha256 of the whole file.
    pub(crate) sha256: String,
    /// Its size.
    pub(crate) size: u64,
    /// Whether it was put together from more than one response (a resume).
    pub(crate) resumed: bool,
}

/// What a partial download is a part of, kept next to it.
#[derive(Debug, Serialize, Deserialize)]
struct PartialInfo {
    /// The URL and expected sha256 (or the hub blob) it belongs to.
    identity: String,
    /// The `ETag` (strong) or `Last-Modified` of the response that started
    /// it, sent back as `If-Range`.
    validator: Option<String>,
    /// The whole file's size, as that response gave it.
    total: Option<u64>,
}

/// The sidecar of a partial download: `<partial>.json`.
pub(crate) fn partial_sidecar(partial: &Path) -> PathBuf {
    let mut name = partial.as_os_str().to_os_string();
    name.push(".json");
    PathBuf::from(name)
}

/// `bytes first-last/total` (total `*` is `None`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.strip_prefix("bytes ")?.trim();
    let (span, total) = rest.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    if last < first || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some((first, last, total))
}

/// Copies a local file (`file://`) into the partial file, hashing it, within
/// the size limit.
pub(crate) fn copy_local(key: &str, src: &Path, partial: &Path, max_size: u64) -> Result<(String, u64)> {
    let url = format!("file://{}", src.display());
    let failed = |reason: String| Error::Download { key: key.into(), url: url.clone(), attempts: 1, reason };
    // O_NONBLOCK: opening a FIFO must not wait for a writer; what was opened
    // is then checked to be a regular file.
    let mut input = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(src)
        .map_err(|e| failed(e.to_string()))?;
    let meta = input.metadata().map_err(|e| failed(e.to_string()))?;
    if !meta.is_file() {
        return Err(failed("not a regular file".into()));
    }
    let len = meta.len();
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
        size = size.saturating_add(n as u64);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 10-19/20"), Some((10, 19, Some(20))));
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19, None)));
        for bad in
            ["bytes 10-9/20", "bytes 10-20/20", "10-19/20", "bytes x-19/20", "bytes 0-1/99999999999999999999"]
        {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
        let p = Path::new("/c/m/w.bin.incomplete");
        assert_eq!(partial_sidecar(p), Path::new("/c/m/w.bin.incomplete.json"));
    }
}
