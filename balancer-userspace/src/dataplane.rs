//! The only module that talks to the kernel's BPF side: load the XDP object, attach it, write
//! the maps, read the counters.
//!
//! Map updates keep every packet consistent:
//! - a VIP becomes visible (its `VIPS` key is written) only after its backends and its table
//!   are in place, and disappears before they go;
//! - a VIP's Maglev table is a fresh inner map, filled completely, then swapped in with a
//!   single update of `MAGLEV_TABLES`: a packet sees the old table or the new one;
//! - the connection table is never cleared by a change: flows keep their backends.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::fd::{AsFd as _, AsRawFd as _},
};

use std::path::{Path, PathBuf};

use aya::{
    maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap as BpfHashMap, MapData, MapError, PerCpuArray,
        PerCpuValues,
    },
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use balancer_common::{
    map_names, program_names, Backend, ConnEntry, DecapAddress, FlowKey, TrafficStats, VipKey,
    VipMeta, BACKEND_F_VALID, DECAP_OUTCOME_COUNT, MAGLEV_CAPACITY, MAGLEV_TABLE_MAP_FLAGS,
    MAX_BACKENDS, OUTCOME_COUNT,
};

use crate::{
    config::XdpModeSetting,
    pins::{self, PinnedState},
    reconcile::DesiredState,
};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("loading the {program} program into the kernel: {source}")]
    Verifier {
        program: &'static str,
        source: ProgramError,
    },
    #[error("attaching to {interface} in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        source: ProgramError,
    },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("map {map}: {source}")]
    Io {
        map: &'static str,
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    Xdp {
        map: &'static str,
        source: aya::maps::xdp::XdpMapError,
    },
    #[error(
        "the data plane pinned in {dir} does not match this build: {}. Start with --replace to \
         replace it: a fresh data plane (empty connection table, counters from zero) takes over \
         the interface, and established flows are placed again by the Maglev tables (most keep \
         their backend; those that land elsewhere break)",
        problems.join("; ")
    )]
    IncompatiblePins { dir: String, problems: Vec<String> },
    #[error("pinning in {dir}: {message}")]
    Pin { dir: String, message: String },
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
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
}

/// Settings fixed when the object is loaded.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub hash_seed: u32,
    pub conn_table_size: u32,
}

/// The loaded program and its maps. Dropping it detaches the program and frees the maps,
/// unless they are pinned (see [`Dataplane::load_pinned`]).
pub struct Dataplane {
    ebpf: Ebpf,
    applied: DesiredState,
    attached: Option<(String, AttachedMode)>,
    /// The Maglev tables in `MAGLEV_TABLES`, by VIP id: held so that their memory can be
    /// reported (the kernel keeps them alive through the outer map anyway).
    tables: BTreeMap<u32, MapData>,
    /// Pinned: the layout directory, and the XDP link once attached through it.
    pinned: Option<Pinned>,
}

struct Pinned {
    dir: PathBuf,
    link: Option<FdLink>,
    /// The program the pinned link ran before this one was swapped in, if adopted.
    replaced_program: Option<u32>,
}

/// What a pinned data plane held when a daemon adopted it.
#[derive(Clone, Debug, Default)]
pub struct PinnedContents {
    pub keys: Vec<(VipKey, VipMeta)>,
    pub backends: BTreeMap<u32, Backend>,
    pub egress: BTreeSet<u32>,
    /// How it was set up, if recorded.
    pub state: Option<PinnedState>,
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

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub backends: BTreeMap<u32, TrafficStats>,
    pub vips: BTreeMap<u32, TrafficStats>,
    /// Indexed by `balancer_common::Outcome`.
    pub outcomes: Vec<u64>,
}

impl Counters {
    /// Packets per XDP verdict (indexed like `xdp_action::NAMES`), summed from the outcomes.
    pub fn verdicts(&self) -> Vec<u64> {
        (0..balancer_common::xdp_action::NAMES.len())
            .map(|i| {
                balancer_common::Outcome::ALL
                    .iter()
                    .filter(|o| o.verdict() as usize == i)
                    .map(|o| self.outcomes[*o as usize])
                    .sum()
            })
            .collect()
    }
}

impl Dataplane {
    /// Loads the object and the balancer program into the kernel (verifier included), without
    /// attaching it anywhere.
    pub fn load(options: LoadOptions) -> Result<Self> {
        Self::load_object(crate::PROGRAM, options)
    }

