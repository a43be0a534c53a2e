//! TrafficRoute rules as the outbound runs them: matchers compiled once (regexes
//! built, header names and methods parsed, timeouts read) and backends already
//! resolved to endpoint sets, so matching a request allocates nothing.

use std::{sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, Method, Request};
use trellis_api::config::{
    BackendConfig, HeaderMatchConfig, MirrorConfig, RouteConfig, RouteMatchConfig,
};

use super::{
    bulkhead::{Bulkheads, Pool},
    destinations::{CompileError, Endpoint},
    fault::Fault,
    mirror::Mirror,
    outlier::Breaker,
    retry::{RetryBudget, RetryPolicy},
};

/// One rule: when `matches` holds, the request goes to one of `backends`.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    matches: RouteMatch,
    backends: Backends,
    /// The deadline for the response headers, counted from the request's arrival.
    pub timeout: Option<Duration>,
    /// The pool whose slot a request holds while out; none: unbounded.
    pub bulkhead: Option<Arc<Pool>>,
    pub fault: Option<Fault>,
    /// How failed tries are tried again; none: one try.
    pub retries: Option<RetryPolicy>,
    /// Where copies of a share of the requests go; none: nowhere.
    pub mirror: Option<Arc<Mirror>>,
}

/// Where a request may go: some endpoints of one service.
#[derive(Debug, Clone)]
pub struct Backend {
    pub service: String,
    pub subset: Option<String>,
    pub endpoints: Arc<[Arc<Endpoint>]>,
    /// The circuit breaker of `service`, shared by all its backends.
    pub breaker: Arc<Breaker>,
    /// The retries `service` may take, shared by all its backends.
    pub budget: RetryBudget,
}

/// Backends by weight; never empty and never all zero (compile refuses both).
#[derive(Debug)]
struct Backends {
    /// Each backend with the running sum of the weights up to and including it: a
    /// draw below that sum, and not below the previous one, lands on it.
    backends: Vec<(u64, Backend)>,
    total: u64,
}

/// Every condition given must hold.
#[derive(Debug, Default)]
struct RouteMatch {
    path_exact: Option<String>,
    path_prefix: Option<String>,
    path_regex: Option<regex::Regex>,
    method: Option<Method>,
    headers: Vec<HeaderMatch>,
}

#[derive(Debug)]
struct HeaderMatch {
    name: HeaderName,
    value: ValueMatch,
}

#[derive(Debug)]
enum ValueMatch {
    Present,
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
    /// Header values need not be UTF-8, so they are matched as bytes.
    Regex(regex::bytes::Regex),
}

// === impl Route ===

impl Route {
    /// Compiles the rule at `at` (e.g. `services.web.routes[0]`). `backend` resolves
    /// one backend (given its field path); `whole` is the route's own service, where a
    /// rule without backends sends its requests; `bulkheads` are its pools.
    pub fn compile(
        at: &str,
        config: &RouteConfig,
        whole: &Backend,
        bulkheads: &Bulkheads,
        mut backend: impl FnMut(&str, &BackendConfig) -> Result<Backend, CompileError>,
    ) -> Result<Self, CompileError> {
        let RouteConfig {
            name,
            matches,
            backends,
            timeout,
            retries,
            bulkhead,
            fault,
            mirror,
        } = config;
        let matches = RouteMatch::compile(&format!("{at}.matches"), matches)?;
        let backends = if backends.is_empty() {
            Backends::new(vec![(1, whole.clone())])
        } else {
            let resolved = backends
                .iter()
                .enumerate()
                .map(|(i, b)| Ok((b.weight, backend(&format!("{at}.backends[{i}]"), b)?)))
                .collect::<Result<Vec<_>, CompileError>>()?;
            Backends::new(resolved)
        };
        if backends.total == 0 {
            return Err(CompileError::invalid(
                format!("{at}.backends"),
                "weights must sum to more than 0",
            ));
        }
        let timeout = timeout
            .as_deref()
            .map(|t| {
                let field = || format!("{at}.timeout");
                match trellis_api::duration::parse(t) {
                    Ok(d) if d.is_zero() => {
                        Err(CompileError::invalid(field(), "must be longer than zero"))
                    }
                    Ok(d) => Ok(d),
                    Err(e) => Err(CompileError::invalid(field(), e.to_string())),
                }
            })
            .transpose()?;
        let bulkhead = bulkheads.for_route(at, bulkhead.as_deref())?;
        let fault = fault
            .as_ref()
            .map(|f| Fault::compile(at, &whole.service, name, f))
            .transpose()?;
        let retries = retries
            .as_ref()
            .map(|r| RetryPolicy::compile(&format!("{at}.retries"), r))
            .transpose()?;
        let mirror = mirror
            .as_ref()
            .map(|m| {
                let mat = format!("{at}.mirror");
                let MirrorConfig {
                    service, subset, ..
                } = m;
                let target = BackendConfig {
                    service: service.clone(),
                    subset: subset.clone(),
                    weight: 1,
                };
                let shadow = backend(&mat, &target)?;
                Mirror::compile(&mat, &whole.service, name, m, shadow, timeout).map(Arc::new)
            })
            .transpose()?;
        Ok(Self {
            name: name.clone(),
            matches,
            backends,
            timeout,
            bulkhead,
            fault,
            retries,
            mirror,
        })
    }

    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        self.matches.matches(req)
    }

    /// One backend, drawn by weight.
    pub fn pick(&self) -> Option<&Backend> {
        self.backends.pick()
    }

    /// Takes over the mirror pool of the rule of the same name in `previous` (the
    /// config this one replaces) when it mirrors to the same shadow, so a push neither
    /// frees the slots of copies still out nor doubles the pool.
    pub fn keep_mirror_pool(&mut self, previous: &[Route]) {
        let before = previous
            .iter()
            .find(|r| r.name == self.name)
            .and_then(|r| r.mirror.as_ref());
        // Just compiled: nothing else holds the new mirror yet.
        if let (Some(mirror), Some(before)) = (self.mirror.as_mut().and_then(Arc::get_mut), before)
        {
            mirror.keep_pool_of(before);
        }
    }
}

