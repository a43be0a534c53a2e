//! Static mode: one YAML file gives the sidecar its identity files, its routing
//! config (the same `ProxyConfig` the control plane pushes) and its TCP listeners.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use trellis_api::config::ProxyConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticConfig {
    pub identity: IdentityFiles,
    /// Opaque TCP destinations: each listener forwards to one service over mTLS.
    #[serde(default)]
    pub tcp_outbound: Vec<TcpOutbound>,
    #[serde(default)]
    pub proxy: ProxyConfig,
}

/// PEM files; relative paths are taken from the config file's folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityFiles {
    /// The leaf, then the intermediates.
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    /// The roots peers' chains must lead to.
    pub trust_bundle: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpOutbound {
    pub listen: SocketAddr,
    pub service: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StaticConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("{path}: tcpOutbound[{index}].service: {service:?} is not in proxy.services")]
    UnknownTcpService {
        path: PathBuf,
        index: usize,
        service: String,
    },
}

impl StaticConfig {
    pub fn load(path: &Path) -> Result<Self, StaticConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| StaticConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut config: StaticConfig =
            serde_yaml_ng::from_str(&text).map_err(|source| StaticConfigError::Parse {
                path: path.into(),
                source,
            })?;
        for (index, tcp) in config.tcp_outbound.iter().enumerate() {
            if !config.proxy.services.contains_key(&tcp.service) {
                return Err(StaticConfigError::UnknownTcpService {
                    path: path.into(),
                    index,
                    service: tcp.service.clone(),
                });
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let IdentityFiles {
            certificate,
            private_key,
            trust_bundle,
        } = &mut config.identity;
        for file in [certificate, private_key, trust_bundle] {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<StaticConfig, StaticConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        std::fs::write(&path, yaml).unwrap();
        StaticConfig::load(&path)
    }

    const IDENTITY: &str =
        "identity: {certificate: c.pem, privateKey: k.pem, trustBundle: b.pem}\n";

    #[test]
    fn resolves_relative_identity_paths() {
        let config = load(IDENTITY).unwrap();
        assert!(config.identity.certificate.is_absolute());
        assert!(config.identity.certificate.ends_with("c.pem"));
    }

    #[test]
    fn unknown_fields_are_errors_not_silently_dropped() {
        let e = load(&format!("{IDENTITY}proxy: {{servces: {{}}}}\n")).unwrap_err();
        assert!(e.to_string().contains("unknown field `servces`"), "{e}");
        let e = load(&format!(
            "{IDENTITY}proxy:\n  services:\n    b:\n      endpoints: [{{address: 'nope', identity: x}}]\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("invalid socket address"), "{e}");
    }

    #[test]
    fn tcp_listener_must_name_a_known_service() {
        let e = load(&format!(
            "{IDENTITY}tcpOutbound: [{{listen: '127.0.0.1:0', service: db}}]\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("tcpOutbound[0].service"), "{e}");
    }
}
