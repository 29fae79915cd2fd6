//! The validated access rules of a member file: levels, field masks and purposes. The
//! decisions made with them are in `owner::policy`, the masks' functions in
//! `owner::masking`; the types live here so that configuration depends on no module
//! that uses it.

use super::MEMBER_COLUMN;
use super::problems::Problems;
use super::raw::*;
use super::region::CanonicalField;
use super::region::Dataset;
use super::region::Region;
use crate::trust::identity::{self};
use datafusion::arrow::datatypes::DataType;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// How one field is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mask {
    /// Resident ID number: the first 6 (region) and last 4 characters stay.
    IdKeepEnds,
    /// Resident ID number: only the first 6 characters (the region) stay.
    IdRegion,
    /// Mobile number: the first 3 and last 4 digits stay (138****1234).
    Phone,
    /// Personal name: only the surname stays (张*, 欧阳*).
    Surname,
    /// A keyed hash (HMAC-SHA-256 with the member's secret, 32 hex digits): equal
    /// values stay equal, so the field can still be joined, but cannot be read.
    Hmac,
    /// The field is not shared: it reads as NULL.
    Deny,
}

impl Mask {
    /// Parses the name used in member files.
    pub fn parse(s: &str) -> Option<Mask> {
        Some(match s {
            "id_keep_ends" => Mask::IdKeepEnds,
            "id_region" => Mask::IdRegion,
            "phone" => Mask::Phone,
            "surname" => Mask::Surname,
            "hmac" => Mask::Hmac,
            "deny" => Mask::Deny,
            _ => return None,
        })
    }

    /// The names accepted by [`Mask::parse`], for error messages.
    pub const NAMES: &'static str = "id_keep_ends, id_region, phone, surname, hmac or deny";

    /// The name used in member files and in `Describe`.
    pub fn name(self) -> &'static str {
        match self {
            Mask::IdKeepEnds => "id_keep_ends",
            Mask::IdRegion => "id_region",
            Mask::Phone => "phone",
            Mask::Surname => "surname",
            Mask::Hmac => "hmac",
            Mask::Deny => "deny",
        }
    }
}

/// What a rule grants for a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLevel {
    /// Rows as mapped (fields listed in the rule's masks are masked).
    Rows,
    /// Rows with the rule's named fields masked.
    Masked,
    /// Only aggregate answers over groups of at least `min_group` records.
    Aggregate {
        /// The smallest group (in records) that may be released.
        min_group: u64,
    },
    /// Only whether a record with given values exists.
    Verify,
    /// Nothing.
    Deny,
}

impl std::fmt::Display for AccessLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessLevel::Rows => f.write_str("rows"),
            AccessLevel::Masked => f.write_str("masked"),
            AccessLevel::Aggregate { min_group } => write!(f, "aggregate(k={min_group})"),
            AccessLevel::Verify => f.write_str("verify"),
            AccessLevel::Deny => f.write_str("denied"),
        }
    }
}

/// A compiled access rule from a member's config.
#[derive(Debug, Clone)]
pub struct AccessRule {
    /// Position in the member file, so decisions can name the rule.
    pub index: usize,
    /// Principal patterns.
    pub principals: Vec<String>,
    /// Datasets or `*`.
    pub datasets: Vec<String>,
    /// What it grants.
    pub level: AccessLevel,
    /// Field masks (field name to mask), for the datasets that have the field.
    pub masks: BTreeMap<String, Mask>,
    /// `aggregate`: the fields answers may be grouped and filtered by.
    pub dimensions: BTreeSet<String>,
    /// `verify`: the fields every verification must state exactly.
    pub keys: BTreeSet<String>,
    /// Purpose codes, one of which a query must state for the rule to apply; empty
    /// when the rule applies whatever the purpose.
    pub purposes: Vec<String>,
    /// Patterns of the gateways through which the rule accepts its principals; empty
    /// when any gateway entitled to speak for the origin will do. A query asked at
    /// this member's own gateway passes through no other gateway and always qualifies.
    pub via: Vec<String>,
    /// An emergency rule's terms: it applies only under an incident these accept.
    pub incident: Option<IncidentRule>,
}

