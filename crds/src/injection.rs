//! Sidecar injection as a pure function: a Pod in, the same Pod with the proxy, its
//! iptables init step, its token and trust anchors out — or the reason it is left
//! alone. The admission webhook (in the control plane) and `trellisctl inject` both
//! call [`inject`]; neither does any mutation of its own, so what an operator sees
//! offline is what the cluster does.
//!
//! What gets added, in order of the pod's start-up:
//! 1. `trellis-init`, an init container running `trellis-proxy init` as root with
//!    NET_ADMIN/NET_RAW: the iptables redirects (outbound → 15001, inbound → 15006).
//! 2. `trellis-proxy`, a native sidecar (an init container with `restartPolicy:
//!    Always`): it starts before the app and the app's own init containers (so their
//!    traffic is meshed too), and its startup probe holds them until it is ready.
//! 3. Volumes: a projected ServiceAccount token (audience `trellis`) for
//!    `Identity.Certify`, and the `trellis-trust-anchors` ConfigMap.
//!
//! The app containers' HTTP probes are pointed at the proxy's admin port
//! (`/app-probe/<container>/<kind>`), which the redirect leaves alone and which relays
//! them to the app over loopback: the kubelet speaks plaintext from outside the pod,
//! which the inbound listener refuses under STRICT mTLS.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, ResourceRequirements, Volume};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Namespace label that turns injection on for every pod of the namespace.
pub const NAMESPACE_LABEL: &str = "trellis.dev/inject";
/// The value of [`NAMESPACE_LABEL`] that enables injection.
pub const NAMESPACE_ENABLED: &str = "enabled";
/// Pod annotation: `disabled` opts a pod out (`enabled` opts it in anywhere).
pub const INJECT_ANNOTATION: &str = "trellis.dev/inject";
/// Set on every injected pod.
pub const INJECTED_ANNOTATION: &str = "trellis.dev/injected";
/// Pod annotation naming the pod's service when its `app` label does not.
pub const SERVICE_ANNOTATION: &str = "trellis.dev/service";
/// Pod annotation: the port the app listens on inside the pod.
pub const APP_PORT_ANNOTATION: &str = "trellis.dev/app-port";
/// Pod annotation: `http` or `tcp`, as `trellis-proxy --app-protocol`.
pub const APP_PROTOCOL_ANNOTATION: &str = "trellis.dev/app-protocol";
/// Pod annotations: comma-separated ports the redirect leaves alone.
pub const SKIP_INBOUND_ANNOTATION: &str = "trellis.dev/skip-inbound-ports";
pub const SKIP_OUTBOUND_ANNOTATION: &str = "trellis.dev/skip-outbound-ports";

pub const PROXY_CONTAINER: &str = "trellis-proxy";
pub const INIT_CONTAINER: &str = "trellis-init";
pub const TOKEN_VOLUME: &str = "trellis-token";
pub const TRUST_ANCHORS_VOLUME: &str = "trellis-trust-anchors";
/// Where the projected token is mounted; the proxy reads `<dir>/token`.
pub const TOKEN_DIR: &str = "/var/run/secrets/trellis";
pub const TOKEN_PATH: &str = "/var/run/secrets/trellis/token";
pub const TRUST_ANCHORS_DIR: &str = "/var/run/trellis/trust-anchors";
/// The audience the control plane's TokenReview asks for.
pub const TOKEN_AUDIENCE: &str = "trellis";
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// Where the admin port answers a rewritten app probe: `<prefix><container>/<kind>`.
pub const APP_PROBE_PREFIX: &str = "/app-probe/";
/// The proxy's env naming where each rewritten probe really goes, as JSON:
/// `{"/app-probe/web/readiness": {"port": 8080, "path": "/ready"}}`.
pub const APP_PROBES_ENV: &str = "TRELLIS_APP_PROBES";

