//! Throwaway PostgreSQL clusters for tests, benchmarks and the demo.
//!
//! Owns finding the server binaries, `initdb` into a temporary directory, starting the
//! server with `wal_level=logical` on a free port of 127.0.0.1 (socket in the temp dir), and
//! stopping it by its pid and removing the directory on drop — also when a test panics. When
//! the process runs as root, every server program runs as the `postgres` OS user through
//! `runuser`. It must never touch a cluster it did not create, never use `sudo`, and never
//! listen on anything but loopback.
//!
//! One cluster per test binary ([`shared`]) with a fresh database per test ([`fresh_db`])
//! keeps the suite fast; a test that needs special settings or restarts the server starts a
//! [`TestCluster`] of its own.

use std::ffi::CString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What can go wrong while managing a throwaway cluster.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found: looked in $PG_BINDIR, \
         `pg_config --bindir` and /usr/lib/postgresql/*/bin. Install them with \
         `apt-get install -y postgresql` (Debian/Ubuntu) or set PG_BINDIR to their directory"
    )]
    BinariesMissing,
    /// Running as root but there is no `postgres` OS user to run the server as.
    #[error(
        "running as root, and there is no `postgres` OS user to run the server as: \
         install the postgresql package (it creates the user) or `useradd -r postgres`"
    )]
    NoPostgresUser,
    /// A server program failed.
    #[error("{program} failed: {detail}")]
    Command {
        /// The program that failed.
        program: String,
        /// Its stderr, or the log tail.
        detail: String,
    },
    /// File-system trouble in the cluster's directory.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Extra configuration for a [`TestCluster`].
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    /// Extra `postgresql.conf` settings; they override the harness defaults.
    pub settings: Vec<(String, String)>,
    /// Extra `pg_hba.conf` lines, placed before the default trust lines so they win.
    pub hba: Vec<String>,
    /// Keep fsync and synchronous commit on (benchmarks); off by default for speed.
    pub durable: bool,
}

impl ClusterConfig {
    /// Adds a `postgresql.conf` setting.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    /// Adds a `pg_hba.conf` line.
    pub fn hba_line(mut self, line: &str) -> Self {
        self.hba.push(line.to_string());
        self
    }
}

/// A running throwaway cluster, stopped and removed on drop.
#[derive(Debug)]
pub struct TestCluster {
    root: PathBuf,
    bindir: PathBuf,
    port: u16,
    pid: Mutex<Option<i32>>,
}

const SUPERUSER: &str = "postgres";
const DIR_PREFIX: &str = "shadowmig-pg-";

impl TestCluster {
    /// Starts a physical streaming standby of this cluster: `pg_basebackup -R -X stream` into
    /// a directory of its own, on another free port (hot standby, so it can be queried and
    /// its replay paused). It is stopped and removed on drop like any [`TestCluster`].
    pub fn start_standby(&self) -> Result<TestCluster, HarnessError> {
        let root = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()?
            .keep();
        if is_root() {
            let (uid, gid) = postgres_user()?;
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))?;
        }
        let mut standby = TestCluster {
            root,
            bindir: self.bindir.clone(),
            port: 0,
            pid: Mutex::new(None),
        };
        let data = standby.data_dir().to_string_lossy().into_owned();
        let port = self.port.to_string();
        standby.run_server_program(
            "pg_basebackup",
            &[
                "-D",
                &data,
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                SUPERUSER,
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
        )?;
        // The copied configuration names the primary's socket directory; a standby keeps its own.
        // It reports its replay position every second, so a test sees lag come and go quickly.
        standby.append_as_owner(
            &standby.data_dir().join("postgresql.conf"),
            &format!(
                "unix_socket_directories = '{}'\nhot_standby = on\nwal_receiver_status_interval = 1\n",
                standby.root.to_string_lossy().replace('\'', "''")
            ),
        )?;
        standby.start_on_free_port()?;
        Ok(standby)
    }

    /// Creates and starts a cluster with the given configuration.
    pub fn start(config: &ClusterConfig) -> Result<TestCluster, HarnessError> {
        let bindir = find_bindir()?;
        reap_stale_clusters();
        let owner = if is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let root = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()?
            .keep();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))?;
        }
        let mut cluster = TestCluster {
            root,
            bindir,
            port: 0,
            pid: Mutex::new(None),
        };
        cluster.init(config)?;
        cluster.start_on_free_port()?;
        Ok(cluster)
    }

    fn start_on_free_port(&mut self) -> Result<(), HarnessError> {
        let mut last_err = None;
        for _ in 0..5 {
            self.port = free_port()?;
            self.write_port_conf()?;
            match self.pg_ctl(&["start", "-w", "-t", "60"]) {
                Ok(()) => {
                    self.read_pid()?;
                    return Ok(());
                }
                // Another process may have taken the port between probe and start: retry.
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(HarnessError::Command {
            program: "pg_ctl start".into(),
            detail: "did not start".into(),
        }))
    }

    fn init(&self, config: &ClusterConfig) -> Result<(), HarnessError> {
        let data = self.data_dir();
        let data_s = data.to_string_lossy().into_owned();
        self.run_server_program(
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let mut conf = String::from(
            "listen_addresses = '127.0.0.1'\n\
             wal_level = logical\n\
             max_wal_senders = 64\n\
             max_replication_slots = 64\n\
             max_connections = 200\n\
             shared_buffers = '128MB'\n\
             logging_collector = off\n\
             log_min_messages = warning\n\
             include_if_exists = 'shadowmig_port.conf'\n",
        );
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            self.root.to_string_lossy().replace('\'', "''")
        ));
        if !config.durable {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        for (k, v) in &config.settings {
            conf.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
        self.append_as_owner(&data.join("postgresql.conf"), &conf)?;
        let mut hba = String::new();
        for line in &config.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str(
            "local all all trust\n\
             local replication all trust\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        );
        self.write_as_owner(&data.join("pg_hba.conf"), &hba)
    }

    fn write_port_conf(&self) -> Result<(), HarnessError> {
        // Kept in its own file so a retry on another port, or a restart, never edits the main conf.
        let path = self.data_dir().join("shadowmig_port.conf");
        self.write_as_owner(&path, &format!("port = {}\n", self.port))
    }

    fn write_as_owner(&self, path: &Path, text: &str) -> Result<(), HarnessError> {
        std::fs::write(path, text)?;
        self.give_to_owner(path)
    }

    fn append_as_owner(&self, path: &Path, text: &str) -> Result<(), HarnessError> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }

    fn give_to_owner(&self, path: &Path) -> Result<(), HarnessError> {
        if is_root() {
            let (uid, gid) = postgres_user()?;
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Runs a server program from the bindir, as the `postgres` user when we are root.
    fn run_server_program(&self, program: &str, args: &[&str]) -> Result<Output, HarnessError> {
        let bin = self.bindir.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.args(args).current_dir(&self.root);
        let out = cmd.output().map_err(|e| HarnessError::Command {
            program: program.to_string(),
            detail: format!("could not run {}: {e}", bin.display()),
        })?;
        if !out.status.success() {
            let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if let Ok(log) = std::fs::read_to_string(self.log_path()) {
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                detail.push_str("\nserver log tail:\n");
                for l in tail.into_iter().rev() {
                    detail.push_str(l);
                    detail.push('\n');
                }
            }
            return Err(HarnessError::Command {
                program: program.to_string(),
                detail,
            });
        }
        Ok(out)
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), HarnessError> {
        let data = self.data_dir().to_string_lossy().into_owned();
        let log = self.log_path().to_string_lossy().into_owned();
        let mut all = vec!["-D", data.as_str(), "-l", log.as_str()];
        all.extend_from_slice(args);
        self.run_server_program("pg_ctl", &all).map(|_| ())
    }

    fn read_pid(&self) -> Result<i32, HarnessError> {
        let pid = read_postmaster_pid(&self.data_dir()).ok_or_else(|| HarnessError::Command {
            program: "pg_ctl start".into(),
            detail: "server started but postmaster.pid is unreadable".into(),
        })?;
        *self.pid.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
        Ok(pid)
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host to connect to.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The superuser's name.
    pub fn superuser(&self) -> &'static str {
        SUPERUSER
    }

    /// A connection URL for `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// A connection URL for `db` as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The directory holding the socket, data and log.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The server log file.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The directory of the server binaries in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        *self.pid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs SQL through `psql` in `db` (stops at the first error) and returns its unaligned,
    /// tuples-only output. Synchronous on purpose: tests use it as an independent checker.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, HarnessError> {
        let out = Command::new(self.bindir.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER, "-d", db])
            .env("PGCONNECT_TIMEOUT", "10")
            .arg("-c")
            .arg(sql)
            .output()
            .map_err(|e| HarnessError::Command {
                program: "psql".into(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                program: "psql".into(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_string())
    }

    /// Creates a database with a unique name starting with `prefix` and returns its name.
    pub fn create_database(&self, prefix: &str) -> Result<String, HarnessError> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let clean: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let name = format!("t_{clean}_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(name)
    }

    /// Connects with tokio-postgres to `db` as the superuser; the connection task is spawned.
    pub async fn client(&self, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// `pg_ctl restart -m fast`: disconnects every client; the port stays the same.
    pub fn restart_fast(&self) -> Result<(), HarnessError> {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"])?;
        self.read_pid().map(|_| ())
    }

    /// Stops the server (fast shutdown by signal to its pid) and waits for it to exit. The
    /// directory stays until drop.
    pub fn stop(&self) {
        let pid = self.pid.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(pid) = pid {
            stop_pid(pid);
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Sends SIGINT (fast shutdown) to a postmaster and waits up to 60 s, then SIGKILL.
fn stop_pid(pid: i32) {
    // SAFETY: kill(2) with a pid we started; no memory is shared.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while pid_alive(pid) {
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn read_postmaster_pid(data: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Removes clusters left behind by test processes that died without cleaning up (kill -9).
fn reap_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if owner == std::process::id() as i32 || pid_alive(owner) {
            continue;
        }
        if let Some(pid) = read_postmaster_pid(&entry.path().join("data")) {
            if pid_alive(pid) {
                stop_pid(pid);
            }
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

fn free_port() -> Result<u16, HarnessError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

fn postgres_user() -> Result<(u32, u32), HarnessError> {
    let name = CString::new("postgres").map_err(|_| HarnessError::NoPostgresUser)?;
    // SAFETY: getpwnam returns a pointer to static storage or null; we copy the ids at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(HarnessError::NoPostgresUser);
    }
    // SAFETY: non-null pointer returned by getpwnam.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok((uid, gid))
}

/// Finds the directory holding `initdb`, `postgres` and `pg_ctl`: `$PG_BINDIR`, then
/// `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf, HarnessError> {
    let ok = |p: &Path| {
        ["initdb", "postgres", "pg_ctl"]
            .iter()
            .all(|b| p.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        let p = PathBuf::from(dir);
        if ok(&p) {
            return Ok(p);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if ok(&p) {
                return Ok(p);
            }
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, p)| ok(p))
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, p)| p)
        .ok_or(HarnessError::BinariesMissing)
}

static SHARED: OnceLock<Result<TestCluster, String>> = OnceLock::new();

extern "C" fn stop_shared_at_exit() {
    if let Some(Ok(c)) = SHARED.get() {
        c.stop();
        let _ = std::fs::remove_dir_all(&c.root);
    }
}

/// The cluster shared by every test in this process, started on first use and stopped when
/// the process exits.
pub fn shared() -> Result<&'static TestCluster, HarnessError> {
    let r = SHARED.get_or_init(|| {
        let c = TestCluster::start(&ClusterConfig::default()).map_err(|e| e.to_string())?;
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(stop_shared_at_exit);
        }
        Ok(c)
    });
    match r {
        Ok(c) => Ok(c),
        Err(e) => Err(HarnessError::Command {
            program: "shared test cluster".into(),
            detail: e.clone(),
        }),
    }
}

/// The shared cluster and a fresh database on it, named after `prefix`.
pub fn fresh_db(prefix: &str) -> Result<(&'static TestCluster, String), HarnessError> {
    let c = shared()?;
    let db = c.create_database(prefix)?;
    Ok((c, db))
}
