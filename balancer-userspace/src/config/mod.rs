//! The TOML config: parsed, checked, and turned into a validated [`Config`].
//!
//! Every error names the file, line and column of the offending key or value and says what is
//! wrong. Unknown keys are errors, not warnings: a typo in `drain` must not silently leave a
//! backend in service.
//! - [`raw`]: the file's shape as serde sees it, with positions;
//! - [`validate`] and [`health`]: the checks, and the defaults filled in;
//! - [`model`]: the validated config the daemon works from;
//! - [`diff`]: what changed between two configs.

mod addresses;
pub mod defence;
pub mod diff;
pub mod discover;
pub mod fleet;
pub mod health;
pub mod model;
mod raw;
pub mod validate;

use std::{
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

pub use model::*;

/// A config error with its position (line 0 when the file could not be read at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.message),
            line => write!(
                f,
                "{}:{line}:{}: {}",
                self.file.display(),
                self.column,
                self.message
            ),
        }
    }
}

fn unreadable(path: &Path, e: &std::io::Error) -> ConfigError {
    ConfigError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        message: format!("cannot read the config file: {e}"),
    }
}

/// Reads and validates a config file for `host`.
pub fn load(path: &Path, host: &Host) -> Result<Config, ConfigError> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| unreadable(path, &e))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| unreadable(path, &e))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            message: format!(
                "the config file is larger than {} MiB",
                MAX_CONFIG_BYTES >> 20
            ),
        });
    }
    parse_for(path, &text, host)
}

/// Validates config text, knowing nothing of the host; `file` is only used in error messages.
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    parse_for(file, text, &Host::default())
}

/// Validates config text for `host`; `file` is only used in error messages.
pub fn parse_for(file: &Path, text: &str, host: &Host) -> Result<Config, ConfigError> {
    let at = |span: Range<usize>, message: String| {
        let (line, column) = line_column(text, span.start);
        ConfigError {
            file: file.to_owned(),
            line,
            column,
            message,
        }
    };
    let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
        let message = e.message().trim_end().to_owned();
        at(e.span().unwrap_or(0..0), message)
    })?;
    validate::validate(raw, host).map_err(|(span, message)| at(span, message))
}

/// What the commands that talk to a running daemon need from its config file, read
/// leniently: the rest of the file may be invalid (`balancer reload` must be able to reach a
/// daemon to hear why its new config is rejected).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    pub interface: Option<String>,
    pub pin_dir: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub control_socket: Option<PathBuf>,
}

/// The [`Reach`] of a config file: what it says, where it says anything usable.
pub fn reach(path: &Path) -> Result<Reach, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(path, &e))?;
    // Not even TOML: the defaults are the best guess.
    let Ok(value) = toml::from_str::<toml::Table>(&text) else {
        return Ok(Reach::default());
    };
    let text_of = |key: &str| {
        value
            .get("balancer")
            .and_then(|b| b.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let metrics_listen = match text_of("metrics_listen") {
        None => None,
        Some(listen) => Some(listen.parse().map_err(|_| ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            message: format!("metrics_listen \"{listen}\" is not an address:port"),
        })?),
    };
    Ok(Reach {
        interface: text_of("interface"),
        pin_dir: text_of("pin_dir").map(PathBuf::from),
        metrics_listen,
        control_socket: text_of("control_socket").map(PathBuf::from),
    })
}

/// 1-based line and column of a byte offset (columns count characters, not bytes).
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
