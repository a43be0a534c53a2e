//! The YAML (or JSON) operators apply: one or more documents, each a Trellis
//! resource, parsed by `kind` and validated together so a route can name a subset
//! its DestinationPolicy defines in the same file.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::{
    AuthorizationPolicy, Canary, DestinationPolicy, DestinationPolicySpec, MeshConfig,
    TrafficRoute, validation::Invalid,
};

/// One applied resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    MeshConfig(MeshConfig),
    DestinationPolicy(DestinationPolicy),
    TrafficRoute(TrafficRoute),
    AuthorizationPolicy(AuthorizationPolicy),
    Canary(Canary),
}

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("document {index}: {message}")]
    Parse { index: usize, message: String },
    #[error("document {index}: apiVersion {found:?} is not trellis.dev/v1alpha1")]
    ApiVersion { index: usize, found: String },
    #[error(
        "document {index}: kind {found:?} is not one of MeshConfig, DestinationPolicy, \
         TrafficRoute, AuthorizationPolicy, Canary"
    )]
    Kind { index: usize, found: String },
}

#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Parses every document of `text` (YAML; JSON is YAML too). Empty documents are
/// skipped; anything else that is not a Trellis resource is an error naming it.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, DocumentError> {
    let mut documents = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value =
            serde_yaml_ng::Value::deserialize(document).map_err(|e| DocumentError::Parse {
                index,
                message: e.to_string(),
            })?;
        if value.is_null() {
            continue;
        }
        let meta: TypeMeta =
            serde_yaml_ng::from_value(value.clone()).map_err(|e| DocumentError::Parse {
                index,
                message: e.to_string(),
            })?;
        if meta.api_version != format!("{}/{}", crate::GROUP, crate::VERSION) {
            return Err(DocumentError::ApiVersion {
                index,
                found: meta.api_version,
            });
        }
        fn typed<T: serde::de::DeserializeOwned>(
            index: usize,
            value: serde_yaml_ng::Value,
        ) -> Result<T, DocumentError> {
            serde_yaml_ng::from_value(value).map_err(|e| DocumentError::Parse {
                index,
                message: e.to_string(),
            })
        }
        documents.push(match meta.kind.as_str() {
            "MeshConfig" => Document::MeshConfig(typed(index, value)?),
            "DestinationPolicy" => Document::DestinationPolicy(typed(index, value)?),
            "TrafficRoute" => Document::TrafficRoute(typed(index, value)?),
            "AuthorizationPolicy" => Document::AuthorizationPolicy(typed(index, value)?),
            "Canary" => Document::Canary(typed(index, value)?),
            _ => {
                return Err(DocumentError::Kind {
                    index,
                    found: meta.kind,
                });
            }
        });
    }
    Ok(documents)
}

impl Document {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MeshConfig(_) => "MeshConfig",
            Self::DestinationPolicy(_) => "DestinationPolicy",
            Self::TrafficRoute(_) => "TrafficRoute",
            Self::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Self::Canary(_) => "Canary",
        }
    }

    pub fn name(&self) -> &str {
        let meta = match self {
            Self::MeshConfig(r) => &r.metadata,
            Self::DestinationPolicy(r) => &r.metadata,
            Self::TrafficRoute(r) => &r.metadata,
            Self::AuthorizationPolicy(r) => &r.metadata,
            Self::Canary(r) => &r.metadata,
        };
        meta.name.as_deref().unwrap_or_default()
    }

    /// The resource as JSON, `apiVersion` and `kind` included: what a store keeps.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        match self {
            Self::MeshConfig(r) => serde_json::to_vec(r),
            Self::DestinationPolicy(r) => serde_json::to_vec(r),
            Self::TrafficRoute(r) => serde_json::to_vec(r),
            Self::AuthorizationPolicy(r) => serde_json::to_vec(r),
            Self::Canary(r) => serde_json::to_vec(r),
        }
    }

    /// Reads back what `to_json` wrote.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DocumentError> {
        let text = std::str::from_utf8(bytes).map_err(|e| DocumentError::Parse {
            index: 0,
            message: e.to_string(),
        })?;
        let mut documents = parse_documents(text)?;
        match (documents.pop(), documents.is_empty()) {
            (Some(document), true) => Ok(document),
            _ => Err(DocumentError::Parse {
                index: 0,
                message: "expected exactly one resource".into(),
            }),
        }
    }

    /// The namespace, `default` when unset; cluster-scoped kinds have none.
    pub fn namespace(&self) -> Option<&str> {
        let meta = match self {
            Self::MeshConfig(_) => return None,
            Self::DestinationPolicy(r) => &r.metadata,
            Self::TrafficRoute(r) => &r.metadata,
            Self::AuthorizationPolicy(r) => &r.metadata,
            Self::Canary(r) => &r.metadata,
        };
        Some(meta.namespace.as_deref().unwrap_or("default"))
    }
}

