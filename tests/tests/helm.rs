//! The Helm charts, `trellisctl install` and the Dockerfiles, checked offline.
//!
//! Helm's engine and the Kubernetes schemas come from PyPI (`helm-python-sdk` bundles
//! Helm 4's library, `kubernetes-validate` the schemas): the first test that needs them
//! creates a virtual environment at `target/helm-venv` from `tests/helm/requirements.txt`
//! (python3 with venv is the only prerequisite; CI installs python3-venv) and later runs
//! reuse it. `tests/helm/check_charts.py` does the Helm side; see its docstring.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::Instant,
};

use serde_json::Value;
use trellis_tests::control_plane::trellisctl_binary;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The target dir this test binary was built in (`<target>/<profile>/deps/helm-*`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

fn run(what: &str, command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The venv's python, created (or rebuilt when the requirements changed) under a lock
/// file, so test binaries and threads running at once build it once.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let target = target_dir();
        let venv = target.join("helm-venv");
        let requirements = repo().join("tests/helm/requirements.txt");
        let wanted = std::fs::read_to_string(&requirements).unwrap();
        let lock = File::create(target.join("helm-venv.lock")).unwrap();
        lock.lock().unwrap();
        let python = venv.join("bin/python");
        let marker = venv.join("trellis-requirements.txt");
        if python.exists() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&wanted) {
            return python;
        }
        let started = Instant::now();
        if venv.exists() {
            std::fs::remove_dir_all(&venv).unwrap();
        }
        run(
            "python3 -m venv (needs python3 with venv: apt-get install python3-venv)",
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
        );
        run(
            "pip install -r tests/helm/requirements.txt",
            Command::new(&python)
                .args(["-m", "pip", "install", "--disable-pip-version-check"])
                .args(["--no-input", "--quiet", "-r"])
                .arg(&requirements),
        );
        // Written last: a venv without it is half-made and gets rebuilt.
        std::fs::write(&marker, &wanted).unwrap();
        eprintln!(
            "created {} in {:.1}s",
            venv.display(),
            started.elapsed().as_secs_f64()
        );
        python
    })
}

/// Runs `tests/helm/check_charts.py` with `args`; returns (success, stdout, stderr).
fn check_charts(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let output = Command::new(python())
        .arg(repo().join("tests/helm/check_charts.py"))
        .arg("--repo")
        .arg(repo())
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    eprintln!("{stdout}{stderr}");
    (output.status.success(), stdout, stderr)
}

#[test]
fn the_charts_crds_are_the_ones_generated_from_the_types() {
    let dir = repo().join("helm/trellis/crds");
    let generated = trellis_crds::crds();
    for (file, crd) in &generated {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e}: copy crds/manifests/{file} there", path.display())
        });
        assert!(
            text == trellis_crds::crd_yaml(crd).unwrap(),
            "helm/trellis/crds/{file} differs from the CRD generated from the Rust types: \
             run `cargo run -p trellis-crds --bin crdgen`, which writes both copies"
        );
    }
    let mut extra: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !generated.iter().any(|(file, _)| file == name))
        .collect();
    extra.sort();
    assert!(
        extra.is_empty(),
        "helm/trellis/crds/ holds files no Rust type generates: {extra:?}"
    );
}

#[test]
fn the_charts_versions_are_the_workspaces() {
    for chart in ["trellis", "marketplace"] {
        let text =
            std::fs::read_to_string(repo().join("helm").join(chart).join("Chart.yaml")).unwrap();
        let meta: Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(meta["apiVersion"], "v2", "helm/{chart}/Chart.yaml");
        for key in ["version", "appVersion"] {
            assert_eq!(
                meta[key],
                env!("CARGO_PKG_VERSION"),
                "helm/{chart}/Chart.yaml {key}: the charts, the images and trellisctl \
                 install move with the workspace's version"
            );
        }
    }
}

