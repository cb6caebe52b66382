//! Bad configurations must fail with a precise message and file:line:column; good ones must
//! parse, expand and resolve paths as documented.

use std::path::{Path, PathBuf};
use std::time::Duration;

use paddock::config::{self, Config, ConfigError, Isolation, ProvisionerKind, SchedulerKind};

/// A valid prefix (lines 1-6) that most bad configs extend, so line numbers stay predictable.
const BASE: &str = r#"[[repo]]
name = "app"
url = "https://example.com/app.git"

[pool.small]
max_instances = 2
"#;

/// A valid builder appended to BASE (lines 7-11).
const BUILDER: &str = r#"[[builder]]
name = "unit"
repo = "app"
pool = "small"
steps = ["make test"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    config::parse(text, Path::new("/etc/paddock/paddock.toml"))
}

#[track_caller]
fn assert_err(text: &str, line: usize, column: usize, needle: &str) -> ConfigError {
    let e = match parse(text) {
        Ok(_) => panic!("expected an error containing {needle:?}, config parsed fine:\n{text}"),
        Err(e) => e,
    };
    assert!(e.message.contains(needle), "message {:?} does not contain {needle:?}", e.message);
    assert_eq!((e.line, e.column), (line, column), "wrong position for: {e}\n--- config ---\n{text}");
    let shown = e.to_string();
    assert!(shown.starts_with(&format!("/etc/paddock/paddock.toml:{line}:{column}: error: ")), "{shown}");
    e
}

#[test]
fn syntax_error() {
    let e = assert_err("[master]\nurl = \"http://x:1\nlisten = 3\n", 2, 18, "invalid TOML");
    assert!(e.hint.is_some());
}

#[test]
fn unknown_top_level_key_suggests_section() {
    let e = assert_err("[[repos]]\nname = \"a\"\n", 1, 3, "unknown key `repos`");
    assert!(e.hint.unwrap().contains("did you mean `repo`?"));
}

#[test]
fn unknown_key_in_pool_points_at_key() {
    let text = format!("{BASE}instance_types = [\"t3.small\"]\n");
    let e = assert_err(&text, 7, 1, "unknown key `instance_types` in [pool.small]");
    assert!(e.hint.unwrap().contains("valid keys: provisioner, max_instances"));
}

#[test]
fn unknown_key_in_inline_step_points_at_key() {
    let text = format!(
        "{BASE}[[builder]]\nname = \"unit\"\nrepo = \"app\"\npool = \"small\"\nsteps = [{{ run = \"x\", timout = \"1m\" }}]\n"
    );
    let e = assert_err(&text, 11, 23, "unknown key `timout` in a step");
    assert!(e.hint.unwrap().contains("did you mean `timeout`?"));
}

#[test]
fn unknown_pool() {
    let text = format!("{BASE}[[builder]]\nname = \"unit\"\nrepo = \"app\"\npool = \"big\"\nsteps = [\"make\"]\n");
    let e = assert_err(&text, 10, 8, "unknown pool `big`");
    assert!(e.hint.unwrap().contains("defined pools: small"));
}

#[test]
fn unknown_repo_in_builder() {
    let text = format!("{BASE}[[builder]]\nname = \"unit\"\nrepo = \"ap\"\npool = \"small\"\nsteps = [\"make\"]\n");
    let e = assert_err(&text, 9, 8, "unknown repo `ap`");
    assert!(e.hint.unwrap().contains("did you mean `app`?"));
}

#[test]
fn unknown_repo_in_scheduler() {
    let text = format!("{BASE}{BUILDER}[[scheduler]]\nkind = \"branch\"\nrepo = \"other\"\nbuilders = [\"unit\"]\n");
    assert_err(&text, 14, 8, "unknown repo `other`");
}

#[test]
fn scheduler_pattern_matching_nothing() {
    let text =
        format!("{BASE}{BUILDER}[[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"unit\", \"py*\"]\n");
    let e = assert_err(&text, 15, 21, "builder pattern \"py*\" matches no builder");
    assert!(e.hint.unwrap().contains("builders: unit"));
}

#[test]
fn empty_matrix_axis() {
    let text = format!(
        "{BASE}[[builder]]\nname = \"t-{{db}}\"\nrepo = \"app\"\npool = \"small\"\nmatrix = {{ db = [] }}\nsteps = [\"make\"]\n"
    );
    assert_err(&text, 11, 17, "matrix axis `db` has no values");
}

#[test]
fn duplicate_builder_names_within_matrix() {
    let text = format!(
        "{BASE}[[builder]]\nname = \"py{{python}}\"\nrepo = \"app\"\npool = \"small\"\nmatrix = {{ python = [\"3.12\"], db = [\"a\", \"b\"] }}\nsteps = [\"make\"]\n"
    );
    let e = assert_err(&text, 8, 8, "duplicate builder name `py3.12`");
    assert!(e.message.contains("{python=3.12, db=a}"), "{}", e.message);
    assert!(e.message.contains("{python=3.12, db=b}"), "{}", e.message);
}

#[test]
fn duplicate_builder_names_across_builders() {
    let text = format!("{BASE}{BUILDER}{BUILDER}");
    let e = assert_err(&text, 13, 8, "duplicate builder name `unit`");
    assert!(e.message.contains("line 8"), "{}", e.message);
}

#[test]
fn bad_durations() {
    let text = format!("{BASE}idle_timeout = \"10 minutes\"\n");
    let e = assert_err(&text, 7, 16, "`idle_timeout`: invalid duration \"10 minutes\"");
    assert!(e.hint.unwrap().contains("ms, s, m, h, d"));
    let text = "[[repo]]\nname = \"a\"\nurl = \"x\"\npoll = \"abc\"\n".to_string();
    assert_err(&text, 4, 8, "invalid duration \"abc\"");
    let text = format!("{BASE}boot_timeout = 90\n");
    assert_err(&text, 7, 16, "`boot_timeout` must be a string, not an integer");
}

#[test]
fn bad_cron() {
    let text = format!(
        "{BASE}{BUILDER}[[scheduler]]\nkind = \"nightly\"\nrepo = \"app\"\ncron = \"0 25 * * *\"\nbuilders = [\"unit\"]\n"
    );
    assert_err(&text, 15, 8, "invalid cron \"0 25 * * *\"");
    let text = format!(
        "{BASE}{BUILDER}[[scheduler]]\nkind = \"nightly\"\nrepo = \"app\"\ncron = \"0 0 3 * * *\"\nbuilders = [\"unit\"]\n"
    );
    assert_err(&text, 15, 8, "expected 5 fields, found 6");
}

