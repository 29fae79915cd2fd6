//! `fedgate check`: validates a member file with its region file, its certificates
//! and its sources, and reports values that its mappings cannot convert.

use std::sync::Arc;

use crate::config::{MemberConfig, Problem};
use crate::owner::mapping;
use crate::owner::member::MemberEngine;
use crate::trust::tls::TlsMaterial;

/// What `check` found.
#[derive(Debug, Default)]
pub struct Report {
    /// Problems that stop the gateway from serving correctly.
    pub errors: Vec<Problem>,
    /// Things that do not stop it but a person should see (unconverted values).
    pub warnings: Vec<Problem>,
    /// Lines describing what was checked.
    pub checked: Vec<String>,
}

/// Checks one member configuration completely.
pub async fn check(path: &std::path::Path) -> Report {
    let mut r = Report::default();
    let cfg = match MemberConfig::load(path) {
        Ok(c) => Arc::new(c),
        Err(p) => {
            r.errors = p.0;
            return r;
        }
    };
    let problem = |key: &str, message: String| Problem {
        file: cfg.path.clone(),
        key: key.to_string(),
        message,
    };
    r.checked.push(format!(
        "member {} ({}) of region {}, config version {}",
        cfg.member.name, cfg.member.principal, cfg.region.name, cfg.version
    ));
    match TlsMaterial::load_with_crls(
        &cfg.region.ca_path,
        &cfg.region.crl_paths,
        &cfg.cert_path,
        &cfg.key_path,
    ) {
        Ok(tls) => {
            for w in expiry_warnings(&tls.expiries, chrono::Utc::now().timestamp()) {
                r.warnings.push(problem("cert", w));
            }
            if tls.principal != cfg.member.principal {
                r.errors.push(problem(
                    "cert",
                    format!(
                        "certificate identity {} is not this member's identity {}",
                        tls.principal, cfg.member.principal
                    ),
                ));
            } else if let Err(e) = tls.verify_own_certificate() {
                r.errors.push(problem("cert", e.to_string()));
            } else {
                r.checked.push(format!(
                    "certificate {} chains to the region CA",
                    cfg.cert_path.display()
                ));
            }
        }
        Err(e) => r.errors.push(problem("cert", e.to_string())),
    }
    check_services(&cfg, &mut r).await;
    let engine = match MemberEngine::build(cfg.clone()).await {
        Ok(e) => e,
        Err(e) => {
            r.errors.push(problem("mappings", e.to_string()));
            return r;
        }
    };
    for ds in engine.datasets() {
        // Reading every row proves the sources parse and every expression evaluates.
        let sql = format!(
            "SELECT count(*) FROM {}",
            crate::config::quote_ident(&ds.name)
        );
        let rows = match engine_count(&engine, &sql).await {
            Ok(n) => n,
            Err(e) => {
                r.errors
                    .push(problem("mappings", format!("dataset {}: {e}", ds.name)));
                continue;
            }
        };
        r.checked.push(format!("dataset {}: {rows} rows", ds.name));
        for m in cfg.mappings.iter().filter(|m| m.dataset == ds.name) {
            match mapping::unmapped_values(engine.private_context(), ds, m).await {
                Ok(list) => {
                    for u in list {
                        let total: u64 = u.values.iter().map(|(_, n)| n).sum();
                        let shown: Vec<String> = u
                            .values
                            .iter()
                            .take(20)
                            .map(|(v, n)| format!("{v:?} ({n})"))
                            .collect();
                        let more = if u.values.len() > 20 {
                            format!(" and {} more", u.values.len() - 20)
                        } else {
                            String::new()
                        };
                        r.warnings.push(problem(
                            &format!("mappings[{}].fields.{}", m.index, u.field),
                            format!(
                                "{total} rows of source {} have values that do not convert and become NULL: {}{more}",
                                m.source,
                                shown.join(", ")
                            ),
                        ));
                    }
                }
                Err(e) => r.errors.push(problem(&format!("mappings[{}]", m.index), e)),
            }
        }
    }
    r
}

