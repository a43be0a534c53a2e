//! `trellisctl inject -f deploy.yaml`: the admission webhook's injection, offline.
//! Pods, and the pod templates of Deployments, StatefulSets, DaemonSets, ReplicaSets,
//! Jobs and CronJobs, get the proxy; every other document passes through. The
//! result is YAML on stdout for `kubectl apply -f -`; what happened to each workload
//! goes to stderr.

use std::io::Read;

use serde::Deserialize;
use serde_json::Value;
use trellis_crds::injection::{self, InjectedJson, InjectionSettings};

use crate::{CliError, args::InjectArgs, commands::Outcome};

/// Where a kind keeps its pod (template), as a path of object keys.
fn pod_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    match (api_version, kind) {
        ("v1", "Pod") => Some(&[]),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch/v1", "Job")
        | ("v1", "ReplicationController") => Some(&["spec", "template"]),
        ("batch/v1", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

pub fn run(args: InjectArgs, stdin: &mut dyn Read) -> Result<Outcome, CliError> {
    let InjectArgs {
        file,
        proxy_image,
        control_plane_addr,
        trust_domain,
        injection_config,
    } = args;
    let mut settings = match &injection_config {
        None => InjectionSettings::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| CliError::Manifest {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            InjectionSettings::from_yaml(&text).map_err(|reason| CliError::Manifest {
                path: path.display().to_string(),
                reason,
            })?
        }
    };
    if let Some(image) = proxy_image {
        settings.proxy_image = image;
    }
    if let Some(addr) = control_plane_addr {
        settings.control_plane_addr = addr;
    }
    if let Some(td) = trust_domain {
        settings.trust_domain = td;
    }
    let name = file.display().to_string();
    let text = if name == "-" {
        let mut text = String::new();
        stdin
            .read_to_string(&mut text)
            .map_err(|e| CliError::Manifest {
                path: name.clone(),
                reason: e.to_string(),
            })?;
        text
    } else {
        std::fs::read_to_string(&file).map_err(|e| CliError::Manifest {
            path: name.clone(),
            reason: e.to_string(),
        })?
    };
    let (stdout, stderr) =
        inject_documents(&text, &settings).map_err(|reason| CliError::Manifest {
            path: name.clone(),
            reason,
        })?;
    Ok(Outcome {
        stdout,
        stderr,
        ok: true,
    })
}

/// Injects every document of `text`: the YAML out, and one line per workload saying
/// what happened to it. An error names the document (counted from 0) and the field.
pub fn inject_documents(
    text: &str,
    settings: &InjectionSettings,
) -> Result<(String, String), String> {
    let mut out = Vec::new();
    let mut report = String::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(document)
            .map_err(|e| format!("document {index}: {e}"))?;
        if value.is_null() {
            continue;
        }
        let mut value: Value =
            serde_json::to_value(&value).map_err(|e| format!("document {index}: {e}"))?;
        let field = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default();
        let (api_version, kind) = (field("apiVersion").to_string(), field("kind").to_string());
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("(unnamed)")
            .to_string();
        let Some(path) = pod_path(&api_version, &kind) else {
            out.push(value);
            continue;
        };
        let what = format!("{} {name}", kind.to_lowercase());
        let at = |path: &[&str]| {
            if path.is_empty() {
                "the pod".to_string()
            } else {
                path.join(".")
            }
        };
        let mut pod = &mut value;
        for key in path {
            pod = pod.get_mut(*key).ok_or_else(|| {
                format!("document {index} ({kind} {name}): {} is missing", at(path))
            })?;
        }
        match injection::inject_json(pod, true, settings) {
            Ok(InjectedJson::Injected(injected)) => {
                *pod = injected;
                report.push_str(&format!("{what}: injected\n"));
            }
            Ok(InjectedJson::Unchanged(skip)) => {
                report.push_str(&format!("{what}: unchanged ({skip})\n"));
            }
            Err(e) => {
                return Err(format!(
                    "document {index} ({kind} {name}): {}: {e}",
                    at(path)
                ));
            }
        }
        out.push(value);
    }
    let mut yaml = String::new();
    for (i, document) in out.iter().enumerate() {
        if i > 0 {
            yaml.push_str("---\n");
        }
        yaml.push_str(&serde_yaml_ng::to_string(document).map_err(|e| e.to_string())?);
    }
    Ok((yaml, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80, targetPort: 8080}], selector: {app: web}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: "web:1", ports: [{containerPort: 8080}]}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  schedule: "@daily"
  jobTemplate:
    spec:
      template:
        metadata: {annotations: {trellis.dev/inject: disabled}}
        spec: {containers: [{name: report, image: "report:1"}], restartPolicy: Never}
"#;

    #[test]
    fn templates_are_injected_others_pass_through_and_a_second_run_changes_nothing() {
        let settings = InjectionSettings::default();
        let (yaml, report) = inject_documents(DEPLOYMENT, &settings).unwrap();
        assert_eq!(
            report,
            "deployment web: injected\ncronjob report: unchanged (opted out with \
             trellis.dev/inject: disabled)\n"
        );
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
            .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
            .collect();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["kind"], "Service");
        assert_eq!(docs[0]["spec"]["ports"][0]["targetPort"], 8080);
        let template = &docs[1]["spec"]["template"];
        assert_eq!(
            template["spec"]["initContainers"][1]["name"],
            "trellis-proxy"
        );
        assert_eq!(
            template["metadata"]["annotations"]["trellis.dev/injected"],
            "true"
        );
        assert!(
            docs[2]
                .pointer("/spec/jobTemplate/spec/template/spec/initContainers")
                .is_none()
        );

        let (again, report) = inject_documents(&yaml, &settings).unwrap();
        assert_eq!(again, yaml);
        assert!(
            report.starts_with("deployment web: unchanged (already injected)"),
            "{report}"
        );
    }

    #[test]
    fn errors_name_the_document_and_the_field() {
        let settings = InjectionSettings::default();
        let bad = "kind: Service\napiVersion: v1\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {}\n";
        let error = inject_documents(bad, &settings).unwrap_err();
        assert_eq!(
            error,
            "document 1 (Deployment web): spec.template is missing"
        );
        let nameless =
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a}]}\n";
        let error = inject_documents(nameless, &settings).unwrap_err();
        assert!(
            error.starts_with("document 0 (Pod p): the pod: the pod has no service name"),
            "{error}"
        );
        let error = inject_documents("a: [", &settings).unwrap_err();
        assert!(error.starts_with("document 0:"), "{error}");
    }
}