// === impl Backends ===

impl Backends {
    fn new(weighted: Vec<(u32, Backend)>) -> Self {
        let mut total = 0u64;
        let backends = weighted
            .into_iter()
            .map(|(weight, backend)| {
                total += u64::from(weight);
                (total, backend)
            })
            .collect();
        Self { backends, total }
    }

    fn pick(&self) -> Option<&Backend> {
        if self.total == 0 {
            return None;
        }
        let draw = fastrand::u64(..self.total);
        self.backends
            .iter()
            .find(|(upto, _)| draw < *upto)
            .map(|(_, backend)| backend)
    }
}

// === impl RouteMatch ===

impl RouteMatch {
    fn compile(at: &str, config: &RouteMatchConfig) -> Result<Self, CompileError> {
        let RouteMatchConfig {
            path_prefix,
            path_exact,
            path_regex,
            method,
            headers,
        } = config;
        for (field, path) in [("pathPrefix", path_prefix), ("pathExact", path_exact)] {
            if let Some(path) = path
                && !path.starts_with('/')
            {
                return Err(CompileError::invalid(
                    format!("{at}.{field}"),
                    format!("{path:?} must start with '/'"),
                ));
            }
        }
        let path_regex = path_regex
            .as_deref()
            .map(|re| {
                regex::Regex::new(&whole_input(re))
                    .map_err(|e| CompileError::invalid(format!("{at}.pathRegex"), regex_error(&e)))
            })
            .transpose()?;
        let method = method
            .as_deref()
            .map(|m| parse_method(m).map_err(|e| CompileError::invalid(format!("{at}.method"), e)))
            .transpose()?;
        let headers = headers
            .iter()
            .enumerate()
            .map(|(i, h)| HeaderMatch::compile(&format!("{at}.headers[{i}]"), h))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            path_exact: path_exact.clone(),
            path_prefix: path_prefix.clone(),
            path_regex,
            method,
            headers,
        })
    }

    fn matches<B>(&self, req: &Request<B>) -> bool {
        let path = req.uri().path();
        self.path_exact.as_ref().is_none_or(|p| path == p)
            && self.path_prefix.as_ref().is_none_or(|p| path.starts_with(p.as_str()))
            && self.method.as_ref().is_none_or(|m| req.method() == m)
            && self.headers.iter().all(|h| h.matches(req.headers()))
            // Last: the only condition that costs more than a comparison.
            && self.path_regex.as_ref().is_none_or(|re| re.is_match(path))
    }
}

// === impl HeaderMatch ===

