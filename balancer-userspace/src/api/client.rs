//! The CLI's side of the read-only HTTP API: `balancer status` fetches the status document.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{header::HOST, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::api::status::StatusDocument;

/// The largest status document accepted.
const MAX_BODY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the balancer's API at {address} (is `balancer run` running?)")]
    Connect {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the balancer's API at {address}")]
    Http {
        address: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("the balancer's API at {address} answered {status}: {body}")]
    Status {
        address: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("reading the answer of {address}: {message}")]
    Body {
        address: SocketAddr,
        message: String,
    },
    #[error("the status document from {address}")]
    Document {
        address: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
    #[error("no answer from {address} within {timeout:?}")]
    Timeout {
        address: SocketAddr,
        timeout: Duration,
    },
}

/// `GET path` on `address`: the body of a 200 answer.
pub async fn get(
    address: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String, ClientError> {
    tokio::time::timeout(timeout, get_unbounded(address, path))
        .await
        .map_err(|_| ClientError::Timeout { address, timeout })?
}

async fn get_unbounded(address: SocketAddr, path: &str) -> Result<String, ClientError> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(|source| ClientError::Connect { address, source })?;
    let http = |source| ClientError::Http { address, source };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let driver = tokio::spawn(connection);
    let request = Request::get(path)
        .header(HOST, address.to_string())
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ClientError::Body {
            address,
            message: e.to_string(),
        })?
        .to_bytes();
    driver.abort();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(ClientError::Status {
            address,
            status,
            body,
        });
    }
    Ok(body)
}

/// The daemon's status document.
pub async fn status(address: SocketAddr, timeout: Duration) -> Result<StatusDocument, ClientError> {
    let body = get(address, "/api/v1/status", timeout).await?;
    serde_json::from_str(&body).map_err(|source| ClientError::Document { address, source })
}
