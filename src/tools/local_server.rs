//! What the throwaway database servers of the demo, the tests and the benchmarks
//! ([`super::local_postgres`], [`super::local_mariadb`]) share: running their
//! commands, a free loopback port, whether this runs as root, and the password file.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// Whether this process runs as root (servers then run as their own user, and a
/// missing package may be installed).
pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a set-up command to completion; a failure carries its output.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Error::Config(format!("running {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Config(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// A loopback port free at this moment, for the server named `what`.
pub(crate) fn free_port(what: &str) -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Config(format!("finding a free port for {what}: {e}")))
}

/// Writes a server's password to `path`, for a member file's `password_file`.
pub(crate) fn write_password(path: &Path, password: &str) -> Result<()> {
    std::fs::write(path, password)
        .map_err(|e| Error::Config(format!("writing {}: {e}", path.display())))
}
