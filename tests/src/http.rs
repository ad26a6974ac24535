//! A minimal blocking HTTP/1.1 GET client for loopback tests: enough to read a `/metrics`
//! exposition or a JSON API (Prometheus's) from a process the test started, with `std::net`
//! only.
//!
//! It sends one request per connection (`Connection: close`) and reads a body framed by
//! `Content-Length`, by chunked transfer encoding, or by the end of the connection. It does
//! not do TLS, redirects, compression, keep-alive or anything but GET; connecting, reading
//! and writing each time out after [`TIMEOUT`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// How long connecting, and each read or write, may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound on a body (and on a head), so a confused peer cannot exhaust memory.
const MAX_LEN: u64 = 64 << 20;

/// A response: status, `Content-Type` and the body as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code (e.g. 200).
    pub status: u16,
    /// The `Content-Type` header, when present.
    pub content_type: Option<String>,
    /// The body (after removing the chunked framing, if any).
    pub body: String,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// `GET path` from `addr`.
///
/// # Errors
///
/// When `path` does not start with `/` or contains whitespace or control characters
/// (`InvalidInput`), on connection errors and timeouts, and when the response is malformed or
/// its body is not UTF-8 (`InvalidData`). A non-2xx status is not an error here.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a request target: {path:?}"),
        ));
    }
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: relay-tests\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    read_response(BufReader::new(stream))
}

/// `GET path` from `addr`, expecting a 2xx response with a JSON body.
///
/// # Errors
///
/// As [`get`], and when the status is not 2xx (the error has the status and body) or the
/// body is not JSON (`InvalidData`).
pub fn get_json(addr: SocketAddr, path: &str) -> io::Result<Value> {
    let response = get(addr, path)?;
    if !response.is_success() {
        return Err(io::Error::other(format!(
            "GET {path} from {addr}: HTTP {}: {}",
            response.status,
            response.body.trim()
        )));
    }
    serde_json::from_str(&response.body).map_err(|e| {
        invalid(format!(
            "GET {path} from {addr}: body is not JSON ({e}): {}",
            response.body.trim()
        ))
    })
}

/// Percent-encodes `s` for use as a query-string value: everything but the unreserved
/// characters of RFC 3986 (`A-Z a-z 0-9 - . _ ~`) becomes `%XX`.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads a status line and headers, skipping interim (1xx) responses, then the body.
fn read_response(mut reader: impl BufRead) -> io::Result<Response> {
    loop {
        let status_line = read_line(&mut reader)?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(invalid(format!(
                "not an HTTP/1 status line: {status_line:?}"
            )));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|s| (100..1000).contains(s))
            .ok_or_else(|| invalid(format!("bad status line: {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(&mut reader)?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| invalid(format!("bad header line: {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        if (100..200).contains(&status) {
            continue;
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let chunked = header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        let body = if status == 204 || status == 304 {
            Vec::new()
        } else if chunked {
            read_chunked(&mut reader)?
        } else if let Some(len) = header("content-length") {
            let len: u64 = len
                .parse()
                .map_err(|_| invalid(format!("bad Content-Length: {len:?}")))?;
            if len > MAX_LEN {
                return Err(invalid(format!("body of {len} bytes is too large")));
            }
            let mut body = vec![0; len as usize];
            reader.read_exact(&mut body)?;
            body
        } else {
            read_limited(&mut reader, MAX_LEN)?
        };
        let body = String::from_utf8(body).map_err(|e| invalid(format!("body: {e}")))?;
        return Ok(Response {
            status,
            content_type: header("content-type").map(str::to_owned),
            body,
        });
    }
}

/// One CRLF- (or LF-) terminated line, without the terminator; EOF before it is an error.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    reader.take(64 * 1024).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of the response head",
        ));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|e| invalid(format!("response head: {e}")))
}

/// A chunked body: `size[;ext]` lines, each followed by that many bytes and CRLF, up to a
/// zero-size chunk and the (ignored) trailers.
fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| invalid(format!("bad chunk size line: {line:?}")))?;
        if size == 0 {
            while !read_line(reader)?.is_empty() {}
            return Ok(body);
        }
        if body.len() as u64 + size > MAX_LEN {
            return Err(invalid("chunked body is too large"));
        }
        let start = body.len();
        body.resize(start + size as usize, 0);
        reader.read_exact(&mut body[start..])?;
        if !read_line(reader)?.is_empty() {
            return Err(invalid("chunk not followed by CRLF"));
        }
    }
}

/// The rest of the stream, up to `max` bytes.
fn read_limited(reader: &mut impl Read, max: u64) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    reader.take(max + 1).read_to_end(&mut body)?;
    if body.len() as u64 > max {
        return Err(invalid("body is too large"));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves `response` (raw bytes) to one connection after reading its request head, and
    /// returns the address and a handle yielding the request.
    fn serve_once(response: &'static [u8]) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut request = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                request.push_str(&line);
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            // Written in pieces, so the client sees short reads; the client may hang up
            // before the end (it reads only what the framing says).
            let mut stream = reader.into_inner();
            for piece in response.chunks(7) {
                if stream
                    .write_all(piece)
                    .and_then(|()| stream.flush())
                    .is_err()
                {
                    break;
                }
            }
            request
        });
        (addr, handle)
    }

    #[test]
    fn content_length() {
        let (addr, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 5\r\n\r\nhello trailing junk",
        );
        let response = get(addr, "/metrics").unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(
            response.content_type.as_deref(),
            Some("text/plain; version=0.0.4")
        );
        assert_eq!(response.body, "hello");
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /metrics HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Connection: close\r\n"), "{request}");
    }

    #[test]
    fn chunked_with_extension_and_trailer() {
        let (addr, server) = serve_once(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n4;x=y\r\nWiki\r\nA\r\npedia in\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n",
        );
        let response = get(addr, "/x?q=1").unwrap();
        assert_eq!(response.status, 404);
        assert_eq!(response.content_type, None);
        assert_eq!(response.body, "Wikipedia in\r\n");
        server.join().unwrap();
    }

    #[test]
    fn body_to_connection_close() {
        let (addr, server) =
            serve_once(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\": [1]}");
        assert_eq!(get_json(addr, "/").unwrap(), serde_json::json!({"a": [1]}));
        server.join().unwrap();
    }

    #[test]
    fn errors() {
        let (addr, server) =
            serve_once(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 4\r\n\r\nnope");
        let e = get_json(addr, "/api").unwrap_err().to_string();
        assert!(e.contains("HTTP 400: nope"), "{e}");
        server.join().unwrap();

        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort");
        assert!(get(addr, "/").is_err());
        server.join().unwrap();

        let (addr, server) = serve_once(b"SSH-2.0-OpenSSH\r\n");
        let e = get(addr, "/").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        server.join().unwrap();

        let any = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            get(any, "no-slash").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            get(any, "/a b").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn encodes_components() {
        assert_eq!(
            encode_component(r#"up{job="self"} == 1"#),
            "up%7Bjob%3D%22self%22%7D%20%3D%3D%201"
        );
        assert_eq!(encode_component("a-b.c_d~é"), "a-b.c_d~%C3%A9");
    }
}
