//! What `get` and `delete` name on the command line: a resource kind under any of the
//! names `kubectl` users expect (kind, lowercase, plural, short name), or one of the
//! control plane's live views (endpoints, proxies, shadows).

use std::fmt;

/// A resource kind the operator API stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    MeshConfig,
    DestinationPolicy,
    TrafficRoute,
    AuthorizationPolicy,
    Canary,
}

/// What `get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Resource(Kind),
    Endpoints,
    Proxies,
    /// Route mirrors' comparison totals, from the sidecars' reports.
    Shadows,
}

// === impl Kind ===

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::MeshConfig,
        Kind::DestinationPolicy,
        Kind::TrafficRoute,
        Kind::AuthorizationPolicy,
        Kind::Canary,
    ];

    /// The kind as resources spell it, and as the API takes it in paths.
    pub fn name(self) -> &'static str {
        match self {
            Kind::MeshConfig => "MeshConfig",
            Kind::DestinationPolicy => "DestinationPolicy",
            Kind::TrafficRoute => "TrafficRoute",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Canary => "Canary",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::MeshConfig => "meshconfigs",
            Kind::DestinationPolicy => "destinationpolicies",
            Kind::TrafficRoute => "trafficroutes",
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::Canary => "canaries",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Kind::MeshConfig => "mc",
            Kind::DestinationPolicy => "dp",
            Kind::TrafficRoute => "tr",
            Kind::AuthorizationPolicy => "authz",
            Kind::Canary => "can",
        }
    }

    /// MeshConfig is cluster-scoped: it takes no namespace.
    pub fn is_namespaced(self) -> bool {
        self != Kind::MeshConfig
    }

    /// Finds the kind `input` names, ignoring case.
    pub fn from_alias(input: &str) -> Option<Kind> {
        let input = input.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|kind| {
            input == kind.name().to_ascii_lowercase()
                || input == kind.plural()
                || input == kind.short()
        })
    }

    /// The clap value parser for `delete`: only stored resources can be deleted.
    pub fn parse(input: &str) -> Result<Kind, String> {
        match Target::parse(input)? {
            Target::Resource(kind) => Ok(kind),
            Target::Endpoints | Target::Proxies | Target::Shadows => Err(format!(
                "{input} cannot be deleted: they come and go with the sidecars that run; \
                 delete one of {}",
                Kind::ALL.map(Kind::lowercase).join(", ")
            )),
        }
    }

    pub fn lowercase(self) -> &'static str {
        match self {
            Kind::MeshConfig => "meshconfig",
            Kind::DestinationPolicy => "destinationpolicy",
            Kind::TrafficRoute => "trafficroute",
            Kind::AuthorizationPolicy => "authorizationpolicy",
            Kind::Canary => "canary",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// === impl Target ===

impl Target {
    /// The clap value parser for `get`.
    pub fn parse(input: &str) -> Result<Target, String> {
        if let Some(kind) = Kind::from_alias(input) {
            return Ok(Target::Resource(kind));
        }
        match input.to_ascii_lowercase().as_str() {
            "endpoints" | "endpoint" | "ep" => Ok(Target::Endpoints),
            "proxies" | "proxy" | "px" => Ok(Target::Proxies),
            "shadows" | "shadow" => Ok(Target::Shadows),
            _ => {
                let kinds: Vec<String> = Kind::ALL
                    .iter()
                    .map(|kind| format!("{} ({})", kind.lowercase(), kind.short()))
                    .chain([
                        "endpoints (ep)".into(),
                        "proxies (px)".into(),
                        "shadows".into(),
                    ])
                    .collect();
                Err(format!(
                    "unknown kind {input:?}: use one of {}",
                    kinds.join(", ")
                ))
            }
        }
    }

    /// What the table calls its rows, for "No ... found".
    pub fn plural(self) -> &'static str {
        match self {
            Target::Resource(kind) => kind.plural(),
            Target::Endpoints => "endpoints",
            Target::Proxies => "proxies",
            Target::Shadows => "shadows",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

    use super::*;

    #[test]
    fn every_alias_names_its_kind() {
        let cases = [
            (
                Kind::MeshConfig,
                &["MeshConfig", "meshconfig", "meshconfigs", "mc"][..],
            ),
            (
                Kind::DestinationPolicy,
                &[
                    "DestinationPolicy",
                    "destinationpolicy",
                    "destinationpolicies",
                    "dp",
                ],
            ),
            (
                Kind::TrafficRoute,
                &["TrafficRoute", "trafficroute", "trafficroutes", "tr", "TR"],
            ),
            (
                Kind::AuthorizationPolicy,
                &[
                    "AuthorizationPolicy",
                    "authorizationpolicy",
                    "authorizationpolicies",
                    "authz",
                ],
            ),
            (Kind::Canary, &["Canary", "canary", "canaries", "can"]),
        ];
        for (kind, aliases) in cases {
            for alias in aliases {
                assert_eq!(Target::parse(alias), Ok(Target::Resource(kind)), "{alias}");
                assert_eq!(Kind::parse(alias), Ok(kind), "{alias}");
            }
        }
    }

    #[test]
    fn live_views_are_targets_but_not_deletable() {
        for alias in ["endpoints", "ep", "Endpoints"] {
            assert_eq!(Target::parse(alias), Ok(Target::Endpoints));
        }
        for alias in ["proxies", "proxy", "px"] {
            assert_eq!(Target::parse(alias), Ok(Target::Proxies));
        }
        for alias in ["shadows", "shadow", "Shadow"] {
            assert_eq!(Target::parse(alias), Ok(Target::Shadows));
        }
        let refused = Kind::parse("proxies").unwrap_err();
        assert!(refused.contains("cannot be deleted"), "{refused}");
        let refused = Kind::parse("shadow").unwrap_err();
        assert!(refused.contains("cannot be deleted"), "{refused}");
    }

    #[test]
    fn an_unknown_kind_lists_the_known_ones() {
        let refused = Target::parse("routes").unwrap_err();
        assert!(refused.starts_with("unknown kind \"routes\""), "{refused}");
        assert!(refused.contains("trafficroute (tr)"), "{refused}");
        assert!(refused.contains("proxies (px)"), "{refused}");
    }

    #[test]
    fn only_mesh_config_is_cluster_scoped() {
        for kind in Kind::ALL {
            assert_eq!(kind.is_namespaced(), kind != Kind::MeshConfig);
        }
    }
}
