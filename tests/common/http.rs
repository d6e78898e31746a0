//! A small HTTP/1.1 server for the registry's tests, on 127.0.0.1, std only:
//! one thread per connection, `Connection: close`, Range requests, scripted
//! faults, request counts, and the hub's file-resolution protocol. It stops
//! when dropped, or by itself after five minutes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a route misbehaves.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Serves the body.
    None,
    /// The first `times` GETs announce the whole body, send `bytes` of it,
    /// and close the connection.
    CutAfter { bytes: usize, times: usize },
    /// The first `times` requests get this status.
    Status { code: u16, times: usize },
    /// Every request gets this status.
    Always(u16),
    /// Every GET announces the whole (rest of the) body and sends it only
    /// up to byte `bytes` of the file.
    Truncated(usize),
    /// No Content-Length: the body is sent until the connection closes.
    NoLength,
    /// Announces this Content-Length (and sends nothing).
    ClaimsLength(u64),
    /// Sends the body in chunks of `chunk` bytes, `delay` apart.
    Slow { chunk: usize, delay: Duration },
    /// Answers `302 Found` to this location (with the route's headers).
    Redirect(String),
    /// Answers every GET with `206 Partial Content` and the first `bytes`
    /// of the body, asked for a range or not.
    Unasked206(usize),
}

/// One served path.
#[derive(Debug, Clone)]
struct Route {
    body: Arc<Vec<u8>>,
    fault: Fault,
    headers: Vec<(String, String)>,
    served: usize,
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct State {
    routes: Mutex<HashMap<String, Route>>,
    seen: Mutex<Vec<Seen>>,
}

pub struct Server {
    pub port: u16,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || handle(stream, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Server { port, state, stop, thread: Some(thread) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Serves `body` at `path` (replacing what was there).
    pub fn add(&self, path: &str, body: Vec<u8>, fault: Fault) {
        self.add_with_headers(path, body, fault, Vec::new());
    }

    /// Serves `body` at `path` with extra response headers. A route with an
    /// `ETag` honours `If-Range`: a request whose `If-Range` differs gets the
    /// whole body (200).
    pub fn add_with_headers(&self, path: &str, body: Vec<u8>, fault: Fault, headers: Vec<(String, String)>) {
        let route = Route { body: Arc::new(body), fault, headers, served: 0 };
        self.state.routes.lock().unwrap().insert(path.to_string(), route);
    }

    /// Serves a file of a hub model repository the way the hub resolves it:
    /// `/{repo}/resolve/{revision}/{path}` and `/{repo}/resolve/{commit}/{path}`
    /// answer with `X-Repo-Commit`, an `ETag` that is the body's sha256 (as for
    /// LFS files), and no Xet headers. Returns the resolve path of `revision`.
    pub fn add_hub_file(
        &self,
        repo: &str,
        revision: &str,
        commit: &str,
        path: &str,
        body: Vec<u8>,
        sha256: &str,
    ) -> String {
        let headers = vec![
            ("X-Repo-Commit".to_string(), commit.to_string()),
            ("ETag".to_string(), format!("\"{sha256}\"")),
        ];
        for rev in [revision, commit] {
            self.add_with_headers(
                &format!("/{repo}/resolve/{rev}/{path}"),
                body.clone(),
                Fault::None,
                headers.clone(),
            );
        }
        format!("/{repo}/resolve/{revision}/{path}")
    }

    /// Serves a hub file the way the hub serves an LFS file: the resolve
    /// path answers `302` to `location` (a CDN) with `X-Repo-Commit`,
    /// `X-Linked-Etag` (the sha256 of `body`) and `X-Linked-Size`. Returns
    /// the resolve path.
    pub fn add_hub_redirect(
        &self,
        repo: &str,
        revision: &str,
        commit: &str,
        path: &str,
        location: &str,
        body: &[u8],
    ) -> String {
        use sha2::Digest;
        let sha256: String = sha2::Sha256::digest(body).iter().map(|b| format!("{b:02x}")).collect();
        let size = body.len();
        let headers = vec![
            ("X-Repo-Commit".to_string(), commit.to_string()),
            ("X-Linked-Etag".to_string(), format!("\"{sha256}\"")),
            ("X-Linked-Size".to_string(), size.to_string()),
        ];
        let resolve = format!("/{repo}/resolve/{revision}/{path}");
        self.add_with_headers(&resolve, Vec::new(), Fault::Redirect(location.to_string()), headers);
        resolve
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Number of requests with this method on this path.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.seen().iter().filter(|s| s.method == method && s.path == path).count()
    }

    /// GETs of this path.
    pub fn gets(&self, path: &str) -> usize {
        self.count("GET", path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        206 => "Partial Content",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn handle(mut stream: TcpStream, state: &State) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let header = |name: &str| {
        text.split("\r\n").skip(1).find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        })
    };
    let mut range = header("Range");
    let if_range = header("If-Range");
    state.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        range: range.clone(),
        if_range: if_range.clone(),
        authorization: header("Authorization"),
    });

