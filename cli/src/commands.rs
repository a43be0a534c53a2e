//! What each command asks the API and what it prints. Commands return their output
//! instead of printing it, so `main` alone touches stdout and a test can read it.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::{
    api::{Api, encode},
    args::{CanaryArgs, DeleteArgs, GetArgs, OutputFormat, StatArgs, TokenCreateArgs},
    checks::{self, Check},
    connection::Endpoint,
    error::CliError,
    kinds::{Kind, Target},
    views,
};

/// What a command printed, and whether it succeeded (`check` can fail without an error).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub ok: bool,
}

impl Outcome {
    fn stdout(text: String) -> Self {
        Self {
            stdout: text,
            stderr: String::new(),
            ok: true,
        }
    }
}

/// Sends the whole stream as one `POST /v1/apply` and prints one line per change,
/// e.g. `trafficroute default/web created`.
pub async fn apply(api: &Api, stream: String) -> Result<Outcome, CliError> {
    let answer = api
        .post("/v1/apply", "application/yaml", Bytes::from(stream))
        .await?;
    let changes = items(api, "POST /v1/apply", &answer, "changes")?;
    let mut out = String::new();
    for change in changes {
        let kind = views::text(change, "/kind");
        let kind = Kind::from_alias(&kind).map_or(kind, |k| k.lowercase().to_string());
        out.push_str(&format!(
            "{kind} {} {}\n",
            qualified(change, "/namespace", "/name"),
            views::text(change, "/change")
        ));
    }
    Ok(Outcome::stdout(out))
}

pub async fn get(api: &Api, args: GetArgs) -> Result<Outcome, CliError> {
    let GetArgs {
        kind,
        name,
        namespace,
        all_namespaces,
        output,
    } = args;
    // kubectl's rule: one namespace, `default` unless told, or all of them with -A.
    let namespace = (!all_namespaces).then(|| namespace.unwrap_or_else(|| "default".into()));
    match kind {
        Target::Resource(kind) => get_resources(api, kind, name, namespace, output).await,
        Target::Shadows => get_shadows(api, name, namespace, output).await,
        Target::Endpoints | Target::Proxies => {
            let path = if kind == Target::Endpoints {
                "/v1/endpoints"
            } else {
                "/v1/proxies"
            };
            let answer = api.get(path).await?;
            // The registry answers for the whole mesh; the CLI narrows it down.
            let listed: Vec<Value> = items(api, &format!("GET {path}"), &answer, "items")?
                .iter()
                .filter(|item| {
                    namespace
                        .as_deref()
                        .is_none_or(|ns| item.get("namespace").and_then(Value::as_str) == Some(ns))
                        && name
                            .as_deref()
                            .is_none_or(|s| item.get("service").and_then(Value::as_str) == Some(s))
                })
                .cloned()
                .collect();
            let stdout = match output {
                OutputFormat::Table if listed.is_empty() => String::new(),
                OutputFormat::Table if kind == Target::Endpoints => {
                    views::endpoint_table(&listed).render()
                }
                OutputFormat::Table => views::proxy_table(&listed).render(),
                OutputFormat::Json => json_text(&json!({ "items": listed })),
                OutputFormat::Yaml => yaml_text(api, &json!({ "items": listed }))?,
            };
            Ok(with_empty_note(
                stdout,
                output,
                listed.is_empty(),
                kind,
                namespace.as_deref(),
            ))
        }
    }
}

