//! Models of the outside world for a simulation: boot times, build durations, interruptions,
//! and the seeded randomness that draws from them.

use std::time::Duration;

use globset::{Glob, GlobMatcher};

use crate::config::parse_duration;

/// A duration, fixed (`30s`) or drawn uniformly from a range (`25s..40s`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    /// Shortest.
    pub lo: Duration,
    /// Longest (equal to `lo` when fixed).
    pub hi: Duration,
}

impl Span {
    /// Always `d`.
    pub fn fixed(d: Duration) -> Span {
        Span { lo: d, hi: d }
    }

    /// Parses `30s` or `25s..40s` in the config's duration syntax.
    pub fn parse(s: &str) -> Result<Span, String> {
        let (lo, hi) = match s.split_once("..") {
            Some((a, b)) => (parse_duration(a.trim())?, parse_duration(b.trim())?),
            None => {
                let d = parse_duration(s.trim())?;
                (d, d)
            }
        };
        if hi < lo {
            return Err(format!("{s:?}: the range ends before it starts"));
        }
        Ok(Span { lo, hi })
    }

    /// The draw for `key` under `seed`: the same key always gets the same duration, so two
    /// policies compared on one seed see the same builds and boots.
    pub fn sample(&self, seed: u64, key: &[u64]) -> Duration {
        self.draw(unit(seed, key))
    }

    fn draw(&self, u: f64) -> Duration {
        if self.hi == self.lo {
            return self.lo;
        }
        let span = (self.hi - self.lo).as_millis() as f64;
        self.lo + Duration::from_millis((u * span).round() as u64)
    }
}

/// Where a duration is drawn from: a range, or what the installation recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Draw {
    /// Uniformly from a range.
    Range(Span),
    /// One of these, each as likely (the store's history); never empty.
    Observed(Vec<Duration>),
}

impl Draw {
    /// The draw for `key` under `seed` (see [`Span::sample`]).
    pub fn sample(&self, seed: u64, key: &[u64]) -> Duration {
        match self {
            Draw::Range(s) => s.sample(seed, key),
            Draw::Observed(v) => {
                let i = (unit(seed, key) * v.len() as f64) as usize;
                v.get(i.min(v.len().saturating_sub(1))).copied().unwrap_or_default()
            }
        }
    }
}

/// How long the builds of the builders matching a glob take.
#[derive(Debug, Clone)]
pub struct DurationRule {
    /// The glob as given.
    pub glob: String,
    matcher: GlobMatcher,
    /// Its durations.
    pub span: Span,
}

/// Everything a simulation assumes about the world.
#[derive(Debug, Clone)]
pub struct Model {
    /// Launch to agent connected.
    pub boot: Draw,
    /// Per builder, the durations its builds took (`--durations-from-db`); before the rules.
    pub observed: std::collections::HashMap<String, Vec<Duration>>,
    /// Per builder glob, first match wins.
    pub durations: Vec<DurationRule>,
    /// For builders no rule matches.
    pub default_duration: Span,
    /// Probability that a build attempt is cut short by a spot interruption (at a uniformly
    /// drawn point of its run).
    pub interruptions: f64,
    /// Seed of every draw.
    pub seed: u64,
}

impl Default for Model {
    fn default() -> Model {
        Model {
            boot: Draw::Range(Span::fixed(Duration::from_secs(30))),
            observed: Default::default(),
            durations: Vec::new(),
            default_duration: Span::fixed(Duration::from_secs(300)),
            interruptions: 0.0,
            seed: 1,
        }
    }
}

impl Model {
    /// Adds `GLOB=SPAN` (`'py*=6m..9m'`), or a bare SPAN for the builders no glob matches.
    pub fn add_duration(&mut self, rule: &str) -> Result<(), String> {
        let Some((glob, span)) = rule.split_once('=') else {
            self.default_duration = Span::parse(rule)?;
            return Ok(());
        };
        let matcher = Glob::new(glob.trim()).map_err(|e| format!("{glob:?}: {e}"))?.compile_matcher();
        self.durations.push(DurationRule { glob: glob.trim().to_string(), matcher, span: Span::parse(span)? });
        Ok(())
    }

    /// A duration for attempt `key` of one of `builder`'s builds.
    pub fn build_duration(&self, builder: &str, key: &[u64]) -> Duration {
        match self.observed.get(builder) {
            Some(v) if !v.is_empty() => Draw::Observed(v.clone()).sample(self.seed, key),
            _ => self.duration_for(builder).sample(self.seed, key),
        }
    }

    /// The durations of `builder`'s builds by the rules (history aside).
    pub fn duration_for(&self, builder: &str) -> Span {
        self.durations.iter().find(|r| r.matcher.is_match(builder)).map(|r| r.span).unwrap_or(self.default_duration)
    }
}

/// A number in [0, 1) determined by `seed` and `key` alone (SplitMix64 over the key).
pub fn unit(seed: u64, key: &[u64]) -> f64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for &k in key {
        h = mix(h ^ k);
    }
    (mix(h) >> 11) as f64 / (1u64 << 53) as f64
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_and_draw_inside_their_range() {
        assert_eq!(Span::parse("30s"), Ok(Span::fixed(Duration::from_secs(30))));
        let s = Span::parse("25s..40s").expect("range");
        for k in 0..1000 {
            let d = s.sample(7, &[k]);
            assert!(d >= Duration::from_secs(25) && d <= Duration::from_secs(40), "{d:?}");
        }
        assert_eq!(s.sample(7, &[3]), s.sample(7, &[3]), "the same key draws the same");
        assert!(Span::parse("40s..25s").is_err());
        assert!(Span::parse("soon").is_err());
    }

    #[test]
    fn the_first_matching_duration_rule_wins() {
        let mut m = Model::default();
        m.add_duration("py*=6m..9m").expect("rule");
        m.add_duration("docs=1m").expect("rule");
        m.add_duration("2m").expect("default");
        assert_eq!(m.duration_for("py3.12").lo, Duration::from_secs(360));
        assert_eq!(m.duration_for("docs").hi, Duration::from_secs(60));
        assert_eq!(m.duration_for("lint"), Span::fixed(Duration::from_secs(120)));
    }

    #[test]
    fn observed_durations_are_drawn_from_what_was_recorded() {
        let mut m = Model::default();
        let seen = vec![Duration::from_secs(3), Duration::from_secs(5)];
        m.observed.insert("b".into(), seen.clone());
        let drawn: std::collections::BTreeSet<Duration> = (0..100).map(|k| m.build_duration("b", &[k])).collect();
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), seen);
        assert_eq!(m.build_duration("other", &[1]), Duration::from_secs(300), "no history: the rules");
    }

    #[test]
    fn draws_are_uniform_enough() {
        let n = 10_000;
        let mean: f64 = (0..n).map(|k| unit(1, &[k])).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
