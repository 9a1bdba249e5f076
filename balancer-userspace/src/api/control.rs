//! The control socket: write actions (a reload, and any later one) reach the daemon here,
//! never through the metrics port. A Unix socket, mode 0600, beside the daemon's lock file
//! unless `control_socket` says otherwise; each connection carries one request (a line of
//! JSON) and gets one reply (a line of JSON). Only root and the daemon's own user are served.
//!
//! Bounds: at most `MAX_CLIENTS` connections at once (the others are closed at once), a
//! request of at most `MAX_REQUEST` bytes read within `READ_TIMEOUT`.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, Semaphore},
};

use crate::{
    api::connections::{AcceptErrors, ACCEPT_BACKOFF},
    shell::pins,
};

/// Connections served at once.
pub const MAX_CLIENTS: usize = 16;
/// The longest request line.
pub const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon may take to answer: a reload is answered within a second (new
/// backends' next hops are waited for at most 500 ms), or a few with a very large file.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Read the config file again now.
    Reload,
    /// Withdraw one VIP (by name) or every VIP from the `[announce]` table.
    Withdraw {
        #[serde(default)]
        vip: Option<String>,
    },
    /// Announce again one VIP or every VIP.
    Announce {
        #[serde(default)]
        vip: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlReply {
    /// The config is the running one now (`changes` empty: nothing changed).
    Reloaded {
        generation: u64,
        changes: Vec<String>,
        /// New backends whose next hops were not resolved when the config was applied: they
        /// take traffic once they are.
        #[serde(default, skip_serializing_if = "is_zero")]
        resolving: u64,
    },
    /// The config was refused; the running one stays in force.
    Rejected { error: String },
    /// The request could not be carried out.
    Failed { error: String },
    /// A request other than a reload was carried out: what it did.
    Done { message: String },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A request as the event loop receives it, with the way back.
#[derive(Debug)]
pub struct Command {
    pub request: ControlRequest,
    pub reply: oneshot::Sender<ControlReply>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{what} the control socket {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no daemon answers on the control socket {} (is `balancer run` running with this config, \
         interface and pin directory? --socket names the socket directly)",
        path.display()
    )]
    NoDaemon {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from the daemon within {0:?}")]
    Timeout(Duration),
    #[error("the daemon's answer is not a control reply: {0:?}")]
    Garbled(String),
}

/// The default control socket of a daemon on `interface` with `pin_dir`.
pub fn default_socket(pin_dir: &Path, interface: &str) -> PathBuf {
    pins::run_file(pin_dir, interface, "sock")
}

/// The bound socket; removed when dropped.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Binds `path` (mode 0600), replacing a stale socket: the caller holds the daemon's lock,
    /// so no other daemon can be listening there.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let io = |what| {
            move |source| ControlError::Io {
                what,
                path: path.to_owned(),
                source,
            }
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating the directory of"))?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("removing the stale")(e));
            }
            _ => {}
        }
        let listener = UnixListener::bind(path).map_err(io("binding"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("restricting"))?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        commands: mpsc::Sender<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        let mut errors = AcceptErrors::new("control socket");
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if let Some(message) = errors.succeeded(Instant::now()) {
                            tracing::info!("{message}");
                        }
                        stream
                    }
                    Err(e) => {
                        // Logged when it starts and when it ends, not at every retry.
                        if let Some(message) = errors.failed(&e, Instant::now()) {
                            tracing::warn!("{message}");
                        }
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            // Over the limit: closed at once, nothing read.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let commands = commands.clone();
            tokio::spawn(async move {
                serve_one(stream, commands).await;
                drop(slot);
            });
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Only root and the daemon's own user may act through the socket (its mode says the same;
/// this also covers a connection made before the mode was set).
fn trusted(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    stream
        .peer_cred()
        .is_ok_and(|cred| cred.uid() == 0 || cred.uid() == own)
}

async fn serve_one(mut stream: UnixStream, commands: mpsc::Sender<Command>) {
    let reply = if trusted(&stream) {
        answer(&mut stream, commands).await
    } else {
        ControlReply::Failed {
            error: "only root or the daemon's user may use the control socket".into(),
        }
    };
    let mut line = serde_json::to_string(&reply).expect("a reply serialises");
    line.push('\n');
    let _ = tokio::time::timeout(READ_TIMEOUT, stream.write_all(line.as_bytes())).await;
}

async fn answer(stream: &mut UnixStream, commands: mpsc::Sender<Command>) -> ControlReply {
    let failed = |error: String| ControlReply::Failed { error };
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST);
    match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => return failed(format!("no request within {READ_TIMEOUT:?}")),
        Ok(Err(e)) => return failed(format!("reading the request: {e}")),
        Ok(Ok(_)) if !line.ends_with('\n') => {
            return failed(format!(
                "a request is one line of at most {MAX_REQUEST} bytes"
            ))
        }
        Ok(Ok(_)) => {}
    }
    let request: ControlRequest = match serde_json::from_str(&line) {
        Ok(request) => request,
        Err(e) => return failed(format!("not a request: {e}")),
    };
    let (reply, answer) = oneshot::channel();
    if commands.send(Command { request, reply }).await.is_err() {
        return failed("the daemon is shutting down".into());
    }
    match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => failed("the daemon is shutting down".into()),
        Err(_) => failed(format!(
            "no answer from the daemon within {REPLY_TIMEOUT:?}"
        )),
    }
}

