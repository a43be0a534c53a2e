//! Writes the CRD manifests generated from the Rust types into `crds/manifests/` and
//! the trellis chart's `helm/trellis/crds/` (or only into the folder given as the first
//! argument).

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dirs = match std::env::args_os().nth(1) {
        Some(dir) => vec![PathBuf::from(dir)],
        None => vec![
            crate_dir.join("manifests"),
            crate_dir.join("../helm/trellis/crds"),
        ],
    };
    for dir in dirs {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("crdgen: {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        if let Err(e) = write_into(&dir) {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn write_into(dir: &std::path::Path) -> Result<(), String> {
    for (file, crd) in trellis_crds::crds() {
        let path = dir.join(file);
        let written = trellis_crds::crd_yaml(&crd)
            .map_err(|e| e.to_string())
            .and_then(|yaml| std::fs::write(&path, yaml).map_err(|e| e.to_string()));
        written.map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