    /// Like [`Dataplane::load`], from another build of the object (tests, upgrades).
    pub fn load_object(object: &[u8], options: LoadOptions) -> Result<Self> {
        Self::load_programs(
            object,
            options,
            &[program_names::BALANCER, program_names::PASS],
            None,
        )
    }

    /// Like [`Dataplane::load_object`], with every map pinned in `dir` (a layout directory,
    /// see `pins`): maps already pinned there are adopted, after checking that they match
    /// this object; the others are created and pinned. Returns what adopted maps hold.
    pub fn load_pinned(
        object: &[u8],
        options: LoadOptions,
        dir: &Path,
    ) -> Result<(Self, Option<PinnedContents>)> {
        let obj = aya_obj::Object::parse(object).map_err(|e| DataplaneError::Pin {
            dir: dir.display().to_string(),
            message: format!("parsing the XDP object: {e}"),
        })?;
        let names = pinnable_maps(&obj);
        let adopting = names.iter().any(|n| dir.join(n).exists());
        if adopting {
            check_pins(&obj, options, dir, &names)?;
        }
        let mut dataplane = Self::load_programs(
            object,
            options,
            &[program_names::BALANCER, program_names::PASS],
            Some((dir, &names)),
        )?;
        dataplane.pinned = Some(Pinned {
            dir: dir.to_owned(),
            link: None,
            replaced_program: None,
        });
        let contents = if adopting {
            Some(dataplane.read_contents(pins::read_state(dir))?)
        } else {
            None
        };
        Ok((dataplane, contents))
    }

