//! `trellisctl install`: the manifests of `helm/trellis` with its default values, built
//! here without helm, as multi-document YAML for `kubectl apply -f -`.
//!
//! The output is the same set of objects as
//! `helm template trellis helm/trellis --namespace <ns> --include-crds` (the test in
//! `tests/tests/helm.rs` renders the chart with Helm's own engine and compares them
//! object by object), so a cluster set up either way is the same cluster. The CRDs
//! come from the Rust types, as the chart's copies do.

use serde_json::{Map, Value, json};

use crate::error::CliError;

/// The chart's version and appVersion, which are the workspace's version: the test
/// fails when `helm/trellis/Chart.yaml` and the crates drift apart.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The release name the labels carry, as `helm install trellis helm/trellis` would.
const RELEASE: &str = "trellis";
const NAME: &str = "trellis-control-plane";
const WEBHOOK_CONFIGURATION: &str = "trellis-sidecar-injector";
const TRUST_ANCHORS: &str = "trellis-trust-anchors";
const CA_SECRET: &str = "trellis-ca";
const INJECTION: &str = "trellis-injection";
const LEADER_LEASE: &str = "trellis-control-plane-leader";
const CONTROL_PLANE_IMAGE: &str = "ghcr.io/trellis-mesh/trellis-control-plane";
const PROXY_IMAGE: &str = "ghcr.io/trellis-mesh/trellis-proxy";

// The Grafana dashboards of `helm/trellis/dashboards/*.json`, as (file name, contents).
include!(concat!(env!("OUT_DIR"), "/dashboards.rs"));

/// What may differ from the chart's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// Where the control plane runs (`helm install --namespace`).
    pub namespace: String,
    /// The tag of both images [default: this trellisctl's version].
    pub image_tag: Option<String>,
    /// Also emit the Namespace itself, first (`helm install --create-namespace`).
    pub create_namespace: bool,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            namespace: "trellis-system".into(),
            image_tag: None,
            create_namespace: false,
        }
    }
}

/// Every object, in the order `kubectl apply` can create them: the CRDs, then what
/// the others refer to before those that refer.
pub fn objects(options: &InstallOptions) -> Result<Vec<Value>, CliError> {
    check_name("--namespace", &options.namespace)?;
    if let Some(tag) = &options.image_tag {
        check_tag(tag)?;
    }
    let ns = options.namespace.as_str();
    let tag = options.image_tag.as_deref().unwrap_or(VERSION);
    let mut objects = Vec::new();
    if options.create_namespace {
        objects.push(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns},
        }));
    }
    for (file, crd) in trellis_crds::crds() {
        objects.push(serde_json::to_value(&crd).map_err(|e| CliError::Manifest {
            path: format!("crds/manifests/{file}"),
            reason: format!("the CRD does not serialise: {e}"),
        })?);
    }
    objects.push(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(NAME, Some(ns), "control-plane"),
    }));
    objects.push(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(TRUST_ANCHORS, Some(ns), "control-plane"),
    }));
    objects.push(dashboards(ns));
    objects.push(injection(ns, tag));
    objects.push(cluster_role());
    objects.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": metadata(NAME, None, "control-plane"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}],
    }));
    objects.push(role(ns));
    objects.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(NAME, Some(ns), "control-plane"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}],
    }));
    objects.push(service(ns));
    objects.push(deployment(ns, tag));
    objects.push(json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(NAME, Some(ns), "control-plane"),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": selector_labels()}},
    }));
    objects.push(webhook(ns));
    Ok(objects)
}

/// The objects as one multi-document YAML stream.
pub fn render(options: &InstallOptions) -> Result<String, CliError> {
    let mut out = format!(
        "# Trellis {VERSION}: `trellisctl install`, the same objects as\n\
         # `helm template trellis helm/trellis --namespace {} --include-crds`.\n",
        options.namespace
    );
    for object in objects(options)? {
        out.push_str("---\n");
        yaml::document(&mut out, &object);
    }
    Ok(out)
}

/// A Kubernetes object name (RFC 1123 label), refused with the flag that gave it.
fn check_name(flag: &str, name: &str) -> Result<(), CliError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "{flag} {name:?} is not a valid namespace name: at most 63 characters, \
             lowercase letters, digits and '-', starting and ending with a letter or digit"
        )))
    }
}

/// An image tag as the OCI distribution spec allows it.
fn check_tag(tag: &str) -> Result<(), CliError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !tag.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "--image-tag {tag:?} is not a valid image tag: at most 128 letters, digits, \
             '_', '.' and '-', not starting with '.' or '-'"
        )))
    }
}

/// The labels `helm/trellis/templates/_helpers.tpl` puts on every object.
fn labels(component: &str) -> Value {
    json!({
        "helm.sh/chart": format!("trellis-{VERSION}"),
        "app.kubernetes.io/name": "trellis",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/version": VERSION,
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/part-of": "trellis",
        "app.kubernetes.io/component": component,
    })
}

