//! One PostgreSQL connection's session: who it is (its certificate's identity), the
//! settings it has made with `SET`, the notices waiting to be sent, and the switch a
//! cancel request flips.
//!
//! Settings are parsed here, not by a SQL engine: `SET`, `SHOW` and `RESET` of
//! fedgate's own settings change how this connection's queries are asked, and the
//! settings that drivers send on connecting (`extra_float_digits`, `DateStyle`,
//! `application_name`, ...) are kept so that `SHOW` answers what was set.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::trust::identity::Principal;

/// fedgate's own settings, as `SET fedgate.<name>` changes them.
pub const PURPOSE: &str = "fedgate.purpose";
/// Whether an answer may miss members (`on`/`off`).
pub const ALLOW_PARTIAL: &str = "fedgate.allow_partial";
/// The caller's time budget for each query (`5s`, `500ms`, `0` for the gateway's).
pub const TIMEOUT: &str = "fedgate.timeout";

/// Settings a connection starts with, and what `SHOW` answers for them. Clients read
/// several of these on connecting (JDBC reads `server_version` and the time zone,
/// SQLAlchemy `standard_conforming_strings`, DBeaver `search_path`).
const DEFAULTS: &[(&str, &str)] = &[
    ("application_name", ""),
    ("client_encoding", "UTF8"),
    ("datestyle", "ISO, MDY"),
    ("default_transaction_isolation", "read committed"),
    ("default_transaction_read_only", "on"),
    ("extra_float_digits", "1"),
    ("integer_datetimes", "on"),
    ("intervalstyle", "postgres"),
    ("lc_collate", "C"),
    ("lc_ctype", "C"),
    ("max_identifier_length", "63"),
    ("search_path", "canonical"),
    ("server_encoding", "UTF8"),
    ("server_version", "16.6 (fedgate)"),
    ("server_version_num", "160006"),
    ("standard_conforming_strings", "on"),
    ("statement_timeout", "0"),
    ("timezone", "UTC"),
    ("transaction_isolation", "read committed"),
    ("transaction_read_only", "on"),
    (PURPOSE, ""),
    (ALLOW_PARTIAL, "off"),
    (TIMEOUT, "0"),
];

/// A connection's session.
#[derive(Debug)]
pub struct Session {
    /// The identity of the client certificate: every query runs as it.
    pub origin: Principal,
    settings: Mutex<BTreeMap<String, String>>,
    notices: Mutex<Vec<Notice>>,
    /// Bumped by each cancel request; a running answer watches it.
    cancel: tokio::sync::watch::Sender<u64>,
}

/// A notice to send once the current command's rows are out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// `NOTICE` or `WARNING`.
    pub severity: &'static str,
    /// The SQLSTATE (`00000`, or `01000` for a warning).
    pub code: &'static str,
    /// The message.
    pub message: String,
    /// More detail (the per-member summary as JSON).
    pub detail: Option<String>,
}

/// What a query asks with, from the session's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AskSettings {
    /// `fedgate.purpose`.
    pub purpose: String,
    /// `fedgate.allow_partial`.
    pub allow_partial: bool,
    /// `fedgate.timeout` and `statement_timeout`, whichever are set.
    pub timeouts: Vec<Duration>,
}

