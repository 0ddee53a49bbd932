//! Traffic rules (`[[traffic]]`, config file only, re-read on SIGHUP): per registered
//! service, header matches and a weighted split between subsets of its endpoints.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One service's traffic rules (`[[traffic]]`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrafficSection {
    /// The registered service name (after routes).
    pub service: String,
    /// A subset with no usable endpoint fails its calls (UNAVAILABLE) instead of sending
    /// them to the whole service.
    #[serde(default)]
    pub strict: bool,
    /// Calls with a header go to a subset, whatever the split says (first match wins).
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<MatchSection>,
    /// The other calls, split by weight between subsets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitSection>,
}

/// `[[traffic.match]]`: calls whose `header` is `value` go to `subset`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MatchSection {
    /// The request header's name.
    pub header: String,
    /// Its value, exactly.
    pub value: String,
    /// The endpoints whose metadata holds all these pairs.
    pub subset: BTreeMap<String, String>,
}

/// `[[traffic.split]]`: `subset` takes `weight` shares of the calls no match took.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SplitSection {
    /// The endpoints whose metadata holds all these pairs.
    pub subset: BTreeMap<String, String>,
    /// Its share, relative to the other splits' (0: none, e.g. to roll back).
    pub weight: u32,
}
