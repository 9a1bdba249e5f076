//! The data plane as the kernel holds it: the XDP object loaded (verifier included), its maps
//! (pinned, or adopted from pins), its link. The only code that calls aya, split by job:
//! - this file: loading the object and reaching its programs and maps;
//! - [`attach`]: attaching, through a pinned link that outlives the daemon;
//! - [`maps`]: executing a map plan through typed per-map handles, reading pinned contents;
//! - [`counters`]: reading the counters and the connection table.

pub mod attach;
pub mod counters;
pub mod maps;

use std::{collections::BTreeMap, path::Path};

use aya::{
    maps::{MapData, MapError},
    programs::{links::FdLink, ProgramError, Xdp},
    Ebpf, EbpfLoader,
};
use balancer_common::{map_names, program_names};

use crate::{
    plan::contents::MapContents,
    shell::pins::{self, PinError},
};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("the kernel refused the {program} program ({io_error}); the verifier's log:\n{log}")]
    Verifier {
        program: &'static str,
        io_error: std::io::Error,
        log: String,
    },
    #[error("loading the {program} program into the kernel")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching to {interface} in {mode} mode")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}")]
    Io {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}")]
    Xdp {
        map: &'static str,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error("{what} in {dir}")]
    Link {
        what: &'static str,
        dir: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the kernel attached XDP without a BPF link; keeping the data plane across restarts needs \
         BPF links for XDP (Linux 5.9 or later)"
    )]
    NoLink(#[source] aya::programs::links::LinkError),
    #[error("parsing the XDP object")]
    Object(#[source] aya_obj::ParseError),
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

pub(crate) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// A program that failed to load: the verifier's refusal with its log once, whole.
fn program_error(program: &'static str, source: ProgramError) -> DataplaneError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => DataplaneError::Verifier {
            program,
            io_error,
            log: verifier_log.to_string(),
        },
        source => DataplaneError::Program { program, source },
    }
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        }
    }

    /// As recorded in the pinned state map.
    pub fn code(self) -> u32 {
        match self {
            AttachedMode::Native => 1,
            AttachedMode::Generic => 2,
        }
    }

    pub fn from_code(code: u32) -> Option<AttachedMode> {
        match code {
            1 => Some(AttachedMode::Native),
            2 => Some(AttachedMode::Generic),
            _ => None,
        }
    }
}

/// Settings fixed when the object is loaded.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub hash_seed: u32,
    pub conn_table_size: u32,
    /// Entries of each pending table (`balancer_common::defence`).
    pub pending_table_size: u32,
    /// NAT connections per family (each NAT table holds twice as many entries).
    pub nat_table_size: u32,
}

/// The loaded program and its maps. Dropping it detaches the program and frees the maps,
/// unless they are pinned (see [`Dataplane::load_pinned`]).
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Option<(String, AttachedMode)>,
    /// The Maglev tables in `MAGLEV_TABLES`, by VIP id: held so that their memory can be
    /// reported (the kernel keeps them alive through the outer map anyway).
    tables: BTreeMap<u32, MapData>,
    /// Pinned: the layout directory, and the XDP link once attached through it.
    pinned: Option<Pinned>,
    /// CPUs the per-CPU maps have a slot for.
    cpus: usize,
    /// The NAT programs are loaded and in `NAT_PROGRAMS` (see `load_nat`).
    nat_loaded: bool,
}

struct Pinned {
    dir: std::path::PathBuf,
    link: Option<FdLink>,
    /// The links on the interfaces NAT replies arrive on, by interface.
    reply_links: BTreeMap<String, FdLink>,
    /// The program the pinned link ran before this one was swapped in, if adopted.
    replaced_program: Option<u32>,
}

/// The program running on the interface, for the status.
#[derive(Clone, Copy, Debug)]
pub struct ProgramIds {
    pub program_id: u32,
    pub program_tag: u64,
    pub link_id: Option<u32>,
    /// Adopted: the program this one replaced through the pinned link.
    pub replaced_program: Option<u32>,
}

impl Dataplane {
    /// Loads the built-in object and the balancer program into the kernel (verifier
    /// included), without attaching it anywhere.
    pub fn load(options: LoadOptions) -> Result<Self> {
        Self::load_object(crate::PROGRAM, options)
    }

    /// Like [`Dataplane::load`], from another build of the object (tests, upgrades).
    pub fn load_object(object: &[u8], options: LoadOptions) -> Result<Self> {
        use program_names::*;
        Self::load_programs(object, options, &[BALANCER, PASS], None)
    }

