//! A throwaway MariaDB server on loopback, for the demo, the tests and the benchmarks:
//! `mariadb-install-db` into a fresh folder, `mariadbd` as a child process, killed
//! when dropped. It uses Debian's `mariadb-server` package; when the server binaries
//! are missing and this runs as root, the package is installed with `apt-get` first
//! (once per machine), so that a fresh machine needs nothing installed by hand.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;

use super::local_server::{is_root, run};
use crate::error::{Error, Result};

/// A running server; killed when dropped.
pub struct LocalMariaDb {
    dir: tempfile::TempDir,
    child: std::sync::Mutex<Option<Child>>,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// A user with every privilege, reachable over TCP from 127.0.0.1.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Whether the user must use TLS.
    tls: bool,
}

/// TLS for the server: its certificate and key, and the CA clients must present
/// certificates from (PEM text each).
pub struct ServerTls {
    /// The server's certificate (naming 127.0.0.1).
    pub cert: String,
    /// Its key.
    pub key: String,
    /// The CA bundle.
    pub ca: String,
}

fn find(program: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// The server binaries, installing Debian's package when they are missing and this
/// runs as root.
fn binaries() -> Result<(PathBuf, PathBuf)> {
    let found = || Some((find("mariadbd")?, find("mariadb-install-db")?));
    if let Some(b) = found() {
        return Ok(b);
    }
    if !is_root() || find("apt-get").is_none() {
        return Err(Error::Config(
            "MariaDB server binaries (mariadbd, mariadb-install-db) not found: install mariadb-server".into(),
        ));
    }
    // Several test processes may get here at once: one installs, the others wait.
    let lock = std::fs::File::create(std::env::temp_dir().join("fedgate-mariadb-install.lock"))
        .map_err(|e| Error::Config(format!("locking the MariaDB installation: {e}")))?;
    lock.lock()
        .map_err(|e| Error::Config(format!("locking the MariaDB installation: {e}")))?;
    if let Some(b) = found() {
        return Ok(b);
    }
    eprintln!(
        "note: installing Debian's mariadb-server (the sample region has a MariaDB database)"
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "mariadb-server"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get")
            .arg("update")
            .stdout(Stdio::null())
            .status();
        if !install() {
            return Err(Error::Config(
                "apt-get install mariadb-server failed".into(),
            ));
        }
    }
    found().ok_or_else(|| Error::Config("mariadb-server installed but mariadbd not found".into()))
}

impl LocalMariaDb {
    /// Creates a data folder and starts a server on a free loopback port, off the
    /// async runtime's threads. With `tls`, the server accepts TLS and the user must
    /// use it.
    pub async fn launch(tls: Option<ServerTls>) -> Result<LocalMariaDb> {
        let port = super::local_server::free_port("MariaDB")?;
        let db = tokio::task::spawn_blocking(move || Self::start_blocking(port, tls))
            .await
            .map_err(|e| Error::Internal(format!("starting MariaDB: {e}")))??;
        db.wait_ready().await?;
        Ok(db)
    }

    fn start_blocking(port: u16, tls: Option<ServerTls>) -> Result<LocalMariaDb> {
        let (mariadbd, install_db) = binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("fedgate-mariadb-")
            .tempdir()
            .map_err(|e| Error::Config(format!("creating a folder for MariaDB: {e}")))?;
        let path = dir.path().to_path_buf();
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let p = path.join(name);
            std::fs::write(&p, text)
                .map_err(|e| Error::Config(format!("writing {}: {e}", p.display())))?;
            Ok(p)
        };
        let password = uuid::Uuid::new_v4().simple().to_string();
        let user = "fedgate".to_string();
        let require = if tls.is_some() { " REQUIRE SSL" } else { "" };
        // The grant tables are read only after FLUSH PRIVILEGES in the bootstrap.
        let init = write(
            "init.sql",
            &format!(
                "FLUSH PRIVILEGES;\n\
                 CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'{require};\n\
                 GRANT ALL PRIVILEGES ON *.* TO '{user}'@'127.0.0.1' WITH GRANT OPTION;\n"
            ),
        )?;
        let root = is_root();
        let data = path.join("data");
        let mut cmd = Command::new(install_db);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                "--innodb-log-file-size=8M",
            ])
            .arg(format!("--extra-file={}", init.display()));
        // Temporary tables in a folder of its own: servers bootstrapping at the same
        // time in the shared /tmp clash over their names.
        let tmp = path.join("tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::Config(format!("creating {}: {e}", tmp.display())))?;
        cmd.arg(format!("--tmpdir={}", tmp.display()));
        if root {
            cmd.arg("--user=root");
        }
        run(&mut cmd)?;
        let mut server = Command::new(mariadbd);
        server
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", path.join("mysql.sock").display()))
            .arg(format!("--pid-file={}", path.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", path.join("server.log").display()))
            .arg(format!("--port={port}"))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=128M",
                "--innodb-flush-log-at-trx-commit=0",
                "--character-set-server=utf8mb4",
                // Text compares byte-wise without padding, as it does in DataFusion, so
                // comparisons of text can run in the database.
                "--collation-server=utf8mb4_nopad_bin",
                "--default-time-zone=+00:00",
                "--max-connections=300",
            ]);
        if root {
            server.arg("--user=root");
        }
        if let Some(t) = &tls {
            let cert = write("server.crt", &t.cert)?;
            let key = write("server.key", &t.key)?;
            let ca = write("ca.crt", &t.ca)?;
            server
                .arg(format!("--ssl-cert={}", cert.display()))
                .arg(format!("--ssl-key={}", key.display()))
                .arg(format!("--ssl-ca={}", ca.display()));
        }
        let child = server
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Config(format!("starting mariadbd: {e}")))?;
        Ok(LocalMariaDb {
            dir,
            child: std::sync::Mutex::new(Some(child)),
            port,
            user,
            password,
            tls: tls.is_some(),
        })
    }

    async fn wait_ready(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            // The server may exit at once (a bad option): say why.
            if let Some(c) = self.child.lock().expect("child").as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(Error::Config(format!(
                    "mariadbd exited ({status}): {}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                )));
            }
            // The port opens before the server takes logins: ready is a login that
            // works (over TLS when the user requires it, which this login would fail).
            if let Ok(c) = self.connect(None).await {
                let _ = c.disconnect().await;
                return Ok(());
            }
            if self.tls
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            {
                // A user that requires TLS: wait until the server answers a login at all.
                use mysql_async::prelude::Queryable;
                let ca = self.dir.path().join("ca.crt");
                if let Ok(mut c) = self.connect(Some(&ca)).await
                    && c.query_drop("SELECT 1").await.is_ok()
                {
                    let _ = c.disconnect().await;
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(Error::Config(format!(
                    "MariaDB did not start within 60 s: {}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Connects as the user, to no database in particular (over TCP, without TLS
    /// unless the user requires it, in which case `tls_ca` must be given).
    pub async fn connect(&self, tls_ca: Option<&Path>) -> Result<mysql_async::Conn> {
        let mut opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(self.port)
            .user(Some(self.user.clone()))
            .pass(Some(self.password.clone()))
            .prefer_socket(false);
        if let Some(ca) = tls_ca {
            let _ = rustls::crypto::ring::default_provider().install_default();
            opts = opts.ssl_opts(
                mysql_async::SslOpts::default()
                    .with_root_certs(vec![ca.to_path_buf().into()])
                    .with_disable_built_in_roots(true),
            );
        }
        mysql_async::Conn::new(opts)
            .await
            .map_err(|e| Error::Config(format!("connecting to MariaDB: {e}")))
    }

    /// Runs `sql` (one or more statements separated by `;`) as the user.
    pub async fn execute(&self, sql: &str) -> Result<()> {
        let mut c = self.connect(None).await?;
        c.query_drop(sql)
            .await
            .map_err(|e| Error::Config(format!("MariaDB: {e}")))?;
        let _ = c.disconnect().await;
        Ok(())
    }

    /// Writes the user's password to `path`, for a member file's `password_file`.
    pub fn write_password(&self, path: &Path) -> Result<()> {
        super::local_server::write_password(path, &self.password)
    }

    /// Kills the server at once.
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().expect("child").take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalMariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}