async fn get_resources(
    api: &Api,
    kind: Kind,
    name: Option<String>,
    namespace: Option<String>,
    output: OutputFormat,
) -> Result<Outcome, CliError> {
    let namespace = namespace.filter(|_| kind.is_namespaced());
    let query = namespace
        .as_deref()
        .map(|ns| format!("?namespace={}", encode(ns)))
        .unwrap_or_default();
    let (resources, answer) = match &name {
        Some(name) => {
            if namespace.is_none() && kind.is_namespaced() {
                return Err(CliError::Usage(format!(
                    "a {} is named within one namespace: give -n NS instead of -A",
                    kind.lowercase()
                )));
            }
            let path = format!("/v1/resources/{}/{}{query}", kind.name(), encode(name));
            let resource = api.get(&path).await?;
            (vec![resource.clone()], resource)
        }
        None => {
            let path = format!("/v1/resources/{}{query}", kind.name());
            let answer = api.get(&path).await?;
            let resources = items(api, &format!("GET {path}"), &answer, "items")?.to_vec();
            (resources, answer)
        }
    };
    let stdout = match output {
        OutputFormat::Table if resources.is_empty() => String::new(),
        // One canary: its history too, which is what an operator asks `why` with.
        OutputFormat::Table if kind == Kind::Canary && name.is_some() => {
            let mut out = views::resource_table(kind, &resources).render();
            out.push_str(&views::canary_history(&answer));
            out
        }
        OutputFormat::Table => views::resource_table(kind, &resources).render(),
        OutputFormat::Json => json_text(&answer),
        // One YAML document per resource, so the output can be applied again.
        OutputFormat::Yaml => {
            let documents = resources
                .iter()
                .map(|resource| resource_yaml(api, resource))
                .collect::<Result<Vec<_>, _>>()?;
            documents.join("---\n")
        }
    };
    Ok(with_empty_note(
        stdout,
        output,
        resources.is_empty(),
        Target::Resource(kind),
        namespace.as_deref(),
    ))
}

/// An empty table prints nothing on stdout and says so on stderr, naming the
/// namespace looked in: the usual surprise is having looked in the wrong one.
fn with_empty_note(
    stdout: String,
    output: OutputFormat,
    empty: bool,
    target: Target,
    namespace: Option<&str>,
) -> Outcome {
    let mut outcome = Outcome::stdout(stdout);
    if empty && output == OutputFormat::Table {
        outcome.stderr = match namespace {
            Some(ns) => format!(
                "No {} found in namespace {ns} (-A lists every namespace).\n",
                target.plural()
            ),
            None => format!("No {} found.\n", target.plural()),
        };
    }
    outcome
}

/// `get shadow [SERVICE]`: each route mirror's totals, then its latest mismatches.
async fn get_shadows(
    api: &Api,
    service: Option<String>,
    namespace: Option<String>,
    output: OutputFormat,
) -> Result<Outcome, CliError> {
    let path = format!("/v1/shadows{}", stats_query(&namespace, &service, None));
    let answer = api.get(&path).await?;
    let listed = items(api, &format!("GET {path}"), &answer, "items")?;
    let stdout = match output {
        OutputFormat::Table if listed.is_empty() => String::new(),
        OutputFormat::Table => {
            let mut out = views::shadow_table(listed, namespace.is_none()).render();
            let mismatches = views::mismatch_table(listed);
            if !mismatches.is_empty() {
                out.push_str("\nRecent mismatches:\n");
                out.push_str(&mismatches.render());
            }
            out
        }
        OutputFormat::Json => json_text(&answer),
        OutputFormat::Yaml => yaml_text(api, &answer)?,
    };
    Ok(with_empty_note(
        stdout,
        output,
        listed.is_empty(),
        Target::Shadows,
        namespace.as_deref(),
    ))
}

/// `stat [SERVICE]`: what the sidecars reported over `--window`, per service, route
/// and backend, or with `--edges` per caller → service.
pub async fn stat(api: &Api, args: StatArgs) -> Result<Outcome, CliError> {
    let StatArgs {
        service,
        service_flag,
        edges,
        namespace,
        all_namespaces,
        window,
        output,
    } = args;
    let service = service.or(service_flag);
    let namespace = (!all_namespaces).then(|| namespace.unwrap_or_else(|| "default".into()));
    let mut path = format!(
        "/v1/stats{}",
        stats_query(&namespace, &service, Some(&window))
    );
    if edges {
        path.push_str("&by=edge");
    }
    let answer = api.get(&path).await?;
    let listed = items(api, &format!("GET {path}"), &answer, "items")?;
    let stdout = match output {
        OutputFormat::Table if listed.is_empty() => String::new(),
        OutputFormat::Table if edges => views::edge_table(listed, namespace.as_deref()).render(),
        OutputFormat::Table => views::stat_table(listed, namespace.is_none()).render(),
        OutputFormat::Json => json_text(&answer),
        OutputFormat::Yaml => yaml_text(api, &answer)?,
    };
    let mut outcome = Outcome::stdout(stdout);
    if listed.is_empty() && output == OutputFormat::Table {
        let what = service.map_or_else(|| "any service".into(), |s| format!("service {s}"));
        let place = namespace.map_or_else(String::new, |ns| format!(" in namespace {ns}"));
        outcome.stderr = format!(
            "No requests to {what}{place} were reported in the last {window} (sidecars \
             report every --report-interval, 10s by default).\n"
        );
    }
    Ok(outcome)
}

