//! The declarations hold together, and the layering works for the kinds of settings the
//! next features add (a repeatable flag that is an array of tables, a per-service table).

use std::collections::BTreeMap;
use std::path::Path;

use clap::{Args, FromArgMatches};
use serde::{Deserialize, Serialize};

use super::file::FileSource;
use super::layer::{self, Flags};
use super::*;

#[test]
fn every_flag_id_is_a_file_key_and_every_key_a_flag() {
    let cmd = proxy_command();
    let mut ids = Vec::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "config" || id == "help" {
            continue;
        }
        assert_eq!(file_key(id), Some(id), "--{id}: its id is not a file key");
        ids.push(id.to_owned());
    }
    // And the other way: every leaf of the file's shape has a flag.
    let tree = layer::to_tree(&ProxySettings::default()).unwrap();
    let mut leaves = Vec::new();
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    walk(&format!("{prefix}{k}."), v, out)
                }
            }
            _ => out.push(prefix.trim_end_matches('.').to_owned()),
        }
    }
    walk("", &serde_json::Value::Object(tree), &mut leaves);
    for leaf in leaves {
        assert!(ids.contains(&leaf), "file key {leaf} has no flag");
    }
}

#[test]
fn every_setting_has_its_row_in_the_readme() {
    let readme = include_str!("../../README.md");
    for arg in proxy_command().get_arguments() {
        let (id, long) = (arg.get_id().as_str(), arg.get_long().unwrap_or_default());
        if id == "config" {
            continue;
        }
        let key = if id == "listener" || id == "route" {
            format!("`[[{id}]]`")
        } else {
            format!("`{id}`")
        };
        let documented = readme
            .lines()
            .any(|l| l.starts_with('|') && l.contains(&key) && l.contains(&format!("`--{long}")));
        assert!(
            documented,
            "README's settings table has no row for {key} / --{long}"
        );
    }
}

#[test]
fn defaults_are_the_declared_ones() {
    let s = ProxySettings::default();
    assert_eq!(
        s.listeners,
        ["127.0.0.1:7070".parse::<ListenSpec>().unwrap()]
    );
    assert_eq!(s.admin.listen, "127.0.0.1:7071".parse().unwrap());
    assert_eq!(s.etcd, EtcdSettings::local("http://127.0.0.1:2379"));
    assert_eq!(s.timeouts.idle, std::time::Duration::from_secs(300));
    assert_eq!(s.limits.max_header_list_size, 16 * 1024);
    assert!(!s.upstream_tls.enabled);
    assert_eq!(LogSettings::default().log_format, LogFormat::Text);
    // What the defaults serialize to reads back the same.
    let tree = layer::to_tree(&s).unwrap();
    let cmd = proxy_command();
    let flags = Flags {
        cmd: &cmd,
        matches: None,
    };
    let back: ProxySettings = layer::from_tree(tree, &flags, None).unwrap();
    assert_eq!(back, s);
}

/// A settings struct shaped like the ones the next features add.
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct Future {
    /// Repeatable; `[[route]]` in the file.
    #[arg(
        id = "route",
        long = "route",
        value_delimiter = ',',
        default_value = "a=x"
    )]
    route: Vec<Route>,
    /// A section.
    #[command(flatten)]
    eject: Eject,
    /// Per service, file only.
    #[arg(skip)]
    #[serde(default)]
    service: BTreeMap<String, PerService>,
}

#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct Eject {
    #[arg(id = "eject.after", long = "eject-after", default_value_t = 5)]
    after: u32,
    #[arg(id = "eject.file", long = "eject-file")]
    file: Option<std::path::PathBuf>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct Route {
    prefix: String,
    service: String,
}

impl std::str::FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (p, svc) = s.split_once('=').ok_or("not PREFIX=SERVICE")?;
        Ok(Self {
            prefix: p.into(),
            service: svc.into(),
        })
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct PerService {
    balance: String,
}

fn future(args: &[&str], text: &str) -> Result<(Future, Vec<String>), super::ConfigError> {
    let cmd = Future::augment_args(clap::Command::new("f"));
    let m = cmd
        .clone()
        .try_get_matches_from(std::iter::once("f").chain(args.iter().copied()))
        .unwrap();
    let given = Future::from_arg_matches(&m).unwrap();
    let flags = Flags {
        cmd: &cmd,
        matches: Some(&m),
    };
    let (mut file, values) = FileSource::parse(Path::new("/etc/s/f.toml"), text.into())?;
    let mut tree = layer::to_tree(&given)?;
    layer::overlay(&mut tree, values, &flags, &mut file);
    let f = layer::from_tree(tree, &flags, Some(&file))?;
    Ok((f, file.taken))
}

const FUTURE: &str = r#"
[[route]]
prefix = "/a"
service = "A"

[[route]]
prefix = "/b"
service = "B"

[eject]
after = 9
file = "x.pem"

[service."pkg.Svc"]
balance = "p2c"
"#;

#[test]
fn arrays_of_tables_sections_and_per_service_tables_layer() {
    let (f, taken) = future(&[], FUTURE).unwrap();
    assert_eq!(f.route.len(), 2);
    assert_eq!(f.route[1].service, "B");
    assert_eq!(f.eject.after, 9);
    assert_eq!(f.eject.file.as_deref(), Some(Path::new("/etc/s/x.pem")));
    assert_eq!(f.service["pkg.Svc"].balance, "p2c");
    assert!(taken.contains(&"route".to_owned()), "{taken:?}");
    assert!(taken.contains(&"eject.after".to_owned()), "{taken:?}");

    // Flags win, whole arrays included; the rest still comes from the file.
    let (f, taken) = future(
        &["--route", "/c=C", "--route", "/d=D", "--eject-after", "5"],
        FUTURE,
    )
    .unwrap();
    assert_eq!(
        f.route
            .iter()
            .map(|r| r.service.as_str())
            .collect::<Vec<_>>(),
        ["C", "D"]
    );
    assert_eq!(f.eject.after, 5);
    assert!(!taken.contains(&"eject.after".to_owned()));
    assert_eq!(f.service["pkg.Svc"].balance, "p2c");

    // Defaults where neither says anything.
    let (f, _) = future(&[], "").unwrap();
    assert_eq!(f.route[0].service, "x");
    assert_eq!(f.eject.after, 5);
    assert!(f.service.is_empty());
}

#[test]
fn errors_in_arrays_and_per_service_tables_are_located() {
    let text = "[[route]]\nprefix = \"/a\"\nservice = \"A\"\n\n[[route]]\nprefix = \"/b\"\nsrvice = \"B\"\n";
    let super::ConfigError::Field(e) = future(&[], text).unwrap_err() else {
        panic!("not a field error");
    };
    assert_eq!(e.field, "route[1].srvice");
    assert_eq!(e.location.unwrap().line, 7);
    let text = "[service.a]\nbalance = 3\n";
    let super::ConfigError::Field(e) = future(&[], text).unwrap_err() else {
        panic!("not a field error");
    };
    assert_eq!(e.field, "service.a.balance");
    assert_eq!(e.location.unwrap().line, 2);
}
