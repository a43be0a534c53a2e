//! The checked-in CRD manifests match the types, every example is valid, and bad
//! resources are refused with the field path of each problem.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::Path;

use std::time::Duration;

use trellis_crds::{
    DestinationPolicy, Document, RetryBudget, TrafficRoute, crd_yaml, crds, parse_documents,
    validate_batch,
};

fn problems(yaml: &str) -> Vec<String> {
    let documents = parse_documents(yaml).unwrap();
    match validate_batch(&documents, &[]) {
        Ok(()) => vec![],
        Err(invalid) => invalid
            .iter()
            .flat_map(|i| {
                i.errors
                    .iter()
                    .map(|e| format!("{}: {}", e.path, e.message))
            })
            .collect(),
    }
}

#[test]
fn checked_in_manifests_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    for (file, crd) in crds() {
        let want = crd_yaml(&crd).unwrap();
        let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(
            have == want,
            "crds/manifests/{file} is out of date: run `cargo run -p trellis-crds --bin crdgen`"
        );
    }
}

#[test]
fn manifests_read_the_same_in_yaml_1_1_and_1_2() {
    for (file, crd) in crds() {
        let yaml = crd_yaml(&crd).unwrap();
        // Quoting must not change the data (a YAML 1.2 reader sees the types' CRD)...
        let read: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(read, serde_json::to_value(&crd).unwrap(), "{file}");
        // ...and leaves no key that kubectl's YAML 1.1 reader would take for a boolean.
        for line in yaml.lines() {
            let key = line.trim_start().trim_start_matches("- ");
            for word in ["on:", "off:", "yes:", "no:", "y:", "n:"] {
                assert!(!key.starts_with(word), "{file}: unquoted key in {line:?}");
            }
        }
    }
}

#[test]
fn manifests_carry_the_schema_limits_and_cel_rules() {
    let all: String = crds()
        .iter()
        .map(|(_, crd)| crd_yaml(crd).unwrap())
        .collect();
    for needle in [
        "x-kubernetes-validations",
        "has(self.service) != has(self.subset)",
        "self.metadata.name == 'default'",
        "maximum: 100",
        "^([0-9]+(ms|s|m|h|d))+$",
        "- p2c-ewma",
        "- STRICT",
        "has(self.delay) || has(self.abort)",
        "duration(self.maxEjectionTime) >= duration(self.baseEjectionTime)",
        "x-kubernetes-list-type: map",
        // `namespace` is a CEL reserved word; the apiserver only accepts it escaped.
        "has(self.identity) != has(self.__namespace__)",
    ] {
        assert!(all.contains(needle), "no {needle:?} in the generated CRDs");
    }
}

#[test]
fn every_example_parses_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let documents =
                parse_documents(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!documents.is_empty(), "{}", path.display());
            if let Err(invalid) = validate_batch(&documents, &[]) {
                panic!("{}: {}", path.display(), invalid[0]);
            }
            // What is parsed serializes back to the same resource.
            for document in &documents {
                let again = match document {
                    Document::TrafficRoute(r) => serde_yaml_ng::to_string(r).unwrap(),
                    Document::DestinationPolicy(r) => serde_yaml_ng::to_string(r).unwrap(),
                    Document::AuthorizationPolicy(r) => serde_yaml_ng::to_string(r).unwrap(),
                    Document::Canary(r) => serde_yaml_ng::to_string(r).unwrap(),
                    Document::MeshConfig(r) => serde_yaml_ng::to_string(r).unwrap(),
                };
                assert_eq!(&parse_documents(&again).unwrap()[0], document);
            }
            files += 1;
        }
    }
    assert!(files >= 3);
}

