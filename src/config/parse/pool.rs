//! `[pool.NAME]`: a pool of machines, local or EC2, with its limits, prices and caps.

use super::*;

pub(super) fn pool_entries(e: &Entry) -> Result<&[Entry], Diag> {
    match &e.value.kind {
        Kind::Table(entries) => Ok(entries),
        _ => Err(Diag::new(
            e.key_span.clone(),
            format!("`pool` must be a table of named pools, not {}", e.value.type_name()),
        )
        .hint("write one [pool.NAME] section per pool, e.g. [pool.small]")),
    }
}

pub(super) fn parse_pool(e: &Entry, base: &Path) -> Result<Pool, Diag> {
    let what = format!("[pool.{}]", e.key);
    let f = Fields::new(&e.value, what.clone())?;
    let kind = f.opt_str("provisioner")?;
    let is_ec2 = kind.as_ref().is_some_and(|k| k.v == "ec2");
    let mut allowed: Vec<&str> = POOL_KEYS.to_vec();
    if is_ec2 {
        for key in ["isolation", "run_as"] {
            if let Some(e) = f.get(key) {
                return Err(Diag::new(
                    e.key_span.clone(),
                    format!("`{key}` is only valid for provisioner = \"local\""),
                )
                .hint("an EC2 build has a VM of its own, destroyed after use; remove the key"));
            }
        }
        allowed.extend(EC2_KEYS);
        allowed.retain(|k| !matches!(*k, "agent_command" | "isolation" | "run_as"));
    }
    f.allow_only(&allowed)?;
    let provisioner = match &kind {
        None => ProvisionerKind::Local,
        Some(p) if p.v == "local" => ProvisionerKind::Local,
        Some(p) if p.v == "ec2" => ProvisionerKind::Ec2(Box::new(parse_ec2(&f, &what)?)),
        Some(p) => {
            return Err(Diag::new(p.span.clone(), format!("unknown provisioner \"{}\"", p.v))
                .hint(format!("available provisioners: {}", PROVISIONERS.join(", "))))
        }
    };
    let max_instances = f.opt_u32("max_instances")?;
    if let Some(m) = &max_instances {
        if m.v == 0 {
            return Err(Diag::new(m.span.clone(), "`max_instances` must be at least 1")
                .hint("a pool with no machines can never run a build"));
        }
    }
    let max_instances = max_instances.map(|m| m.v).unwrap_or(4);
    let min_idle = f.opt_u32("min_idle")?;
    if let Some(m) = &min_idle {
        if m.v > max_instances {
            return Err(Diag::new(
                m.span.clone(),
                format!("`min_idle` ({}) is greater than `max_instances` ({max_instances})", m.v),
            )
            .hint("lower min_idle or raise max_instances"));
        }
    }
    let hourly_price = f.opt_money("hourly_price")?.map(|m| m.v);
    let spend = spend_caps(&f)?;
    if matches!(provisioner, ProvisionerKind::Local) && spend.any() && hourly_price.unwrap_or(0.0) == 0.0 {
        let cap = f.get("max_hourly_spend").or_else(|| f.get("max_daily_spend"));
        let span = cap.map(|c| c.key_span.clone()).unwrap_or(f.span.clone());
        return Err(Diag::new(span, "a spend cap on a local pool whose machines cost nothing can never be reached")
            .hint("give the pool a nominal `hourly_price`, or remove the cap"));
    }
    Ok(Pool {
        name: e.key.clone(),
        provisioner,
        max_instances,
        min_idle: min_idle.map(|m| m.v).unwrap_or(0),
        idle_timeout: f.opt_duration("idle_timeout")?.unwrap_or(Duration::from_secs(300)),
        boot_timeout: f.opt_duration("boot_timeout")?.unwrap_or(Duration::from_secs(300)),
        max_builds: f.opt_u32("max_builds")?.map(|m| m.v).unwrap_or(0),
        agent_command: f.opt_str("agent_command")?.map(|p| resolve(base, &p.v)),
        isolation: isolation(&f)?,
        run_as: run_as(&f)?,
        hourly_price,
        prices: parse_prices(&f)?,
        spend,
    })
}

/// `isolation = "sandbox" | "none"` of a local pool.
pub(super) fn isolation(f: &Fields<'_>) -> Result<Isolation, Diag> {
    match f.opt_str("isolation")? {
        None => Ok(Isolation::Sandbox),
        Some(v) if v.v == "sandbox" => Ok(Isolation::Sandbox),
        Some(v) if v.v == "none" => Ok(Isolation::None),
        Some(v) => Err(Diag::new(v.span, format!("`isolation` is \"sandbox\" or \"none\", not \"{}\"", v.v)).hint(
            "\"sandbox\" (the default) confines each machine with bubblewrap; \"none\" runs steps as the \
             master's user with access to its files",
        )),
    }
}

/// `run_as = "USER"` of a local pool: a plausible user name, not root, and only with the sandbox.
pub(super) fn run_as(f: &Fields<'_>) -> Result<Option<String>, Diag> {
    let Some(user) = f.opt_str("run_as")? else { return Ok(None) };
    let plausible = !user.v.is_empty()
        && user.v.len() <= 32
        && !user.v.starts_with('-')
        && user.v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !plausible {
        return Err(Diag::new(user.span, format!("`run_as` must be a user name, not \"{}\"", user.v))
            .hint("e.g. run_as = \"paddock-build\" (create it with useradd --system --no-create-home paddock-build)"));
    }
    if user.v == "root" {
        return Err(Diag::new(user.span, "`run_as` must name an unprivileged user, not root")
            .hint("create one with useradd --system --no-create-home paddock-build and name it here"));
    }
    if f.get("isolation").is_some_and(|e| matches!(&e.value.kind, Kind::Str(s) if s == "none")) {
        return Err(Diag::new(user.span, "`run_as` needs the sandbox, but this pool says isolation = \"none\"").hint(
            "remove `run_as`, or remove isolation = \"none\" to confine the machines with bubblewrap as that user",
        ));
    }
    Ok(Some(user.v))
}

