//! On-demand EC2 and EBS list prices: the table shipped with Paddock, or one in the same format.
//!
//! The shipped table (`prices.toml`, next to this file) says in its own header where the figures
//! come from, when they were taken and how to refresh them.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;
use toml::Spanned;

/// Hours in a billing month for prorating GB-month prices (AWS uses 730).
pub const HOURS_PER_MONTH: f64 = 730.0;

/// On-demand and volume prices, from the shipped table or a file.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    source: String,
    date: String,
    currency: String,
    /// Region -> instance type -> USD per hour.
    on_demand: BTreeMap<String, BTreeMap<String, f64>>,
    /// Region -> volume type -> USD per GB-month.
    ebs: BTreeMap<String, BTreeMap<String, f64>>,
}

/// Why a price table could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PriceTableError {
    /// The text is not TOML, or not of the table's shape (an unknown top-level key, a price that
    /// is not a number, ...).
    #[error("price table{}: {message}", at_line(*.line))]
    Malformed {
        /// 1-based line toml pointed at, when it did.
        line: Option<usize>,
        /// What toml said is wrong.
        message: String,
    },
    /// A required top-level key is absent.
    #[error("price table: `{key}` is missing")]
    Missing {
        /// The absent key.
        key: &'static str,
    },
    /// A key is present but its value is unusable.
    #[error("price table: `{key}` (line {line}): {problem}")]
    Invalid {
        /// Dotted path of the offending key, e.g. `on_demand.us-east-1."t3.micro"`.
        key: String,
        /// 1-based line of the value.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

/// The file as written: every value keeps its span so errors can name the line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    source: Option<Spanned<String>>,
    date: Option<Spanned<String>>,
    currency: Option<Spanned<String>>,
    #[serde(default)]
    on_demand: BTreeMap<String, BTreeMap<String, Spanned<f64>>>,
    #[serde(default)]
    ebs: BTreeMap<String, BTreeMap<String, Spanned<f64>>>,
}

impl PriceTable {
    /// The table shipped with Paddock (`include_str!("prices.toml")`), parsed once (std::sync::OnceLock).
    pub fn builtin() -> &'static PriceTable {
        static BUILTIN: OnceLock<PriceTable> = OnceLock::new();
        // The shipped text is fixed at build time and a unit test parses it, so failing here
        // would be a packaging bug, not a runtime condition to recover from.
        BUILTIN.get_or_init(|| {
            PriceTable::parse(include_str!("prices.toml")).expect("the shipped prices.toml is a valid price table")
        })
    }

    /// Parses a table in the shipped format; rejects negative/non-finite prices, missing source/date, unknown top-level keys.
    pub fn parse(text: &str) -> Result<PriceTable, PriceTableError> {
        let raw: RawTable = toml::from_str(text).map_err(|e| PriceTableError::Malformed {
            line: e.span().map(|s| line_of(text, s.start)),
            message: e.message().trim().to_string(),
        })?;

        let source = required_text(text, raw.source, "source")?;
        let date = required_text(text, raw.date, "date")?;
        check_date(text, &date)?;
        let currency = match raw.currency {
            // AWS publishes list prices in US dollars, so a table that does not say is in them.
            None => "USD".to_string(),
            Some(c) => required_text(text, Some(c), "currency")?.into_inner(),
        };

        Ok(PriceTable {
            source: source.into_inner(),
            date: date.into_inner(),
            currency,
            on_demand: prices(text, "on_demand", raw.on_demand)?,
            ebs: prices(text, "ebs", raw.ebs)?,
        })
    }

    /// USD per hour for `instance_type` on demand in `region`.
    pub fn on_demand(&self, region: &str, instance_type: &str) -> Option<f64> {
        self.on_demand.get(region)?.get(instance_type).copied()
    }

    /// USD per GB-month for a volume type in `region`.
    pub fn volume_gb_month(&self, region: &str, volume_type: &str) -> Option<f64> {
        self.ebs.get(region)?.get(volume_type).copied()
    }

    /// Where the figures come from, as the table states it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// When the figures were taken (`YYYY-MM-DD`).
    pub fn date(&self) -> &str {
        &self.date
    }

    /// The currency every figure is in.
    pub fn currency(&self) -> &str {
        &self.currency
    }
}

