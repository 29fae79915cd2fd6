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
use std::time::SystemTime;

use crate::owner::masking::Mask;
use crate::trust::identity::{Principal, matches_pattern};
use crate::trust::incident::{Declaration, rfc3339};

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

    /// For an emergency rule: whether the incident the query is asked under lets it
    /// apply to `dataset` (with `fields`), or why not. `None` for a peacetime rule.
    fn incident_ok(
        &self,
        incident: Option<&Incident<'_>>,
        purpose: Option<&str>,
        dataset: &str,
        fields: &[String],
    ) -> Option<Result<(), String>> {
        let terms = self.incident.as_ref()?;
        let Some(i) = incident else {
            return Some(Err(String::new()));
        };
        let d = i.declaration;
        let n = d.number();
        let why = if !terms
            .declarers
            .iter()
            .any(|pat| matches_pattern(pat, &d.declarer))
        {
            format!(
                "{} emergency rule honours declarations of {} (incident {n} is declared by {})",
                self.name(),
                terms.declarers.join(", "),
                d.declarer
            )
        } else if !d.in_force(i.now) {
            format!(
                "incident {n} is not in force here (its latest declaration here, kind {}, covers {} to {})",
                d.kind.word(),
                rfc3339(d.body.starts_ms),
                rfc3339(d.body.ends_ms)
            )
        } else if d.window() > terms.max_window {
            format!(
                "incident {n} runs {} h, longer than the {} h {} honours (renew it in shorter steps)",
                d.window().as_secs().div_ceil(3600),
                terms.max_window.as_secs() / 3600,
                self.name()
            )
        } else if !d.body.datasets.iter().any(|x| x == dataset) {
            format!("incident {n} does not open dataset {dataset}")
        } else if let Some(c) = d.body.scope.iter().find(|c| !fields.contains(&c.field)) {
            format!(
                "the scope of incident {n} names the field {}, which dataset {dataset} does not have",
                c.field
            )
        } else if let Some(c) = d
            .body
            .scope
            .iter()
            .find(|c| self.masks.contains_key(&c.field))
        {
            // A scope over a masked field would tell its values by which rows come back.
            format!(
                "the scope of incident {n} names the field {}, which {} masks",
                c.field,
                self.name()
            )
        } else if let Some(c) = d.body.scope.iter().find(|c| match self.level {
            // Over whole cells only (no two scopes differ by less than a cell), and over
            // the stated keys only.
            AccessLevel::Aggregate { .. } => !self.dimensions.contains(&c.field),
            AccessLevel::Verify => !self.keys.contains(&c.field),
            _ => false,
        }) {
            format!(
                "the scope of incident {n} names the field {}, which is not one of the {} of {}",
                c.field,
                if matches!(self.level, AccessLevel::Verify) {
                    "keys"
                } else {
                    "dimensions"
                },
                self.name()
            )
        } else if !d.body.purposes.is_empty()
            && !purpose.is_some_and(|p| d.body.purposes.iter().any(|x| x == purpose_code(p)))
        {
            format!(
                "incident {n} covers the purposes {}; state one of them",
                d.body.purposes.join(", ")
            )
        } else {
            return Some(Ok(()));
        };
        Some(Err(why))
    }
}

/// The incident a query is asked under, as this owner sees it: the latest declaration
/// it holds for the stated incident, and the time of the decision.
#[derive(Debug, Clone, Copy)]
pub struct Incident<'a> {
    /// The declaration in force for this (declarer, number), the latest issued.
    pub declaration: &'a Declaration,
    /// Now.
    pub now: SystemTime,
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
    /// Under an emergency rule: the incident's number and the rows its scope opens
    /// (`field IN (values)`, all of them); the dataset's view holds only those rows.
    pub incident: Option<Scope>,
    /// Why the emergency rules before the granting one did not apply under the
    /// incident the query stated (so a caller granted less knows why).
    pub passed_over: Vec<String>,
}