fn selector_labels() -> Value {
    json!({
        "app.kubernetes.io/name": NAME,
        "app.kubernetes.io/instance": RELEASE,
    })
}

fn metadata(name: &str, namespace: Option<&str>, component: &str) -> Value {
    let mut meta = Map::new();
    meta.insert("name".into(), name.into());
    if let Some(ns) = namespace {
        meta.insert("namespace".into(), ns.into());
    }
    meta.insert("labels".into(), labels(component));
    Value::Object(meta)
}

fn dashboards(ns: &str) -> Value {
    let mut metadata = metadata("trellis-dashboards", Some(ns), "dashboards");
    if let Some(labels) = metadata.get_mut("labels").and_then(Value::as_object_mut) {
        labels.insert("grafana_dashboard".into(), "1".into());
    }
    let mut object = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata});
    if !DASHBOARDS.is_empty() {
        let data: Map<String, Value> = DASHBOARDS
            .iter()
            .map(|(file, contents)| ((*file).to_string(), Value::from(*contents)))
            .collect();
        object["data"] = Value::Object(data);
    }
    object
}

/// What the webhook puts into pods, read by the control plane at start
/// (`--injection-config`); the same text the chart's template renders.
fn injection(ns: &str, tag: &str) -> Value {
    let config = format!(
        "proxyImage: \"{PROXY_IMAGE}:{tag}\"\n\
         imagePullPolicy: IfNotPresent\n\
         controlPlaneAddr: \"https://{NAME}.{ns}.svc:15012\"\n\
         trustDomain: \"cluster.local\"\n"
    );
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(INJECTION, Some(ns), "injector"),
        "data": {"injection.yaml": config},
    })
}

fn cluster_role() -> Value {
    let resources = [
        "meshconfigs",
        "destinationpolicies",
        "trafficroutes",
        "authorizationpolicies",
        "canaries",
    ];
    let statuses: Vec<String> = resources.iter().map(|r| format!("{r}/status")).collect();
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": metadata(NAME, None, "control-plane"),
        "rules": [
            {"apiGroups": [trellis_crds::GROUP], "resources": resources, "verbs": ["get", "list", "watch"]},
            {"apiGroups": [trellis_crds::GROUP], "resources": statuses, "verbs": ["patch"]},
            {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [TRUST_ANCHORS], "verbs": ["get", "update", "patch"]},
            {
                "apiGroups": ["admissionregistration.k8s.io"],
                "resources": ["mutatingwebhookconfigurations"],
                "resourceNames": [WEBHOOK_CONFIGURATION],
                "verbs": ["get", "patch"],
            },
        ],
    })
}

fn role(ns: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(NAME, Some(ns), "control-plane"),
        "rules": [
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [CA_SECRET], "verbs": ["get", "update"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [LEADER_LEASE], "verbs": ["get", "update"]},
        ],
    })
}

fn service(ns: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(NAME, Some(ns), "control-plane"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(),
            "ports": [
                {"name": "grpc", "port": 15012, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "api", "port": 15011, "targetPort": "api", "protocol": "TCP"},
                {"name": "admin", "port": 15014, "targetPort": "admin", "protocol": "TCP"},
                {"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP", "appProtocol": "https"},
                {"name": "dashboard", "port": 15015, "targetPort": "dashboard", "protocol": "TCP"},
            ],
        },
    })
}