/// The region of an availability zone (`us-east-1a` -> `us-east-1`; local zones like `us-east-1-bos-1a` -> `us-east-1`; already a region -> itself).
pub fn region_of_zone(zone: &str) -> &str {
    // A region name ends at its first dash-separated part that starts with a digit (`us-east-1`,
    // `us-gov-west-1`); an AZ appends a letter to that part, local and Wavelength zones append
    // more parts. Anything without such a part (a zone ID like `use1-az1`) is returned as is.
    let mut start = 0;
    for (index, part) in zone.split('-').enumerate() {
        let digits = part.bytes().take_while(u8::is_ascii_digit).count();
        if index >= 2 && digits > 0 {
            return &zone[..start + digits];
        }
        start += part.len() + 1;
    }
    zone
}

fn required_text(
    text: &str,
    value: Option<Spanned<String>>,
    key: &'static str,
) -> Result<Spanned<String>, PriceTableError> {
    let value = value.ok_or(PriceTableError::Missing { key })?;
    if value.get_ref().trim().is_empty() {
        return Err(invalid(text, key.to_string(), value.span().start, "must not be empty"));
    }
    Ok(value)
}

fn check_date(text: &str, date: &Spanned<String>) -> Result<(), PriceTableError> {
    // Reports show the date next to every cost, so it has to be a real day, not free text.
    match chrono::NaiveDate::parse_from_str(date.get_ref(), "%Y-%m-%d") {
        Ok(_) => Ok(()),
        Err(_) => Err(invalid(
            text,
            "date".to_string(),
            date.span().start,
            format!("\"{}\" is not a YYYY-MM-DD date", date.get_ref()),
        )),
    }
}

fn prices(
    text: &str,
    section: &str,
    raw: BTreeMap<String, BTreeMap<String, Spanned<f64>>>,
) -> Result<BTreeMap<String, BTreeMap<String, f64>>, PriceTableError> {
    let mut out = BTreeMap::new();
    for (region, entries) in raw {
        let mut table = BTreeMap::new();
        for (name, price) in entries {
            let value = *price.get_ref();
            let problem = if !value.is_finite() {
                Some(format!("price {value} is not a finite number"))
            } else if value < 0.0 {
                Some(format!("price {value} is negative"))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(invalid(text, key_path(&[section, &region, &name]), price.span().start, problem));
            }
            table.insert(name, value);
        }
        out.insert(region, table);
    }
    Ok(out)
}

fn invalid(text: &str, key: String, at: usize, problem: impl Into<String>) -> PriceTableError {
    PriceTableError::Invalid { key, line: line_of(text, at), problem: problem.into() }
}

