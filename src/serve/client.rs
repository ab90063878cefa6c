//! A small blocking HTTP/1.1 client for the server's own benchmark and tests: one request per
//! connection, `Content-Length` or chunked bodies, and server-sent events read as they arrive.

use crate::ensure;
use crate::error::{Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

type Headers = Vec<(String, String)>;

/// The largest response body read.
const MAX_BODY: usize = 64 << 20;

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "the response ({}) is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of a server-sent event body.
    pub fn events(&self) -> Vec<String> {
        let mut out = Vec::new();
        sse_lines(&self.text(), &mut |d| {
            out.push(d.to_string());
            true
        });
        out
    }
}

fn sse_lines(text: &str, on: &mut dyn FnMut(&str) -> bool) -> bool {
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            if !on(d.trim_start()) {
                return false;
            }
        }
    }
    true
}

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<(BufReader<TcpStream>, u16, Headers)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req += "Content-Type: application/json\r\n";
    }
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    // A server may answer before the body is sent (413 for a body too large) and close: the
    // answer is still read.
    if let Err(e) = s.write_all(req.as_bytes()).and_then(|_| s.write_all(body)) {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        if !matches!(e.kind(), BrokenPipe | ConnectionReset) {
            return Err(e.into());
        }
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {:?}", line.trim_end()))?;
    let mut hs = Vec::new();
    loop {
        line.clear();
        ensure!(
            r.read_line(&mut line)? > 0,
            "the connection closed in the headers"
        );
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        ensure!(hs.len() < 100, "too many response headers");
        if let Some((k, v)) = l.split_once(':') {
            hs.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((r, status, hs))
}

/// Read a body, chunked or not, handing each piece to `on` (false: stop reading).
fn read_body(
    r: &mut BufReader<TcpStream>,
    headers: &[(String, String)],
    on: &mut dyn FnMut(&[u8]) -> bool,
) -> Result<()> {
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    let mut total = 0usize;
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut line = String::new();
        loop {
            line.clear();
            ensure!(
                r.read_line(&mut line)? > 0,
                "the connection closed in a chunked body"
            );
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .context("a bad chunk size")?;
            if size == 0 {
                return Ok(());
            }
            total += size;
            ensure!(total <= MAX_BODY, "the response body is too large");
            let mut buf = vec![0u8; size + 2];
            r.read_exact(&mut buf)?;
            if !on(&buf[..size]) {
                return Ok(());
            }
        }
    }
    if let Some(n) = get("content-length") {
        let n: usize = n.parse().context("a bad Content-Length")?;
        ensure!(n <= MAX_BODY, "the response body is too large");
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf)?;
        on(&buf);
        return Ok(());
    }
    let mut buf = Vec::new();
    r.take(MAX_BODY as u64).read_to_end(&mut buf)?;
    on(&buf);
    Ok(())
}

/// One request; the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response> {
    let (mut r, status, headers) = send(addr, method, path, headers, body, timeout)?;
    let mut out = Vec::new();
    read_body(&mut r, &headers, &mut |b| {
        out.extend_from_slice(b);
        true
    })?;
    Ok(Response {
        status,
        headers,
        body: out,
    })
}

/// A streaming request: `on_data` gets each server-sent event's data as it arrives and returns
/// false to hang up (the connection is closed then, as a client that goes away would).
/// Returns the status; a non-200 response's body is handed to `on_data` whole.
pub fn stream(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
    on_data: &mut dyn FnMut(&str) -> bool,
) -> Result<u16> {
    let (mut r, status, hs) = send(addr, "POST", path, headers, body, timeout)?;
    let mut pending = String::new();
    read_body(&mut r, &hs, &mut |b| {
        if status != 200 {
            return on_data(&String::from_utf8_lossy(b));
        }
        pending.push_str(&String::from_utf8_lossy(b));
        // Complete events end with a blank line.
        while let Some(end) = pending.find("\n\n") {
            let ev: String = pending.drain(..end + 2).collect();
            if !sse_lines(&ev, on_data) {
                return false;
            }
        }
        true
    })?;
    Ok(status)
}
