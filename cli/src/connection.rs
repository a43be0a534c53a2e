//! Where the operator API is and which token it takes. Each comes from a flag, its
//! environment variable, or a file the control plane writes into its data dir; the
//! origin is kept so an error can say where a wrong value came from.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::error::CliError;

/// The address used when neither a flag nor the data dir names one.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:15011";

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `--flag` on the command line.
    Flag(&'static str),
    /// An environment variable.
    Env(&'static str),
    /// A file of the data dir.
    File(PathBuf),
    /// Nothing said otherwise; the path is the file that would have.
    Default(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "given with {flag}"),
            Origin::Env(var) => write!(f, "from {var}"),
            Origin::File(path) => write!(f, "read from {}", path.display()),
            Origin::Default(missing) => {
                write!(f, "the default; {} does not exist", missing.display())
            }
        }
    }
}

/// A value given on the command line or in the environment, before the data dir is
/// consulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Given {
    pub value: String,
    pub origin: Origin,
}

/// Everything needed to talk to the operator API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`, checked to be a URI authority with a port.
    pub addr: String,
    pub addr_origin: Origin,
    pub token: String,
    pub token_origin: Origin,
    pub timeout: Duration,
}

/// The API address: the flag (or its env var), else `<data-dir>/api-addr`, else
/// [`DEFAULT_API_ADDR`].
pub fn resolve_addr(given: Option<Given>, data_dir: &Path) -> Result<(String, Origin), CliError> {
    let (raw, origin) = match given {
        Some(Given { value, origin }) => (value, origin),
        None => {
            let path = data_dir.join("api-addr");
            match std::fs::read_to_string(&path) {
                Ok(text) => (text, Origin::File(path)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    (DEFAULT_API_ADDR.to_string(), Origin::Default(path))
                }
                Err(e) => {
                    return Err(CliError::AddrFile {
                        path,
                        reason: e.to_string(),
                    });
                }
            }
        }
    };
    let addr = normalize_addr(&raw).ok_or_else(|| CliError::BadAddr {
        value: raw.trim().to_string(),
        origin: origin.clone(),
    })?;
    Ok((addr, origin))
}

/// Accepts `ip:port`, `host:port`, and the same with `http://` and a trailing `/`, as
/// people paste them.
fn normalize_addr(raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    let bare = trimmed.strip_prefix("http://").unwrap_or(trimmed);
    let bare = bare.strip_suffix('/').unwrap_or(bare);
    let authority: http::uri::Authority = bare.parse().ok()?;
    if authority.port_u16().is_none() || authority.as_str().contains('@') {
        return None;
    }
    Some(authority.as_str().to_string())
}

/// The API token: the flag (or its env var), else `<data-dir>/api-token`.
pub fn resolve_token(given: Option<Given>, data_dir: &Path) -> Result<(String, Origin), CliError> {
    let (raw, origin) = match given {
        Some(Given { value, origin }) => (value, origin),
        None => {
            let path = data_dir.join("api-token");
            match std::fs::read_to_string(&path) {
                Ok(text) => (text, Origin::File(path)),
                Err(e) => {
                    let reason = if e.kind() == io::ErrorKind::NotFound {
                        "it does not exist".to_string()
                    } else {
                        e.to_string()
                    };
                    return Err(CliError::TokenFile { path, reason });
                }
            }
        }
    };
    let token = raw.trim();
    if token.is_empty() {
        return Err(CliError::EmptyToken { origin });
    }
    Ok((token.to_string(), origin))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

    use super::*;

    fn flag(value: &str) -> Option<Given> {
        Some(Given {
            value: value.into(),
            origin: Origin::Flag("--api-addr"),
        })
    }

    #[test]
    fn the_addr_flag_wins_over_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api-addr"), "127.0.0.1:4000\n").unwrap();
        let (addr, origin) = resolve_addr(flag("127.0.0.1:5000"), dir.path()).unwrap();
        assert_eq!(addr, "127.0.0.1:5000");
        assert_eq!(origin, Origin::Flag("--api-addr"));
    }

    #[test]
    fn the_addr_file_wins_over_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-addr");
        std::fs::write(&path, "127.0.0.1:4000\n").unwrap();
        let (addr, origin) = resolve_addr(None, dir.path()).unwrap();
        assert_eq!(addr, "127.0.0.1:4000");
        assert_eq!(origin, Origin::File(path));
    }

    #[test]
    fn without_flag_or_file_the_addr_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, origin) = resolve_addr(None, dir.path()).unwrap();
        assert_eq!(addr, DEFAULT_API_ADDR);
        assert_eq!(origin, Origin::Default(dir.path().join("api-addr")));
        assert!(origin.to_string().contains("does not exist"), "{origin}");
    }

    #[test]
    fn addrs_are_taken_as_people_paste_them() {
        let dir = tempfile::tempdir().unwrap();
        for (input, want) in [
            ("http://127.0.0.1:15011/", "127.0.0.1:15011"),
            ("localhost:15011", "localhost:15011"),
            ("[::1]:15011", "[::1]:15011"),
        ] {
            assert_eq!(resolve_addr(flag(input), dir.path()).unwrap().0, want);
        }
        for bad in ["127.0.0.1", "not an address", "", "user@host:1"] {
            let e = resolve_addr(flag(bad), dir.path()).unwrap_err();
            assert!(e.to_string().contains("--api-addr"), "{e}");
        }
    }

    #[test]
    fn the_token_flag_wins_over_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api-token"), "from-file\n").unwrap();
        let given = Some(Given {
            value: "from-env".into(),
            origin: Origin::Env("TRELLIS_API_TOKEN"),
        });
        let (token, origin) = resolve_token(given, dir.path()).unwrap();
        assert_eq!(token, "from-env");
        assert_eq!(origin, Origin::Env("TRELLIS_API_TOKEN"));
    }

    #[test]
    fn the_token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let (token, origin) = resolve_token(None, dir.path()).unwrap();
        assert_eq!(token, "s3cret");
        assert_eq!(origin, Origin::File(path));
    }

    #[test]
    fn a_missing_or_empty_token_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-token");
        let missing = resolve_token(None, dir.path()).unwrap_err().to_string();
        assert!(missing.contains(&path.display().to_string()), "{missing}");
        assert!(missing.contains("does not exist"), "{missing}");
        std::fs::write(&path, "\n").unwrap();
        let empty = resolve_token(None, dir.path()).unwrap_err().to_string();
        assert!(empty.contains(&path.display().to_string()), "{empty}");
        assert!(empty.contains("empty"), "{empty}");
    }
}
