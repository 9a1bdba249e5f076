//! A minimal HTTP/1.1 client for the daemon's own API (`balancer reload`): one request per
//! connection, on loopback or wherever `metrics_listen` points.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context as _};

/// Sends `method path` to `address`; returns the status code and the body.
pub fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&address, Duration::from_secs(5)).with_context(|| {
            format!("connecting to the balancer's API at {address} (is `balancer run` running?)")
        })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .context("reading the API's answer")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("incomplete answer from the API")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .context("the API's answer has no status code")?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("unexpected chunked answer from the API");
    }
    Ok((code, body.to_owned()))
}
