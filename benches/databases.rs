//! Database source benchmark: a member in front of a database against the database
//! itself, side by side, for PostgreSQL and for MariaDB (the MySQL protocol) in one run.
//!
//! Starts a throwaway PostgreSQL server (`fedgate::tools::local_postgres`) and a
//! throwaway MariaDB server (`fedgate::tools::local_mariadb`) on loopback, each with one
//! table of 1,000,000 generated rows (`id` primary key, 100 county codes, an integer
//! `x`, the same values in both), and one gateway whose datasets `readings_pg` and
//! `readings_my` map those tables. A client calls the gateway over gRPC and mutual TLS,
//! like any caller; the direct variant sends the same SQL over one connection of the
//! database's own client (tokio-postgres, mysql_async) to the same server. Each round
//! runs both variants for both databases, alternating which goes first:
//!
//! - `SELECT county_code, sum(x) ... GROUP BY county_code` over the 1,000,000 rows
//!   (the benchmark checks through Explain that the whole aggregate runs in the
//!   database);
//! - a primary-key lookup (`WHERE id = N`, N different every time).
//!
//! Prints medians of per-round values and ratios as Markdown. Run:
//! `cargo bench --bench databases` (`-- --rounds N` for more rounds).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedgate::config::MemberConfig;
use fedgate::gateway::Gateway;
use fedgate::tools::client::Client;
use fedgate::tools::local_mariadb::LocalMariaDb;
use fedgate::tools::local_postgres::LocalPostgres;
use fedgate::trust::identity::{Kind, Principal};
use fedgate::trust::pki::{self, Ca};
use mysql_async::prelude::Queryable;

const ROWS: i64 = 1_000_000;
const LOOKUPS_PER_ROUND: usize = 25;

/// One database reached directly, with its own client.
enum Direct {
    Postgres(tokio_postgres::Client),
    MySql(mysql_async::Conn),
}

impl Direct {
    /// Runs `sql` and returns the time until the last row arrived and the row count.
    async fn run(&mut self, sql: &str) -> (Duration, usize) {
        let t = Instant::now();
        let n = match self {
            Direct::Postgres(c) => c.query(sql, &[]).await.unwrap().len(),
            Direct::MySql(c) => {
                let rows: Vec<mysql_async::Row> = c.query(sql).await.unwrap();
                rows.len()
            }
        };
        (t.elapsed(), n)
    }
}

/// One database under test: what the table is called in the gateway, the engine's
/// name, and its direct connection.
struct Engine {
    dataset: &'static str,
    name: &'static str,
    direct: Direct,
}

async fn start(dir: &Path, pg: &LocalPostgres, my: &LocalMariaDb) -> (Gateway, Client) {
    let ca = Ca::generate("bench").unwrap();
    let certs = dir.join("certs");
    let (ca_path, _) = pki::write_ca(&ca, &certs).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let fields = "fields = [ { name = \"id\", type = \"int64\" }, \
                  { name = \"county_code\", type = \"utf8\" }, { name = \"x\", type = \"int64\" } ]";
    std::fs::write(
        dir.join("region.toml"),
        format!(
            "region = \"bench\"\nca = \"{}\"\n\
             [[members]]\nname = \"m1\"\nkind = \"city\"\nendpoint = \"https://127.0.0.1:{port}\"\n\
             serves = [\"readings_pg\", \"readings_my\"]\n\
             [[members]]\nname = \"analyst\"\nkind = \"office\"\n\
             [[datasets]]\nname = \"readings_pg\"\n{fields}\n\
             [[datasets]]\nname = \"readings_my\"\n{fields}\n",
            ca_path.display()
        ),
    )
    .unwrap();
    for (name, kind) in [("m1", Kind::City), ("analyst", Kind::Office)] {
        let p = Principal::new("bench", kind, name).unwrap();
        pki::write_issued(
            &ca.issue(&p, &pki::default_hosts(), 2).unwrap(),
            &certs,
            name,
        )
        .unwrap();
    }
    pg.write_password(&dir.join("pg.password")).unwrap();
    my.write_password(&dir.join("my.password")).unwrap();
    let path = dir.join("m1.toml");
    std::fs::write(
        &path,
        format!(
            "member = \"m1\"\nregion = \"region.toml\"\nlisten = \"127.0.0.1:{port}\"\n\
             cert = \"certs/m1.crt\"\nkey = \"certs/m1.key\"\n\
             [[databases]]\nname = \"pg_db\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"bench\"\n\
             user = \"{}\"\npassword_file = \"pg.password\"\n\
             [[databases]]\nname = \"my_db\"\nkind = \"mysql\"\nhost = \"127.0.0.1\"\nport = {}\n\
             dbname = \"bench\"\nuser = \"{}\"\npassword_file = \"my.password\"\n\
             [[sources]]\nname = \"pg_readings\"\nformat = \"postgres\"\ndatabase = \"pg_db\"\ntable = \"public.readings\"\n\
             [[sources]]\nname = \"my_readings\"\nformat = \"mysql\"\ndatabase = \"my_db\"\ntable = \"readings\"\n\
             [[mappings]]\ndataset = \"readings_pg\"\nsource = \"pg_readings\"\n\
             fields.id = \"id\"\nfields.county_code = \"county_code\"\nfields.x = \"x\"\n\
             [[mappings]]\ndataset = \"readings_my\"\nsource = \"my_readings\"\n\
             fields.id = \"id\"\nfields.county_code = \"county_code\"\nfields.x = \"x\"\n\
             [[access]]\nprincipals = [\"fedgate://bench/*\"]\ndatasets = [\"*\"]\nlevel = \"rows\"\n",
            pg.port, pg.user, my.port, my.user
        ),
    )
    .unwrap();
    let cfg = MemberConfig::load(&path).unwrap_or_else(|p| panic!("{p}"));
    let gateway = Gateway::start(Arc::new(cfg), Some(l)).await.unwrap();
    let client = Client::connect(
        &format!("https://127.0.0.1:{port}"),
        &ca_path,
        &certs.join("analyst.crt"),
        &certs.join("analyst.key"),
    )
    .unwrap();
    (gateway, client)
}