    let route = {
        let mut routes = state.routes.lock().unwrap();
        routes.get_mut(&path).map(|r| {
            r.served += 1;
            r.clone()
        })
    };
    let head = method == "HEAD";
    let Some(route) = route else {
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let status_only = |stream: &mut TcpStream, code: u16| {
        let _ = write!(
            stream,
            "HTTP/1.1 {code} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            reason(code)
        );
    };
    match route.fault {
        Fault::Status { code, times } if route.served <= times => return status_only(&mut stream, code),
        Fault::Always(code) => return status_only(&mut stream, code),
        Fault::Redirect(ref location) => {
            let extra: String = route.headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
            let _ = write!(
                stream,
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        _ => {}
    }
    let body = &route.body[..];
    let total = body.len();
    if let Fault::Unasked206(n) = route.fault {
        let n = n.min(total);
        let _ = write!(
            stream,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{}/{total}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n",
            n.saturating_sub(1)
        );
        if !head {
            let _ = stream.write_all(&body[..n]);
        }
        let _ = stream.flush();
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    let etag = route.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("ETag")).map(|(_, v)| v.clone());
    if let (Some(v), Some(e)) = (&if_range, &etag) {
        if v != e {
            range = None;
        }
    }
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    let mut out = String::new();
    let (code, slice) = match start {
        Some(s) if s >= total && total > 0 => return status_only(&mut stream, 416),
        Some(s) => {
            out.push_str(&format!("Content-Range: bytes {s}-{}/{total}\r\n", total.saturating_sub(1)));
            (206, &body[s.min(total)..])
        }
        None => (200, body),
    };
    for (k, v) in &route.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    match route.fault {
        Fault::NoLength => {}
        Fault::ClaimsLength(n) => out.push_str(&format!("Content-Length: {n}\r\n")),
        _ => out.push_str(&format!("Content-Length: {}\r\n", slice.len())),
    }
    let _ = write!(stream, "HTTP/1.1 {code} {}\r\n{out}Connection: close\r\n\r\n", reason(code));
    if head {
        return;
    }
    let gets = route.served;
    let _ = match route.fault {
        Fault::CutAfter { bytes, times } if gets <= times => {
            stream.write_all(&slice[..bytes.min(slice.len())])
        }
        Fault::Truncated(bytes) => {
            let from = total - slice.len();
            stream.write_all(&slice[..bytes.saturating_sub(from).min(slice.len())])
        }
        Fault::ClaimsLength(_) => Ok(()),
        Fault::Slow { chunk, delay } => {
            for c in slice.chunks(chunk.max(1)) {
                if stream.write_all(c).is_err() {
                    break;
                }
                std::thread::sleep(delay);
            }
            Ok(())
        }
        _ => stream.write_all(slice),
    };
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}
