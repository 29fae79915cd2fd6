//! Planner benchmark: aggregate pushdown and the plan cache, side by side.
//!
//! Builds a region on loopback with four data members (250,000 generated rows each,
//! Parquet, 100 county codes) and a coordinator that serves no data, all real
//! gateways over mutual TLS, and a client calling the coordinator over gRPC. Then,
//! interleaving the variants in every round (A B, then B A, ...):
//!
//! - bytes the coordinator receives from members, and latency, for
//!   `SELECT county_code, sum(x) ... GROUP BY county_code` with and without
//!   aggregate pushdown;
//! - planning time (SQL text to physical plan, as the gateway reports it) and latency
//!   of a small query with its plan cached and planned anew;
//! - the coordinator's Arrow IPC encoding and decoding of an answer of one row and of
//!   64 KiB, in process: what forwarding a member's answer without decoding and
//!   encoding it again could save.
//!
//! Prints medians of per-round ratios as Markdown. Run: `cargo bench --bench pushdown`
//! (`-- --rounds N` for more rounds).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use fedgate::config::MemberConfig;
use fedgate::gateway::Gateway;
use fedgate::proto::v1::QueryRequest;
use fedgate::tools::client::Client;
use fedgate::trust::identity::{Kind, Principal};
use fedgate::trust::pki::{self, Ca};

const MEMBERS: usize = 4;
const ROWS_PER_MEMBER: usize = 250_000;
const COUNTIES: usize = 100;

fn write_parquet(path: &Path, member: usize) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("county_code", DataType::Utf8, false),
        Field::new("x", DataType::Int64, false),
    ]));
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        schema.clone(),
        None,
    )
    .unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ member as u64;
    for chunk in 0..(ROWS_PER_MEMBER / 50_000) {
        let n = 50_000;
        let codes: Vec<String> = (0..n)
            .map(|i| format!("33{:04}", (chunk * n + i) % COUNTIES))
            .collect();
        let xs: Vec<i64> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % 10_000) as i64
            })
            .collect();
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(codes)),
                Arc::new(Int64Array::from(xs)),
            ],
        )
        .unwrap();
        w.write(&b).unwrap();
    }
    w.close().unwrap();
}

async fn start(dir: &Path) -> (Vec<Gateway>, Client) {
    let ca = Ca::generate("bench").unwrap();
    let certs = dir.join("certs");
    let (ca_path, _) = pki::write_ca(&ca, &certs).unwrap();
    let mut listeners = Vec::new();
    for _ in 0..=MEMBERS {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let port = |i: usize| listeners[i].local_addr().unwrap().port();
    let mut region = format!("region = \"bench\"\nca = \"{}\"\n", ca_path.display());
    region.push_str(&format!(
        "[[members]]\nname = \"hub\"\nkind = \"city\"\nendpoint = \"https://127.0.0.1:{}\"\n",
        port(0)
    ));
    for m in 1..=MEMBERS {
        region.push_str(&format!(
            "[[members]]\nname = \"m{m}\"\nkind = \"city\"\nendpoint = \"https://127.0.0.1:{}\"\nserves = [\"readings\"]\n",
            port(m)
        ));
    }
    region.push_str("[[members]]\nname = \"analyst\"\nkind = \"office\"\n");
    region.push_str("[[datasets]]\nname = \"readings\"\nfields = [ { name = \"county_code\", type = \"utf8\" }, { name = \"x\", type = \"int64\" } ]\n");
    std::fs::write(dir.join("region.toml"), region).unwrap();
    for name in ["hub", "m1", "m2", "m3", "m4", "analyst"] {
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
    let mut gateways = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let name = if i == 0 {
            "hub".to_string()
        } else {
            format!("m{i}")
        };
        let mut cfg = format!(
            "member = \"{name}\"\nregion = \"region.toml\"\nlisten = \"127.0.0.1:{}\"\ncert = \"certs/{name}.crt\"\nkey = \"certs/{name}.key\"\n",
            port_of(&l)
        );
        if i > 0 {
            let data = dir.join(format!("{name}.parquet"));
            write_parquet(&data, i);
            cfg.push_str(&format!(
                "[[sources]]\nname = \"readings\"\nformat = \"parquet\"\npath = \"{}\"\n\
                 [[mappings]]\ndataset = \"readings\"\nsource = \"readings\"\nfields.county_code = \"county_code\"\nfields.x = \"x\"\n\
                 [[access]]\nprincipals = [\"fedgate://bench/*\"]\ndatasets = [\"*\"]\nlevel = \"rows\"\n",
                data.display()
            ));
        }
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, cfg).unwrap();
        let cfg = MemberConfig::load(&path).unwrap_or_else(|p| panic!("{p}"));
        gateways.push(Gateway::start(Arc::new(cfg), Some(l)).await.unwrap());
    }
    // The hub's own identity: an organization's tools query through its own gateway,
    // which speaks for them to the other members.
    let client = Client::connect(
        &format!("https://127.0.0.1:{}", gateways[0].addr.port()),
        &ca_path,
        &certs.join("hub.crt"),
        &certs.join("hub.key"),
    )
    .unwrap();
    (gateways, client)
}

