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
    validate_zone_and_traffic(s)?;
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

/// Most a split's weight may be (keeps the split's period short).
const MAX_SPLIT_WEIGHT: u32 = 10_000;

/// The zone settings, and each `[[traffic]]` rule: what serde cannot check alone.
fn validate_zone_and_traffic(s: &Loaded) -> Result<(), ConfigError> {
    let b = &s.proxy.balance;
    if b.zone.as_deref().is_some_and(|z| z.trim().is_empty()) {
        return Err(s.field_error("balance.zone", "is empty".into()));
    }
    if b.zone_key.trim().is_empty() {
        return Err(s.field_error("balance.zone_key", "is empty".into()));
    }
    let err = |path: String, message: String| s.element_error("traffic", &path, message);
    let subset_ok = |path: String, subset: &std::collections::BTreeMap<String, String>| {
        if subset.is_empty() {
            return Err(err(
                path,
                "names no metadata pair (e.g. { version = \"v2\" })".into(),
            ));
        }
        match subset.keys().find(|k| k.trim().is_empty()) {
            Some(_) => Err(err(path, "has an empty key".into())),
            None => Ok(()),
        }
    };
    for (i, t) in s.proxy.traffic.iter().enumerate() {
        let at = format!("traffic[{i}]");
        if let Err(e) = crate::route::ServiceName::new(&t.service) {
            return Err(err(
                format!("{at}.service"),
                format!("{:?} is not a service name: {e}", t.service),
            ));
        }
        if s.proxy.traffic[..i].iter().any(|o| o.service == t.service) {
            return Err(err(
                format!("{at}.service"),
                format!(
                    "service {:?} has rules already (one [[traffic]] per service)",
                    t.service
                ),
            ));
        }
        if t.matches.is_empty() && t.split.is_empty() {
            return Err(err(
                at,
                "has neither [[traffic.match]] nor [[traffic.split]]".into(),
            ));
        }
        for (j, m) in t.matches.iter().enumerate() {
            let at = format!("{at}.match[{j}]");
            if http::HeaderName::from_bytes(m.header.as_bytes()).is_err() {
                return Err(err(
                    format!("{at}.header"),
                    format!("{:?} is not a header name", m.header),
                ));
            }
            if http::HeaderValue::from_str(&m.value).is_err() {
                return Err(err(
                    format!("{at}.value"),
                    format!("{:?} is not a header value", m.value),
                ));
            }
            subset_ok(format!("{at}.subset"), &m.subset)?;
        }
        for (j, sp) in t.split.iter().enumerate() {
            let at = format!("{at}.split[{j}]");
            subset_ok(format!("{at}.subset"), &sp.subset)?;
            if sp.weight > MAX_SPLIT_WEIGHT {
                return Err(err(
                    format!("{at}.weight"),
                    format!("must be at most {MAX_SPLIT_WEIGHT}"),
                ));
            }
            if t.split[..j].iter().any(|o| o.subset == sp.subset) {
                return Err(err(
                    format!("{at}.subset"),
                    "is split to twice (give it one weight)".into(),
                ));
            }
        }
        if !t.split.is_empty() && t.split.iter().all(|sp| sp.weight == 0) {
            return Err(err(
                format!("{at}.split"),
                "weights sum to 0: no call could be sent".into(),
            ));
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
