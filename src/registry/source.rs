//! Where a file comes from: `https://`, `http://`, `file://` and
//! `hf://org/repo/path@revision` URLs, and the hub's resolve URL of the last.

use std::path::PathBuf;

/// A parsed `file_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// `https://` or `http://`: the URL as written.
    Http(String),
    /// `file://`: an absolute local path.
    File(PathBuf),
    /// `hf://org/repo/path@revision`: a file of a Hugging Face model repository.
    Hf {
        /// `org/repo`.
        repo: String,
        /// The file's path in the repository.
        path: String,
        /// A branch, tag or commit (`main` when not given).
        revision: String,
    },
}

impl Source {
    /// Parses a URL, or says why it cannot be used.
    pub(crate) fn parse(url: &str) -> Result<Source, String> {
        let (scheme, rest) = url.split_once("://").ok_or("not a URL (no `scheme://`)")?;
        match scheme.to_ascii_lowercase().as_str() {
            "https" | "http" => {
                let host = rest.split(['/', '?', '#']).next().unwrap_or("");
                if host.is_empty() {
                    return Err("no host".into());
                }
                Ok(Source::Http(url.to_string()))
            }
            "file" => {
                let path = rest.strip_prefix("localhost").unwrap_or(rest);
                if !path.starts_with('/') {
                    return Err("a file:// URL must hold an absolute path (file:///...)".into());
                }
                Ok(Source::File(PathBuf::from(percent_decode(path)?)))
            }
            "hf" => {
                let (spec, revision) = match rest.rsplit_once('@') {
                    Some((s, r)) if !r.is_empty() => (s, r.to_string()),
                    Some(_) => return Err("empty revision after `@`".into()),
                    None => (rest, "main".to_string()),
                };
                let mut parts = spec.splitn(3, '/');
                let (org, name, path) = (parts.next(), parts.next(), parts.next());
                match (org, name, path) {
                    (Some(o), Some(n), Some(p)) if !o.is_empty() && !n.is_empty() && !p.is_empty() => {
                        let ok = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                        if !ok(o) || !ok(n) || o.starts_with('.') || n.starts_with('.') {
                            return Err(format!("repository `{o}/{n}` is not a valid repository id"));
                        }
                        if revision.contains("..") || revision.chars().any(|c| c.is_control() || c == '\\') {
                            return Err(format!("revision `{revision}` is not valid"));
                        }
                        Ok(Source::Hf { repo: format!("{o}/{n}"), path: p.to_string(), revision })
                    }
                    _ => Err("expected hf://org/repo/path[@revision]".into()),
                }
            }
            other => Err(format!("unsupported scheme `{other}` (https, http, file and hf are)")),
        }
    }
}

/// `{endpoint}/{repo}/resolve/{revision}/{path}`, with the revision and the
/// path's segments percent-encoded as the hub client does.
pub(crate) fn resolve_url(endpoint: &str, repo: &str, revision: &str, path: &str) -> String {
    let path: Vec<String> = path.split('/').map(percent_encode).collect();
    format!(
        "{}/{repo}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        percent_encode(revision),
        path.join("/")
    )
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad %-escape `%{hex}`"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the path is not UTF-8".into())
}

/// `host:port` of an http(s) URL, lowercased (for deciding whether a
/// redirect stays on the same host).
pub(crate) fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    authority.to_ascii_lowercase()
}

/// Joins a redirect's `Location` onto the URL that answered it.
pub(crate) fn join_location(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let path = &rest[authority.len()..];
        let path = path.split(['?', '#']).next().unwrap_or("");
        let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
        format!("{scheme}://{authority}{dir}/{location}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(Source::parse("https://a.org/x").unwrap(), Source::Http("https://a.org/x".into()));
        assert_eq!(Source::parse("file:///tmp/a%20b").unwrap(), Source::File("/tmp/a b".into()));
        assert_eq!(
            Source::parse("hf://org/repo/sub/w.safetensors@v1.0").unwrap(),
            Source::Hf { repo: "org/repo".into(), path: "sub/w.safetensors".into(), revision: "v1.0".into() }
        );
        assert_eq!(
            Source::parse("hf://org/repo/w.pt").unwrap(),
            Source::Hf { repo: "org/repo".into(), path: "w.pt".into(), revision: "main".into() }
        );
        for bad in ["ftp://x/y", "file://relative", "hf://org/w.pt", "hf://../x/y", "nothing", "https:///x"] {
            assert!(Source::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            resolve_url("http://h:1/", "o/r", "refs/pr/1", "a b/c.pt"),
            "http://h:1/o/r/resolve/refs%2Fpr%2F1/a%20b/c.pt"
        );
        assert_eq!(host_of("https://User@Hub.org:443/x"), "hub.org:443");
        assert_eq!(join_location("http://h:1/a/b?q", "/c"), "http://h:1/c");
        assert_eq!(join_location("http://h:1/a/b", "c"), "http://h:1/a/c");
        assert_eq!(join_location("http://h:1/a/b", "https://cdn/x"), "https://cdn/x");
    }
}
