//! Checks every path (kubectl's webhook, trellisctl, the control plane) runs before a
//! resource reaches a proxy. Each problem names its field path, e.g.
//! `spec.rules[1].backends[0].weight`, and all problems are reported at once.

use std::fmt;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// Every problem found in a resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    pub kind: &'static str,
    pub name: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} is invalid:", self.kind, self.name)?;
        for FieldError { path, message } in &self.errors {
            write!(f, "\n  {path}: {message}")?;
        }
        Ok(())
    }
}

/// Collects problems while walking a spec.
#[derive(Debug, Default)]
pub struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    pub fn fail(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// A duration that must be longer than zero: every duration in these resources
    /// is a timeout, an interval or a lifetime, and zero of any of them breaks traffic.
    pub fn duration(&mut self, path: &str, value: &str) {
        match trellis_api::duration::parse(value) {
            Err(e) => self.fail(path, e.to_string()),
            Ok(d) if d.is_zero() => self.fail(path, "must be longer than zero"),
            Ok(_) if value.trim() != value => self.fail(path, "must not have spaces around it"),
            Ok(_) => {}
        }
    }

    pub fn optional_duration(&mut self, path: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.duration(path, value);
        }
    }

    pub fn range(&mut self, path: &str, value: f64, min: f64, max: f64) {
        if !(min..=max).contains(&value) || value.is_nan() {
            self.fail(
                path,
                format!("must be between {min} and {max}, not {value}"),
            );
        }
    }

    pub fn at_least(&mut self, path: &str, value: u32, min: u32) {
        if value < min {
            self.fail(path, format!("must be at least {min}, not {value}"));
        }
    }

    pub fn name(&mut self, path: &str, value: &str) {
        if !is_dns_label(value) {
            self.fail(
                path,
                format!(
                    "{value:?} is not a DNS-1123 label (lowercase letters, digits and '-', \
                     starting and ending with a letter or digit, at most 63 characters)"
                ),
            );
        }
    }

    pub fn regex(&mut self, path: &str, value: &str) {
        if let Err(e) = regex::Regex::new(value) {
            self.fail(path, format!("does not compile as a regex: {e}"));
        }
    }

    pub fn unique<'a>(&mut self, path: &str, names: impl Iterator<Item = &'a str>) {
        let mut seen = std::collections::BTreeSet::new();
        for (i, name) in names.enumerate() {
            if !seen.insert(name) {
                self.fail(
                    format!("{path}[{i}].name"),
                    format!("{name:?} is used twice"),
                );
            }
        }
    }

    pub fn finish(self, kind: &'static str, name: &str) -> Result<(), Invalid> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(Invalid {
                kind,
                name: name.to_string(),
                errors: self.errors,
            })
        }
    }
}

/// A DNS-1123 subdomain: what Kubernetes allows as an object name.
pub fn is_dns_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(is_dns_label)
}

pub fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// The schema pattern durations follow (the Rust check is `trellis_api::duration`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";
/// The schema pattern of a DNS-1123 label.
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