fn deployment(ns: &str, tag: &str) -> Value {
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let env_values = [
        ("TRELLIS_DATA_DIR", "/var/lib/trellis".to_string()),
        ("TRELLIS_API_ADDR", "0.0.0.0:15011".into()),
        ("TRELLIS_GRPC_ADDR", "0.0.0.0:15012".into()),
        ("TRELLIS_ADMIN_ADDR", "0.0.0.0:15014".into()),
        ("TRELLIS_DASHBOARD_ADDR", "0.0.0.0:15015".into()),
        ("TRELLIS_WEBHOOK_ADDR", "0.0.0.0:15017".into()),
        ("TRELLIS_TRUST_DOMAIN", "cluster.local".into()),
        ("TRELLIS_CA_SECRET", CA_SECRET.into()),
        ("TRELLIS_WEBHOOK_DNS_NAMES", format!("{NAME}.{ns}.svc")),
        (
            "TRELLIS_INJECTION_CONFIG",
            "/etc/trellis/injection/injection.yaml".into(),
        ),
        (
            "TRELLIS_WEBHOOK_CONFIGURATION",
            WEBHOOK_CONFIGURATION.into(),
        ),
        ("TRELLIS_LEADER_LEASE", LEADER_LEASE.into()),
        ("TRELLIS_LOG", "info".into()),
        ("TRELLIS_LOG_FORMAT", "json".into()),
    ];
    let mut env = vec![
        json!({"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")}),
        json!({"name": "POD_NAME", "valueFrom": field("metadata.name")}),
    ];
    env.extend(
        env_values
            .into_iter()
            .map(|(name, value)| json!({"name": name, "value": value})),
    );
    let ports: Vec<Value> = [
        ("grpc", 15012),
        ("api", 15011),
        ("admin", 15014),
        ("webhook", 15017),
        ("dashboard", 15015),
    ]
    .into_iter()
    .map(|(name, port)| json!({"name": name, "containerPort": port, "protocol": "TCP"}))
    .collect();
    let probe = |path: &str, period: u32| {
        json!({
            "httpGet": {"path": path, "port": "admin"},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        })
    };
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(NAME, Some(ns), "control-plane"),
        "spec": {
            "replicas": 2,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "selector": {"matchLabels": selector_labels()},
            "template": {
                "metadata": {
                    "labels": {
                        "app.kubernetes.io/name": NAME,
                        "app.kubernetes.io/instance": RELEASE,
                        "app.kubernetes.io/component": "control-plane",
                        "app.kubernetes.io/part-of": "trellis",
                        "trellis.dev/inject": "disabled",
                    },
                    "annotations": {"trellis.dev/inject": "disabled"},
                },
                "spec": {
                    "serviceAccountName": NAME,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "control-plane",
                        "image": format!("{CONTROL_PLANE_IMAGE}:{tag}"),
                        "imagePullPolicy": "IfNotPresent",
                        "args": ["--mode", "kubernetes"],
                        "env": env,
                        "ports": ports,
                        "livenessProbe": probe("/live", 10),
                        "readinessProbe": probe("/ready", 5),
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "128Mi"},
                            "limits": {"memory": "512Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "data", "mountPath": "/var/lib/trellis"},
                            {"name": "injection", "mountPath": "/etc/trellis/injection", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "data", "emptyDir": {}},
                        {"name": "injection", "configMap": {"name": INJECTION}},
                    ],
                    "affinity": {
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [{
                                "weight": 100,
                                "podAffinityTerm": {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {"matchLabels": selector_labels()},
                                },
                            }],
                        },
                    },
                },
            },
        },
    })
}

fn webhook(ns: &str) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": metadata(WEBHOOK_CONFIGURATION, None, "injector"),
        "webhooks": [{
            "name": "inject.trellis.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "matchPolicy": "Equivalent",
            "reinvocationPolicy": "Never",
            "clientConfig": {
                "service": {"name": NAME, "namespace": ns, "path": "/inject", "port": 443},
            },
            "rules": [{
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "namespaceSelector": {"matchLabels": {"trellis.dev/inject": "enabled"}},
        }],
    })
}

/// A YAML writer for JSON values that every YAML reader agrees on. Kubernetes reads
/// YAML 1.1, where an unquoted `on`, `yes` or `0755` is not a string (a CRD property
/// named `on` would become `true`), so any scalar that is not plainly a string is
/// written double-quoted (JSON's escapes are YAML's).
mod yaml {
    use std::fmt::Write as _;

    use super::Value;

    pub(super) fn document(out: &mut String, value: &Value) {
        match value {
            Value::Object(map) if !map.is_empty() => mapping(out, map, 0),
            Value::Array(items) if !items.is_empty() => sequence(out, items, 0),
            scalar => {
                inline(out, scalar, 0);
                out.push('\n');
            }
        }
    }

    fn pad(out: &mut String, indent: usize) {
        out.extend(std::iter::repeat_n(' ', indent));
    }

    fn mapping(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
        for (key, value) in map {
            pad(out, indent);
            string(out, key, indent, false);
            out.push(':');
            after_key(out, value, indent);
        }
    }

