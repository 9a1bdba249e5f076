//! What the kernel must offer, checked before anything is loaded, so that an old or trimmed
//! kernel gets one clear sentence instead of an error from deep inside the loader.
//!
//! The oldest kernel supported is 5.10 (the first LTS with everything below: BPF links for
//! XDP arrived in 5.9). Verified: 6.1 (Debian 12, in the VM tier), 6.12 (Debian 12
//! backports, in the VM tier) and 6.18.

use aya::maps::MapType;
use aya::programs::ProgramType;

/// The oldest kernel the balancer supports.
pub const MIN_KERNEL: (u32, u32) = (5, 10);

/// What the kernel was found to support.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probes {
    /// `uname -r`.
    pub release: String,
    /// BPF Type Format: the program's maps are described in BTF.
    pub btf: bool,
    /// Global data (.rodata) in BPF programs: the hash seed lives there.
    pub global_data: bool,
    pub xdp: bool,
    pub array_of_maps: bool,
    pub lru_hash: bool,
    pub devmap_hash: bool,
    pub percpu_array: bool,
}

impl Probes {
    /// Asks the running kernel. A probe the kernel refuses for lack of privileges is listed in
    /// the second value rather than taken as missing.
    pub fn probe() -> (Probes, Vec<&'static str>) {
        let features = aya::features();
        let mut denied = Vec::new();
        let eperm = |e: &std::io::Error| e.raw_os_error() == Some(libc::EPERM);
        let mut map = |t, name: &'static str| match aya::sys::is_map_supported(t) {
            Ok(supported) => supported,
            Err(e) => {
                if eperm(&e.io_error) {
                    denied.push(name);
                }
                false
            }
        };
        let array_of_maps = map(MapType::ArrayOfMaps, "an array of maps");
        let lru_hash = map(MapType::LruHash, "an LRU hash map");
        let devmap_hash = map(MapType::DevMapHash, "a device hash map");
        let percpu_array = map(MapType::PerCpuArray, "a per-CPU array");
        let xdp = match aya::sys::is_program_supported(ProgramType::Xdp) {
            Ok(supported) => supported,
            Err(aya::programs::ProgramError::SyscallError(e)) if eperm(&e.io_error) => {
                denied.push("an XDP program");
                false
            }
            Err(_) => false,
        };
        (
            Probes {
                release: release(),
                btf: features.btf().is_some(),
                global_data: features.bpf_global_data(),
                xdp,
                array_of_maps,
                lru_hash,
                devmap_hash,
                percpu_array,
            },
            denied,
        )
    }

    /// Everything missing, each with what it is needed for; empty if the kernel will do.
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        match parse_release(&self.release) {
            Some(version) if version < MIN_KERNEL => missing.push(format!(
                "Linux {} is older than {}.{}, the oldest kernel the balancer supports (it needs BPF \
                 links for XDP, from 5.9, and the 5.10 verifier)",
                self.release, MIN_KERNEL.0, MIN_KERNEL.1
            )),
            None => missing.push(format!(
                "cannot read a version from the kernel release {:?}",
                self.release
            )),
            Some(_) => {}
        }
        let mut need = |present: bool, what: &str| {
            if !present {
                missing.push(what.to_owned());
            }
        };
        need(
            self.btf,
            "BTF support in the bpf() system call (the program's maps are described in BTF; \
             CONFIG_BPF_SYSCALL with BTF, Linux 5.x)",
        );
        need(
            self.global_data,
            "global data in BPF programs (the hash seed; Linux 5.2)",
        );
        need(
            self.xdp,
            "XDP programs (CONFIG_BPF_SYSCALL and XDP support)",
        );
        need(
            self.array_of_maps,
            "BPF_MAP_TYPE_ARRAY_OF_MAPS (map-in-map: the per-VIP Maglev tables)",
        );
        need(
            self.lru_hash,
            "BPF_MAP_TYPE_LRU_HASH (the connection table)",
        );
        need(
            self.devmap_hash,
            "BPF_MAP_TYPE_DEVMAP_HASH (XDP_REDIRECT to other interfaces; Linux 5.4)",
        );
        need(
            self.percpu_array,
            "BPF_MAP_TYPE_PERCPU_ARRAY (the counters)",
        );
        missing
    }
}

