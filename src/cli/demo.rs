//! `fedgate demo`: builds the sample region from the bundled public data, starts its
//! gateways (optionally a department's PostgreSQL database) and runs the demo queries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::cli::admin::shutdown_signal;
use crate::cli::query::print_answer;
use fedgate::config::MemberConfig;
use fedgate::gateway::Gateway;
use fedgate::tools::client::Client;

/// Starts a local PostgreSQL server on a free loopback port and loads the sample
/// region's databases into it.
pub(crate) async fn start_demo_database(
    source: &Path,
) -> Result<fedgate::tools::local_postgres::LocalPostgres> {
    let pg = fedgate::tools::local_postgres::LocalPostgres::launch(None).await?;
    fedgate::tools::demo::load_databases(&pg, &source.join("data")).await?;
    Ok(pg)
}

/// Starts a local MariaDB server on a free loopback port and loads the sample region's
/// MariaDB databases into it.
pub(crate) async fn start_demo_mariadb(
    source: &Path,
) -> Result<fedgate::tools::local_mariadb::LocalMariaDb> {
    let db = fedgate::tools::local_mariadb::LocalMariaDb::launch(None).await?;
    fedgate::tools::demo::load_mysql_databases(&db, &source.join("data")).await?;
    Ok(db)
}

pub(crate) async fn demo(
    dir: Option<PathBuf>,
    once: bool,
    port_base: Option<u16>,
    source: &Path,
) -> Result<ExitCode> {
    // Every gateway: the engines' (Suzhou's data lake) and the region's members'.
    let templates = fedgate::tools::demo::gateway_templates(source)
        .with_context(|| format!("reading the sample region in {}", source.display()))?;
    // Bind every gateway's port first, so the configs written name ports that are ours.
    let mut listeners = BTreeMap::new();
    let mut ports = BTreeMap::new();
    for (i, (name, template)) in templates.iter().enumerate() {
        let wanted = match port_base {
            Some(b) => b
                .checked_add(i as u16)
                .ok_or_else(|| anyhow!("--port-base too high"))?,
            None => *template,
        };
        let l = match tokio::net::TcpListener::bind(("127.0.0.1", wanted)).await {
            Ok(l) => l,
            Err(e) if port_base.is_none() => {
                eprintln!("note: port {wanted} is taken ({e}); using a free port for {name}");
                tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?
            }
            Err(e) => bail!("cannot listen on 127.0.0.1:{wanted}: {e}"),
        };
        ports.insert(name.clone(), l.local_addr()?.port());
        listeners.insert(name.clone(), l);
    }
    let (dir, _temp) = match dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new().prefix("fedgate-demo-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    // Hangzhou's pipelines live in three departments' databases (two PostgreSQL, one
    // MariaDB): start throwaway servers for them. Without one, that dataset is reported
    // unavailable at Hangzhou and everything else still runs. Suzhou's data lake (a
    // Flight SQL engine) is a gateway started below with the others.
    let mariadb = match start_demo_mariadb(source).await {
        Ok(db) => Some(db),
        Err(e) => {
            eprintln!(
                "note: no MariaDB for Hangzhou's power department ({e}); it will be reported unavailable"
            );
            None
        }
    };
    let pg = match start_demo_database(source).await {
        Ok(pg) => Some(pg),
        Err(e) => {
            eprintln!(
                "note: no PostgreSQL for Hangzhou's pipelines ({e}); they will be reported unavailable"
            );
            None
        }
    };
    let region = fedgate::tools::demo::materialize_with_database(
        source,
        &dir,
        &|name, template| {
            // HTTP ports: the gateway's port + 1000 with --port-base, PostgreSQL
            // ports + 2000; else the template's port if it is free, else any free port.
            let (member, offset) =
                match (name.strip_suffix("/http"), name.strip_suffix("/postgres")) {
                    (Some(m), _) => (m, 1000),
                    (_, Some(m)) => (m, 2000),
                    _ => return ports[name],
                };
            match port_base {
                Some(_) => ports[member].saturating_add(offset),
                None if std::net::TcpListener::bind(("127.0.0.1", template)).is_ok() => template,
                None => 0,
            }
        },
        &fedgate::tools::demo::DatabaseServers {
            postgres: pg.as_ref().map(|p| (p.port, p.password.clone())),
            mysql: mariadb.as_ref().map(|d| (d.port, d.password.clone())),
        },
    )?;
    let mut gateways = Vec::new();
    for (name, path, _) in &region.gateways {
        let cfg = MemberConfig::load(path).map_err(|p| anyhow!("invalid configuration:\n{p}"))?;
        let l = listeners
            .remove(name)
            .ok_or_else(|| anyhow!("no listener for {name}"))?;
        gateways.push(Gateway::start(Arc::new(cfg), Some(l)).await?);
    }
    println!("fedgate demo: region yrd in {}", dir.display());
    for ((name, path, endpoint), g) in region.gateways.iter().zip(&gateways) {
        println!(
            "  {name:<12} {endpoint}   (fedgate serve --config {})",
            path.display()
        );
        if let Some(h) = g.http_addr {
            let tls = MemberConfig::load(path)
                .ok()
                .and_then(|c| c.http)
                .is_some_and(|h| h.tls);
            let url = if tls {
                format!("https://{h}/ (mutual TLS: a client certificate is needed)")
            } else {
                format!("http://{h}/ (loopback; callers act as {name})")
            };
            println!("               status board, /metrics, JSON API: {url}");
        }
    }
    let (client_name, cert, key) = region
        .clients
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("the sample region has no office identity"))?;
    // The office queries through its own gateway, which speaks for it to the owners.
    let gateway = region
        .gateways
        .iter()
        .find(|(n, _, _)| *n == client_name)
        .map(|(_, _, e)| e.clone())
        .ok_or_else(|| anyhow!("the office {client_name} has no gateway"))?;
    println!("\nQuery the region as the regional office ({client_name}):");
    println!("  export FEDGATE_GATEWAY={gateway}");
    println!("  export FEDGATE_CA={}", region.ca.display());
    println!("  export FEDGATE_CERT={}", cert.display());
    println!("  export FEDGATE_KEY={}", key.display());
    println!("  fedgate query \"SELECT member, count(*) FROM fever_clinics GROUP BY member\"");

    let client = Client::connect(&gateway, &region.ca, &cert, &key)?;
    let mut failures = 0;
    for (title, sql) in fedgate::tools::demo::EXAMPLES {
        println!("\n== {title}\n{sql}");
        // Without a database server, Hangzhou's pipelines are unavailable: the
        // example then shows a partial answer that says so, rather than failing.
        let partial = (pg.is_none() || mariadb.is_none()) && sql.contains("underground_pipelines");
        match client
            .query(sql, partial, Some(Duration::from_secs(30)))
            .await
        {
            Ok(a) => print_answer(&a)?,
            Err(f) => {
                failures += 1;
                println!("query failed: {f}");
            }
        }
    }
    println!("\n\n### The data owners' access rules at work (enrollment: generated people)");
    for ex in fedgate::tools::demo::ACCESS_EXAMPLES {
        let certs = dir.join("certs");
        let endpoint = region
            .gateways
            .iter()
            .find(|(n, _, _)| n == ex.gateway)
            .map(|(_, _, e)| e.clone())
            .ok_or_else(|| anyhow!("no gateway {}", ex.gateway))?;
        let client = Client::connect(
            &endpoint,
            &region.ca,
            &certs.join(format!("{}.crt", ex.caller)),
            &certs.join(format!("{}.key", ex.caller)),
        )?;
        let purpose = if ex.purpose.is_empty() {
            String::new()
        } else {
            format!(" --purpose '{}'", ex.purpose)
        };
        println!(
            "\n== {}\n(as {} via {}{purpose})\n{}",
            ex.title, ex.caller, ex.gateway, ex.sql
        );
        let req = fedgate::proto::v1::QueryRequest {
            sql: ex.sql.to_string(),
            purpose: ex.purpose.to_string(),
            timeout_ms: 30_000,
            ..Default::default()
        };
        match (client.query_with(req).await, ex.refused) {
            (Ok(a), false) => print_answer(&a)?,
            (Err(f), true) => println!("refused, as the rules say: {f}"),
            (Ok(a), true) => {
                failures += 1;
                print_answer(&a)?;
                println!("UNEXPECTED: this should have been refused");
            }
            (Err(f), false) => {
                failures += 1;
                println!("query failed: {f}");
            }
        }
    }
    if once {
        for g in gateways {
            g.shutdown().await;
        }
        if failures > 0 {
            bail!("{failures} example queries failed");
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!("\nServing until interrupted (Ctrl-C).");
    shutdown_signal().await;
    for g in gateways {
        g.shutdown().await;
    }
    Ok(ExitCode::SUCCESS)
}
