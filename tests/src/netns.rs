//! Network namespaces the project creates for its tests and demo, removed on drop (also when
//! a test panics), and left-overs of crashed runs removed before new ones are made.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Output},
    thread::JoinHandle,
};

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace (replacing a left-over of the same name) with `lo` up and IPv6
    /// off, so that no router solicitations or MLD reports add packets the tests count.
    pub fn create(name: &str) -> Netns {
        if Path::new("/run/netns").join(name).exists() {
            delete_left_over(name);
        }
        run("ip", &["netns", "add", name]);
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        ns
    }

    /// Turns IPv6 back on (it is off by default, see `create`).
    pub fn enable_ipv6(&self) {
        self.sysctl("net.ipv6.conf.all.disable_ipv6", "0");
        self.sysctl("net.ipv6.conf.default.disable_ipv6", "0");
        self.sysctl("net.ipv6.conf.lo.disable_ipv6", "0");
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`, panicking with the command's output if it fails.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A veth pair: `name` here, `peer_name` in `peer` (both down, without addresses).
    pub fn veth(&self, name: &str, peer: &Netns, peer_name: &str) {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer_name,
            "netns",
            peer.name(),
        ]);
    }

    /// Runs a program inside the namespace, panicking if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")]);
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it opens live here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        spawn_in(&self.name, f)
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// A counter of an interface in this namespace (`/sys/class/net/IF/statistics/NAME`).
    pub fn link_stat(&self, interface: &str, stat: &str) -> u64 {
        let out = self.exec(
            "cat",
            &[&format!("/sys/class/net/{interface}/statistics/{stat}")],
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a counter")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `f` on a new thread that has entered the namespace named `name` (for holders of a
/// namespace's name that do not own its [`Netns`], such as a server started inside it).
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = Path::new("/run/netns").join(name);
    let ns = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        drop(ns);
        f()
    })
}

/// Runs a command, panicking with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if !out.status.success() {
        panic!(
            "`{program} {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Deletes namespaces named `<prefix><pid>-...` whose creating process is gone: what a crashed
/// or killed earlier run left behind.
pub fn remove_stale(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if crate::scratch::owner_alive(name, prefix) == Some(false) {
            delete_left_over(name);
        }
    }
}

/// Deletes a namespace left over by an earlier run, after killing the processes still in it
/// (a daemon of a killed test, such as a BIRD): one would keep the namespace alive, unnamed,
/// with its interfaces and its sockets.
fn delete_left_over(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory effects; the pid is a process inside the
                // left-over namespace, which only a dead run's processes are in.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).output();
}

/// Panics unless running as root, with a message saying so: the tiers that need root must
/// fail loudly, never pass by skipping.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "{what} needs root (network namespaces, XDP, BPF maps). Run `sudo cargo xtask test`; \
             this test does not skip itself."
        );
    }
}
