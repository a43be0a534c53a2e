//! Inbound authorization: whether a caller (its verified SPIFFE id, or none for
//! plaintext in PERMISSIVE mode) may make a request of the local app. Rules only
//! allow: a request any rule matches is allowed; with rules, nothing else is; without
//! rules, the default decides.

use http::{Method, Request};
use trellis_api::config::{
    AllowConfig, AuthorizationDefault, InboundConfig, OperationConfig, SourceConfig,
};
use trellis_ca::SpiffeId;

use crate::outbound::{destinations::CompileError, route::parse_method};

/// Requests and connections refused by authorization, by local service.
pub const DECISIONS: &str = "trellis_authz_decisions_total";

#[derive(Debug, Default)]
pub struct Authorization {
    default: AuthorizationDefault,
    rules: Vec<Rule>,
}

/// Callers matching any of `from` (none: anyone) doing any of `to` (none: anything).
#[derive(Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
}

#[derive(Debug)]
enum Source {
    Identity(String),
    Namespace(String),
}

/// A method in `methods` (none: any) on a path in `paths` (none: any).
#[derive(Debug)]
struct Operation {
    methods: Vec<Method>,
    paths: Vec<PathPattern>,
}

#[derive(Debug)]
enum PathPattern {
    Exact(String),
    Prefix(String),
}

/// Why a caller was refused, for the 403 body and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    NoRuleMatches,
    DefaultDeny,
}

// === impl Authorization ===

impl Authorization {
    pub fn compile(config: &InboundConfig) -> Result<Self, CompileError> {
        let InboundConfig {
            default,
            allow,
            rate_limit: _,
        } = config;
        let rules = allow
            .iter()
            .enumerate()
            .map(|(r, rule)| Rule::compile(&format!("inbound.allow[{r}]"), rule))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            default: *default,
            rules,
        })
    }

    /// Whether `caller` may make `req`.
    pub fn check_request<B>(
        &self,
        caller: Option<&SpiffeId>,
        req: &Request<B>,
    ) -> Result<(), Denial> {
        self.check(|rule| {
            rule.admits(caller) && (rule.to.is_empty() || rule.to.iter().any(|op| op.matches(req)))
        })
    }

    /// Whether `caller` may open an opaque stream: no method or path to check, so
    /// only a rule that admits the caller for everything will do.
    pub fn check_stream(&self, caller: Option<&SpiffeId>) -> Result<(), Denial> {
        self.check(|rule| rule.admits(caller) && rule.unrestricted())
    }

    fn check(&self, allows: impl Fn(&Rule) -> bool) -> Result<(), Denial> {
        if self.rules.is_empty() {
            return match self.default {
                AuthorizationDefault::Allow => Ok(()),
                AuthorizationDefault::Deny => Err(Denial::DefaultDeny),
            };
        }
        if self.rules.iter().any(allows) {
            Ok(())
        } else {
            Err(Denial::NoRuleMatches)
        }
    }
}

// === impl Denial ===

impl Denial {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoRuleMatches => "no authorization rule allows it",
            Self::DefaultDeny => "the service has no authorization rules and the default is DENY",
        }
    }
}

// === impl Rule ===

impl Rule {
    fn compile(at: &str, config: &AllowConfig) -> Result<Self, CompileError> {
        let AllowConfig { from, to } = config;
        let from = from
            .iter()
            .enumerate()
            .map(|(s, source)| Source::compile(&format!("{at}.from[{s}]"), source))
            .collect::<Result<_, _>>()?;
        let to = to
            .iter()
            .enumerate()
            .map(|(o, op)| Operation::compile(&format!("{at}.to[{o}]"), op))
            .collect::<Result<_, _>>()?;
        Ok(Self { from, to })
    }

    fn admits(&self, caller: Option<&SpiffeId>) -> bool {
        self.from.is_empty() || caller.is_some_and(|id| self.from.iter().any(|s| s.matches(id)))
    }

    fn unrestricted(&self) -> bool {
        self.to.is_empty()
            || self
                .to
                .iter()
                .any(|op| op.methods.is_empty() && op.paths.is_empty())
    }
}

// === impl Source ===