/// Dotted TOML key path, quoting the parts that are not bare keys (instance types contain dots).
fn key_path(parts: &[&str]) -> String {
    let bare = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    parts.iter().map(|p| if bare(p) { (*p).to_string() } else { format!("\"{p}\"") }).collect::<Vec<_>>().join(".")
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGIONS: [&str; 8] = [
        "us-east-1",
        "us-east-2",
        "us-west-2",
        "eu-west-1",
        "eu-central-1",
        "eu-west-2",
        "ap-southeast-1",
        "ap-northeast-1",
    ];

    /// Every family shipped, with the sizes it comes in up to 4xlarge.
    const FAMILIES: [(&str, &[&str]); 18] = [
        ("t3", &["nano", "micro", "small", "medium", "large", "xlarge", "2xlarge"]),
        ("t3a", &["nano", "micro", "small", "medium", "large", "xlarge", "2xlarge"]),
        ("t4g", &["nano", "micro", "small", "medium", "large", "xlarge", "2xlarge"]),
        ("m5", &["large", "xlarge", "2xlarge", "4xlarge"]),
        ("m6i", &["large", "xlarge", "2xlarge", "4xlarge"]),
        ("m6a", &["large", "xlarge", "2xlarge", "4xlarge"]),
        ("m6g", &["medium", "large", "xlarge", "2xlarge", "4xlarge"]),
        ("m7i", &["large", "xlarge", "2xlarge", "4xlarge"]),
        ("m7g", &["medium", "large", "xlarge", "2xlarge", "4xlarge"]),
        ("c5", &["large", "xlarge", "2xlarge", "4xlarge"]),
        ("c6i", &["large", "xlarge", "2xlarge", "4xlarge"]),
        ("c6a", &["large", "xlarge", "2xlarge", "4xlarge"]),
        ("c6g", &["medium", "large", "xlarge", "2xlarge", "4xlarge"]),
        ("c7i", &["large", "xlarge", "2xlarge", "4xlarge"]),
        ("c7g", &["medium", "large", "xlarge", "2xlarge", "4xlarge"]),
        ("r5", &["large", "xlarge", "2xlarge", "4xlarge"]),
        ("r6i", &["large", "xlarge", "2xlarge", "4xlarge"]),
        ("r6g", &["medium", "large", "xlarge", "2xlarge", "4xlarge"]),
    ];

    const VOLUME_TYPES: [&str; 7] = ["gp3", "gp2", "io1", "io2", "st1", "sc1", "standard"];

    const MINIMAL: &str = "source = \"test\"\ndate = \"2024-01-02\"\n";

    #[test]
    fn builtin_table_parses_and_says_where_it_is_from() {
        let t = PriceTable::builtin();
        assert!(!t.source().is_empty());
        assert!(chrono::NaiveDate::parse_from_str(t.date(), "%Y-%m-%d").is_ok(), "{}", t.date());
        assert_eq!(t.currency(), "USD");
        assert!(std::ptr::eq(t, PriceTable::builtin()), "parsed once");
    }

    #[test]
    fn builtin_table_covers_every_region_family_and_volume_type() {
        let t = PriceTable::builtin();
        for region in REGIONS {
            for (family, sizes) in FAMILIES {
                for size in sizes {
                    let ty = format!("{family}.{size}");
                    let p = t.on_demand(region, &ty).unwrap_or_else(|| panic!("{region} has no {ty}"));
                    assert!(p > 0.0, "{region} {ty} = {p}");
                }
            }
            for v in VOLUME_TYPES {
                let p = t.volume_gb_month(region, v).unwrap_or_else(|| panic!("{region} has no {v}"));
                assert!(p > 0.0, "{region} {v} = {p}");
            }
            for ty in ["t3.micro", "m5.large", "c5.large"] {
                assert!(t.on_demand(region, ty).is_some(), "{region} {ty}");
            }
        }
    }

    #[test]
    fn builtin_sizes_double_within_a_family() {
        // Catches a transcription slip: each size step up costs twice the one below (AWS rounds
        // regional figures to four decimals, hence the tolerance).
        let t = PriceTable::builtin();
        for region in REGIONS {
            for (family, sizes) in FAMILIES {
                for pair in sizes.windows(2) {
                    let small = t.on_demand(region, &format!("{family}.{}", pair[0])).unwrap();
                    let big = t.on_demand(region, &format!("{family}.{}", pair[1])).unwrap();
                    let ratio = big / small;
                    assert!((1.97..2.03).contains(&ratio), "{region} {family} {pair:?}: {small} -> {big}");
                }
            }
        }
    }

    #[test]
    fn builtin_anchor_prices_in_us_east_1() {
        let t = PriceTable::builtin();
        let r = "us-east-1";
        for (ty, want) in [
            ("t3.micro", 0.0104),
            ("t3.small", 0.0208),
            ("t3.medium", 0.0416),
            ("t3a.micro", 0.0094),
            ("t4g.micro", 0.0084),
            ("m5.large", 0.096),
            ("c5.large", 0.085),
            ("r5.large", 0.126),
        ] {
            assert_eq!(t.on_demand(r, ty), Some(want), "{ty}");
        }
        assert_eq!(t.volume_gb_month(r, "gp3"), Some(0.08));
        assert_eq!(t.volume_gb_month(r, "gp2"), Some(0.10));
    }

    #[test]
    fn unknown_type_or_region_is_none() {
        let t = PriceTable::builtin();
        assert_eq!(t.on_demand("us-east-1", "x9z.huge"), None);
        assert_eq!(t.on_demand("mars-north-1", "t3.micro"), None);
        assert_eq!(t.volume_gb_month("us-east-1", "floppy"), None);
        assert_eq!(t.volume_gb_month("mars-north-1", "gp3"), None);
    }

    #[test]
    fn parses_a_minimal_table() {
        let text = format!("{MINIMAL}[on_demand.eu-west-1]\n\"t3.micro\" = 0.0114\n[ebs.eu-west-1]\ngp3 = 0\n");
        let t = PriceTable::parse(&text).unwrap();
        assert_eq!(t.source(), "test");
        assert_eq!(t.date(), "2024-01-02");
        assert_eq!(t.currency(), "USD", "currency defaults to USD");
        assert_eq!(t.on_demand("eu-west-1", "t3.micro"), Some(0.0114));
        assert_eq!(t.volume_gb_month("eu-west-1", "gp3"), Some(0.0), "an integer price reads as a number");
    }

    #[test]
    fn negative_price_names_the_key_and_line() {
        let text = format!("{MINIMAL}currency = \"USD\"\n\n[on_demand.us-east-1]\n\"t3.micro\" = -0.01\n");
        let err = PriceTable::parse(&text).unwrap_err();
        assert_eq!(
            err,
            PriceTableError::Invalid {
                key: "on_demand.us-east-1.\"t3.micro\"".to_string(),
                line: 6,
                problem: "price -0.01 is negative".to_string(),
            }
        );
        assert!(err.to_string().contains("on_demand.us-east-1.\"t3.micro\""), "{err}");
    }

    #[test]
    fn non_finite_prices_are_rejected() {
        for bad in ["nan", "inf", "-inf"] {
            let text = format!("{MINIMAL}[ebs.us-east-1]\ngp3 = {bad}\n");
            match PriceTable::parse(&text) {
                Err(PriceTableError::Invalid { key, line: 4, .. }) => assert_eq!(key, "ebs.us-east-1.gp3"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_date_or_source_names_the_key() {
        let err = PriceTable::parse("source = \"x\"\n").unwrap_err();
        assert_eq!(err, PriceTableError::Missing { key: "date" });
        assert!(err.to_string().contains("`date`"), "{err}");
        let err = PriceTable::parse("date = \"2024-01-02\"\n").unwrap_err();
        assert_eq!(err, PriceTableError::Missing { key: "source" });
    }

    #[test]
    fn empty_source_and_bad_date_are_rejected() {
        let err = PriceTable::parse("source = \" \"\ndate = \"2024-01-02\"\n").unwrap_err();
        assert!(matches!(err, PriceTableError::Invalid { ref key, line: 1, .. } if key == "source"), "{err:?}");
        let err = PriceTable::parse("source = \"x\"\ndate = \"last week\"\n").unwrap_err();
        assert!(matches!(err, PriceTableError::Invalid { ref key, line: 2, .. } if key == "date"), "{err:?}");
    }

    #[test]
    fn unknown_top_level_key_and_bad_toml_are_rejected_with_a_line() {
        let err = PriceTable::parse(&format!("{MINIMAL}spot = 1\n")).unwrap_err();
        match &err {
            PriceTableError::Malformed { line, message } => {
                assert_eq!(*line, Some(3), "{err}");
                assert!(message.contains("spot"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let err =
            PriceTable::parse(&format!("{MINIMAL}[on_demand.us-east-1]\n\"t3.micro\" = \"cheap\"\n")).unwrap_err();
        assert!(matches!(err, PriceTableError::Malformed { line: Some(4), .. }), "{err:?}");
        let err = PriceTable::parse("source = \"x\"\ndate = \n").unwrap_err();
        assert!(matches!(err, PriceTableError::Malformed { line: Some(2), .. }), "{err:?}");
    }

    #[test]
    fn region_of_zone_cases() {
        for (zone, region) in [
            ("us-east-1a", "us-east-1"),
            ("eu-central-1c", "eu-central-1"),
            ("ap-southeast-1b", "ap-southeast-1"),
            ("us-gov-west-1a", "us-gov-west-1"),
            ("us-east-1-bos-1a", "us-east-1"),
            ("us-west-2-lax-1b", "us-west-2"),
            ("us-east-1-wl1-bos-wlz-1", "us-east-1"),
            ("us-east-1", "us-east-1"),
            ("eu-west-2", "eu-west-2"),
            ("use1-az1", "use1-az1"),
            ("", ""),
        ] {
            assert_eq!(region_of_zone(zone), region, "{zone}");
        }
    }
}
