//! What the core's state machines are told of the config: the same specs for the master and
//! for `paddock simulate`, so both run the same rules on the same settings.

use super::{Config, SchedulerKind};
use crate::core::fleet::PoolSpec;
use crate::core::scheduler::{BuilderRef, SchedulerSpec, SpecKind};

impl Config {
    /// The fleet's view of every pool.
    pub fn pool_specs(&self) -> Vec<PoolSpec> {
        self.pools
            .iter()
            .map(|p| PoolSpec {
                name: p.name.clone(),
                max_instances: p.max_instances,
                min_idle: p.min_idle,
                idle_timeout: p.idle_timeout,
                boot_timeout: p.boot_timeout,
                max_builds: p.max_builds,
            })
            .collect()
    }

    /// The schedulers' view of every scheduler, with its builders' names and branches.
    pub fn scheduler_specs(&self) -> Vec<SchedulerSpec> {
        self.schedulers
            .iter()
            .map(|s| SchedulerSpec {
                name: s.name.clone(),
                repo: s.repo.clone(),
                branches: s.branches.clone(),
                builders: s
                    .builders
                    .iter()
                    .filter_map(|b| self.builder(b))
                    .map(|b| BuilderRef { name: b.name.clone(), branches: b.branches.clone() })
                    .collect(),
                kind: match &s.kind {
                    SchedulerKind::Branch { tree_stable, files, ignore } => {
                        SpecKind::Branch { tree_stable: *tree_stable, files: files.clone(), ignore: ignore.clone() }
                    }
                    SchedulerKind::Nightly { cron, only_if_changed } => {
                        SpecKind::Nightly { cron: cron.clone(), only_if_changed: *only_if_changed }
                    }
                },
            })
            .collect()
    }
}
