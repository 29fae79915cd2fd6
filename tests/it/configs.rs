//! Every configuration shipped in `federation-configs/` passes `fedgate check`.

#[tokio::test]
async fn every_shipped_config_passes_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("federation-configs");
    // Hangzhou's pipelines are in PostgreSQL: check reads them from a live server.
    let pg = fedgate::tools::local_postgres::LocalPostgres::launch(None)
        .await
        .unwrap();
    let mariadb = fedgate::tools::local_mariadb::LocalMariaDb::launch(None)
        .await
        .unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let src = entry.unwrap().path();
        if !src.join("region.toml").is_file() {
            continue;
        }
        // Certificates are generated per run, never committed.
        let dir = tempfile::tempdir().unwrap();
        fedgate::tools::demo::load_databases(&pg, &src.join("data"))
            .await
            .unwrap();
        fedgate::tools::demo::load_mysql_databases(&mariadb, &src.join("data"))
            .await
            .unwrap();
        // The engines' gateways (not checked by member ports) listen on free ports.
        let mut listeners = std::collections::BTreeMap::new();
        for (name, _) in fedgate::tools::demo::gateway_templates(&src).unwrap() {
            if name.contains('/') {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                listeners.insert(name, l);
            }
        }
        let engine_ports: std::collections::BTreeMap<String, u16> = listeners
            .iter()
            .map(|(n, l)| (n.clone(), l.local_addr().unwrap().port()))
            .collect();
        let m = fedgate::tools::demo::materialize_with_database(
            &src,
            dir.path(),
            &|name, p| engine_ports.get(name).copied().unwrap_or(p),
            &fedgate::tools::demo::DatabaseServers {
                postgres: Some((pg.port, pg.password.clone())),
                mysql: Some((mariadb.port, mariadb.password.clone())),
            },
        )
        .unwrap();
        // The engines members read over Flight SQL (Suzhou's data lake) must answer
        // for their members' checks to read every row.
        let mut engines = Vec::new();
        for (name, path, _) in m.gateways.iter().filter(|(n, _, _)| n.contains('/')) {
            let cfg = fedgate::config::MemberConfig::load(path).unwrap_or_else(|p| panic!("{p}"));
            engines.push(
                fedgate::gateway::Gateway::start(std::sync::Arc::new(cfg), listeners.remove(name))
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
            );
        }
        for (name, path, _) in &m.gateways {
            let r = fedgate::tools::check::check(path).await;
            assert!(
                r.errors.is_empty(),
                "{}/{name}: {:?}",
                src.display(),
                r.errors
            );
            assert!(
                r.warnings.is_empty(),
                "{}/{name}: {:?}",
                src.display(),
                r.warnings
            );
            assert!(
                r.checked
                    .iter()
                    .any(|c| c.contains("chains to the region CA")),
                "{:?}",
                r.checked
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} member configs found");
}

/// A gateway whose log goes to a file writes plain text: no terminal colour codes.
#[tokio::test]
async fn a_log_written_to_a_file_has_no_colour_codes() {
    let region = crate::support::Region::start_only(Some(&[])).await;
    let (_, config, _) = region
        .layout
        .gateways
        .iter()
        .find(|(name, _, _)| name == "anji")
        .unwrap()
        .clone();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("anji.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fedgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("FEDGATE_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut log = String::new();
    while started.elapsed() < std::time::Duration::from_secs(60) {
        log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("serving on") || child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        log.contains("serving on"),
        "the gateway did not start:\n{log}"
    );
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log:?}"
    );
}
