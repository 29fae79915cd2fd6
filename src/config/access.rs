//! The validated access rules of a member file: levels, field masks and purposes. The
//! decisions made with them are in `owner::policy`, the masks' functions in
//! `owner::masking`; the types live here so that configuration depends on no module
//! that uses it.

use std::collections::{BTreeMap, BTreeSet};

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