/// Plans every published service in a coordinator of its own, as a gateway does when
/// it starts; no member is contacted, and the audit log it needs is a throwaway one.
async fn check_services(cfg: &Arc<MemberConfig>, r: &mut Report) {
    if cfg.region.services.is_empty() {
        return;
    }
    let region_problem = |key: String, message: String| Problem {
        file: cfg.region.path.clone(),
        key,
        message,
    };
    let Ok(tls) = TlsMaterial::load_with_crls(
        &cfg.region.ca_path,
        &cfg.region.crl_paths,
        &cfg.cert_path,
        &cfg.key_path,
    ) else {
        // Reported above; a coordinator cannot be built without it.
        return;
    };
    let coordinator = tempfile::tempdir()
        .map_err(|e| e.to_string())
        .and_then(|dir| {
            let audit = crate::ops::audit::AuditLog::open(&dir.path().join("check.log"))
                .map_err(|e| e.to_string())?;
            let c = crate::coordinator::Coordinator::new(
                cfg.clone(),
                None,
                &tls,
                Arc::new(audit),
                Arc::new(crate::owner::incidents::Register::in_memory()),
            )
            .map_err(|e| e.to_string())?;
            Ok((dir, c))
        });
    let (_dir, coordinator) = match coordinator {
        Ok(c) => c,
        Err(e) => {
            r.errors.push(region_problem(
                "services".into(),
                format!("planning services: {e}"),
            ));
            return;
        }
    };
    for (i, service) in cfg.region.services.iter().enumerate() {
        match coordinator.check_service(service).await {
            Ok(()) => r.checked.push(format!(
                "service {} plans over the canonical datasets",
                service.name
            )),
            Err(e) => r
                .errors
                .push(region_problem(format!("services[{i}]"), e.to_string())),
        }
    }
}

async fn engine_count(engine: &MemberEngine, sql: &str) -> Result<i64, String> {
    let prepared = engine.prepare(sql).await.map_err(|e| e.to_string())?;
    let permit = engine.owner_permit(&prepared);
    let stream = engine
        .execute(&permit, prepared)
        .await
        .map_err(|e| e.to_string())?
        .stream;
    let batches: Vec<_> = futures::TryStreamExt::try_collect(stream)
        .await
        .map_err(|e| e.to_string())?;
    let b = batches.first().ok_or("no result")?;
    Ok(b.column(0)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::Int64Array>()
        .map(|a| a.value(0))
        .unwrap_or(0))
}

/// A gateway certificate is warned about this long before it expires.
pub const CERTIFICATE_WARNING_DAYS: i64 = 30;
/// The CA, which every member must replace together, this long before.
pub const CA_WARNING_DAYS: i64 = 90;

/// What is about to expire, or has: the gateway's certificate within
/// [`CERTIFICATE_WARNING_DAYS`], the CA within [`CA_WARNING_DAYS`], and a revocation
/// list past its next update (the gateway still uses it, but no newer one was
/// installed, so revocations since may be missing).
pub fn expiry_warnings(e: &crate::trust::tls::Expiries, now: i64) -> Vec<String> {
    const DAY: i64 = 86_400;
    let when = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .map(|d| d.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_else(|| t.to_string())
    };
    let mut w = Vec::new();
    if e.certificate - now < CERTIFICATE_WARNING_DAYS * DAY {
        w.push(format!(
            "the gateway's certificate expires on {} ({} days); renew it with `fedgate pki renew`",
            when(e.certificate),
            (e.certificate - now) / DAY
        ));
    }
    if e.ca - now < CA_WARNING_DAYS * DAY {
        w.push(format!(
            "the region CA expires on {} ({} days); every member needs the new CA before then",
            when(e.ca),
            (e.ca - now) / DAY
        ));
    }
    if let Some(next) = e.crl_next_update
        && next < now
    {
        w.push(format!(
            "a revocation list was due to be replaced on {}; revocations since may be missing",
            when(next)
        ));
    }
    w
}

#[cfg(test)]
mod expiry_tests {
    use super::*;
    use crate::trust::tls::Expiries;

    #[test]
    fn what_is_close_to_expiry_is_warned_about_and_nothing_else() {
        const DAY: i64 = 86_400;
        let now = 1_800_000_000;
        let fine = Expiries {
            certificate: now + 31 * DAY,
            ca: now + 91 * DAY,
            crl_next_update: Some(now + DAY),
        };
        assert!(expiry_warnings(&fine, now).is_empty());
        let close = Expiries {
            certificate: now + 29 * DAY,
            ca: now + 89 * DAY,
            crl_next_update: Some(now - 1),
        };
        let w = expiry_warnings(&close, now);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("(29 days)") && w[0].contains("fedgate pki renew"));
        assert!(w[1].contains("region CA"));
        assert!(w[2].contains("revocation list"));
    }
}