/// A session statement: one the door answers itself, without a query engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `SET name = value` (or `TO`), `SET SESSION ...`, `SET TIME ZONE ...`.
    Set { name: String, value: String },
    /// `RESET name` (`RESET ALL`: name `all`).
    Reset { name: String },
    /// `SHOW name` (`SHOW ALL`: name `all`).
    Show { name: String },
    /// `BEGIN`, `START TRANSACTION`, `COMMIT`, `END`, `ROLLBACK`, `ABORT`: every
    /// query is read-only and stands alone, so these are accepted and change nothing.
    Transaction { begin: bool, tag: &'static str },
    /// `DISCARD ALL` and friends (connection pools send them).
    Discard,
    /// `SAVEPOINT`, `RELEASE [SAVEPOINT]`, `ROLLBACK TO [SAVEPOINT]` (psycopg's nested
    /// transactions send them): accepted, and like transactions they change nothing.
    Savepoint { tag: &'static str },
}

impl Session {
    /// A new session for `origin`, with the application name the client sent.
    pub fn new(origin: Principal, startup: &std::collections::HashMap<String, String>) -> Session {
        let mut settings: BTreeMap<String, String> = DEFAULTS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for key in [
            "application_name",
            "client_encoding",
            "datestyle",
            "timezone",
        ] {
            if let Some((_, v)) = startup.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)) {
                settings.insert(key.to_string(), v.clone());
            }
        }
        let (cancel, _) = tokio::sync::watch::channel(0);
        Session {
            origin,
            settings: Mutex::new(settings),
            notices: Mutex::new(Vec::new()),
            cancel,
        }
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a `SET`, checking fedgate's own settings' values.
    pub fn set(&self, name: &str, value: &str) -> Result<()> {
        let name = canonical_name(name);
        let value = match name.as_str() {
            PURPOSE => value.to_string(),
            ALLOW_PARTIAL => bool_word(value)
                .ok_or_else(|| {
                    Error::InvalidQuery(format!(
                        "{ALLOW_PARTIAL} takes on or off (true/false, yes/no, 1/0), not {value:?}"
                    ))
                })?
                .to_string(),
            TIMEOUT => {
                parse_timeout(value).map_err(|e| Error::InvalidQuery(format!("{TIMEOUT}: {e}")))?;
                value.to_string()
            }
            "statement_timeout" => {
                parse_timeout(value)
                    .map_err(|e| Error::InvalidQuery(format!("statement_timeout: {e}")))?;
                value.to_string()
            }
            n if n.starts_with("fedgate.") => {
                return Err(Error::InvalidQuery(format!(
                    "unrecognized configuration parameter {n:?}; fedgate's settings are \
                     {PURPOSE}, {ALLOW_PARTIAL} and {TIMEOUT}"
                )));
            }
            _ => value.to_string(),
        };
        self.settings().insert(name, value);
        Ok(())
    }

    /// Applies a `RESET`.
    pub fn reset(&self, name: &str) {
        let name = canonical_name(name);
        let mut s = self.settings();
        for (k, v) in DEFAULTS {
            if name == "all" || *k == name {
                s.insert(k.to_string(), v.to_string());
            }
        }
        if name != "all" && !DEFAULTS.iter().any(|(k, _)| *k == name) {
            s.remove(&name);
        }
    }

    /// What `SHOW name` answers: (column name, rows of (name, value)).
    pub fn show(&self, name: &str) -> Result<(String, Vec<(String, String)>)> {
        let name = canonical_name(name);
        let s = self.settings();
        if name == "all" {
            return Ok((
                "all".into(),
                s.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ));
        }
        match s.get(&name) {
            Some(v) => Ok((name.clone(), vec![(name, v.clone())])),
            None => Err(Error::NotFound(format!(
                "unrecognized configuration parameter {name:?}"
            ))),
        }
    }

    /// The settings a query is asked with.
    pub fn ask_settings(&self) -> AskSettings {
        let s = self.settings();
        let get = |k: &str| s.get(k).map(String::as_str).unwrap_or("");
        let timeouts = [get(TIMEOUT), get("statement_timeout")]
            .into_iter()
            .filter_map(|v| parse_timeout(v).ok().flatten())
            .collect();
        AskSettings {
            purpose: get(PURPOSE).to_string(),
            allow_partial: bool_word(get(ALLOW_PARTIAL)) == Some("on"),
            timeouts,
        }
    }

    /// Queues a notice for the end of the current command.
    pub fn notice(&self, n: Notice) {
        self.notices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(n);
    }

    /// The notices queued so far, oldest first.
    pub fn take_notices(&self) -> Vec<Notice> {
        std::mem::take(&mut *self.notices.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Cancels whatever this connection is running now.
    pub fn cancel(&self) {
        self.cancel.send_modify(|n| *n += 1);
    }

    /// A receiver that sees the next cancel request (not earlier ones).
    pub fn cancelled(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut rx = self.cancel.subscribe();
        rx.borrow_and_update();
        rx
    }
}

/// Setting names are case-insensitive; PostgreSQL's own ones are known by their
/// lower-case names.
pub fn canonical_name(name: &str) -> String {
    let n = name.trim().trim_matches('"').to_ascii_lowercase();
    match n.as_str() {
        "transaction isolation level" => "transaction_isolation".into(),
        "time zone" | "time_zone" => "timezone".into(),
        "names" => "client_encoding".into(),
        _ => n,
    }
}

/// PostgreSQL's boolean words.
fn bool_word(v: &str) -> Option<&'static str> {
    match v.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" | "t" | "y" => Some("on"),
        "off" | "false" | "no" | "0" | "f" | "n" => Some("off"),
        _ => None,
    }
}