/// Where a rewritten probe really goes: `GET http://127.0.0.1:<port><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
}

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const ADMIN_PORT: u16 = 15020;
/// The proxy's uid; the iptables rules let its own traffic through unredirected.
pub const PROXY_UID: i64 = 1337;
/// The app port assumed when a pod declares none and has no `trellis.dev/app-port`.
pub const DEFAULT_APP_PORT: u16 = 8080;

/// What the injector puts into pods: the cluster-wide part, from the control plane's
/// flags or `trellisctl inject`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct InjectionSettings {
    /// The `trellis-proxy` image; its entrypoint is `trellis-proxy`.
    pub proxy_image: String,
    /// The image of the `trellis-init` step; it needs `iptables` beside
    /// `trellis-proxy` [default: the proxy image].
    pub init_image: Option<String>,
    pub image_pull_policy: Option<String>,
    /// The control plane's gRPC address as sidecars dial it.
    pub control_plane_addr: String,
    pub trust_domain: String,
    /// The ConfigMap holding the trust anchors, and its key.
    pub trust_anchors_config_map: String,
    pub trust_anchors_key: String,
    pub proxy_uid: i64,
    pub proxy_resources: ResourceRequirements,
    pub init_resources: ResourceRequirements,
    /// Ports every pod's redirect leaves alone, beside the pod's own annotations.
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    /// The proxy's `--log` filter.
    pub log_level: String,
}

impl Default for InjectionSettings {
    fn default() -> Self {
        let resources = |cpu_req: &str, mem_req: &str, cpu_lim: &str, mem_lim: &str| {
            serde_json::from_value(json!({
                "requests": {"cpu": cpu_req, "memory": mem_req},
                "limits": {"cpu": cpu_lim, "memory": mem_lim},
            }))
            .unwrap_or_default()
        };
        Self {
            proxy_image: "ghcr.io/trellis-mesh/trellis-proxy:0.1.0".into(),
            init_image: None,
            image_pull_policy: None,
            control_plane_addr: "https://trellis-control-plane.trellis-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            trust_anchors_config_map: "trellis-trust-anchors".into(),
            trust_anchors_key: "trust-anchors.pem".into(),
            proxy_uid: PROXY_UID,
            proxy_resources: resources("50m", "32Mi", "1", "256Mi"),
            init_resources: resources("10m", "10Mi", "100m", "50Mi"),
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            log_level: "info".into(),
        }
    }
}

impl InjectionSettings {
    /// Settings from YAML (or JSON) with the camelCase field names; absent fields
    /// keep their defaults, unknown ones are refused by name.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }
}

/// Why a pod was left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `trellis.dev/inject: disabled` on the pod.
    OptedOut,
    /// It already has the `trellis-proxy` container.
    AlreadyInjected,
    /// Its namespace is not labelled `trellis.dev/inject=enabled` and the pod did not
    /// ask for injection itself.
    NamespaceNotEnabled,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::OptedOut => "opted out with trellis.dev/inject: disabled",
            Skip::AlreadyInjected => "already injected",
            Skip::NamespaceNotEnabled => "namespace not labelled trellis.dev/inject=enabled",
        })
    }
}

/// What [`inject`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Injection {
    Unchanged(Skip),
    Injected(Box<Pod>),
}

/// A pod that cannot be injected, naming the field to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {annotation}: {value:?} {reason}")]
    Annotation {
        annotation: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("the pod has no service name: set label `app` or annotation `trellis.dev/service`")]
    NoService,
    #[error("the pod has no spec.containers")]
    NoContainers,
    #[error("not a valid pod: {0}")]
    NotAPod(String),
    #[error("building {0}: {1}")]
    Build(&'static str, String),
}

/// Whether a namespace's labels turn injection on.
pub fn namespace_enabled(labels: &BTreeMap<String, String>) -> bool {
    labels.get(NAMESPACE_LABEL).map(String::as_str) == Some(NAMESPACE_ENABLED)
}

/// Whether `pod` carries the proxy already (by the webhook, `trellisctl inject` or a
/// hand-written manifest).
pub fn is_injected(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .any(|c| c.name == PROXY_CONTAINER)
    })
}

