//! Region benchmark: fedgate side by side with what users would pick instead.
//!
//! Starts every gateway as its own `fedgate serve` process on loopback, over mutual
//! TLS, so that each one's memory and CPU time can be read from `/proc`; the load
//! comes from this process through [`fedgate::tools::loadgen`] (the engine of
//! `fedgate bench`). A throwaway PostgreSQL server (`fedgate::tools::local_postgres`)
//! holds four member databases, a database with all their rows, and a coordinator
//! database with `postgres_fdw` foreign tables over the four.
//!
//! Sections, each interleaving its variants in every round (A B C, then B C A, ...)
//! and reporting medians of per-round ratios:
//!
//! - `hop`: a query answered by the member that holds the data, asked directly, vs
//!   through a coordinator hop; one-row and 64 KiB answers; the coordinator's CPU
//!   time per forwarded sub-query.
//! - `fdw`: primary-key lookup, selective filter, GROUP BY over 1,000,000 rows and
//!   top-k, through fedgate (four members with PostgreSQL sources), through
//!   postgres_fdw, and directly in one database.
//! - `fanout`: the same query over 1, 2, 4, 8 and 16 members, each behind a link
//!   with a fixed delay (a proxy in this process), and on bare loopback.
//! - `resilience`: four members with one far slower than the query's deadline, cut
//!   off by it (p50 and p99 against the deadline); cached against uncached answers
//!   (throughput and queries per CPU-second).
//! - `memory`: a gateway's resident memory idle, per open connection, and while a
//!   10,000,000-row answer streams through two hops.
//! - `doors`: a primary-key lookup and a GROUP BY through the PostgreSQL port
//!   (simple protocol with the key in the text, as psql sends it, and a prepared
//!   statement with the key bound, as JDBC sends it) against the same through
//!   Flight SQL and `Federation.Query`; the coordinator's memory while a
//!   10,000,000-row answer streams through the PostgreSQL port in portal fetches.
//! - `fairness`: a county portal's open-loop calls of a published service while one
//!   city floods the data owner with heavy queries at rising concurrency, against an
//!   owner with one pool of sub-query slots and an owner with shares per class.
//! - `receipts`: the same queries through the hub with and without a signed receipt.
//! - `allocator` and `workers`: `hub` and `solo` restarted with each `malloc`, and with
//!   tokio's worker threads at one per core and at one, then the hop section's
//!   lookup and 64 KiB answer.
//!
//! Run: `cargo bench --bench region` (`-- --rounds N`, `-- --only hop,fdw`,
//! `-- --smoke` for a few seconds on tiny data, `-- --out FILE` to also write the
//! Markdown report to a file). `benches/run` runs it with the planner benchmark and
//! puts the results into BENCHMARKS.md.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use fedgate::proto::v1::QueryRequest;
use fedgate::tools::client::Client;
use fedgate::tools::loadgen::{self, Load, Mode, Report};
use fedgate::tools::local_postgres::LocalPostgres;
use fedgate::trust::identity::{Kind, Principal};
use fedgate::trust::pki::{self, Ca};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FEDGATE: &str = env!("CARGO_BIN_EXE_fedgate");

/// Sizes, which `--smoke` shrinks.
#[derive(Clone, Copy)]
struct Sizes {
    rounds: usize,
    /// Rows in each of the four PostgreSQL member databases.
    pg_rows: i64,
    /// Rows of the streamed answer.
    stream_rows: i64,
    /// Fan-out member counts.
    fanout: &'static [usize],
    /// Queries per variant per round in the latency sections.
    requests: u64,
    /// Queries per variant per round for the heavy PostgreSQL queries.
    heavy_requests: u64,
    /// One-way delay of the emulated link in the fan-out section.
    link_delay: Duration,
    /// Rows of the table the city's flood aggregates in the fairness section.
    flood_rows: i64,
    /// Concurrent callers of the city's flood, rising.
    flood_levels: &'static [usize],
    /// Measured time of each fairness variant.
    fair_window: Duration,
}

const FULL: Sizes = Sizes {
    rounds: 5,
    pg_rows: 250_000,
    stream_rows: 10_000_000,
    fanout: &[1, 2, 4, 8, 16],
    requests: 200,
    heavy_requests: 3,
    link_delay: Duration::from_millis(5),
    flood_rows: 2_000_000,
    flood_levels: &[4, 16, 64],
    fair_window: Duration::from_secs(10),
};

const SMOKE: Sizes = Sizes {
    rounds: 1,
    pg_rows: 2_000,
    stream_rows: 100_000,
    fanout: &[1, 2],
    requests: 5,
    heavy_requests: 1,
    link_delay: Duration::from_millis(5),
    flood_rows: 20_000,
    flood_levels: &[2],
    fair_window: Duration::from_secs(1),
};

/// Rows in each file-backed member's `readings`.
const FILE_ROWS: i64 = 10_000;
const COUNTIES: i64 = 100;

// ---------------------------------------------------------------------------------
// Processes and /proc.

/// A gateway process, killed when dropped.
struct Proc {
    name: String,
    child: Child,
    port: u16,
    /// Its standard error.
    log: PathBuf,
    /// The CPU time last read of each of its threads, in nanoseconds (see `cpu`).
    threads: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `VmRSS` and `VmHWM` (peak) in KiB.
    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| {
                    // A process that has exited has no memory lines: say why it ended.
                    panic!(
                        "no {k} for {}: the gateway is gone; its log:\n{}",
                        self.name,
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    )
                })
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Resets the peak resident size, so `VmHWM` covers what follows.
    fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5")
            .unwrap_or_else(|e| panic!("clear_refs of {}: {e}", self.name));
    }

    /// CPU time of the process's threads, in nanoseconds, from
    /// `/proc/PID/task/TID/schedstat`: the tick-sampled user and system times of
    /// `/proc/PID/stat` moved in steps of 50 µs per query over a round of 200 queries,
    /// the size of the differences measured. A thread that ended counts with the time
    /// last read of it, so the figure never goes back; a thread that ends between two
    /// reads loses only what it ran since the first (tokio's threads live through a
    /// round; only idle blocking threads end).
    fn cpu(&self) -> Duration {
        let pid = self.pid();
        let mut threads = self.threads.lock().unwrap();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                // A thread may end between listing and reading: it keeps its last time.
                if let Ok(sched) = std::fs::read_to_string(task.path().join("schedstat"))
                    && let Some(ns) = sched.split_whitespace().next().and_then(|n| n.parse().ok())
                {
                    // Never less than read before, even if the thread's id were reused.
                    let t = threads
                        .entry(task.file_name().to_string_lossy().into_owned())
                        .or_insert(0);
                    *t = (*t).max(ns);
                }
            }
        }
        Duration::from_nanos(threads.values().sum())
    }
}

