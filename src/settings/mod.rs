//! The settings of every command: each declared once, as a field of a settings struct
//! that derives `clap::Args` (flag, environment variable, default, help) and serde (the
//! config file key), and layered flag > environment > file > built-in default.
//!
//! The structs follow the config file: [`ProxySettings`] is its top, each section
//! (`[etcd]`, `[timeouts]`, `[limits]`, `[tls]`, `[upstream_tls]`, `[admin]`, `[observe]`,
//! `[service_config]`; the file-only `[[traffic]]` rules) is a struct of
//! its own, flattened into it with `#[command(flatten)]`. The library takes these structs;
//! only [`load`] (at the binary's edge) sees clap's parse.
//!
//! # Adding a setting
//!
//! One field, in the struct of its section, is the whole job:
//!
//! ```text
//! /// On SIGTERM, how long in-flight calls may run before the proxy exits.   <- --help
//! #[arg(
//!     id = "timeouts.drain",              // its config file key: section.field
//!     long = "drain-timeout",             // its flag
//!     env = "SWITCHYARD_DRAIN_TIMEOUT",   // its environment variable
//!     value_name = "DURATION",
//!     default_value = "10s",              // its built-in default
//!     value_parser = duration::parse      // durations: humantime (also in the file)
//! )]
//! #[serde(with = "duration")]
//! pub drain: Duration,
//! ```
//!
//! The id must be the file key (the section's field name, a dot, the field's name; a
//! unit test checks every id against the file's shape): that is how the file's value is
//! matched with the flag's. Precedence, `check-config`, relative paths (any `PathBuf`
//! setting) and errors naming the file, line, column and key follow with no other edit;
//! checks between settings go in `validate.rs`, naming settings by id. Operators read
//! the settings in the README's table (a unit test checks each has its row there).
//!
//! - A new section: a struct deriving `clap::Args`, `Serialize`, `Deserialize` with
//!   `#[serde(deny_unknown_fields)]`, as a `#[command(flatten)]` field of [`ProxySettings`].
//! - A repeatable flag that is an array of tables in the file (like `--listen` and
//!   `[[listener]]`): a `Vec<T>` field, `T: FromStr` for the flag's value and serde for
//!   the table; `value_delimiter = ','` also splits one value.
//! - A file-only table keyed by name, e.g. `[service."pkg.Svc"] balance = "..."`: a
//!   `BTreeMap<String, T>` field with `#[arg(skip)]` and `#[serde(default)]`.
//! - A value whose file form is its flag's text: `#[serde(with = "text")]`.

pub mod balance;
mod cli;
pub mod duration;
mod error;
mod etcd;
mod file;
mod layer;
mod listen;
mod loaded;
mod log;
pub mod observe;
mod proxy;
mod restart;
pub mod service_config;
pub mod text;
mod tls;
pub mod traffic;
mod upstream;
mod validate;

pub use cli::{check, load, parse_file};
pub use error::{ConfigError, FieldError, Location};
pub use etcd::EtcdSettings;
pub use listen::{AdminListen, AdminSettings, ListenSpec, ListenSpecError};
pub use loaded::{proxy_command, Loaded, ProxyCommand};
pub use log::{BadLogLevel, LogFormat, LogLevel, LogSection, LogSettings};
pub use proxy::{LimitSettings, ProxySettings, TimeoutSettings, MAX_WORKER_THREADS};
pub use restart::{keep_restart_only, restart_only_keys};
pub use tls::{ListenerTlsSettings, UpstreamTlsSettings};
pub use upstream::{IdleTimeout, UpstreamSettings};

/// The built-in defaults of a settings struct, as its flags declare them (the
/// environment is not read).
fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults")).mut_args(|a| a.env(None));
    let parsed = cmd
        .try_get_matches_from(["defaults"])
        .and_then(|m| T::from_arg_matches(&m));
    // Not input: every setting declares a default or is optional, which the unit tests
    // check by building every struct.
    parsed.expect("settings declare a default for every setting")
}

/// The config file key of the proxy's setting with id `id` (its id is its key), if the
/// file can set it.
pub fn file_key(id: &str) -> Option<&str> {
    let file = serde_json::to_value(ProxySettings::default())
        .ok()
        .zip(serde_json::to_value(LogSettings::default()).ok());
    let (proxy, log) = file?;
    let mut path = id.split('.');
    let first = path.next()?;
    let mut node = proxy.get(first).or_else(|| log.get(first))?;
    for seg in path {
        node = node.get(seg)?;
    }
    // A section is not a setting.
    (!node.is_object()).then_some(id)
}

#[cfg(test)]
mod tests;
