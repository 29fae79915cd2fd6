//! MySQL-protocol source benchmark: a member in front of MariaDB against MariaDB
//! itself, side by side.
//!
//! Starts a throwaway MariaDB server on loopback (`fedgate::tools::local_mariadb`) with
//! one table of 1,000,000 generated rows (`id` primary key, 100 county codes, an
//! integer `x`), and one gateway whose `readings` dataset maps that table. A client
//! calls the gateway over gRPC and mutual TLS, like any caller; the direct variant is
//! a mysql_async connection sending the same SQL to the same server. Each round runs
//! both variants, alternating which goes first:
//!
//! - `SELECT county_code, sum(x) ... GROUP BY county_code` over the 1,000,000 rows;
//! - a primary-key lookup (`WHERE id = N`, N different every time).
//!
//! Prints medians of per-round ratios as Markdown. Run: `cargo bench --bench mysql`
//! (`-- --rounds N` for more rounds).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedgate::config::MemberConfig;
use fedgate::gateway::Gateway;
use fedgate::tools::client::Client;
use fedgate::tools::local_mariadb::LocalMariaDb;
use fedgate::trust::identity::{Kind, Principal};
use fedgate::trust::pki::{self, Ca};
use mysql_async::prelude::Queryable;

const ROWS: i64 = 1_000_000;
const LOOKUPS_PER_ROUND: usize = 25;

