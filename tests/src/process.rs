//! The real `balancer` binary, run inside a namespace.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{http::get_json, netns::Netns, scratch::Scratch};

/// The `balancer` binary: `$BALANCER_BIN`, else the workspace's `target/debug/balancer`.
pub fn balancer_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BALANCER_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug/balancer");
    assert!(
        path.is_file(),
        "{} does not exist: build it first (`cargo build -p balancer-userspace`, which \
         `cargo xtask test` does) or point BALANCER_BIN at it",
        path.display()
    );
    path
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace root")
}

/// A running `balancer` process; killed on drop if still running.
pub struct BalancerProcess {
    child: Child,
    log: PathBuf,
}

impl BalancerProcess {
    /// `ip netns exec NS balancer ARGS...`, stdout and stderr to `log`.
    pub fn start(ns: &Netns, args: &[&str], log: &Path) -> BalancerProcess {
        Self::start_wrapped(ns, &[], args, log)
    }

    /// `balancer run --config CONFIG --pin-dir <the scratch's pin directory> EXTRA...`, its
    /// log in the scratch directory under `log`. (Under `ip netns exec` the default pin
    /// directory is not on a bpffs; see `Scratch::pin_dir`.)
    pub fn run(
        ns: &Netns,
        config: &Path,
        scratch: &Scratch,
        extra: &[&str],
        log: &str,
    ) -> BalancerProcess {
        Self::run_wrapped(ns, &[], config, scratch, extra, log)
    }

    /// Like [`run`](Self::run), through `wrapper` (see [`start_wrapped`](Self::start_wrapped)),
    /// such as `prlimit --nofile=1024:1024`.
    pub fn run_wrapped(
        ns: &Netns,
        wrapper: &[&str],
        config: &Path,
        scratch: &Scratch,
        extra: &[&str],
        log: &str,
    ) -> BalancerProcess {
        let pin_dir = scratch.pin_dir_arg();
        let mut args = vec![
            "run",
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--pin-dir",
            &pin_dir,
        ];
        args.extend_from_slice(extra);
        Self::start_wrapped(ns, wrapper, &args, &scratch.path(log))
    }

    /// Like [`start`](Self::start), through `wrapper` (a program and its arguments that runs
    /// the rest of its command line, such as `setpriv ...`).
    pub fn start_wrapped(
        ns: &Netns,
        wrapper: &[&str],
        args: &[&str],
        log: &Path,
    ) -> BalancerProcess {
        Self::start_binary(ns, &balancer_binary(), wrapper, args, log)
    }

    /// Like [`start_wrapped`](Self::start_wrapped), with another `balancer` binary (the
    /// benchmark's baseline revision).
    pub fn start_binary(
        ns: &Netns,
        binary: &Path,
        wrapper: &[&str],
        args: &[&str],
        log: &Path,
    ) -> BalancerProcess {
        let file =
            std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let binary = binary.to_str().expect("UTF-8 path");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = ns.command(program);
                c.args(rest).arg(binary);
                c
            }
            None => ns.command(binary),
        };
        let child = command
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("spawn balancer");
        BalancerProcess {
            child,
            log: log.to_owned(),
        }
    }

    /// Waits until the status API answers, panicking with the log if the process exits or
    /// the timeout passes first.
    pub fn wait_ready(
        &mut self,
        ns: &Netns,
        api: SocketAddr,
        timeout: Duration,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("balancer exited early ({status}):\n{}", self.log());
            }
            if let Ok(json) = get_json(ns, api, "/api/v1/status") {
                return json;
            }
            if Instant::now() > deadline {
                panic!("balancer not ready after {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends a signal (SIGHUP to reload, ...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself, panicking with the log after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "balancer still running after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits up to 10 s (SIGKILL after that).
    pub fn stop(&mut self) -> ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BalancerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
