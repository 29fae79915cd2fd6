//! Live reload: the configuration and certificate files are watched (polled, and on
//! SIGHUP); a changed set is validated and built into a new [`Generation`] that replaces
//! the running one whole, or refused with every problem while the running one stays.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::generation::{Generation, tls_digest};
use crate::config::MemberConfig;
use crate::ops::audit::AuditLog;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The files say what the running configuration says.
    Unchanged,
    /// A new configuration (or certificate) is in force.
    Applied {
        /// Its version.
        version: String,
    },
    /// The new files were refused; the running configuration stays.
    Rejected {
        /// Every problem found.
        reason: String,
    },
}

/// How often the configuration and certificate files are checked for changes.
pub(super) const RELOAD_POLL: Duration = Duration::from_secs(1);

/// (length, modification time) of a file, or `None` if it cannot be read.
pub(super) type Stamp = Option<(u64, std::time::SystemTime)>;

fn stamp(p: &std::path::Path) -> Stamp {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Reloads a gateway's configuration and certificates.
pub(super) struct Reloader {
    pub(super) path: std::path::PathBuf,
    pub(super) current: Arc<ArcSwap<Generation>>,
    pub(super) tls: Arc<ArcSwap<rustls::ServerConfig>>,
    pub(super) http_tls: Arc<ArcSwap<rustls::ServerConfig>>,
    pub(super) postgres_tls: Arc<ArcSwap<rustls::ServerConfig>>,
    pub(super) audit: Arc<AuditLog>,
    pub(super) observer: Arc<crate::ops::observe::Observer>,
    /// The watched files as last seen.
    pub(super) seen: std::sync::Mutex<Vec<(std::path::PathBuf, Stamp)>>,
    /// One reload at a time.
    pub(super) busy: tokio::sync::Mutex<()>,
    /// The admission doors of earlier generations (replaced when their limits
    /// changed): queries admitted there still hold their slots, and a drain waits for
    /// them too. Each goes when its last ticket does.
    pub(super) retired: std::sync::Mutex<Vec<std::sync::Weak<crate::ops::admission::Admission>>>,
}

impl Reloader {
    pub(super) fn watched(config: &MemberConfig) -> Vec<std::path::PathBuf> {
        let mut files = vec![config.path.clone(), config.region.path.clone()];
        // The CA, certificate and key, code tables, secrets and database TLS files.
        files.extend(config.files.iter().cloned());
        files
    }

    pub(super) fn look(
        config: &MemberConfig,
    ) -> Vec<(std::path::PathBuf, Option<(u64, std::time::SystemTime)>)> {
        Self::watched(config)
            .into_iter()
            .map(|p| {
                let s = stamp(&p);
                (p, s)
            })
            .collect()
    }

    /// Whether a watched file changed since it was last seen.
    pub(super) fn changed(&self) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter().any(|(p, s)| stamp(p) != *s)
    }

    pub(super) async fn reload(&self) -> ReloadOutcome {
        let _one = self.busy.lock().await;
        let old = self.current.load_full();
        // Seen before reading, so a change made while this reload runs is noticed
        // by the next check.
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Self::look(&old.config);
        let outcome = self.try_reload(&old).await;
        match &outcome {
            ReloadOutcome::Applied { version } => {
                tracing::info!(member = %old.config.member.name, from = %old.config.version, to = %version, "Configuration reloaded");
            }
            ReloadOutcome::Rejected { reason } => {
                tracing::error!(member = %old.config.member.name, version = %old.config.version, "New configuration refused; the running one stays:\n{reason}");
            }
            ReloadOutcome::Unchanged => {}
        }
        outcome
    }

    async fn try_reload(&self, old: &Generation) -> ReloadOutcome {
        match self.try_whole(old).await {
            ReloadOutcome::Rejected { reason } => ReloadOutcome::Rejected {
                reason: match self.trust_alone(old).await {
                    Some(version) => format!(
                        "{reason}\nThe changed trust files (CA, revocation lists, this \
                         gateway's certificate) are in force nonetheless, with the running \
                         configuration ({version})."
                    ),
                    None => reason,
                },
            },
            other => other,
        }
    }

    /// After a refused reload: when the trust files changed (the CA, the revocation
    /// lists, this gateway's certificate and key), the running configuration rebuilt
    /// with them as they now are. A revocation must not wait for an unrelated fix, such
    /// as an edit that takes a restart or a source that does not load. `None` when
    /// they did not change or do not load either (logged).
    async fn trust_alone(&self, old: &Generation) -> Option<String> {
        if tls_digest(&old.config) == old.tls_digest {
            return None;
        }
        match Generation::build(
            old.config.clone(),
            self.audit.clone(),
            self.observer.clone(),
            Some(old),
        )
        .await
        {
            Ok(g) => Some(self.install(old, g)),
            Err(e) => {
                tracing::error!(member = %old.config.member.name, error = %e, "The changed trust files do not load with the running configuration either");
                None
            }
        }
    }

    async fn try_whole(&self, old: &Generation) -> ReloadOutcome {
        let rejected = |reason: String| ReloadOutcome::Rejected { reason };
        let config = match MemberConfig::load(&self.path) {
            Ok(c) => c,
            Err(problems) => return rejected(problems.to_string()),
        };
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Self::look(&config);
        if config.version == old.config.version && tls_digest(&config) == old.tls_digest {
            return ReloadOutcome::Unchanged;
        }
        for (what, changed) in [
            ("listen", config.listen != old.config.listen),
            ("member", config.member.name != old.config.member.name),
            ("audit", config.audit_path != old.config.audit_path),
            (
                "audit_export",
                config.audit_export != old.config.audit_export,
            ),
            ("http", config.http != old.config.http),
            ("postgres", config.postgres != old.config.postgres),
            ("lifecycle", config.lifecycle != old.config.lifecycle),
            (
                "telemetry",
                config.otlp_endpoint != old.config.otlp_endpoint,
            ),
        ] {
            if changed {
                return rejected(format!(
                    "{}: `{what}` changed; that takes a restart",
                    self.path.display()
                ));
            }
        }
        match Generation::build(
            Arc::new(config),
            self.audit.clone(),
            self.observer.clone(),
            Some(old),
        )
        .await
        {
            Ok(g) => ReloadOutcome::Applied {
                version: self.install(old, g),
            },
            Err(e) => rejected(e.to_string()),
        }
    }
}

impl Reloader {
    /// Puts `g` in force in place of `old`: its TLS configurations on every port, then
    /// the generation itself. Returns its version.
    fn install(&self, old: &Generation, g: Generation) -> String {
        let version = g.config.version.clone();
        {
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            retired.retain(|w| w.strong_count() > 0);
            for (was, now) in [
                (&old.federation.admission, &g.federation.admission),
                (&old.peer.admission, &g.peer.admission),
            ] {
                if !Arc::ptr_eq(was, now) {
                    retired.push(Arc::downgrade(was));
                }
            }
        }
        self.tls.store(g.server_tls.clone());
        self.http_tls.store(g.http_tls.clone());
        self.postgres_tls.store(g.postgres_tls.clone());
        self.current.store(Arc::new(g));
        version
    }

    /// Slots held on the doors of earlier generations.
    pub(super) fn retired_in_use(&self) -> usize {
        let retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired
            .iter()
            .filter_map(|w| w.upgrade())
            .map(|a| a.in_use().values().sum::<usize>())
            .sum()
    }
}

/// Waits for SIGHUP (forever where there are no signals).
pub(super) async fn hangup(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