/// The demo's resources refer to each other across files (routes to policies'
/// subsets), so they are validated as the one batch `trellisctl demo` applies.
#[test]
fn the_marketplace_examples_validate_as_one_batch() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let dir = examples.join("marketplace");
    // The demo applies the mesh's settings with them.
    let mesh = std::fs::read_to_string(examples.join("mesh-config.yaml")).unwrap();
    let mut documents = parse_documents(&mesh).unwrap();
    let mut kinds = std::collections::BTreeSet::from(["MeshConfig"]);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = parse_documents(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        kinds.extend(parsed.iter().map(|d| d.kind()));
        documents.extend(parsed);
    }
    if let Err(invalid) = validate_batch(&documents, &[]) {
        panic!(
            "{}",
            invalid
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // Every kind is shown off.
    assert_eq!(kinds.len(), 5, "{kinds:?}");
}

#[test]
fn route_problems_name_their_field_paths() {
    let found = problems(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: payment}
spec:
  service: payment
  rules:
    - backends: [{service: payment, weight: 1}]
    - match: {pathPrefix: /a, pathRegex: "("}
      backends:
        - {service: payment, weight: 0}
        - {subset: v9, weight: 0}
      mirror: {service: shadow, percent: 150}
      timeout: soon
      retries: {attempts: 11, on: [5xx, teapot], backoff: {base: 1s, max: 10ms}}
      bulkhead: critical
"#,
    );
    for want in [
        "spec.rules[1].match: give at most one of pathPrefix, pathExact, pathRegex",
        "spec.rules[1].match.pathRegex: does not compile as a regex",
        "spec.rules[1].backends: weights must sum to more than 0",
        "spec.rules[1].backends[1].subset: no subset \"v9\"",
        "spec.rules[1].mirror.percent: must be between 0 and 100, not 150",
        "spec.rules[1].timeout: invalid duration \"soon\"",
        "spec.rules[1].retries.attempts: must be between 1 and 10",
        "spec.rules[1].retries.on[1]: \"teapot\" is not",
        "spec.rules[1].retries.backoff: base must not exceed max",
        "spec.rules[1].bulkhead: no bulkhead \"critical\"",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(want)),
            "missing {want:?} in {found:#?}"
        );
    }
    assert!(
        !found.iter().any(|p| p.starts_with("spec.rules[0]")),
        "{found:#?}"
    );
}

#[test]
fn a_subset_defined_in_the_same_batch_is_found() {
    let with_policy = r#"
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: p, namespace: shop}
spec:
  service: payment
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: r, namespace: shop}
spec:
  service: payment
  rules: [{backends: [{subset: v2, weight: 1}]}]
"#;
    assert_eq!(problems(with_policy), Vec::<String>::new());
    // The same route in another namespace does not see that policy.
    let elsewhere = with_policy.replace(
        "metadata: {name: r, namespace: shop}",
        "metadata: {name: r, namespace: other}",
    );
    assert_eq!(problems(&elsewhere).len(), 1);
}

#[test]
fn policy_canary_authz_and_mesh_problems_are_named() {
    let found = problems(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: p}
spec:
  service: Payment
  subsets: [{name: v1, labels: {}}, {name: v1, labels: {a: b}}]
  circuitBreaker: {consecutiveFailures: 0, interval: 1x, baseEjectionTime: 30s, maxEjectionPercent: 101}
  bulkheads: [{name: critical, maxConcurrentRequests: 0, maxPendingTime: later}]
  retryBudget: {ratio: 1.5}
---
apiVersion: trellis.dev/v1alpha1
kind: Canary
metadata: {name: c}
spec:
  service: reco
  stableSubset: v1
  canarySubset: v1
  steps: [10, 5, 120]
  interval: 1m
  analysis: {minSuccessRate: 99, maxP99Latency: fast}
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: a}
spec:
  service: payment
  rules:
    - from: [{identity: "http://x"}, {identity: spiffe://td/a, namespace: ns}]
      to: [{methods: [get], paths: [pay]}]
---
apiVersion: trellis.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {certTTL: 1 day}
"#,
    );
    for want in [
        "spec.service: \"Payment\" is not a DNS-1123 label",
        "spec.subsets[0].labels: must select at least one label",
        "spec.subsets[1].name: \"v1\" is used twice",
        "spec.circuitBreaker.consecutiveFailures: must be at least 1",
        "spec.circuitBreaker.interval: invalid duration",
        "spec.circuitBreaker.maxEjectionPercent: must be between 0 and 100",
        "spec.bulkheads[0].maxConcurrentRequests: must be at least 1",
        "spec.bulkheads[0].maxPendingTime: invalid duration",
        "spec.retryBudget.ratio: must be between 0 and 1",
        "spec.stableSubset: no subset \"v1\"",
        "spec.canarySubset: must differ from stableSubset",
        "spec.steps[1]: steps must rise",
        "spec.steps[2]: must be between 1 and 100",
        "spec.analysis.maxP99Latency: invalid duration",
        "spec.rules[0].from[0].identity: \"http://x\" is not a spiffe:// id",
        "spec.rules[0].from[1]: give exactly one of identity and namespace",
        "spec.rules[0].to[0].methods[0]: \"get\" is not an upper-case HTTP method",
        "spec.rules[0].to[0].paths[0]: must start with '/'",
        "metadata.name: the MeshConfig must be named \"default\"",
        "spec.certTTL: invalid duration",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(want)),
            "missing {want:?} in {found:#?}"
        );
    }
}