#[test]
fn missing_required_keys() {
    let e =
        assert_err("[[repo]]\nname = \"a\"\n\n[[repo]]\nurl = \"x\"\n", 1, 1, "missing required key `url` in [[repo]]");
    assert!(e.hint.unwrap().contains("url = "));
    let text =
        format!("{BASE}[[builder]]\nname = \"unit\"\nrepo = \"app\"\npool = \"small\"\nsteps = [{{ name = \"x\" }}]\n");
    assert_err(&text, 11, 10, "missing required key `run` in a step");
}

#[test]
fn min_idle_above_max_instances() {
    let text = format!("{BASE}min_idle = 3\n");
    assert_err(&text, 7, 12, "`min_idle` (3) is greater than `max_instances` (2)");
}

#[test]
fn zero_max_instances() {
    let text = "[pool.small]\nmax_instances = 0\n";
    assert_err(text, 2, 17, "`max_instances` must be at least 1");
}

#[test]
fn unknown_placeholder_points_inside_string() {
    let text = format!(
        "{BASE}[[builder]]\nname = \"py{{python}}\"\nrepo = \"app\"\npool = \"small\"\nmatrix = {{ python = [\"3.12\"] }}\nsteps = [\"python{{pyhton}} -m pytest\"]\n"
    );
    let e = assert_err(&text, 12, 17, "unknown placeholder `{pyhton}`");
    assert!(e.hint.unwrap().contains("did you mean `{python}`?"));
}

#[test]
fn wrong_type() {
    let text = "[pool.small]\nmax_instances = \"4\"\n";
    assert_err(text, 2, 17, "`max_instances` must be an integer, not a string");
    let text = "[[repo]]\nname = 7\nurl = \"x\"\n";
    assert_err(text, 2, 8, "`name` must be a string, not an integer");
}

#[test]
fn no_steps() {
    let text = format!("{BASE}[[builder]]\nname = \"unit\"\nrepo = \"app\"\npool = \"small\"\nsteps = []\n");
    assert_err(&text, 11, 9, "builder `unit` has no steps");
    let text = format!("{BASE}[[builder]]\nname = \"unit\"\nrepo = \"app\"\npool = \"small\"\n");
    assert_err(&text, 7, 1, "builder `unit` has no steps");
}

#[test]
fn duplicate_repo_names() {
    let text = format!("{BASE}[[repo]]\nname = \"app\"\nurl = \"./other\"\n");
    let e = assert_err(&text, 8, 8, "duplicate repo name `app`");
    assert!(e.hint.unwrap().contains("line 2"));
}

#[test]
fn bad_glob() {
    let text = format!(
        "{BASE}[[builder]]\nname = \"unit\"\nrepo = \"app\"\npool = \"small\"\nbranches = [\"main\", \"release/[\"]\nsteps = [\"make\"]\n"
    );
    assert_err(&text, 11, 21, "invalid glob \"release/[\"");
}

#[test]
fn unknown_scheduler_kind() {
    let text = format!("{BASE}{BUILDER}[[scheduler]]\nkind = \"weekly\"\nrepo = \"app\"\nbuilders = [\"unit\"]\n");
    let e = assert_err(&text, 13, 8, "unknown scheduler kind \"weekly\"");
    assert!(e.hint.unwrap().contains("branch, nightly"));
}

#[test]
fn key_of_the_other_scheduler_kind() {
    let text = format!(
        "{BASE}{BUILDER}[[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\ncron = \"0 3 * * *\"\nbuilders = [\"unit\"]\n"
    );
    let e = assert_err(&text, 15, 1, "`cron` is not valid for a branch scheduler");
    assert!(e.hint.unwrap().contains("kind = \"nightly\""));
}

#[test]
fn unknown_provisioner() {
    let text = "[pool.big]\nprovisioner = \"gce\"\n";
    let e = assert_err(text, 2, 15, "unknown provisioner \"gce\"");
    assert!(e.hint.unwrap().contains("local, ec2"));
}

#[test]
fn ec2_pool_needs_an_image() {
    let text = "[pool.big]\nprovisioner = \"ec2\"\ninstance_types = [\"t3.small\"]\n";
    let e = assert_err(text, 1, 1, "[pool.big] needs `ami` or `launch_template`");
    assert!(e.hint.unwrap().contains("stock Linux AMI"));
}

#[test]
fn ec2_pool_needs_instance_types_without_a_template() {
    let text = "[pool.big]\nprovisioner = \"ec2\"\nami = \"ami-1\"\n";
    assert_err(text, 1, 1, "[pool.big] needs `instance_types`");
}

#[test]
fn ec2_key_typo_gets_a_did_you_mean() {
    let text = "[pool.big]\nprovisioner = \"ec2\"\nami = \"ami-1\"\ninstance_type = [\"t3.small\"]\n";
    let e = assert_err(text, 4, 1, "unknown key `instance_type` in [pool.big]");
    assert!(e.hint.unwrap().contains("did you mean `instance_types`"));
}

#[test]
fn ec2_keys_are_refused_on_a_local_pool() {
    let text = "[pool.big]\nami = \"ami-1\"\n";
    assert_err(text, 2, 1, "unknown key `ami` in [pool.big]");
    let text = "[pool.big]\nprovisioner = \"ec2\"\nami = \"ami-1\"\ninstance_types = [\"t3.small\"]\nagent_command = \"/bin/x\"\n";
    assert_err(text, 5, 1, "unknown key `agent_command` in [pool.big]");
}

#[test]
fn isolation_and_run_as_of_a_local_pool() {
    let cfg = parse("[pool.p]\nrun_as = \"paddock-build\"\n[pool.q]\nisolation = \"none\"\n").unwrap();
    let (p, q) = (cfg.pool("p").unwrap(), cfg.pool("q").unwrap());
    assert_eq!((p.isolation, p.run_as.as_deref()), (Isolation::Sandbox, Some("paddock-build")));
    assert_eq!((q.isolation, q.run_as.as_deref()), (Isolation::None, None));

    let e =
        assert_err("[pool.p]\nisolation = \"bwrap\"\n", 2, 13, "`isolation` is \"sandbox\" or \"none\", not \"bwrap\"");
    assert!(e.hint.unwrap().contains("confines each machine with bubblewrap"));
    assert_err("[pool.p]\nisolation = true\n", 2, 13, "`isolation` must be a string");
    let e = assert_err("[pool.p]\nrun_as = \"root\"\n", 2, 10, "`run_as` must name an unprivileged user, not root");
    assert!(e.hint.unwrap().contains("useradd --system --no-create-home"));
    assert_err("[pool.p]\nrun_as = \"a b\"\n", 2, 10, "`run_as` must be a user name, not \"a b\"");
    assert_err("[pool.p]\nrun_as = \"\"\n", 2, 10, "`run_as` must be a user name");
    let e = assert_err(
        "[pool.p]\nisolation = \"none\"\nrun_as = \"paddock-build\"\n",
        3,
        10,
        "`run_as` needs the sandbox, but this pool says isolation = \"none\"",
    );
    assert!(e.hint.unwrap().contains("remove `run_as`"));
}

