//! `paddock cost` and `GET /api/cost` as an admin uses them: a real master runs real builds on
//! local machines with a nominal price, then the report is asked for as a table, CSV and JSON
//! (all three must carry the same numbers), and bad options get clear errors.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{paddock_bin, Bed};
use paddock::cost::report::Report;

/// $36/h = $0.01 per machine-second.
const CONFIG: &str = "[pool.local]\nhourly_price = 36.0\nidle_timeout = \"1s\"\nmax_instances = 2\n\n\
[[builder]]\nname = \"unit\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"sleep 1\"]\n\n\
[[builder]]\nname = \"lint\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"true\"]\n\n\
[[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"unit\", \"lint\"]\n";

fn paddock(args: &[&str]) -> (i32, String, String) {
    paddock_as("", args)
}

/// `paddock ARGS` with an API token in `PADDOCK_TOKEN` (empty: none).
fn paddock_as(token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(paddock_bin()).args(args).env("PADDOCK_TOKEN", token).output().expect("run paddock");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The numbers of one report row, as printed.
#[derive(Debug, Clone, PartialEq)]
struct Nums {
    cost: f64,
    busy: f64,
    idle: f64,
    boot: f64,
    builds: u64,
    seconds: f64,
}

fn num(s: &str) -> f64 {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

/// Rows of the table under its `BY …` header, until the blank line.
fn parse_table(text: &str) -> BTreeMap<String, Nums> {
    let mut rows = BTreeMap::new();
    let mut lines = text.lines().skip_while(|l| !l.starts_with("BY ")).skip(1);
    for line in lines.by_ref().take_while(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 9, "table row with too few columns: {line:?}");
        rows.insert(
            f[0].to_string(),
            Nums {
                cost: num(f[1]),
                busy: num(f[2]),
                idle: num(f[3]),
                boot: num(f[4]),
                builds: f[6].parse().expect("builds"),
                seconds: num(f[8]),
            },
        );
    }
    assert!(!rows.is_empty(), "no rows under the table's BY header:\n{text}");
    rows
}

fn parse_csv(text: &str) -> BTreeMap<String, Nums> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no column {name}"));
    let mut rows = BTreeMap::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), header.len(), "{line:?}");
        rows.insert(
            f[col("key")].to_string(),
            Nums {
                cost: num(f[col("cost")]),
                busy: num(f[col("busy_cost")]),
                idle: num(f[col("idle_cost")]),
                boot: num(f[col("boot_cost")]),
                builds: f[col("builds")].parse().expect("builds"),
                seconds: num(f[col("billed_seconds")]),
            },
        );
    }
    rows
}

fn from_json(r: &Report) -> BTreeMap<String, Nums> {
    r.rows
        .iter()
        .chain(std::iter::once(&r.totals))
        .map(|x| {
            let n = Nums {
                cost: x.cost,
                busy: x.busy_cost,
                idle: x.idle_cost,
                boot: x.boot_cost,
                builds: x.builds,
                seconds: x.billed_seconds,
            };
            (x.key.clone(), n)
        })
        .collect()
}

#[test]
fn the_table_csv_and_json_carry_the_same_numbers() {
    let mut bed = Bed::new(&[]);
    bed.config("", CONFIG);
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "one\n", "first change");
    let builds = bed.wait_builds_done(2);
    assert!(builds.iter().all(|b| b["state"] == "success"), "{builds:?}");
    bed.wait("every machine stopped", || {
        let m = bed.machines();
        (!m.is_empty() && m.iter().all(|m| m["state"] == "gone")).then_some(())
    });

    let url = bed.url();
    let ask = |format: &str| {
        let (code, out, err) = paddock_as(
            bed.token(),
            &["cost", "--master", &url, "--since", "1d", "--by", "builder", "--format", format],
        );
        assert_eq!(code, 0, "paddock cost --format {format}: {err}");
        out
    };
    let json: Report = serde_json::from_str(&ask("json")).expect("the JSON parses as a report");
    let csv = parse_csv(&ask("csv"));
    let table_text = ask("table");
    let table = parse_table(&table_text);
    let json_rows = from_json(&json);
    assert_eq!(table, csv, "table and CSV differ:\n{table_text}");
    assert_eq!(csv, json_rows, "CSV and JSON differ");

    // And the numbers are the right ones: every machine-second at $0.01, busy time per
    // builder, one build each, nothing unknown.
    let total = &json.totals;
    assert!(total.billed_seconds > 0.0);
    assert!((total.cost - total.billed_seconds * 0.01).abs() < 0.0001, "{total:?}");
    assert_eq!(total.builds, 2);
    assert_eq!((table["unit"].builds, table["lint"].builds), (1, 1));
    assert!(table["unit"].busy >= 0.01, "unit sleeps a second: {:?}", table["unit"]);
    let sum: f64 = json.rows.iter().map(|r| r.cost).sum();
    assert!((sum - total.cost).abs() < 0.0005, "rows add up to the total");
    assert_eq!(json.machines as usize, bed.machines().len());
    assert_eq!(json.unknown_price.machines, 0);
    assert!(json.running.is_empty());
    assert!(table_text.contains("Top builders by cost"), "{table_text}");
    assert!(table_text.contains("Idle waste"), "{table_text}");

    // The API serves the same report, and CSV as text/csv.
    let api: Report =
        bed.http.get(format!("{url}/api/cost?since=1d&by=builder")).send().expect("GET").json().expect("json");
    assert_eq!(from_json(&api), json_rows);
    let resp = bed.http.get(format!("{url}/api/cost?since=1d&format=csv")).send().expect("GET");
    assert_eq!(resp.headers()["content-type"], "text/csv; charset=utf-8");
    assert!(resp.text().expect("body").starts_with("key,label,cost,"));

    // Bad options: a clear 400 from the API, naming the option.
    for (query, expect) in [
        ("since=yesterday-ish", "--since: cannot read \"yesterday-ish\""),
        ("by=team", "--by: unknown grouping \"team\""),
        ("format=xml", "--format: unknown format \"xml\""),
        ("since=1h&until=2h", "must be before --until"),
        ("colour=red", "unknown field `colour`"),
    ] {
        let resp = bed.http.get(format!("{url}/api/cost?{query}")).send().expect("GET");
        assert_eq!(resp.status().as_u16(), 400, "{query}");
        let body = resp.text().expect("body");
        let reason = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(body);
        assert!(reason.contains(expect), "{query}: {reason}");
    }
}

#[test]
fn bad_options_are_refused_before_asking_the_master() {
    // No master is running at this address: the options are checked first.
    let master = "http://127.0.0.1:9";
    for (args, expect) in [
        (vec!["--since", "yesterday-ish"], "--since: cannot read \"yesterday-ish\"; expected a duration back from now"),
        (
            vec!["--by", "team"],
            "--by: unknown grouping \"team\"; expected one of pool, builder, branch, committer, day, machine",
        ),
        (vec!["--until", "2026-13-45"], "--until: cannot read \"2026-13-45\""),
        (vec!["--format", "yaml"], "--format: unknown format \"yaml\"; expected table, csv or json"),
    ] {
        let mut full = vec!["cost", "--master", master];
        full.extend(args.iter().copied());
        let (code, out, err) = paddock(&full);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("cannot reach the master"), "checked before any request: {err}");
    }
}
