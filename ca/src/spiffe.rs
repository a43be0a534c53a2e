//! SPIFFE ids (`spiffe://<trust-domain>/<path>`) as the SPIFFE-ID specification
//! defines them, and the mesh's workload form `spiffe://<td>/ns/<ns>/sa/<sa>`.

use std::{fmt, str::FromStr, sync::Arc};

const SCHEME: &str = "spiffe://";
/// The specification caps a trust domain name at 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The specification caps a whole SPIFFE id, as a URI, at 2048 bytes.
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE id or trust domain. Each variant names the rule broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE id must not be empty")]
    Empty,
    #[error("a SPIFFE id must start with the lowercase scheme `spiffe://`")]
    WrongScheme,
    #[error("the trust domain is missing")]
    MissingTrustDomain,
    #[error(
        "the trust domain may hold only lowercase letters, digits, `.`, `-` and `_`; found {0:?} \
         (ports, user info and upper case are not allowed)"
    )]
    BadTrustDomainChar(char),
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("a SPIFFE id is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("path segments must not be empty (no `//` and no trailing `/`)")]
    EmptySegment,
    #[error("path segments must not be `.` or `..`")]
    DotSegment,
    #[error(
        "path segments may hold only letters, digits, `.`, `-` and `_`; found {0:?} \
         (no query, fragment or percent-encoding)"
    )]
    BadPathChar(char),
    #[error("{part} must not be empty")]
    EmptyPart { part: &'static str },
}

/// A validated trust domain name, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

/// A validated SPIFFE id. Cheap to clone: the text is shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: Arc<str>,
    /// Byte offset in `uri` where the path starts (the end of the trust domain).
    path_start: usize,
}

// === impl TrustDomain ===

impl TrustDomain {
    pub fn parse(name: &str) -> Result<Self, SpiffeIdError> {
        check_trust_domain(name)?;
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn check_trust_domain(name: &str) -> Result<(), SpiffeIdError> {
    if name.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    match name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn check_segment(segment: &str) -> Result<(), SpiffeIdError> {
    match segment {
        "" => return Err(SpiffeIdError::EmptySegment),
        "." | ".." => return Err(SpiffeIdError::DotSegment),
        _ => {}
    }
    match segment
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::BadPathChar(c)),
        None => Ok(()),
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Parses and validates `spiffe://<trust-domain>[/<segment>...]`.
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        if uri.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if uri.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = uri.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(trust_domain)?;
        if let Some(path) = path.strip_prefix('/') {
            path.split('/').try_for_each(check_segment)?;
        }
        Ok(Self {
            uri: uri.into(),
            path_start: SCHEME.len() + trust_domain.len(),
        })
    }

    /// The mesh's workload id: `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn workload(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        for (part, value) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if value.is_empty() {
                return Err(SpiffeIdError::EmptyPart { part });
            }
            check_segment(value)?;
        }
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.uri[SCHEME.len()..self.path_start].into())
    }

    pub fn trust_domain_name(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_start]
    }

    /// The path, with its leading `/`; empty for a trust domain's own id.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// `(namespace, service account)` when the id has the workload form.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse_and_round_trip() {
        for (uri, td, path) in [
            ("spiffe://cluster.local", "cluster.local", ""),
            (
                "spiffe://example.org/ns/default/sa/web",
                "example.org",
                "/ns/default/sa/web",
            ),
            ("spiffe://a-b_c.9/x", "a-b_c.9", "/x"),
            (
                "spiffe://td/Upper.Case-ok_1/..a/.b",
                "td",
                "/Upper.Case-ok_1/..a/.b",
            ),
        ] {
            let id = SpiffeId::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(id.as_str(), uri);
            assert_eq!(id.to_string(), uri);
            assert_eq!(id.trust_domain_name(), td);
            assert_eq!(id.trust_domain().as_str(), td);
            assert_eq!(id.path(), path);
            assert_eq!(uri.parse::<SpiffeId>().as_ref(), Ok(&id));
        }
    }

    #[test]
    fn invalid_ids_name_the_rule_broken() {
        use SpiffeIdError::*;
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        let long_id = format!("spiffe://td/{}", "a".repeat(2048));
        let cases: Vec<(&str, SpiffeIdError)> = vec![
            ("", Empty),
            ("http://cluster.local/x", WrongScheme),
            ("SPIFFE://cluster.local/x", WrongScheme),
            ("spiffe:/cluster.local/x", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///ns/x", MissingTrustDomain),
            ("spiffe://Cluster.local/x", BadTrustDomainChar('C')),
            ("spiffe://cluster.local:8080/x", BadTrustDomainChar(':')),
            ("spiffe://user@cluster.local/x", BadTrustDomainChar('@')),
            ("spiffe://cluster.local?q=1", BadTrustDomainChar('?')),
            (&long_td, TrustDomainTooLong),
            (&long_id, TooLong),
            ("spiffe://td/", EmptySegment),
            ("spiffe://td/a//b", EmptySegment),
            ("spiffe://td/a/", EmptySegment),
            ("spiffe://td/./a", DotSegment),
            ("spiffe://td/a/..", DotSegment),
            ("spiffe://td/a?x=1", BadPathChar('?')),
            ("spiffe://td/a#frag", BadPathChar('#')),
            ("spiffe://td/a%20b", BadPathChar('%')),
            ("spiffe://td/a b", BadPathChar(' ')),
        ];
        for (uri, want) in cases {
            assert_eq!(SpiffeId::parse(uri), Err(want.clone()), "{uri}");
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn workload_builder_and_parts() {
        let td = TrustDomain::parse("cluster.local").unwrap();
        let id = SpiffeId::workload(&td, "shop", "payment").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/payment");
        assert_eq!(id.workload_parts(), Some(("shop", "payment")));
        assert_eq!(
            SpiffeId::parse("spiffe://td/other/x")
                .unwrap()
                .workload_parts(),
            None
        );
        assert_eq!(
            SpiffeId::workload(&td, "", "payment"),
            Err(SpiffeIdError::EmptyPart { part: "namespace" })
        );
        // A part is one path segment: a `/` must not smuggle in extra segments.
        assert_eq!(
            SpiffeId::workload(&td, "a/sa/b", "x"),
            Err(SpiffeIdError::BadPathChar('/'))
        );
        assert_eq!(
            TrustDomain::parse("bad:td"),
            Err(SpiffeIdError::BadTrustDomainChar(':'))
        );
    }
}
