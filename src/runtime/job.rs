//! Job assembly: what an agent is sent for a build, from the config and the secrets alone (a
//! pure function: no store, no clock).

use crate::agent::protocol::{BuildJob, JobStep};
use crate::config::Config;
use crate::store::BuildRow;

use super::secrets::Secrets;

/// Everything the agent needs for `row`, with the secrets it references resolved.
pub fn assemble(config: &Config, secrets: &Secrets, row: &BuildRow) -> Result<BuildJob, String> {
    let builder =
        config.builder(&row.builder).ok_or_else(|| format!("builder {} is no longer configured", row.builder))?;
    let repo =
        config.repo(&builder.repo).ok_or_else(|| format!("repository {} is no longer configured", builder.repo))?;
    let mut wanted = Vec::new();
    let texts =
        builder.env.values().chain(builder.steps.iter().flat_map(|s| std::iter::once(&s.run).chain(s.env.values())));
    for text in texts {
        for name in super::secrets::references(text) {
            if !wanted.contains(&name) {
                wanted.push(name);
            }
        }
    }
    let mut resolved = std::collections::BTreeMap::new();
    for name in wanted {
        let value = secrets.get(&name).ok_or_else(|| {
            format!("secret {name} is not defined (neither in the secrets file nor in the environment)")
        })?;
        resolved.insert(name, value);
    }
    Ok(BuildJob {
        build: row.id,
        builder: row.builder.clone(),
        repo_url: repo.url.clone(),
        branch: row.branch.clone(),
        revision: row.revision.clone(),
        env: builder.env.clone(),
        steps: builder
            .steps
            .iter()
            .map(|s| JobStep {
                name: s.name.clone(),
                run: s.run.clone(),
                env: s.env.clone(),
                workdir: s.workdir.clone(),
                timeout_secs: s.timeout.as_secs().max(1),
                always: s.always,
            })
            .collect(),
        secrets: resolved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::BuildId;
    use std::os::unix::fs::PermissionsExt;

    fn row(builder: &str) -> BuildRow {
        BuildRow {
            id: BuildId(7),
            request: 1,
            builder: builder.into(),
            repo: "app".into(),
            branch: "main".into(),
            revision: "abc".into(),
            state: crate::core::build::BuildState::Queued,
            machine: None,
            attempt: 1,
            reason: String::new(),
            queued_at: String::new(),
            started_at: None,
            finished_at: None,
            cancelled_by: None,
        }
    }

    #[test]
    fn a_job_carries_the_builders_steps_and_only_the_secrets_it_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.toml");
        std::fs::write(&path, "TOKEN = \"t0ps3cret\"\nOTHER = \"unused\"\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let secrets = Secrets::load(Some(&path)).expect("secrets");
        let text = "[[repo]]\nname = \"app\"\nurl = \"https://git.example.com/app.git\"\n[pool.p]\nisolation = \"none\"\n\
                    [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"p\"\nsteps = [\"curl -H {secret:TOKEN} x\", \"true\"]\n\
                    [[builder]]\nname = \"c\"\nrepo = \"app\"\npool = \"p\"\nsteps = [\"echo {secret:MISSING_1}\"]\n";
        let config = crate::config::parse(text, &dir.path().join("p.toml")).expect("config");
        let job = assemble(&config, &secrets, &row("b")).expect("job");
        assert_eq!(
            (job.build, job.repo_url.as_str(), job.revision.as_str()),
            (BuildId(7), "https://git.example.com/app.git", "abc")
        );
        assert_eq!(job.steps.len(), 2);
        assert_eq!(job.secrets.keys().collect::<Vec<_>>(), ["TOKEN"]);
        let e = assemble(&config, &secrets, &row("c")).expect_err("missing secret");
        assert!(e.contains("secret MISSING_1 is not defined"), "{e}");
        let e = assemble(&config, &secrets, &row("gone")).expect_err("no builder");
        assert!(e.contains("builder gone is no longer configured"), "{e}");
    }
}