/// Injects the proxy into `pod`. `namespace_enabled` is what the namespace's labels
/// say (the webhook's namespaceSelector already filtered on them, so it passes
/// `true`); a pod annotated `trellis.dev/inject: enabled` is injected either way.
pub fn inject(
    pod: &Pod,
    namespace_enabled: bool,
    settings: &InjectionSettings,
) -> Result<Injection, InjectError> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    match annotations.get(INJECT_ANNOTATION).map(String::as_str) {
        Some("disabled" | "false") => return Ok(Injection::Unchanged(Skip::OptedOut)),
        Some("enabled" | "true") => {}
        Some(other) => {
            return Err(InjectError::Annotation {
                annotation: INJECT_ANNOTATION,
                value: other.to_string(),
                reason: "must be `enabled` or `disabled`",
            });
        }
        None if !namespace_enabled => {
            return Ok(Injection::Unchanged(Skip::NamespaceNotEnabled));
        }
        None => {}
    }
    if is_injected(pod) {
        return Ok(Injection::Unchanged(Skip::AlreadyInjected));
    }
    let Some(spec) = pod.spec.as_ref().filter(|s| !s.containers.is_empty()) else {
        return Err(InjectError::NoContainers);
    };

    let service = annotations
        .get(SERVICE_ANNOTATION)
        .or_else(|| labels.get("app"))
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .filter(|s| !s.is_empty())
        .ok_or(InjectError::NoService)?
        .clone();
    let app_port = match annotations.get(APP_PORT_ANNOTATION) {
        Some(value) => parse_port(APP_PORT_ANNOTATION, value)?,
        // The first port the app declares is the one it serves; ports of the
        // proxy's own range would loop.
        None => spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .next()
            .unwrap_or(DEFAULT_APP_PORT),
    };
    let app_protocol = match annotations.get(APP_PROTOCOL_ANNOTATION).map(String::as_str) {
        None => None,
        Some(p @ ("http" | "tcp")) => Some(p.to_string()),
        Some(other) => {
            return Err(InjectError::Annotation {
                annotation: APP_PROTOCOL_ANNOTATION,
                value: other.to_string(),
                reason: "must be `http` or `tcp`",
            });
        }
    };
    let mut skip_inbound = settings.skip_inbound_ports.clone();
    if let Some(value) = annotations.get(SKIP_INBOUND_ANNOTATION) {
        skip_inbound.extend(parse_ports(SKIP_INBOUND_ANNOTATION, value)?);
    }
    let mut skip_outbound = settings.skip_outbound_ports.clone();
    if let Some(value) = annotations.get(SKIP_OUTBOUND_ANNOTATION) {
        skip_outbound.extend(parse_ports(SKIP_OUTBOUND_ANNOTATION, value)?);
    }

    let init = init_container(settings, &skip_inbound, &skip_outbound)?;
    let mut injected = pod.clone();
    let spec = injected.spec.get_or_insert_with(Default::default);
    let probes = rewrite_probes(&mut spec.containers, &skip_inbound);
    let proxy = proxy_container(
        settings,
        &service,
        app_port,
        app_protocol.as_deref(),
        &probes,
    )?;
    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    inits.insert(0, proxy);
    inits.insert(0, init);
    spec.volumes
        .get_or_insert_with(Vec::new)
        .extend(volumes(settings)?);
    injected
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED_ANNOTATION.into(), "true".into());
    Ok(Injection::Injected(Box::new(injected)))
}