/// `uname -r` of the running kernel.
pub fn release() -> String {
    // SAFETY: a plain C struct of byte arrays, for which all zeroes is a valid value.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a struct utsname to fill, alive for the call.
    if unsafe { libc::uname(&mut name) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates its fields.
    unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// "6.1.0-56-amd64" -> (6, 1).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error(
        "not permitted to create {} (Operation not permitted): the balancer needs root, or \
         CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON",
        denied.join(", ")
    )]
    Denied { denied: Vec<&'static str> },
    #[error("this kernel ({release}) cannot run the balancer; it lacks: {}", missing.join("; "))]
    Lacking {
        release: String,
        missing: Vec<String>,
    },
}

/// Fails with every missing feature named, before anything is loaded.
pub fn check() -> Result<(), KernelError> {
    let (probes, denied) = Probes::probe();
    if !denied.is_empty() {
        return Err(KernelError::Denied { denied });
    }
    let missing = probes.missing();
    if !missing.is_empty() {
        return Err(KernelError::Lacking {
            release: probes.release,
            missing,
        });
    }
    Ok(())
}

/// The soft limit on open files (`RLIMIT_NOFILE`) before and after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFiles {
    pub before: u64,
    /// The soft limit now in force: the hard limit, unless raising failed.
    pub now: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NofileError {
    #[error("reading the open-files limit (RLIMIT_NOFILE)")]
    Read(#[source] std::io::Error),
    #[error("raising the open-files soft limit from {soft} to the hard limit {hard}")]
    Raise {
        /// The soft limit left in force.
        soft: u64,
        hard: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Raises the soft limit on open files to the hard limit. The soft limit of a login or a
/// service manager is often 1024, which a few hundred clients of the status API and the
/// health probes' sockets exhaust together; the hard limit is what the administrator
/// allows. Raising the soft limit up to the hard one needs no privilege, and nothing in the
/// daemon uses select(2), the one interface that breaks on descriptors above 1023.
pub fn raise_nofile() -> Result<OpenFiles, NofileError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a struct rlimit to fill, alive for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(NofileError::Read(std::io::Error::last_os_error()));
    }
    let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
    if soft >= hard {
        return Ok(OpenFiles {
            before: soft,
            now: soft,
        });
    }
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: a valid struct rlimit, alive for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(NofileError::Raise {
            soft,
            hard,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(OpenFiles {
        before: soft,
        now: hard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(release: &str) -> Probes {
        Probes {
            release: release.to_owned(),
            btf: true,
            global_data: true,
            xdp: true,
            array_of_maps: true,
            lru_hash: true,
            devmap_hash: true,
            percpu_array: true,
        }
    }

    #[test]
    fn releases_are_read_and_compared() {
        assert_eq!(parse_release("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(parse_release("6.18.44-fc-v769"), Some((6, 18)));
        assert_eq!(parse_release("5.10.0+"), Some((5, 10)));
        assert_eq!(parse_release("garbage"), None);
        assert!(complete("5.10.0-30-amd64").missing().is_empty());
        assert!(complete("6.1.0-56-amd64").missing().is_empty());
    }

    #[test]
    fn an_old_kernel_is_named_with_the_minimum() {
        let missing = complete("5.4.0-150-generic").missing();
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(
            missing[0].contains("Linux 5.4.0-150-generic is older than 5.10"),
            "{missing:?}"
        );
    }

    #[test]
    fn every_missing_feature_is_named() {
        let mut probes = complete("6.1.0");
        probes.btf = false;
        probes.array_of_maps = false;
        let missing = probes.missing();
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(missing[0].starts_with("BTF"), "{missing:?}");
        assert!(missing[1].contains("map-in-map"), "{missing:?}");
    }

    fn nofile() -> libc::rlimit {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a struct rlimit to fill, alive for the call.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
        limit
    }

    #[test]
    fn the_open_files_soft_limit_is_raised_to_the_hard_limit() {
        // One below the hard limit first (lowering needs no privilege and takes nothing from
        // the other tests of this process), so that there is something to raise.
        let hard = nofile().rlim_max;
        let lowered = libc::rlimit {
            rlim_cur: hard - 1,
            rlim_max: hard,
        };
        // SAFETY: a valid struct rlimit, alive for the call.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) };
        assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
        let raised = raise_nofile().expect("raising up to the hard limit needs no privilege");
        assert_eq!((raised.before, raised.now), (hard - 1, hard));
        assert_eq!(nofile().rlim_cur, hard);
        // Once at the hard limit there is nothing to raise.
        let again = raise_nofile().unwrap();
        assert_eq!((again.before, again.now), (hard, hard));
    }
}
