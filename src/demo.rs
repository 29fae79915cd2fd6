//! The bundled sample region: `federation-configs/demo`, materialized with fresh
//! certificates into a folder where each member can run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::raw::{RawMemberConfig, RawRegion};
use crate::error::{Error, Result};
use crate::identity::{Kind, Principal};
use crate::pki::{self, Ca};

/// The example queries `fedgate demo` runs, with what each shows.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "Fever-clinic hospitals per member (Hefei serves no list and is not asked)",
        "SELECT member, count(*) AS hospitals FROM fever_clinics GROUP BY member ORDER BY member",
    ),
    (
        "Counties with the most fever-clinic hospitals across the delta (join with divisions)",
        "SELECT f.county_code, d.name AS county, count(*) AS hospitals \
         FROM fever_clinics f JOIN divisions d ON f.county_code = d.code \
         GROUP BY f.county_code, d.name ORDER BY hospitals DESC, f.county_code LIMIT 8",
    ),
    (
        "Share of residents aged 65 and over, highest counties",
        "SELECT member, county_code, county_name, share_65_plus_pct \
         FROM census ORDER BY share_65_plus_pct DESC, county_code LIMIT 8",
    ),
    (
        "Population and residents aged 65+ per member",
        "SELECT member, sum(pop_total) AS population, \
         CAST(round(sum(pop_total * share_65_plus_pct / 100)) AS BIGINT) AS aged_65_plus \
         FROM census GROUP BY member ORDER BY population DESC",
    ),
    (
        "Only Hangzhou is asked (the filter on member prunes the others)",
        "SELECT county_name, pop_total FROM census WHERE member = 'hangzhou' \
         ORDER BY pop_total DESC LIMIT 3",
    ),
];

/// Where the sample region's templates live in a source checkout.
pub fn default_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("federation-configs/demo")
}

/// A materialized region.
#[derive(Debug, Clone)]
pub struct Materialized {
    /// The folder.
    pub dir: PathBuf,
    /// `region.toml` in it.
    pub region: PathBuf,
    /// Member gateways: name, config file, endpoint.
    pub gateways: Vec<(String, PathBuf, String)>,
    /// The CA certificate.
    pub ca: PathBuf,
    /// Client-only identities (offices): name, certificate, key.
    pub clients: Vec<(String, PathBuf, PathBuf)>,
}

/// Copies the templates in `src` to `dst`, giving each gateway the port `port(name,
/// template_port)` on 127.0.0.1, and creates a CA with a certificate for every member.
pub fn materialize(
    src: &Path,
    dst: &Path,
    port: &dyn Fn(&str, u16) -> u16,
) -> Result<Materialized> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Error::Config(format!("{what} {}: {e}", p.display()))
    };
    std::fs::create_dir_all(dst).map_err(|e| io("creating", dst, e))?;
    let region_src = src.join("region.toml");
    let text = std::fs::read_to_string(&region_src).map_err(|e| io("reading", &region_src, e))?;
    let mut region: RawRegion = toml::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", region_src.display())))?;
    let mut ports = BTreeMap::new();
    for m in &mut region.members {
        if let Some(ep) = &m.endpoint {
            let template = ep
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let p = port(&m.name, template);
            m.endpoint = Some(format!("https://127.0.0.1:{p}"));
            ports.insert(m.name.clone(), p);
        }
    }
    let region_dst = dst.join("region.toml");
    write(
        &region_dst,
        &toml::to_string_pretty(&region).map_err(|e| Error::Internal(e.to_string()))?,
    )?;

    let mut gateways = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .map_err(|e| io("reading", src, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && p.file_name() != Some("region.toml".as_ref())
        })
        .collect();
    entries.sort();
    for p in entries {
        let text = std::fs::read_to_string(&p).map_err(|e| io("reading", &p, e))?;
        let mut m: RawMemberConfig =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
        let port = *ports.get(&m.member).ok_or_else(|| {
            Error::Config(format!(
                "{}: member {} has no endpoint",
                p.display(),
                m.member
            ))
        })?;
        m.listen = format!("127.0.0.1:{port}");
        let out = dst.join(p.file_name().unwrap_or_default());
        write(
            &out,
            &toml::to_string_pretty(&m).map_err(|e| Error::Internal(e.to_string()))?,
        )?;
        gateways.push((m.member.clone(), out, format!("https://127.0.0.1:{port}")));
    }
    // Region order, so the first gateway is the first member of the region file.
    let order = |n: &str| {
        region
            .members
            .iter()
            .position(|m| m.name == n)
            .unwrap_or(usize::MAX)
    };
    gateways.sort_by_key(|(n, _, _)| order(n));
    copy_dir(&src.join("data"), &dst.join("data"))?;

    let certs = dst.join("certs");
    let ca = Ca::generate(&region.region)?;
    let (ca_path, _) = pki::write_ca(&ca, &certs)?;
    let mut clients = Vec::new();
    for m in &region.members {
        let kind = Kind::parse(&m.kind)
            .ok_or_else(|| Error::Config(format!("member {}: bad kind", m.name)))?;
        let principal = match &m.identity {
            Some(uri) => Principal::parse(uri)?,
            None => Principal::new(&region.region, kind, &m.name)?,
        };
        let issued = ca.issue(&principal, &pki::default_hosts(), 365)?;
        let (crt, key) = pki::write_issued(&issued, &certs, &m.name)?;
        if m.endpoint.is_none() {
            clients.push((m.name.clone(), crt, key));
        }
    }
    Ok(Materialized {
        dir: dst.to_path_buf(),
        region: region_dst,
        gateways,
        ca: ca_path,
        clients,
    })
}

fn write(p: &Path, text: &str) -> Result<()> {
    std::fs::write(p, text).map_err(|e| Error::Config(format!("writing {}: {e}", p.display())))
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    let err = |p: &Path, e: std::io::Error| Error::Config(format!("copying {}: {e}", p.display()));
    std::fs::create_dir_all(dst).map_err(|e| err(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| err(src, e))? {
        let entry = entry.map_err(|e| err(src, e))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        if from.is_dir() {
            copy_dir(&from, &to)?;
        } else {
            std::fs::copy(&from, &to).map_err(|e| err(&from, e))?;
        }
    }
    Ok(())
}