impl HeaderMatch {
    fn compile(at: &str, config: &HeaderMatchConfig) -> Result<Self, CompileError> {
        let HeaderMatchConfig {
            name,
            exact,
            prefix,
            regex,
        } = config;
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            CompileError::invalid(
                format!("{at}.name"),
                format!("{name:?} is not a header name"),
            )
        })?;
        let value = match (exact, prefix, regex) {
            (None, None, None) => ValueMatch::Present,
            (Some(v), None, None) => ValueMatch::Exact(v.as_bytes().to_vec()),
            (None, Some(v), None) => ValueMatch::Prefix(v.as_bytes().to_vec()),
            (None, None, Some(re)) => ValueMatch::Regex(
                regex::bytes::Regex::new(&whole_input(re))
                    .map_err(|e| CompileError::invalid(format!("{at}.regex"), regex_error(&e)))?,
            ),
            _ => {
                return Err(CompileError::invalid(
                    at,
                    "give at most one of exact, prefix and regex",
                ));
            }
        };
        Ok(Self { name, value })
    }

    /// Any of the header's values may match (a header can appear more than once).
    fn matches(&self, headers: &HeaderMap) -> bool {
        headers.get_all(&self.name).iter().any(|value| {
            let value = value.as_bytes();
            match &self.value {
                ValueMatch::Present => true,
                ValueMatch::Exact(want) => value == want.as_slice(),
                ValueMatch::Prefix(want) => value.starts_with(want),
                ValueMatch::Regex(re) => re.is_match(value),
            }
        })
    }
}

/// Methods are case-sensitive: `get` would be an extension method no client sends.
pub fn parse_method(method: &str) -> Result<Method, String> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("{method:?} is not an upper-case HTTP method"));
    }
    Method::from_bytes(method.as_bytes()).map_err(|e| format!("{method:?}: {e}"))
}

/// A regex must match the whole path or value, as in Istio and the Gateway API: an
/// unanchored `/api` would also match `/internal/api`.
fn whole_input(re: &str) -> String {
    format!("^(?:{re})$")
}