#[test]
fn both_charts_lint_render_and_validate_offline_with_default_and_custom_values() {
    let started = Instant::now();
    let emit = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = check_charts(&["--emit".as_ref(), emit.path().as_os_str()]);
    assert!(ok, "the chart checks failed:\n{stderr}");
    for line in [
        "ok helm/trellis (default values)",
        "ok helm/trellis (values-trellis.yaml)",
        "ok helm/marketplace (default values)",
        "ok helm/marketplace (values-marketplace.yaml)",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }

    // What the schemas cannot say (CEL rules, references between resources) is checked
    // by the same Rust validation `trellisctl apply` and the control plane run.
    let rendered: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(emit.path().join("marketplace.json")).unwrap(),
    )
    .unwrap();
    let resources: Vec<String> = rendered
        .iter()
        .filter(|o| {
            o["apiVersion"]
                .as_str()
                .unwrap()
                .starts_with("trellis.dev/")
        })
        .map(|o| serde_yaml_ng::to_string(o).unwrap())
        .collect();
    let kinds: BTreeMap<&str, usize> = rendered.iter().fold(BTreeMap::new(), |mut m, o| {
        *m.entry(o["kind"].as_str().unwrap()).or_default() += 1;
        m
    });
    assert_eq!(kinds.get("Canary"), Some(&1), "{kinds:?}");
    assert_eq!(kinds.get("Namespace"), Some(&1), "{kinds:?}");
    // storefront, user, order, payment v1/v2, inventory, shipping, analytics,
    // recommendations v1/v2, and the gateway.
    assert_eq!(kinds.get("Deployment"), Some(&11), "{kinds:?}");
    let namespace = rendered.iter().find(|o| o["kind"] == "Namespace").unwrap();
    assert_eq!(
        namespace["metadata"]["labels"]["trellis.dev/inject"],
        "enabled"
    );
    let documents = trellis_crds::parse_documents(&resources.join("---\n")).unwrap();
    assert_eq!(documents.len(), resources.len());
    // The gateway's command line is one trellis-proxy accepts: it gets past its flags
    // (a usage error exits 2) and stops at the files that exist only in a pod.
    let gateway = rendered
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "gateway")
        .unwrap();
    let args: Vec<String> = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().replace("0.0.0.0:", "127.0.0.1:"))
        .map(|a| {
            if a.ends_with(":8080") || a.ends_with(":15020") {
                "127.0.0.1:0".into()
            } else {
                a
            }
        })
        .collect();
    let output = Command::new(trellis_tests::mesh::proxy_binary())
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && output.status.code() != Some(2) && !stderr.contains("Usage"),
        "trellis-proxy {args:?}: {}\n{stderr}",
        output.status
    );
    if let Err(invalid) = trellis_crds::validate_batch(&documents, &[]) {
        panic!("the marketplace chart's resources are invalid: {invalid:?}");
    }
    // The injection config the chart hands the control plane is one it can read, and
    // says where the control plane is for the namespace it was installed in.
    for (file, proxy_image, addr) in [
        (
            "trellis.json",
            "ghcr.io/trellis-mesh/trellis-proxy:0.1.0",
            "https://trellis-control-plane.trellis-system.svc:15012",
        ),
        (
            "trellis-custom.json",
            "registry.example.org/mesh/trellis-proxy:0.1.0-rc.1",
            "https://trellis-control-plane.trellis-system.svc:15012",
        ),
    ] {
        let rendered: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(emit.path().join(file)).unwrap())
                .unwrap();
        let config = rendered
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "trellis-injection")
            .unwrap_or_else(|| panic!("{file}: no ConfigMap trellis-injection"));
        let settings: trellis_crds::injection::InjectionSettings =
            serde_yaml_ng::from_str(config["data"]["injection.yaml"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{file}: the injection config does not parse: {e}"));
        assert_eq!(settings.proxy_image, proxy_image, "{file}");
        assert_eq!(settings.control_plane_addr, addr, "{file}");
        let deployment = rendered.iter().find(|o| o["kind"] == "Deployment").unwrap();
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let env = container["env"].as_array().unwrap();
        let path = env
            .iter()
            .find(|e| e["name"] == "TRELLIS_INJECTION_CONFIG")
            .unwrap()["value"]
            .as_str()
            .unwrap();
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "injection")
            .unwrap();
        assert_eq!(
            Path::new(mount["mountPath"].as_str().unwrap()).join("injection.yaml"),
            Path::new(path),
            "{file}"
        );
    }
    // Every variable the chart sets on the control plane is one it reads: a renamed
    // flag would otherwise be ignored without a word.
    let args = std::fs::read_to_string(repo().join("control-plane/src/args.rs")).unwrap();
    let rendered: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(emit.path().join("trellis.json")).unwrap())
            .unwrap();
    let deployment = rendered.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    for env in container["env"].as_array().unwrap() {
        let name = env["name"].as_str().unwrap();
        assert!(
            args.contains(&format!("env = \"{name}\"")),
            "helm/trellis sets {name}, which trellis-control-plane does not read \
             (no `env = \"{name}\"` in control-plane/src/args.rs)"
        );
    }
    eprintln!("chart checks took {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn a_typo_in_a_values_file_fails_the_check_and_names_the_key() {
    for (chart, file, key) in [
        ("trellis", "trellis-typo.yaml", "replica"),
        ("marketplace", "marketplace-typo.yaml", "namespaces"),
    ] {
        let values = repo().join("tests/helm/bad").join(file);
        let (ok, _, stderr) = check_charts(&[
            "--chart".as_ref(),
            chart.as_ref(),
            "--values".as_ref(),
            values.as_os_str(),
        ]);
        assert!(!ok, "helm/{chart} accepted {file}");
        assert!(
            stderr.contains(&format!("additional properties '{key}' not allowed")),
            "the failure for {file} does not name {key:?}:\n{stderr}"
        );
    }
}