/// Both servers with the same 1,000,000 rows, and a connection to each.
async fn load(pg: &LocalPostgres, my: &LocalMariaDb) -> Vec<Engine> {
    pg.connect("postgres")
        .await
        .unwrap()
        .batch_execute("CREATE DATABASE bench")
        .await
        .unwrap();
    let pg_db = pg.connect("bench").await.unwrap();
    pg_db
        .batch_execute(&format!(
            "CREATE TABLE readings (id int8 PRIMARY KEY, county_code text NOT NULL, x int8 NOT NULL); \
             INSERT INTO readings SELECT i, '33' || lpad((i % 100)::text, 4, '0'), (i::int8 * 7919) % 10000 \
             FROM generate_series(1, {ROWS}) AS i"
        ))
        .await
        .unwrap();
    // VACUUM cannot share a statement batch (it refuses to run in a transaction).
    pg_db
        .batch_execute("VACUUM ANALYZE readings")
        .await
        .unwrap();
    // MariaDB's SEQUENCE engine (`seq_1_to_N`) generates the same rows.
    my.execute(&format!(
        "CREATE DATABASE bench; \
         CREATE TABLE bench.readings (id BIGINT PRIMARY KEY, county_code VARCHAR(8) NOT NULL, \
           x BIGINT NOT NULL); \
         INSERT INTO bench.readings SELECT seq, CONCAT('33', LPAD(seq % 100, 4, '0')), \
           (seq * 7919) % 10000 FROM bench.seq_1_to_{ROWS}; \
         ANALYZE TABLE bench.readings"
    ))
    .await
    .unwrap();
    let mut my_db = my.connect(None).await.unwrap();
    my_db.query_drop("USE bench").await.unwrap();
    vec![
        Engine {
            dataset: "readings_pg",
            name: "PostgreSQL",
            direct: Direct::Postgres(pg_db),
        },
        Engine {
            dataset: "readings_my",
            name: "MariaDB",
            direct: Direct::MySql(my_db),
        },
    ]
}