#[test]
fn isolation_and_run_as_are_refused_on_an_ec2_pool() {
    let pool = "[pool.big]\nprovisioner = \"ec2\"\nami = \"ami-1\"\ninstance_types = [\"t3.small\"]\n";
    let e = assert_err(&format!("{pool}run_as = \"u\"\n"), 5, 1, "`run_as` is only valid for provisioner = \"local\"");
    assert!(e.hint.unwrap().contains("VM of its own"));
    assert_err(&format!("{pool}isolation = \"none\"\n"), 5, 1, "`isolation` is only valid for provisioner = \"local\"");
}

#[test]
fn ec2_reserved_tag_and_bad_values() {
    let pool = "[pool.big]\nprovisioner = \"ec2\"\nami = \"ami-1\"\ninstance_types = [\"t3.small\"]\n";
    let e =
        assert_err(&format!("{pool}tags = {{ \"paddock:pool\" = \"x\" }}\n"), 5, 27, "tag `paddock:pool` is reserved");
    assert!(e.hint.unwrap().contains("Paddock's own"));
    assert_err(&format!("{pool}root_volume_size = 0\n"), 5, 20, "`root_volume_size` is in GiB");
    assert_err(&format!("{pool}endpoint_url = \"localhost:5000\"\n"), 5, 16, "`endpoint_url` must start with http://");
    assert_err(&format!("{pool}subnets = [\"\"]\n"), 5, 12, "`subnets` has an empty entry");
    assert_err(&format!("{pool}spot = \"yes\"\n"), 5, 8, "`spot` must be a boolean");
}

#[test]
fn ec2_pool_needs_a_named_cluster() {
    let text = "[[repo]]\nname = \"app\"\nurl = \"/r\"\n\n[pool.big]\nprovisioner = \"ec2\"\nami = \"ami-1\"\ninstance_types = [\"t3.small\"]\n";
    let e = assert_err(text, 6, 15, "an EC2 pool needs `cluster` in [master]");
    assert!(e.hint.unwrap().contains("terminate each other's machines"));
    assert!(parse(&format!("[master]\ncluster = \"ci\"\n{text}")).is_ok());
}

#[test]
fn bad_cluster_and_reconcile_interval() {
    let e = assert_err("[master]\ncluster = \"my cluster\"\n", 2, 11, "`cluster` must be 1 to 40 letters");
    assert!(e.hint.unwrap().contains("tags every cloud machine"));
    assert_err("[master]\nreconcile_interval = \"0s\"\n", 2, 22, "`reconcile_interval` must be more than 0s");
    assert_err("[master]\norphan_grace = \"0s\"\n", 2, 16, "`orphan_grace` must be at least 1s");
    let lt = "[pool.big]\nprovisioner = \"ec2\"\nlaunch_template = \"lt-1\"\nroot_volume_size = 20\n";
    let e = assert_err(lt, 4, 20, "`root_volume_size` with a launch template and no `ami` needs `root_device_name`");
    assert!(e.hint.unwrap().contains("/dev/sda1"));
}

#[test]
fn log_format_is_text_or_json() {
    let e =
        assert_err("[master]\nlog_format = \"yaml\"\n", 2, 14, "`log_format` must be one of text, json, not \"yaml\"");
    assert!(e.hint.unwrap().contains("--log-format"));
    assert_err("[master]\nlog_format = \"JSON\"\n", 2, 14, "`log_format` must be one of text, json");
    assert_err("[master]\nlog_format = 1\n", 2, 14, "log_format");
    let format = |text: &str| parse(&format!("{text}{BASE}")).expect("parses").master.log_format;
    assert_eq!(format("[master]\nlog_format = \"json\"\n"), paddock::logging::LogFormat::Json);
    assert_eq!(format("[master]\nlog_format = \"text\"\n"), paddock::logging::LogFormat::Text);
    assert_eq!(format(""), paddock::logging::LogFormat::Text);
}

#[test]
fn ec2_pool_parses_every_setting() {
    let text = r#"[master]
cluster = "prod"
reconcile_interval = "30s"
orphan_grace = "5m"

[[repo]]
name = "app"
url = "https://example.com/app.git"

[pool.small]
provisioner = "ec2"
region = "eu-west-1"
endpoint_url = "http://127.0.0.1:5000"
ami = "ami-0123"
launch_template = "lt-0abc"
launch_template_version = "3"
instance_types = ["t3.small", "t3a.small"]
subnets = ["subnet-a", "subnet-b"]
security_groups = ["sg-1"]
iam_instance_profile = "paddock-prod-worker"
root_volume_size = 20
root_volume_type = "gp3"
spot = true
tags = { team = "ci" }
key_name = "ops"
imds_url = "http://127.0.0.1:9999"
"#;
    let c = parse(text).expect("parses");
    assert_eq!(c.master.cluster, "prod");
    assert_eq!(c.master.reconcile_interval, std::time::Duration::from_secs(30));
    assert_eq!(c.master.orphan_grace, std::time::Duration::from_secs(300));
    let ProvisionerKind::Ec2(e) = &c.pools[0].provisioner else { panic!("not ec2: {:?}", c.pools[0].provisioner) };
    assert_eq!(e.region.as_deref(), Some("eu-west-1"));
    assert_eq!(e.instance_types, ["t3.small", "t3a.small"]);
    assert_eq!(e.subnets, ["subnet-a", "subnet-b"]);
    assert_eq!(e.root_volume_size, Some(20));
    assert!(e.spot);
    assert_eq!(e.tags.get("team").map(String::as_str), Some("ci"));
    assert_eq!(e.launch_template.as_deref(), Some("lt-0abc"));
    assert_eq!(e.imds_url.as_deref(), Some("http://127.0.0.1:9999"));
}

#[test]
fn scheduler_builder_of_another_repo() {
    let text = format!(
        "{BASE}{BUILDER}[[repo]]\nname = \"other\"\nurl = \"/srv/other\"\n[[scheduler]]\nkind = \"branch\"\nrepo = \"other\"\nbuilders = [\"unit\"]\n"
    );
    assert_err(&text, 18, 13, "builder `unit` builds repo `app`, but this scheduler watches repo `other`");
}

