//! Access decisions at the data owner.
//!
//! [`authorize`] is a pure function from (calling gateway, original caller, datasets
//! asked for, the member's rules) to a [`Permit`] or a denial. The local engine only
//! runs a query together with a `Permit`, and a `Permit` can only be made here, so a
//! code path that skips authorization does not compile.
//!
//! Rules are evaluated in file order; the first rule whose principal pattern and
//! dataset list match decides. Nothing is shared unless a rule says so.

use std::collections::BTreeSet;

use crate::identity::{Principal, matches_pattern};

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLevel {
    /// Rows as mapped.
    Rows,
    /// Nothing.
    Deny,
}

/// A compiled access rule from a member's config.
#[derive(Debug, Clone)]
pub struct AccessRule {
    /// Position in the member file, so denials can name the rule.
    pub index: usize,
    /// Principal patterns.
    pub principals: Vec<String>,
    /// Datasets or `*`.
    pub datasets: Vec<String>,
    /// What it grants.
    pub level: AccessLevel,
}

impl AccessRule {
    fn applies(&self, p: &Principal, dataset: &str) -> bool {
        self.principals.iter().any(|pat| matches_pattern(pat, p))
            && self.datasets.iter().any(|d| d == "*" || d == dataset)
    }
}

/// Proof that `origin`, asking through `via`, may read `datasets` here.
///
/// Fields are private and there is no public constructor: only [`authorize`] makes one.
#[derive(Debug, Clone)]
pub struct Permit {
    origin: Principal,
    via: Principal,
    datasets: BTreeSet<String>,
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

    /// The datasets this permit covers.
    pub fn datasets(&self) -> &BTreeSet<String> {
        &self.datasets
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The dataset refused.
    pub dataset: String,
    /// The rule that refused it, or `None` when no rule matched (default deny).
    pub rule: Option<usize>,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rule {
            Some(i) => write!(f, "dataset {} is denied by access[{i}]", self.dataset),
            None => write!(
                f,
                "dataset {} is not shared with this caller (no access rule grants it)",
                self.dataset
            ),
        }
    }
}

/// Decides whether `origin` (through gateway `via`) may read every dataset in `datasets`.
pub fn authorize(
    rules: &[AccessRule],
    via: &Principal,
    origin: &Principal,
    datasets: &BTreeSet<String>,
) -> Result<Permit, Denial> {
    for d in datasets {
        let rule = rules.iter().find(|r| r.applies(origin, d));
        match rule {
            Some(r) if r.level == AccessLevel::Rows => {}
            Some(r) => {
                return Err(Denial {
                    dataset: d.clone(),
                    rule: Some(r.index),
                });
            }
            None => {
                return Err(Denial {
                    dataset: d.clone(),
                    rule: None,
                });
            }
        }
    }
    Ok(Permit {
        origin: origin.clone(),
        via: via.clone(),
        datasets: datasets.clone(),
    })
}

/// The data owner reading its own data on its own machine (`fedgate check`). This is
/// not reachable from the network: gRPC handlers only call [`authorize`].
pub fn owner_permit(owner: &Principal, datasets: &BTreeSet<String>) -> Permit {
    Permit {
        origin: owner.clone(),
        via: owner.clone(),
        datasets: datasets.clone(),
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
        }
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
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

        let p = authorize(&rules, &via, &office, &set(&["census", "divisions"])).unwrap();
        assert_eq!(p.origin(), &office);
        assert_eq!(p.datasets().len(), 2);

        let d = authorize(&rules, &via, &county, &set(&["census"])).unwrap_err();
        assert_eq!(d.rule, Some(0));
        assert!(authorize(&rules, &via, &county, &set(&["divisions"])).is_ok());

        let d = authorize(&rules, &via, &other, &set(&["divisions"])).unwrap_err();
        assert_eq!(d.rule, None);
        assert!(d.to_string().contains("no access rule grants it"));
    }
}
