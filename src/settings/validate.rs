//! Checks between settings that are each valid alone, and that the TLS files load; each
//! error names the settings by their file key or flag, as they were given.

use std::path::PathBuf;

use super::error::ConfigError;
use super::loaded::Loaded;
use super::MAX_WORKER_THREADS;

/// Checks settings that are each valid but do not fit together.
pub(crate) fn validate(s: &Loaded) -> Result<(), ConfigError> {
    let a = &s.proxy;
    let pair = |x: bool, y: bool, xid: &str, yid: &str| match (x, y) {
        (true, false) => Err(s.field_error(xid, format!("needs {} too", s.describe(yid)))),
        (false, true) => Err(s.field_error(yid, format!("needs {} too", s.describe(xid)))),
        _ => Ok(()),
    };
    if a.listeners.is_empty() {
        return Err(s.field_error("listener", "no listener given".into()));
    }
    for (i, l) in a.listeners.iter().enumerate() {
        if a.listeners[..i].iter().any(|o| o.addr == l.addr) {
            return Err(s.field_error("listener", format!("{} is given twice", l.addr)));
        }
        if a.admin.listen.0 == Some(l.addr) {
            return Err(s.field_error(
                "admin.listen",
                format!("{} is also a proxy listener", l.addr),
            ));
        }
    }
    if let Some((name, e)) = a
        .balance
        .services
        .keys()
        .find_map(|n| crate::route::ServiceName::new(n).err().map(|e| (n, e)))
    {
        return Err(s.field_error(
            "balance.service",
            format!("{name:?} is not a service name: {e}"),
        ));
    }
    let e = &a.etcd;
    if e.endpoints.is_empty() {
        return Err(s.field_error("etcd.endpoints", "no etcd endpoint given".into()));
    }
    if let Some(ep) = e
        .endpoints
        .iter()
        .find(|ep| ep.starts_with("https://") && e.ca.is_none())
    {
        return Err(s.field_error(
            "etcd.endpoints",
            format!(
                "{ep} is https:// but no CA is given ({})",
                s.describe("etcd.ca")
            ),
        ));
    }
    if let Some(ep) = e
        .endpoints
        .iter()
        .find(|ep| ep.starts_with("http://") && e.ca.is_some())
    {
        return Err(s.field_error(
            "etcd.endpoints",
            format!(
                "{ep} is http:// but TLS to etcd is on ({}); use https://",
                s.describe("etcd.ca")
            ),
        ));
    }
    for (i, p) in e.prefix.iter().enumerate() {
        if e.prefix[..i].contains(p) {
            return Err(s.field_error("etcd.prefix", format!("{p:?} is given twice")));
        }
    }
    if let Err(err) = crate::route::Routes::new(&a.route) {
        return Err(s.field_error("route", err.to_string()));
    }
    pair(
        e.user.is_some(),
        e.password.is_some(),
        "etcd.user",
        "etcd.password",
    )?;
    pair(e.cert.is_some(), e.key.is_some(), "etcd.cert", "etcd.key")?;
    if e.cert.is_some() && e.ca.is_none() {
        return Err(s.field_error("etcd.cert", format!("needs {} too", s.describe("etcd.ca"))));
    }
    let t = &a.tls;
    pair(t.cert.is_some(), t.key.is_some(), "tls.cert", "tls.key")?;
    let u = &a.upstream_tls;
    pair(
        u.cert.is_some(),
        u.key.is_some(),
        "upstream_tls.cert",
        "upstream_tls.key",
    )?;
    if u.enabled && u.ca.is_none() {
        return Err(s.field_error(
            "upstream_tls.enabled",
            format!("needs {} too", s.describe("upstream_tls.ca")),
        ));
    }
    if !u.enabled {
        for (id, set) in [
            ("upstream_tls.ca", u.ca.is_some()),
            ("upstream_tls.cert", u.cert.is_some()),
            ("upstream_tls.sni", u.sni.is_some()),
        ] {
            if set {
                return Err(s.field_error(
                    id,
                    format!(
                        "has no effect unless TLS to backends is on ({})",
                        s.describe("upstream_tls.enabled")
                    ),
                ));
            }
        }
    }
    let (l, to) = (&a.limits, &a.timeouts);
    if l.worker_threads > MAX_WORKER_THREADS {
        return Err(s.field_error(
            "limits.worker_threads",
            format!("must be at most {MAX_WORKER_THREADS}"),
        ));
    }
    for (id, zero) in [
        ("limits.worker_threads", l.worker_threads == 0),
        ("limits.max_services", l.max_services == 0),
        ("limits.max_connections", l.max_connections == 0),
        (
            "limits.max_concurrent_streams",
            l.max_concurrent_streams == 0,
        ),
        ("limits.max_header_list_size", l.max_header_list_size == 0),
        ("upstream.max_connections", a.upstream.max_connections == 0),
        ("timeouts.connect", to.connect.is_zero()),
        ("timeouts.discovery", to.discovery.is_zero()),
        ("etcd.connect_timeout", e.connect_timeout.is_zero()),
        ("timeouts.idle", to.idle.is_zero()),
        ("timeouts.service_idle", to.service_idle.is_zero()),
        ("timeouts.first_request", to.first_request.is_zero()),
    ] {
        if zero {
            return Err(s.field_error(id, "must be greater than zero".into()));
        }
    }
    Ok(())
}

/// Loads every TLS file, so that a missing or malformed one is reported with its setting.
pub(crate) fn verify_tls_files(s: &Loaded) -> Result<(), ConfigError> {
    use crate::tls::TlsError;
    let (t, u, e) = (&s.proxy.tls, &s.proxy.upstream_tls, &s.proxy.etcd);
    // Which setting names the file an error is about (or `fallback`).
    let field_of =
        |err: &TlsError, candidates: &[(&'static str, Option<&PathBuf>)], fallback| match err {
            TlsError::File { path, .. } => candidates
                .iter()
                .find(|(_, p)| *p == Some(path))
                .map_or(fallback, |(id, _)| *id),
            TlsError::BadServerName(_) => "upstream_tls.sni",
            TlsError::Config(_) => fallback,
        };
    t.server_config().map_err(|err| {
        let c = [("tls.cert", t.cert.as_ref()), ("tls.key", t.key.as_ref())];
        s.field_error(field_of(&err, &c, "tls.cert"), err.to_string())
    })?;
    u.client_config().map_err(|err| {
        let c = [
            ("upstream_tls.ca", u.ca.as_ref()),
            ("upstream_tls.cert", u.cert.as_ref()),
            ("upstream_tls.key", u.key.as_ref()),
        ];
        s.field_error(field_of(&err, &c, "upstream_tls.cert"), err.to_string())
    })?;
    e.tls().map_err(|err| {
        let c = [
            ("etcd.ca", e.ca.as_ref()),
            ("etcd.cert", e.cert.as_ref()),
            ("etcd.key", e.key.as_ref()),
        ];
        s.field_error(field_of(&err, &c, "etcd.cert"), err.to_string())
    })?;
    Ok(())
}
