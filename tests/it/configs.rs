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
        let m = fedgate::tools::demo::materialize_with_database(
            &src,
            dir.path(),
            &|_, p| p,
            &fedgate::tools::demo::DatabaseServers {
                postgres: Some((pg.port, pg.password.clone())),
                mysql: Some((mariadb.port, mariadb.password.clone())),
            },
        )
        .unwrap();
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