/// Points each container's plain-HTTP `httpGet` probes at the proxy's admin port and
/// returns where they really go. Left alone: probes of a port the redirect skips (they
/// reach the app directly), with their own `host`, over HTTPS, or of a named port the
/// container does not declare (the kubelet reports that one itself).
fn rewrite_probes(
    containers: &mut [Container],
    skip_inbound: &[u16],
) -> BTreeMap<String, AppProbe> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut probes = BTreeMap::new();
    for container in containers {
        let declared: Vec<(String, i32)> = container
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect();
        for (kind, probe) in [
            ("liveness", &mut container.liveness_probe),
            ("readiness", &mut container.readiness_probe),
            ("startup", &mut container.startup_probe),
        ] {
            let Some(http) = probe.as_mut().and_then(|p| p.http_get.as_mut()) else {
                continue;
            };
            if http.host.is_some() || http.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                continue;
            }
            let port = match &http.port {
                IntOrString::Int(port) => Some(*port),
                IntOrString::String(name) => declared
                    .iter()
                    .find(|(declared, _)| declared == name)
                    .map(|(_, port)| *port),
            };
            let Some(port) = port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0) else {
                continue;
            };
            if skip_inbound.contains(&port) {
                continue;
            }
            let admin_path = format!("{APP_PROBE_PREFIX}{}/{kind}", container.name);
            let path = http
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into());
            probes.insert(admin_path.clone(), AppProbe { port, path });
            http.port = IntOrString::Int(i32::from(ADMIN_PORT));
            http.path = Some(admin_path);
        }
    }
    probes
}

fn parse_port(annotation: &'static str, value: &str) -> Result<u16, InjectError> {
    match value.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(InjectError::Annotation {
            annotation,
            value: value.to_string(),
            reason: "is not a port (1-65535)",
        }),
    }
}

fn parse_ports(annotation: &'static str, value: &str) -> Result<Vec<u16>, InjectError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            parse_port(annotation, p).map_err(|_| InjectError::Annotation {
                annotation,
                value: value.to_string(),
                reason: "must be comma-separated ports (1-65535)",
            })
        })
        .collect()
}