/// Sends one request to the daemon at `path` and waits for its reply.
pub async fn request(path: &Path, request: &ControlRequest) -> Result<ControlReply, ControlError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::NoDaemon {
            path: path.to_owned(),
            source,
        })?;
    let io = |what| {
        move |source| ControlError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    };
    let mut line = serde_json::to_string(request).expect("a request serialises");
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .await
        .map_err(io("writing to"))?;
    let mut answer = String::new();
    let wait = REPLY_TIMEOUT + READ_TIMEOUT;
    let mut reader = BufReader::new(stream).take(1 << 20);
    tokio::time::timeout(wait, reader.read_line(&mut answer))
        .await
        .map_err(|_| ControlError::Timeout(wait))?
        .map_err(io("reading from"))?;
    serde_json::from_str(&answer).map_err(|_| ControlError::Garbled(answer))
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    /// A real socket in a scratch directory: a reload request answered by a fake event loop,
    /// garbage refused, an overlong request refused, the mode 0600.
    #[tokio::test]
    async fn requests_and_replies_over_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("balancer-control-{}", std::process::id()));
        let path = dir.join("control.sock");
        let server = ControlServer::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (commands, mut inbox) = mpsc::channel(4);
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(server.serve(commands, async {
            let _ = stopped.await;
        }));
        tokio::spawn(async move {
            while let Some(command) = inbox.recv().await {
                assert_eq!(command.request, ControlRequest::Reload);
                let _ = command.reply.send(ControlReply::Reloaded {
                    generation: 7,
                    changes: vec!["VIP web: +10.0.0.9".into()],
                    resolving: 1,
                });
            }
        });
        let reply = request(&path, &ControlRequest::Reload).await.unwrap();
        assert_eq!(
            reply,
            ControlReply::Reloaded {
                generation: 7,
                changes: vec!["VIP web: +10.0.0.9".into()],
                resolving: 1,
            }
        );
        // A reply of an older daemon, without `resolving`, still reads.
        let old: ControlReply =
            serde_json::from_str(r#"{"result":"reloaded","generation":3,"changes":[]}"#).unwrap();
        assert_eq!(
            old,
            ControlReply::Reloaded {
                generation: 3,
                changes: Vec::new(),
                resolving: 0
            }
        );
        for garbage in [&b"{\"command\":\"format_disk\"}\n"[..], &[b'x'; 5000][..]] {
            let mut raw = UnixStream::connect(&path).await.unwrap();
            raw.write_all(garbage).await.unwrap();
            let mut answer = String::new();
            raw.read_to_string(&mut answer).await.unwrap();
            let reply: ControlReply = serde_json::from_str(&answer).unwrap();
            assert!(matches!(reply, ControlReply::Failed { .. }), "{answer}");
        }
        let _ = stop.send(());
        serving.await.unwrap();
        assert!(!path.exists(), "the socket is removed with the server");
        let missing = request(&path, &ControlRequest::Reload).await.unwrap_err();
        assert!(
            matches!(missing, ControlError::NoDaemon { .. }),
            "{missing}"
        );
        let _ = std::fs::remove_dir(&dir);
    }
}