/// `prices = { "t3.small" = 0.0208, ... }`: per instance type, USD per hour.
pub(super) fn parse_prices(f: &Fields<'_>) -> Result<BTreeMap<String, f64>, Diag> {
    let Some(e) = f.get("prices") else { return Ok(BTreeMap::new()) };
    let entries = e.value.table("`prices`").map_err(|d| d.hint("write prices = { \"t3.small\" = 0.0208 }"))?;
    let mut out = BTreeMap::new();
    for p in entries {
        out.insert(p.key.clone(), p.value.money(&format!("the price of `{}`", p.key))?.v);
    }
    Ok(out)
}

/// `max_hourly_spend` / `max_daily_spend` (USD); a cap of 0 would stop every launch.
pub(super) fn spend_caps(f: &Fields<'_>) -> Result<SpendCaps, Diag> {
    let mut caps = SpendCaps::default();
    for (key, slot) in [("max_hourly_spend", &mut caps.hourly), ("max_daily_spend", &mut caps.daily)] {
        if let Some(m) = f.opt_money(key)? {
            if m.v <= 0.0 {
                return Err(Diag::new(m.span, format!("`{key}` must be more than 0"))
                    .hint("leave it out for no cap; a cap of 0 would never launch a machine"));
            }
            *slot = Some(m.v);
        }
    }
    Ok(caps)
}

/// The EC2 settings of a `provisioner = "ec2"` pool.
pub(super) fn parse_ec2(f: &Fields<'_>, what: &str) -> Result<Ec2Settings, Diag> {
    let strs = |key: &str| -> Result<Vec<String>, Diag> {
        let list = f.opt_str_array(key)?.unwrap_or_default();
        for s in &list {
            if s.v.trim().is_empty() {
                return Err(Diag::new(s.span.clone(), format!("`{key}` has an empty entry")));
            }
        }
        Ok(list.into_iter().map(|s| s.v).collect())
    };
    let opt = |key: &str| -> Result<Option<String>, Diag> {
        match f.opt_str(key)? {
            Some(s) if s.v.trim().is_empty() => Err(Diag::new(s.span, format!("`{key}` must not be empty"))),
            other => Ok(other.map(|s| s.v)),
        }
    };
    let mut s = Ec2Settings {
        region: opt("region")?,
        endpoint_url: opt("endpoint_url")?,
        ami: opt("ami")?,
        launch_template: opt("launch_template")?,
        launch_template_version: opt("launch_template_version")?,
        instance_types: strs("instance_types")?,
        subnets: strs("subnets")?,
        security_groups: strs("security_groups")?,
        iam_instance_profile: opt("iam_instance_profile")?,
        root_volume_size: None,
        root_volume_type: opt("root_volume_type")?,
        root_device_name: opt("root_device_name")?,
        spot: f.opt_bool("spot")?.unwrap_or(false),
        tags: Default::default(),
        key_name: opt("key_name")?,
        imds_url: opt("imds_url")?,
    };
    if let Some(size) = f.opt_u32("root_volume_size")? {
        if size.v == 0 || size.v > 65536 {
            return Err(Diag::new(size.span, format!("`root_volume_size` is in GiB, 1 to 65536, not {}", size.v)));
        }
        s.root_volume_size = Some(size.v as i32);
    }
    for (key, url) in [("endpoint_url", &s.endpoint_url), ("imds_url", &s.imds_url)] {
        if let Some(u) = url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                let span = f.get(key).map(|e| e.value.span.clone()).unwrap_or(f.span.clone());
                return Err(Diag::new(span, format!("`{key}` must start with http:// or https://, got \"{u}\"")));
            }
        }
    }
    if let Some(e) = f.get("tags") {
        for (k, v) in parse_env(&e.value, "`tags`").map_err(|d| d.hint("write tags = { team = \"ci\" }"))? {
            if k.starts_with("paddock:") || k.starts_with("aws:") {
                return Err(Diag::new(v.span, format!("tag `{k}` is reserved"))
                    .hint("keys starting with paddock: are Paddock's own, aws: are AWS's"));
            }
            s.tags.insert(k, v.v);
        }
    }
    if s.ami.is_none() && s.launch_template.is_none() {
        return Err(Diag::new(f.span.clone(), format!("{what} needs `ami` or `launch_template`"))
            .hint("e.g. ami = \"ami-0123456789abcdef0\" (a stock Linux AMI works: the agent is fetched at boot)"));
    }
    if s.ami.is_none() && s.root_device_name.is_none() && (s.root_volume_size.is_some() || s.root_volume_type.is_some())
    {
        let key = if s.root_volume_size.is_some() { "root_volume_size" } else { "root_volume_type" };
        let span = f.get(key).map(|e| e.value.span.clone()).unwrap_or(f.span.clone());
        return Err(Diag::new(span, format!("`{key}` with a launch template and no `ami` needs `root_device_name`"))
            .hint("the root device's name depends on the template's image, e.g. root_device_name = \"/dev/xvda\" (Amazon Linux) or \"/dev/sda1\" (Debian, Ubuntu)"));
    }
    if s.instance_types.is_empty() && s.launch_template.is_none() {
        return Err(Diag::new(f.span.clone(), format!("{what} needs `instance_types`"))
            .hint("e.g. instance_types = [\"t3.small\", \"t3a.small\"] (tried in order when one has no capacity)"));
    }
    Ok(s)
}