/// The regex crate's message spans several lines (the pattern, a caret, the error);
/// an operator's one-line error keeps only the error.
fn regex_error(error: &regex::Error) -> String {
    let text = error.to_string();
    let reason = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map_or_else(
            || text.split_whitespace().collect::<Vec<_>>().join(" "),
            str::to_string,
        );
    format!("does not compile as a regex: {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::config::RouteMatchConfig;

    fn backend(subset: &str) -> Backend {
        Backend {
            service: "web".into(),
            subset: Some(subset.into()),
            endpoints: Arc::from(Vec::new()),
            breaker: Arc::new(Breaker::new("web", None, Arc::from(Vec::new()))),
            budget: RetryBudget::default(),
        }
    }

    fn route(matches: RouteMatchConfig) -> Result<Route, CompileError> {
        let config = RouteConfig {
            name: "r".into(),
            matches,
            backends: vec![],
            ..RouteConfig::default()
        };
        Route::compile(
            "services.web.routes[0]",
            &config,
            &backend("all"),
            &Bulkheads::default(),
            |_, _| unreachable!("no backends"),
        )
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn header(name: &str) -> HeaderMatchConfig {
        HeaderMatchConfig {
            name: name.into(),
            exact: None,
            prefix: None,
            regex: None,
        }
    }

    #[test]
    fn an_empty_match_matches_everything() {
        let r = route(RouteMatchConfig::default()).unwrap();
        assert!(r.matches(&request("DELETE", "/anything?x=1", &[])));
    }

    #[test]
    fn paths_match_exactly_by_prefix_or_by_whole_regex() {
        let exact = route(RouteMatchConfig {
            path_exact: Some("/api".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(exact.matches(&request("GET", "/api?q=1", &[])));
        assert!(!exact.matches(&request("GET", "/api/", &[])));

        let prefix = route(RouteMatchConfig {
            path_prefix: Some("/api/".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(prefix.matches(&request("GET", "/api/v1/orders", &[])));
        assert!(!prefix.matches(&request("GET", "/apiary", &[])));

        let regex = route(RouteMatchConfig {
            path_regex: Some("/orders/[0-9]+".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(regex.matches(&request("GET", "/orders/42", &[])));
        assert!(
            !regex.matches(&request("GET", "/v2/orders/42", &[])),
            "the regex matches the whole path"
        );
        assert!(!regex.matches(&request("GET", "/orders/42/items", &[])));
    }

    #[test]
    fn method_and_headers_must_all_hold() {
        let r = route(RouteMatchConfig {
            method: Some("POST".into()),
            headers: vec![
                HeaderMatchConfig {
                    exact: Some("true".into()),
                    ..header("x-canary")
                },
                HeaderMatchConfig {
                    prefix: Some("Bearer ".into()),
                    ..header("authorization")
                },
                HeaderMatchConfig {
                    regex: Some("v[12]".into()),
                    ..header("x-version")
                },
                header("x-present"),
            ],
            ..Default::default()
        })
        .unwrap();
        let all = [
            ("x-canary", "true"),
            ("authorization", "Bearer abc"),
            ("x-version", "v2"),
            ("x-present", ""),
        ];
        assert!(r.matches(&request("POST", "/", &all)));
        assert!(!r.matches(&request("GET", "/", &all)));
        for missing in 0..all.len() {
            let mut some = all.to_vec();
            some.remove(missing);
            assert!(
                !r.matches(&request("POST", "/", &some)),
                "without {missing}"
            );
        }
        for (name, wrong) in [
            ("x-canary", "TRUE"),
            ("authorization", "Basic abc"),
            ("x-version", "v22"),
        ] {
            let mut changed = all.to_vec();
            changed.retain(|(n, _)| *n != name);
            changed.push((name, wrong));
            assert!(
                !r.matches(&request("POST", "/", &changed)),
                "{name}: {wrong}"
            );
        }
    }

    #[test]
    fn any_value_of_a_repeated_header_may_match() {
        let r = route(RouteMatchConfig {
            headers: vec![HeaderMatchConfig {
                exact: Some("b".into()),
                ..header("x-tag")
            }],
            ..Default::default()
        })
        .unwrap();
        assert!(r.matches(&request("GET", "/", &[("x-tag", "a"), ("x-tag", "b")])));
    }

    #[test]
    fn bad_matches_are_named_by_their_field_path() {
        let cases = [
            (
                RouteMatchConfig {
                    path_regex: Some("(".into()),
                    ..Default::default()
                },
                "services.web.routes[0].matches.pathRegex: does not compile as a regex: unclosed group",
            ),
            (
                RouteMatchConfig {
                    headers: vec![
                        header("ok"),
                        HeaderMatchConfig {
                            exact: Some("a".into()),
                            regex: Some("a".into()),
                            ..header("x")
                        },
                    ],
                    ..Default::default()
                },
                "services.web.routes[0].matches.headers[1]: give at most one of exact, prefix and regex",
            ),
            (
                RouteMatchConfig {
                    headers: vec![header("bad name")],
                    ..Default::default()
                },
                "services.web.routes[0].matches.headers[0].name:",
            ),
            (
                RouteMatchConfig {
                    method: Some("get".into()),
                    ..Default::default()
                },
                "services.web.routes[0].matches.method: \"get\" is not an upper-case HTTP method",
            ),
            (
                RouteMatchConfig {
                    path_prefix: Some("api".into()),
                    ..Default::default()
                },
                "services.web.routes[0].matches.pathPrefix:",
            ),
        ];
        for (matches, want) in cases {
            let e = route(matches).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn bad_timeouts_and_zero_weights_are_refused() {
        let config = |timeout: Option<&str>, weights: &[u32]| RouteConfig {
            name: "r".into(),
            matches: Default::default(),
            backends: weights
                .iter()
                .map(|w| BackendConfig {
                    service: None,
                    subset: Some("v1".into()),
                    weight: *w,
                })
                .collect(),
            timeout: timeout.map(str::to_string),
            ..RouteConfig::default()
        };
        let compile = |config: &RouteConfig| {
            let pools = Bulkheads::default();
            Route::compile(
                "services.web.routes[2]",
                config,
                &backend("all"),
                &pools,
                |_, b| Ok(backend(b.subset.as_deref().unwrap())),
            )
        };
        let e = compile(&config(Some("soon"), &[1]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("services.web.routes[2].timeout: invalid duration"),
            "{e}"
        );
        let e = compile(&config(Some("0s"), &[1])).unwrap_err().to_string();
        assert_eq!(
            e,
            "services.web.routes[2].timeout: must be longer than zero"
        );
        let e = compile(&config(None, &[0, 0])).unwrap_err().to_string();
        assert_eq!(
            e,
            "services.web.routes[2].backends: weights must sum to more than 0"
        );
        let ok = compile(&config(Some("250ms"), &[0, 1])).unwrap();
        assert_eq!(ok.timeout, Some(Duration::from_millis(250)));
    }

    #[test]
    fn the_weighted_pick_follows_the_weights() {
        let backends = Backends::new(vec![
            (80, backend("v1")),
            (0, backend("never")),
            (20, backend("v2")),
        ]);
        let mut v1 = 0;
        for _ in 0..10_000 {
            match backends.pick().unwrap().subset.as_deref() {
                Some("v1") => v1 += 1,
                Some("v2") => {}
                other => panic!("picked {other:?}"),
            }
        }
        // 8000 expected; the standard deviation is 40.
        assert!((7800..8200).contains(&v1), "{v1}");

        let only = Backends::new(vec![(0, backend("zero")), (3, backend("three"))]);
        assert!((0..100).all(|_| only.pick().unwrap().subset.as_deref() == Some("three")));
        assert!(Backends::new(vec![]).pick().is_none());
    }
}
