//! Lists the Grafana dashboards of `helm/trellis/dashboards/*.json` for
//! `trellisctl install`, which ships them the way the chart's `.Files.Glob` does.

use std::{
    error::Error,
    fmt::Write as _,
    path::{Path, PathBuf},
};

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR unset")?;
    let dir = Path::new(&manifest_dir).join("../helm/trellis/dashboards");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect(),
        // A source tree without the charts (e.g. a crate package) ships no dashboards.
        Err(_) => Vec::new(),
    };
    // Helm's Files are ordered by name too; the ConfigMap's keys are the file names.
    files.sort();
    let mut code = String::from("const DASHBOARDS: &[(&str, &str)] = &[\n");
    for path in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("{}: not a UTF-8 file name", path.display()))?;
        let absolute = path.canonicalize()?;
        let absolute = absolute
            .to_str()
            .ok_or_else(|| format!("{}: not a UTF-8 path", absolute.display()))?;
        writeln!(code, "    ({name:?}, include_str!({absolute:?})),")?;
    }
    code.push_str("];\n");
    let out_dir = std::env::var_os("OUT_DIR").ok_or("OUT_DIR unset")?;
    std::fs::write(Path::new(&out_dir).join("dashboards.rs"), code)?;
    Ok(())
}
