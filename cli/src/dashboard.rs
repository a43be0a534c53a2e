//! `trellisctl dashboard`: asks the control plane where its web dashboard listens,
//! prints the URL and opens it in a browser when the machine has `xdg-open`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{api::Api, args::DashboardArgs, commands::Outcome, error::CliError};

/// Prints the dashboard's URL and, unless `--no-open`, tries to open it.
pub async fn run(api: &Api, args: DashboardArgs) -> Result<Outcome, CliError> {
    let answer = api.get("/v1/dashboard").await?;
    let url = answer
        .get("url")
        .and_then(serde_json::Value::as_str)
        .filter(|url| url.starts_with("http://") || url.starts_with("https://"))
        .ok_or_else(|| CliError::Answer {
            addr: api.addr().to_string(),
            request: "GET /v1/dashboard".into(),
            reason: format!("no dashboard \"url\" in the answer: {answer}"),
        })?
        .to_string();
    let mut outcome = Outcome {
        stdout: format!("{url}\n"),
        stderr: String::new(),
        ok: true,
    };
    if !args.no_open {
        outcome.stderr = open(&url);
    }
    Ok(outcome)
}

/// Starts `xdg-open URL` without waiting for it; what happened, for stderr. Never an
/// error: a machine without a desktop still gets the URL.
fn open(url: &str) -> String {
    let Some(opener) = find_in_path("xdg-open", std::env::var_os("PATH").as_deref()) else {
        return "no xdg-open here: open the URL above in a browser\n".into();
    };
    let started = Command::new(&opener)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match started {
        Ok(_) => format!("opening it with {}\n", opener.display()),
        Err(e) => format!(
            "could not start {}: {e}; open the URL above in a browser\n",
            opener.display()
        ),
    }
}

/// The first executable file called `name` in the folders of `path`.
fn find_in_path(name: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failed test

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn an_opener_is_found_only_where_it_is_executable() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([other.path(), dir.path()]).unwrap();
        assert_eq!(find_in_path("xdg-open", Some(&path)), None);
        let opener = dir.path().join("xdg-open");
        std::fs::write(&opener, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&opener, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(find_in_path("xdg-open", Some(&path)), None);
        std::fs::set_permissions(&opener, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_in_path("xdg-open", Some(&path)), Some(opener));
        assert_eq!(find_in_path("xdg-open", None), None);
    }
}