#[test]
fn malformed_documents_are_refused_with_their_index() {
    let e = parse_documents("apiVersion: trellis.dev/v1alpha1\nkind: Nope\nmetadata: {name: x}\n")
        .unwrap_err();
    assert!(
        e.to_string().starts_with("document 0: kind \"Nope\""),
        "{e}"
    );
    let e = parse_documents("---\napiVersion: v1\nkind: Service\n").unwrap_err();
    assert!(e.to_string().contains("is not trellis.dev/v1alpha1"), "{e}");
    let e = parse_documents(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficRoute\nmetadata: {name: r}\nspec: {service: a, rules: [], typo: 1}\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown field `typo`"), "{e}");
    let e = parse_documents("key: [unclosed").unwrap_err();
    assert!(e.to_string().starts_with("document 0:"), "{e}");
}

#[test]
fn names_namespaces_zero_durations_and_duplicate_policies_are_refused() {
    let found = problems(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: Payment Route}
spec: {service: payment, rules: [{backends: [{service: payment}]}]}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: r, namespace: Shop}
spec: {service: payment, rules: [{backends: [{service: payment}]}]}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {name: zero}
spec:
  service: payment
  rules:
    - name: a
      match: {pathPrefix: pay, method: get}
      backends: [{service: payment}]
      timeout: 0s
      retries: {attempts: 2, perTryTimeout: 0ms, on: ["+503"]}
    - name: a
      backends: [{service: payment}]
---
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: one}
spec: {service: payment}
---
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: two}
spec: {service: payment}
---
apiVersion: trellis.dev/v1alpha1
kind: Canary
metadata: {name: first}
spec: {service: payment, stableSubset: a, canarySubset: b, steps: [50], interval: 1m,
       analysis: {minSuccessRate: 99, maxP99Latency: 1s}}
---
apiVersion: trellis.dev/v1alpha1
kind: Canary
metadata: {name: second}
spec: {service: payment, stableSubset: a, canarySubset: b, steps: [50], interval: 1m,
       analysis: {minSuccessRate: 99, maxP99Latency: 1s}}
"#,
    );
    for want in [
        "metadata.name: \"Payment Route\" is not a DNS-1123 subdomain",
        "metadata.namespace: \"Shop\" is not a DNS-1123 label",
        "spec.rules[0].timeout: must be longer than zero",
        "spec.rules[0].retries.perTryTimeout: must be longer than zero",
        "spec.rules[0].retries.on[0]: \"+503\" is not",
        "spec.rules[0].match.pathPrefix: must start with '/'",
        "spec.rules[0].match.method: \"get\" is not an upper-case HTTP method",
        "spec.rules[1].name: \"a\" is used twice",
        "spec.service: service \"payment\" in namespace \"default\" already has DestinationPolicy",
        "spec.service: service \"payment\" in namespace \"default\" already has Canary \"first\"",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(want)),
            "missing {want:?} in {found:#?}"
        );
    }
}

