//! What `apply -f` sends: the documents of files, directories and stdin, joined into
//! one YAML stream so the control plane applies them as one atomic batch.

use std::{
    io::{self, Read},
    path::{Path, PathBuf},
};

use crate::error::CliError;

/// The extensions a directory is searched for; a file named directly is read whatever
/// its name.
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// One source of documents and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The path as the operator would recognise it, or `-` for stdin.
    pub name: String,
    pub text: String,
}

/// Reads every `-f` argument in order: `-` is stdin, a directory is every
/// `*.yaml|*.yml|*.json` under it (recursively, sorted by path), anything else a file.
pub fn read_sources(args: &[PathBuf], stdin: &mut dyn Read) -> Result<Vec<Source>, CliError> {
    let mut sources = Vec::new();
    let mut stdin_read = false;
    for arg in args {
        if arg.as_os_str() == "-" {
            if stdin_read {
                return Err(CliError::Usage("-f - (stdin) can be given once".into()));
            }
            stdin_read = true;
            let mut text = String::new();
            stdin
                .read_to_string(&mut text)
                .map_err(|e| manifest_error("-", &e))?;
            sources.push(Source {
                name: "-".into(),
                text,
            });
            continue;
        }
        let metadata = std::fs::metadata(arg).map_err(|e| manifest_error(arg, &e))?;
        if metadata.is_dir() {
            let files = files_under(arg)?;
            if files.is_empty() {
                return Err(CliError::Manifest {
                    path: arg.display().to_string(),
                    reason: "no *.yaml, *.yml or *.json files in this directory".into(),
                });
            }
            for file in files {
                sources.push(read_file(&file)?);
            }
        } else {
            sources.push(read_file(arg)?);
        }
    }
    Ok(sources)
}

/// Every file under `dir` with one of [`EXTENSIONS`], sorted by path. Symlinked
/// directories are not followed, so a link loop cannot recurse forever.
pub fn files_under(dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| manifest_error(&dir, &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| manifest_error(&dir, &e))?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(|e| manifest_error(&path, &e))?;
            if file_type.is_dir() {
                pending.push(path);
                continue;
            }
            let is_file = file_type.is_file()
                || (file_type.is_symlink() && std::fs::metadata(&path).is_ok_and(|m| m.is_file()));
            let wanted = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            if is_file && wanted {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn read_file(path: &Path) -> Result<Source, CliError> {
    let bytes = std::fs::read(path).map_err(|e| manifest_error(path, &e))?;
    let text = String::from_utf8(bytes).map_err(|_| CliError::Manifest {
        path: path.display().to_string(),
        reason: "not UTF-8 text".into(),
    })?;
    Ok(Source {
        name: path.display().to_string(),
        text,
    })
}

fn manifest_error(path: impl AsRef<Path>, e: &io::Error) -> CliError {
    let reason = match e.kind() {
        io::ErrorKind::NotFound => "no such file or directory".to_string(),
        _ => e.to_string(),
    };
    CliError::Manifest {
        path: path.as_ref().display().to_string(),
        reason,
    }
}

/// Parses each source on its own so a mistake is reported with the file it is in,
/// before anything is sent; returns how many documents there are in all. The
/// cross-resource checks stay with the server, which knows what is already applied.
pub fn check_sources(sources: &[Source]) -> Result<usize, CliError> {
    let mut count = 0;
    for Source { name, text } in sources {
        let documents = trellis_crds::parse_documents(text).map_err(|e| CliError::Manifest {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        count += documents.len();
    }
    if count == 0 {
        let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        return Err(CliError::Manifest {
            path: names.join(", "),
            reason: "nothing to apply: no documents".into(),
        });
    }
    Ok(count)
}

/// One YAML stream of every source, documents separated by `---`.
pub fn join(sources: &[Source]) -> String {
    let mut stream = String::new();
    for Source { text, .. } in sources {
        if !stream.is_empty() {
            stream.push_str("---\n");
        }
        stream.push_str(text);
        if !text.ends_with('\n') {
            stream.push('\n');
        }
    }
    stream
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

    use super::*;

    const ROUTE: &str = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficRoute\n\
        metadata: {name: web}\nspec:\n  service: web\n  rules:\n    - backends: [{service: web, weight: 1}]\n";

    #[test]
    fn a_directory_yields_its_manifests_sorted_and_recursively() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/nested")).unwrap();
        std::fs::create_dir_all(root.join("a")).unwrap();
        for file in [
            "z.yaml",
            "a/one.yml",
            "b/nested/deep.json",
            "b/two.YAML",
            "notes.txt",
            "b/README.md",
        ] {
            std::fs::write(root.join(file), "").unwrap();
        }
        let found: Vec<PathBuf> = files_under(root)
            .unwrap()
            .into_iter()
            .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
            .collect();
        let want: Vec<PathBuf> = ["a/one.yml", "b/nested/deep.json", "b/two.YAML", "z.yaml"]
            .into_iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn sources_keep_the_order_given_and_stdin_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("route.txt");
        std::fs::write(&file, ROUTE).unwrap();
        let mut stdin: &[u8] = b"from stdin";
        let sources = read_sources(&[PathBuf::from("-"), file.clone()], &mut stdin).unwrap();
        assert_eq!(sources[0].name, "-");
        assert_eq!(sources[0].text, "from stdin");
        assert_eq!(sources[1].name, file.display().to_string());

        let twice = read_sources(&[PathBuf::from("-"), PathBuf::from("-")], &mut &b""[..]);
        assert!(twice.unwrap_err().to_string().contains("once"));
    }

    #[test]
    fn missing_paths_and_empty_directories_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.yaml");
        let e = read_sources(std::slice::from_ref(&missing), &mut &b""[..]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: no such file or directory", missing.display())
        );
        let e = read_sources(&[dir.path().to_path_buf()], &mut &b""[..]).unwrap_err();
        assert!(e.to_string().contains("no *.yaml"), "{e}");
    }

    #[test]
    fn sources_join_into_one_stream() {
        let sources = [
            Source {
                name: "a".into(),
                text: "a: 1".into(),
            },
            Source {
                name: "b".into(),
                text: "b: 2\n---\nc: 3\n".into(),
            },
        ];
        assert_eq!(join(&sources), "a: 1\n---\nb: 2\n---\nc: 3\n");
    }

    #[test]
    fn a_bad_document_is_reported_with_its_file() {
        let good = Source {
            name: "good.yaml".into(),
            text: ROUTE.into(),
        };
        assert_eq!(check_sources(std::slice::from_ref(&good)).unwrap(), 1);
        let bad = Source {
            name: "bad.yaml".into(),
            text: ROUTE.replace("TrafficRoute", "TraficRoute"),
        };
        let e = check_sources(&[good, bad]).unwrap_err().to_string();
        assert!(
            e.starts_with("bad.yaml: document 0: kind \"TraficRoute\""),
            "{e}"
        );
        let empty = Source {
            name: "empty.yaml".into(),
            text: "# nothing\n".into(),
        };
        let e = check_sources(&[empty]).unwrap_err().to_string();
        assert!(e.contains("nothing to apply"), "{e}");
    }
}