/// Validates every document; routes and canaries are checked against the
/// DestinationPolicy of their service in the same namespace, from the batch or from
/// `known`. To check a change to stored state, pass the whole state after the change
/// as `documents` (a store does), so a policy update that drops a subset a stored route
/// uses is refused too.
/// Refuses a second resource of `kind` for a service that already has one.
fn one_per_service<'a>(
    kind: &'static str,
    resources: impl Iterator<Item = (&'a ObjectMeta, &'a str)>,
    problems: &mut Vec<Invalid>,
) {
    let mut seen = std::collections::BTreeMap::new();
    for (metadata, service) in resources {
        let namespace = metadata.namespace.as_deref().unwrap_or("default");
        let name = metadata.name.as_deref().unwrap_or_default();
        if let Some(other) = seen.insert((namespace, service), name)
            && other != name
        {
            problems.push(Invalid {
                kind,
                name: name.to_string(),
                errors: vec![crate::validation::FieldError {
                    path: "spec.service".into(),
                    message: format!(
                        "service {service:?} in namespace {namespace:?} already has {kind} {other:?}"
                    ),
                }],
            });
        }
    }
}

pub fn validate_batch(
    documents: &[Document],
    known: &[DestinationPolicy],
) -> Result<(), Vec<Invalid>> {
    let policies: Vec<&DestinationPolicy> = documents
        .iter()
        .filter_map(|d| match d {
            Document::DestinationPolicy(p) => Some(p),
            _ => None,
        })
        .chain(known.iter())
        .collect();
    let policy_for = |namespace: Option<&str>, service: &str| -> Option<&DestinationPolicySpec> {
        policies
            .iter()
            .find(|p| {
                p.spec.service == service
                    && p.metadata.namespace.as_deref().unwrap_or("default")
                        == namespace.unwrap_or("default")
            })
            .map(|p| &p.spec)
    };
    let mut problems = Vec::new();
    // One DestinationPolicy per service: two would make which one applies depend on
    // order. One Canary per service: two would fight over the same routes' weights.
    one_per_service(
        "DestinationPolicy",
        policies
            .iter()
            .map(|p| (&p.metadata, p.spec.service.as_str())),
        &mut problems,
    );
    one_per_service(
        "Canary",
        documents.iter().filter_map(|d| match d {
            Document::Canary(c) => Some((&c.metadata, c.spec.service.as_str())),
            _ => None,
        }),
        &mut problems,
    );
    for document in documents {
        let name = document.name();
        let name_problem = if name.is_empty() {
            Some(("metadata.name", "is required".to_string()))
        } else if !crate::validation::is_dns_subdomain(name) {
            Some((
                "metadata.name",
                format!(
                    "{name:?} is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"
                ),
            ))
        } else {
            match document.namespace() {
                Some(ns) if !crate::validation::is_dns_label(ns) => Some((
                    "metadata.namespace",
                    format!("{ns:?} is not a DNS-1123 label"),
                )),
                _ => None,
            }
        };
        let result = match name_problem {
            Some((path, message)) => Err(Invalid {
                kind: document.kind(),
                name: name.to_string(),
                errors: vec![crate::validation::FieldError {
                    path: path.into(),
                    message,
                }],
            }),
            None => match document {
                Document::MeshConfig(r) => r.spec.validate(name),
                Document::DestinationPolicy(r) => r.spec.validate(name),
                Document::TrafficRoute(r) => r
                    .spec
                    .validate(name, policy_for(document.namespace(), &r.spec.service)),
                Document::AuthorizationPolicy(r) => r.spec.validate(name),
                Document::Canary(r) => r
                    .spec
                    .validate(name, policy_for(document.namespace(), &r.spec.service)),
            },
        };
        if let Err(invalid) = result {
            problems.push(invalid);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}