#[test]
fn first_error_in_file_order() {
    // Builder written before the bad pool: the builder's own error comes first in the file.
    let text = "[[builder]]\nname = \"x\"\nrepo = \"r\"\npool = \"p\"\nsteps = [\"make\"]\nbogus = 1\n\n[pool.p]\nmax_instances = 0\n";
    assert_err(text, 6, 1, "unknown key `bogus` in [[builder]]");
}

#[test]
fn single_bracket_section_for_array() {
    let e = assert_err("[repo]\nname = \"a\"\n", 1, 2, "`repo` must be an array of tables");
    assert!(e.hint.unwrap().contains("[[repo]]"));
}

#[test]
fn missing_file_is_a_config_error() {
    let e = config::load(Path::new("/nonexistent/paddock.toml")).unwrap_err();
    assert!(e.to_string().starts_with("/nonexistent/paddock.toml:1:1: error: cannot read"));
}

#[test]
fn hint_is_rendered_on_its_own_line() {
    let e = parse("[pool.big]\nprovisioner = \"gce\"\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "/etc/paddock/paddock.toml:2:15: error: unknown provisioner \"gce\"\n  hint: available provisioners: local, ec2"
    );
}

// ------------------------------------------------------------------------------------------
// good configurations

#[test]
fn matrix_2x2_expands_in_order() {
    let text = format!(
        r#"{BASE}[[builder]]
name = "py{{python}}-{{db}}"
repo = "app"
pool = "small"
matrix = {{ python = ["3.12", "3.13"], db = ["sqlite", "postgres"] }}
env = {{ DB = "{{db}}", TOKEN = "{{secret:TOKEN}}" }}
steps = [
  "python{{python}} -m pip install -e .",
  {{ name = "test {{db}}", run = "./runtests.py --settings=test_{{db}}", env = {{ PY = "{{python}}" }}, workdir = "tests/{{db}}", timeout = "20m", always = true }},
]
"#
    );
    let cfg = parse(&text).unwrap();
    let names: Vec<&str> = cfg.builders.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["py3.12-sqlite", "py3.12-postgres", "py3.13-sqlite", "py3.13-postgres"]);
    let b = cfg.builder("py3.13-postgres").unwrap();
    assert_eq!(b.cell["python"], "3.13");
    assert_eq!(b.cell["db"], "postgres");
    assert_eq!(b.env["DB"], "postgres");
    assert_eq!(b.env["TOKEN"], "{secret:TOKEN}");
    assert_eq!(b.steps[0].run, "python3.13 -m pip install -e .");
    assert_eq!(b.steps[0].name, "python3.13 -m pip install -e .");
    assert_eq!(b.steps[0].timeout, Duration::from_secs(3600));
    assert!(!b.steps[0].always);
    assert_eq!(b.steps[1].name, "test postgres");
    assert_eq!(b.steps[1].run, "./runtests.py --settings=test_postgres");
    assert_eq!(b.steps[1].env["PY"], "3.13");
    assert_eq!(b.steps[1].workdir.as_deref(), Some("tests/postgres"));
    assert_eq!(b.steps[1].timeout, Duration::from_secs(1200));
    assert!(b.steps[1].always);
}

#[test]
fn shell_braces_are_not_placeholders() {
    let text = format!(
        "{BASE}[[builder]]\nname = \"unit\"\nrepo = \"app\"\npool = \"small\"\nsteps = [\"echo ${{HOME}} {{a,b}} {{1..3}}; {{ true; }}\"]\n"
    );
    let cfg = parse(&text).unwrap();
    assert_eq!(cfg.builders[0].steps[0].run, "echo ${HOME} {a,b} {1..3}; { true; }");
}

/// The DESIGN.md sketch, adapted: provisioner "local", EC2-only keys removed.
const DESIGN_SKETCH: &str = r#"
[master]
url = "http://127.0.0.1:8010"        # what agents connect back to; also the web UI and API
database = "sqlite://paddock.db"      # or postgres://…

[[repo]]
name = "django"
url = "https://github.com/django/django.git"   # any git URL, local paths included
branches = ["main", "stable/5.2.x"]
poll = "60s"

[pool.small]
provisioner = "local"
max_instances = 8
idle_timeout = "10m"
boot_timeout = "5m"

[[builder]]
name = "py{python}-{db}"              # one builder per matrix cell: py3.12-sqlite, …
repo = "django"
pool = "small"
branches = ["main", "stable/*"]       # optional: which branches this builder may build
matrix = { python = ["3.12", "3.13"], db = ["sqlite", "postgres"] }
steps = [{ run = "python{python} -m pip install -e ." }, { run = "./runtests.py --settings=test_{db}" }]

[[builder]]
name = "docs"
repo = "django"
pool = "small"
steps = [{ run = "make -C docs html" }]

[[scheduler]]
kind = "branch"                       # one build request per (builder, branch) per change
repo = "django"
tree_stable = "15s"
builders = ["py*"]
ignore = ["docs/**"]                  # changes touching only these files don't trigger

[[scheduler]]
kind = "branch"
repo = "django"
builders = ["docs"]
files = ["docs/**"]                   # only changes touching these files trigger
"#;

#[test]
fn design_sketch_parses() {
    let cfg = parse(DESIGN_SKETCH).unwrap();
    assert_eq!(cfg.builders.len(), 5);
    assert_eq!(cfg.master.database, "sqlite:///etc/paddock/paddock.db");
    assert_eq!(cfg.master.listen, "127.0.0.1:8010");
    let pool = cfg.pool("small").unwrap();
    assert_eq!(pool.max_instances, 8);
    assert_eq!(pool.idle_timeout, Duration::from_secs(600));
    assert_eq!(cfg.schedulers[0].name, "branch-1");
    assert_eq!(cfg.schedulers[1].name, "branch-2");
    assert_eq!(cfg.schedulers[0].builders, ["py3.12-sqlite", "py3.12-postgres", "py3.13-sqlite", "py3.13-postgres"]);
    assert_eq!(
        cfg.schedulers[0].kind,
        SchedulerKind::Branch {
            tree_stable: Some(Duration::from_secs(15)),
            files: vec![],
            ignore: vec!["docs/**".into()]
        }
    );
    assert_eq!(cfg.schedulers[1].builders, ["docs"]);
    let listing = config::render_builders(&cfg);
    assert!(listing.contains("py3.13-postgres"), "{listing}");
    assert!(listing.contains("$ ./runtests.py --settings=test_postgres"), "{listing}");
    assert!(listing.contains("branch-2"), "{listing}");
}