/// `?namespace=&service=&window=` with what is given.
fn stats_query(
    namespace: &Option<String>,
    service: &Option<String>,
    window: Option<&str>,
) -> String {
    let params: Vec<String> = [
        ("namespace", namespace.as_deref()),
        ("service", service.as_deref()),
        ("window", window),
    ]
    .into_iter()
    .filter_map(|(key, value)| value.map(|v| format!("{key}={}", encode(v))))
    .collect();
    if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    }
}

pub async fn delete(api: &Api, args: DeleteArgs) -> Result<Outcome, CliError> {
    let DeleteArgs {
        kind,
        name,
        namespace,
    } = args;
    let (query, shown) = if kind.is_namespaced() {
        (
            format!("?namespace={}", encode(&namespace)),
            format!("{namespace}/{name}"),
        )
    } else {
        (String::new(), name.clone())
    };
    let path = format!("/v1/resources/{}/{}{query}", kind.name(), encode(&name));
    api.delete(&path).await?;
    Ok(Outcome::stdout(format!(
        "{} {shown} deleted\n",
        kind.lowercase()
    )))
}

/// `canary pause|resume|promote|abort NAME`: one line saying where the canary now is.
pub async fn canary(api: &Api, args: CanaryArgs) -> Result<Outcome, CliError> {
    let CanaryArgs {
        action,
        name,
        namespace,
    } = args;
    let path = format!(
        "/v1/canaries/{}/{}?namespace={}",
        encode(&name),
        action.as_str(),
        encode(&namespace)
    );
    let answer = api.post(&path, "application/json", Bytes::new()).await?;
    Ok(Outcome::stdout(format!(
        "canary {namespace}/{name}: {} at {}% ({})\n",
        views::text(&answer, "/status/phase"),
        views::text(&answer, "/status/weight"),
        views::text(&answer, "/status/message"),
    )))
}

/// Prints the token alone on stdout, so `trellisctl token create ... > token` works;
/// the identity and expiry go to stderr.
pub async fn token_create(
    api: &Api,
    args: TokenCreateArgs,
    now_unix: i64,
) -> Result<Outcome, CliError> {
    let TokenCreateArgs {
        service,
        namespace,
        ttl,
    } = args;
    let mut body = Map::new();
    body.insert("service".into(), Value::String(service));
    if let Some(namespace) = namespace {
        body.insert("namespace".into(), Value::String(namespace));
    }
    if let Some(ttl) = ttl {
        body.insert("ttl".into(), Value::String(ttl));
    }
    let body = Value::Object(body).to_string();
    let answer = api
        .post("/v1/tokens", "application/json", Bytes::from(body))
        .await?;
    let Some(token) = answer.get("token").and_then(Value::as_str) else {
        return Err(CliError::Answer {
            addr: api.addr().to_string(),
            request: "POST /v1/tokens".into(),
            reason: "no \"token\" in the answer".into(),
        });
    };
    let expiry = match answer.get("expiresUnix").and_then(Value::as_i64) {
        Some(expires) => format!(
            "valid until {} (for {})",
            checks::format_unix(expires),
            views::age((expires - now_unix).max(0).unsigned_abs())
        ),
        None => "expiry not reported".into(),
    };
    Ok(Outcome {
        stdout: format!("{token}\n"),
        stderr: format!(
            "join token for {}, {expiry}\n",
            views::text(&answer, "/identity")
        ),
        ok: true,
    })
}