#[test]
fn trellisctl_install_prints_the_objects_helm_template_renders() {
    let dir = tempfile::tempdir().unwrap();
    let install = |file: &str, args: &[&str]| {
        let path = dir.path().join(file);
        let output = Command::new(trellisctl_binary())
            .arg("install")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "trellisctl install {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(&path, &output.stdout).unwrap();
        path
    };

    let defaults = install("defaults.yaml", &[]);
    let (ok, stdout, stderr) = check_charts(&["--install-output".as_ref(), defaults.as_os_str()]);
    assert!(
        ok,
        "trellisctl install differs from helm template:\n{stderr}"
    );
    assert!(
        stdout.contains("the same objects as helm template renders"),
        "{stdout}"
    );

    let flags = install(
        "flags.yaml",
        &["--namespace", "mesh", "--image-tag", "1.2.3"],
    );
    let (ok, _, stderr) = check_charts(&[
        "--install-output".as_ref(),
        flags.as_os_str(),
        "--namespace".as_ref(),
        "mesh".as_ref(),
        "--image-tag".as_ref(),
        "1.2.3".as_ref(),
    ]);
    assert!(
        ok,
        "trellisctl install --namespace mesh --image-tag 1.2.3 differs:\n{stderr}"
    );

    // The comparison can fail: one changed field is found and named.
    let tampered = dir.path().join("tampered.yaml");
    let text = std::fs::read_to_string(&defaults).unwrap();
    assert!(text.contains("replicas: 2\n"));
    std::fs::write(
        &tampered,
        text.replacen("replicas: 2\n", "replicas: 3\n", 1),
    )
    .unwrap();
    let (ok, _, stderr) = check_charts(&["--install-output".as_ref(), tampered.as_os_str()]);
    assert!(!ok, "a changed replica count went unnoticed");
    assert!(
        stderr.contains("Deployment trellis-system/trellis-control-plane: spec.replicas"),
        "{stderr}"
    );
}

/// `[package]` and `[[bin]]` names of every workspace crate, read from the manifests.
fn workspace_binaries() -> BTreeMap<String, Vec<String>> {
    let mut packages = BTreeMap::new();
    for entry in std::fs::read_dir(repo()).unwrap() {
        let manifest = entry.unwrap().path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let (mut section, mut package, mut bins) = (String::new(), None, Vec::new());
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line.to_string();
            } else if let Some(value) = line.strip_prefix("name = ") {
                let value = value.trim_matches('"').to_string();
                match section.as_str() {
                    "[package]" => package = Some(value),
                    "[[bin]]" => bins.push(value),
                    _ => {}
                }
            }
        }
        if let Some(package) = package {
            packages.insert(package, bins);
        }
    }
    packages
}

/// One Dockerfile's facts: the packages and binaries it builds, what the final stage
/// copies in, runs and runs as.
#[derive(Debug, Default)]
struct Dockerfile {
    builds: Vec<(String, String)>,
    final_from: String,
    final_copies: Vec<String>,
    final_user: Option<String>,
    final_entrypoint: Vec<String>,
    final_runs: String,
    rust_version: Option<String>,
}