fn ports_arg(ports: &[u16]) -> String {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn build<T: serde::de::DeserializeOwned>(
    what: &'static str,
    value: serde_json::Value,
) -> Result<T, InjectError> {
    serde_json::from_value(value).map_err(|e| InjectError::Build(what, e.to_string()))
}

fn init_container(
    settings: &InjectionSettings,
    skip_inbound: &[u16],
    skip_outbound: &[u16],
) -> Result<Container, InjectError> {
    let mut args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        settings.proxy_uid.to_string(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--admin-port".into(),
        ADMIN_PORT.to_string(),
    ];
    if !skip_inbound.is_empty() {
        args.extend(["--skip-inbound-ports".into(), ports_arg(skip_inbound)]);
    }
    if !skip_outbound.is_empty() {
        args.extend(["--skip-outbound-ports".into(), ports_arg(skip_outbound)]);
    }
    let mut container: Container = build(
        INIT_CONTAINER,
        json!({
            "name": INIT_CONTAINER,
            "image": settings.init_image.as_deref().unwrap_or(&settings.proxy_image),
            "args": args,
            "resources": settings.init_resources,
            "securityContext": {
                // iptables needs root and these two capabilities, nothing else; it
                // also writes its lock file, so the root filesystem stays writable.
                "runAsUser": 0,
                "runAsGroup": 0,
                "runAsNonRoot": false,
                "privileged": false,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": false,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            },
        }),
    )?;
    container.image_pull_policy = settings.image_pull_policy.clone();
    Ok(container)
}

fn proxy_container(
    settings: &InjectionSettings,
    service: &str,
    app_port: u16,
    app_protocol: Option<&str>,
    probes: &BTreeMap<String, AppProbe>,
) -> Result<Container, InjectError> {
    let mut args = vec![
        "--control-plane".to_string(),
        settings.control_plane_addr.clone(),
        "--trust-anchors".into(),
        format!("{TRUST_ANCHORS_DIR}/{}", settings.trust_anchors_key),
        // The projected ServiceAccount token is the proxy's credential on Kubernetes.
        "--token-file".into(),
        TOKEN_PATH.into(),
        "--trust-domain".into(),
        settings.trust_domain.clone(),
        "--app-addr".into(),
        format!("127.0.0.1:{app_port}"),
        "--inbound-addr".into(),
        format!("0.0.0.0:{INBOUND_PORT}"),
        "--outbound-addr".into(),
        format!("127.0.0.1:{OUTBOUND_PORT}"),
        // The kubelet probes the pod IP, so admin listens beyond loopback.
        "--admin-addr".into(),
        format!("0.0.0.0:{ADMIN_PORT}"),
        // Kubernetes expands $(VAR) from the container's env.
        "--advertise-addr".into(),
        format!("$(POD_IP):{INBOUND_PORT}"),
        "--log".into(),
        settings.log_level.clone(),
    ];
    if let Some(protocol) = app_protocol {
        args.extend(["--app-protocol".into(), protocol.into()]);
    }
    let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
    let probe = |path: &str, period: i32, failures: i32| {
        json!({
            "httpGet": {"path": path, "port": ADMIN_PORT},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 1,
        })
    };
    let mut env = json!([
        {"name": "POD_NAME", "valueFrom": field("metadata.name")},
        {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
        {"name": "POD_IP", "valueFrom": field("status.podIP")},
        {"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
        {"name": "TRELLIS_SERVICE", "value": service},
        {"name": "TRELLIS_NAMESPACE", "value": "$(POD_NAMESPACE)"},
        {"name": "TRELLIS_INSTANCE", "value": "$(POD_NAME)"},
    ]);
    if !probes.is_empty()
        && let (Some(env), Ok(value)) = (env.as_array_mut(), serde_json::to_string(probes))
    {
        env.push(json!({"name": APP_PROBES_ENV, "value": value}));
    }
    let mut container: Container = build(
        PROXY_CONTAINER,
        json!({
            "name": PROXY_CONTAINER,
            "image": settings.proxy_image,
            // A native sidecar: started before the app, stopped after it.
            "restartPolicy": "Always",
            "args": args,
            "env": env,
            "ports": [
                {"name": "trellis-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP"},
                {"name": "trellis-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            ],
            // The app starts only once the proxy has its certificate and config.
            "startupProbe": probe("/ready", 1, 120),
            "readinessProbe": probe("/ready", 5, 3),
            "livenessProbe": probe("/live", 10, 3),
            "resources": settings.proxy_resources,
            "securityContext": {
                "runAsUser": settings.proxy_uid,
                "runAsGroup": settings.proxy_uid,
                "runAsNonRoot": true,
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
                {"name": TRUST_ANCHORS_VOLUME, "mountPath": TRUST_ANCHORS_DIR, "readOnly": true},
            ],
        }),
    )?;
    container.image_pull_policy = settings.image_pull_policy.clone();
    Ok(container)
}

fn volumes(settings: &InjectionSettings) -> Result<Vec<Volume>, InjectError> {
    build(
        "volumes",
        json!([
            {
                "name": TOKEN_VOLUME,
                "projected": {"sources": [{"serviceAccountToken": {
                    "audience": TOKEN_AUDIENCE,
                    "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                    "path": "token",
                }}]},
            },
            {
                "name": TRUST_ANCHORS_VOLUME,
                "configMap": {"name": settings.trust_anchors_config_map},
            },
        ]),
    )
}

/// What [`inject_json`] decided, on the pod's JSON as it was given.
#[derive(Debug, Clone, PartialEq)]
pub enum InjectedJson {
    Unchanged(Skip),
    Injected(serde_json::Value),
}

/// [`inject`] on a pod (or pod template: `metadata` and `spec`) as raw JSON. The
/// result is the input with the injection's patch applied, so fields this version
/// of the Kubernetes types does not know survive untouched.
pub fn inject_json(
    pod: &serde_json::Value,
    namespace_enabled: bool,
    settings: &InjectionSettings,
) -> Result<InjectedJson, InjectError> {
    let typed: Pod =
        serde_json::from_value(pod.clone()).map_err(|e| InjectError::NotAPod(e.to_string()))?;
    match inject(&typed, namespace_enabled, settings)? {
        Injection::Unchanged(skip) => Ok(InjectedJson::Unchanged(skip)),
        Injection::Injected(mutated) => {
            let patch = json_patch(&typed, &mutated)
                .map_err(|e| InjectError::Build("patch", e.to_string()))?;
            let mut out = pod.clone();
            json_patch::patch(&mut out, &patch)
                .map_err(|e| InjectError::Build("patch", e.to_string()))?;
            Ok(InjectedJson::Injected(out))
        }
    }
}

/// The RFC 6902 patch that turns `original` into `mutated`, as the admission webhook
/// returns it (`patchType: JSONPatch`).
pub fn json_patch(original: &Pod, mutated: &Pod) -> Result<json_patch::Patch, serde_json::Error> {
    let before = serde_json::to_value(original)?;
    let after = serde_json::to_value(mutated)?;
    Ok(json_patch::diff(&before, &after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-1", "labels": {"app": "web"}, "annotations": annotations},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "web:1"}],
                "containers": [{"name": "web", "image": "web:1",
                                "ports": [{"containerPort": 9090}]}],
            },
        }))
        .unwrap()
    }

    fn injected(pod: &Pod) -> Pod {
        match inject(pod, true, &InjectionSettings::default()).unwrap() {
            Injection::Injected(pod) => *pod,
            other => panic!("not injected: {other:?}"),
        }
    }

    #[test]
    fn app_http_probes_go_through_the_proxys_admin_port() {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "labels": {"app": "web"},
                         "annotations": {SKIP_INBOUND_ANNOTATION: "9100"}},
            "spec": {"containers": [{
                "name": "web", "image": "web:1",
                "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9100}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                "livenessProbe": {"httpGet": {"port": 8080}},
                // Skipped by the redirect, another host, HTTPS: they keep their target.
                "startupProbe": {"httpGet": {"path": "/metrics", "port": 9100}},
            }, {
                "name": "tls", "image": "tls:1",
                "readinessProbe": {"httpGet": {"path": "/ok", "port": 8443, "scheme": "HTTPS"}},
                "livenessProbe": {"httpGet": {"path": "/ok", "port": 80, "host": "10.0.0.1"}},
                "startupProbe": {"tcpSocket": {"port": 8080}},
            }]},
        }))
        .unwrap();
        let spec = injected(&pod).spec.unwrap();
        let web = &spec.containers[0];
        let target = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
            let http = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            (
                serde_json::to_value(&http.port).unwrap(),
                http.path.clone().unwrap_or_default(),
            )
        };
        assert_eq!(
            target(&web.readiness_probe),
            (json!(ADMIN_PORT), "/app-probe/web/readiness".to_string())
        );
        assert_eq!(
            target(&web.liveness_probe),
            (json!(ADMIN_PORT), "/app-probe/web/liveness".to_string())
        );
        assert_eq!(
            target(&web.startup_probe),
            (json!(9100), "/metrics".to_string())
        );
        let untouched = &pod.spec.as_ref().unwrap().containers[1];
        assert_eq!(&spec.containers[1], untouched);

        let proxy = &spec.init_containers.unwrap()[1];
        let env = proxy.env.as_ref().unwrap();
        let probes = env.iter().find(|e| e.name == APP_PROBES_ENV).unwrap();
        let probes: BTreeMap<String, AppProbe> =
            serde_json::from_str(probes.value.as_deref().unwrap()).unwrap();
        assert_eq!(
            probes,
            BTreeMap::from([
                (
                    "/app-probe/web/liveness".to_string(),
                    AppProbe {
                        port: 8080,
                        path: "/".into()
                    }
                ),
                (
                    "/app-probe/web/readiness".to_string(),
                    AppProbe {
                        port: 8080,
                        path: "/ready".into()
                    }
                ),
            ])
        );
    }

    #[test]
    fn adds_init_step_then_native_sidecar_before_the_apps_init_containers() {
        let pod = injected(&pod(json!({})));
        let spec = pod.spec.unwrap();
        let inits: Vec<_> = spec.init_containers.unwrap();
        let names: Vec<_> = inits.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
        let proxy = &inits[1];
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
        let args = proxy.args.clone().unwrap();
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(after("--app-addr"), "127.0.0.1:9090");
        assert_eq!(after("--token-file"), TOKEN_PATH);
        let env = proxy.env.clone().unwrap();
        let service = env.iter().find(|e| e.name == "TRELLIS_SERVICE").unwrap();
        assert_eq!(service.value.as_deref(), Some("web"));
        let security = proxy.security_context.clone().unwrap();
        assert_eq!(security.run_as_user, Some(PROXY_UID));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        let init = &inits[0];
        let caps = init.security_context.clone().unwrap().capabilities.unwrap();
        assert_eq!(caps.add.unwrap(), ["NET_ADMIN", "NET_RAW"]);
        let volumes = spec.volumes.unwrap();
        let token = volumes.iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
        let source = &token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0];
        let sa = source.service_account_token.as_ref().unwrap();
        assert_eq!(sa.audience.as_deref(), Some("trellis"));
        assert_eq!(sa.expiration_seconds, Some(3600));
        assert_eq!(
            pod.metadata.annotations.unwrap()[INJECTED_ANNOTATION],
            "true"
        );
    }

    #[test]
    fn opted_out_already_injected_and_unlabelled_namespaces_are_left_alone() {
        let settings = InjectionSettings::default();
        let out = pod(json!({INJECT_ANNOTATION: "disabled"}));
        assert_eq!(
            inject(&out, true, &settings).unwrap(),
            Injection::Unchanged(Skip::OptedOut)
        );
        let once = injected(&pod(json!({})));
        assert_eq!(
            inject(&once, true, &settings).unwrap(),
            Injection::Unchanged(Skip::AlreadyInjected)
        );
        assert_eq!(
            inject(&pod(json!({})), false, &settings).unwrap(),
            Injection::Unchanged(Skip::NamespaceNotEnabled)
        );
        // A pod may ask for itself what its namespace does not.
        let asked = pod(json!({INJECT_ANNOTATION: "enabled"}));
        assert!(matches!(
            inject(&asked, false, &settings).unwrap(),
            Injection::Injected(_)
        ));
    }

    #[test]
    fn annotations_steer_ports_and_bad_ones_name_themselves() {
        let pod = injected(&pod(json!({
            APP_PORT_ANNOTATION: "7000",
            SKIP_OUTBOUND_ANNOTATION: "5432, 6379",
            SERVICE_ANNOTATION: "shop",
        })));
        let inits = pod.spec.unwrap().init_containers.unwrap();
        let init_args = inits[0].args.clone().unwrap();
        assert!(
            init_args
                .windows(2)
                .any(|w| w == ["--skip-outbound-ports", "5432,6379"])
        );
        let proxy_args = inits[1].args.clone().unwrap();
        assert!(
            proxy_args
                .windows(2)
                .any(|w| w == ["--app-addr", "127.0.0.1:7000"])
        );

        let settings = InjectionSettings::default();
        for (annotation, value) in [
            (APP_PORT_ANNOTATION, "http"),
            (SKIP_INBOUND_ANNOTATION, "80,x"),
            (APP_PROTOCOL_ANNOTATION, "grpc"),
            (INJECT_ANNOTATION, "maybe"),
        ] {
            let error = inject(
                &super::tests::pod(json!({annotation: value})),
                true,
                &settings,
            )
            .unwrap_err()
            .to_string();
            assert!(error.contains(annotation), "{error}");
        }
        let mut nameless = super::tests::pod(json!({}));
        nameless.metadata.labels = None;
        assert_eq!(
            inject(&nameless, true, &settings).unwrap_err(),
            InjectError::NoService
        );
    }

    #[test]
    fn the_patch_applied_to_the_original_gives_the_injected_pod() {
        let original = pod(json!({}));
        let mutated = injected(&original);
        let patch = json_patch(&original, &mutated).unwrap();
        let mut doc = serde_json::to_value(&original).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        assert_eq!(doc, serde_json::to_value(&mutated).unwrap());
    }
}