fn route_with(rule_extra: &str) -> String {
    format!(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficRoute
metadata: {{name: r}}
spec:
  service: payment
  rules:
    - backends: [{{service: payment}}]
      {rule_extra}
"#
    )
}

fn policy_with(spec_extra: &str) -> String {
    format!(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {{name: p}}
spec:
  service: payment
  {spec_extra}
"#
    )
}

fn assert_problems(yaml: &str, wanted: &[&str]) {
    let found = problems(yaml);
    for want in wanted {
        assert!(
            found.iter().any(|p| p.starts_with(want)),
            "missing {want:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), wanted.len(), "{found:#?}");
}

#[test]
fn fault_problems_name_their_field_paths() {
    assert_problems(
        &route_with("fault: {}"),
        &["spec.rules[0].fault: give at least one of delay and abort"],
    );
    assert_problems(
        &route_with("fault: {abort: {status: 200, percent: 10}}"),
        &["spec.rules[0].fault.abort.status: must be between 400 and 599, not 200"],
    );
    assert_problems(
        &route_with("fault: {abort: {status: 600, percent: 10}}"),
        &["spec.rules[0].fault.abort.status: must be between 400 and 599, not 600"],
    );
    assert_problems(
        &route_with(
            "fault: {delay: {duration: 0ms, percent: 150}, abort: {status: 503, percent: -0.5}}",
        ),
        &[
            "spec.rules[0].fault.delay.duration: must be longer than zero",
            "spec.rules[0].fault.delay.percent: must be between 0 and 100, not 150",
            "spec.rules[0].fault.abort.percent: must be between 0 and 100, not -0.5",
        ],
    );
    assert_problems(
        &route_with("fault: {delay: {duration: soon, percent: .nan}}"),
        &[
            "spec.rules[0].fault.delay.duration: invalid duration \"soon\"",
            "spec.rules[0].fault.delay.percent: must be between 0 and 100, not NaN",
        ],
    );
    // Each half alone is enough, and fractions and both ends of the range are fine.
    for fault in [
        "fault: {delay: {duration: 100ms, percent: 0.5}}",
        "fault: {abort: {status: 400, percent: 0}}",
        "fault: {abort: {status: 599, percent: 100}}",
    ] {
        assert_problems(&route_with(fault), &[]);
    }
}

#[test]
fn fault_and_retry_fields_refuse_typos_and_parse_their_defaults() {
    for (yaml, typo) in [
        (
            "fault: {delay: {duration: 1s, percent: 1, jitter: 1}}",
            "jitter",
        ),
        (
            "fault: {abort: {status: 503, percent: 1}, drop: {}}",
            "drop",
        ),
        (
            "retries: {attempts: 2, allowNonIdempotents: true}",
            "allowNonIdempotents",
        ),
    ] {
        let e = parse_documents(&route_with(yaml)).unwrap_err();
        assert!(
            e.to_string().contains(&format!("unknown field `{typo}`")),
            "{e}"
        );
    }
    let e =
        parse_documents(&route_with("fault: {abort: {status: 70000, percent: 1}}")).unwrap_err();
    assert!(e.to_string().starts_with("document 0:"), "{e}");

    let route = |yaml: &str| match parse_documents(&route_with(yaml)).unwrap().remove(0) {
        Document::TrafficRoute(TrafficRoute { spec, .. }) => spec.rules[0].clone(),
        other => panic!("{other:?}"),
    };
    let rule = route("retries: {attempts: 2}");
    assert!(!rule.retries.unwrap().allow_non_idempotent);
    assert_eq!(rule.fault, None);
    let rule = route("retries: {attempts: 2, allowNonIdempotent: true}");
    assert!(rule.retries.unwrap().allow_non_idempotent);
}

#[test]
fn rate_limit_and_ejection_cap_problems_name_their_field_paths() {
    assert_problems(
        &policy_with("rateLimit: {requestsPerSecond: 0, burst: 0}"),
        &[
            "spec.rateLimit.requestsPerSecond: must be at least 1, not 0",
            "spec.rateLimit.burst: must be at least 1, not 0",
        ],
    );
    assert_problems(
        &policy_with(
            "circuitBreaker: {consecutiveFailures: 1, interval: 10s, baseEjectionTime: 1m, \
             maxEjectionPercent: 50, maxEjectionTime: 30s}",
        ),
        &["spec.circuitBreaker.maxEjectionTime: must not be shorter than baseEjectionTime"],
    );
    assert_problems(
        &policy_with(
            "circuitBreaker: {consecutiveFailures: 1, interval: 10s, baseEjectionTime: 1m, \
             maxEjectionPercent: 50, maxEjectionTime: 0s}",
        ),
        &[
            "spec.circuitBreaker.maxEjectionTime: must be longer than zero",
            "spec.circuitBreaker.maxEjectionTime: must not be shorter than baseEjectionTime",
        ],
    );
    assert_problems(
        &policy_with(
            "circuitBreaker: {consecutiveFailures: 1, interval: 10s, baseEjectionTime: 1m, \
             maxEjectionPercent: 50, maxEjectionTime: 1 hour}",
        ),
        &["spec.circuitBreaker.maxEjectionTime: invalid duration \"1 hour\""],
    );
    // Equal is allowed, however it is written, and days are understood.
    for max in ["90s", "1m30s", "1d"] {
        assert_problems(
            &policy_with(&format!(
                "circuitBreaker: {{consecutiveFailures: 1, interval: 10s, \
                 baseEjectionTime: 1m30s, maxEjectionPercent: 50, maxEjectionTime: {max}}}"
            )),
            &[],
        );
    }
    for typo in [
        "rateLimit: {requestsPerSecond: 1, brust: 2}",
        "rateLimit: {}",
    ] {
        assert!(parse_documents(&policy_with(typo)).is_err(), "{typo}");
    }
}

#[test]
fn circuit_breaker_and_bulkhead_limits_hold() {
    assert_problems(
        &policy_with(
            "circuitBreaker: {consecutiveFailures: 0, interval: 0s, baseEjectionTime: 0ms, \
             maxEjectionPercent: 101}
  bulkheads:
    - {name: critical, maxConcurrentRequests: 0, maxPendingTime: 0s}
    - {name: critical, maxConcurrentRequests: 1}",
        ),
        &[
            "spec.circuitBreaker.consecutiveFailures: must be at least 1, not 0",
            "spec.circuitBreaker.interval: must be longer than zero",
            "spec.circuitBreaker.baseEjectionTime: must be longer than zero",
            "spec.circuitBreaker.maxEjectionPercent: must be between 0 and 100, not 101",
            "spec.bulkheads[1].name: \"critical\" is used twice",
            "spec.bulkheads[0].maxConcurrentRequests: must be at least 1, not 0",
            "spec.bulkheads[0].maxPendingTime: must be longer than zero",
        ],
    );
}

#[test]
fn absent_resilience_fields_take_their_documented_defaults() {
    let policy = |yaml: &str| match parse_documents(&policy_with(yaml)).unwrap().remove(0) {
        Document::DestinationPolicy(DestinationPolicy { spec, .. }) => spec,
        other => panic!("{other:?}"),
    };
    let spec = policy(
        "circuitBreaker: {consecutiveFailures: 1, interval: 10s, baseEjectionTime: 30s, \
         maxEjectionPercent: 50}
  rateLimit: {requestsPerSecond: 100}",
    );
    let rate = spec.rate_limit.unwrap();
    assert_eq!((rate.burst, rate.burst_or_default()), (None, 100));
    assert!(!rate.per_source);
    let cb = spec.circuit_breaker.unwrap();
    assert_eq!(cb.max_ejection_time, None);
    assert_eq!(
        cb.max_ejection_time_or_default().unwrap(),
        Duration::from_secs(300)
    );
    assert_eq!(spec.retry_budget, None);
    assert_eq!(
        RetryBudget::default(),
        RetryBudget {
            ratio: 0.2,
            min_retries_per_second: 10
        }
    );

    let spec = policy(
        "circuitBreaker: {consecutiveFailures: 1, interval: 10s, baseEjectionTime: 30s, \
         maxEjectionPercent: 50, maxEjectionTime: 2m}
  rateLimit: {requestsPerSecond: 100, burst: 5, perSource: true}",
    );
    let rate = spec.rate_limit.unwrap();
    assert_eq!(rate.burst_or_default(), 5);
    assert!(rate.per_source);
    assert_eq!(
        spec.circuit_breaker
            .unwrap()
            .max_ejection_time_or_default()
            .unwrap(),
        Duration::from_secs(120)
    );
}

/// The schema's numeric limits of the new fields, read from the generated CRDs, are
/// the same limits `validate` enforces: the ends pass, one step past them fails.
#[test]
fn schema_limits_and_validation_agree_at_the_edges() {
    let schema = |file: &str| -> serde_json::Value {
        let (_, crd) = crds().into_iter().find(|(f, _)| *f == file).unwrap();
        serde_json::to_value(&crd.spec.versions[0].schema).unwrap()["openAPIV3Schema"].clone()
    };
    let routes = schema("trafficroutes.yaml");
    let policies = schema("destinationpolicies.yaml");
    // (schema, field path in it, smallest step past a limit, a resource with the field
    // set to `V`)
    let cases = [
        (
            &routes,
            "spec.rules[].fault.abort.status",
            1.0,
            route_with("fault: {abort: {status: V, percent: 1}}"),
        ),
        (
            &routes,
            "spec.rules[].fault.abort.percent",
            0.5,
            route_with("fault: {abort: {status: 503, percent: V}}"),
        ),
        (
            &routes,
            "spec.rules[].fault.delay.percent",
            0.5,
            route_with("fault: {delay: {duration: 1s, percent: V}}"),
        ),
        (
            &policies,
            "spec.rateLimit.requestsPerSecond",
            1.0,
            policy_with("rateLimit: {requestsPerSecond: V}"),
        ),
        (
            &policies,
            "spec.rateLimit.burst",
            1.0,
            policy_with("rateLimit: {requestsPerSecond: 1, burst: V}"),
        ),
        (
            &policies,
            "spec.circuitBreaker.maxEjectionPercent",
            1.0,
            policy_with(
                "circuitBreaker: {consecutiveFailures: 1, interval: 1s, baseEjectionTime: 1s, \
                 maxEjectionPercent: V}",
            ),
        ),
    ];
    for (schema, path, step, template) in cases {
        let mut node = schema;
        for key in path.split('.') {
            node = match key.strip_suffix("[]") {
                Some(key) => &node["properties"][key]["items"],
                None => &node["properties"][key],
            };
        }
        assert!(node.is_object(), "no schema at {path}");
        let yaml = |v: f64| template.replace(": V", &format!(": {v}"));
        let min = node["minimum"].as_f64().unwrap_or_else(|| panic!("{path}"));
        assert_eq!(problems(&yaml(min)), Vec::<String>::new(), "{path} = {min}");
        // Below zero only parses for floats.
        if min - step >= 0.0 || step < 1.0 {
            assert!(
                !problems(&yaml(min - step)).is_empty(),
                "{path} = {min} - {step}"
            );
        }
        if let Some(max) = node["maximum"].as_f64() {
            assert_eq!(problems(&yaml(max)), Vec::<String>::new(), "{path} = {max}");
            assert!(
                !problems(&yaml(max + step)).is_empty(),
                "{path} = {max} + {step}"
            );
        }
    }
}