impl Source {
    fn compile(at: &str, config: &SourceConfig) -> Result<Self, CompileError> {
        let SourceConfig {
            identity,
            namespace,
        } = config;
        match (identity, namespace) {
            (Some(id), None) => SpiffeId::parse(id)
                .map(|id| Self::Identity(id.as_str().to_string()))
                .map_err(|e| {
                    CompileError::invalid(format!("{at}.identity"), format!("{id:?}: {e}"))
                }),
            (None, Some(ns)) if ns.is_empty() || ns.contains('/') => Err(CompileError::invalid(
                format!("{at}.namespace"),
                format!("{ns:?} is not a namespace"),
            )),
            (None, Some(ns)) => Ok(Self::Namespace(ns.clone())),
            _ => Err(CompileError::invalid(
                at,
                "give exactly one of identity and namespace",
            )),
        }
    }

    fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Identity(want) => id.as_str() == want,
            Self::Namespace(want) => namespace_of(id) == Some(want.as_str()),
        }
    }
}

/// The `<ns>` of an id whose path starts `/ns/<ns>`. The inbound accepts only its own
/// trust domain, so the namespace alone says who it is.
fn namespace_of(id: &SpiffeId) -> Option<&str> {
    id.path().strip_prefix("/ns/")?.split('/').next()
}

// === impl Operation ===

