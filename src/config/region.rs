//! The region file validated: members and their identities and endpoints, canonical
//! datasets, published services.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use sha2::{Digest, Sha256};

use super::MEMBER_COLUMN;
use super::canonical_schema;
use super::limits::CachePolicy;
use super::limits::cache_policy;
use super::parse_toml;
use super::parse_type;
use super::problems::Problems;
use super::raw::*;
use super::read_file;
use super::resolve;
use super::{Declared, valid_name};
use crate::trust::identity::{Kind, Principal};

/// The validated region file.
#[derive(Debug)]
pub struct Region {
    /// Where it was read from.
    pub path: PathBuf,
    /// Region name.
    pub name: String,
    /// The CA bundle path.
    pub ca_path: PathBuf,
    /// The region's certificate revocation lists.
    pub crl_paths: Vec<PathBuf>,
    /// Members in file order.
    pub members: Vec<Member>,
    /// Canonical datasets in file order.
    pub datasets: Vec<Dataset>,
    /// Published services in file order.
    pub services: Vec<Service>,
    /// Hash of the file's bytes.
    pub digest: String,
    by_identity: HashMap<Principal, usize>,
}

/// A published service: a named query with typed parameters.
#[derive(Debug, Clone)]
pub struct Service {
    /// Name.
    pub name: String,
    /// What it answers.
    pub description: String,
    /// Principal patterns that may call it.
    pub callers: Vec<String>,
    /// Canonical SQL with `$name` placeholders.
    pub sql: String,
    /// The purpose every call states, if the service has one.
    pub purpose: Option<String>,
    /// Parameters in file order.
    pub params: Vec<ServiceParam>,
}

/// A parameter of a published service.
#[derive(Debug, Clone)]
pub struct ServiceParam {
    /// Name.
    pub name: String,
    /// Arrow type of the bound value.
    pub data_type: DataType,
    /// The type as written in the config (`utf8`, `int64`, ...).
    pub type_name: String,
    /// What to pass.
    pub description: String,
}

impl Service {
    /// Whether `p` may call this service.
    pub fn allows(&self, p: &Principal) -> bool {
        self.callers
            .iter()
            .any(|c| crate::trust::identity::matches_pattern(c, p))
    }
}

/// A validated member entry.
#[derive(Debug, Clone)]
pub struct Member {
    /// Short name.
    pub name: String,
    /// City, county or office.
    pub kind: Kind,
    /// Certificate identity.
    pub principal: Principal,
    /// Its gateway, if it runs one.
    pub endpoint: Option<Endpoint>,
    /// Datasets its gateway serves.
    pub serves: BTreeSet<String>,
    /// Where it is on the board's map, if the region file says.
    pub location: Option<Location>,
}

/// A member's place, in degrees: longitude within -180..=180, latitude within -90..=90.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Location {
    /// Longitude, east positive.
    pub lon: f64,
    /// Latitude, north positive.
    pub lat: f64,
}

/// Checks a location's ranges (which also refuses NaN and infinities).
fn validate_location(raw: &super::raw::RawLocation) -> Result<Location, String> {
    if !(-180.0..=180.0).contains(&raw.lon) {
        return Err(format!(
            "longitude {} is not within -180 to 180 degrees",
            raw.lon
        ));
    }
    if !(-90.0..=90.0).contains(&raw.lat) {
        return Err(format!(
            "latitude {} is not within -90 to 90 degrees",
            raw.lat
        ));
    }
    Ok(Location {
        lon: raw.lon,
        lat: raw.lat,
    })
}

/// A gateway endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `https://host:port`.
    pub url: String,
    /// The host part, for TLS server-name checks.
    pub host: String,
    /// The port.
    pub port: u16,
}

/// A canonical dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Table name.
    pub name: String,
    /// What it holds.
    pub description: String,
    /// Its declared fields (without `member`).
    pub fields: Vec<CanonicalField>,
    /// Arrow schema: the fields, all nullable, then `member` (not null).
    pub schema: SchemaRef,
    /// How coordinators may reuse member answers (`None`: never).
    pub cache: Option<CachePolicy>,
}

/// A field of a canonical dataset.
#[derive(Debug, Clone)]
pub struct CanonicalField {
    /// Column name.
    pub name: String,
    /// Arrow type.
    pub data_type: DataType,
    /// Description.
    pub description: String,
    /// Unit.
    pub unit: String,
}