#[test]
fn relative_paths_resolve_against_config_folder() {
    let text = r#"
[master]
database = "sqlite://data/ci.db"
state_dir = "./state"
secrets_file = "secrets.toml"

[[repo]]
name = "local"
url = "./demo-repo"

[[repo]]
name = "abs"
url = "/srv/git/abs.git"

[[repo]]
name = "ssh"
url = "git@github.com:me/ssh.git"

[[repo]]
name = "file"
url = "file:///srv/git/file.git"

[pool.p]
agent_command = "../bin/paddock"
"#;
    let cfg = parse(text).unwrap();
    assert_eq!(cfg.master.database, "sqlite:///etc/paddock/data/ci.db");
    assert_eq!(cfg.master.state_dir, PathBuf::from("/etc/paddock/state"));
    assert_eq!(cfg.master.secrets_file, Some(PathBuf::from("/etc/paddock/secrets.toml")));
    assert_eq!(cfg.repo("local").unwrap().url, "/etc/paddock/demo-repo");
    assert_eq!(cfg.repo("abs").unwrap().url, "/srv/git/abs.git");
    assert_eq!(cfg.repo("ssh").unwrap().url, "git@github.com:me/ssh.git");
    assert_eq!(cfg.repo("file").unwrap().url, "file:///srv/git/file.git");
    assert_eq!(cfg.pool("p").unwrap().agent_command, Some(PathBuf::from("/etc/paddock/../bin/paddock")));
}

#[test]
fn tls_files_resolve_against_config_folder_and_need_an_https_url() {
    let cfg =
        parse("[master]\nurl = \"https://ci.example:8443\"\ntls_cert = \"tls/cert.pem\"\ntls_key = \"/srv/key.pem\"\n")
            .unwrap();
    let tls = cfg.master.tls.expect("tls");
    assert_eq!(tls.cert, PathBuf::from("/etc/paddock/tls/cert.pem"));
    assert_eq!(tls.key, PathBuf::from("/srv/key.pem"));
    assert_eq!(cfg.master.listen, "ci.example:8443");
    assert_eq!(parse("[master]\n").unwrap().master.tls, None);

    let e = assert_err(
        "[master]\nurl = \"https://ci.example\"\ntls_cert = \"cert.pem\"\n",
        3,
        12,
        "`tls_cert` needs `tls_key` too",
    );
    assert!(e.hint.unwrap().contains("private key"));
    assert_err(
        "[master]\nurl = \"https://ci.example\"\ntls_key = \"key.pem\"\n",
        3,
        11,
        "`tls_key` needs `tls_cert` too",
    );
    let e = assert_err(
        "[master]\nurl = \"http://ci.example:8010\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        2,
        7,
        "`url` must start with https:// when `tls_cert` is set",
    );
    assert!(e.hint.unwrap().contains("agents and browsers follow `url`"));
    // Without `url`, the default (http://) is what is wrong; the error points at the certificate.
    assert_err("[master]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n", 2, 12, "`url` must start with https://");
    assert_err(
        "[master]\nurl = \"https://x\"\ntls_cert = \"\"\ntls_key = \"k.pem\"\n",
        3,
        12,
        "`tls_cert` must not be empty",
    );
}

#[test]
fn defaults() {
    let cfg = parse("[[repo]]\nname = \"a\"\nurl = \"https://x/a.git\"\n\n[pool.p]\n").unwrap();
    let m = &cfg.master;
    assert_eq!(m.url, "http://127.0.0.1:8010");
    assert_eq!(m.listen, "127.0.0.1:8010");
    assert_eq!(m.database, "sqlite:///etc/paddock/paddock.db");
    assert_eq!(m.state_dir, PathBuf::from("/etc/paddock/paddock-state"));
    assert_eq!(m.secrets_file, None);
    assert_eq!(m.github_secret_env, "PADDOCK_GITHUB_SECRET");
    assert_eq!(m.heartbeat_timeout, Duration::from_secs(30));
    assert_eq!(m.shutdown_grace, Duration::from_secs(60));
    let r = cfg.repo("a").unwrap();
    assert_eq!(r.branches, ["main"]);
    assert_eq!(r.poll, Some(Duration::from_secs(60)));
    let p = cfg.pool("p").unwrap();
    assert_eq!(p.provisioner, ProvisionerKind::Local);
    assert_eq!(p.max_instances, 4);
    assert_eq!(p.min_idle, 0);
    assert_eq!(p.idle_timeout, Duration::from_secs(300));
    assert_eq!(p.boot_timeout, Duration::from_secs(300));
    assert_eq!(p.max_builds, 0);
    assert_eq!(p.agent_command, None);
    assert_eq!(p.isolation, Isolation::Sandbox);
    assert_eq!(p.run_as, None);
    assert!(cfg.builders.is_empty() && cfg.schedulers.is_empty());
}

#[test]
fn listen_follows_url_and_poll_zero_disables_polling() {
    let cfg = parse("[master]\nurl = \"https://ci.example.com\"\n[[repo]]\nname = \"a\"\nurl = \"x\"\npoll = \"0s\"\n")
        .unwrap();
    assert_eq!(cfg.master.listen, "ci.example.com:443");
    assert_eq!(cfg.repo("a").unwrap().poll, None);
}

#[test]
fn nightly_scheduler() {
    let text = format!(
        "{BASE}{BUILDER}[[scheduler]]\nkind = \"nightly\"\nrepo = \"app\"\ncron = \"30 2 * * 1-5\"\nbuilders = [\"*\"]\n"
    );
    let cfg = parse(&text).unwrap();
    assert_eq!(cfg.schedulers[0].name, "nightly-1");
    assert_eq!(cfg.schedulers[0].kind, SchedulerKind::Nightly { cron: "30 2 * * 1-5".into(), only_if_changed: false });
}

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/paddock.toml");
    let cfg = config::load(&path).unwrap();
    let dir = path.parent().unwrap();
    assert_eq!(cfg.repo("demo").unwrap().url, dir.join("demo-repo").to_string_lossy());
    let names: Vec<&str> = cfg.builders.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        ["test-py3.12-sqlite", "test-py3.12-postgres", "test-py3.13-sqlite", "test-py3.13-postgres", "docs"]
    );
    assert_eq!(cfg.schedulers.len(), 3);
    assert_eq!(cfg.schedulers[0].builders.len(), 4);
    assert_eq!(cfg.schedulers[1].builders, ["docs"]);
    assert_eq!(cfg.schedulers[2].builders.len(), 5);
    assert!(matches!(cfg.schedulers[2].kind, SchedulerKind::Nightly { only_if_changed: true, .. }));
    assert!(!config::render_builders(&cfg).is_empty());
}

