//! Writes the CRD manifests generated from the Rust types into `crds/manifests/`
//! (or the folder given as the first argument).

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("manifests"));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("crdgen: {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (file, crd) in trellis_crds::crds() {
        let path = dir.join(file);
        let written = trellis_crds::crd_yaml(&crd)
            .map_err(|e| e.to_string())
            .and_then(|yaml| std::fs::write(&path, yaml).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("crdgen: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