impl Region {
    /// Looks up a member by name.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Whether `p` is the identity of a member with a gateway (an endpoint).
    pub fn has_gateway(&self, p: &Principal) -> bool {
        self.member_by_principal(p)
            .is_some_and(|m| m.endpoint.is_some())
    }

    /// The member whose identity is `p`, if any.
    pub fn member_by_principal(&self, p: &Principal) -> Option<&Member> {
        self.by_identity.get(p).map(|&i| &self.members[i])
    }

    /// Looks up a canonical dataset.
    pub fn dataset(&self, name: &str) -> Option<&Dataset> {
        self.datasets.iter().find(|d| d.name == name)
    }

    /// Members whose gateways serve `dataset`, in file order.
    pub fn servers_of<'a>(&'a self, dataset: &'a str) -> impl Iterator<Item = &'a Member> + 'a {
        self.members
            .iter()
            .filter(move |m| m.serves.contains(dataset))
    }

    /// Reads and validates a region file.
    pub fn load(path: &Path) -> Result<Region, Problems> {
        let mut problems = Problems::default();
        let text = read_file(path, &mut problems)?;
        let raw: RawRegion = parse_toml(path, &text, &mut problems)?;
        let region = Region::validate(path, &text, raw, &mut problems);
        match region {
            Some(r) if problems.is_empty() => Ok(r),
            _ => Err(problems),
        }
    }

    fn validate(path: &Path, text: &str, raw: RawRegion, pr: &mut Problems) -> Option<Region> {
        if !valid_name(&raw.region) {
            pr.add(
                path,
                "region",
                "must be lowercase letters, digits, '-' or '_'",
            );
        }
        let ca_path = resolve(path, &raw.ca);
        if !ca_path.is_file() {
            pr.add(
                path,
                "ca",
                format!("CA bundle {} does not exist", ca_path.display()),
            );
        }
        let crl_paths: Vec<PathBuf> = raw.crls.iter().map(|c| resolve(path, c)).collect();
        for (i, c) in crl_paths.iter().enumerate() {
            if !c.is_file() {
                pr.add(
                    path,
                    format!("crls[{i}]"),
                    format!("revocation list {} does not exist", c.display()),
                );
            }
        }
        let mut datasets = Vec::new();
        let mut seen = Declared::new("dataset");
        for (i, d) in raw.datasets.iter().enumerate() {
            let key = format!("datasets[{i}]");
            seen.check(path, &key, &d.name, pr);
            let mut fields = Vec::new();
            let mut fseen = Declared::new("field");
            for (j, f) in d.fields.iter().enumerate() {
                let fkey = format!("{key}.fields[{j}]");
                if f.name == MEMBER_COLUMN {
                    pr.add(
                        path,
                        format!("{fkey}.name"),
                        "`member` is implicit in every dataset and cannot be declared",
                    );
                } else {
                    fseen.check(path, &fkey, &f.name, pr);
                }
                match parse_type(&f.data_type) {
                    Some(t) => fields.push(CanonicalField {
                        name: f.name.clone(),
                        data_type: t,
                        description: f.description.clone(),
                        unit: f.unit.clone(),
                    }),
                    None => pr.add(
                        path,
                        format!("{fkey}.type"),
                        format!(
                            "unknown type {:?}; use utf8, int64, float64, boolean or date",
                            f.data_type
                        ),
                    ),
                }
            }
            if d.fields.is_empty() {
                pr.add(
                    path,
                    format!("{key}.fields"),
                    "a dataset needs at least one field",
                );
            }
            let cache = cache_policy(path, &key, d, pr);
            datasets.push(Dataset {
                name: d.name.clone(),
                description: d.description.clone(),
                schema: canonical_schema(&fields),
                fields,
                cache,
            });
        }
        let mut members = Vec::new();
        let mut by_identity = HashMap::new();
        let mut names = BTreeSet::new();
        for (i, m) in raw.members.iter().enumerate() {
            let key = format!("members[{i}]");
            if !names.insert(m.name.clone()) {
                pr.add(
                    path,
                    format!("{key}.name"),
                    format!("member {:?} is listed twice", m.name),
                );
            }
            let Some(kind) = Kind::parse(&m.kind) else {
                pr.add(
                    path,
                    format!("{key}.kind"),
                    format!("unknown kind {:?}; use city, county or office", m.kind),
                );
                continue;
            };
            let principal = match &m.identity {
                Some(uri) => Principal::parse(uri),
                None => Principal::new(&raw.region, kind, &m.name),
            };
            let principal = match principal {
                Ok(p) if p.region() != raw.region => {
                    pr.add(
                        path,
                        format!("{key}.identity"),
                        format!("identity {p} is not in region {:?}", raw.region),
                    );
                    continue;
                }
                Ok(p) => p,
                Err(e) => {
                    pr.add(path, format!("{key}.identity"), e.to_string());
                    continue;
                }
            };
            let endpoint = match &m.endpoint {
                None => None,
                Some(url) => match parse_endpoint(url) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        pr.add(path, format!("{key}.endpoint"), e);
                        None
                    }
                },
            };
            if endpoint.is_none() && !m.serves.is_empty() {
                pr.add(
                    path,
                    format!("{key}.serves"),
                    "a member that serves datasets needs an endpoint",
                );
            }
            for s in &m.serves {
                if !seen.contains(s) {
                    pr.add(
                        path,
                        format!("{key}.serves"),
                        format!("unknown dataset {s:?}"),
                    );
                }
            }
            if by_identity
                .insert(principal.clone(), members.len())
                .is_some()
            {
                pr.add(
                    path,
                    format!("{key}.identity"),
                    format!("identity {principal} is used by two members"),
                );
            }
            let location = m.location.as_ref().and_then(|l| {
                validate_location(l)
                    .map_err(|e| pr.add(path, format!("{key}.location"), e))
                    .ok()
            });
            members.push(Member {
                name: m.name.clone(),
                kind,
                principal,
                endpoint,
                serves: m.serves.iter().cloned().collect(),
                location,
            });
        }
        let services = validate_services(path, &raw.services, pr);
        Some(Region {
            path: path.to_path_buf(),
            name: raw.region,
            ca_path,
            crl_paths,
            members,
            datasets,
            services,
            digest: hex::encode(Sha256::digest(text.as_bytes())),
            by_identity,
        })
    }
}

