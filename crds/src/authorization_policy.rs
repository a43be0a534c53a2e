//! `AuthorizationPolicy`: who may call one service, and what. A service with any
//! policy allows only what a rule matches; otherwise `MeshConfig.defaultAuthorization`.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ResourceStatus;

use crate::validation::{Checker, Invalid};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    derive = "PartialEq",
    kind = "AuthorizationPolicy",
    status = "ResourceStatus",
    namespaced,
    shortname = "authz",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub service: String,
    pub rules: Vec<AllowRule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowRule {
    /// Callers this rule admits.
    #[schemars(length(min = 1))]
    pub from: Vec<Source>,
    /// What they may do; none means anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
}

/// A caller: one SPIFFE identity, or every identity of a namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// `namespace` is a CEL reserved word: the apiserver exposes the field as `__namespace__`
// and refuses to compile a rule that writes `self.namespace`.
#[x_kube(validation = "has(self.identity) != has(self.__namespace__)")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^spiffe://"))]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// HTTP methods; none means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Paths; a trailing `*` matches a prefix. None means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

impl AuthorizationPolicySpec {
    pub fn validate(&self, name: &str) -> Result<(), Invalid> {
        let mut check = Checker::default();
        check.name("spec.service", &self.service);
        for (r, rule) in self.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            if rule.from.is_empty() {
                check.fail(format!("{at}.from"), "must name at least one caller");
            }
            for (s, source) in rule.from.iter().enumerate() {
                let sat = format!("{at}.from[{s}]");
                match (&source.identity, &source.namespace) {
                    (Some(id), None) => {
                        if let Err(e) = id.parse::<SpiffeIdText>() {
                            check.fail(format!("{sat}.identity"), e);
                        }
                    }
                    (None, Some(ns)) => check.name(&format!("{sat}.namespace"), ns),
                    _ => check.fail(sat, "give exactly one of identity and namespace"),
                }
            }
            for (o, op) in rule.to.iter().enumerate() {
                for (m, method) in op.methods.iter().enumerate() {
                    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                        check.fail(
                            format!("{at}.to[{o}].methods[{m}]"),
                            format!("{method:?} is not an upper-case HTTP method"),
                        );
                    }
                }
                for (p, path) in op.paths.iter().enumerate() {
                    if !path.starts_with('/') {
                        check.fail(format!("{at}.to[{o}].paths[{p}]"), "must start with '/'");
                    }
                }
            }
        }
        check.finish("AuthorizationPolicy", name)
    }
}

/// The SPIFFE id rules without pulling the CA crate into the resource types: a
/// `spiffe://` URI with a trust domain and a path.
struct SpiffeIdText;

impl std::str::FromStr for SpiffeIdText {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{s:?} is not a spiffe:// id"))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("{s:?} has no path"))?;
        let td_ok = !td.is_empty()
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        let path_ok = path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
        if td_ok && path_ok {
            Ok(Self)
        } else {
            Err(format!("{s:?} is not a valid SPIFFE id"))
        }
    }
}
