//! Starting a sample region in process, on ephemeral loopback ports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedgate::config::MemberConfig;
use fedgate::gateway::Gateway;
use fedgate::tools::client::Client;
use fedgate::tools::demo::Materialized;

/// The sample region's office, which has a gateway of its own.
pub const OFFICE: &str = "coordination";

/// A running region and the folder holding its configs and certificates.
pub struct Region {
    pub dir: tempfile::TempDir,
    pub layout: Materialized,
    pub gateways: BTreeMap<String, Gateway>,
    /// The local PostgreSQL server behind Hangzhou's pipelines, when started.
    pub pg: Option<fedgate::tools::local_postgres::LocalPostgres>,
    /// The local MariaDB server behind Hangzhou's power department, when started.
    pub mariadb: Option<fedgate::tools::local_mariadb::LocalMariaDb>,
}

impl Region {
    /// Materializes the bundled sample region and starts every gateway in it.
    pub async fn start() -> Region {
        Self::start_only(None).await
    }

    /// Starts only the named gateways (all when `None`); the others' ports stay
    /// reserved in the region file but nothing listens there.
    pub async fn start_only(only: Option<&[&str]>) -> Region {
        Self::start_patched(only, &|_| {}).await
    }

    /// Like [`Region::start_only`], after `patch` has edited the materialized files.
    pub async fn start_patched(only: Option<&[&str]>, patch: &dyn Fn(&Materialized)) -> Region {
        Self::start_full(only, patch, false).await
    }

    /// Like [`Region::start_patched`], with Hangzhou's pipeline databases on local
    /// PostgreSQL and MariaDB servers (started, loaded, and stopped when the region is
    /// dropped).
    pub async fn start_with_database(
        only: Option<&[&str]>,
        patch: &dyn Fn(&Materialized),
    ) -> Region {
        Self::start_full(only, patch, true).await
    }

    async fn start_full(
        only: Option<&[&str]>,
        patch: &dyn Fn(&Materialized),
        database: bool,
    ) -> Region {
        let (pg, mariadb) = if database {
            let data = fedgate::tools::demo::default_source().join("data");
            let (pg, mariadb) = tokio::join!(
                fedgate::tools::local_postgres::LocalPostgres::launch(None),
                fedgate::tools::local_mariadb::LocalMariaDb::launch(None)
            );
            let (pg, mariadb) = (pg.unwrap(), mariadb.unwrap());
            fedgate::tools::demo::load_databases(&pg, &data)
                .await
                .unwrap();
            fedgate::tools::demo::load_mysql_databases(&mariadb, &data)
                .await
                .unwrap();
            (Some(pg), Some(mariadb))
        } else {
            (None, None)
        };
        let dir = tempfile::tempdir().unwrap();
        let mut listeners = BTreeMap::new();
        for (name, _) in
            fedgate::tools::demo::gateway_templates(&fedgate::tools::demo::default_source())
                .unwrap()
        {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.insert(name, l);
        }
        let ports: BTreeMap<String, u16> = listeners
            .iter()
            .map(|(n, l)| (n.clone(), l.local_addr().unwrap().port()))
            .collect();
        let layout = fedgate::tools::demo::materialize_with_database(
            &fedgate::tools::demo::default_source(),
            dir.path(),
            // HTTP ports: 0, a free one picked by each gateway.
            &|name, _| ports.get(name).copied().unwrap_or(0),
            &fedgate::tools::demo::DatabaseServers {
                postgres: pg.as_ref().map(|p| (p.port, p.password.clone())),
                mysql: mariadb.as_ref().map(|d| (d.port, d.password.clone())),
            },
        )
        .unwrap();
        patch(&layout);
        let mut gateways = BTreeMap::new();
        for (name, path, _) in &layout.gateways {
            let l = listeners.remove(name).unwrap();
            // The office's own gateway always runs: it vouches for the office's
            // queries through the others. So do the engines members read (Suzhou's
            // data lake, `lake/warehouse`), which are not members of the region.
            if name != OFFICE
                && !name.contains('/')
                && only.is_some_and(|o| !o.contains(&name.as_str()))
            {
                drop(l);
                continue;
            }
            let cfg = MemberConfig::load(path).unwrap_or_else(|p| panic!("{p}"));
            gateways.insert(
                name.clone(),
                Gateway::start(Arc::new(cfg), Some(l)).await.unwrap(),
            );
        }
        Region {
            dir,
            layout,
            gateways,
            pg,
            mariadb,
        }
    }

