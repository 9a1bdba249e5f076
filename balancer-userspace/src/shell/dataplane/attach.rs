//! Attaching programs: plain links for the helper programs, and for the balancer a link
//! pinned in the layout directory, which outlives the daemon and lets the next one swap its
//! program in without a packet missing a program.

use std::path::Path;

use aya::programs::{
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpLinkId},
    Xdp, XdpMode,
};
use balancer_common::program_names;

use crate::{
    config::XdpModeSetting,
    shell::{
        dataplane::{AttachedMode, Dataplane, DataplaneError, ProgramIds},
        pins::{self, PinError, PinnedState, PreviousLink},
    },
};

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// How a program was attached, and, for `auto` falling back to generic mode, why native
/// mode was refused.
pub type Attached = (AttachedMode, Option<DataplaneError>);

fn link_error<'a>(
    what: &'static str,
    dir: &'a Path,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> DataplaneError + 'a {
    move |source| DataplaneError::Link {
        what,
        dir: dir.display().to_string(),
        source,
    }
}

impl Dataplane {
    /// Attaches the trivial XDP_PASS program to `interface` in native mode.
    pub fn attach_pass(&mut self, interface: &str) -> Result<AttachedMode> {
        self.attach_program(program_names::PASS, interface, XdpModeSetting::Native)
            .map(|(mode, _)| mode)
    }

    /// Attaches the decapsulating program to `interface`.
    pub fn attach_decap(&mut self, interface: &str, setting: XdpModeSetting) -> Result<Attached> {
        self.attach_program(program_names::DECAP, interface, setting)
    }

    /// Attaches a loaded program of the object by name.
    pub fn attach_program(
        &mut self,
        name: &'static str,
        interface: &str,
        setting: XdpModeSetting,
    ) -> Result<Attached> {
        self.attach_link(name, interface, setting)
            .map(|(mode, fallback, _)| (mode, fallback))
    }