fn port_of(l: &tokio::net::TcpListener) -> u16 {
    l.local_addr().unwrap().port()
}

struct Run {
    elapsed: Duration,
    bytes: u64,
    rows: usize,
    planning_us: u64,
    cached: bool,
    bound: bool,
    optimized: bool,
}

async fn run(client: &Client, sql: &str, no_pushdown: bool, no_plan_cache: bool) -> Run {
    let t = Instant::now();
    let a = client
        .query_with(QueryRequest {
            sql: sql.into(),
            timeout_ms: 120_000,
            no_pushdown,
            no_plan_cache,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|f| panic!("{f}"));
    Run {
        elapsed: t.elapsed(),
        bytes: a.summary.bytes_received,
        rows: a.batches.iter().map(|b| b.num_rows()).sum(),
        planning_us: a.summary.planning_us,
        cached: a.summary.plan_cached,
        bound: a.summary.plan_bound,
        optimized: a.summary.plan_bound_optimized,
    }
}

/// One phase of one plan: side, where the plan came from (`text`, `bound`, `bound
/// optimized`), the phase's place and name, µs.
type Phase = (String, String, usize, String, f64);

/// The planning phases the gateways in this process report (`fedgate::planning`
/// events), of each plan made since the last `take`.
#[derive(Clone, Default)]
struct Phases(Arc<Mutex<Vec<Phase>>>);

impl Phases {
    fn take(&self) -> Vec<Phase> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Phases {
    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            side: String,
            from: String,
            phases: String,
        }
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                match f.name() {
                    "side" => self.side = v.to_string(),
                    "from" => self.from = v.to_string(),
                    _ => {}
                }
            }
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                match f.name() {
                    "phases" => self.phases = format!("{v:?}"),
                    "side" => self.side = format!("{v:?}"),
                    "from" => self.from = format!("{v:?}"),
                    _ => {}
                }
            }
        }
        let mut f = Fields::default();
        e.record(&mut f);
        let mut out = self.0.lock().unwrap();
        for (i, part) in f.phases.split_whitespace().enumerate() {
            if let Some((name, us)) = part.split_once('=') {
                let us = us.parse().unwrap_or(0.0);
                out.push((f.side.clone(), f.from.clone(), i, name.to_string(), us));
            }
        }
    }
}

/// An answer of `rows` rows shaped like the region benchmark's: a key, a county code
/// and a 40-character note.
fn answer(rows: usize) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("county_code", DataType::Utf8, false),
        Field::new("note", DataType::Utf8, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..rows as i64)),
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("33{:04}", i % COUNTIES)),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("{i:0>40}")),
            )),
        ],
    )
    .unwrap()
}