impl Operation {
    fn compile(at: &str, config: &OperationConfig) -> Result<Self, CompileError> {
        let OperationConfig { methods, paths } = config;
        let methods = methods
            .iter()
            .enumerate()
            .map(|(m, method)| {
                parse_method(method)
                    .map_err(|e| CompileError::invalid(format!("{at}.methods[{m}]"), e))
            })
            .collect::<Result<_, _>>()?;
        let paths = paths
            .iter()
            .enumerate()
            .map(|(p, path)| {
                if !path.starts_with('/') {
                    return Err(CompileError::invalid(
                        format!("{at}.paths[{p}]"),
                        format!("{path:?} must start with '/'"),
                    ));
                }
                Ok(match path.strip_suffix('*') {
                    Some(prefix) => PathPattern::Prefix(prefix.to_string()),
                    None => PathPattern::Exact(path.clone()),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { methods, paths })
    }

    fn matches<B>(&self, req: &Request<B>) -> bool {
        let path = req.uri().path();
        (self.methods.is_empty() || self.methods.contains(req.method()))
            // A path the app could read as another one (`/public/../admin`) matches
            // no path rule: refusing it is safe, guessing the app's reading is not.
            && (self.paths.is_empty()
                || (is_plain_path(path) && self.paths.iter().any(|p| p.matches(path))))
    }
}

impl PathPattern {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(want) => path == want,
            Self::Prefix(prefix) => path.starts_with(prefix.as_str()),
        }
    }
}

/// No dot segments, empty segments or backslashes, literal or percent-encoded.
fn is_plain_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    let encoded_separator = bytes.windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'e' | b'f') | (b'5', b'c')
            )
    });
    !encoded_separator
        && !path.contains('\\')
        && !path.contains("//")
        && path
            .split('/')
            .all(|segment| segment != "." && segment != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")).unwrap()
    }

    fn request(method: &str, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    }

    fn from_identity(id: &SpiffeId) -> SourceConfig {
        SourceConfig {
            identity: Some(id.as_str().to_string()),
            namespace: None,
        }
    }

    fn from_namespace(ns: &str) -> SourceConfig {
        SourceConfig {
            identity: None,
            namespace: Some(ns.into()),
        }
    }

    fn to(methods: &[&str], paths: &[&str]) -> OperationConfig {
        OperationConfig {
            methods: methods.iter().map(|m| m.to_string()).collect(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn authorization(default: AuthorizationDefault, allow: Vec<AllowConfig>) -> Authorization {
        Authorization::compile(&InboundConfig {
            default,
            allow,
            ..InboundConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn without_rules_the_default_decides() {
        let allow = authorization(AuthorizationDefault::Allow, vec![]);
        assert_eq!(allow.check_request(None, &request("GET", "/")), Ok(()));
        assert_eq!(allow.check_stream(Some(&id("x", "y"))), Ok(()));
        let deny = authorization(AuthorizationDefault::Deny, vec![]);
        let caller = id("default", "a");
        assert_eq!(
            deny.check_request(Some(&caller), &request("GET", "/")),
            Err(Denial::DefaultDeny)
        );
        assert_eq!(deny.check_stream(Some(&caller)), Err(Denial::DefaultDeny));
    }

    #[test]
    fn identities_and_namespaces_select_callers() {
        let a = id("default", "a");
        let rules = authorization(
            AuthorizationDefault::Allow,
            vec![AllowConfig {
                from: vec![from_identity(&a), from_namespace("shop")],
                to: vec![],
            }],
        );
        let get = request("GET", "/");
        assert_eq!(rules.check_request(Some(&a), &get), Ok(()));
        assert_eq!(
            rules.check_request(Some(&id("shop", "anyone")), &get),
            Ok(())
        );
        // With rules, the ALLOW default no longer admits the rest.
        for other in [id("default", "b"), id("shopping", "a")] {
            assert_eq!(
                rules.check_request(Some(&other), &get),
                Err(Denial::NoRuleMatches),
                "{other}"
            );
        }
        assert_eq!(rules.check_request(None, &get), Err(Denial::NoRuleMatches));
        let odd = SpiffeId::parse("spiffe://cluster.local/shop").unwrap();
        assert_eq!(
            rules.check_request(Some(&odd), &get),
            Err(Denial::NoRuleMatches)
        );
    }

    #[test]
    fn methods_and_paths_restrict_what_a_caller_may_do() {
        let a = id("default", "a");
        let rules = authorization(
            AuthorizationDefault::Deny,
            vec![AllowConfig {
                from: vec![from_identity(&a)],
                to: vec![
                    to(&["GET", "HEAD"], &["/public/*", "/health"]),
                    to(&["POST"], &[]),
                ],
            }],
        );
        let check = |method, path| {
            rules
                .check_request(Some(&a), &request(method, path))
                .is_ok()
        };
        assert!(check("GET", "/public/index.html"));
        assert!(check("HEAD", "/health"));
        assert!(check("POST", "/anything"));
        assert!(!check("GET", "/healthz"), "exact, not prefix");
        assert!(!check("DELETE", "/public/x"));
        assert!(!check("GET", "/admin"));
        for sneaky in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/%2E%2e/admin",
            "/public/..%2fadmin",
            "/public//admin",
            "/public/%5c..%5cadmin",
        ] {
            assert!(!check("GET", sneaky), "{sneaky}");
        }
        // A stream has no method: only an unrestricted rule admits it.
        assert_eq!(rules.check_stream(Some(&a)), Err(Denial::NoRuleMatches));
        let open = authorization(
            AuthorizationDefault::Deny,
            vec![AllowConfig {
                from: vec![from_identity(&a)],
                to: vec![to(&["GET"], &[]), to(&[], &[])],
            }],
        );
        assert_eq!(open.check_stream(Some(&a)), Ok(()));
        assert_eq!(
            open.check_stream(Some(&id("default", "b"))),
            Err(Denial::NoRuleMatches)
        );
    }

    #[test]
    fn an_empty_from_admits_every_caller() {
        let rules = authorization(
            AuthorizationDefault::Deny,
            vec![AllowConfig {
                from: vec![],
                to: vec![to(&["GET"], &[])],
            }],
        );
        assert_eq!(rules.check_request(None, &request("GET", "/")), Ok(()));
        assert!(rules.check_request(None, &request("PUT", "/")).is_err());
    }

    #[test]
    fn bad_rules_are_named_by_their_field_path() {
        let compile = |rule: AllowConfig| {
            Authorization::compile(&InboundConfig {
                default: AuthorizationDefault::Deny,
                allow: vec![AllowConfig::default(), rule],
                ..InboundConfig::default()
            })
            .unwrap_err()
            .to_string()
        };
        let e = compile(AllowConfig {
            from: vec![SourceConfig {
                identity: Some("spiffe://x/y".into()),
                namespace: Some("shop".into()),
            }],
            to: vec![],
        });
        assert_eq!(
            e,
            "inbound.allow[1].from[0]: give exactly one of identity and namespace"
        );
        let e = compile(AllowConfig {
            from: vec![],
            to: vec![to(&[], &["/ok"]), to(&["get"], &[])],
        });
        assert!(e.starts_with("inbound.allow[1].to[1].methods[0]:"), "{e}");
        let e = compile(AllowConfig {
            from: vec![],
            to: vec![to(&[], &["public/*"])],
        });
        assert!(e.starts_with("inbound.allow[1].to[0].paths[0]:"), "{e}");
        let e = compile(AllowConfig {
            from: vec![SourceConfig {
                identity: Some("https://nope".into()),
                namespace: None,
            }],
            to: vec![],
        });
        assert!(e.starts_with("inbound.allow[1].from[0].identity:"), "{e}");
    }
}