/// A time budget: `5s`, `500ms`, `2min`, or a bare number of milliseconds as
/// PostgreSQL's `statement_timeout` takes it; `0` means none.
fn parse_timeout(v: &str) -> std::result::Result<Option<Duration>, String> {
    let v = v.trim();
    let d = if let Ok(ms) = v.parse::<u64>() {
        Duration::from_millis(ms)
    } else {
        humantime::parse_duration(&v.replace(' ', ""))
            .map_err(|e| format!("{v:?} is not a duration such as 5s or 500ms: {e}"))?
    };
    Ok((!d.is_zero()).then_some(d))
}

/// Recognizes a session statement from its text; `None` for anything else (a query,
/// or a statement the door refuses).
pub fn command(sql: &str) -> Option<Command> {
    let text = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let first = words.first()?.to_ascii_uppercase();
    let upper = |i: usize| words.get(i).map(|w| w.to_ascii_uppercase());
    match first.as_str() {
        "SET" => {
            let mut rest = text[3..].trim_start();
            for scope in ["SESSION ", "LOCAL "] {
                if rest.len() >= scope.len() && rest[..scope.len()].eq_ignore_ascii_case(scope) {
                    rest = rest[scope.len()..].trim_start();
                }
            }
            if rest.len() >= 9 && rest[..9].eq_ignore_ascii_case("TIME ZONE") {
                return Some(Command::Set {
                    name: "timezone".into(),
                    value: unquote(rest[9..].trim()),
                });
            }
            if rest.len() >= 5 && rest[..5].eq_ignore_ascii_case("NAMES") {
                return Some(Command::Set {
                    name: "client_encoding".into(),
                    value: unquote(rest[5..].trim()),
                });
            }
            let (name, value) = match rest.find('=') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => {
                    let lower = rest.to_ascii_lowercase();
                    let i = lower.find(" to ")?;
                    (&rest[..i], &rest[i + 4..])
                }
            };
            Some(Command::Set {
                name: name.trim().to_string(),
                value: unquote(value.trim()),
            })
        }
        "RESET" if words.len() == 2 => Some(Command::Reset {
            name: words[1].to_string(),
        }),
        "SHOW" if words.len() >= 2 => Some(Command::Show {
            name: words[1..].join(" "),
        }),
        "BEGIN" | "START" if first == "BEGIN" || upper(1).as_deref() == Some("TRANSACTION") => {
            Some(Command::Transaction {
                begin: true,
                tag: "BEGIN",
            })
        }
        "COMMIT" | "END" => Some(Command::Transaction {
            begin: false,
            tag: "COMMIT",
        }),
        "SAVEPOINT" => Some(Command::Savepoint { tag: "SAVEPOINT" }),
        "RELEASE" => Some(Command::Savepoint { tag: "RELEASE" }),
        "ROLLBACK" if upper(1).as_deref() == Some("TO") => {
            Some(Command::Savepoint { tag: "ROLLBACK" })
        }
        "ROLLBACK" | "ABORT" => Some(Command::Transaction {
            begin: false,
            tag: "ROLLBACK",
        }),
        "DISCARD" => Some(Command::Discard),
        _ => None,
    }
}