/// Which incident declarations an emergency rule honours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncidentRule {
    /// Patterns of the declarers honoured.
    pub declarers: Vec<String>,
    /// The longest window honoured.
    pub max_window: std::time::Duration,
}

/// The code part of a stated purpose: `epidemic-response: HZ-2026-0042` has the code
/// `epidemic-response`; the whole text is recorded.
pub fn purpose_code(purpose: &str) -> &str {
    purpose.split(':').next().unwrap_or("").trim()
}

/// Checks a stated purpose's form: short, printable, one line.
pub fn validate_purpose(purpose: &str) -> Result<(), String> {
    if purpose.chars().count() > 200 {
        return Err("the stated purpose is longer than 200 characters".into());
    }
    if purpose.chars().any(char::is_control) {
        return Err("the stated purpose contains control characters".into());
    }
    if purpose_code(purpose).is_empty() {
        return Err("the stated purpose has no code before ':'".into());
    }
    Ok(())
}

/// Compiles the access rules, checking every name they use against the datasets this
/// member serves.
pub(super) fn validate_access(
    path: &Path,
    raw: &[RawAccessRule],
    region: &Region,
    served: &[&Dataset],
    pr: &mut Problems,
) -> Vec<AccessRule> {
    let mut access = Vec::new();
    for (i, a) in raw.iter().enumerate() {
        let key = format!("access[{i}]");
        for p in &a.principals {
            if let Err(e) = identity::validate_pattern(p) {
                pr.add(path, format!("{key}.principals"), e);
            }
        }
        if a.principals.is_empty() {
            pr.add(path, format!("{key}.principals"), "names no principal");
        }
        for p in &a.via {
            if let Err(e) = identity::validate_pattern(p) {
                pr.add(path, format!("{key}.via"), e);
            }
        }
        for d in &a.datasets {
            if d != "*" && region.dataset(d).is_none() {
                pr.add(
                    path,
                    format!("{key}.datasets"),
                    format!("unknown dataset {d:?}"),
                );
            }
        }
        // The datasets the rule can apply to here, to check field names against.
        let covered: Vec<&Dataset> = served
            .iter()
            .copied()
            .filter(|d| a.datasets.iter().any(|x| x == "*" || x == &d.name))
            .collect();
        let field = |name: &str| -> Option<&CanonicalField> {
            covered
                .iter()
                .find_map(|d| d.fields.iter().find(|f| f.name == name))
        };
        let known = |name: &str| name == MEMBER_COLUMN || field(name).is_some();
        let mut masks = BTreeMap::new();
        for (f, m) in &a.fields {
            let fkey = format!("{key}.fields.{f}");
            let Some(mask) = Mask::parse(m) else {
                pr.add(
                    path,
                    fkey,
                    format!("unknown mask {m:?}; use {}", Mask::NAMES),
                );
                continue;
            };
            match field(f) {
                None => pr.add(
                    path,
                    fkey,
                    format!("no dataset this rule covers here has a field {f:?}"),
                ),
                Some(cf) if mask != Mask::Deny && cf.data_type != DataType::Utf8 => pr.add(
                    path,
                    fkey,
                    format!(
                        "mask {m} works on text, but {f} is {}; use deny to withhold it",
                        cf.data_type
                    ),
                ),
                Some(_) => {
                    masks.insert(f.clone(), mask);
                }
            }
        }
        let names = |list: &[String], what: &str, pr: &mut Problems| -> BTreeSet<String> {
            for f in list {
                if !known(f) {
                    pr.add(
                        path,
                        format!("{key}.{what}"),
                        format!("no dataset this rule covers here has a field {f:?}"),
                    );
                }
                if masks.contains_key(f) {
                    pr.add(
                        path,
                        format!("{key}.{what}"),
                        format!(
                            "{f} is masked by this rule, so it cannot also be one of its {what}"
                        ),
                    );
                }
            }
            list.iter().cloned().collect()
        };
        let dimensions = names(&a.dimensions, "dimensions", pr);
        let keys = names(&a.keys, "keys", pr);
        for p in &a.purposes {
            if p.is_empty() || p.contains(':') || p.chars().any(char::is_whitespace) {
                pr.add(
                    path,
                    format!("{key}.purposes"),
                    format!("{p:?} is not a purpose code (one word, no ':' or spaces)"),
                );
            }
        }
        let misplaced = |what: &str, present: bool, pr: &mut Problems| {
            if present {
                pr.add(
                    path,
                    format!("{key}.{what}"),
                    format!("{what} does not apply to level {:?}", a.level),
                );
            }
        };
        let level = match a.level.as_str() {
            "rows" => {
                misplaced("min_group", a.min_group.is_some(), pr);
                misplaced("dimensions", !a.dimensions.is_empty(), pr);
                misplaced("keys", !a.keys.is_empty(), pr);
                AccessLevel::Rows
            }
            "masked" => {
                if a.fields.is_empty() {
                    pr.add(
                        path,
                        format!("{key}.fields"),
                        "a masked rule must name the fields it masks",
                    );
                }
                misplaced("min_group", a.min_group.is_some(), pr);
                misplaced("dimensions", !a.dimensions.is_empty(), pr);
                misplaced("keys", !a.keys.is_empty(), pr);
                AccessLevel::Masked
            }
            "aggregate" => {
                misplaced("keys", !a.keys.is_empty(), pr);
                match a.min_group {
                    Some(k) if k >= 2 => AccessLevel::Aggregate { min_group: k },
                    Some(k) => {
                        pr.add(
                            path,
                            format!("{key}.min_group"),
                            format!("{k} would release single records; use 2 or more"),
                        );
                        continue;
                    }
                    None => {
                        pr.add(
                            path,
                            format!("{key}.min_group"),
                            "an aggregate rule needs min_group (the smallest group released)",
                        );
                        continue;
                    }
                }
            }
            "verify" => {
                misplaced("min_group", a.min_group.is_some(), pr);
                misplaced("dimensions", !a.dimensions.is_empty(), pr);
                if a.keys.is_empty() {
                    pr.add(
                        path,
                        format!("{key}.keys"),
                        "a verify rule needs keys: the fields every verification must state",
                    );
                }
                AccessLevel::Verify
            }
            "deny" => {
                misplaced("fields", !a.fields.is_empty(), pr);
                misplaced("min_group", a.min_group.is_some(), pr);
                misplaced("dimensions", !a.dimensions.is_empty(), pr);
                misplaced("keys", !a.keys.is_empty(), pr);
                AccessLevel::Deny
            }
            other => {
                pr.add(
                    path,
                    format!("{key}.level"),
                    format!("unknown level {other:?}; use rows, masked, aggregate, verify or deny"),
                );
                continue;
            }
        };
        let incident = a.incident.as_ref().and_then(|r| {
            let mut ok = true;
            for p in &r.declarers {
                if let Err(e) = identity::validate_pattern(p) {
                    pr.add(path, format!("{key}.incident.declarers"), e);
                    ok = false;
                }
            }
            if r.declarers.is_empty() {
                pr.add(
                    path,
                    format!("{key}.incident.declarers"),
                    "names no declarer: an emergency rule honours the declarations of the \
                     identities listed here",
                );
                ok = false;
            }
            if !(1..=168).contains(&r.max_hours) {
                pr.add(
                    path,
                    format!("{key}.incident.max_hours"),
                    format!("{} is not 1 to 168 hours", r.max_hours),
                );
                ok = false;
            }
            ok.then(|| IncidentRule {
                declarers: r.declarers.clone(),
                max_window: std::time::Duration::from_secs(r.max_hours * 3600),
            })
        });
        if a.incident.is_some() && a.level == "deny" {
            pr.add(
                path,
                format!("{key}.incident"),
                "an emergency rule that denies opens nothing; leave it out",
            );
        }
        access.push(AccessRule {
            incident,
            index: i,
            principals: a.principals.clone(),
            datasets: a.datasets.clone(),
            level,
            masks,
            dimensions,
            keys,
            purposes: a.purposes.clone(),
            via: a.via.clone(),
        });
    }
    access
}