    /// What the maps hold: VIP keys, live backends, egress devices.
    fn read_contents(&self, state: Option<PinnedState>) -> Result<PinnedContents> {
        let vips: BpfHashMap<&MapData, VipKey, VipMeta> = self
            .map(map_names::VIPS)?
            .try_into()
            .map_err(map_err(map_names::VIPS))?;
        let mut keys: Vec<(VipKey, VipMeta)> = vips
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::VIPS))?;
        keys.sort_by_key(|(k, _)| (k.addr, k.port, k.proto, k.family));
        let backends_map: Array<&MapData, Backend> = self
            .map(map_names::BACKENDS)?
            .try_into()
            .map_err(map_err(map_names::BACKENDS))?;
        let mut backends = BTreeMap::new();
        for id in 0..MAX_BACKENDS {
            let b = backends_map
                .get(&id, 0)
                .map_err(map_err(map_names::BACKENDS))?;
            if b.flags & BACKEND_F_VALID != 0 {
                backends.insert(id, b);
            }
        }
        let devices: DevMapHash<&MapData> = self
            .map(map_names::EGRESS_DEVICES)?
            .try_into()
            .map_err(map_err(map_names::EGRESS_DEVICES))?;
        let egress = devices.keys().filter_map(|k| k.ok()).collect();
        Ok(PinnedContents {
            keys,
            backends,
            egress,
            state,
        })
    }

    /// Adopted maps: what they hold, as the state the next [`Dataplane::apply`] changes from.
    pub fn set_applied(&mut self, applied: DesiredState) {
        self.applied = applied;
    }

    /// Loads the balancer and every trivial program of the object (benchmarks).
    pub fn load_with_trivial_programs(options: LoadOptions) -> Result<Self> {
        use program_names::*;
        Self::load_programs(
            crate::PROGRAM,
            options,
            &[BALANCER, PASS, DROP, TX, REFLECT],
            None,
        )
    }

    /// Loads the object and only the decapsulating program (`balancer decap`).
    pub fn load_decap() -> Result<Self> {
        let options = LoadOptions {
            hash_seed: 0,
            conn_table_size: crate::config::MIN_CONN_TABLE_SIZE,
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
        loader
            .override_global("HASH_SEED", &options.hash_seed, true)
            .map_max_entries(map_names::CONN_TABLE, options.conn_table_size);
        if let Some((dir, names)) = pins {
            for name in names {
                loader.map_pin_path(name.as_str(), dir.join(name));
            }
        }
        let mut ebpf = loader.load(object)?;
        for &name in programs {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Missing {
                    what: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| DataplaneError::Verifier {
                    program: name,
                    source,
                })?;
            program.load().map_err(|source| DataplaneError::Verifier {
                program: name,
                source,
            })?;
        }
        Ok(Dataplane {
            ebpf,
            applied: DesiredState::default(),
            attached: None,
            tables: BTreeMap::new(),
            pinned: None,
        })
    }

    /// The balancer program, e.g. for BPF_PROG_TEST_RUN.
    pub fn program(&self) -> &Xdp {
        self.program_named(program_names::BALANCER)
    }

    /// The trivial XDP_PASS program of the same object.
    pub fn pass_program(&self) -> &Xdp {
        self.program_named(program_names::PASS)
    }

    /// A loaded program of the object by name (see `balancer_common::program_names`).
    pub fn program_named(&self, name: &'static str) -> &Xdp {
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded and checked in load_object")
    }

    /// Attaches the trivial XDP_PASS program to `interface` in native mode.
    pub fn attach_pass(&mut self, interface: &str) -> Result<AttachedMode> {
        self.attach_program(program_names::PASS, interface, XdpModeSetting::Native)
            .map(|(mode, _)| mode)
    }

    /// Attaches the decapsulating program to `interface`.
    pub fn attach_decap(
        &mut self,
        interface: &str,
        setting: XdpModeSetting,
    ) -> Result<(AttachedMode, Option<String>)> {
        self.attach_program(program_names::DECAP, interface, setting)
    }

    /// Attaches the balancer to `interface`. `Auto` tries native mode and falls back to
    /// generic mode, returning the reason native mode was refused.
    pub fn attach(
        &mut self,
        interface: &str,
        setting: XdpModeSetting,
    ) -> Result<(AttachedMode, Option<String>)> {
        self.attach_program(program_names::BALANCER, interface, setting)
    }

    /// Attaches a loaded program of the object by name.
    pub fn attach_program(
        &mut self,
        name: &'static str,
        interface: &str,
        setting: XdpModeSetting,
    ) -> Result<(AttachedMode, Option<String>)> {
        self.attach_program_link(name, interface, setting)
            .map(|(mode, fallback, _)| (mode, fallback))
    }

    /// Attaches the balancer through the link pinned in the layout directory: an existing
    /// link (left by an earlier daemon, or `previous`, taken from pins being replaced) gets
    /// this program swapped in atomically, keeping its attach mode; otherwise a new link is
    /// made. The link ends up pinned in the layout directory. Returns the attach mode and, for
    /// a new generic-mode link under `auto`, why native mode was refused.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        setting: XdpModeSetting,
        previous: Option<(FdLink, Option<PinnedState>)>,
    ) -> Result<(AttachedMode, Option<String>)> {
        let dir = self
            .pinned
            .as_ref()
            .map(|p| p.dir.clone())
            .expect("attach_pinned after load_pinned");
        let pin_error = |message: String| DataplaneError::Pin {
            dir: dir.display().to_string(),
            message,
        };
        let link_path = dir.join(pins::LINK);
        let existing = match previous {
            Some(previous) => Some(previous),
            None if link_path.exists() => match PinnedLink::from_pin(&link_path) {
                Ok(pinned) => Some((FdLink::from(pinned), pins::read_state(&dir))),
                Err(e) => {
                    tracing::warn!(
                        "the pinned link {} cannot be opened ({}); attaching anew",
                        link_path.display(),
                        error_chain(&e)
                    );
                    std::fs::remove_file(&link_path)
                        .map_err(|e| pin_error(format!("removing the stale link pin: {e}")))?;
                    None
                }
            },
            None => None,
        };
        if let Some((fd_link, state)) = existing {
            let mode = match state.map(|s| s.xdp_mode) {
                Some(2) => AttachedMode::Generic,
                _ => AttachedMode::Native,
            };
            let wanted = match setting {
                XdpModeSetting::Native => Some(AttachedMode::Native),
                XdpModeSetting::Generic => Some(AttachedMode::Generic),
                XdpModeSetting::Auto => None,
            };
            if let Some(wanted) = wanted.filter(|w| *w != mode) {
                return Err(DataplaneError::IncompatiblePins {
                    dir: dir.display().to_string(),
                    problems: vec![format!(
                        "the pinned link runs in {} mode, the config asks for xdp_mode = \"{}\"",
                        mode.as_str(),
                        wanted.as_str()
                    )],
                });
            }
            match self.swap_into_link(fd_link) {
                Ok((link, old)) => {
                    let link = if link_path.exists() {
                        link
                    } else {
                        FdLink::from(
                            link.pin(&link_path)
                                .map_err(|e| pin_error(format!("pinning the link: {e}")))?,
                        )
                    };
                    let pinned = self.pinned.as_mut().expect("pinned");
                    pinned.link = Some(link);
                    pinned.replaced_program = old;
                    self.attached = Some((interface.to_owned(), mode));
                    return Ok((mode, None));
                }
                Err(e) => {
                    // A link whose interface went away is defunct: make a new one.
                    tracing::warn!("the pinned link cannot take the program ({e}); attaching anew");
                    if link_path.exists() {
                        std::fs::remove_file(&link_path)
                            .map_err(|e| pin_error(format!("removing the stale link pin: {e}")))?;
                    }
                }
            }
        }
        let (mode, fallback, id) =
            self.attach_program_link(program_names::BALANCER, interface, setting)?;
        let program = self.balancer_mut()?;
        let link = program
            .take_link(id)
            .map_err(|e| pin_error(format!("taking the link: {e}")))?;
        let link = FdLink::try_from(link).map_err(|e| {
            pin_error(format!(
                "the kernel attached XDP without a BPF link ({e}); keeping the data plane across \
                 restarts needs BPF links for XDP (Linux 5.9 or later)"
            ))
        })?;
        let pinned = link
            .pin(&link_path)
            .map_err(|e| pin_error(format!("pinning the link: {e}")))?;
        let link = FdLink::from(pinned);
        self.pinned.as_mut().expect("pinned").link = Some(link);
        Ok((mode, fallback))
    }

    /// Swaps the balancer into `link`; returns the link (now the balancer's) and the program
    /// it replaced.
    fn swap_into_link(
        &mut self,
        link: FdLink,
    ) -> std::result::Result<(FdLink, Option<u32>), String> {
        let old = link.info().ok().map(|i| i.program_id());
        let xdp_link = XdpLink::try_from(link).map_err(|e| error_chain(&e))?;
        let program = self.balancer_mut().map_err(|e| error_chain(&e))?;
        let id = program
            .attach_to_link(xdp_link)
            .map_err(|e| error_chain(&e))?;
        let link = program.take_link(id).map_err(|e| error_chain(&e))?;
        let link = FdLink::try_from(link).map_err(|e| error_chain(&e))?;
        Ok((link, old))
    }

    fn balancer_mut(&mut self) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(program_names::BALANCER)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::Missing {
                what: "loaded program",
                name: program_names::BALANCER,
            })
    }

    /// Records how the pinned data plane is set up (in its `state` map).
    pub fn write_pinned_state(&self, hash_seed: u32) -> anyhow::Result<()> {
        let (Some(pinned), Some((_, mode))) = (&self.pinned, &self.attached) else {
            return Ok(());
        };
        pins::write_state(
            &pinned.dir,
            PinnedState {
                xdp_mode: match mode {
                    AttachedMode::Native => 1,
                    AttachedMode::Generic => 2,
                },
                hash_seed,
            },
        )
    }

    /// The layout directory, if pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pinned.as_ref().map(|p| p.dir.as_path())
    }

    /// The balancer program's ids, and its link's.
    pub fn program_ids(&self) -> Option<ProgramIds> {
        let info = self.program().info().ok()?;
        let pinned = self.pinned.as_ref();
        Some(ProgramIds {
            program_id: info.id(),
            program_tag: info.tag(),
            link_id: pinned
                .and_then(|p| p.link.as_ref())
                .and_then(|l| l.info().ok())
                .map(|i| i.id()),
            replaced_program: pinned.and_then(|p| p.replaced_program),
        })
    }

    fn attach_program_link(
        &mut self,
        name: &'static str,
        interface: &str,
        setting: XdpModeSetting,
    ) -> Result<(AttachedMode, Option<String>, XdpLinkId)> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::Missing {
                what: "loaded program",
                name,
            })?;
        let attach = |program: &mut Xdp, mode: AttachedMode| {
            let flags = match mode {
                AttachedMode::Native => XdpMode::Driver,
                AttachedMode::Generic => XdpMode::Skb,
            };
            program
                .attach(interface, flags)
                .map_err(|source| DataplaneError::Attach {
                    interface: interface.to_owned(),
                    mode: mode.as_str(),
                    source,
                })
        };
        let (mode, fallback, id) = match setting {
            XdpModeSetting::Native => (
                AttachedMode::Native,
                None,
                attach(program, AttachedMode::Native)?,
            ),
            XdpModeSetting::Generic => (
                AttachedMode::Generic,
                None,
                attach(program, AttachedMode::Generic)?,
            ),
            XdpModeSetting::Auto => match attach(program, AttachedMode::Native) {
                Ok(id) => (AttachedMode::Native, None, id),
                Err(native) => {
                    let reason = error_chain(&native);
                    let id = attach(program, AttachedMode::Generic)?;
                    (AttachedMode::Generic, Some(reason), id)
                }
            },
        };
        self.attached = Some((interface.to_owned(), mode));
        Ok((mode, fallback, id))
    }

    /// The addresses the decapsulating program accepts tunnels to.
    pub fn set_decap_addresses(&mut self, addresses: &[std::net::IpAddr]) -> Result<()> {
        let name = map_names::DECAP_ADDRESSES;
        let mut map: BpfHashMap<&mut MapData, DecapAddress, u8> =
            self.map_mut(name)?.try_into().map_err(map_err(name))?;
        let old: Vec<DecapAddress> = map.keys().filter_map(|k| k.ok()).collect();
        for key in old {
            ignore_missing(map.remove(&key)).map_err(map_err(name))?;
        }
        for &address in addresses {
            let (addr, family) = crate::reconcile::address_bytes(address);
            map.insert(
                DecapAddress {
                    addr,
                    family,
                    _pad: [0; 3],
                },
                1,
                0,
            )
            .map_err(map_err(name))?;
        }
        Ok(())
    }

    /// The decapsulating program's counters, indexed by `DecapOutcome`.
    pub fn decap_counters(&self) -> Result<Vec<u64>> {
        let name = map_names::DECAP_STATS;
        let stats: PerCpuArray<&MapData, u64> =
            self.map(name)?.try_into().map_err(map_err(name))?;
        (0..DECAP_OUTCOME_COUNT)
            .map(|i| stats.get(&i, 0).map(|v| v.iter().sum()))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(map_err(name))
    }

    pub fn attached(&self) -> Option<(&str, AttachedMode)> {
        self.attached.as_ref().map(|(i, m)| (i.as_str(), *m))
    }

    /// What the maps hold now.
    pub fn applied(&self) -> &DesiredState {
        &self.applied
    }

    /// Makes the maps hold `desired`, in an order that keeps every packet consistent (see
    /// the module documentation).
    pub fn apply(&mut self, desired: &DesiredState) -> Result<()> {
        let previous = std::mem::take(&mut self.applied);
        let result = self.apply_from(&previous, desired);
        // On error the maps hold a mix; remember the desired state anyway so that the next
        // apply rewrites everything that differs.
        self.applied = desired.clone();
        result
    }

    fn apply_from(&mut self, previous: &DesiredState, desired: &DesiredState) -> Result<()> {
        let previous_vips: HashMap<&str, &crate::reconcile::DesiredVip> =
            previous.vips.iter().map(|v| (v.name.as_str(), v)).collect();

        // 1. Counters of newly used ids start from zero (an id may have served another
        //    backend or VIP before).
        let new_backends: Vec<u32> = desired
            .backends
            .keys()
            .filter(|id| !previous.backends.contains_key(id))
            .copied()
            .collect();
        self.zero_stats(map_names::BACKEND_STATS, &new_backends)?;
        let new_vips: Vec<u32> = desired
            .vips
            .iter()
            .filter(|v| {
                previous_vips.get(v.name.as_str()).map(|p| p.meta.vip_id) != Some(v.meta.vip_id)
            })
            .map(|v| v.meta.vip_id)
            .collect();
        self.zero_stats(map_names::VIP_STATS, &new_vips)?;

        // 2. Backends and egress devices.
        {
            let mut backends: Array<&mut MapData, Backend> = self
                .map_mut(map_names::BACKENDS)?
                .try_into()
                .map_err(map_err(map_names::BACKENDS))?;
            for (&id, entry) in &desired.backends {
                if previous.backends.get(&id) != Some(entry) {
                    backends
                        .set(id, entry, 0)
                        .map_err(map_err(map_names::BACKENDS))?;
                }
            }
        }
        {
            let mut devices: DevMapHash<&mut MapData> = self
                .map_mut(map_names::EGRESS_DEVICES)?
                .try_into()
                .map_err(map_err(map_names::EGRESS_DEVICES))?;
            for &ifindex in desired.egress.difference(&previous.egress) {
                devices
                    .insert(ifindex, ifindex, None, 0)
                    .map_err(|source| DataplaneError::Xdp {
                        map: map_names::EGRESS_DEVICES,
                        source,
                    })?;
            }
        }

        // 3. Tables, swapped in whole.
        for vip in &desired.vips {
            let unchanged = previous_vips
                .get(vip.name.as_str())
                .is_some_and(|p| p.meta.vip_id == vip.meta.vip_id && p.table == vip.table);
            if !unchanged {
                self.swap_table(vip.meta.vip_id, &vip.table)?;
            }
        }

        // 4. VIP keys: new and changed ones, then the ones that went away.
        {
            let mut vips: BpfHashMap<&mut MapData, VipKey, VipMeta> = self
                .map_mut(map_names::VIPS)?
                .try_into()
                .map_err(map_err(map_names::VIPS))?;
            let before: HashMap<VipKey, VipMeta> = previous.keys.iter().copied().collect();
            for (key, meta) in &desired.keys {
                if before.get(key) != Some(meta) {
                    vips.insert(key, meta, 0)
                        .map_err(map_err(map_names::VIPS))?;
                }
            }
            let wanted: std::collections::HashSet<VipKey> =
                desired.keys.iter().map(|(k, _)| *k).collect();
            for key in before.keys() {
                if !wanted.contains(key) {
                    ignore_missing(vips.remove(key)).map_err(map_err(map_names::VIPS))?;
                }
            }
        }

        // 5. Tables of removed VIPs, then removed backends (no VIP key leads to them now; a
        //    remembered flow that still names one is re-selected, see the packet path).
        {
            let live_ids: BTreeSet<u32> = desired.vips.iter().map(|v| v.meta.vip_id).collect();
            let mut tables: ArrayOfMaps<&mut MapData, MapData> = self
                .map_mut(map_names::MAGLEV_TABLES)?
                .try_into()
                .map_err(map_err(map_names::MAGLEV_TABLES))?;
            for vip in &previous.vips {
                if !live_ids.contains(&vip.meta.vip_id) {
                    // Replace with an empty table rather than delete: deleting from an
                    // array of maps is not supported.
                    let empty = new_table(&[]).map_err(|source| DataplaneError::Io {
                        map: map_names::MAGLEV_TABLES,
                        source,
                    })?;
                    tables
                        .set(vip.meta.vip_id, &empty, 0)
                        .map_err(map_err(map_names::MAGLEV_TABLES))?;
                }
            }
            self.tables.retain(|id, _| live_ids.contains(id));
        }
        {
            let mut backends: Array<&mut MapData, Backend> = self
                .map_mut(map_names::BACKENDS)?
                .try_into()
                .map_err(map_err(map_names::BACKENDS))?;
            for &id in previous.backends.keys() {
                if !desired.backends.contains_key(&id) {
                    backends
                        .set(id, Backend::default(), 0)
                        .map_err(map_err(map_names::BACKENDS))?;
                }
            }
        }
        {
            let mut devices: DevMapHash<&mut MapData> = self
                .map_mut(map_names::EGRESS_DEVICES)?
                .try_into()
                .map_err(map_err(map_names::EGRESS_DEVICES))?;
            for &ifindex in previous.egress.difference(&desired.egress) {
                ignore_missing(devices.remove(ifindex))
                    .map_err(map_err(map_names::EGRESS_DEVICES))?;
            }
        }
        Ok(())
    }

    fn swap_table(&mut self, vip_id: u32, table: &[u32]) -> Result<()> {
        let inner = new_table(table).map_err(|source| DataplaneError::Io {
            map: map_names::MAGLEV_TABLES,
            source,
        })?;
        let mut tables: ArrayOfMaps<&mut MapData, MapData> = self
            .map_mut(map_names::MAGLEV_TABLES)?
            .try_into()
            .map_err(map_err(map_names::MAGLEV_TABLES))?;
        tables
            .set(vip_id, &inner, 0)
            .map_err(map_err(map_names::MAGLEV_TABLES))?;
        self.tables.insert(vip_id, inner);
        Ok(())
    }

    /// Kernel memory of every map (as `memlock` in /proc/self/fdinfo), by map name; the
    /// Maglev tables summed under `maglev tables`.
    pub fn memory(&self) -> std::io::Result<Vec<(String, u64)>> {
        let memlock = |fd: i32| -> std::io::Result<u64> {
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
            Ok(info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0))
        };
        let mut out = Vec::new();
        for (name, map) in self.ebpf.maps() {
            let fd = match map {
                aya::maps::Map::Array(d)
                | aya::maps::Map::ArrayOfMaps(d)
                | aya::maps::Map::HashMap(d)
                | aya::maps::Map::LruHashMap(d)
                | aya::maps::Map::PerCpuArray(d)
                | aya::maps::Map::DevMapHash(d) => d.fd().as_fd().as_raw_fd(),
                _ => continue,
            };
            out.push((name.to_owned(), memlock(fd)?));
        }
        let tables = self
            .tables
            .values()
            .map(|t| memlock(t.fd().as_fd().as_raw_fd()))
            .sum::<std::io::Result<u64>>()?;
        out.push(("maglev tables".to_owned(), tables));
        out.sort();
        Ok(out)
    }

    fn zero_stats(&mut self, name: &'static str, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let cpus =
            aya::util::nr_cpus().map_err(|(_, source)| DataplaneError::Io { map: name, source })?;
        let mut stats: PerCpuArray<&mut MapData, TrafficStats> =
            self.map_mut(name)?.try_into().map_err(map_err(name))?;
        for &id in ids {
            let zeros = PerCpuValues::try_from(vec![TrafficStats::default(); cpus])
                .map_err(|source| DataplaneError::Io { map: name, source })?;
            stats.set(id, zeros, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Reads the counters of every live VIP and backend, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let sum = |name: &'static str,
                   ids: &mut dyn Iterator<Item = u32>|
         -> Result<BTreeMap<u32, TrafficStats>> {
            let stats: PerCpuArray<&MapData, TrafficStats> =
                self.map(name)?.try_into().map_err(map_err(name))?;
            let mut out = BTreeMap::new();
            for id in ids {
                let per_cpu = stats.get(&id, 0).map_err(map_err(name))?;
                let total = per_cpu
                    .iter()
                    .fold(TrafficStats::default(), |a, s| TrafficStats {
                        packets: a.packets + s.packets,
                        bytes: a.bytes + s.bytes,
                        new_flows: a.new_flows + s.new_flows,
                    });
                out.insert(id, total);
            }
            Ok(out)
        };
        let backends = sum(
            map_names::BACKEND_STATS,
            &mut self.applied.backends.keys().copied(),
        )?;
        let vips = sum(
            map_names::VIP_STATS,
            &mut self.applied.vips.iter().map(|v| v.meta.vip_id),
        )?;
        let outcome_map: PerCpuArray<&MapData, u64> = self
            .map(map_names::OUTCOME_STATS)?
            .try_into()
            .map_err(map_err(map_names::OUTCOME_STATS))?;
        let outcomes = (0..OUTCOME_COUNT)
            .map(|i| outcome_map.get(&i, 0).map(|v| v.iter().sum()))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(map_err(map_names::OUTCOME_STATS))?;
        Ok(Counters {
            backends,
            vips,
            outcomes,
        })
    }

    /// The backend the connection table holds for a flow.
    pub fn conn_lookup(&self, flow: &FlowKey) -> Result<Option<u32>> {
        let table: BpfHashMap<&MapData, FlowKey, ConnEntry> = self
            .map(map_names::CONN_TABLE)?
            .try_into()
            .map_err(map_err(map_names::CONN_TABLE))?;
        match table.get(flow, 0) {
            Ok(entry) => Ok(Some(entry.backend_id)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::CONN_TABLE)(e)),
        }
    }

    /// Remembers `flow` on backend `backend_id`, as the program does for a new flow (tests
    /// and tools; the packet path fills the table itself).
    pub fn conn_insert(&mut self, flow: &FlowKey, backend_id: u32) -> Result<()> {
        let mut table: BpfHashMap<&mut MapData, FlowKey, ConnEntry> = self
            .map_mut(map_names::CONN_TABLE)?
            .try_into()
            .map_err(map_err(map_names::CONN_TABLE))?;
        table
            .insert(
                flow,
                ConnEntry {
                    backend_id,
                    _reserved: 0,
                },
                0,
            )
            .map_err(map_err(map_names::CONN_TABLE))
    }

    /// Number of flows in the connection table (walks the table: for status, not hot paths).
    pub fn conn_count(&self) -> Result<usize> {
        let table: BpfHashMap<&MapData, FlowKey, ConnEntry> = self
            .map(map_names::CONN_TABLE)?
            .try_into()
            .map_err(map_err(map_names::CONN_TABLE))?;
        Ok(table.keys().filter(|k| k.is_ok()).count())
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

/// A new inner Maglev table map holding `slots` (the rest zero; never read). Filled through a
/// memory mapping: one pass over memory instead of one syscall per slot. The kernel lays
/// array elements out 8 bytes apart whatever their size, so each 4-byte slot sits at a
/// multiple of 8.
fn new_table(slots: &[u32]) -> std::io::Result<MapData> {
    assert!(slots.len() <= MAGLEV_CAPACITY as usize);
    let definition = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        4,
        MAGLEV_CAPACITY,
        MAGLEV_TABLE_MAP_FLAGS,
    );
    let map = MapData::create(definition, "maglev_table", None).map_err(std::io::Error::other)?;
    if slots.is_empty() {
        return Ok(map);
    }
    const STRIDE: usize = 8;
    let page = 4096usize;
    let len = (MAGLEV_CAPACITY as usize * STRIDE).div_ceil(page) * page;
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: mapping a BPF array created with BPF_F_MMAPABLE, of exactly its size rounded up
    // to a page, which the kernel allows; unmapped before returning.
    unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        for (i, &slot) in slots.iter().enumerate() {
            base.add(i * STRIDE).cast::<u32>().write(slot);
        }
        let base = base.cast::<libc::c_void>();
        libc::munmap(base, len);
    }
    Ok(map)
}

