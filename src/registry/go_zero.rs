//! go-zero (`github.com/zeromicro/go-zero`, `core/discov`): a `Publisher` puts the
//! server's `host:port` as the value of `<Etcd.Key>/<lease ID in decimal>` (or
//! `<Etcd.Key>/<Etcd.ID>` when an ID is configured), with no common prefix: the key of
//! `user.rpc` is `user.rpc/7587869470812345`. Subscribers watch `<Etcd.Key>/` and take
//! every value as an address (`core/discov/publisher.go` `register`, `makeEtcdKey`;
//! `core/discov/internal/registry.go`).
//!
//! The value is [`plain`](super::plain)'s; what tells a go-zero value from a plain one is
//! its key's last segment, a decimal number. Like plain, it carries nothing but the
//! address. A registration keeps the key of its first lease for its whole life, as a
//! go-zero publisher with an `ID` does, so the key stays one across lease renewals.

use super::{
    plain, Codec, EncodeError, Instance, KeyName, Shape, Skipped, ValueError, ValueFormat,
};
use crate::endpoint::Endpoint;

/// The go-zero format's codec.
#[derive(Debug, Clone, Copy)]
pub struct GoZero;

impl Codec for GoZero {
    fn name(&self) -> &'static str {
        "go-zero"
    }

    fn default_prefix(&self) -> &'static str {
        ""
    }

    fn key_name(&self) -> KeyName {
        KeyName::Lease
    }

    fn recognises(&self, key: &str, value: Shape<'_>) -> bool {
        matches!(value, Shape::Text(_)) && super::layout::names_lease(key)
    }

    fn decode(
        &self,
        _key: &str,
        value: Shape<'_>,
        _skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<Endpoint>, ValueError> {
        plain::decode_addr(ValueFormat::GoZero, value)
    }

    fn encode(&self, endpoint: &Endpoint, _instance: &Instance<'_>) -> Result<String, EncodeError> {
        plain::encode_addr(ValueFormat::GoZero, endpoint)
    }

    fn carries_metadata(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::layout::names_lease;
    use crate::registry::{decode, TEST_INSTANCE};

    #[test]
    fn values_under_lease_keys_decode() {
        let d = decode(b"user.rpc/7587869470812345", b"10.0.0.5:8080").unwrap();
        assert_eq!(d.format, ValueFormat::GoZero);
        assert_eq!(
            d.endpoints,
            [Endpoint::new("10.0.0.5:8080".parse().unwrap())]
        );
        // Under a prefix, too; the address is the value's, whatever the key says.
        let d = decode(b"fleet/user.rpc/1", b"10.0.0.6:8080").unwrap();
        assert_eq!(d.format, ValueFormat::GoZero);
        assert_eq!(d.endpoints[0].addr.as_str(), "10.0.0.6:8080");
        assert!(matches!(
            decode(b"user.rpc/75", b"not an address"),
            Err(ValueError::BadAddr(_))
        ));
    }

    #[test]
    fn only_keys_ending_in_a_positive_int64_are_go_zero() {
        for key in ["a/1", "a/7587869470812345", "/a/9223372036854775807"] {
            assert!(names_lease(key), "{key}");
        }
        for key in [
            "75",
            "a/0",
            "a/",
            "a/+5",
            "a/-5",
            "a/9223372036854775808",
            "a/10.0.0.5:80",
            "a/x1",
        ] {
            assert!(!names_lease(key), "{key}");
        }
        assert_eq!(
            decode(b"a/10.0.0.5:80", b"10.0.0.5:80").unwrap().format,
            ValueFormat::Plain
        );
    }

    #[test]
    fn writes_the_bare_address() {
        let ep = Endpoint::new("10.0.0.5:8080".parse().unwrap());
        assert_eq!(
            ValueFormat::GoZero.encode(&ep, &TEST_INSTANCE).unwrap(),
            "10.0.0.5:8080"
        );
        assert!(ValueFormat::GoZero
            .encode(&ep.with_weight(2), &TEST_INSTANCE)
            .is_err());
        assert_eq!(ValueFormat::GoZero.default_prefix(), "");
        assert_eq!(ValueFormat::GoZero.key_name(), KeyName::Lease);
    }
}
