//! Durations as operators write them in flags and resources: `250ms`, `5s`, `1m30s`, `24h`.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (write e.g. 250ms, 5s, 1m30s, 24h)")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

/// Parses one or more `<integer><unit>` parts, unit one of `ms`, `s`, `m`, `h`, `d`.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let fail = |reason| DurationError {
        input: input.to_string(),
        reason,
    };
    let mut rest = input.trim();
    if rest.is_empty() {
        return Err(fail("it is empty"));
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(fail("expected a number"));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| fail("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let per_unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            "" => return Err(fail("a unit is missing")),
            _ => return Err(fail("unknown unit")),
        };
        rest = &rest[unit_len..];
        let part = u32::try_from(value)
            .ok()
            .and_then(|v| per_unit.checked_mul(v))
            .ok_or_else(|| fail("number too large"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| fail("number too large"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        for (bad, why) in [
            ("", "empty"),
            ("5", "unit is missing"),
            ("s", "expected a number"),
            ("5 s", "unknown unit"),
            ("5sec", "unknown unit"),
            ("-1s", "expected a number"),
            ("99999999999999999999s", "too large"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