    fn after_key(out: &mut String, value: &Value, indent: usize) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                out.push('\n');
                mapping(out, map, indent + 2);
            }
            Value::Array(items) if !items.is_empty() => {
                out.push('\n');
                sequence(out, items, indent + 2);
            }
            scalar => {
                out.push(' ');
                inline(out, scalar, indent + 2);
                out.push('\n');
            }
        }
    }

    fn sequence(out: &mut String, items: &[Value], indent: usize) {
        for item in items {
            pad(out, indent);
            out.push_str("- ");
            match item {
                Value::Object(map) if !map.is_empty() => {
                    // The first key shares the dash's line; the rest align under it.
                    let mut nested = String::new();
                    mapping(&mut nested, map, indent + 2);
                    out.push_str(&nested[indent + 2..]);
                }
                Value::Array(inner) if !inner.is_empty() => {
                    let mut nested = String::new();
                    sequence(&mut nested, inner, indent + 2);
                    out.push_str(&nested[indent + 2..]);
                }
                scalar => {
                    inline(out, scalar, indent + 2);
                    out.push('\n');
                }
            }
        }
    }

    /// A scalar or an empty collection; `indent` is where a block string's lines go.
    fn inline(out: &mut String, value: &Value, indent: usize) {
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => {
                let _ = write!(out, "{n}");
            }
            Value::String(s) => string(out, s, indent, true),
            Value::Array(_) => out.push_str("[]"),
            Value::Object(_) => out.push_str("{}"),
        }
    }

    fn string(out: &mut String, s: &str, indent: usize, block_allowed: bool) {
        if plain(s) {
            out.push_str(s);
        } else if block_allowed && blockable(s) {
            // A literal block keeps long texts (descriptions, dashboards) readable.
            out.push_str(if s.ends_with('\n') { "|" } else { "|-" });
            for line in s.strip_suffix('\n').unwrap_or(s).split('\n') {
                out.push('\n');
                if !line.is_empty() {
                    pad(out, indent);
                    out.push_str(line);
                }
            }
        } else {
            out.push_str(&serde_json::Value::from(s).to_string());
        }
    }

    /// Whether `s` reads back as this very string, unquoted, in YAML 1.1 and 1.2.
    fn plain(s: &str) -> bool {
        const WORDS: [&str; 12] = [
            "y", "yes", "n", "no", "true", "false", "on", "off", "null", "~", "nan", "inf",
        ];
        let Some(first) = s.chars().next() else {
            return false;
        };
        let lower = s.to_ascii_lowercase();
        (first.is_ascii_alphabetic() || first == '/')
            && !WORDS.contains(&lower.as_str())
            && !s.ends_with([' ', ':'])
            && !s.contains(": ")
            && !s.contains(" #")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || " ._/-:=+@()".contains(c))
    }

    /// Multi-line text a literal block holds exactly: no trailing spaces (a block
    /// cannot show them), no tabs, no leading space on the first line (it would set
    /// the indentation), and at most one final newline.
    fn blockable(s: &str) -> bool {
        s.contains('\n')
            && !s.starts_with([' ', '\n'])
            && !s.ends_with("\n\n")
            && !s.contains('\t')
            && !s.contains('\r')
            && s.split('\n').all(|line| !line.ends_with(' '))
            && s.chars().all(|c| !c.is_control() || c == '\n')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(value: &Value) -> Value {
        let mut out = String::new();
        yaml::document(&mut out, value);
        serde_yaml_ng::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"))
    }

    #[test]
    fn yaml_reads_back_as_the_same_value() {
        let value = json!({
            "on": ["yes", "No", "0755", "1e3", "0.1.0", "", " lead", "trail ", "a: b", "#x"],
            "multi": "line one\n  line two\n",
            "multi-no-newline": "a\nb",
            "trailing": "a \nb",
            "nested": [[1, 2], {"a": {}, "b": []}, null, true, 1.5],
            "url": "spiffe://cluster.local/ns/x/sa/y",
            "unicode": "caf\u{e9} \u{1}",
        });
        assert_eq!(roundtrip(&value), value);
    }

    #[test]
    fn ambiguous_keys_and_values_are_quoted() {
        let mut out = String::new();
        yaml::document(&mut out, &json!({"on": "off", "tag": "1.10"}));
        assert_eq!(out, "\"on\": \"off\"\ntag: \"1.10\"\n");
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        let bad_ns = InstallOptions {
            namespace: "Trellis_System".into(),
            ..InstallOptions::default()
        };
        let error = render(&bad_ns).unwrap_err().to_string();
        assert!(error.contains("--namespace \"Trellis_System\""), "{error}");
        let bad_tag = InstallOptions {
            image_tag: Some("-x".into()),
            ..InstallOptions::default()
        };
        let error = render(&bad_tag).unwrap_err().to_string();
        assert!(error.contains("--image-tag \"-x\""), "{error}");
    }

    #[test]
    fn flags_reach_the_objects() {
        let options = InstallOptions {
            namespace: "mesh".into(),
            image_tag: Some("1.2.3".into()),
            create_namespace: true,
        };
        let objects = objects(&options).unwrap();
        assert_eq!(objects[0]["kind"], "Namespace");
        assert_eq!(objects[0]["metadata"]["name"], "mesh");
        let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
        assert_eq!(deployment["metadata"]["namespace"], "mesh");
        assert_eq!(
            deployment["spec"]["template"]["spec"]["containers"][0]["image"],
            "ghcr.io/trellis-mesh/trellis-control-plane:1.2.3"
        );
        let webhook = objects
            .iter()
            .find(|o| o["kind"] == "MutatingWebhookConfiguration")
            .unwrap();
        assert_eq!(
            webhook["webhooks"][0]["clientConfig"]["service"]["namespace"],
            "mesh"
        );
    }
}