#[test]
fn garbage_never_panics() {
    for text in [
        "",
        "\u{0}",
        "=",
        "[[builder]]\nsteps = [[]]",
        "[pool]\nx = 1",
        "[[scheduler]]\nkind = 3",
        "[[builder]]\nname = \"{\"\nrepo=\"r\"\npool=\"p\"\nsteps=[\"{}\"]",
        "master = 1",
        "[[repo]]\nname=\"a\"\nurl=\"x\"\npoll=\"99999999999999999d\"",
        "[pool.p]\nmax_instances = -1",
        "[pool.p]\nmax_instances = 99999999999",
        "[[builder]]\nmatrix = { \"a b\" = [\"x\"] }",
        "[[builder]]\nmatrix = { py = [3.10] }",
        "[master]\nurl = \"http://[::1\"",
        "[master]\nwhen = 1979-05-27T07:32:00Z",
    ] {
        let _ = parse(text);
    }
}

#[test]
fn misspelt_scheduler_kind_key() {
    let text = format!("{BASE}{BUILDER}[[scheduler]]\nknd = \"branch\"\nrepo = \"app\"\n");
    let e = assert_err(&text, 13, 1, "unknown key `knd` in [[scheduler]]");
    assert!(e.hint.unwrap().contains("did you mean `kind`?"));
}

#[test]
fn float_matrix_value_asks_for_quotes() {
    let text = format!(
        "{BASE}[[builder]]\nname = \"py{{py}}\"\nrepo = \"app\"\npool = \"small\"\nmatrix = {{ py = [\"3.9\", 3.10] }}\nsteps = [\"make\"]\n"
    );
    let e = assert_err(&text, 11, 25, "matrix values must be strings, not a float");
    assert!(e.hint.unwrap().contains("\"3.10\""));
}

#[test]
fn prices_and_spend_caps_are_checked_where_they_are_written() {
    // BASE's pool is lines 5-6; these keys land on line 7.
    assert_err(&format!("{BASE}hourly_price = -1.5\n"), 7, 16, "`hourly_price` must be a number of dollars, 0 or more");
    assert_err(&format!("{BASE}hourly_price = \"cheap\"\n"), 7, 16, "`hourly_price` must be a number");
    assert_err(&format!("{BASE}max_hourly_spend = 0\n"), 7, 20, "`max_hourly_spend` must be more than 0");
    let e = assert_err(&format!("{BASE}max_daily_spend = 10\n"), 7, 1, "local pool whose machines cost nothing");
    assert!(e.hint.as_deref().is_some_and(|h| h.contains("hourly_price")), "{e}");
    assert_err(
        &format!("{BASE}prices = {{ \"t3.small\" = \"x\" }}\n"),
        7,
        25,
        "the price of `t3.small` must be a number",
    );
    assert_err(&format!("{BASE}prices = 3\n"), 7, 10, "`prices`");
    let e = assert_err(&format!("{BASE}\n[cost]\nmax_daily = 5\n"), 9, 1, "unknown key `max_daily`");
    assert!(e.hint.as_deref().is_some_and(|h| h.contains("max_daily_spend")), "{e}");
    assert_err(&format!("{BASE}\n[cost]\nmax_daily_spend = -2\n"), 9, 19, "0 or more");

    let ok = parse(&format!(
        "{BASE}hourly_price = 0.05\nprices = {{ \"t3.small\" = 0.02, \"m5.large\" = 1 }}\nmax_hourly_spend = 2\nmax_daily_spend = 30.5\n\n[cost]\nmax_daily_spend = 100\n{BUILDER}"
    ))
    .expect("valid");
    let pool = ok.pool("small").expect("pool");
    assert_eq!(pool.hourly_price, Some(0.05));
    assert_eq!(pool.prices.get("m5.large"), Some(&1.0));
    assert_eq!((pool.spend.hourly, pool.spend.daily), (Some(2.0), Some(30.5)));
    assert_eq!(ok.cost.spend.daily, Some(100.0));
    assert_eq!(ok.cost.spend.hourly, None);
}

#[test]
fn web_access_and_session_lifetime_are_checked_where_they_are_written() {
    // BASE is lines 1-6; [web] is line 8, its first key line 9.
    assert_err(&format!("{BASE}\n[web]\naccess = \"private\"\n"), 9, 10, "`access` must be \"public\"");
    assert_err(&format!("{BASE}\n[web]\nsession_lifetime = \"10s\"\n"), 9, 20, "at least 1m");
    let e = assert_err(&format!("{BASE}\n[web]\nanonymous = true\n"), 9, 1, "unknown key `anonymous`");
    assert!(e.hint.as_deref().is_some_and(|h| h.contains("access")), "{e}");
    let ok = parse(&format!("{BASE}\n[web]\naccess = \"login\"\nsession_lifetime = \"8h\"\n{BUILDER}")).expect("valid");
    assert!(!ok.web.public);
    assert_eq!(ok.web.session_lifetime, std::time::Duration::from_secs(8 * 3600));
    let default = parse(&format!("{BASE}{BUILDER}")).expect("valid");
    assert!(default.web.public, "public unless told otherwise");
}