/// The rows an incident opens, as a grant carries them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// The incident's number.
    pub number: String,
    /// Conditions, each a field and its allowed values (compared as text).
    pub conditions: Vec<(String, Vec<String>)>,
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
            incident: None,
            passed_over: Vec::new(),
        }
    }

    /// Whether the grant reads the dataset's view unchanged (rows, no mask, no scope).
    pub fn is_plain(&self) -> bool {
        self.level == AccessLevel::Rows && self.masks.is_empty() && self.incident.is_none()
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
        if let Some(scope) = &self.incident {
            let conditions: Vec<crate::proto::v1::ScopeCondition> = scope
                .conditions
                .iter()
                .map(|(f, v)| crate::proto::v1::ScopeCondition {
                    field: f.clone(),
                    values: v.clone(),
                })
                .collect();
            s.push_str(&format!(
                " under incident {} within {}",
                scope.number,
                crate::trust::incident::scope_text(&conditions)
            ));
        }
        let mut s = format!("{s} by {}", self.rule_name());
        if !self.passed_over.is_empty() {
            s.push_str(&format!(" ({})", self.passed_over.join("; ")));
        }
        s
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
    /// Why the emergency rules that name this caller did not apply under the incident
    /// the query stated.
    pub incident: Vec<String>,
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
        for why in &self.incident {
            write!(f, "; {why}")?;
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
    incident: Option<&Incident<'_>>,
    dataset: &str,
    fields: &[String],
) -> Result<Grant, Denial> {
    let mut wanted_purposes = Vec::new();
    let mut wanted_via = Vec::new();
    let mut incident_notes = Vec::new();
    for r in rules.iter().filter(|r| r.covers(origin, dataset)) {
        match r.incident_ok(incident, purpose, dataset, fields) {
            None | Some(Ok(())) => {}
            Some(Err(why)) => {
                if !why.is_empty() {
                    incident_notes.push(why);
                }
                continue;
            }
        }
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
                incident: incident_notes,
            });
        }
        let mut grant = Grant::from_rule(r, fields);
        grant.passed_over = incident_notes;
        if r.incident.is_some()
            && let Some(i) = incident
        {
            grant.incident = Some(Scope {
                number: i.declaration.number().to_string(),
                conditions: i
                    .declaration
                    .body
                    .scope
                    .iter()
                    .map(|c| (c.field.clone(), c.values.clone()))
                    .collect(),
            });
        }
        return Ok(grant);
    }
    wanted_purposes.dedup();
    wanted_via.dedup();
    Err(Denial {
        dataset: dataset.into(),
        rule: None,
        purposes: wanted_purposes,
        via: wanted_via,
        incident: incident_notes,
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
    incident: Option<&Incident<'_>>,
    datasets: &BTreeMap<String, Vec<String>>,
) -> Result<Permit, Denial> {
    let mut grants = BTreeMap::new();
    for (d, fields) in datasets {
        grants.insert(
            d.clone(),
            grant_for(
                rules,
                forwarded.then_some(via),
                origin,
                purpose,
                incident,
                d,
                fields,
            )?,
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
                        incident: None,
                        passed_over: Vec::new(),
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
            incident: None,
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
            None,
            &set(&["census", "divisions"]),
        )
        .unwrap();
        assert_eq!(p.origin(), &office);
        assert_eq!(p.grants().len(), 2);
        assert_eq!(p.grants()["census"].rule, 1);

        let d = authorize(&rules, &via, true, &county, None, None, &set(&["census"])).unwrap_err();
        assert_eq!(d.rule, Some(0));
        assert!(
            authorize(
                &rules,
                &via,
                true,
                &county,
                None,
                None,
                &set(&["divisions"])
            )
            .is_ok()
        );

        let d =
            authorize(&rules, &via, true, &other, None, None, &set(&["divisions"])).unwrap_err();
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

        let d = authorize(&rules, &county, false, &county, None, None, &ds).unwrap_err();
        assert_eq!(d.rule, None);
        assert!(d.to_string().contains("insurance-transfer"), "{d}");
        let d = authorize(
            &rules,
            &county,
            false,
            &county,
            Some("curiosity"),
            None,
            &ds,
        )
        .unwrap_err();
        assert_eq!(d.purposes, vec!["insurance-transfer".to_string()]);

        let p = authorize(
            &rules,
            &county,
            false,
            &county,
            Some("insurance-transfer: AJ-2026-17"),
            None,
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
        assert!(authorize(&rules, &office, true, &office, None, None, &ds).is_ok());
        // Through a city's gateway: refused, and the denial names the gateways.
        let d = authorize(&rules, &city, true, &office, None, None, &ds).unwrap_err();
        assert_eq!(d.rule, None);
        assert!(
            d.to_string()
                .contains("only through the gateways: fedgate://yrd/office/*"),
            "{d}"
        );
        // Asked at this member's own gateway: no other gateway spoke for the caller.
        assert!(authorize(&rules, &city, false, &office, None, None, &ds).is_ok());
    }

    #[test]
    fn an_emergency_rule_applies_only_under_an_honoured_incident_in_force() {
        use crate::proto::v1::{IncidentDeclaration, ScopeCondition};
        use crate::trust::incident::Kind;
        use crate::trust::statement::at_millis;
        let mut emergency = rule(0, "fedgate://yrd/office/*", "pipes", AccessLevel::Rows);
        emergency.incident = Some(crate::config::access::IncidentRule {
            declarers: vec!["fedgate://yrd/office/command".into()],
            max_window: std::time::Duration::from_secs(12 * 3600),
        });
        let peacetime = rule(
            1,
            "fedgate://yrd/office/*",
            "pipes",
            AccessLevel::Aggregate { min_group: 5 },
        );
        let both = vec![emergency.clone(), peacetime];
        let alone = vec![emergency];
        let office = Principal::parse("fedgate://yrd/office/command").unwrap();
        let fields = vec!["road".to_string(), "id".to_string()];
        let ds: BTreeMap<String, Vec<String>> = [("pipes".to_string(), fields.clone())].into();
        let hour = 3_600_000;
        let declared = Declaration {
            body: IncidentDeclaration {
                number: "HZ-7".into(),
                kind: "declare".into(),
                declarer: office.uri(),
                summary: "collapse".into(),
                datasets: vec!["pipes".into()],
                scope: vec![ScopeCondition {
                    field: "road".into(),
                    values: vec!["Wen'er Rd".into()],
                }],
                purposes: vec!["emergency".into()],
                starts_ms: hour,
                ends_ms: 5 * hour,
                issued_ms: hour,
            },
            kind: Kind::Declare,
            declarer: office.clone(),
            signed: Vec::new(),
        };
        fn at(d: &Declaration, ms: u64) -> Incident<'_> {
            Incident {
                declaration: d,
                now: at_millis(ms),
            }
        }
        let purpose = Some("emergency: HZ-7");
        let decide = |rules: &[AccessRule], i: Option<&Incident<'_>>, purpose: Option<&str>| {
            authorize(rules, &office, false, &office, purpose, i, &ds)
        };
        // Peacetime: the aggregate rule.
        let p = decide(&both, None, purpose).unwrap();
        assert_eq!(p.grants()["pipes"].rule, 1);
        // In force: rows, within the declared scope, carried by the grant.
        let p = decide(&both, Some(&at(&declared, 2 * hour)), purpose).unwrap();
        let g = &p.grants()["pipes"];
        assert_eq!((g.rule, g.level), (0, AccessLevel::Rows));
        let scope = g.incident.as_ref().unwrap();
        assert_eq!(scope.number, "HZ-7");
        assert_eq!(
            scope.conditions,
            vec![("road".to_string(), vec!["Wen'er Rd".to_string()])]
        );
        assert!(!g.is_plain());
        assert!(
            p.describe()
                .contains("under incident HZ-7 within road IN ('Wen''er Rd')")
        );
        // Each reason the emergency rule does not apply falls back to the peacetime
        // rule, and alone is a denial that says why.
        let mut other_declarer = declared.clone();
        other_declarer.declarer = Principal::parse("fedgate://yrd/county/anji").unwrap();
        let mut other_dataset = declared.clone();
        other_dataset.body.datasets = vec!["census".into()];
        let mut too_long = declared.clone();
        too_long.body.ends_ms = 14 * hour;
        let mut no_field = declared.clone();
        no_field.body.scope[0].field = "county".into();
        let mut ended = declared.clone();
        ended.kind = Kind::End;
        let cases: Vec<(&Declaration, u64, Option<&str>, &str)> = vec![
            (&declared, 6 * hour, purpose, "is not in force"),
            (&declared, hour / 2, purpose, "is not in force"),
            (&ended, 2 * hour, purpose, "is not in force"),
            (
                &other_declarer,
                2 * hour,
                purpose,
                "honours declarations of",
            ),
            (
                &other_dataset,
                2 * hour,
                purpose,
                "does not open dataset pipes",
            ),
            (&too_long, 2 * hour, purpose, "longer than the 12 h"),
            (&no_field, 2 * hour, purpose, "names the field county"),
            (
                &declared,
                2 * hour,
                Some("curiosity: 1"),
                "covers the purposes emergency",
            ),
            (&declared, 2 * hour, None, "covers the purposes emergency"),
        ];
        // A scope over a field the rule masks, or (aggregate) not over its dimensions,
        // does not open anything either.
        let mut masking = alone[0].clone();
        masking.masks.insert("road".into(), Mask::Surname);
        let mut cells = alone[0].clone();
        cells.level = AccessLevel::Aggregate { min_group: 5 };
        cells.dimensions = ["id".to_string()].into();
        for (rule, why) in [
            (masking, "which access[0] masks"),
            (cells, "not one of the dimensions"),
        ] {
            let denial = decide(&[rule], Some(&at(&declared, 2 * hour)), purpose).unwrap_err();
            assert!(
                denial.to_string().contains(why),
                "{denial} should say {why}"
            );
        }
        for (d, ms, purpose, why) in cases {
            let p = decide(&both, Some(&at(d, ms)), purpose).unwrap();
            assert_eq!(p.grants()["pipes"].rule, 1, "{why}");
            assert!(p.grants()["pipes"].incident.is_none());
            assert!(
                p.grants()["pipes"]
                    .passed_over
                    .iter()
                    .any(|n| n.contains(why)),
                "the peacetime grant says why the emergency rule did not apply: {why}"
            );
            let denial = decide(&alone, Some(&at(d, ms)), purpose).unwrap_err();
            assert_eq!(denial.rule, None);
            assert!(
                denial.to_string().contains(why),
                "{denial} should say {why}"
            );
        }
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