    /// Like [`Dataplane::load_object`], with every map pinned in `dir` (a layout directory):
    /// maps already pinned there are adopted, after checking that they match this object; the
    /// others are created and pinned. Returns what adopted maps hold (tables not read).
    pub fn load_pinned(
        object: &[u8],
        options: LoadOptions,
        dir: &Path,
    ) -> Result<(Self, Option<MapContents>)> {
        let obj = aya_obj::Object::parse(object).map_err(DataplaneError::Object)?;
        let names = pins::pinnable_maps(&obj);
        let adopting = names.iter().any(|n| dir.join(n).exists());
        if adopting {
            let sizes = (
                options.conn_table_size,
                options.pending_table_size,
                options.nat_table_size,
            );
            pins::check_compatible(&obj, sizes, dir, &names)?;
        }
        use program_names::*;
        let mut dataplane =
            Self::load_programs(object, options, &[BALANCER, PASS], Some((dir, &names)))?;
        dataplane.pinned = Some(Pinned {
            dir: dir.to_owned(),
            link: None,
            reply_links: BTreeMap::new(),
            replaced_program: None,
        });
        let contents = if adopting {
            Some(dataplane.read_contents()?)
        } else {
            None
        };
        // Adopted NAT VIPs: this build's NAT programs take over from the last daemon's.
        if contents.as_ref().is_some_and(|c| !c.nat.vips.is_empty()) {
            dataplane.load_nat()?;
        }
        Ok((dataplane, contents))
    }

    /// Loads the balancer and every trivial program of an object (benchmarks: the built-in
    /// one, or another revision's to compare with).
    pub fn load_with_trivial_programs(object: &[u8], options: LoadOptions) -> Result<Self> {
        use program_names::*;
        Self::load_programs(object, options, &[BALANCER, PASS, DROP, TX, REFLECT], None)
    }

    /// Loads the object and only the decapsulating program (`balancer decap`).
    pub fn load_decap() -> Result<Self> {
        let options = LoadOptions {
            hash_seed: 0,
            conn_table_size: crate::config::MIN_CONN_TABLE_SIZE,
            pending_table_size: crate::config::MIN_CONN_TABLE_SIZE,
            nat_table_size: crate::config::MIN_NAT_TABLE_SIZE,
        };
        Self::load_programs(crate::PROGRAM, options, &[program_names::DECAP], None)
    }

    fn load_programs(
        object: &[u8],
        options: LoadOptions,
        programs: &[&'static str],
        pins: Option<(&Path, &[String])>,
    ) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader.override_global("HASH_SEED", &options.hash_seed, true);
        for name in map_names::CONN_TABLES {
            loader.map_max_entries(name, options.conn_table_size);
        }
        for name in map_names::NAT_TABLES {
            loader.map_max_entries(name, 2 * options.nat_table_size);
        }
        for name in map_names::PENDING_TABLES
            .iter()
            .chain(&map_names::NAT_PENDING_TABLES)
        {
            loader.map_max_entries(name, options.pending_table_size);
        }
        if let Some((dir, names)) = pins {
            for name in names {
                loader.map_pin_path(name.as_str(), dir.join(name));
            }
        }
        let mut ebpf = loader.load(object).map_err(DataplaneError::Load)?;
        for &name in programs {
            load_program(&mut ebpf, name)?;
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DataplaneError::Io {
            map: "per-CPU maps",
            source,
        })?;
        Ok(Dataplane {
            ebpf,
            attached: None,
            tables: BTreeMap::new(),
            pinned: None,
            cpus,
            nat_loaded: false,
        })
    }

    /// Loads the NAT programs (through the verifier) and puts them in `NAT_PROGRAMS`, once:
    /// when the first NAT VIP is written (see `execute`) or adopted. Until then the balancer's
    /// tail calls to them find nothing, which no packet needs without a NAT VIP.
    pub fn load_nat(&mut self) -> Result<()> {
        if !self.nat_loaded {
            load_nat_programs(&mut self.ebpf)?;
            self.nat_loaded = true;
        }
        Ok(())
    }

    /// The balancer program, e.g. for BPF_PROG_TEST_RUN.
    pub fn program(&self) -> &Xdp {
        self.program_named(program_names::BALANCER)
    }

