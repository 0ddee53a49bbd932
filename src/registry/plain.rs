//! `host:port`: the seed pattern's value, under `<prefix>/<service>/<host:port>`. It
//! has room for nothing else: weight 1, plaintext, no metadata. Recognised as any text
//! value whose key does not end in a lease ID (those are [`go_zero`](super::go_zero)'s).

use super::{Codec, EncodeError, Instance, KeyName, Shape, Skipped, ValueError, ValueFormat};
use crate::endpoint::{Endpoint, DEFAULT_WEIGHT};

/// The plain format's codec.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl Codec for Plain {
    fn name(&self) -> &'static str {
        "plain"
    }

    fn default_prefix(&self) -> &'static str {
        "services"
    }

    fn key_name(&self) -> KeyName {
        KeyName::Addr
    }

    fn recognises(&self, key: &str, value: Shape<'_>) -> bool {
        matches!(value, Shape::Text(_)) && !super::layout::names_lease(key)
    }

    fn decode(
        &self,
        _key: &str,
        value: Shape<'_>,
        _skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<Endpoint>, ValueError> {
        decode_addr(ValueFormat::Plain, value)
    }

    fn encode(&self, endpoint: &Endpoint, _instance: &Instance<'_>) -> Result<String, EncodeError> {
        encode_addr(ValueFormat::Plain, endpoint)
    }

    fn carries_metadata(&self) -> bool {
        false
    }
}

/// Reads a `host:port` text value.
pub(super) fn decode_addr(
    format: ValueFormat,
    value: Shape<'_>,
) -> Result<Vec<Endpoint>, ValueError> {
    match value {
        Shape::Text(text) => Ok(vec![Endpoint::new(text.parse()?)]),
        Shape::Json(_) => Err(ValueError::invalid(
            format,
            "a JSON object is not host:port",
        )),
    }
}

/// Writes `endpoint` as a bare `host:port`, refusing what that cannot carry.
pub(super) fn encode_addr(format: ValueFormat, endpoint: &Endpoint) -> Result<String, EncodeError> {
    if endpoint.metadata.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(EncodeError::not_carried(format, "metadata"));
    }
    if endpoint.weight != DEFAULT_WEIGHT {
        return Err(EncodeError::not_carried(format, "a weight"));
    }
    if endpoint.tls {
        return Err(EncodeError::not_carried(format, "TLS"));
    }
    Ok(endpoint.addr.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{decode, TEST_INSTANCE as INSTANCE};

    fn addr(value: &[u8]) -> Result<String, ValueError> {
        let d = decode(b"services/s/k", value)?;
        assert_eq!(d.format, ValueFormat::Plain);
        assert_eq!(d.endpoints.len(), 1);
        let ep = &d.endpoints[0];
        assert_eq!((ep.weight, ep.tls, &ep.metadata), (1, false, &None));
        Ok(ep.addr.as_str().to_owned())
    }

    #[test]
    fn addresses_decode() {
        assert_eq!(addr(b"10.0.0.5:50051").unwrap(), "10.0.0.5:50051");
        assert_eq!(
            addr(b" backend-1.local:80\n").unwrap(),
            "backend-1.local:80"
        );
        assert_eq!(addr(b"[::1]:8080").unwrap(), "[::1]:8080");
        let d = decode(b"k", b"[::1]:8080").unwrap();
        assert_eq!(d.endpoints[0].addr.host(), "::1");
        assert_eq!(d.endpoints[0].addr.port(), 8080);
    }

    #[test]
    fn non_addresses_are_errors() {
        for bad in [
            &b"nonsense"[..],
            b"host:0",
            b"host:99999",
            b"http://h:1",
            b"u@h:1",
            b"[zz]:1",
            b"",
            b"[1,2]",
        ] {
            assert!(
                matches!(addr(bad), Err(ValueError::BadAddr(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn encodes_only_what_it_can_carry() {
        let ep = Endpoint::new("127.0.0.1:9".parse().unwrap());
        let v = ValueFormat::Plain.encode(&ep, &INSTANCE).unwrap();
        assert_eq!(v, "127.0.0.1:9");
        assert_eq!(
            decode(b"k", v.as_bytes()).unwrap().endpoints,
            vec![ep.clone()]
        );
        let mut with_meta = ep.clone();
        with_meta.metadata = Some(serde_json::json!({"k": "v"}));
        let err = ValueFormat::Plain
            .encode(&with_meta, &INSTANCE)
            .unwrap_err();
        assert_eq!(
            err,
            EncodeError::NotCarried {
                format: ValueFormat::Plain,
                what: "metadata"
            }
        );
        assert!(err.to_string().contains("etcd-naming"), "{err}");
        assert!(ValueFormat::Plain
            .encode(&ep.clone().with_weight(3), &INSTANCE)
            .is_err());
        let mut tls = ep;
        tls.tls = true;
        assert!(ValueFormat::Plain.encode(&tls, &INSTANCE).is_err());
    }
}