    /// The endpoint of a member gateway.
    pub fn endpoint(&self, member: &str) -> String {
        self.layout
            .gateways
            .iter()
            .find(|(n, _, _)| n == member)
            .map(|(_, _, e)| e.clone())
            .unwrap()
    }

    /// The regional office's certificate and key.
    pub fn office(&self) -> (PathBuf, PathBuf) {
        let (_, c, k) = self.layout.clients[0].clone();
        (c, k)
    }

    /// A client of `member`'s gateway as the regional office. Through any gateway but
    /// the office's own, the office's gateway vouches for each query.
    pub fn client(&self, member: &str) -> Client {
        let (cert, key) = self.office();
        let client = Client::connect(&self.endpoint(member), &self.layout.ca, &cert, &key).unwrap();
        if member == OFFICE {
            return client;
        }
        client.with_home(
            Client::connect(&self.endpoint(OFFICE), &self.layout.ca, &cert, &key).unwrap(),
        )
    }

    /// A client of `member`'s gateway as the regional office, without its gateway's
    /// assertion (what a gateway forwarding on its own authority looks like).
    pub fn client_unvouched(&self, member: &str) -> Client {
        let (cert, key) = self.office();
        Client::connect(&self.endpoint(member), &self.layout.ca, &cert, &key).unwrap()
    }

    /// A client of `gateway` using the certificate of region member `who` (members'
    /// gateway certificates are also client certificates).
    /// Through another member's gateway, `who`'s own gateway vouches for each query.
    pub fn client_as(&self, who: &str, gateway: &str) -> Client {
        let client = self.client_as_unvouched(who, gateway);
        let has_gateway = self.layout.gateways.iter().any(|(n, _, _)| n == who);
        if who == gateway || !has_gateway {
            return client;
        }
        client.with_home(self.client_as_unvouched(who, who))
    }

    /// A client of `gateway` as `who`, without assertions from `who`'s gateway.
    pub fn client_as_unvouched(&self, who: &str, gateway: &str) -> Client {
        let certs = self.layout.dir.join("certs");
        Client::connect(
            &self.endpoint(gateway),
            &self.layout.ca,
            &certs.join(format!("{who}.crt")),
            &certs.join(format!("{who}.key")),
        )
        .unwrap()
    }

    /// The canonical rows of `member` as its own operator sees them (no access rule
    /// applies), read directly from its files: the truth answers are checked against.
    pub async fn owner_rows(
        &self,
        member: &str,
        sql: &str,
    ) -> Vec<datafusion::arrow::record_batch::RecordBatch> {
        let path = self.layout.dir.join(format!("{member}.toml"));
        let cfg = Arc::new(MemberConfig::load(&path).unwrap_or_else(|p| panic!("{p}")));
        let engine = fedgate::owner::member::MemberEngine::build(cfg)
            .await
            .unwrap();
        let prepared = engine.prepare(sql).await.unwrap();
        let permit = engine.owner_permit(&prepared);
        let stream = engine.execute(&permit, prepared).await.unwrap().stream;
        futures::TryStreamExt::try_collect(stream).await.unwrap()
    }

    /// The audit log of `member`'s gateway.
    pub fn audit_log(&self, member: &str) -> PathBuf {
        self.layout.dir.join("audit").join(format!("{member}.log"))
    }

