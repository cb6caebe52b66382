//! Placeholder until the cloud-init renderer lands.

/// What the user-data carries into the machine.
pub struct BootVars<'a> {
    pub master_url: &'a str,
    pub token: &'a str,
    pub machine_id: i64,
    pub pool: &'a str,
    pub cluster: &'a str,
    pub imds_url: &'a str,
}

/// The `#cloud-config` user-data for one machine.
pub fn render(vars: &BootVars<'_>) -> String {
    format!(
        "#cloud-config\n# {} {} {} {} {}\n",
        vars.master_url, vars.machine_id, vars.pool, vars.cluster, vars.imds_url
    )
}