/// The maps of `object` that are pinned: all but the global data sections (which belong to
/// one load of the program).
fn pinnable_maps(obj: &aya_obj::Object) -> Vec<String> {
    let mut names: Vec<String> = obj
        .maps
        .keys()
        .filter(|n| !n.starts_with('.'))
        .cloned()
        .collect();
    names.sort();
    names
}

/// Compares the maps pinned in `dir` with the maps `object` declares (type, key and value
/// sizes, capacity, flags), and looks for pins the object does not know.
fn check_pins(
    obj: &aya_obj::Object,
    options: LoadOptions,
    dir: &Path,
    names: &[String],
) -> Result<()> {
    use aya_obj::generated::bpf_map_type::*;
    let mut problems = Vec::new();
    for name in names {
        let def = &obj.maps[name];
        let pinned = match MapData::from_pin(dir.join(name)) {
            Ok(map) => map,
            Err(_) => {
                problems.push(format!("map {name} is not pinned"));
                continue;
            }
        };
        let info = match pinned.info() {
            Ok(info) => info,
            Err(e) => {
                problems.push(format!("map {name}: {}", error_chain(&e)));
                continue;
            }
        };
        let map_type = def.map_type();
        let capacity = if name == map_names::CONN_TABLE {
            options.conn_table_size
        } else {
            def.max_entries()
        };
        if info.key_size() != def.key_size() {
            problems.push(format!(
                "map {name} has {}-byte keys pinned, this build uses {}",
                info.key_size(),
                def.key_size()
            ));
        }
        let sized_by_kernel = [
            BPF_MAP_TYPE_DEVMAP as u32,
            BPF_MAP_TYPE_DEVMAP_HASH as u32,
            BPF_MAP_TYPE_ARRAY_OF_MAPS as u32,
            BPF_MAP_TYPE_HASH_OF_MAPS as u32,
        ];
        if !sized_by_kernel.contains(&map_type) && info.value_size() != def.value_size() {
            problems.push(format!(
                "map {name} has {}-byte values pinned, this build uses {}",
                info.value_size(),
                def.value_size()
            ));
        }
        if info.max_entries() != capacity {
            problems.push(if name == map_names::CONN_TABLE {
                format!(
                    "the pinned connection table holds {} flows, conn_table_size asks for {capacity}",
                    info.max_entries()
                )
            } else {
                format!(
                    "map {name} holds {} entries pinned, this build {capacity}",
                    info.max_entries()
                )
            });
        }
        // (The kernel adds flags of its own to device maps.)
        if !sized_by_kernel.contains(&map_type) && info.map_flags() != def.map_flags() {
            problems.push(format!(
                "map {name} has flags {:#x} pinned, this build {:#x}",
                info.map_flags(),
                def.map_flags()
            ));
        }
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file != pins::LINK && file != pins::STATE && !names.contains(&file) {
            problems.push(format!("{file} is pinned but this build has no such map"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DataplaneError::IncompatiblePins {
            dir: dir.display().to_string(),
            problems,
        })
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// An error and its sources on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