/// A port for a gateway process to listen on. Ports are picked below the kernel's
/// ephemeral range: a port picked inside it can be handed to an outgoing connection
/// (to PostgreSQL, between gateways) before the gateway binds it, which happened.
fn free_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    // Start somewhere different in every run, so runs side by side rarely meet.
    let span = low.saturating_sub(10_000).max(1000);
    let _ = NEXT.compare_exchange(
        0,
        10_000 + (std::process::id() % span as u32) as u16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        let p = if p >= low { 10_000 + p % span } else { p };
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// Starts `fedgate serve` and waits until its port accepts connections.
fn spawn(dir: &Path, name: &str, port: u16) -> Proc {
    spawn_with(
        dir,
        name,
        port,
        &Setup {
            alloc: Alloc::System(None),
            workers: None,
        },
    )
}

/// Which `malloc` a gateway process runs with.
enum Alloc {
    /// mimalloc, built in (`FEDGATE_ALLOCATOR=mimalloc`).
    Mimalloc,
    /// The C library's (the default), or with a library loaded before it
    /// (`LD_PRELOAD`).
    System(Option<PathBuf>),
}

/// How a gateway process is started: its allocator, and its runtime's worker threads
/// (`None`: tokio's default, one per core).
struct Setup {
    alloc: Alloc,
    workers: Option<usize>,
}

/// [`spawn`], set up as `setup` says.
fn spawn_with(dir: &Path, name: &str, port: u16, setup: &Setup) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut command = Command::new(FEDGATE);
    match &setup.alloc {
        Alloc::Mimalloc => {
            command.env("FEDGATE_ALLOCATOR", "mimalloc");
        }
        Alloc::System(Some(lib)) => {
            command.env("LD_PRELOAD", lib);
        }
        Alloc::System(None) => {}
    }
    if let Some(w) = setup.workers {
        command.env("TOKIO_WORKER_THREADS", w.to_string());
    }
    let child = command
        .args(["serve", "--config"])
        .arg(dir.join(format!("{name}.toml")))
        .current_dir(dir)
        // `FEDGATE_BENCH_LOG` sets the gateways' log filter, the recipe for phase
        // timings (e.g. `warn,fedgate::phases=debug`); logging costs time of its own.
        .env(
            "FEDGATE_LOG",
            std::env::var("FEDGATE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{FEDGATE}: {e}"));
    let mut p = Proc {
        name: name.into(),
        child,
        port,
        log: dir.join(format!("{name}.log")),
        threads: std::sync::Mutex::new(BTreeMap::new()),
    };
    let t = Instant::now();
    // Ready when the gateway says it serves: a port that accepts connections is not
    // enough, since the port was only free when it was picked and another listener
    // (a link proxy, say) may hold it now, with the gateway gone for want of it.
    let serving = |p: &Proc| {
        std::fs::read_to_string(&p.log).is_ok_and(|l| l.contains(" serving on "))
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    };
    while !serving(&p) {
        if let Ok(Some(s)) = p.child.try_wait() {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            panic!("gateway {name} exited with {s}:\n{log}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "gateway {name} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

// ---------------------------------------------------------------------------------
// Data.

fn write_parquet(path: &Path, ids: std::ops::Range<i64>, with_county: bool) {
    let mut fields = vec![Field::new("id", DataType::Int64, false)];
    if with_county {
        fields.push(Field::new("county_code", DataType::Utf8, false));
    }
    fields.push(Field::new("x", DataType::Int64, false));
    let schema = Arc::new(Schema::new(fields));
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        schema.clone(),
        None,
    )
    .unwrap();
    let mut start = ids.start;
    while start < ids.end {
        let end = (start + 65_536).min(ids.end);
        let id: Vec<i64> = (start..end).collect();
        let mut cols: Vec<Arc<dyn datafusion::arrow::array::Array>> =
            vec![Arc::new(Int64Array::from(id.clone()))];
        if with_county {
            cols.push(Arc::new(StringArray::from(
                id.iter().map(|i| county(*i)).collect::<Vec<_>>(),
            )));
        }
        cols.push(Arc::new(Int64Array::from(
            id.iter().map(|i| x_of(*i)).collect::<Vec<_>>(),
        )));
        w.write(&RecordBatch::try_new(schema.clone(), cols).unwrap())
            .unwrap();
        start = end;
    }
    w.close().unwrap();
}

fn county(id: i64) -> String {
    format!("33{:04}", id % COUNTIES)
}

fn x_of(id: i64) -> i64 {
    (id * 7919) % 10_000
}

// ---------------------------------------------------------------------------------
// The region.

const READINGS_FIELDS: &str = "fields = [ { name = \"id\", type = \"int64\" }, \
    { name = \"county_code\", type = \"utf8\" }, { name = \"x\", type = \"int64\" } ]";

/// One link-delaying TCP proxy per fan-out member, all sharing one delay setting,
/// plus an extra delay on one member's link (a slow member).
struct Links {
    delay_us: Arc<AtomicU64>,
    /// The upstream port of the slow member (0: none) and its extra delay.
    slow: Arc<(AtomicU64, AtomicU64)>,
}

impl Links {
    fn set(&self, d: Duration) {
        self.delay_us.store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Makes the link to the gateway on `upstream` slower by `extra` (0 for none).
    fn slow(&self, upstream: u16, extra: Duration) {
        self.slow
            .1
            .store(extra.as_micros() as u64, Ordering::Relaxed);
        self.slow.0.store(upstream as u64, Ordering::Relaxed);
    }

    /// Listens on `listen` and forwards to `upstream`, holding every chunk in each
    /// direction for the current delay (a link's latency; its bandwidth is loopback's).
    async fn proxy(&self, listen: tokio::net::TcpListener, upstream: u16) {
        let delay = self.delay_us.clone();
        let slow = self.slow.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listen.accept().await {
                let up = match tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                    Ok(u) => u,
                    Err(_) => continue,
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pipe(dr, uw, delay.clone(), slow.clone(), upstream));
                tokio::spawn(pipe(ur, dw, delay.clone(), slow.clone(), upstream));
            }
        });
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_us: Arc<AtomicU64>,
    slow: Arc<(AtomicU64, AtomicU64)>,
    upstream: u16,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let extra = if slow.0.load(Ordering::Relaxed) == upstream as u64 {
                    slow.1.load(Ordering::Relaxed)
                } else {
                    0
                };
                let due = tokio::time::Instant::now()
                    + Duration::from_micros(delay_us.load(Ordering::Relaxed) + extra);
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

struct Region {
    dir: tempfile::TempDir,
    procs: BTreeMap<String, Proc>,
    ca: PathBuf,
    links: Links,
    pg: Option<LocalPostgres>,
    /// The hub's PostgreSQL port (the `doors` section).
    hub_postgres: Option<u16>,
}

impl Region {
    fn proc(&self, name: &str) -> &Proc {
        &self.procs[name]
    }

    /// A client of `gateway` with the gateway's own identity: an organization's tools
    /// query through its own gateway, which speaks for them to the other members.
    fn client(&self, gateway: &str) -> Client {
        let certs = self.dir.path().join("certs");
        Client::connect(
            &format!("https://127.0.0.1:{}", self.proc(gateway).port),
            &self.ca,
            &certs.join(format!("{gateway}.crt")),
            &certs.join(format!("{gateway}.key")),
        )
        .unwrap()
    }
}

/// Members of the region: `hub` (coordinator, no data); `solo` (file `readings`
/// and the streamed `big`, reached directly); `m1`..`mN` (file `readings`, reached
/// through delaying proxies); `p1`..`p4` (`pg_readings` from PostgreSQL).
async fn start_region(sizes: Sizes, sections: &[&str]) -> Region {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::generate("bench").unwrap();
    let certs = d.join("certs");
    let (ca_path, _) = pki::write_ca(&ca, &certs).unwrap();
    let mut fan = 0;
    if sections.contains(&"fanout") {
        fan = *sizes.fanout.iter().max().unwrap();
    }
    if sections.contains(&"resilience") {
        fan = fan.max(4);
    }
    let with_pg = sections.contains(&"fdw");
    // The member `solo` serves the 10,000,000-row `big` for the streaming measures.
    let streams = sections.contains(&"memory") || sections.contains(&"doors");
    let hub_postgres = sections.contains(&"doors").then(free_port);
    let links = Links {
        delay_us: Arc::new(AtomicU64::new(0)),
        slow: Arc::new((AtomicU64::new(0), AtomicU64::new(0))),
    };

    let mut names = vec!["hub".to_string(), "solo".to_string()];
    names.extend((1..=fan).map(|i| format!("m{i}")));
    if with_pg {
        names.extend((1..=4).map(|i| format!("p{i}")));
    }
    // The link proxies' ports first, held from now on, so that no gateway port
    // picked below can be one of them.
    let mut proxy_listeners = BTreeMap::new();
    for name in names.iter().filter(|n| n.starts_with('m')) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        proxy_listeners.insert(name.clone(), l);
    }
    let ports: BTreeMap<String, u16> = names.iter().map(|n| (n.clone(), free_port())).collect();

    let mut region = format!("region = \"bench\"\nca = \"{}\"\n", ca_path.display());
    for name in &names {
        let endpoint = if let Some(l) = proxy_listeners.remove(name) {
            let p = l.local_addr().unwrap().port();
            links.proxy(l, ports[name]).await;
            p
        } else {
            ports[name]
        };
        let serves = match name.as_str() {
            "hub" => "[]",
            "solo" if streams => "[\"readings\", \"big\"]",
            "solo" => "[\"readings\"]",
            n if n.starts_with('p') => "[\"pg_readings\", \"pg_readings_parallel\"]",
            _ => "[\"readings\", \"readings_cached\"]",
        };
        region.push_str(&format!(
            "[[members]]\nname = \"{name}\"\nkind = \"city\"\nendpoint = \"https://127.0.0.1:{endpoint}\"\nserves = {serves}\n"
        ));
    }
    region.push_str("[[members]]\nname = \"analyst\"\nkind = \"office\"\n");
    region.push_str(&format!(
        "[[datasets]]\nname = \"readings\"\n{READINGS_FIELDS}\n"
    ));
    region.push_str(&format!(
        "[[datasets]]\nname = \"pg_readings\"\n{READINGS_FIELDS}\n"
    ));
    // The same rows read through sessions with the database's own settings (parallel
    // workers allowed), measured beside `pg_readings` in the fdw section.
    region.push_str(&format!(
        "[[datasets]]\nname = \"pg_readings_parallel\"\n{READINGS_FIELDS}\n"
    ));
    // The same data with answers cached by coordinators (the resilience section).
    region.push_str(&format!(
        "[[datasets]]\nname = \"readings_cached\"\ncache_fresh_for = \"1h\"\n{READINGS_FIELDS}\n"
    ));
    region.push_str("[[datasets]]\nname = \"big\"\nfields = [ { name = \"id\", type = \"int64\" }, { name = \"x\", type = \"int64\" } ]\n");
    std::fs::write(d.join("region.toml"), region).unwrap();
    for name in names.iter().map(String::as_str).chain(["analyst"]) {
        let kind = if name == "analyst" {
            Kind::Office
        } else {
            Kind::City
        };
        let p = Principal::new("bench", kind, name).unwrap();
        pki::write_issued(
            &ca.issue(&p, &pki::default_hosts(), 2).unwrap(),
            &certs,
            name,
        )
        .unwrap();
    }

    let pg = if with_pg {
        Some(start_postgres(d, sizes).await)
    } else {
        None
    };

    let access =
        "[[access]]\nprincipals = [\"fedgate://bench/*\"]\ndatasets = [\"*\"]\nlevel = \"rows\"\n";
    let mapping = |dataset: &str, source: &str, fields: &[&str]| {
        let mut m = format!("[[mappings]]\ndataset = \"{dataset}\"\nsource = \"{source}\"\n");
        for f in fields {
            m.push_str(&format!("fields.{f} = \"{f}\"\n"));
        }
        m
    };
    for name in &names {
        let mut cfg = format!(
            "member = \"{name}\"\nregion = \"region.toml\"\nlisten = \"127.0.0.1:{}\"\n\
             cert = \"certs/{name}.crt\"\nkey = \"certs/{name}.key\"\n",
            ports[name]
        );
        let readings = ["id", "county_code", "x"];
        if name == "solo" || name.starts_with('m') {
            let file = d.join(format!("{name}.parquet"));
            write_parquet(&file, 1..FILE_ROWS + 1, true);
            cfg.push_str(&format!(
                "[[sources]]\nname = \"readings\"\nformat = \"parquet\"\npath = \"{}\"\n",
                file.display()
            ));
            cfg.push_str(&mapping("readings", "readings", &readings));
            if name.starts_with('m') {
                cfg.push_str(&mapping("readings_cached", "readings", &readings));
            }
        }
        if let (Some(port), "hub") = (hub_postgres, name.as_str()) {
            cfg.push_str(&format!("[postgres]\nlisten = \"127.0.0.1:{port}\"\n"));
        }
        if name == "solo" && streams {
            let file = d.join("big.parquet");
            write_parquet(&file, 0..sizes.stream_rows, false);
            cfg.push_str(&format!(
                "[[sources]]\nname = \"big\"\nformat = \"parquet\"\npath = \"{}\"\n",
                file.display()
            ));
            cfg.push_str(&mapping("big", "big", &["id", "x"]));
        }
        if let (Some(pg), Some(k)) = (&pg, name.strip_prefix('p')) {
            // The four member databases share one server on this machine's cores, so
            // `pg_readings` is read in sessions without parallel workers, as
            // postgres_fdw's cursors are by construction; `pg_readings_parallel`
            // reads the same table with the server's defaults.
            for (db, settings, source, dataset) in [
                (
                    "db",
                    "settings = { max_parallel_workers_per_gather = \"0\" }\n",
                    "readings",
                    "pg_readings",
                ),
                (
                    "db_parallel",
                    "",
                    "readings_parallel",
                    "pg_readings_parallel",
                ),
            ] {
                cfg.push_str(&format!(
                    "[[databases]]\nname = \"{db}\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"m{k}\"\n\
                     user = \"{}\"\npassword_file = \"db.password\"\n{settings}\
                     [[sources]]\nname = \"{source}\"\nformat = \"postgres\"\ndatabase = \"{db}\"\ntable = \"public.readings\"\n",
                    pg.port, pg.user
                ));
                cfg.push_str(&mapping(dataset, source, &readings));
            }
        }
        if name != "hub" {
            cfg.push_str(access);
        }
        std::fs::write(d.join(format!("{name}.toml")), cfg).unwrap();
    }
    let mut procs = BTreeMap::new();
    for name in &names {
        let p = spawn(d, name, ports[name]);
        // For profiling: `perf report --sort pid` names threads by these processes' ids.
        eprintln!("gateway {name}: pid {}", p.pid());
        procs.insert(name.clone(), p);
    }
    Region {
        dir,
        procs,
        ca: ca_path,
        links,
        pg,
        hub_postgres,
    }
}

/// Four member databases of `pg_rows` rows each (member k holds ids
/// `(k-1)*pg_rows+1 ..= k*pg_rows`), `whole` with all of them, and `coord` with
/// `postgres_fdw` foreign tables over the four as partitions of one table.
async fn start_postgres(dir: &Path, sizes: Sizes) -> LocalPostgres {
    let pg = LocalPostgres::launch(None).await.unwrap();
    pg.write_password(&dir.join("db.password")).unwrap();
    let admin = pg.connect("postgres").await.unwrap();
    for db in ["m1", "m2", "m3", "m4", "whole", "coord"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
    }
    let n = sizes.pg_rows;
    let table =
        "CREATE TABLE readings (id int8 PRIMARY KEY, county_code text NOT NULL, x int8 NOT NULL)";
    let fill = |lo: i64, hi: i64| {
        format!(
            "INSERT INTO readings SELECT i, '33' || lpad((i % {COUNTIES})::text, 4, '0'), (i * 7919) % 10000 \
             FROM generate_series({lo}::int8, {hi}::int8) AS i"
        )
    };
    for k in 1..=4i64 {
        let db = pg.connect(&format!("m{k}")).await.unwrap();
        db.batch_execute(table).await.unwrap();
        db.batch_execute(&fill((k - 1) * n + 1, k * n))
            .await
            .unwrap();
        db.batch_execute("VACUUM ANALYZE readings").await.unwrap();
    }
    let whole = pg.connect("whole").await.unwrap();
    whole.batch_execute(table).await.unwrap();
    whole.batch_execute(&fill(1, 4 * n)).await.unwrap();
    whole
        .batch_execute("VACUUM ANALYZE readings")
        .await
        .unwrap();

    let coord = pg.connect("coord").await.unwrap();
    let mut sql = String::from(
        "CREATE EXTENSION postgres_fdw;\n\
         CREATE TABLE readings (id int8 NOT NULL, county_code text NOT NULL, x int8 NOT NULL) PARTITION BY RANGE (id);\n",
    );
    let password = pg.password.replace('\'', "''");
    for k in 1..=4i64 {
        sql.push_str(&format!(
            "CREATE SERVER m{k} FOREIGN DATA WRAPPER postgres_fdw \
               OPTIONS (host '127.0.0.1', port '{port}', dbname 'm{k}', async_capable 'true', fetch_size '10000');\n\
             CREATE USER MAPPING FOR CURRENT_USER SERVER m{k} OPTIONS (user '{user}', password '{password}');\n\
             CREATE FOREIGN TABLE readings_m{k} PARTITION OF readings FOR VALUES FROM ({lo}) TO ({hi}) \
               SERVER m{k} OPTIONS (schema_name 'public', table_name 'readings');\n",
            port = pg.port,
            user = pg.user,
            lo = (k - 1) * n + 1,
            hi = k * n + 1,
        ));
    }
    sql.push_str(
        "ALTER DATABASE coord SET enable_partitionwise_aggregate = on;\n\
         ALTER DATABASE coord SET enable_partitionwise_join = on;\n\
         ANALYZE readings;\n",
    );
    coord.batch_execute(&sql).await.unwrap();
    pg
}

// ---------------------------------------------------------------------------------
// Measuring.

/// Opens connections and warms caches before anything is measured. A gateway on a
/// loaded machine (a debug build in CI, say) can miss its first connection deadline;
/// that is retried and reported here, and never happens inside a measurement.
async fn warm(client: &Client, sql: &[String], range: (i64, i64), requests: u64) {
    for attempt in 1..=3 {
        let r = run_load(client, sql, range, requests, 99).await;
        if r.failed() == 0 {
            return;
        }
        eprintln!(
            "warm-up attempt {attempt} of {} failed: {:?}",
            sql[0], r.first_error
        );
    }
    panic!("{} failed three warm-ups", sql[0]);
}

/// `requests` queries, one at a time, through the load generator; every one must be
/// answered in full.
async fn fed(
    client: &Client,
    sql: &[String],
    range: (i64, i64),
    requests: u64,
    seed: u64,
) -> Report {
    fed_with(client, sql, range, requests, seed, false).await
}

/// [`fed`], asking for a signed receipt with every answer when `receipt`.
async fn fed_with(
    client: &Client,
    sql: &[String],
    range: (i64, i64),
    requests: u64,
    seed: u64,
    receipt: bool,
) -> Report {
    let r = run_load_with(client, sql, range, requests, seed, receipt).await;
    assert_eq!(r.failed(), 0, "{} failed: {:?}", sql[0], r.first_error);
    r
}

async fn run_load(
    client: &Client,
    sql: &[String],
    range: (i64, i64),
    requests: u64,
    seed: u64,
) -> Report {
    run_load_with(client, sql, range, requests, seed, false).await
}

async fn run_load_with(
    client: &Client,
    sql: &[String],
    range: (i64, i64),
    requests: u64,
    seed: u64,
    receipt: bool,
) -> Report {
    let load = Load {
        sql: sql.to_vec(),
        range,
        mode: Mode::Closed {
            concurrency: 1,
            expected_interval: None,
        },
        duration: Duration::from_secs(3600),
        max_requests: Some(requests),
        warmup: Duration::ZERO,
        timeout: Duration::from_secs(300),
        allow_partial: false,
        seed,
        service: None,
        receipt,
    };
    let r = loadgen::run(client, &load).await.unwrap();
    assert_eq!(r.failed(), 0, "{} failed: {:?}", sql[0], r.first_error);
    r
}

/// Median latency, µs, of `requests` queries sent one at a time to PostgreSQL.
async fn pg_p50(
    db: &tokio_postgres::Client,
    sql: &[String],
    range: (i64, i64),
    requests: u64,
    seed: u64,
    expect_rows: Option<usize>,
) -> f64 {
    let mut keys = loadgen::Keys::new(seed);
    let mut times = Vec::new();
    for i in 0..requests {
        let q = loadgen::query_text(sql, range, i, &mut keys);
        let t = Instant::now();
        let rows = db
            .query(&q, &[])
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        times.push(t.elapsed().as_secs_f64() * 1e6);
        if let Some(e) = expect_rows {
            assert_eq!(rows.len(), e, "{q}");
        }
    }
    median(times)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn ms(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.0} ms", us / 1e3)
    } else {
        format!("{:.2} ms", us / 1e3)
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**not met**" }
}

// ---------------------------------------------------------------------------------
// Sections.

async fn hop(region: &Region, sizes: Sizes, out: &mut String) {
    let direct = region.client("solo");
    let via = region.client("hub");
    let lookup = vec![
        "SELECT id, county_code, x FROM readings WHERE member = 'solo' AND id = {n}".to_string(),
    ];
    let fixed = vec![
        "SELECT id, county_code, x FROM readings WHERE member = 'solo' AND id = 4242".to_string(),
    ];
    // About 64 KiB of Arrow IPC: 2,600 rows of (int64, 6-byte text, int64).
    let large = vec![
        "SELECT id, county_code, x FROM readings WHERE member = 'solo' AND id <= 2600".to_string(),
    ];
    let range = (1, FILE_ROWS);
    for c in [&direct, &via] {
        warm(c, &lookup, range, 20).await;
        warm(c, &fixed, range, 5).await;
        warm(c, &large, range, 5).await;
    }
    let bytes = via
        .query_with(QueryRequest {
            sql: large[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .summary
        .bytes_received;
    let hub = region.proc("hub");
    let mut rows = Vec::new();
    for (label, sql) in [
        ("one-row answer, the same query every time", &fixed),
        ("one-row answer, a new key every time", &lookup),
        ("64 KiB answer, the same query every time", &large),
    ] {
        let (mut diff, mut ratio, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
        let (mut d50, mut v50) = (Vec::new(), Vec::new());
        for r in 0..sizes.rounds {
            let mut direct_p50 = 0.0;
            let mut via_p50 = 0.0;
            // Each variant of each round draws its keys from a thousand of its own: a
            // key the other variant asked would find its plan cached at `solo`, which
            // both variants ask with the same text and the same caller.
            let own = |variant: usize| {
                let lo = 1 + ((2 * r + variant) as i64 % 10) * (FILE_ROWS / 10);
                (lo, lo + FILE_ROWS / 10 - 1)
            };
            for first in [r % 2 == 0, r % 2 != 0] {
                if first {
                    direct_p50 = fed(&direct, sql, own(0), sizes.requests, r as u64 + 1)
                        .await
                        .latency_us
                        .p50 as f64;
                } else {
                    let before = hub.cpu();
                    let rep = fed(&via, sql, own(1), sizes.requests, r as u64 + 1).await;
                    cpu.push((hub.cpu() - before).as_secs_f64() * 1e6 / rep.ok as f64);
                    via_p50 = rep.latency_us.p50 as f64;
                }
            }
            diff.push(via_p50 - direct_p50);
            ratio.push(via_p50 / direct_p50);
            d50.push(direct_p50);
            v50.push(via_p50);
        }
        let extra = median(diff);
        let cpu = median(cpu);
        rows.push(format!(
            "| {label} | {} | {} | {extra:+.0} µs | {:.2} | {cpu:.0} µs | at most +50 µs: {}; hub CPU at most 250 µs: {} |",
            ms(median(d50)),
            ms(median(v50)),
            median(ratio),
            verdict(extra <= 50.0),
            verdict(cpu <= 250.0)
        ));
    }
    out.push_str(&format!(
        "### Hop overhead\n\n\
         The member `solo` holds the rows. Direct: the client asks `solo`, which answers from its own \
         data in process. Through a hop: the client asks `hub`, which forwards the sub-query to `solo` \
         over mutual TLS. Same SQL both ways, {} queries per variant per round, one at a time. A query \
         sent again finds its plan in the coordinator's cache; a lookup with a new key draws it from a \
         thousand keys of the variant's own in each round (in five rounds; a sixth reuses the first's), \
         of which about one draw in ten repeats a key of the same 200, and is bound into the \
         plan of its shape as optimized with placeholders, at the coordinator and at the member, then planned physically. The 64 KiB answer is {bytes} bytes of Arrow IPC. The hub's \
         CPU is its process's user and system time over the round divided by the queries.\n\n\
         | answer (medians of {} rounds) | direct p50 | through hub p50 | difference | ratio | hub CPU per query | target |\n\
         |---|---:|---:|---:|---:|---:|---|\n{}\n\n",
        sizes.requests,
        sizes.rounds,
        rows.join("\n")
    ));
}

/// Allocators side by side: `hub` and `solo` restarted with each `malloc` (the C
/// library's, the built-in mimalloc, and jemalloc loaded with `LD_PRELOAD`: the binary
/// is the same) in every round, the order rotated, then the hop section's one-row
/// lookups with a new key and its 64 KiB answer through `hub`.
async fn allocator(region: &mut Region, sizes: Sizes, out: &mut String) {
    let libs: Vec<(&str, Alloc)> = vec![
        ("the C library's (glibc; the default)", Alloc::System(None)),
        (
            "mimalloc, built in (`FEDGATE_ALLOCATOR=mimalloc`)",
            Alloc::Mimalloc,
        ),
        (
            "jemalloc 5 (Debian's `libjemalloc2` in `LD_PRELOAD`)",
            Alloc::System(Some("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2".into())),
        ),
    ];
    let (libs, missing): (Vec<_>, Vec<_>) = libs.into_iter().partition(|(_, a)| match a {
        Alloc::System(Some(l)) => l.exists(),
        _ => true,
    });
    let setups: Vec<(&str, Setup)> = libs
        .into_iter()
        .map(|(label, alloc)| {
            (
                label,
                Setup {
                    alloc,
                    workers: None,
                },
            )
        })
        .collect();
    let rows = restarted(region, sizes, &setups).await;
    let missing = if missing.is_empty() {
        String::new()
    } else {
        format!(
            " Not measured (library not installed): {}.",
            missing
                .iter()
                .map(|(l, _)| *l)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    out.push_str(&format!(
        "### Allocators\n\n\
         The same `fedgate` binary with each `malloc`: `hub` and `solo` are restarted with each in \
         every round, in rotated order (the gateway names its allocator in its log; a library in \
         `LD_PRELOAD` is checked in `/proc/PID/maps`), \
         warmed up, then asked the hop section's one-row lookup with a new key and its 64 KiB \
         answer through `hub`, {} queries each, one at a time. CPU is `hub`'s and `solo`'s user \
         and system time over the queries divided by them. In parentheses: the ratio to the C \
         library's allocator, medians of {} rounds.{missing}\n\n\
         | allocator | one-row lookup p50 | its CPU per query | 64 KiB answer p50 | its CPU per query |\n\
         |---|---:|---:|---:|---:|\n{}\n\n",
        sizes.requests,
        sizes.rounds,
        rows.join("\n")
    ));
}

/// Worker threads side by side: `hub` and `solo` restarted with tokio's default (one
/// per core) and with one (`TOKIO_WORKER_THREADS=1`), as the allocators are.
async fn workers(region: &mut Region, sizes: Sizes, out: &mut String) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = format!("one per core (tokio's default; {cores} here)");
    let setups = [
        (
            default.as_str(),
            Setup {
                alloc: Alloc::System(None),
                workers: None,
            },
        ),
        (
            "one (`TOKIO_WORKER_THREADS=1`)",
            Setup {
                alloc: Alloc::System(None),
                workers: Some(1),
            },
        ),
    ];
    let rows = restarted(region, sizes, &setups).await;
    out.push_str(&format!(
        "### Worker threads\n\n\
         The same `fedgate` binary with its runtime's worker threads as tokio sets them (one per \
         core) and with one: `hub` and `solo` are restarted with each in every round, in rotated \
         order (the gateway names its count in its log), warmed up, then asked the hop section's \
         one-row lookup with a new key and its 64 KiB answer through `hub`, {} queries each, one \
         at a time. CPU is `hub`'s and `solo`'s user and system time over the queries divided by \
         them. In parentheses: the ratio to the default, medians of {} rounds. One at a time is \
         where a second worker only costs: each hand-over between tasks may wake the other \
         thread. The fan-out, fairness and doors sections run with the default.\n\n\
         | worker threads | one-row lookup p50 | its CPU per query | 64 KiB answer p50 | its CPU per query |\n\
         |---|---:|---:|---:|---:|\n{}\n\n",
        sizes.requests,
        sizes.rounds,
        rows.join("\n")
    ));
}

/// Restarts `hub` and `solo` with each set-up in every round (rotated order), then
/// asks the hop section's one-row lookup with a new key and its 64 KiB answer through
/// `hub`. One table row per set-up: p50 and CPU of both gateways per query, each with
/// its ratio to the first set-up's. The gateways are left running with the last.
async fn restarted(region: &mut Region, sizes: Sizes, setups: &[(&str, Setup)]) -> Vec<String> {
    let lookup = vec![
        "SELECT id, county_code, x FROM readings WHERE member = 'solo' AND id = {n}".to_string(),
    ];
    let large = vec![
        "SELECT id, county_code, x FROM readings WHERE member = 'solo' AND id <= 2600".to_string(),
    ];
    let range = (1, FILE_ROWS);
    let dir = region.dir.path().to_path_buf();
    // (p50, CPU of hub and solo per query) per set-up and query.
    let mut got: BTreeMap<(usize, usize), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for r in 0..sizes.rounds {
        let mut order: Vec<usize> = (0..setups.len()).collect();
        order.rotate_left(r % setups.len());
        for a in order {
            let setup = &setups[a].1;
            for name in ["hub", "solo"] {
                let port = region.procs[name].port;
                drop(region.procs.remove(name));
                let p = spawn_with(&dir, name, port, setup);
                // The gateway names its allocator and worker threads when it starts; a
                // preloaded library shows in its memory map.
                let log = std::fs::read_to_string(&p.log).unwrap();
                let said = match &setup.alloc {
                    Alloc::Mimalloc => "(allocator mimalloc,",
                    Alloc::System(_) => "(allocator system,",
                };
                assert!(log.contains(said), "{name} did not say {said}: {log}");
                if let Some(w) = setup.workers {
                    let said = format!(", {w} worker threads)");
                    assert!(log.contains(&said), "{name} did not say {said}: {log}");
                }
                if let Alloc::System(Some(lib)) = &setup.alloc {
                    let maps = std::fs::read_to_string(format!("/proc/{}/maps", p.pid())).unwrap();
                    let file = lib.file_name().unwrap().to_string_lossy();
                    assert!(maps.contains(file.as_ref()), "{name} did not load {file}");
                }
                region.procs.insert(name.to_string(), p);
            }
            let via = region.client("hub");
            warm(&via, &lookup, range, 50).await;
            warm(&via, &large, range, 10).await;
            for (q, sql) in [&lookup, &large].into_iter().enumerate() {
                let before = region.proc("hub").cpu() + region.proc("solo").cpu();
                let rep = fed(&via, sql, range, sizes.requests, r as u64 + 1).await;
                let cpu = region.proc("hub").cpu() + region.proc("solo").cpu() - before;
                let e = got.entry((a, q)).or_default();
                e.0.push(rep.latency_us.p50 as f64);
                e.1.push(cpu.as_secs_f64() * 1e6 / rep.ok as f64);
            }
        }
    }
    let mut rows = Vec::new();
    for (a, (label, _)) in setups.iter().enumerate() {
        let mut cells = Vec::new();
        for q in 0..2 {
            let (p50, cpu) = &got[&(a, q)];
            let (base50, base_cpu) = &got[&(0, q)];
            cells.push(format!(
                "{} ({:.2}) | {:.0} µs ({:.2})",
                ms(median(p50.clone())),
                median(p50.clone()) / median(base50.clone()),
                median(cpu.clone()),
                median(cpu.clone()) / median(base_cpu.clone()),
            ));
        }
        rows.push(format!("| {label} | {} |", cells.join(" | ")));
    }
    rows
}

/// What a signed receipt costs: the same queries through the hub with and without
/// one, rounds interleaved (which goes first alternates).
async fn receipts(region: &Region, sizes: Sizes, out: &mut String) {
    let via = region.client("hub");
    let fixed = vec![
        "SELECT id, county_code, x FROM readings WHERE member = 'solo' AND id = 4242".to_string(),
    ];
    let large = vec![
        "SELECT id, county_code, x FROM readings WHERE member = 'solo' AND id <= 2600".to_string(),
    ];
    let range = (1, FILE_ROWS);
    for sql in [&fixed, &large] {
        for receipt in [false, true] {
            let r = run_load_with(&via, sql, range, 5, 99, receipt).await;
            assert_eq!(r.failed(), 0);
        }
    }
    let hub = region.proc("hub");
    let solo = region.proc("solo");
    let mut rows = Vec::new();
    for (label, sql) in [
        ("one-row answer", &fixed),
        ("2,600-row answer (64 KiB)", &large),
    ] {
        let (mut without, mut with, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        let (mut cpu_without, mut cpu_with) = (Vec::new(), Vec::new());
        for r in 0..sizes.rounds {
            let (mut p_without, mut p_with) = (0.0, 0.0);
            for receipt in [r % 2 == 0, r % 2 != 0] {
                let before = hub.cpu() + solo.cpu();
                let rep = fed_with(&via, sql, range, sizes.requests, r as u64 + 1, receipt).await;
                let cpu = (hub.cpu() + solo.cpu() - before).as_secs_f64() * 1e6 / rep.ok as f64;
                if receipt {
                    p_with = rep.latency_us.p50 as f64;
                    cpu_with.push(cpu);
                } else {
                    p_without = rep.latency_us.p50 as f64;
                    cpu_without.push(cpu);
                }
            }
            without.push(p_without);
            with.push(p_with);
            ratio.push(p_with / p_without);
        }
        rows.push(format!(
            "| {label} | {} | {} | {:.2} | {:.0} µs | {:.0} µs |",
            ms(median(without)),
            ms(median(with)),
            median(ratio),
            median(cpu_without),
            median(cpu_with),
        ));
    }
    out.push_str(&format!(
        "### Signed receipts\n\n\
         The client asks `hub`, which forwards the sub-query to `solo` over mutual TLS; with a \
         receipt, `solo` digests the rows it sends and signs its statement (ECDSA P-256), `hub` \
         digests the rows it receives (checked against the statement) and those it sends, and signs \
         its own. {} queries per variant per round, one at a time, which goes first alternating. \
         CPU is the user and system time of both gateways' processes over the round divided by \
         the queries.\n\n\
         | answer (medians of {} rounds) | p50 without | p50 with receipt | ratio | CPU per query without | with |\n\
         |---|---:|---:|---:|---:|---:|\n{}\n\n",
        sizes.requests,
        sizes.rounds,
        rows.join("\n")
    ));
}

/// PostgreSQL's own execution time of `sql` (`EXPLAIN ANALYZE`), median of 5 runs, ms.
async fn execution_ms(db: &tokio_postgres::Client, sql: &str) -> f64 {
    let mut times = Vec::new();
    for _ in 0..5 {
        let lines = db
            .query(&format!("EXPLAIN (ANALYZE, TIMING OFF) {sql}"), &[])
            .await
            .unwrap_or_else(|e| panic!("EXPLAIN ANALYZE {sql}: {e}"));
        let ms = lines
            .iter()
            .map(|r| r.get::<_, String>(0))
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Execution Time: ")
                    .and_then(|t| t.trim_end_matches(" ms").parse::<f64>().ok())
            })
            .unwrap_or_else(|| panic!("no execution time for {sql}"));
        times.push(ms);
    }
    median(times)
}

async fn fdw(region: &Region, sizes: Sizes, out: &mut String) {
    let pg = region.pg.as_ref().unwrap();
    let fedc = region.client("hub");
    let hub_log = region.proc("hub").log.clone();
    let hub_from = log_len(&hub_log);
    let coord = pg.connect("coord").await.unwrap();
    let whole = pg.connect("whole").await.unwrap();
    let n = sizes.pg_rows;
    // The lookup names the member holding the key, so fedgate asks only that member;
    // postgres_fdw prunes the other partitions by the key's range.
    let pk_fed: Vec<String> = (1..=4)
        .map(|k| format!("SELECT id, county_code, x FROM pg_readings WHERE member = 'p{k}' AND id = {{n+{}}}", (k - 1) * n))
        .collect();
    let pk_pg: Vec<String> = (1..=4)
        .map(|k| {
            format!(
                "SELECT id, county_code, x FROM readings WHERE id = {{n+{}}}",
                (k - 1) * n
            )
        })
        .collect();
    let pk_all: Vec<String> = (1..=4)
        .map(|k| {
            format!(
                "SELECT id, county_code, x FROM pg_readings WHERE id = {{n+{}}}",
                (k - 1) * n
            )
        })
        .collect();
    let filter = "SELECT id, county_code, x FROM {t} WHERE county_code = '330007' AND x < 100";
    let group = "SELECT county_code, count(*) AS n, sum(x) AS total FROM {t} GROUP BY county_code";
    let topk = "SELECT id, county_code, x FROM {t} ORDER BY x DESC, id LIMIT 10";
    let on = |q: &str, t: &str| vec![q.replace("{t}", t)];
    let filter_rows = whole
        .query(&filter.replace("{t}", "readings"), &[])
        .await
        .unwrap()
        .len();
    struct Case {
        label: &'static str,
        fed: Vec<String>,
        pg: Vec<String>,
        rows: usize,
        requests: u64,
        target: Option<f64>,
        /// The same query written by hand for postgres_fdw, one part per partition;
        /// fedgate's target is to be no slower than it.
        rewrite: Option<String>,
        /// At most this many times the time of the same query asked directly.
        direct_target: Option<f64>,
        /// The same query over the members' sessions with parallel workers allowed.
        parallel: Option<Vec<String>>,
    }
    let parts = |q: &str| -> Vec<String> {
        (1..=4)
            .map(|k| q.replace("{t}", &format!("readings_m{k}")))
            .collect()
    };
    let group_rewrite = format!(
        "SELECT county_code, sum(n)::int8 AS n, sum(total) AS total FROM ({}) AS t GROUP BY county_code",
        parts("SELECT county_code, count(*) AS n, sum(x) AS total FROM {t} GROUP BY county_code")
            .join(" UNION ALL ")
    );
    // MATERIALIZED keeps an asynchronous Append; a Merge Append would ask the
    // partitions one after another.
    let topk_rewrite = format!(
        "WITH t AS MATERIALIZED ({}) SELECT id, county_code, x FROM t ORDER BY x DESC, id LIMIT 10",
        parts("(SELECT id, county_code, x FROM {t} ORDER BY x DESC, id LIMIT 10)")
            .join(" UNION ALL ")
    );
    let cases = [
        Case {
            label: "primary-key lookup (member named / partitions pruned)",
            fed: pk_fed,
            pg: pk_pg.clone(),
            rows: 1,
            requests: sizes.requests,
            target: Some(1.0),
            rewrite: None,
            direct_target: None,
            parallel: None,
        },
        Case {
            label: "primary-key lookup, fedgate asking all four members",
            fed: pk_all,
            pg: pk_pg,
            rows: 1,
            requests: sizes.requests,
            target: None,
            rewrite: None,
            direct_target: None,
            parallel: None,
        },
        Case {
            label: "selective filter",
            fed: on(filter, "pg_readings"),
            pg: on(filter, "readings"),
            rows: filter_rows,
            requests: sizes.requests / 4 + 1,
            target: None,
            rewrite: None,
            direct_target: None,
            parallel: Some(on(filter, "pg_readings_parallel")),
        },
        Case {
            label: "GROUP BY county",
            fed: on(group, "pg_readings"),
            pg: on(group, "readings"),
            rows: COUNTIES as usize,
            requests: sizes.heavy_requests,
            target: Some(4.0),
            rewrite: Some(group_rewrite),
            direct_target: None,
            parallel: Some(on(group, "pg_readings_parallel")),
        },
        Case {
            label: "top-k (ORDER BY x DESC LIMIT 10)",
            fed: on(topk, "pg_readings"),
            pg: on(topk, "readings"),
            rows: 10,
            requests: sizes.heavy_requests * 3,
            target: Some(2.0),
            rewrite: Some(topk_rewrite),
            direct_target: Some(1.2),
            parallel: Some(on(topk, "pg_readings_parallel")),
        },
    ];
    // Explain: what each side sends to the member databases, and what one member
    // database spends executing it (the profile of the databases' share).
    let m1 = pg.connect("m1").await.unwrap();
    // Without parallel workers, as fedgate's members and postgres_fdw's cursors run
    // each statement here.
    m1.batch_execute("SET max_parallel_workers_per_gather = 0")
        .await
        .unwrap();
    let remote_sql = |sql: String| {
        let coord = &coord;
        async move {
            coord
                .query(&format!("EXPLAIN (VERBOSE, COSTS OFF) {sql}"), &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .find(|l| l.contains("Remote SQL"))
                .map(|l| l.trim().trim_start_matches("Remote SQL: ").to_string())
                .unwrap_or_else(|| "?".into())
        }
    };
    let mut shown = String::new();
    let mut database_time = Vec::new();
    for c in &cases[2..] {
        let e = fedc.explain(&c.fed[0]).await.unwrap();
        let sql = e
            .database_statements
            .first()
            .map(|s| s.sql.clone())
            .unwrap_or_default();
        let fdw_sql = remote_sql(c.pg[0].clone()).await;
        shown.push_str(&format!(
            "- {}: fedgate sends each member database `{}`; postgres_fdw sends each partition `{}`.\n",
            c.label, sql, fdw_sql
        ));
        let by_hand = match &c.rewrite {
            Some(q) => Some(remote_sql(q.clone()).await),
            None => None,
        };
        let mut cells = vec![
            c.label.to_string(),
            format!("{:.1} ms", execution_ms(&m1, &sql).await),
            format!("{:.1} ms", execution_ms(&m1, &fdw_sql).await),
        ];
        cells.push(match &by_hand {
            Some(q) => format!("{:.1} ms", execution_ms(&m1, q).await),
            None => String::new(),
        });
        database_time.push(format!("| {} |", cells.join(" | ")));
        if let Some(q) = by_hand {
            shown.push_str(&format!(
                "  Written by hand, postgres_fdw sends each partition `{q}`.\n"
            ));
        }
    }
    let range = (1, n);
    let mut rows = Vec::new();
    for c in &cases {
        // Warm-up of all three paths.
        warm(&fedc, &c.fed, range, 2).await;
        if let Some(q) = &c.parallel {
            warm(&fedc, q, range, 2).await;
        }
        pg_p50(&coord, &c.pg, range, 2, 99, Some(c.rows)).await;
        pg_p50(&whole, &c.pg, range, 2, 99, Some(c.rows)).await;
        if let Some(q) = &c.rewrite {
            pg_p50(&coord, std::slice::from_ref(q), range, 2, 99, Some(c.rows)).await;
        }
        let (mut f50, mut w50, mut d50, mut h50, mut speedup, mut vs_direct) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let (mut vs_hand, mut p50_parallel) = (Vec::new(), Vec::new());
        for r in 0..sizes.rounds {
            let (mut f, mut w, mut d, mut h_round) = (0.0, 0.0, 0.0, None);
            for v in 0..5 {
                let seed = r as u64 + 1;
                match (v + r) % 5 {
                    4 => {
                        if let Some(q) = &c.parallel {
                            let rep = fed(&fedc, q, range, c.requests, seed).await;
                            assert_eq!(rep.rows, c.rows as u64 * rep.ok, "{}", c.label);
                            p50_parallel.push(rep.latency_us.p50 as f64);
                        }
                    }
                    3 => {
                        if let Some(q) = &c.rewrite {
                            let h = pg_p50(
                                &coord,
                                std::slice::from_ref(q),
                                range,
                                c.requests,
                                seed,
                                Some(c.rows),
                            )
                            .await;
                            h50.push(h);
                            h_round = Some(h);
                        }
                    }
                    0 => {
                        let rep = fed(&fedc, &c.fed, range, c.requests, seed).await;
                        assert_eq!(rep.rows, c.rows as u64 * rep.ok, "{}", c.label);
                        f = rep.latency_us.p50 as f64;
                    }
                    1 => w = pg_p50(&coord, &c.pg, range, c.requests, seed, Some(c.rows)).await,
                    _ => d = pg_p50(&whole, &c.pg, range, c.requests, seed, Some(c.rows)).await,
                }
            }
            f50.push(f);
            w50.push(w);
            d50.push(d);
            speedup.push(w / f);
            vs_direct.push(f / d);
            if let Some(h) = h_round {
                vs_hand.push(f / h);
            }
        }
        let s = median(speedup);
        let mut targets = Vec::new();
        match c.target {
            Some(1.0) => targets.push(format!(
                "no slower than postgres_fdw: {}",
                verdict(s >= 1.0)
            )),
            Some(t) => targets.push(format!(
                "at least {t}x faster than postgres_fdw: {}",
                verdict(s >= t)
            )),
            None => {}
        }
        if !vs_hand.is_empty() {
            let x = median(vs_hand);
            targets.push(format!(
                "at most 1.0x the hand-written SQL ({x:.2}x): {}",
                verdict(x <= 1.0)
            ));
        }
        if let Some(t) = c.direct_target {
            let x = median(vs_direct.clone());
            targets.push(format!("at most {t}x directly: {}", verdict(x <= t)));
        }
        let target = if targets.is_empty() {
            "(reported)".to_string()
        } else {
            targets.join("; ")
        };
        rows.push(format!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {target} |",
            c.label,
            ms(median(f50)),
            if p50_parallel.is_empty() {
                "".to_string()
            } else {
                ms(median(p50_parallel))
            },
            ms(median(w50)),
            if h50.is_empty() {
                "".to_string()
            } else {
                ms(median(h50))
            },
            ms(median(d50)),
            s,
            median(vs_direct),
        ));
    }
    // Counted before the breakdown below, whose lookups are all sent whole.
    let hub_plans = plans_made(&hub_log, hub_from);
    out.push_str(&format!(
        "### Against postgres_fdw\n\n\
         Four member databases of {n} rows each in one PostgreSQL server. fedgate: the client asks \
         `hub`, which fans out to four gateways `p1`..`p4`, each with one database as its source. \
         postgres_fdw: a coordinator database whose `readings` is partitioned by `id` range over four \
         foreign tables, one per member database (`async_capable`, `fetch_size` 10000, \
         `enable_partitionwise_aggregate` and `enable_partitionwise_join` on). Directly: the same SQL \
         in one database holding all {} rows. Lookups draw a different key every time. Every answer's \
         row count is checked. postgres_fdw in PostgreSQL 15 cannot push a partial aggregate or a \
         LIMIT under an Append into its partitions, so the hand-written column shows what a user \
         gets by writing one sub-query per partition (a UNION ALL of per-partition GROUP BYs, and of \
         per-partition ORDER BY ... LIMITs) to the same foreign tables. The four member databases \
         share one server on this machine's cores, so fedgate's members start their sessions with \
         `max_parallel_workers_per_gather = 0` (`settings` of `[[databases]]`), which postgres_fdw's \
         cursors get by construction (PostgreSQL never runs a cursor's plan in parallel); the column \
         after fedgate's is the same query read through sessions with the server's defaults, where \
         each of the four statements may start a parallel worker.\n\n\
         | query (p50, medians of {} rounds) | fedgate | fedgate, parallel workers allowed | postgres_fdw | postgres_fdw, SQL rewritten by hand | directly | postgres_fdw / fedgate | fedgate / directly | target |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---|\n{}\n\n\
         What each sends to the member databases:\n\n{shown}\n\
         What one member database (`m1`, {n} rows) spends executing each statement: PostgreSQL's \
         own `Execution Time` from `EXPLAIN ANALYZE`, median of 5, run one at a time on an idle \
         machine without parallel workers (the rest of each p50 is the gateways, the network and the merge):\n\n\
         | query | fedgate's statement | postgres_fdw's | postgres_fdw's, SQL rewritten by hand |\n\
         |---|---:|---:|---:|\n{}\n\n{}",
        4 * n,
        sizes.rounds,
        rows.join("\n"),
        database_time.join("\n"),
        {
            let log = &region.proc("p1").log;
            let from = std::fs::metadata(log).map_or(0, |m| m.len());
            let mut told = lookup_breakdown(&fedc, n, sizes.requests).await;
            told.push_str(&owner_phases(log, from));
            told
        },
    ));
    if let Some((physical, reused)) = hub_plans {
        out.push_str(&format!(
            "`hub`'s plans of the queries of the table above, warm-up included, that its plan \
             cache did not hold (its `fedgate::planning` events): {physical} planned \
             physically, {reused} run from a physical plan their shape kept, with their own \
             member SQL.\n\n"
        ));
    }
}

/// The data owner's phases of the lookups above, from `p1`'s log past `from`, when
/// its gateways ran with `FEDGATE_BENCH_LOG` showing `fedgate::phases` (and
/// `fedgate::planning`) at debug; nothing otherwise.
fn owner_phases(log: &Path, from: u64) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    // Values of `key=N` pairs in the lines holding `event`, by key.
    let values = |event: &str| {
        let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for line in text.lines().filter(|l| l.contains(event)) {
            // Pairs stand alone or in a field of pairs (`phases=lane=5 answer=..`).
            for word in line.split([' ', '"']) {
                let parts: Vec<&str> = word.split('=').collect();
                if let [.., k, v] = parts[..]
                    && let Ok(v) = v.parse::<f64>()
                {
                    by.entry(k.to_string()).or_default().push(v);
                }
            }
        }
        by
    };
    let phases = values("Sub-query answered");
    if phases.is_empty() {
        return String::new();
    }
    let count = |by: &BTreeMap<String, Vec<f64>>| by.values().map(Vec::len).max().unwrap_or(0);
    let (recorded, planned) = (values("Recorded"), values("Planned"));
    let filter = std::env::var("FEDGATE_BENCH_LOG").unwrap_or_default();
    let told = |by: &BTreeMap<String, Vec<f64>>, keys: &[&str]| {
        keys.iter()
            .filter_map(|k| Some(format!("{k} {:.0}", median(by.get(*k)?.clone()))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let one = |k: &str| {
        phases
            .get(k)
            .map_or("?".to_string(), |v| format!("{:.0}", median(v.clone())))
    };
    format!(
        "`p1`'s own phases of these lookups ({} sub-queries; this run's gateways logged with \
         `FEDGATE_BENCH_LOG={filter}`, which costs time of its own, in every figure of this \
         section; medians, µs): from the sub-query's arrival to its task on the lane (admission) {}; \
         to its answer ready (parse, policy, planning) {}; to its first chunk (the answer's schema) \
         {}; to the rows' end (the database's statement, its rows converted and encoded, and the \
         audit record) {}; to the summary {}. Its audit records ({}, any sub-query's): {}. Its planning ({} plans; a \
         plan found in the cache is not planned; `physical` is a physical plan made, `reused` one reused from \
         the shape's with the plan's own statement, each over the plans that had it: {}): {}.\n\n",
        count(&phases),
        one("lane"),
        one("answer"),
        one("first"),
        one("rest"),
        one("summary"),
        count(&recorded),
        told(&recorded, &["write_us", "durable_us"]),
        count(&planned),
        ["physical", "reused"]
            .iter()
            .map(|k| format!("{k} {}", planned.get(*k).map_or(0, Vec::len)))
            .collect::<Vec<_>>()
            .join(", "),
        told(
            // `p1` plans only as a data owner.
            &planned,
            &[
                "key",
                "shape",
                "rewrite",
                "optimize",
                "databases",
                "physical",
                "reused",
                "cache",
                "start"
            ]
        ),
    )
}

/// How many plans a gateway made physically and how many it ran reused from its
/// shape's kept ones, from its `fedgate::planning` events in `log` past `from`;
/// `None` when the gateways' log filter (`FEDGATE_BENCH_LOG`) leaves them out.
fn plans_made(log: &Path, from: u64) -> Option<(usize, usize)> {
    let filter = std::env::var("FEDGATE_BENCH_LOG").unwrap_or_default();
    if !filter.contains("fedgate::planning=debug") {
        return None;
    }
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    let (mut physical, mut reused) = (0, 0);
    for line in text.lines().filter(|l| l.contains("Planned")) {
        // Each plan's phases end with the one that made its physical plan.
        let words = || line.split([' ', '"']);
        if words().any(|w| w.starts_with("reused=")) {
            reused += 1;
        } else if words().any(|w| w.starts_with("physical=")) {
            physical += 1;
        }
    }
    Some((physical, reused))
}

/// The length of a gateway's log now, where [`plans_made`] starts reading.
fn log_len(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// Where the primary-key lookup's time goes, from the summaries of lookups through
/// `hub` one at a time: the client's wall time, the hub's own time from the query's
/// arrival to its summary, the hub's planning, and the hub's call to `p1` (from its
/// start to the member's last message, which holds the member's planning, its
/// database's round trips and its audit record, and the hop there and back).
async fn lookup_breakdown(client: &Client, n: i64, requests: u64) -> String {
    let (mut wall, mut hub, mut planning, mut call, mut own) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut bound = 0;
    let mut key: i64 = 7;
    for _ in 0..requests.max(20) {
        key = (key * 48_271) % n + 1;
        let sql = format!(
            "SELECT id, county_code, x FROM pg_readings WHERE member = 'p1' AND id = {key}"
        );
        let t = Instant::now();
        let a = client.query(&sql, false, None).await.unwrap();
        wall.push(t.elapsed().as_micros() as f64);
        let s = &a.summary;
        // A key the section drew before finds its plan in the plan cache.
        assert!(
            s.plan_bound_optimized || s.plan_cached,
            "{sql}: planned anew"
        );
        bound += usize::from(s.plan_bound_optimized);
        hub.push(s.elapsed_us as f64);
        planning.push(s.planning_us as f64);
        let p1 = s.members.iter().find(|m| m.member == "p1").unwrap();
        call.push(p1.elapsed_us as f64);
        own.push(p1.member_elapsed_us as f64);
    }
    let count = wall.len();
    let (wall, hub, planning, call) = (median(wall), median(hub), median(planning), median(call));
    let own = median(own);
    format!(
        "Where the primary-key lookup's time goes ({count} lookups through `hub`, one at a time, \
         {bound} of them bound into their shape's optimized plan and the others' keys drawn \
         before, found in the plan cache; medians from each answer's summary): \
         at the client {}; at `hub` from the query's arrival to its summary {}, of which planning {} and \
         the call to `p1` {}, of which `p1`'s own time from the sub-query's arrival to its summary \
         (its planning, its database's round trips and its audit record; as it reports it) {} and \
         the hop from `hub` to `p1` and back {}. So the client's hop to `hub` and back, with the hub's \
         durable record (written after the summary's time is read, before the summary is sent), \
         is {}, and the hub's own work besides planning and the call (the member's answer read, \
         the caller's answer written) {}.\n\n",
        ms(wall),
        ms(hub),
        ms(planning),
        ms(call),
        ms(own),
        ms(call - own),
        ms(wall - hub),
        ms(hub - planning - call),
    )
}

async fn fanout(region: &Region, sizes: Sizes, out: &mut String) {
    let hub = region.client("hub");
    let sql_for = |k: usize| {
        let members: Vec<String> = (1..=k).map(|i| format!("'m{i}'")).collect();
        vec![format!(
            "SELECT count(*) AS n, sum(x) AS total FROM readings WHERE member IN ({})",
            members.join(", ")
        )]
    };
    let mut table = Vec::new();
    let mut cpu_row = String::new();
    for (label, delay) in [
        (
            format!("{} ms link each way", sizes.link_delay.as_millis()),
            sizes.link_delay,
        ),
        ("bare loopback".to_string(), Duration::ZERO),
    ] {
        region.links.set(delay);
        for &k in sizes.fanout {
            warm(&hub, &sql_for(k), (1, 1), 3).await;
        }
        let mut p50: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut ratio: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        // CPU time per query of the asked members together, and of the coordinator.
        let mut member_cpu: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut hub_cpu: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for r in 0..sizes.rounds {
            let mut order: Vec<usize> = sizes.fanout.to_vec();
            let n = order.len();
            order.rotate_left(r % n);
            let mut this = BTreeMap::new();
            for k in order {
                let cpu = |region: &Region| -> (Duration, Duration) {
                    let members = (1..=k).map(|i| region.proc(&format!("m{i}")).cpu()).sum();
                    (members, region.proc("hub").cpu())
                };
                let (m0, h0) = cpu(region);
                let rep = fed(&hub, &sql_for(k), (1, 1), sizes.requests / 2 + 1, 1).await;
                let (m1, h1) = cpu(region);
                let per = |d: Duration| d.as_secs_f64() * 1e3 / rep.ok as f64;
                member_cpu.entry(k).or_default().push(per(m1 - m0));
                hub_cpu.entry(k).or_default().push(per(h1 - h0));
                this.insert(k, rep.latency_us.p50 as f64);
            }
            for (&k, &v) in &this {
                p50.entry(k).or_default().push(v);
                ratio.entry(k).or_default().push(v / this[&1]);
            }
        }
        if delay.is_zero() {
            let cells: Vec<String> = sizes
                .fanout
                .iter()
                .map(|k| {
                    format!(
                        "{:.1} ms + {:.1} ms",
                        median(member_cpu[k].clone()),
                        median(hub_cpu[k].clone())
                    )
                })
                .collect();
            cpu_row = format!(
                "| CPU per query: members together + coordinator (bare loopback) | {} | |",
                cells.join(" | ")
            );
            // What this machine can show of the coordinator's own share: its CPU per
            // query divided by the members it asked.
            let per_member: Vec<String> = sizes
                .fanout
                .iter()
                .map(|k| format!("{:.0} µs", median(hub_cpu[k].clone()) * 1e3 / *k as f64))
                .collect();
            cpu_row.push_str(&format!(
                "\n| coordinator CPU per query per member asked (bare loopback) | {} | (reported) |",
                per_member.join(" | ")
            ));
        }
        let cells: Vec<String> = sizes
            .fanout
            .iter()
            .map(|k| {
                format!(
                    "{} ({:.2})",
                    ms(median(p50[k].clone())),
                    median(ratio[k].clone())
                )
            })
            .collect();
        let last = *sizes.fanout.last().unwrap();
        let r = median(ratio[&last].clone());
        // The resilience issue's target: four members that answer in the same time.
        let four = ratio
            .get(&4)
            .map(|v| {
                format!(
                    "; 4 members at most 1.3x one: {}",
                    verdict(median(v.clone()) <= 1.3)
                )
            })
            .unwrap_or_default();
        table.push(format!(
            "| {label} | {} | {} |",
            cells.join(" | "),
            if delay.is_zero() {
                "(reported)".to_string()
            } else {
                format!(
                    "{last} members at most 1.3x one: {}{four}",
                    verdict(r <= 1.3)
                )
            }
        ));
    }
    region.links.set(Duration::ZERO);
    table.push(cpu_row);
    let header: Vec<String> = sizes
        .fanout
        .iter()
        .map(|k| format!("{k} member{}", if *k == 1 { "" } else { "s" }))
        .collect();
    out.push_str(&format!(
        "### Fan-out scaling\n\n\
         `SELECT count(*), sum(x) FROM readings WHERE member IN (...)` through `hub`, over the first \
         k of 16 members that hold the same {FILE_ROWS} rows each (so every member takes the same \
         time). Each member is reached through a proxy in the benchmark process that holds every \
         chunk for a fixed delay, an inter-city link; the second line sets the delay to zero. p50 \
         latency, with the ratio to one member in parentheses; medians of {} rounds of {} queries. \
         The last line is CPU time (user and system, from `/proc`) per query of the asked members' \
         processes together and of the coordinator's: all the gateways share this machine's cores.\n\n\
         | link | {} | target |\n|---|{}---|\n{}\n\n",
        sizes.rounds,
        sizes.requests / 2 + 1,
        header.join(" | "),
        "---:|".repeat(sizes.fanout.len()),
        table.join("\n")
    ));
}

/// Runs `requests` queries through the load generator with a deadline, partial
/// answers allowed; returns the report (failures are counted in it, not fatal).
async fn deadline_load(
    client: &Client,
    sql: &str,
    concurrency: usize,
    requests: u64,
    timeout: Duration,
) -> Report {
    let load = Load {
        sql: vec![sql.to_string()],
        range: (1, 1),
        mode: Mode::Closed {
            concurrency,
            expected_interval: None,
        },
        duration: Duration::from_secs(3600),
        max_requests: Some(requests),
        warmup: Duration::ZERO,
        timeout,
        allow_partial: true,
        seed: 7,
        service: None,
        receipt: false,
    };
    loadgen::run(client, &load).await.unwrap()
}

async fn resilience(region: &Region, sizes: Sizes, out: &mut String) {
    let hub = region.client("hub");
    let four = |t: &str| {
        format!(
            "SELECT count(*) AS n, sum(x) AS total FROM {t} WHERE member IN ('m1', 'm2', 'm3', 'm4')"
        )
    };
    region.links.set(Duration::ZERO);
    warm(&hub, &[four("readings")], (1, 1), 3).await;
    warm(&hub, &[four("readings_cached")], (1, 1), 3).await;

    // A member far slower than the deadline: the answer comes at the deadline, with
    // that member reported timed out, not when the member would have finished.
    let deadline = Duration::from_millis(300);
    let slow_member = region.proc("m4").port;
    let per_variant = (sizes.requests / 10).max(2);
    let (mut healthy_p50, mut healthy_p99, mut slow_p50, mut slow_p99) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut cut = 0;
    for r in 0..sizes.rounds {
        for slow in if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            region.links.slow(
                slow_member,
                if slow {
                    Duration::from_secs(2)
                } else {
                    Duration::ZERO
                },
            );
            let rep = deadline_load(&hub, &four("readings"), 1, per_variant, deadline).await;
            assert_eq!(rep.failed(), 0, "{:?}", rep.first_error);
            if slow {
                slow_p50.push(rep.latency_us.p50 as f64);
                slow_p99.push(rep.latency_us.p99 as f64);
                cut += rep.ok;
                region.links.slow(slow_member, Duration::ZERO);
                // Chunks already held by the slow link drain before the next variant.
                tokio::time::sleep(Duration::from_millis(2500)).await;
            } else {
                healthy_p50.push(rep.latency_us.p50 as f64);
                healthy_p99.push(rep.latency_us.p99 as f64);
            }
        }
    }
    let p99 = median(slow_p99.clone());
    let deadline_us = deadline.as_micros() as f64;

    // Cached against uncached answers: throughput, and queries per CPU-second of
    // all the gateways involved (hub and m1..m4).
    let gateways = ["hub", "m1", "m2", "m3", "m4"];
    let cpu = |region: &Region| -> Duration { gateways.iter().map(|g| region.proc(g).cpu()).sum() };
    let mut rate: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut per_cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut ratio = Vec::new();
    for r in 0..sizes.rounds {
        let mut this = BTreeMap::new();
        let order = if r % 2 == 0 {
            ["readings", "readings_cached"]
        } else {
            ["readings_cached", "readings"]
        };
        for t in order {
            let c0 = cpu(region);
            let rep = deadline_load(
                &hub,
                &four(t),
                4,
                sizes.requests * 2,
                Duration::from_secs(30),
            )
            .await;
            assert_eq!(rep.failed(), 0, "{t}: {:?}", rep.first_error);
            let used = (cpu(region) - c0).as_secs_f64();
            let q_per_cpu = rep.ok as f64 / used.max(1e-9);
            rate.entry(t).or_default().push(rep.throughput);
            per_cpu.entry(t).or_default().push(q_per_cpu);
            this.insert(t, q_per_cpu);
        }
        ratio.push(this["readings_cached"] / this["readings"]);
    }
    out.push_str(&format!(
        "### Resilience: a member cut by the deadline, cached answers\n\n\
         Four members (`m1`..`m4`, the fan-out section's files) on bare loopback, through `hub`, \
         `SELECT count(*), sum(x) ... WHERE member IN ('m1', 'm2', 'm3', 'm4')`. Medians of {} rounds.\n\n\
         **Deadline.** Each query has a deadline of {} ms and allows a partial answer. In the slow \
         variant the link to `m4` holds every chunk for 2 s more, so `m4` cannot answer in time; its \
         budget is the deadline less the merge reserve, then it is cut off and reported timed out. \
         {} queries per variant per round, one at a time; {} answers with `m4` cut off.\n\n\
         | variant | p50 | p99 | p99 / deadline | target |\n|---|---:|---:|---:|---|\n\
         | all four answer | {} | {} | | |\n\
         | `m4` far slower than the deadline | {} | {} | {:.2} | p99 within the deadline: {} |\n\n\
         **Cache.** The same query over `readings` and over `readings_cached` (the same data with \
         `cache_fresh_for = \"1h\"`), four callers at once, {} queries per variant per round. Queries \
         per CPU-second counts the CPU time (user and system, `/proc`) of `hub` and the four members \
         together; all of them share this machine's cores.\n\n\
         | variant | queries/s | queries per CPU-second |\n|---|---:|---:|\n\
         | uncached | {:.0} | {:.0} |\n\
         | cached | {:.0} | {:.0} |\n\
         | cached / uncached (median of per-round ratios) | | {:.1}x |\n\n",
        sizes.rounds,
        deadline.as_millis(),
        per_variant,
        cut,
        ms(median(healthy_p50)),
        ms(median(healthy_p99)),
        ms(median(slow_p50)),
        ms(p99),
        p99 / deadline_us,
        verdict(p99 <= deadline_us),
        sizes.requests * 2,
        median(rate["readings"].clone()),
        median(per_cpu["readings"].clone()),
        median(rate["readings_cached"].clone()),
        median(per_cpu["readings_cached"].clone()),
        median(ratio),
    ));
}

async fn memory(region: &Region, sizes: Sizes, idle_hub_kib: u64, out: &mut String) {
    let solo = region.proc("solo");
    let hub = region.proc("hub");
    // Per open connection: many clients, each with its own connection, each making
    // one call and staying connected.
    let conns = if sizes.rounds > 1 { 200 } else { 20 };
    let before = solo.rss_kib().0;
    let mut clients = Vec::new();
    for _ in 0..conns {
        let c = region.client("solo");
        c.describe(None).await.unwrap();
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = solo.rss_kib().0;
    let per_conn = (after.saturating_sub(before)) as f64 / conns as f64;
    drop(clients);

    // The streamed answer: 10,000,000 rows through hub and solo, counted here and
    // never kept.
    let (hub_before, solo_before) = (hub.rss_kib().0, solo.rss_kib().0);
    hub.reset_peak();
    solo.reset_peak();
    let client = region.client("hub");
    let mut rows = 0u64;
    let t = Instant::now();
    let (_, summary) = client
        .query_each(
            QueryRequest {
                sql: "SELECT id, x FROM big".into(),
                timeout_ms: 600_000,
                ..Default::default()
            },
            |b| {
                rows += b.num_rows() as u64;
                Ok(())
            },
        )
        .await
        .unwrap_or_else(|f| panic!("{f}"));
    let took = t.elapsed();
    assert_eq!(rows, sizes.stream_rows as u64);
    assert_eq!(summary.rows, rows);
    let (_, hub_peak) = hub.rss_kib();
    let (_, solo_peak) = solo.rss_kib();
    let mib = |k: u64| k as f64 / 1024.0;
    let bound = 256.0;
    out.push_str(&format!(
        "### Memory\n\n\
         Resident memory (`VmRSS`, and `VmHWM` for peaks, reset before the stream) of gateway \
         processes.\n\n\
         | measure | value | target |\n|---|---:|---|\n\
         | a coordinator gateway, idle after start | {:.1} MiB | (reported) |\n\
         | per open client connection (mutual TLS, HTTP/2, one call made; {conns} connections) | {per_conn:.0} KiB | (reported) |\n\
         | peak while streaming {} rows ({:.0} MiB of Arrow IPC) through two hops, coordinator (resident before: {:.1} MiB) | {:.1} MiB | at most {bound} MiB: {} |\n\
         | the same, the member that reads and sends them (resident before: {:.1} MiB) | {:.1} MiB | at most {bound} MiB: {} |\n\n\
         The stream took {:.1} s ({:.1} M rows/s); the client counted the rows and kept none.\n\n",
        mib(idle_hub_kib),
        sizes.stream_rows,
        summary.bytes_received as f64 / 1048576.0,
        mib(hub_before),
        mib(hub_peak),
        verdict(mib(hub_peak) <= bound),
        mib(solo_before),
        mib(solo_peak),
        verdict(mib(solo_peak) <= bound),
        took.as_secs_f64(),
        rows as f64 / took.as_secs_f64() / 1e6,
    ));
}

// ---------------------------------------------------------------------------------
// Doors: the PostgreSQL port against Flight SQL and the native call.

/// The hub's own TLS material (an organization's tools query through its gateway).
fn hub_tls(region: &Region) -> fedgate::trust::tls::TlsMaterial {
    let certs = region.dir.path().join("certs");
    fedgate::trust::tls::TlsMaterial::load(
        &region.ca,
        &certs.join("hub.crt"),
        &certs.join("hub.key"),
    )
    .unwrap()
}

/// A PostgreSQL session on the hub's port, as the hub's identity.
async fn hub_postgres(region: &Region) -> tokio_postgres::Client {
    let mut cfg = (*hub_tls(region).client_config().unwrap()).clone();
    // The gateway's client configuration offers HTTP/2 for gRPC; a PostgreSQL client
    // offers none.
    cfg.alpn_protocols.clear();
    let conn = format!(
        "host=localhost port={} user=bench dbname=bench sslmode=require",
        region.hub_postgres.unwrap()
    );
    let (client, connection) =
        tokio_postgres::connect(&conn, tokio_postgres_rustls::MakeRustlsConnect::new(cfg))
            .await
            .unwrap();
    tokio::spawn(connection);
    client
}

/// A Flight SQL client of the hub, as the hub's identity.
fn hub_flight_sql(
    region: &Region,
) -> arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel> {
    let channel = fedgate::trust::tls::Connector::new(
        hub_tls(region).client_config().unwrap(),
        "127.0.0.1",
        region.proc("hub").port,
        None,
    )
    .channel(Duration::from_secs(5))
    .unwrap();
    arrow_flight::sql::client::FlightSqlServiceClient::new(channel)
}

/// One way of asking the hub a query.
#[derive(Clone, Copy, PartialEq)]
enum Door {
    /// `Federation.Query`, fedgate's own call.
    Native,
    /// Flight SQL: `GetFlightInfo` of the statement, then `DoGet` of its ticket.
    FlightSql,
    /// The PostgreSQL simple query protocol, the key written into the text.
    PgSimple,
    /// The PostgreSQL extended protocol: prepared once, the key bound each time.
    PgPrepared,
}

impl Door {
    fn label(self) -> &'static str {
        match self {
            Door::Native => "`Federation.Query`",
            Door::FlightSql => "Flight SQL",
            Door::PgSimple => "PostgreSQL, simple protocol",
            Door::PgPrepared => "PostgreSQL, prepared and bound",
        }
    }
}

/// The clients of every door, each connected once.
struct Doors {
    native: Client,
    flight: arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    pg: tokio_postgres::Client,
}

impl Doors {
    /// Runs `sql` (`{n}` replaced by `key`; `$1` in `prepared` bound to it) through
    /// `door`; the rows of the answer.
    async fn ask(
        &mut self,
        door: Door,
        sql: &str,
        prepared: Option<&tokio_postgres::Statement>,
        key: i64,
    ) -> usize {
        let text = sql.replace("{n}", &key.to_string());
        match door {
            Door::Native => self
                .native
                .query_with(QueryRequest {
                    sql: text,
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|f| panic!("{f}"))
                .batches
                .iter()
                .map(|b| b.num_rows())
                .sum(),
            Door::FlightSql => {
                let info = self.flight.execute(text, None).await.unwrap();
                let ticket = info.endpoint[0].ticket.clone().unwrap();
                let mut stream = self.flight.do_get(ticket).await.unwrap();
                let mut rows = 0;
                while let Some(b) = futures::StreamExt::next(&mut stream).await {
                    rows += b.unwrap().num_rows();
                }
                rows
            }
            Door::PgSimple => self
                .pg
                .simple_query(&text)
                .await
                .unwrap()
                .iter()
                .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                .count(),
            Door::PgPrepared => {
                let statement = prepared.expect("a prepared statement");
                let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
                    if statement.params().is_empty() {
                        &[]
                    } else {
                        &[&key]
                    };
                self.pg.query(statement, params).await.unwrap().len()
            }
        }
    }
}

async fn doors(region: &Region, sizes: Sizes, out: &mut String) {
    let mut d = Doors {
        native: region.client("hub"),
        flight: hub_flight_sql(region),
        pg: hub_postgres(region).await,
    };
    let hub_log = region.proc("hub").log.clone();
    let all = [
        Door::Native,
        Door::FlightSql,
        Door::PgSimple,
        Door::PgPrepared,
    ];
    let shapes = [
        (
            "primary-key lookup (one row, a new key every time)",
            // Not the hop section's text, whose keys the gateways' plan caches still
            // hold: every lookup here is of a key no door asked before.
            "SELECT id, x, county_code FROM readings WHERE member = 'solo' AND id = {n}",
            "SELECT id, x, county_code FROM readings WHERE member = 'solo' AND id = $1",
            1usize,
        ),
        (
            "GROUP BY county (100 rows from 10,000; the same query every time)",
            "SELECT county_code, count(*) AS n, sum(x) AS total FROM readings \
             WHERE member = 'solo' GROUP BY county_code",
            "SELECT county_code, count(*) AS n, sum(x) AS total FROM readings \
             WHERE member = 'solo' GROUP BY county_code",
            COUNTIES as usize,
        ),
    ];
    let mut rows = Vec::new();
    for (label, sql, param_sql, expect) in shapes {
        let prepared = d.pg.prepare(param_sql).await.unwrap();
        // Warm every door (connections, plan caches at hub and member).
        for door in all {
            for k in 1..=10 {
                assert_eq!(d.ask(door, sql, Some(&prepared), k).await, expect, "{sql}");
            }
        }
        let mut p50s: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut ratios: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        // Per door, `hub`'s plans of its lookups (physical, reused), when logged.
        let mut made: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for r in 0..sizes.rounds {
            let mut this_round = [0.0f64; 4];
            // Every door in every round, the order rotated. Each door asks keys of its
            // own, after the ten of the warm-up (a key another door asked would find
            // its plans cached at `hub` and `solo`, when the door sends the same text).
            for i in 0..all.len() {
                let which = (i + r) % all.len();
                let mut times = Vec::new();
                let from = log_len(&hub_log);
                for j in 0..sizes.requests {
                    let asked = (r * all.len() + which) as u64 * sizes.requests + j;
                    let key = 11 + (asked % (FILE_ROWS as u64 - 10)) as i64;
                    let t = Instant::now();
                    let n = d.ask(all[which], sql, Some(&prepared), key).await;
                    times.push(t.elapsed().as_secs_f64() * 1e6);
                    assert_eq!(n, expect, "{sql}");
                }
                this_round[which] = median(times);
                if let Some((physical, reused)) = plans_made(&hub_log, from) {
                    let m = made.entry(which).or_default();
                    m.0 += physical;
                    m.1 += reused;
                }
            }
            for (i, p) in this_round.iter().enumerate() {
                p50s.entry(i).or_default().push(*p);
                ratios.entry(i).or_default().push(p / this_round[1]);
            }
        }
        for (i, door) in all.iter().enumerate() {
            let ratio = median(ratios[&i].clone());
            rows.push(format!(
                "| {label} | {} | {} | {ratio:.2} | {} |",
                door.label(),
                ms(median(p50s[&i].clone())),
                made.get(&i)
                    .map_or("not logged".to_string(), |(physical, reused)| {
                        format!("{physical} / {reused}")
                    }),
            ));
        }
    }

    // The streamed answer through the PostgreSQL port, fetched in portions of
    // 10,000 rows as JDBC does with a fetch size; counted here, never kept.
    let hub = region.proc("hub");
    let hub_before = hub.rss_kib().0;
    hub.reset_peak();
    let fetch = 10_000;
    let t = Instant::now();
    let tx = d.pg.transaction().await.unwrap();
    let portal = tx.bind("SELECT id, x FROM big", &[]).await.unwrap();
    let mut streamed = 0u64;
    loop {
        let part = tx.query_portal(&portal, fetch).await.unwrap();
        streamed += part.len() as u64;
        if part.len() < fetch as usize {
            break;
        }
    }
    tx.commit().await.unwrap();
    let took = t.elapsed();
    assert_eq!(streamed, sizes.stream_rows as u64);
    let hub_peak = hub.rss_kib().1;
    let mib = |k: u64| k as f64 / 1024.0;
    let bound = 256.0;
    out.push_str(&format!(
        "### Doors: the PostgreSQL port, Flight SQL and `Federation.Query`\n\n\
         The same queries asked of the coordinator `hub` (the rows are at `solo`, one hop away) \
         through each of its doors, one at a time, {} per door per round, the doors' order rotated \
         every round; one connection per door, kept. Each lookup asks a key that no door asked \
         before in the run, so every door plans each of its lookups at `hub` and at `solo` (a \
         key asked again through a door that sends the same text finds its plans cached). The \
         PostgreSQL port is asked in the simple \
         protocol with the key in the text (as psql sends a query) and through a statement \
         prepared once and executed with the key bound (as JDBC and psycopg do); Flight SQL makes \
         two calls per query (`GetFlightInfo`, then `DoGet`), as its clients do. The ratio is \
         against Flight SQL in the same round (median of {} rounds). The last column counts \
         `hub`'s plans of each door's lookups in all rounds, from its `fedgate::planning` \
         events when `FEDGATE_BENCH_LOG` shows them: made physically, or run from a physical \
         plan the query's shape kept with the query's own member SQL (a plan found in the plan \
         cache is neither).\n\n\
         | query | door | p50 | ratio to Flight SQL | `hub`'s plans: physical / reused |\n\
         |---|---|---:|---:|---:|\n{}\n\n\
         Streaming {} rows (`SELECT id, x FROM big`) through the PostgreSQL port in portal \
         fetches of {fetch} rows took {:.1} s ({:.2} M rows/s); the coordinator's peak resident \
         memory (`VmHWM`, reset before; resident before: {:.1} MiB) was **{:.1} MiB**, target at \
         most {bound} MiB: {}.\n\n",
        sizes.requests,
        sizes.rounds,
        rows.join("\n"),
        sizes.stream_rows,
        took.as_secs_f64(),
        streamed as f64 / took.as_secs_f64() / 1e6,
        mib(hub_before),
        mib(hub_peak),
        verdict(mib(hub_peak) <= bound),
    ));
}

// ---------------------------------------------------------------------------------
// Fairness: a county keeps its service when a city floods the region.

/// The county portal's calls per second.
const COUNTY_RATE: f64 = 20.0;

/// A region of its own: two data owners with the same data, `plain` (one pool of
/// sub-query slots, first come first served) and `fair` (shares per class of the
/// query's origin), the county's gateway `county` whose portal calls a published
/// service, and the flooding city's gateway `flood`. None of them is in the main
/// region, so nothing else runs while this is measured.
async fn start_fair_region(sizes: Sizes) -> (tempfile::TempDir, BTreeMap<String, Proc>) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::generate("fair").unwrap();
    let certs = d.join("certs");
    let (ca_path, _) = pki::write_ca(&ca, &certs).unwrap();
    let registry = d.join("registry.parquet");
    write_parquet(&registry, 1..FILE_ROWS + 1, true);
    let work = d.join("work.parquet");
    write_parquet(&work, 1..sizes.flood_rows + 1, true);
    let gateways = [
        ("plain", Kind::City),
        ("fair", Kind::City),
        ("county", Kind::County),
        ("flood", Kind::City),
    ];
    let ports: BTreeMap<&str, u16> = gateways.iter().map(|(n, _)| (*n, free_port())).collect();
    let mut region = format!("region = \"fair\"\nca = \"{}\"\n", ca_path.display());
    for (name, kind) in gateways {
        let serves = if matches!(name, "plain" | "fair") {
            "[\"registry\", \"work\"]"
        } else {
            "[]"
        };
        region.push_str(&format!(
            "[[members]]\nname = \"{name}\"\nkind = \"{kind}\"\nendpoint = \"https://127.0.0.1:{}\"\nserves = {serves}\n",
            ports[name]
        ));
        pki::write_issued(
            &ca.issue(
                &Principal::new("fair", kind, name).unwrap(),
                &pki::default_hosts(),
                2,
            )
            .unwrap(),
            &certs,
            name,
        )
        .unwrap();
    }
    for t in ["registry", "work"] {
        region.push_str(&format!(
            "[[datasets]]\nname = \"{t}\"\n{READINGS_FIELDS}\n"
        ));
    }
    for owner in ["plain", "fair"] {
        region.push_str(&format!(
            "[[services]]\nname = \"lookup_{owner}\"\ncallers = [\"fedgate://fair/county/*\"]\n\
             sql = \"SELECT id, county_code, x FROM registry WHERE member = '{owner}' AND id = $id\"\n\
             params = [ {{ name = \"id\", type = \"int64\" }} ]\n"
        ));
    }
    std::fs::write(d.join("region.toml"), region).unwrap();
    for (name, _) in gateways {
        let mut cfg = format!(
            "member = \"{name}\"\nregion = \"region.toml\"\nlisten = \"127.0.0.1:{}\"\n\
             cert = \"certs/{name}.crt\"\nkey = \"certs/{name}.key\"\n",
            ports[name]
        );
        if matches!(name, "plain" | "fair") {
            // The same slots in all; the fair owner keeps four for counties, lets the
            // cities hold at most two at once and runs theirs on its low-priority lane.
            cfg.push_str("[limits]\nmax_concurrent_subqueries = 16\n");
            if name == "fair" {
                cfg.push_str(
                    "[[subquery_admission]]\nclass = \"county\"\nreserved = 4\n\
                     [[subquery_admission]]\nclass = \"city\"\nmax_concurrent = 2\npriority = \"low\"\n",
                );
            }
            for (t, file) in [("registry", &registry), ("work", &work)] {
                cfg.push_str(&format!(
                    "[[sources]]\nname = \"{t}\"\nformat = \"parquet\"\npath = \"{}\"\n\
                     [[mappings]]\ndataset = \"{t}\"\nsource = \"{t}\"\n\
                     fields.id = \"id\"\nfields.county_code = \"county_code\"\nfields.x = \"x\"\n",
                    file.display()
                ));
            }
            cfg.push_str(
                "[[access]]\nprincipals = [\"fedgate://fair/*\"]\ndatasets = [\"*\"]\nlevel = \"rows\"\n",
            );
        }
        std::fs::write(d.join(format!("{name}.toml")), cfg).unwrap();
    }
    let mut procs = BTreeMap::new();
    for (name, _) in gateways {
        procs.insert(name.to_string(), spawn(d, name, ports[name]));
    }
    (dir, procs)
}

/// One measurement: the city's flood at `level` callers (closed loop, started a
/// second early so that it is in full swing) against `owner`, while the county
/// portal calls its lookup service at [`COUNTY_RATE`] for `window`.
async fn flood_and_county(
    county: &Client,
    city: &Client,
    owner: &str,
    level: usize,
    window: Duration,
) -> (Report, Option<Report>) {
    let flood = (level > 0).then(|| {
        let city = city.clone();
        let load = Load {
            sql: vec![format!(
                "SELECT county_code, count(*) AS n, sum(x) AS total FROM work \
                 WHERE member = '{owner}' GROUP BY county_code"
            )],
            range: (1, 1),
            mode: Mode::Closed {
                concurrency: level,
                expected_interval: None,
            },
            duration: window + Duration::from_secs(1),
            max_requests: None,
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(60),
            allow_partial: false,
            seed: 3,
            service: None,
            receipt: false,
        };
        tokio::spawn(async move { loadgen::run(&city, &load).await.unwrap() })
    });
    if flood.is_some() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let load = Load {
        sql: Vec::new(),
        range: (1, FILE_ROWS),
        mode: Mode::Open { rate: COUNTY_RATE },
        duration: window,
        max_requests: None,
        warmup: Duration::ZERO,
        timeout: Duration::from_secs(10),
        allow_partial: false,
        seed: 5,
        service: Some(loadgen::ServiceCall {
            name: format!("lookup_{owner}"),
            param: "id".into(),
            text: false,
        }),
        receipt: false,
    };
    let county = loadgen::run(county, &load).await.unwrap();
    let flood = match flood {
        Some(f) => Some(f.await.unwrap()),
        None => None,
    };
    (county, flood)
}

async fn fairness(sizes: Sizes, out: &mut String) {
    let (dir, procs) = start_fair_region(sizes).await;
    let certs = dir.path().join("certs");
    let client = |name: &str| {
        Client::connect(
            &format!("https://127.0.0.1:{}", procs[name].port),
            &certs.join("ca.crt"),
            &certs.join(format!("{name}.crt")),
            &certs.join(format!("{name}.key")),
        )
        .unwrap()
    };
    let (county, city) = (client("county"), client("flood"));
    for owner in ["plain", "fair"] {
        warm(
            &city,
            &[format!(
                "SELECT count(*) FROM work WHERE member = '{owner}'"
            )],
            (1, 1),
            2,
        )
        .await;
        let r = flood_and_county(&county, &city, owner, 0, Duration::from_millis(500)).await;
        assert_eq!(
            r.0.failed(),
            0,
            "{owner}: {:?}\n{}",
            r.0.first_error,
            std::fs::read_to_string(&procs[owner].log).unwrap_or_default()
        );
    }
    let levels: Vec<usize> = std::iter::once(0)
        .chain(sizes.flood_levels.iter().copied())
        .collect();
    let rounds = sizes.rounds.min(3);
    // (owner, level) -> per-round county p50, p99; county calls and failures; city
    // answers per second and refusals.
    type Key = (&'static str, usize);
    let mut p50: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
    let mut p99: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
    let mut calls: BTreeMap<Key, (u64, u64)> = BTreeMap::new();
    let mut city_rate: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
    let mut city_failed: BTreeMap<Key, u64> = BTreeMap::new();
    let mut first_county_error: Option<String> = None;
    for r in 0..rounds {
        let owners = if r % 2 == 0 {
            ["plain", "fair"]
        } else {
            ["fair", "plain"]
        };
        for owner in owners {
            for &level in &levels {
                let (c, f) =
                    flood_and_county(&county, &city, owner, level, sizes.fair_window).await;
                let k = (owner, level);
                p50.entry(k).or_default().push(c.latency_us.p50 as f64);
                p99.entry(k).or_default().push(c.latency_us.p99 as f64);
                let e = calls.entry(k).or_default();
                e.0 += c.requests;
                e.1 += c.failed();
                if first_county_error.is_none() {
                    first_county_error = c
                        .first_error
                        .clone()
                        .map(|m| format!("{owner}, {level} callers: {m}"));
                }
                if let Some(f) = f {
                    city_rate.entry(k).or_default().push(f.throughput);
                    *city_failed.entry(k).or_default() += f.failed();
                }
                eprintln!(
                    "fairness round {r} {owner} flood {level}: county p50 {} p99 {} failed {}",
                    ms(c.latency_us.p50 as f64),
                    ms(c.latency_us.p99 as f64),
                    c.failed()
                );
            }
        }
    }
    let heaviest = *levels.last().unwrap();
    let mut table = String::new();
    let mut verdicts = BTreeMap::new();
    for owner in ["plain", "fair"] {
        let quiet = median(p99[&(owner, 0)].clone());
        for &level in &levels {
            let k = (owner, level);
            let (n, failed) = calls[&k];
            let q99 = median(p99[&k].clone());
            let city = city_rate
                .get(&k)
                .map(|v| format!("{:.1}", median(v.clone())))
                .unwrap_or_else(|| "—".into());
            let refused = city_failed
                .get(&k)
                .map(|n| n.to_string())
                .unwrap_or_else(|| "—".into());
            table.push_str(&format!(
                "| {owner} | {level} | {} | {} | {:.2} | {}/{} | {city} | {refused} |\n",
                ms(median(p50[&k].clone())),
                ms(q99),
                q99 / quiet,
                n - failed,
                n,
            ));
            if level == heaviest {
                verdicts.insert(owner, (q99 / quiet, failed));
            }
        }
    }
    let (fair_ratio, fair_failed) = verdicts["fair"];
    let (plain_ratio, plain_failed) = verdicts["plain"];
    out.push_str(&format!(
        "### Fairness: a county keeps its service while a city floods the owner\n\n\
         A region of its own: two data owners with the same data (`registry`, {} rows; `work`, {} rows), \
         `plain` with one pool of 16 sub-query slots and `fair` with the same 16 of which 4 are kept \
         for counties and at most 2 go to cities at once, whose work runs on the owner's \
         low-priority lane (`[[subquery_admission]]`, `priority = \"low\"`); the county's \
         gateway `county` and the city's gateway `flood`, no data of their own. The county portal \
         calls the published service `lookup_<owner>` (a primary-key lookup in `registry`) at the \
         county's gateway, open loop at {COUNTY_RATE:.0} calls per second for {} s; meanwhile the city's \
         callers, a closed loop of the given size started a second earlier, run a GROUP BY over `work` \
         through the city's gateway. Every gateway is its own process on this machine's cores. \
         Latency is from each call's due time (no coordinated omission); medians of {rounds} rounds, \
         the owners and the flood sizes interleaved.\n\n\
         | owner | city callers | county p50 | county p99 | p99 / no flood | county answered | city answers/s | city queries refused or failed |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n{table}\n\
         Target: under the heaviest flood ({heaviest} callers) the county's p99 within 1.5x of its p99 \
         with no flood, and no county call refused or failed. Fair owner: {fair_ratio:.2}x, {fair_failed} \
         failed: {}. Plain owner, for comparison: {plain_ratio:.2}x, {plain_failed} failed.{}\n\n",
        FILE_ROWS,
        sizes.flood_rows,
        sizes.fair_window.as_secs_f64(),
        verdict(fair_ratio <= 1.5 && fair_failed == 0),
        first_county_error
            .map(|e| format!(" First county failure: `{}`.", e.replace('`', "'")))
            .unwrap_or_default(),
    ));
    drop(procs);
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .map(|k| format!("{:.0} GiB", k as f64 / 1048576.0))
        .unwrap_or_default();
    // The cargo profile's folder holds the gateway binary: `release`, `profiling` (the
    // release build with its symbols) or `debug`.
    let profile = Path::new(FEDGATE)
        .parent()
        .and_then(|d| d.file_name())
        .map(|d| match d.to_string_lossy().as_ref() {
            "profiling" => "profiling (the release build with symbols)".to_string(),
            other => other.to_string(),
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{cores} vCPU {cpu}, {mem}, Linux, {profile} build")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| args.iter().skip_while(|a| *a != k).nth(1).cloned();
    let mut sizes = if args.iter().any(|a| a == "--smoke") {
        SMOKE
    } else {
        FULL
    };
    if let Some(r) = arg("--rounds").and_then(|r| r.parse().ok()) {
        sizes.rounds = r;
    }
    let all = [
        "hop",
        "fdw",
        "fanout",
        "resilience",
        "memory",
        "doors",
        "fairness",
        "receipts",
        "allocator",
        "workers",
    ];
    let only = arg("--only");
    let sections: Vec<&str> = all
        .iter()
        .copied()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x == *s))
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let t = Instant::now();
        let mut region = start_region(sizes, &sections).await;
        let idle = region.proc("hub").rss_kib().0;
        eprintln!("region started in {:.1} s", t.elapsed().as_secs_f64());
        let mut out = format!(
            "Machine: {}. PostgreSQL from `{}`.\n\n",
            machine(),
            region
                .pg
                .as_ref()
                .map(|_| "fedgate::tools::local_postgres")
                .unwrap_or("(not used)")
        );
        for s in &sections {
            let t = Instant::now();
            match *s {
                "hop" => hop(&region, sizes, &mut out).await,
                "fdw" => fdw(&region, sizes, &mut out).await,
                "fanout" => fanout(&region, sizes, &mut out).await,
                "resilience" => resilience(&region, sizes, &mut out).await,
                "memory" => memory(&region, sizes, idle, &mut out).await,
                "doors" => doors(&region, sizes, &mut out).await,
                "fairness" => fairness(sizes, &mut out).await,
                "receipts" => receipts(&region, sizes, &mut out).await,
                "allocator" => allocator(&mut region, sizes, &mut out).await,
                "workers" => workers(&mut region, sizes, &mut out).await,
                _ => unreachable!(),
            }
            eprintln!("{s} done in {:.1} s", t.elapsed().as_secs_f64());
        }
        out
    });
    print!("{report}");
    if let Some(path) = arg("--out") {
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        f.write_all(report.as_bytes()).unwrap();
    }
}