/// Runs every check it can and prints one line each; the first failure that leaves
/// nothing to check (no token, no answer) ends the list.
pub async fn check(endpoint: Result<Endpoint, CliError>, now_unix: i64) -> Outcome {
    let mut lines = Vec::new();
    let finish = |lines: Vec<Check>| Outcome {
        stdout: lines.iter().map(|c| c.line() + "\n").collect(),
        stderr: String::new(),
        ok: lines.iter().all(|c| c.ok),
    };
    let api = match endpoint {
        Ok(endpoint) => Api::new(endpoint),
        Err(e) => {
            lines.push(Check::fail(e.to_string()));
            return finish(lines);
        }
    };
    let status = match api.get("/v1/status").await {
        Ok(status) => status,
        Err(e) => {
            lines.push(Check::fail(e.to_string()));
            return finish(lines);
        }
    };
    lines.push(Check::pass(format!(
        "control plane API at {} answers (trust domain {}, revision {})",
        api.addr(),
        views::text(&status, "/trustDomain"),
        views::text(&status, "/revision")
    )));
    lines.extend(checks::certificate_checks(&status, now_unix));
    let proxies = match api.get("/v1/proxies").await {
        Ok(answer) => items(&api, "GET /v1/proxies", &answer, "items").map(<[Value]>::to_vec),
        Err(e) => Err(e),
    };
    match proxies {
        Ok(proxies) => lines.extend(checks::proxy_checks(&proxies)),
        Err(e) => lines.push(Check::fail(format!("cannot list the proxies: {e}"))),
    }
    finish(lines)
}

/// The list under `field` of an answer, or an error naming the request.
fn items<'a>(
    api: &Api,
    request: &str,
    answer: &'a Value,
    field: &str,
) -> Result<&'a [Value], CliError> {
    answer
        .get(field)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .ok_or_else(|| CliError::Answer {
            addr: api.addr().to_string(),
            request: request.into(),
            reason: format!("no {field:?} list in the answer"),
        })
}

/// `namespace/name`, or `name` alone for cluster-scoped resources.
fn qualified(value: &Value, namespace: &str, name: &str) -> String {
    match value.pointer(namespace).and_then(Value::as_str) {
        Some(ns) if !ns.is_empty() => format!("{ns}/{}", views::text(value, name)),
        _ => views::text(value, name),
    }
}

fn json_text(value: &Value) -> String {
    // Serializing a `Value` cannot fail: its keys are strings.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

/// A resource as YAML with its fields in the order the types declare them
/// (`apiVersion`, `kind`, `metadata`, then `spec` with `service` first), as people
/// write them; a resource this CLI cannot type is printed as it came.
fn resource_yaml(api: &Api, resource: &Value) -> Result<String, CliError> {
    use trellis_crds::Document;
    let typed = serde_json::to_vec(resource)
        .ok()
        .and_then(|bytes| Document::from_json(&bytes).ok())
        .and_then(|document| match document {
            Document::MeshConfig(r) => serde_yaml_ng::to_string(&r).ok(),
            Document::DestinationPolicy(r) => serde_yaml_ng::to_string(&r).ok(),
            Document::TrafficRoute(r) => serde_yaml_ng::to_string(&r).ok(),
            Document::AuthorizationPolicy(r) => serde_yaml_ng::to_string(&r).ok(),
            Document::Canary(r) => serde_yaml_ng::to_string(&r).ok(),
        });
    match typed {
        Some(text) => Ok(text),
        None => yaml_text(api, resource),
    }
}

fn yaml_text(api: &Api, value: &Value) -> Result<String, CliError> {
    serde_yaml_ng::to_string(value).map_err(|e| CliError::Answer {
        addr: api.addr().to_string(),
        request: "YAML output".into(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_scoped_changes_print_without_a_namespace() {
        let namespaced = json!({"kind": "TrafficRoute", "namespace": "shop", "name": "web"});
        assert_eq!(qualified(&namespaced, "/namespace", "/name"), "shop/web");
        let cluster = json!({"kind": "MeshConfig", "namespace": null, "name": "default"});
        assert_eq!(qualified(&cluster, "/namespace", "/name"), "default");
        let empty = json!({"kind": "MeshConfig", "namespace": "", "name": "default"});
        assert_eq!(qualified(&empty, "/namespace", "/name"), "default");
    }
}