    /// A loaded program of the object by name (see `balancer_common::program_names`).
    pub fn program_named(&self, name: &'static str) -> &Xdp {
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded and checked in load_programs")
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::Missing {
                what: "loaded program",
                name,
            })
    }

    /// Where and how the balancer is attached.
    pub fn attached(&self) -> Option<(&str, AttachedMode)> {
        self.attached.as_ref().map(|(i, m)| (i.as_str(), *m))
    }

    /// The layout directory, if pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pinned.as_ref().map(|p| p.dir.as_path())
    }

    /// Whether the loaded object has a map of that name (another revision's object, in the
    /// benchmark, may lack a newer one).
    pub fn has_map(&self, name: &str) -> bool {
        self.ebpf.map(name).is_some()
    }

    /// A map of the loaded object by name, untyped: for the benchmark, which fills the maps
    /// of another revision's object (another layout) beside this one's.
    pub fn raw_map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.map_mut(name)
    }

    /// The descriptor of a map of the object (for a handle of one's own, on another thread).
    pub(crate) fn map_fd(&self, name: &'static str) -> Result<&aya::maps::MapFd> {
        use aya::maps::Map;
        match self.map(name)? {
            Map::Array(d)
            | Map::HashMap(d)
            | Map::LruHashMap(d)
            | Map::PerCpuArray(d)
            | Map::PerCpuHashMap(d)
            | Map::PerCpuLruHashMap(d)
            | Map::RingBuf(d) => Ok(d.fd()),
            _ => Err(DataplaneError::Missing {
                what: "array or hash map",
                name,
            }),
        }
    }

    /// A handle of its own on a map (its descriptor duplicated), for a thread or task that
    /// works beside the daemon's: the NAT sweeper, the sync.
    pub fn own_map(&self, name: &'static str) -> Result<aya::maps::MapData> {
        use std::os::fd::AsFd as _;
        let fd = self
            .map_fd(name)?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| DataplaneError::Io { map: name, source })?;
        aya::maps::MapData::from_fd(fd).map_err(map_err(name))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or(DataplaneError::Missing { what: "map", name })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::Missing { what: "map", name })
    }
}

/// Loads a program of the object (through the verifier).
fn load_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::Missing {
            what: "program",
            name,
        })?
        .try_into()
        .map_err(|source| program_error(name, source))?;
    program
        .load()
        .map_err(|source| program_error(name, source))?;
    Ok(program)
}

/// Loads the NAT programs and puts them in `NAT_PROGRAMS`, where the balancer tail-calls
/// them. An object without them (an earlier layout's, in the benchmark) is left as it is.
fn load_nat_programs(ebpf: &mut Ebpf) -> Result<()> {
    use program_names::{NAT_FORWARD, NAT_REPLY};
    if ebpf.program(NAT_FORWARD).is_none() {
        return Ok(());
    }
    for (slot, name) in [
        (balancer_common::NAT_PROGRAM_FORWARD, NAT_FORWARD),
        (balancer_common::NAT_PROGRAM_REPLY, NAT_REPLY),
    ] {
        let fd = load_program(ebpf, name)?
            .fd()
            .map_err(|source| program_error(name, source))?
            .try_clone()
            .map_err(|source| DataplaneError::Io {
                map: map_names::NAT_PROGRAMS,
                source,
            })?;
        let map = ebpf
            .map_mut(map_names::NAT_PROGRAMS)
            .ok_or(DataplaneError::Missing {
                what: "map",
                name: map_names::NAT_PROGRAMS,
            })?;
        let mut programs: aya::maps::ProgramArray<&mut aya::maps::MapData> =
            map.try_into().map_err(map_err(map_names::NAT_PROGRAMS))?;
        programs
            .set(slot, &fd, 0)
            .map_err(map_err(map_names::NAT_PROGRAMS))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each cause once: a verifier refusal shows the system error and the log once each.
    #[test]
    fn errors_name_each_cause_once() {
        let error = DataplaneError::Verifier {
            program: "balancer",
            io_error: std::io::Error::from_raw_os_error(libc::EACCES),
            log: "0: (b7) r0 = 2\ninvalid access to packet".into(),
        };
        let text = format!("{:#}", anyhow::Error::new(error));
        assert_eq!(text.matches("Permission denied").count(), 1, "{text}");
        assert_eq!(
            text.matches("invalid access to packet").count(),
            1,
            "{text}"
        );
        let error = DataplaneError::Io {
            map: "BACKENDS",
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        };
        let text = format!(
            "{:#}",
            anyhow::Error::new(error).context("writing the maps")
        );
        assert_eq!(
            text,
            "writing the maps: map BACKENDS: Cannot allocate memory (os error 12)"
        );
    }
}