async fn through(client: &Client, sql: &str) -> (Duration, usize) {
    let t = Instant::now();
    let a = client
        .query(sql, false, Some(Duration::from_secs(120)))
        .await
        .unwrap_or_else(|f| panic!("{f}"));
    (t.elapsed(), a.batches.iter().map(|b| b.num_rows()).sum())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Per-round figures of one engine.
#[derive(Default)]
struct Figures {
    agg_gw: Vec<f64>,
    agg_db: Vec<f64>,
    agg_ratio: Vec<f64>,
    pk_gw: Vec<f64>,
    pk_db: Vec<f64>,
    pk_ratio: Vec<f64>,
}

fn main() {
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(7);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (pg, my) = tokio::join!(LocalPostgres::launch(None), LocalMariaDb::launch(None));
        let (pg, my) = (pg.unwrap(), my.unwrap());
        let mut engines = load(&pg, &my).await;
        let dir = tempfile::tempdir().unwrap();
        let (_gateway, client) = start(dir.path(), &pg, &my).await;

        let agg =
            |ds: &str| format!("SELECT county_code, sum(x) AS total FROM {ds} GROUP BY county_code");
        let direct_agg = "SELECT county_code, sum(x) AS total FROM readings GROUP BY county_code";
        let mut pushed = Vec::new();
        for e in &mut engines {
            let x = client.explain(&agg(e.dataset)).await.unwrap();
            let sql: Vec<&str> = x.database_statements.iter().map(|s| s.sql.as_str()).collect();
            assert!(
                sql.len() == 1 && sql[0].contains("GROUP BY"),
                "the aggregate must run in {}: {sql:?}",
                e.name
            );
            pushed.push(sql[0].to_string());
            // Warm up both paths (connections, caches).
            for _ in 0..2 {
                through(&client, &agg(e.dataset)).await;
                e.direct.run(direct_agg).await;
            }
        }
        let mut figures: Vec<Figures> = engines.iter().map(|_| Figures::default()).collect();
        let mut next_id = 1i64;
        for round in 0..rounds {
            for (e, f) in engines.iter_mut().zip(&mut figures) {
                let order = if round % 2 == 0 { [true, false] } else { [false, true] };
                let (mut g, mut d) = (Duration::ZERO, Duration::ZERO);
                for gw in order {
                    let (t, n) = if gw {
                        through(&client, &agg(e.dataset)).await
                    } else {
                        e.direct.run(direct_agg).await
                    };
                    assert_eq!(n, 100);
                    *(if gw { &mut g } else { &mut d }) = t;
                }
                f.agg_ratio.push(g.as_secs_f64() / d.as_secs_f64());
                f.agg_gw.push(g.as_secs_f64() * 1e3);
                f.agg_db.push(d.as_secs_f64() * 1e3);

                let (mut gs, mut ds) = (Vec::new(), Vec::new());
                for i in 0..LOOKUPS_PER_ROUND {
                    next_id = (next_id * 48_271) % ROWS + 1;
                    let cols = "SELECT id, county_code, x FROM";
                    let pair = if (round + i) % 2 == 0 { [true, false] } else { [false, true] };
                    for gw in pair {
                        let (t, n) = if gw {
                            through(&client, &format!("{cols} {} WHERE id = {next_id}", e.dataset))
                                .await
                        } else {
                            e.direct
                                .run(&format!("{cols} readings WHERE id = {next_id}"))
                                .await
                        };
                        assert_eq!(n, 1);
                        if gw { &mut gs } else { &mut ds }.push(t.as_secs_f64());
                    }
                }
                let (g, d) = (median(gs), median(ds));
                f.pk_ratio.push(g / d);
                f.pk_gw.push(g * 1e3);
                f.pk_db.push(d * 1e3);
                eprintln!(
                    "round {round}, {}: GROUP BY {:.1} ms / {:.1} ms, lookup {:.3} ms / {:.3} ms",
                    e.name, f.agg_gw[round], f.agg_db[round], f.pk_gw[round], f.pk_db[round]
                );
            }
        }
        println!(
            "| measure (medians of {rounds} interleaved rounds) | through the member | directly | ratio |"
        );
        println!("|---|---:|---:|---:|");
        for (e, f) in engines.iter().zip(figures) {
            println!(
                "| {}: GROUP BY county over 1,000,000 rows | {:.1} ms | {:.1} ms | {:.2} |",
                e.name,
                median(f.agg_gw),
                median(f.agg_db),
                median(f.agg_ratio)
            );
            println!(
                "| {}: primary-key lookup (median of {LOOKUPS_PER_ROUND} per round) | {:.3} ms | {:.3} ms | {:.2} |",
                e.name,
                median(f.pk_gw),
                median(f.pk_db),
                median(f.pk_ratio)
            );
        }
        for (e, sql) in engines.iter().zip(&pushed) {
            println!("\nSQL the member sent to {} for the GROUP BY:\n\n    {sql}", e.name);
        }
    });
}