/// Checks the published services' names, callers and parameters. That the SQL plans,
/// and that its placeholders are exactly the declared parameters with the declared
/// types, is checked when a coordinator is built from the configuration (planning
/// needs the datasets' tables).
pub(super) fn validate_services(
    path: &Path,
    raw: &[RawService],
    pr: &mut Problems,
) -> Vec<Service> {
    let mut out = Vec::new();
    let mut names = Declared::new("service");
    for (i, s) in raw.iter().enumerate() {
        let key = format!("services[{i}]");
        names.check(path, &key, &s.name, pr);
        if s.callers.is_empty() {
            pr.add(
                path,
                format!("{key}.callers"),
                "names no caller; list the principal patterns that may call the service",
            );
        }
        for c in &s.callers {
            if let Err(e) = crate::trust::identity::validate_pattern(c) {
                pr.add(path, format!("{key}.callers"), e);
            }
        }
        if s.sql.trim().is_empty() {
            pr.add(path, format!("{key}.sql"), "is empty");
        }
        if let Some(p) = &s.purpose
            && let Err(why) = super::access::validate_purpose(p)
        {
            pr.add(path, format!("{key}.purpose"), why);
        }
        let mut params = Vec::new();
        let mut pnames = Declared::new("parameter");
        for (j, p) in s.params.iter().enumerate() {
            let pkey = format!("{key}.params[{j}]");
            pnames.check(path, &pkey, &p.name, pr);
            match parse_type(&p.data_type) {
                Some(t) => params.push(ServiceParam {
                    name: p.name.clone(),
                    data_type: t,
                    type_name: p.data_type.clone(),
                    description: p.description.clone(),
                }),
                None => pr.add(
                    path,
                    format!("{pkey}.type"),
                    format!(
                        "unknown type {:?}; use utf8, int64, float64, boolean or date",
                        p.data_type
                    ),
                ),
            }
        }
        out.push(Service {
            name: s.name.clone(),
            description: s.description.clone(),
            callers: s.callers.clone(),
            sql: s.sql.clone(),
            purpose: s.purpose.clone(),
            params,
        });
    }
    out
}

pub(super) fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} must start with https:// (every port is mutual TLS)"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r
            .split_once("]:")
            .ok_or_else(|| format!("{url:?} needs a port"))?;
        (h.to_string(), p)
    } else {
        let (h, p) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{url:?} needs a port"))?;
        (h.to_string(), p)
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{url:?} has a bad port"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?} has a bad host"));
    }
    Ok(Endpoint {
        url: format!("https://{rest}"),
        host,
        port,
    })
}