    /// The certificate and key of region member `who`, with the region CA.
    pub fn material(&self, who: &str) -> fedgate::trust::tls::TlsMaterial {
        let certs = self.layout.dir.join("certs");
        fedgate::trust::tls::TlsMaterial::load(
            &self.layout.ca,
            &certs.join(format!("{who}.crt")),
            &certs.join(format!("{who}.key")),
        )
        .unwrap()
    }

    /// The CA of the region, for issuing extra certificates.
    pub fn ca(&self) -> fedgate::trust::pki::Ca {
        let certs = self.layout.dir.join("certs");
        fedgate::trust::pki::Ca::load(&certs.join("ca.crt"), &certs.join("ca.key")).unwrap()
    }

    /// Starts the sample region with each named member reached through its own
    /// fault-injecting proxy: the region file's endpoint of the member points at the
    /// proxy, which forwards to the port the member's gateway listens on. Callers
    /// reach every gateway directly.
    pub async fn start_behind_proxies(
        members: &[&str],
        patch: &dyn Fn(&Materialized),
    ) -> (Region, BTreeMap<String, crate::proxy::FaultProxy>) {
        let mut proxies = BTreeMap::new();
        for m in members {
            proxies.insert(m.to_string(), crate::proxy::FaultProxy::start().await);
        }
        let route = |layout: &Materialized| {
            let path = layout.dir.join("region.toml");
            let mut text = std::fs::read_to_string(&path).unwrap();
            for (m, proxy) in &proxies {
                let (_, _, endpoint) = layout.gateways.iter().find(|(n, _, _)| n == m).unwrap();
                let real: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
                proxy.set_target(real);
                let before = format!("endpoint = \"https://127.0.0.1:{real}\"");
                assert!(text.contains(&before), "{before} not in region.toml");
                text = text.replace(
                    &before,
                    &format!("endpoint = \"https://127.0.0.1:{}\"", proxy.port),
                );
            }
            std::fs::write(&path, text).unwrap();
            patch(layout);
        };
        let region = Self::start_full(None, &route, false).await;
        (region, proxies)
    }

    /// The port a member gateway listens on.
    pub fn port(&self, member: &str) -> u16 {
        self.endpoint(member)
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Starts a stopped gateway again on its port.
    pub async fn restart(&mut self, member: &str) {
        let port = self.port(member);
        let path = self.layout.dir.join(format!("{member}.toml"));
        let cfg = MemberConfig::load(&path).unwrap_or_else(|p| panic!("{p}"));
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        self.gateways.insert(
            member.to_string(),
            Gateway::start(Arc::new(cfg), Some(l)).await.unwrap(),
        );
    }

    /// Stops one gateway.
    pub async fn stop(&mut self, member: &str) {
        if let Some(g) = self.gateways.remove(member) {
            g.shutdown().await;
        }
    }

    /// The demo's data folder (the member files the answers come from).
    pub fn data(&self) -> PathBuf {
        self.layout.dir.join("data")
    }
}

/// Rows per member of the census: one row per member that answered.
pub const PER_MEMBER: &str = "SELECT member, count(*) AS n FROM census GROUP BY member";

/// The summary entry of `member`.
pub fn member_status<'a>(
    s: &'a fedgate::proto::v1::QuerySummary,
    member: &str,
) -> &'a fedgate::proto::v1::MemberStatus {
    s.members
        .iter()
        .find(|m| m.member == member)
        .unwrap_or_else(|| panic!("{member} not in summary {s:?}"))
}

/// The state the summary gives `member`.
pub fn member_state(
    s: &fedgate::proto::v1::QuerySummary,
    member: &str,
) -> fedgate::proto::v1::MemberState {
    fedgate::proto::v1::MemberState::try_from(member_status(s, member).state).unwrap()
}

