//! `[[builder]]`: builders, their steps and the matrix they expand into.

use super::*;

pub(super) fn parse_builder(node: &Node, text: &str) -> Result<RawBuilder, Diag> {
    let f = Fields::new(node, "[[builder]]")?;
    f.allow_only(BUILDER_KEYS)?;
    let name = f.req_nonempty("name", "\"tests\"")?;
    let repo = f.req_nonempty("repo", "\"myproject\"")?;
    let pool = f.req_nonempty("pool", "\"small\"")?;
    let branches = globs(f.opt_str_array("branches")?, "branches")?;
    let axes = match f.get("matrix") {
        None => Vec::new(),
        Some(e) => parse_matrix(&e.value)?,
    };
    let env = match f.get("env") {
        None => Vec::new(),
        Some(e) => parse_env(&e.value, "`env`")?,
    };
    let no_steps = |span: Range<usize>| {
        Diag::new(span, format!("builder `{}` has no steps", name.v)).hint("add e.g. steps = [\"make test\"]")
    };
    let steps = match f.get("steps") {
        None => return Err(no_steps(f.span.clone())),
        Some(e) => {
            let items = e.value.array("`steps`")?;
            if items.is_empty() {
                return Err(no_steps(e.value.span.clone()));
            }
            items.iter().map(parse_step).collect::<Result<Vec<_>, _>>()?
        }
    };
    let axis_names: Vec<&str> = axes.iter().map(|(a, _)| a.as_str()).collect();
    let mut templated: Vec<&Sp<String>> = vec![&name];
    templated.extend(env.iter().map(|(_, v)| v));
    for s in &steps {
        templated.push(&s.run);
        templated.extend(s.name.iter());
        templated.extend(s.workdir.iter());
        templated.extend(s.env.iter().map(|(_, v)| v));
    }
    // Check in file order so the first bad placeholder is the one reported.
    templated.sort_by_key(|s| s.span.start);
    for s in templated {
        template::check(s, &axis_names, text)?;
    }
    Ok(RawBuilder { name, repo, pool, branches, axes, env, steps })
}

pub(super) fn parse_matrix(node: &Node) -> Result<Vec<(String, Vec<String>)>, Diag> {
    let entries = node.table("`matrix`").map_err(|d| d.hint("write matrix = { axis = [\"a\", \"b\"] }"))?;
    let mut axes = Vec::new();
    for e in entries {
        if !template::is_ident(&e.key) || e.key == "secret" {
            return Err(Diag::new(e.key_span.clone(), format!("invalid matrix axis name `{}`", e.key))
                .hint("axis names start with a letter or _ and contain letters, digits, _ or -"));
        }
        let values = e.value.array(&format!("matrix axis `{}`", e.key))?;
        if values.is_empty() {
            return Err(Diag::new(e.value.span.clone(), format!("matrix axis `{}` has no values", e.key))
                .hint("list at least one value, or remove the axis"));
        }
        let mut out = Vec::new();
        for v in values {
            out.push(match &v.kind {
                Kind::Str(s) => s.clone(),
                Kind::Int(i) => i.to_string(),
                Kind::Bool(b) => b.to_string(),
                Kind::Float(_) => {
                    return Err(Diag::new(
                        v.span.clone(),
                        format!("matrix values must be strings, not a float (axis `{}`)", e.key),
                    )
                    .hint("quote version numbers so 3.10 stays \"3.10\""))
                }
                _ => {
                    return Err(Diag::new(
                        v.span.clone(),
                        format!("matrix values must be strings, not {} (axis `{}`)", v.type_name(), e.key),
                    ))
                }
            });
        }
        axes.push((e.key.clone(), out));
    }
    Ok(axes)
}

pub(super) fn parse_env(node: &Node, what: &str) -> Result<Vec<(String, Sp<String>)>, Diag> {
    let entries = node.table(what).map_err(|d| d.hint("write env = { NAME = \"value\" }"))?;
    entries
        .iter()
        .map(|e| {
            let v = e.value.str(&format!("environment variable `{}`", e.key))?;
            Ok((e.key.clone(), v))
        })
        .collect()
}

