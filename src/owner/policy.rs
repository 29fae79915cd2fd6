//! Access decisions at the data owner.
//!
//! [`authorize`] is a pure function from (calling gateway, original caller, stated
//! purpose, datasets asked for, the member's rules) to a [`Permit`] or a [`Denial`].
//! The local engine only runs a query together with a `Permit`, and a `Permit` can
//! only be made here, so a code path that skips authorization does not compile.
//!
//! Rules are evaluated in file order; for each dataset the first rule whose principal
//! patterns, dataset list and (if it names any) purposes match decides. Nothing is
//! shared unless a rule says so. A permit carries, per dataset, the [`Grant`] that
//! decided it: the local engine rewrites the sub-query under that grant (masks,
//! aggregate-only, verify-only), so the rewrite, not the caller, bounds what leaves.

use std::collections::{BTreeMap, BTreeSet};

use crate::owner::masking::Mask;
use crate::trust::identity::{Principal, matches_pattern};

pub use crate::config::access::{AccessLevel, AccessRule, purpose_code, validate_purpose};

impl AccessRule {
    fn covers(&self, p: &Principal, dataset: &str) -> bool {
        self.principals.iter().any(|pat| matches_pattern(pat, p))
            && self.datasets.iter().any(|d| d == "*" || d == dataset)
    }

    /// Whether the rule accepts a sub-query forwarded by `via` (`None`: asked here).
    fn via_ok(&self, via: Option<&Principal>) -> bool {
        match via {
            None => true,
            Some(v) => self.via.is_empty() || self.via.iter().any(|pat| matches_pattern(pat, v)),
        }
    }

    fn purpose_ok(&self, purpose: Option<&str>) -> bool {
        self.purposes.is_empty()
            || purpose.is_some_and(|p| self.purposes.iter().any(|a| a == purpose_code(p)))
    }

    /// The rule's name in messages and audit records.
    pub fn name(&self) -> String {
        format!("access[{}]", self.index)
    }
}

/// How one dataset may be read under a permit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The rule that granted it (its index in the member file).
    pub rule: usize,
    /// The level granted (never [`AccessLevel::Deny`]).
    pub level: AccessLevel,
    /// Masks of this dataset's fields.
    pub masks: BTreeMap<String, Mask>,
    /// `aggregate`: group-by and filter fields.
    pub dimensions: BTreeSet<String>,
    /// `verify`: fields that must be stated.
    pub keys: BTreeSet<String>,
}

impl Grant {
    fn from_rule(r: &AccessRule, fields: &[String]) -> Grant {
        let has = |f: &String| fields.contains(f);
        Grant {
            rule: r.index,
            level: r.level,
            masks: r
                .masks
                .iter()
                .filter(|(f, _)| has(f))
                .map(|(f, m)| (f.clone(), *m))
                .collect(),
            dimensions: r.dimensions.iter().filter(|f| has(f)).cloned().collect(),
            keys: r.keys.iter().filter(|f| has(f)).cloned().collect(),
        }
    }

    /// The rule's name, `access[i]`.
    pub fn rule_name(&self) -> String {
        format!("access[{}]", self.rule)
    }

    /// A short description for summaries and audit records, e.g.
    /// `masked(id_number:id_keep_ends, phone:phone) by access[1]`.
    pub fn describe(&self) -> String {
        let mut s = self.level.to_string();
        if !self.masks.is_empty() {
            let m: Vec<String> = self
                .masks
                .iter()
                .map(|(f, m)| format!("{f}:{}", m.name()))
                .collect();
            s.push_str(&format!(" masks[{}]", m.join(", ")));
        }
        format!("{s} by {}", self.rule_name())
    }
}

/// Proof that `origin`, asking through `via` for `purpose`, may read `grants`' datasets
/// here, each under its grant.
///
/// Fields are private and there is no public constructor: only [`authorize`] (and
/// [`owner_permit`] for the operator's own checks) makes one.
#[derive(Debug, Clone)]
pub struct Permit {
    origin: Principal,
    via: Principal,
    purpose: Option<String>,
    grants: BTreeMap<String, Grant>,
}

impl Permit {
    /// The original caller.
    pub fn origin(&self) -> &Principal {
        &self.origin
    }

    /// The gateway that forwarded the request (the origin itself for local queries).
    pub fn via(&self) -> &Principal {
        &self.via
    }

    /// The purpose stated with the query.
    pub fn purpose(&self) -> Option<&str> {
        self.purpose.as_deref()
    }

    /// The datasets this permit covers, each with its grant.
    pub fn grants(&self) -> &BTreeMap<String, Grant> {
        &self.grants
    }