/// Medians over `rounds` rounds of 200 each of the µs to encode `batch` as the
/// coordinator encodes an answer (`fedgate::arrow_ipc::encode`: its schema, then its
/// rows), to decode those chunks again, and the chunks' bytes.
fn ipc_costs(
    rt: &tokio::runtime::Runtime,
    batch: &RecordBatch,
    rounds: usize,
) -> (f64, f64, usize) {
    use futures::StreamExt;
    let encode = || {
        let batches = futures::stream::iter(vec![Ok(batch.clone())]);
        rt.block_on(fedgate::arrow_ipc::encode(batch.schema(), batches).collect::<Vec<_>>())
            .into_iter()
            .map(|c| c.unwrap())
            .collect::<Vec<_>>()
    };
    let chunks = encode();
    let bytes = chunks.iter().map(|c| c.header.len() + c.body.len()).sum();
    let (mut enc, mut dec) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..200 {
            std::hint::black_box(encode());
        }
        enc.push(t.elapsed().as_secs_f64() * 1e6 / 200.0);
        let t = Instant::now();
        for _ in 0..200 {
            let decoded = rt.block_on(
                fedgate::arrow_ipc::decode(futures::stream::iter(
                    chunks.clone().into_iter().map(Ok),
                ))
                .collect::<Vec<_>>(),
            );
            assert_eq!(decoded.len(), 2);
            std::hint::black_box(decoded);
        }
        dec.push(t.elapsed().as_secs_f64() * 1e6 / 200.0);
    }
    (median(enc), median(dec), bytes)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(7);
    let phases = Phases::default();
    {
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry()
            .with(
                phases.clone().with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target("fedgate::planning", tracing::Level::DEBUG),
                ),
            )
            .init();
    }
    // (side, from, phase) -> µs of every plan measured.
    let mut profile: BTreeMap<(String, String, usize, String), Vec<f64>> = BTreeMap::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (_gateways, client) = start(dir.path()).await;
        let agg = "SELECT county_code, sum(x) AS total FROM readings GROUP BY county_code";
        let small = "SELECT count(*) FROM readings WHERE member = 'm1' AND x < 10";
        // Warm up both paths (connections, file caches).
        run(&client, agg, false, false).await;
        run(&client, agg, true, false).await;
        run(&client, small, false, false).await;

        let (mut byte_ratio, mut time_ratio) = (Vec::new(), Vec::new());
        let (mut with_bytes, mut without_bytes) = (0, 0);
        let mut plan_ratio = Vec::new();
        let (mut warm, mut cold, mut bound) = (Vec::new(), Vec::new(), Vec::new());
        // The small query with a new constant every time: bound from its shape.
        let mut constant = 10;
        let mut small_anew = || {
            constant += 1;
            format!("SELECT count(*) FROM readings WHERE member = 'm1' AND x < {constant}")
        };
        run(&client, &small_anew(), false, false).await;
        for r in 0..rounds {
            let (a, b) = if r % 2 == 0 {
                let a = run(&client, agg, false, false).await;
                (a, run(&client, agg, true, false).await)
            } else {
                let b = run(&client, agg, true, false).await;
                (run(&client, agg, false, false).await, b)
            };
            assert_eq!(a.rows, COUNTIES);
            assert_eq!(b.rows, COUNTIES);
            with_bytes = a.bytes;
            without_bytes = b.bytes;
            byte_ratio.push(a.bytes as f64 / b.bytes as f64);
            time_ratio.push(a.elapsed.as_secs_f64() / b.elapsed.as_secs_f64());

            // Plan cache: 20 cached and 20 uncached runs of a small query, interleaved.
            let (mut hit, mut miss) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..20 {
                let h = run(&client, small, false, false).await;
                phases.take();
                let m = run(&client, small, false, true).await;
                let b = run(&client, &small_anew(), false, false).await;
                for (side, from, i, phase, us) in phases.take() {
                    profile.entry((side, from, i, phase)).or_default().push(us);
                }
                assert!(h.cached && !m.cached && !m.bound);
                assert!(b.bound && b.optimized && !b.cached);
                hit += h.elapsed;
                miss += m.elapsed;
                warm.push(h.planning_us as f64);
                cold.push(m.planning_us as f64);
                bound.push(b.planning_us as f64);
            }
            plan_ratio.push(hit.as_secs_f64() / miss.as_secs_f64());
        }
        println!("| measure (medians of {rounds} interleaved rounds) | ratio |");
        println!("|---|---:|");
        println!(
            "| bytes received, GROUP BY over {} rows in {MEMBERS} members: with pushdown / without ({with_bytes} B / {without_bytes} B in the last round) | {:.5} |",
            MEMBERS * ROWS_PER_MEMBER,
            median(byte_ratio)
        );
        println!("| latency of that query: with pushdown / without | {:.3} |", median(time_ratio));
        println!("| latency of a small query: plan cached / planned anew | {:.3} |", median(plan_ratio));
        let (warm, cold, bound) = (median(warm), median(cold), median(bound));
        println!("| planning time of that query, warm cache / cold ({warm:.0} µs / {cold:.0} µs, medians of {} each) | {:.3} |", rounds * 20, warm / cold);
        println!("| planning time of that query with a new constant every time, bound from its shape / cold ({bound:.0} µs / {cold:.0} µs) | {:.3} |", bound / cold);
        println!();
        println!(
            "Targets: cold planning of a small query at most 1 ms: {cold:.0} µs, {}; a new constant bound from the query's shape: {bound:.0} µs, {}.",
            if cold <= 1000.0 { "**met**" } else { "**not met**" },
            if bound <= 1000.0 { "**met**" } else { "**not met**" }
        );
        println!();
        println!("Where that planning time goes (medians, µs; `fedgate::planning` events at `debug`, which is the recipe: `FEDGATE_LOG=fedgate::planning=debug`):");
        println!();
        let mut sides: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for ((side, from, _, phase), v) in &profile {
            sides
                .entry((side.clone(), from.clone()))
                .or_default()
                .push(format!("{phase} {:.0}", median(v.clone())));
        }
        for ((side, from), parts) in sides {
            let how = match from.as_str() {
                "bound optimized" => "bound into its shape's optimized plan",
                "bound" => "bound from its shape's written plan",
                _ => "planned from its text",
            };
            println!("- {side}, {how}: {}", parts.join(", "));
        }
    });
    println!();
    println!(
        "Arrow IPC at the coordinator, in process (medians of {rounds} rounds of 200; forwarding a member's answer without decoding and encoding it would save at most the encoding, and a forward checked against what the coordinator counted still decodes):"
    );
    println!();
    println!("| answer | IPC bytes | encode | decode |");
    println!("|---|---:|---:|---:|");
    for (what, rows) in [("one row", 1), ("1,000 rows", 1000)] {
        let (enc, dec, bytes) = ipc_costs(&rt, &answer(rows), rounds);
        println!("| {what} | {bytes} | {enc:.1} µs | {dec:.1} µs |");
    }
}