pub(super) fn parse_step(node: &Node) -> Result<RawStep, Diag> {
    match &node.kind {
        Kind::Str(s) => {
            if s.trim().is_empty() {
                return Err(Diag::new(node.span.clone(), "a step's command must not be empty"));
            }
            Ok(RawStep {
                name: None,
                run: Sp { v: s.clone(), span: node.span.clone() },
                env: Vec::new(),
                workdir: None,
                timeout: DEFAULT_STEP_TIMEOUT,
                always: false,
            })
        }
        Kind::Table(_) => {
            let f = Fields::new(node, "a step")?;
            f.allow_only(STEP_KEYS)?;
            Ok(RawStep {
                run: f.req_nonempty("run", "\"make test\"")?,
                name: f.opt_str("name")?,
                env: match f.get("env") {
                    None => Vec::new(),
                    Some(e) => parse_env(&e.value, "a step's `env`")?,
                },
                workdir: f.opt_str("workdir")?,
                timeout: f.opt_duration("timeout")?.unwrap_or(DEFAULT_STEP_TIMEOUT),
                always: f.opt_bool("always")?.unwrap_or(false),
            })
        }
        _ => Err(Diag::new(
            node.span.clone(),
            format!("each step must be a string or a table, not {}", node.type_name()),
        )
        .hint("e.g. steps = [\"make\", { run = \"make test\", timeout = \"20m\" }]")),
    }
}

/// Every cell of the matrix: the first axis varies slowest, values in the order written.
pub(super) fn cells(axes: &[(String, Vec<String>)]) -> Vec<Vec<(String, String)>> {
    let mut out: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (axis, values) in axes {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut c = prefix.clone();
                    c.push((axis.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    out
}

pub(super) fn describe_cell(cell: &[(String, String)]) -> String {
    if cell.is_empty() {
        return "(no matrix)".to_string();
    }
    let parts: Vec<String> = cell.iter().map(|(a, v)| format!("{a}={v}")).collect();
    format!("{{{}}}", parts.join(", "))
}

pub(super) fn short_name(run: &str) -> String {
    let first = run.lines().find(|l| !l.trim().is_empty()).unwrap_or(run).trim();
    let mut name: String = first.chars().take(40).collect();
    if first.chars().count() > 40 || run.trim().lines().count() > 1 {
        name.push('…');
    }
    name
}

pub(super) fn expand_all(raws: &[RawBuilder], text: &str, errs: &mut Vec<Diag>) -> Vec<Expanded> {
    let mut out: Vec<Expanded> = Vec::new();
    // name -> (index in raws, cell description, span of that builder's name)
    let mut seen: HashMap<String, (usize, String, Range<usize>)> = HashMap::new();
    for (bi, raw) in raws.iter().enumerate() {
        for cell in cells(&raw.axes) {
            let map: BTreeMap<String, String> = cell.iter().cloned().collect();
            let sub = |s: &str| template::substitute(s, &map);
            let name = sub(&raw.name.v);
            let desc = describe_cell(&cell);
            if let Some((first_bi, first_desc, first_span)) = seen.get(&name) {
                let (message, hint) = if *first_bi == bi {
                    (
                        format!(
                            "duplicate builder name `{name}`: matrix cells {first_desc} and {desc} both produce it"
                        ),
                        "use every matrix axis in the name, e.g. name = \"tests-{axis1}-{axis2}\"".to_string(),
                    )
                } else {
                    (
                        format!(
                            "duplicate builder name `{name}` ({desc}); also produced by the builder at line {} ({first_desc})",
                            line_col(text, first_span.start).0
                        ),
                        "builder names must be unique after matrix expansion".to_string(),
                    )
                };
                errs.push(Diag::new(raw.name.span.clone(), message).hint(hint));
                // One duplicate report per builder is enough.
                break;
            }
            seen.insert(name.clone(), (bi, desc, raw.name.span.clone()));
            let steps = raw
                .steps
                .iter()
                .map(|s| {
                    let run = sub(&s.run.v);
                    Step {
                        name: match &s.name {
                            Some(n) => sub(&n.v),
                            None => short_name(&run),
                        },
                        env: s.env.iter().map(|(k, v)| (k.clone(), sub(&v.v))).collect(),
                        workdir: s.workdir.as_ref().map(|w| sub(&w.v)),
                        timeout: s.timeout,
                        always: s.always,
                        run,
                    }
                })
                .collect();
            out.push(Expanded {
                builder: Builder {
                    name,
                    repo: raw.repo.v.clone(),
                    pool: raw.pool.v.clone(),
                    branches: raw.branches.clone(),
                    env: raw.env.iter().map(|(k, v)| (k.clone(), sub(&v.v))).collect(),
                    cell: map.clone(),
                    steps,
                },
            });
        }
    }
    out
}