#[test]
fn notifiers_are_checked_where_they_are_written() {
    // BASE is lines 1-6; [[notifier]] is line 8, its keys from line 9.
    let n = |rest: &str| format!("{BASE}\n[[notifier]]\n{rest}");
    assert_err(&n("kind = \"pigeon\"\n"), 9, 8, "unknown notifier kind \"pigeon\"");
    assert_err(&n("kind = \"webhook\"\n"), 8, 1, "`url`");
    assert_err(&n("kind = \"webhook\"\nurl = \"ftp://x\"\n"), 10, 7, "http:// or https://");
    assert_err(
        &n("kind = \"webhook\"\nurl = \"http://x\"\nevents = [\"failed\"]\n"),
        11,
        11,
        "unknown event \"failed\"",
    );
    assert_err(&n("kind = \"webhook\"\nurl = \"http://x\"\nevents = []\n"), 11, 10, "at least one event");
    let e = assert_err(
        &n("kind = \"irc\"\nserver = \"i\"\nchannel = \"#ci\"\nevents = []\n"),
        12,
        10,
        "at least one event",
    );
    assert!(e.to_string().contains("omit it for the default of `kind = \"irc\"`: [\"transition\"]"), "{e}");
    let e = assert_err(
        &n("kind = \"webhook\"\nurl = \"http://x\"\ntemplate = \"{builder} broke {brnch}\"\n"),
        11,
        29,
        "unknown placeholder `{brnch}` in the template",
    );
    assert!(e.hint.as_deref().is_some_and(|h| h.contains("{branch}")), "{e}");
    assert_err(&n("kind = \"webhook\"\nurl = \"http://x\"\ncolour = 1\n"), 11, 1, "unknown key `colour`");
    let two = format!("{BASE}\n[[notifier]]\nkind = \"webhook\"\nurl = \"http://x\"\n\n[[notifier]]\nkind = \"webhook\"\nurl = \"http://y\"\n");
    assert_err(&two, 12, 1, "duplicate notifier name `webhook`");

    assert_err(&n("kind = \"github\"\n"), 8, 1, "`token_env`");
    assert_err(&n("kind = \"github\"\ntoken_env = \"T\"\nrepository = \"acme\"\n"), 11, 14, "`owner/name`");
    assert_err(
        &n("kind = \"github\"\ntoken_env = \"T\"\nurl = \"http://x\"\n"),
        11,
        1,
        "not a setting of `kind = \"github\"` notifiers",
    );
    assert_err(
        &n("kind = \"github\"\ntoken_env = \"T\"\ncontext = \"ci/{bilder}\"\n"),
        11,
        15,
        "unknown placeholder `{bilder}`",
    );
    assert_err(&n("kind = \"irc\"\nserver = \"irc.example\"\n"), 8, 1, "`channel`");
    assert_err(&n("kind = \"irc\"\nserver = \"irc.example:x\"\nchannel = \"#ci\"\n"), 10, 10, "`host` or `host:port`");
    assert_err(&n("kind = \"irc\"\nserver = \"irc.example\"\nchannel = \"ci\"\n"), 11, 11, "like \"#ci\"");
    assert_err(
        &n("kind = \"irc\"\nserver = \"i\"\nchannel = \"#ci\"\nauth = \"plain\"\n"),
        12,
        8,
        "\"sasl\" or \"nickserv\"",
    );
    assert_err(
        &n("kind = \"irc\"\nserver = \"i\"\nchannel = \"#ci\"\nurl = \"http://x\"\n"),
        12,
        1,
        "not a setting of `kind = \"irc\"` notifiers",
    );
    let irc = parse(&format!("{BASE}{BUILDER}\n[[notifier]]\nkind = \"irc\"\nserver = \"irc.libera.chat\"\nchannel = \"#app\"\npassword_env = \"P\"\n")).expect("valid");
    assert_eq!(
        irc.notifiers[0].kind,
        config::NotifierKind::Irc {
            host: "irc.libera.chat".into(),
            port: 6697,
            tls: true,
            nick: "paddock".into(),
            channel: "#app".into(),
            password_env: Some("P".into()),
            auth: paddock::notify::irc::IrcAuth::Sasl,
            ca_file: None,
        }
    );
    // A private CA: the path is relative to the config's folder, and only with TLS.
    let irc_ca = parse(&format!(
        "{BASE}{BUILDER}\n[[notifier]]\nkind = \"irc\"\nserver = \"irc.internal\"\nchannel = \"#app\"\nca_file = \"certs/ca.pem\"\n"
    ))
    .expect("valid");
    assert!(matches!(
        &irc_ca.notifiers[0].kind,
        config::NotifierKind::Irc { ca_file: Some(p), .. } if p == Path::new("/etc/paddock/certs/ca.pem")
    ));
    assert_err(
        &n("kind = \"irc\"\nserver = \"i\"\nchannel = \"#ci\"\ntls = false\nca_file = \"ca.pem\"\n"),
        13,
        11,
        "`ca_file` has no use with `tls = false`",
    );
    assert_err(&n("kind = \"irc\"\nserver = \"i\"\nchannel = \"#ci\"\nca_file = \" \"\n"), 12, 11, "must not be empty");
    assert_eq!(irc.notifiers[0].events, vec![config::NotifyOn::Transition]);
    let mail = |rest: &str| n(&format!("kind = \"email\"\nsmtp = \"mail.example\"\n{rest}"));
    assert_err(&mail("from = \"Paddock\"\nto = [\"a@example.com\"]\n"), 11, 8, "not an email address");
    assert_err(&mail("from = \"ci@example.com\"\nto = [\"dev list\"]\n"), 12, 7, "not an email address");
    assert_err(&mail("from = \"ci@example.com\"\ncommitters = false\n"), 8, 1, "mails nobody");
    assert_err(&mail("from = \"ci@example.com\"\nsecurity = \"ssl\"\n"), 12, 12, "\"starttls\", \"tls\" or \"none\"");
    assert_err(&mail("from = \"ci@example.com\"\ncommitter_domains = [\"a@b.c\"]\n"), 12, 22, "which is not a domain");
    assert_err(
        &mail(
            "from = \"ci@example.com\"\nto = [\"a@example.com\"]\ncommitters = false\ncommitter_domains = [\"b.c\"]\n",
        ),
        14,
        1,
        "`committer_domains` has no use with `committers = false`",
    );
    let domains = parse(&format!("{BASE}{BUILDER}\n[[notifier]]\nkind = \"email\"\nsmtp = \"m\"\nfrom = \"ci@example.com\"\ncommitter_domains = [\"@Example.COM\"]\n")).expect("valid");
    assert!(matches!(
        &domains.notifiers[0].kind,
        config::NotifierKind::Email { committer_domains, .. } if committer_domains == &["example.com"]
    ));
    assert_err(
        &mail(
            "from = \"ci@example.com\"\nto = [\"a@example.com\"]\nsecurity = \"none\"\nca_file = \"/etc/ssl/ca.pem\"\n",
        ),
        14,
        11,
        "`ca_file` has no use with `security = \"none\"`",
    );
    assert_err(
        &mail("from = \"ci@example.com\"\nchannel = \"#x\"\n"),
        12,
        1,
        "not a setting of `kind = \"email\"` notifiers",
    );
    let m = parse(&format!("{BASE}{BUILDER}\n[[notifier]]\nkind = \"email\"\nsmtp = \"mail.example\"\nsecurity = \"tls\"\nfrom = \"CI <ci@example.com>\"\n")).expect("valid");
    assert!(matches!(
        &m.notifiers[0].kind,
        config::NotifierKind::Email { port: 465, security: config::SmtpSecurity::Tls, committers: true, .. }
    ));
    let gh = parse(&format!("{BASE}{BUILDER}\n[[notifier]]\nkind = \"github\"\ntoken_env = \"T\"\n")).expect("valid");
    assert_eq!(
        gh.notifiers[0].kind,
        config::NotifierKind::GitHub {
            api_url: "https://api.github.com".into(),
            token_env: "T".into(),
            repository: None,
            context: "paddock/{builder}".into(),
            ca_file: None,
        }
    );
    assert_eq!(gh.notifiers[0].events, vec![config::NotifyOn::Started, config::NotifyOn::Finished]);
    let ok = parse(&format!(
        "{BASE}{BUILDER}\n[[notifier]]\nkind = \"webhook\"\nname = \"ops\"\nurl = \"https://x/h\"\nsecret_env = \"S\"\nevents = [\"transition\", \"started\"]\nbuilders = [\"u*\"]\ntemplate = \"{{builder}}: {{result}}\"\n"
    ))
    .expect("valid");
    let n = &ok.notifiers[0];
    assert_eq!(n.name, "ops");
    assert_eq!(n.events, vec![config::NotifyOn::Transition, config::NotifyOn::Started]);
    assert_eq!(
        n.kind,
        config::NotifierKind::Webhook { url: "https://x/h".into(), secret_env: Some("S".into()), ca_file: None }
    );
    assert_eq!(n.builders, vec!["u*".to_string()]);
}

