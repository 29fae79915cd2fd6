//! A throwaway PostgreSQL server on loopback, for the demo, the tests and the
//! benchmarks: `initdb` into a fresh folder, `pg_ctl start`, and `pg_ctl stop` when
//! dropped. It uses the PostgreSQL server binaries installed on the machine
//! (`pg_config --bindir`, or `/usr/lib/postgresql/*/bin`).
//!
//! PostgreSQL refuses to run as root; when the gateway runs as root, the server runs
//! as the `postgres` user (created by the distribution's package) through `runuser`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::local_server::{is_root, run};
use crate::error::{Error, Result};

/// A running server; stopped when dropped.
pub struct LocalPostgres {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    run_as: Option<String>,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The superuser's name.
    pub user: String,
    /// The superuser's password (connections over TCP must give it).
    pub password: String,
}

fn bindir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").is_file() && p.join("pg_ctl").is_file() {
            return Ok(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.sort();
    found
        .into_iter()
        .rev()
        .find(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
        .ok_or_else(|| {
            Error::Config(
                "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql".into(),
            )
        })
}

impl LocalPostgres {
    /// Creates a cluster and starts it on a free loopback port, off the async
    /// runtime's threads (initdb and pg_ctl take seconds); with `tls`, a certificate
    /// and key (PEM) it also accepts TLS with.
    pub async fn launch(tls: Option<(String, String)>) -> Result<LocalPostgres> {
        let port = super::local_server::free_port("PostgreSQL")?;
        tokio::task::spawn_blocking(move || {
            Self::start_blocking(port, tls.as_ref().map(|(c, k)| (c.as_str(), k.as_str())))
        })
        .await
        .map_err(|e| Error::Internal(format!("starting PostgreSQL: {e}")))?
    }

    /// Creates a cluster and starts it on `127.0.0.1:port` (blocking).
    fn start_blocking(port: u16, tls: Option<(&str, &str)>) -> Result<LocalPostgres> {
        let bindir = bindir()?;
        let run_as = is_root().then(|| "postgres".to_string());
        let dir = tempfile::Builder::new()
            .prefix("fedgate-pg-")
            .tempdir()
            .map_err(|e| Error::Config(format!("creating a folder for PostgreSQL: {e}")))?;
        let password = uuid::Uuid::new_v4().simple().to_string();
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, &password)
            .map_err(|e| Error::Config(format!("writing {}: {e}", pwfile.display())))?;
        let pg = LocalPostgres {
            dir,
            bindir,
            run_as,
            port,
            user: "fedgate".into(),
            password,
        };
        let mut ssl = String::new();
        if let Some((cert, key)) = tls {
            let (c, k) = (
                pg.dir.path().join("server.crt"),
                pg.dir.path().join("server.key"),
            );
            let write = |p: &Path, t: &str| {
                std::fs::write(p, t)
                    .map_err(|e| Error::Config(format!("writing {}: {e}", p.display())))
            };
            write(&c, cert)?;
            write(&k, key)?;
            // PostgreSQL refuses a key file that others can read.
            run(Command::new("chmod").arg("600").arg(&k))?;
            ssl = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                c.display(),
                k.display()
            );
        }
        if let Some(user) = &pg.run_as {
            run(Command::new("chown").args(["-R", user]).arg(pg.dir.path()))?;
        }
        let data = pg.data();
        run(pg
            .pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", &pg.user, "-E", "UTF8", "--no-locale", "--no-sync"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display())))?;
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={} \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c shared_preload_libraries=pg_stat_statements -c max_connections=200{ssl}",
            pg.dir.path().display()
        );
        run(pg
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-w", "-t", "60", "-l"])
            .arg(pg.dir.path().join("server.log"))
            .args(["-o", &options, "start"]))?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn pg_command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    /// Connects to `dbname` as the superuser.
    pub async fn connect(&self, dbname: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(dbname)
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| Error::Config(format!("connecting to PostgreSQL: {e}")))?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Writes the superuser's password to `path`, for a member file's `password_file`.
    pub fn write_password(&self, path: &Path) -> Result<()> {
        super::local_server::write_password(path, &self.password)
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`).
    pub fn stop(&self) {
        let _ = run(self.pg_command("pg_ctl").arg("-D").arg(self.data()).args([
            "-m",
            "immediate",
            "-w",
            "stop",
        ]));
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}
