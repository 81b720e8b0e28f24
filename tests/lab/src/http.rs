//! Small HTTP/1.1 clients: one request per connection, or keep-alive.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// An HTTP response as the clients below read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Whether it carried `Connection: close`.
    pub close: bool,
    pub body: String,
}

/// Reads one response: status line, headers, then a body of `Content-Length` bytes.
fn read_response(reader: &mut impl BufRead) -> io::Result<Response> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let (mut len, mut close) = (None, false);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(bad(format!("bad header {header:?}")));
        };
        if name.eq_ignore_ascii_case("content-length") {
            len = value.trim().parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.trim().eq_ignore_ascii_case("close");
        }
    }
    let len = len.ok_or_else(|| bad("no Content-Length".into()))?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8(body).map_err(|e| bad(e.to_string()))?;
    Ok(Response {
        status,
        close,
        body,
    })
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    Ok(stream)
}

/// `GET path` over a new connection (`Connection: close`); returns (status, body). Call
/// it inside a namespace ([`crate::Netns::enter`]).
pub fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: switcheroo\r\nConnection: close\r\n\r\n"
    )?;
    let response = read_response(&mut BufReader::new(stream))?;
    Ok((response.status, response.body))
}

/// A keep-alive HTTP/1.1 connection: requests in turn over one TCP connection.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    /// Connects; call it inside a namespace ([`crate::Netns::enter`]). The connection can then be
    /// used from any thread.
    pub fn connect(addr: SocketAddr) -> io::Result<KeepAlive> {
        Ok(KeepAlive {
            reader: BufReader::new(connect(addr)?),
        })
    }

    /// `GET path` on this connection.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        write!(
            self.reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: switcheroo\r\n\r\n"
        )?;
        read_response(&mut self.reader)
    }

    /// Waits up to `timeout` for the server to close the connection without sending
    /// anything more; false if it stayed open (or sent bytes).
    pub fn closed_by_server_within(&mut self, timeout: Duration) -> bool {
        let stream = self.reader.get_mut();
        if stream.set_read_timeout(Some(timeout)).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        matches!(self.reader.read(&mut byte), Ok(0))
    }
}
