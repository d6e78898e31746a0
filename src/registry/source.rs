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
                origin(url)?;
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
                        check_revision(&revision)?;
                        // A commit is named by its lowercase sha, as the hub
                        // and its cache name it.
                        let revision =
                            if is_commit_like(&revision) { revision.to_ascii_lowercase() } else { revision };
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
            // Two hex digits: `from_str_radix` alone would take `%+f` for `%0f`.
            let byte = hex.bytes().all(|b| b.is_ascii_hexdigit()).then(|| u8::from_str_radix(hex, 16).ok());
            out.push(byte.flatten().ok_or_else(|| format!("bad %-escape `%{hex}`"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the path is not UTF-8".into())
}

/// A 40-hex-digit string (a commit sha in either case).
fn is_commit_like(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Refuses a revision that is not a valid git ref name (`git
/// check-ref-format` rules, one-level names allowed) or a commit: it becomes
/// a path under the repository's `refs/` in the hub cache.
pub(crate) fn check_revision(revision: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!("revision `{}` is not a valid git ref name ({why})", revision.escape_debug()))
    };
    if revision.is_empty() {
        return bad("empty");
    }
    if revision.len() > 255 {
        return bad("too long");
    }
    if revision.starts_with('/') || revision.ends_with('/') {
        return bad("a leading or trailing `/`");
    }
    if revision.starts_with('-') {
        return bad("a leading `-`");
    }
    if revision == "@" || revision.contains("@{") {
        return bad("`@` alone or `@{`");
    }
    if revision.contains("..") || revision.contains("//") {
        return bad("`..` or `//`");
    }
    if revision.ends_with('.') {
        return bad("a trailing `.`");
    }
    if revision.chars().any(|c| c.is_control() || c.is_whitespace() || "\\~^:?*[".contains(c)) {
        return bad("a control character, a space or one of `\\ ~ ^ : ? * [`");
    }
    for component in revision.split('/') {
        if component.starts_with('.') || component.ends_with(".lock") {
            return bad("a component starting with `.` or ending with `.lock`");
        }
    }
    Ok(())
}

/// What decides where a request goes: scheme, host and port (the scheme's
/// default when not written), as the HTTP client parses the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) scheme: String,
    pub(crate) host: String,
    pub(crate) port: Option<u16>,
}

fn parser() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| ureq::AgentBuilder::new().build())
}

/// Parses an http(s) URL the way the HTTP client (`ureq`, with the `url`
/// crate) does, refusing what different parsers read differently: a
/// backslash, userinfo (`user@`), a scheme other than http(s), no host.
pub(crate) fn origin(url: &str) -> Result<Origin, String> {
    if url.contains('\\') {
        return Err("a backslash in a URL is refused".into());
    }
    let parsed = parser().get(url).request_url().map_err(|e| format!("not a valid URL: {e}"))?;
    let u = parsed.as_url();
    if !u.username().is_empty() || u.password().is_some() {
        return Err("a URL with a user name or password (`user@host`) is refused".into());
    }
    let scheme = u.scheme().to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!("scheme `{scheme}` is not http or https"));
    }
    let host = u.host_str().filter(|h| !h.is_empty()).ok_or("no host")?.to_ascii_lowercase();
    Ok(Origin { scheme, host, port: u.port_or_known_default() })
}

/// Joins a redirect's `Location` onto the URL that answered it, and checks
/// the result as [`origin`] does.
pub(crate) fn join_location(base: &str, location: &str) -> Result<String, String> {
    if location.contains('\\') {
        return Err(format!("redirect to {location:?}: a backslash in a URL is refused"));
    }
    let parsed = parser().get(base).request_url().map_err(|e| format!("not a valid URL: {e}"))?;
    let joined = parsed
        .as_url()
        .join(location)
        .map_err(|e| format!("redirect to {location:?}: not a valid URL: {e}"))?
        .to_string();
    origin(&joined).map_err(|e| format!("redirect to {location:?}: {e}"))?;
    Ok(joined)
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
        let bad = [
            "ftp://x/y",
            "file://relative",
            "hf://org/w.pt",
            "hf://../x/y",
            "nothing",
            "https:///x",
            "file:///a%+f",
        ];
        for bad in bad {
            assert!(Source::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            resolve_url("http://h:1/", "o/r", "refs/pr/1", "a b/c.pt"),
            "http://h:1/o/r/resolve/refs%2Fpr%2F1/a%20b/c.pt"
        );
        assert_eq!(join_location("http://h:1/a/b?q", "/c").unwrap(), "http://h:1/c");
        assert_eq!(join_location("http://h:1/a/b", "c").unwrap(), "http://h:1/a/c");
        assert_eq!(join_location("http://h:1/a/b", "https://cdn/x").unwrap(), "https://cdn/x");
        assert!(join_location("http://h:1/a", "https://evil.com\\@h:1/x").is_err());
        assert!(join_location("http://h:1/a", "https://user@h:1/x").is_err());
        assert!(join_location("http://h:1/a", "ftp://h/x").is_err());
        let o = origin("https://Hub.org/x").unwrap();
        assert_eq!((o.scheme.as_str(), o.host.as_str(), o.port), ("https", "hub.org", Some(443)));
        assert_eq!(origin("http://hub.org/x").unwrap().port, Some(80));
        for bad in ["https://evil.com\\@huggingface.co/x", "https://u:p@huggingface.co/x", "https://u@h/x"] {
            assert!(origin(bad).is_err(), "{bad} accepted");
            assert!(Source::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn revisions_follow_git_ref_rules() {
        for good in ["main", "v1.0", "refs/pr/1", "release/2024-01", "a.b"] {
            check_revision(good).unwrap();
        }
        for bad in [
            "/home/victim/.bashrc",
            "a/../b",
            "..",
            "a//b",
            "a\\b",
            "a\nb",
            "x.lock",
            "a/b.lock",
            "a/",
            "a.",
            "-x",
            "@",
            "a b",
            "a~1",
            "a^",
            "a:b",
            "a?",
            "a*",
            "a[",
            ".hidden",
            "a/.b",
        ] {
            assert!(check_revision(bad).is_err(), "{bad:?} accepted");
            assert!(Source::parse(&format!("hf://o/r/w.pt@{bad}")).is_err(), "{bad:?} accepted");
        }
        assert!(check_revision("a@{1}").is_err());
        assert_eq!(
            Source::parse(&format!("hf://o/r/w.pt@{}", "ABCDEF0123".repeat(4))).unwrap(),
            Source::Hf { repo: "o/r".into(), path: "w.pt".into(), revision: "abcdef0123".repeat(4) }
        );
    }
}