#[test]
fn https_notifiers_take_a_ca_file_and_plain_ones_refuse_it() {
    // BASE is lines 1-6; [[notifier]] is line 8, its keys from line 9.
    let n = |rest: &str| format!("{BASE}\n[[notifier]]\n{rest}");
    let valid =
        |rest: &str| parse(&format!("{BASE}{BUILDER}\n[[notifier]]\n{rest}")).expect("valid").notifiers[0].clone();
    // The path is relative to the config's folder.
    let hook = valid("kind = \"webhook\"\nurl = \"https://hooks.internal/p\"\nca_file = \"certs/ca.pem\"\n");
    assert_eq!(
        hook.kind,
        config::NotifierKind::Webhook {
            url: "https://hooks.internal/p".into(),
            secret_env: None,
            ca_file: Some(PathBuf::from("/etc/paddock/certs/ca.pem")),
        }
    );
    let gh = valid("kind = \"github\"\ntoken_env = \"T\"\napi_url = \"https://ghe.internal/api/v3\"\nca_file = \"/etc/ssl/ghe.pem\"\n");
    assert!(matches!(
        &gh.kind,
        config::NotifierKind::GitHub { ca_file: Some(p), .. } if p == Path::new("/etc/ssl/ghe.pem")
    ));
    // The default API is https too.
    let gh = valid("kind = \"github\"\ntoken_env = \"T\"\nca_file = \"ca.pem\"\n");
    assert!(matches!(&gh.kind, config::NotifierKind::GitHub { ca_file: Some(_), .. }));

    let e = assert_err(
        &n("kind = \"webhook\"\nurl = \"http://hooks.internal/p\"\nca_file = \"ca.pem\"\n"),
        11,
        11,
        "`ca_file` has no use with an http:// `url`",
    );
    assert!(e.hint.as_deref().is_some_and(|h| h.contains("https://")), "{e}");
    assert_err(
        &n("kind = \"github\"\ntoken_env = \"T\"\napi_url = \"http://ghe.internal/api/v3\"\nca_file = \"ca.pem\"\n"),
        12,
        11,
        "`ca_file` has no use with an http:// `api_url`",
    );
    assert_err(&n("kind = \"webhook\"\nurl = \"https://h/p\"\nca_file = \"\"\n"), 11, 11, "must not be empty");
    // A URL that cannot be sent to is heard at start.
    assert_err(&n("kind = \"webhook\"\nurl = \"https://exa mple.com/p\"\n"), 10, 7, "`url` is not a valid URL");
    assert_err(&n("kind = \"webhook\"\nurl = \"https://\"\n"), 10, 7, "`url` is not a valid URL");
    assert_err(&n("kind = \"webhook\"\nurl = \"hooks.internal/p\"\n"), 10, 7, "http:// or https://");
    assert_err(
        &n("kind = \"github\"\ntoken_env = \"T\"\napi_url = \"https://ghe:99999/api\"\n"),
        11,
        11,
        "`api_url` is not a valid URL",
    );
}

#[test]
fn an_smtp_password_is_never_sent_in_clear() {
    let text = format!(
        "{BASE}\n[[notifier]]\nkind = \"email\"\nsmtp = \"mail.example\"\nfrom = \"ci@example.com\"\nsecurity = \"none\"\nusername = \"ci\"\npassword_env = \"P\"\n"
    );
    assert_err(&text, 14, 16, "in clear");
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = include_str!("../examples/paddock.toml");

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Arbitrary TOML-ish text never panics.
        #[test]
        fn random_text_never_panics(text in "[\\[\\]{}=\"'a-z0-9._ \\n,:*#$-]{0,200}") {
            let _ = parse(&text);
        }

        /// Deleting or replacing a slice of a valid config never panics, and any error is located
        /// inside the file.
        #[test]
        fn mutated_example_never_panics(start in 0usize..4000, len in 0usize..40, with in "[{}\\[\\]\"=a-z0-9 \\n]{0,5}") {
            let mut text = EXAMPLE.to_string();
            let start = start.min(text.len());
            let end = (start + len).min(text.len());
            if text.is_char_boundary(start) && text.is_char_boundary(end) {
                text.replace_range(start..end, &with);
            }
            if let Err(e) = parse(&text) {
                prop_assert!(e.line >= 1 && e.line <= text.lines().count() + 1, "{}", e);
                prop_assert!(e.column >= 1);
            }
        }
    }
}

#[test]
fn a_database_password_in_the_config_is_refused_without_being_repeated() {
    for db in [
        "postgres://ci:hunter2@db.example/ci",
        "postgresql://ci:hunter2@db.example:5433/ci?sslmode=require",
        "postgres://ci@db.example/ci?password=hunter2",
        "host=db.example user=ci password=hunter2 dbname=ci",
        "host=db.example user=ci password = 'hunter2 x' dbname=ci",
        "postgres://ci:hun/ter2@db.example/ci",
        "postgres://ci:hun?ter2@db.example/ci",
        "postgres://ci@db.example/ci?%70assword=hunter2",
    ] {
        let e = assert_err(&format!("[master]\ndatabase = \"{db}\"\n"), 2, 12, "`database` holds a password");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.hint.as_deref().is_some_and(|h| h.contains("PGPASSWORD") && h.contains(".pgpass")), "{e:?}");
    }
    let e =
        assert_err("[master]\ndatabase = \"mysql://ci:hunter2@db/ci\"\n", 2, 12, "not a sqlite: URL nor a PostgreSQL");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    for db in [
        "postgres://ci@db.example/ci",
        "postgresql://db.example/ci?sslmode=require",
        "host=db user=password_admin application_name='no passwords here'",
    ] {
        let cfg = parse(&format!("[master]\ndatabase = \"{db}\"\n{BASE}")).expect("no password: accepted");
        assert_eq!(cfg.master.database, db);
    }
}