    fn attach_link(
        &mut self,
        name: &'static str,
        interface: &str,
        setting: XdpModeSetting,
    ) -> Result<(AttachedMode, Option<DataplaneError>, XdpLinkId)> {
        let program = self.program_mut(name)?;
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
            XdpModeSetting::Native => {
                let id = attach(program, AttachedMode::Native)?;
                (AttachedMode::Native, None, id)
            }
            XdpModeSetting::Generic => {
                let id = attach(program, AttachedMode::Generic)?;
                (AttachedMode::Generic, None, id)
            }
            XdpModeSetting::Auto => match attach(program, AttachedMode::Native) {
                Ok(id) => (AttachedMode::Native, None, id),
                Err(native) => {
                    let id = attach(program, AttachedMode::Generic)?;
                    (AttachedMode::Generic, Some(native), id)
                }
            },
        };
        self.attached = Some((interface.to_owned(), mode));
        Ok((mode, fallback, id))
    }

    /// Attaches the balancer through the link pinned in the layout directory: an existing
    /// link (left by an earlier daemon, or `previous`, taken from pins being replaced) gets
    /// this program swapped in atomically, keeping its attach mode; otherwise a new link is
    /// made. The link ends up pinned in the layout directory.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        setting: XdpModeSetting,
        previous: PreviousLink,
    ) -> Result<Attached> {
        let dir = self
            .pin_dir()
            .map(Path::to_owned)
            .expect("attach_pinned after load_pinned");
        let link_path = dir.join(pins::LINK);
        let existing = match previous {
            Some(previous) => Some(previous),
            None => open_pinned_link(&dir)?,
        };
        if let Some((fd_link, state)) = existing {
            let mode = state
                .and_then(|s| AttachedMode::from_code(s.xdp_mode))
                .unwrap_or(AttachedMode::Native);
            check_mode(mode, setting, &dir)?;
            match self.swap_into_link(fd_link) {
                Ok((link, old)) => {
                    let link = if link_path.exists() {
                        link
                    } else {
                        pin_link(link, &link_path, &dir)?
                    };
                    let pinned = self.pinned.as_mut().expect("pinned");
                    pinned.link = Some(link);
                    pinned.replaced_program = old;
                    self.attached = Some((interface.to_owned(), mode));
                    return Ok((mode, None));
                }
                Err(e) => {
                    // A link whose interface went away is defunct: make a new one.
                    tracing::warn!(
                        "the pinned link cannot take the program ({:#}); attaching anew",
                        anyhow::Error::new(e)
                    );
                    remove_stale_link(&link_path, &dir)?;
                }
            }
        }
        let (mode, fallback, id) = self.attach_link(program_names::BALANCER, interface, setting)?;
        let link = self
            .program_mut(program_names::BALANCER)?
            .take_link(id)
            .map_err(|e| link_error("taking the link", &dir)(e.into()))?;
        let link = FdLink::try_from(link).map_err(DataplaneError::NoLink)?;
        let link = pin_link(link, &link_path, &dir)?;
        self.pinned.as_mut().expect("pinned").link = Some(link);
        Ok((mode, fallback))
    }

    /// Attaches the balancer to `interface`, where NAT replies arrive, beside the interface it
    /// runs on: through the link pinned as `link-<interface>` (an earlier daemon's, this
    /// program swapped in) or a new one, pinned. Returns the mode, and whether the link was
    /// adopted. Does nothing (`None`) when already attached there by this daemon.
    pub fn attach_reply_interface(
        &mut self,
        interface: &str,
        setting: XdpModeSetting,
    ) -> Result<Option<(AttachedMode, bool)>> {
        let Some(pinned) = self.pinned.as_ref() else {
            return Ok(None);
        };
        if pinned.reply_links.contains_key(interface) {
            return Ok(None);
        }
        let dir = pinned.dir.clone();
        let link_path = dir.join(format!("{}{interface}", pins::REPLY_LINK_PREFIX));
        if link_path.exists() {
            let opened = PinnedLink::from_pin(&link_path).map(FdLink::from);
            match opened.map_err(|e| link_error("opening the pinned link", &dir)(e.into())) {
                Ok(fd_link) => match self.swap_into_link(fd_link) {
                    Ok((link, _)) => {
                        let mode = match setting {
                            XdpModeSetting::Generic => AttachedMode::Generic,
                            _ => AttachedMode::Native,
                        };
                        self.keep_reply_link(interface, link);
                        return Ok(Some((mode, true)));
                    }
                    Err(e) => tracing::warn!(
                        "the pinned link on {interface} cannot take the program ({:#}); attaching anew",
                        anyhow::Error::new(e)
                    ),
                },
                Err(e) => tracing::warn!("{:#}; attaching anew", anyhow::Error::new(e)),
            }
            remove_stale_link(&link_path, &dir)?;
        }
        let main = self.attached.clone();
        let attached = self.attach_link(program_names::BALANCER, interface, setting);
        // The interface the program runs on stays the main one.
        self.attached = main;
        let (mode, _, id) = attached?;
        let link = self
            .program_mut(program_names::BALANCER)?
            .take_link(id)
            .map_err(|e| link_error("taking the link", &dir)(e.into()))?;
        let link = FdLink::try_from(link).map_err(DataplaneError::NoLink)?;
        let link = pin_link(link, &link_path, &dir)?;
        self.keep_reply_link(interface, link);
        Ok(Some((mode, false)))
    }

    fn keep_reply_link(&mut self, interface: &str, link: FdLink) {
        if let Some(pinned) = self.pinned.as_mut() {
            pinned.reply_links.insert(interface.to_owned(), link);
        }
    }

    /// The interfaces NAT replies are translated on besides the main one.
    pub fn reply_interfaces(&self) -> Vec<String> {
        self.pinned
            .as_ref()
            .map(|p| p.reply_links.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Swaps the balancer into `link`; returns the link (now the balancer's) and the program
    /// it replaced.
    fn swap_into_link(&mut self, link: FdLink) -> Result<(FdLink, Option<u32>)> {
        let old = link.info().ok().map(|i| i.program_id());
        let dir = self.pin_dir().map(Path::to_owned).unwrap_or_default();
        let swap_error = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Link {
            what: "swapping the program into the pinned link",
            dir: dir.display().to_string(),
            source: e,
        };
        let xdp_link = XdpLink::try_from(link).map_err(|e| swap_error(e.into()))?;
        let program = self.program_mut(program_names::BALANCER)?;
        let id = program
            .attach_to_link(xdp_link)
            .map_err(|e| swap_error(e.into()))?;
        let link = program.take_link(id).map_err(|e| swap_error(e.into()))?;
        let link = FdLink::try_from(link).map_err(|e| swap_error(e.into()))?;
        Ok((link, old))
    }

    /// Records how the pinned data plane is set up (in its `state` map).
    pub fn write_pinned_state(&self, hash_seed: u32) -> Result<()> {
        let (Some(dir), Some((_, mode))) = (self.pin_dir(), self.attached()) else {
            return Ok(());
        };
        let state = PinnedState {
            xdp_mode: mode.code(),
            hash_seed,
        };
        pins::write_state(dir, state).map_err(DataplaneError::from)
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
}

/// The link pinned in `dir`, if there is one that can be opened (a stale pin is removed).
fn open_pinned_link(dir: &Path) -> Result<PreviousLink> {
    let link_path = dir.join(pins::LINK);
    if !link_path.exists() {
        return Ok(None);
    }
    match PinnedLink::from_pin(&link_path) {
        Ok(pinned) => Ok(Some((FdLink::from(pinned), pins::read_state(dir)))),
        Err(e) => {
            tracing::warn!(
                "the pinned link {} cannot be opened ({:#}); attaching anew",
                link_path.display(),
                anyhow::Error::new(e)
            );
            remove_stale_link(&link_path, dir)?;
            Ok(None)
        }
    }
}

fn remove_stale_link(link_path: &Path, dir: &Path) -> Result<()> {
    if link_path.exists() {
        std::fs::remove_file(link_path)
            .map_err(|e| link_error("removing the stale link pin", dir)(e.into()))?;
    }
    Ok(())
}

fn pin_link(link: FdLink, link_path: &Path, dir: &Path) -> Result<FdLink> {
    let pinned = link
        .pin(link_path)
        .map_err(|e| link_error("pinning the link", dir)(e.into()))?;
    Ok(FdLink::from(pinned))
}

/// A pinned link keeps its attach mode: refuses a config that asks for the other one.
fn check_mode(mode: AttachedMode, setting: XdpModeSetting, dir: &Path) -> Result<()> {
    let wanted = match setting {
        XdpModeSetting::Native => AttachedMode::Native,
        XdpModeSetting::Generic => AttachedMode::Generic,
        XdpModeSetting::Auto => return Ok(()),
    };
    if wanted == mode {
        return Ok(());
    }
    Err(PinError::Incompatible {
        dir: dir.display().to_string(),
        problems: vec![format!(
            "the pinned link runs in {} mode, the config asks for xdp_mode = \"{}\"",
            mode.as_str(),
            wanted.as_str()
        )],
    }
    .into())
}