/// A setting's value as written: quotes removed (`''` inside stays one quote); a
/// list of values stays as written.
fn unquote(v: &str) -> String {
    let v = v.trim();
    if v.len() >= 2
        && v.starts_with('\'')
        && v.ends_with('\'')
        && !v[1..v.len() - 1].contains("','")
    {
        v[1..v.len() - 1].replace("''", "'")
    } else if v.eq_ignore_ascii_case("default") {
        String::new()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session::new(
            Principal::parse("fedgate://yrd/office/office").unwrap(),
            &Default::default(),
        )
    }

    #[test]
    fn set_statements_are_recognized_in_the_forms_drivers_send() {
        assert_eq!(
            command("SET fedgate.purpose = 'flood response'"),
            Some(Command::Set {
                name: "fedgate.purpose".into(),
                value: "flood response".into()
            })
        );
        assert_eq!(
            command("set SESSION extra_float_digits TO 3;"),
            Some(Command::Set {
                name: "extra_float_digits".into(),
                value: "3".into()
            })
        );
        assert_eq!(
            command("SET TIME ZONE 'Asia/Shanghai'"),
            Some(Command::Set {
                name: "timezone".into(),
                value: "Asia/Shanghai".into()
            })
        );
        assert_eq!(
            command("SET application_name = 'it''s'"),
            Some(Command::Set {
                name: "application_name".into(),
                value: "it's".into()
            })
        );
        assert_eq!(
            command("show transaction isolation level"),
            Some(Command::Show {
                name: "transaction isolation level".into()
            })
        );
        assert!(matches!(
            command("BEGIN READ ONLY"),
            Some(Command::Transaction { begin: true, .. })
        ));
        assert_eq!(
            command("ROLLBACK TO SAVEPOINT _pg3_1"),
            Some(Command::Savepoint { tag: "ROLLBACK" })
        );
        assert!(matches!(
            command("rollback"),
            Some(Command::Transaction { begin: false, .. })
        ));
        assert_eq!(command("SELECT 1"), None);
        assert_eq!(command("SETTLE"), None);
    }

    #[test]
    fn fedgate_settings_reject_bad_values_and_shape_the_ask() {
        let s = session();
        assert_eq!(s.ask_settings(), AskSettings::default());
        s.set("fedgate.allow_partial", "on").unwrap();
        s.set("FEDGATE.PURPOSE", "census review").unwrap();
        s.set("fedgate.timeout", "5s").unwrap();
        s.set("statement_timeout", "2500").unwrap();
        let a = s.ask_settings();
        assert!(a.allow_partial);
        assert_eq!(a.purpose, "census review");
        assert_eq!(
            a.timeouts,
            vec![Duration::from_secs(5), Duration::from_millis(2500)]
        );
        let e = s.set("fedgate.allow_partial", "perhaps").unwrap_err();
        assert!(e.to_string().contains("on or off"), "{e}");
        let e = s.set("fedgate.timeout", "soon").unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
        let e = s.set("fedgate.colour", "blue").unwrap_err();
        assert!(e.to_string().contains("fedgate.purpose"), "{e}");
        assert_eq!(
            s.show("fedgate.allow_partial").unwrap().1,
            vec![("fedgate.allow_partial".into(), "on".into())]
        );
        s.reset("all");
        assert_eq!(s.ask_settings(), AskSettings::default());
        assert!(s.show("no_such_thing").is_err());
    }

    #[test]
    fn a_cancel_reaches_receivers_taken_before_it_only() {
        let s = session();
        s.cancel();
        let mut rx = s.cancelled();
        assert!(!rx.has_changed().unwrap());
        s.cancel();
        assert!(rx.has_changed().unwrap());
        let _ = rx.borrow_and_update();
        assert!(!rx.has_changed().unwrap());
    }
}