async fn start(dir: &Path, db: &LocalMariaDb) -> (Gateway, Client) {
    let ca = Ca::generate("bench").unwrap();
    let certs = dir.join("certs");
    let (ca_path, _) = pki::write_ca(&ca, &certs).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    std::fs::write(
        dir.join("region.toml"),
        format!(
            "region = \"bench\"\nca = \"{}\"\n\
             [[members]]\nname = \"m1\"\nkind = \"city\"\nendpoint = \"https://127.0.0.1:{port}\"\nserves = [\"readings\"]\n\
             [[members]]\nname = \"analyst\"\nkind = \"office\"\n\
             [[datasets]]\nname = \"readings\"\nfields = [ {{ name = \"id\", type = \"int64\" }}, \
             {{ name = \"county_code\", type = \"utf8\" }}, {{ name = \"x\", type = \"int64\" }} ]\n",
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
    db.write_password(&dir.join("db.password")).unwrap();
    let path = dir.join("m1.toml");
    std::fs::write(
        &path,
        format!(
            "member = \"m1\"\nregion = \"region.toml\"\nlisten = \"127.0.0.1:{port}\"\n\
             cert = \"certs/m1.crt\"\nkey = \"certs/m1.key\"\n\
             [[databases]]\nname = \"readings_db\"\nkind = \"mysql\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"bench\"\n\
             user = \"{}\"\npassword_file = \"db.password\"\n\
             [[sources]]\nname = \"readings\"\nformat = \"mysql\"\ndatabase = \"readings_db\"\ntable = \"readings\"\n\
             [[mappings]]\ndataset = \"readings\"\nsource = \"readings\"\n\
             fields.id = \"id\"\nfields.county_code = \"county_code\"\nfields.x = \"x\"\n\
             [[access]]\nprincipals = [\"fedgate://bench/*\"]\ndatasets = [\"*\"]\nlevel = \"rows\"\n",
            db.port, db.user
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

async fn through(client: &Client, sql: &str) -> (Duration, usize) {
    let t = Instant::now();
    let a = client
        .query(sql, false, Some(Duration::from_secs(120)))
        .await
        .unwrap_or_else(|f| panic!("{f}"));
    (t.elapsed(), a.batches.iter().map(|b| b.num_rows()).sum())
}

async fn direct(db: &mut mysql_async::Conn, sql: &str) -> (Duration, usize) {
    let t = Instant::now();
    let rows: Vec<mysql_async::Row> = db.query(sql).await.unwrap();
    (t.elapsed(), rows.len())
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
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let server = LocalMariaDb::launch(None).await.unwrap();
        // MariaDB's SEQUENCE engine (`seq_1_to_N`) generates the rows.
        server
            .execute(&format!(
                "CREATE DATABASE bench; \
                 CREATE TABLE bench.readings (id BIGINT PRIMARY KEY, county_code VARCHAR(8) NOT NULL, \
                   x BIGINT NOT NULL); \
                 INSERT INTO bench.readings SELECT seq, CONCAT('33', LPAD(seq % 100, 4, '0')), \
                   (seq * 7919) % 10000 FROM seq_1_to_{ROWS}; \
                 ANALYZE TABLE bench.readings"
            ))
            .await
            .unwrap();
        let mut db = server.connect(None).await.unwrap();
        db.query_drop("USE bench").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (_gateway, client) = start(dir.path(), &server).await;

        let agg = "SELECT county_code, sum(x) AS total FROM readings GROUP BY county_code";
        let e = client.explain(agg).await.unwrap();
        let pushed: Vec<&str> = e.database_statements.iter().map(|s| s.sql.as_str()).collect();
        assert!(
            pushed.len() == 1 && pushed[0].contains("GROUP BY"),
            "the aggregate must run in MariaDB: {pushed:?}"
        );
        // Warm up both paths (connections, caches).
        for _ in 0..2 {
            through(&client, agg).await;
            direct(&mut db, agg).await;
        }
        let mut agg_ratio = Vec::new();
        let (mut agg_gw, mut agg_db) = (Vec::new(), Vec::new());
        let mut pk_ratio = Vec::new();
        let (mut pk_gw, mut pk_db) = (Vec::new(), Vec::new());
        let mut next_id = 1i64;
        for round in 0..rounds {
            let order = if round % 2 == 0 { [true, false] } else { [false, true] };
            let (mut g, mut d) = (Duration::ZERO, Duration::ZERO);
            for gw in order {
                if gw {
                    let (t, n) = through(&client, agg).await;
                    assert_eq!(n, 100);
                    g = t;
                } else {
                    let (t, n) = direct(&mut db, agg).await;
                    assert_eq!(n, 100);
                    d = t;
                }
            }
            agg_ratio.push(g.as_secs_f64() / d.as_secs_f64());
            agg_gw.push(g.as_secs_f64() * 1e3);
            agg_db.push(d.as_secs_f64() * 1e3);

            let (mut gs, mut ds) = (Vec::new(), Vec::new());
            for i in 0..LOOKUPS_PER_ROUND {
                next_id = (next_id * 48_271) % ROWS + 1;
                let sql = format!("SELECT id, county_code, x FROM readings WHERE id = {next_id}");
                let pair = if (round + i) % 2 == 0 { [true, false] } else { [false, true] };
                for gw in pair {
                    if gw {
                        let (t, n) = through(&client, &sql).await;
                        assert_eq!(n, 1);
                        gs.push(t.as_secs_f64());
                    } else {
                        let (t, n) = direct(&mut db, &sql).await;
                        assert_eq!(n, 1);
                        ds.push(t.as_secs_f64());
                    }
                }
            }
            let (g, d) = (median(gs), median(ds));
            pk_ratio.push(g / d);
            pk_gw.push(g * 1e3);
            pk_db.push(d * 1e3);
            eprintln!(
                "round {round}: GROUP BY {:.1} ms / {:.1} ms, lookup {:.3} ms / {:.3} ms",
                agg_gw[round], agg_db[round], pk_gw[round], pk_db[round]
            );
        }
        println!("| measure (medians of {rounds} interleaved rounds) | through the member | directly | ratio |");
        println!("|---|---:|---:|---:|");
        println!(
            "| GROUP BY county over 1,000,000 rows in MariaDB | {:.1} ms | {:.1} ms | {:.2} |",
            median(agg_gw),
            median(agg_db),
            median(agg_ratio)
        );
        println!(
            "| primary-key lookup (median of {LOOKUPS_PER_ROUND} per round) | {:.3} ms | {:.3} ms | {:.2} |",
            median(pk_gw),
            median(pk_db),
            median(pk_ratio)
        );
        println!("\nSQL the member sent to MariaDB for the GROUP BY:\n\n    {}", pushed[0]);
    });
}