fn parse_dockerfile(path: &Path) -> Dockerfile {
    let text = std::fs::read_to_string(path).unwrap();
    let joined = text.replace("\\\n", " ");
    let mut parsed = Dockerfile::default();
    for line in joined.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().copied() {
            Some("ARG") => {
                if let Some(v) = words[1].strip_prefix("RUST_VERSION=") {
                    parsed.rust_version = Some(v.to_string());
                }
            }
            Some("FROM") => {
                parsed.final_from = words[1].to_string();
                parsed.final_copies.clear();
                parsed.final_user = None;
                parsed.final_entrypoint.clear();
                parsed.final_runs.clear();
            }
            Some("RUN") => {
                let cargo_build = words.windows(2).any(|w| w == ["cargo", "build"]);
                if cargo_build {
                    let after = |flag: &str| {
                        let i = words.iter().position(|w| *w == flag).unwrap();
                        words[i + 1].to_string()
                    };
                    parsed.builds.push((after("-p"), after("--bin")));
                }
                parsed.final_runs.push_str(line);
            }
            Some("COPY") if words.iter().any(|w| w.starts_with("--from=")) => {
                parsed.final_copies.push(words[words.len() - 2].to_string());
            }
            Some("USER") => parsed.final_user = Some(words[1].to_string()),
            Some("ENTRYPOINT") => {
                parsed.final_entrypoint =
                    serde_json::from_str(line["ENTRYPOINT".len()..].trim()).unwrap();
            }
            _ => {}
        }
    }
    parsed
}

#[test]
fn the_dockerfiles_build_workspace_binaries_and_the_proxy_runs_as_uid_1337() {
    // docker cannot run here: this checks what can go wrong without building.
    let packages = workspace_binaries();
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let msrv = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let version_key = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    for (file, package, binary) in [
        ("sidecar/Dockerfile", "trellis-sidecar", "trellis-proxy"),
        (
            "control-plane/Dockerfile",
            "trellis-control-plane",
            "trellis-control-plane",
        ),
        (
            "demo-services/Dockerfile",
            "trellis-demo-services",
            "marketplace",
        ),
    ] {
        let docker = parse_dockerfile(&repo().join(file));
        assert_eq!(
            docker.builds,
            vec![(package.to_string(), binary.to_string())],
            "{file}"
        );
        let bins = packages
            .get(package)
            .unwrap_or_else(|| panic!("{file} builds -p {package}, not a workspace package"));
        assert!(
            bins.iter().any(|b| b == binary),
            "{file}: {package} has no binary {binary} ({bins:?})"
        );
        assert!(
            docker
                .final_copies
                .iter()
                .any(|c| Path::new(c).file_name().unwrap() == binary),
            "{file}: the final stage does not copy {binary}: {:?}",
            docker.final_copies
        );
        let entry = docker.final_entrypoint.first().unwrap();
        assert_eq!(
            Path::new(entry).file_name().unwrap(),
            binary,
            "{file} ENTRYPOINT"
        );
        let rust = docker.rust_version.as_deref().unwrap();
        assert!(
            version_key(rust) >= version_key(&msrv),
            "{file}: Rust {rust} is older than the workspace's rust-version {msrv}"
        );
        let user = docker
            .final_user
            .as_deref()
            .unwrap_or_else(|| panic!("{file}: no USER"));
        let uid: i64 = user.split(':').next().unwrap().parse().unwrap_or_else(|_| {
            panic!("{file}: USER {user} is not numeric (runAsNonRoot can only check a numeric uid)")
        });
        assert_ne!(uid, 0, "{file} runs as root");
        if binary == "trellis-proxy" {
            assert_eq!(
                uid,
                trellis_crds::injection::PROXY_UID,
                "{file}: the proxy must run as the uid the iptables rules let through"
            );
            assert!(
                docker.final_runs.contains("iptables"),
                "{file}: `trellis-proxy init` needs iptables in the image"
            );
        } else {
            assert_eq!(
                docker.final_from, "scratch",
                "{file}: a static binary needs no base"
            );
        }
    }
    assert!(repo().join(".dockerignore").exists());
}
