//! Running commands: echo them, stream their output, and fail with the command in the error.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `command` with inherited stdio; an error names the command and its exit status.
pub fn run(command: &mut Command) -> Result<()> {
    let text = describe(command);
    println!("  $ {text}");
    let status = command
        .status()
        .with_context(|| format!("cannot run `{text}`"))?;
    if !status.success() {
        bail!("`{text}` failed ({status})");
    }
    Ok(())
}

/// Runs `command` quietly and returns its stdout.
pub fn output(command: &mut Command) -> Result<String> {
    let text = describe(command);
    let out = command
        .output()
        .with_context(|| format!("cannot run `{text}`"))?;
    if !out.status.success() {
        bail!(
            "`{text}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