    /// The datasets this permit covers.
    pub fn datasets(&self) -> BTreeSet<String> {
        self.grants.keys().cloned().collect()
    }

    /// One line describing the grants, for summaries and audit records.
    pub fn describe(&self) -> String {
        self.grants
            .iter()
            .map(|(d, g)| format!("{d}: {}", g.describe()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The dataset refused.
    pub dataset: String,
    /// The rule that refused it, or `None` when no rule matched (default deny).
    pub rule: Option<usize>,
    /// Purposes that would have let a rule apply, when the caller's purpose is missing
    /// or not among them.
    pub purposes: Vec<String>,
    /// Gateways through which a rule would have applied, when the sub-query came
    /// through another.
    pub via: Vec<String>,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rule {
            Some(i) => write!(f, "dataset {} is denied by access[{i}]", self.dataset)?,
            None => write!(
                f,
                "dataset {} is not shared with this caller (no access rule grants it)",
                self.dataset
            )?,
        }
        if !self.via.is_empty() {
            write!(
                f,
                "; it is shared with this caller only through the gateways: {} (or asked \
                 at this member's own gateway)",
                self.via.join(", ")
            )?;
        }
        if let Some(first) = self.purposes.first() {
            write!(
                f,
                "; it is shared with this caller for a stated purpose, one of: {} \
                 (state it with the query, e.g. --purpose '{first}: case number')",
                self.purposes.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The grant (or denial) of one dataset for `origin` stating `purpose`. `fields` are
/// the dataset's canonical fields, to keep only the masks, dimensions and keys that
/// apply to it.
pub fn grant_for(
    rules: &[AccessRule],
    via: Option<&Principal>,
    origin: &Principal,
    purpose: Option<&str>,
    dataset: &str,
    fields: &[String],
) -> Result<Grant, Denial> {
    let mut wanted_purposes = Vec::new();
    let mut wanted_via = Vec::new();
    for r in rules.iter().filter(|r| r.covers(origin, dataset)) {
        if !r.via_ok(via) {
            wanted_via.extend(r.via.iter().cloned());
            continue;
        }
        if !r.purpose_ok(purpose) {
            wanted_purposes.extend(r.purposes.iter().cloned());
            continue;
        }
        if r.level == AccessLevel::Deny {
            wanted_purposes.dedup();
            wanted_via.dedup();
            return Err(Denial {
                dataset: dataset.into(),
                rule: Some(r.index),
                purposes: wanted_purposes,
                via: wanted_via,
            });
        }
        return Ok(Grant::from_rule(r, fields));
    }
    wanted_purposes.dedup();
    wanted_via.dedup();
    Err(Denial {
        dataset: dataset.into(),
        rule: None,
        purposes: wanted_purposes,
        via: wanted_via,
    })
}

/// Decides whether `origin` (through gateway `via`, stating `purpose`) may read every
/// dataset in `datasets` (name to canonical field names), and under which grants.
/// `forwarded` says whether `via` forwarded the sub-query from elsewhere (false when
/// the caller asked at this member's own gateway).
pub fn authorize(
    rules: &[AccessRule],
    via: &Principal,
    forwarded: bool,
    origin: &Principal,
    purpose: Option<&str>,
    datasets: &BTreeMap<String, Vec<String>>,
) -> Result<Permit, Denial> {
    let mut grants = BTreeMap::new();
    for (d, fields) in datasets {
        grants.insert(
            d.clone(),
            grant_for(rules, forwarded.then_some(via), origin, purpose, d, fields)?,
        );
    }
    Ok(Permit {
        origin: origin.clone(),
        via: via.clone(),
        purpose: purpose.map(str::to_string),
        grants,
    })
}

/// The data owner reading its own data on its own machine (`fedgate check`). This is
/// not reachable from the network: gRPC handlers only call [`authorize`].
pub fn owner_permit(owner: &Principal, datasets: &BTreeSet<String>) -> Permit {
    Permit {
        origin: owner.clone(),
        via: owner.clone(),
        purpose: None,
        grants: datasets
            .iter()
            .map(|d| {
                (
                    d.clone(),
                    Grant {
                        rule: usize::MAX,
                        level: AccessLevel::Rows,
                        masks: BTreeMap::new(),
                        dimensions: BTreeSet::new(),
                        keys: BTreeSet::new(),
                    },
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(i: usize, p: &str, d: &str, level: AccessLevel) -> AccessRule {
        AccessRule {
            index: i,
            principals: vec![p.into()],
            datasets: vec![d.into()],
            level,
            masks: BTreeMap::new(),
            dimensions: BTreeSet::new(),
            keys: BTreeSet::new(),
            purposes: Vec::new(),
            via: Vec::new(),
        }
    }

    fn set(v: &[&str]) -> BTreeMap<String, Vec<String>> {
        v.iter()
            .map(|s| (s.to_string(), vec!["id".to_string(), "name".to_string()]))
            .collect()
    }

    #[test]
    fn first_matching_rule_decides_and_default_is_deny() {
        let rules = vec![
            rule(0, "fedgate://yrd/county/*", "census", AccessLevel::Deny),
            rule(1, "fedgate://yrd/*", "*", AccessLevel::Rows),
        ];
        let county = Principal::parse("fedgate://yrd/county/anji").unwrap();
        let office = Principal::parse("fedgate://yrd/office/coordination").unwrap();
        let other = Principal::parse("fedgate://elsewhere/city/x").unwrap();
        let via = Principal::parse("fedgate://yrd/city/hefei").unwrap();

        let p = authorize(
            &rules,
            &via,
            true,
            &office,
            None,
            &set(&["census", "divisions"]),
        )
        .unwrap();
        assert_eq!(p.origin(), &office);
        assert_eq!(p.grants().len(), 2);
        assert_eq!(p.grants()["census"].rule, 1);

        let d = authorize(&rules, &via, true, &county, None, &set(&["census"])).unwrap_err();
        assert_eq!(d.rule, Some(0));
        assert!(authorize(&rules, &via, true, &county, None, &set(&["divisions"])).is_ok());

        let d = authorize(&rules, &via, true, &other, None, &set(&["divisions"])).unwrap_err();
        assert_eq!(d.rule, None);
        assert!(d.to_string().contains("no access rule grants it"));
    }

    #[test]
    fn purposes_gate_rules_and_denials_name_them() {
        let mut masked = rule(
            0,
            "fedgate://yrd/county/*",
            "enrollment",
            AccessLevel::Masked,
        );
        masked.purposes = vec!["insurance-transfer".into()];
        masked.masks.insert("id".into(), Mask::IdKeepEnds);
        masked.masks.insert("phone".into(), Mask::Phone);
        let rules = vec![masked];
        let county = Principal::parse("fedgate://yrd/county/anji").unwrap();
        let ds = set(&["enrollment"]);

        let d = authorize(&rules, &county, false, &county, None, &ds).unwrap_err();
        assert_eq!(d.rule, None);
        assert!(d.to_string().contains("insurance-transfer"), "{d}");
        let d = authorize(&rules, &county, false, &county, Some("curiosity"), &ds).unwrap_err();
        assert_eq!(d.purposes, vec!["insurance-transfer".to_string()]);

        let p = authorize(
            &rules,
            &county,
            false,
            &county,
            Some("insurance-transfer: AJ-2026-17"),
            &ds,
        )
        .unwrap();
        let g = &p.grants()["enrollment"];
        assert_eq!(g.level, AccessLevel::Masked);
        // Only masks of fields the dataset has are kept.
        assert_eq!(g.masks.keys().collect::<Vec<_>>(), vec!["id"]);
        assert_eq!(p.purpose(), Some("insurance-transfer: AJ-2026-17"));
    }

    #[test]
    fn a_rule_naming_gateways_applies_only_through_them_or_asked_here() {
        let mut r = rule(0, "fedgate://yrd/office/*", "census", AccessLevel::Rows);
        r.via = vec!["fedgate://yrd/office/*".into()];
        let rules = vec![r];
        let office = Principal::parse("fedgate://yrd/office/coordination").unwrap();
        let city = Principal::parse("fedgate://yrd/city/hefei").unwrap();
        let ds = set(&["census"]);
        // Through the office's own gateway.
        assert!(authorize(&rules, &office, true, &office, None, &ds).is_ok());
        // Through a city's gateway: refused, and the denial names the gateways.
        let d = authorize(&rules, &city, true, &office, None, &ds).unwrap_err();
        assert_eq!(d.rule, None);
        assert!(
            d.to_string()
                .contains("only through the gateways: fedgate://yrd/office/*"),
            "{d}"
        );
        // Asked at this member's own gateway: no other gateway spoke for the caller.
        assert!(authorize(&rules, &city, false, &office, None, &ds).is_ok());
    }

    #[test]
    fn purpose_form_is_checked() {
        assert!(validate_purpose("epidemic-response: HZ-1").is_ok());
        assert!(validate_purpose(": x").is_err());
        assert!(validate_purpose("a\nb").is_err());
        assert!(validate_purpose(&"x".repeat(201)).is_err());
        assert_eq!(purpose_code(" audit : 12"), "audit");
    }
}
