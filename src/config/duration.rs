//! Human durations: `"90s"`, `"10m"`, `"1h30m"`, `"2d"`, `"500ms"`.

use std::time::Duration;

/// Units accepted by [`parse_duration`], quoted in every error so the fix is obvious.
pub(crate) const ACCEPTED_UNITS: &str = "accepted units: ms, s, m, h, d, combined like \"90s\", \"10m\", \"1h30m\"";

/// Parse a duration such as `"90s"`, `"1h30m"` or `"500ms"`; bare numbers are rejected because
/// their unit would be a guess.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err(format!("empty duration; {ACCEPTED_UNITS}"));
    }
    let mut total_ms: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits_end == 0 {
            return Err(format!("invalid duration \"{s}\": expected a number at \"{rest}\"; {ACCEPTED_UNITS}"));
        }
        let number: u64 =
            rest[..digits_end].parse().map_err(|_| format!("invalid duration \"{s}\": number too large"))?;
        rest = &rest[digits_end..];
        let unit_end = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let factor: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" if rest.starts_with(char::is_whitespace) => {
                return Err(format!(
                    "invalid duration \"{s}\": no spaces allowed, write units as one letter or two; {ACCEPTED_UNITS}"
                ))
            }
            "" => return Err(format!("invalid duration \"{s}\": missing unit after {number}; {ACCEPTED_UNITS}")),
            other => return Err(format!("invalid duration \"{s}\": unknown unit \"{other}\"; {ACCEPTED_UNITS}")),
        };
        total_ms = number
            .checked_mul(factor)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(|| format!("invalid duration \"{s}\": too large"))?;
    }
    Ok(Duration::from_millis(total_ms))
}

pub(crate) use crate::core::format_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_units_and_combinations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m1s1ms"), Ok(Duration::from_millis(61_001)));
    }

    #[test]
    fn rejects_bare_numbers_and_empty() {
        let e = parse_duration("90").unwrap_err();
        assert!(e.contains("missing unit"), "{e}");
        assert!(e.contains("ms, s, m, h, d"), "{e}");
        let e = parse_duration("").unwrap_err();
        assert!(e.contains("empty duration"), "{e}");
        assert!(e.contains("ms, s, m, h, d"), "{e}");
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["10 minutes", "abc", "1.5h", "-1s", "5x", "h", " 5s", "99999999999999999999s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
        assert!(parse_duration("10minutes").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("213503982334601d").is_err());
    }

    #[test]
    fn format_round_trips() {
        for s in ["0s", "90ms", "1m30s", "2d", "1h5m"] {
            let d = parse_duration(s).unwrap();
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    }
}