/// Every member's state in a summary, by member.
pub fn states(
    s: &fedgate::proto::v1::QuerySummary,
) -> std::collections::BTreeMap<String, fedgate::proto::v1::MemberState> {
    s.members
        .iter()
        .map(|m| {
            (
                m.member.clone(),
                fedgate::proto::v1::MemberState::try_from(m.state).unwrap(),
            )
        })
        .collect()
}

/// The records of an audit log as JSON, in order.
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The sub-query records (answered or refused) of an audit log.
pub fn sub_query_records(path: &Path) -> Vec<serde_json::Value> {
    audit_records(path)
        .into_iter()
        .filter(|r| r["entry"]["kind"] == "sub_query")
        .collect()
}

/// The first record after the first `skip` of an audit log that `pick` accepts,
/// waiting for it up to `within` (records written when a query ends, which a test
/// cannot await directly); panics with `what` if none comes.
pub async fn awaited_record(
    path: &Path,
    skip: usize,
    pick: impl Fn(&serde_json::Value) -> bool,
    within: std::time::Duration,
    what: &str,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(r) = audit_records(path).into_iter().skip(skip).find(&pick) {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Edits the materialized member file of `member` as its serde mirror.
pub fn patch_member(
    layout: &Materialized,
    member: &str,
    f: impl FnOnce(&mut fedgate::config::raw::RawMemberConfig),
) {
    let path = layout.dir.join(format!("{member}.toml"));
    let mut raw: fedgate::config::raw::RawMemberConfig =
        toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut raw);
    std::fs::write(&path, toml::to_string_pretty(&raw).unwrap()).unwrap();
}

/// Edits the materialized region file as its serde mirror.
pub fn patch_region(layout: &Materialized, f: impl FnOnce(&mut fedgate::config::raw::RawRegion)) {
    let path = layout.dir.join("region.toml");
    let mut raw: fedgate::config::raw::RawRegion =
        toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut raw);
    std::fs::write(&path, toml::to_string_pretty(&raw).unwrap()).unwrap();
}

/// Reads a CSV file with the `csv`-free reader used by the tests: header names and
/// rows of fields. The demo files need no quoting (the data script checks that), so
/// splitting on commas is exact here and independent of the gateway's reader.
pub fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    let rows: Vec<Vec<String>> = lines
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    for r in &rows {
        assert_eq!(
            r.len(),
            header.len(),
            "{}: quoted field in {r:?}",
            path.display()
        );
    }
    (header, rows)
}

/// All values of one column of a batch list, as display strings.
pub fn column_strings(
    batches: &[datafusion::arrow::record_batch::RecordBatch],
    name: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let i = b.schema().index_of(name).unwrap();
        let c = b.column(i);
        for r in 0..b.num_rows() {
            out.push(datafusion::arrow::util::display::array_value_to_string(c, r).unwrap());
        }
    }
    out
}

/// Plans `sql` as a member does (pushdown included) and runs it: the batches and the
/// physical plan's text.
pub async fn run_member_sql(
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
) -> (Vec<datafusion::arrow::record_batch::RecordBatch>, String) {
    let plan = ctx.state().create_logical_plan(sql).await.unwrap();
    let physical = fedgate::owner::member::physical_plan(ctx, &plan)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let text = datafusion::physical_plan::displayable(physical.as_ref())
        .indent(true)
        .to_string();
    let batches = datafusion::physical_plan::collect(physical, ctx.task_ctx())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}\n{text}"));
    (batches, text)
}

/// Every row of `batches` as text, columns joined by `|`.
pub fn member_rows(batches: &[datafusion::arrow::record_batch::RecordBatch]) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            let cells: Vec<String> = b
                .columns()
                .iter()
                .map(|c| {
                    if c.is_null(r) {
                        "NULL".to_string()
                    } else {
                        datafusion::arrow::util::display::array_value_to_string(c, r).unwrap()
                    }
                })
                .collect();
            out.push(cells.join("|"));
        }
    }
    out
}
