//! GitHub commit statuses: `pending` when a build starts, then `success`, `failure` or `error`
//! when it ends, on the build's revision, linking to the build's page.

use super::webhook::SendError;

/// `owner/name` from a remote URL on `host` (`https://github.com/o/n.git`,
/// `git@github.com:o/n.git`, `ssh://git@host/o/n`); `None` for other hosts and local paths.
pub fn slug_of(url: &str, host: &str) -> Option<String> {
    let on_host = |authority: &str| {
        let h = authority.rsplit('@').next().unwrap_or(authority);
        h.split(':').next().unwrap_or(h).eq_ignore_ascii_case(host)
    };
    let rest = if let Some((_, r)) = url.split_once("://") {
        let (authority, path) = r.split_once('/')?;
        on_host(authority).then_some(path)?
    } else if let Some((authority, path)) = url.split_once(':') {
        // scp-like `user@host:owner/name`; a local path has no `@`.
        (authority.contains('@') && on_host(authority)).then_some(path)?
    } else {
        return None;
    };
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').filter(|p| !p.is_empty()).collect();
    match parts.as_slice() {
        [.., owner, name] => Some(format!("{owner}/{}", name.trim_end_matches(".git"))),
        _ => None,
    }
}

/// The host whose repository URLs an API serves: github.com for api.github.com, else the
/// API's own host (GitHub Enterprise).
pub fn repo_host(api_url: &str) -> String {
    let host = api_url.split_once("://").map_or(api_url, |(_, r)| r).split(['/', ':']).next().unwrap_or("");
    match host {
        "api.github.com" => "github.com".to_string(),
        h => h.to_string(),
    }
}

/// The status for a delivery's payload: (state, description).
pub fn status_of(event: &str, build_state: &str, failing_step: Option<&str>) -> (&'static str, String) {
    match (event, build_state) {
        ("started", _) => ("pending", "Build started".to_string()),
        (_, "success") => ("success", "Build succeeded".to_string()),
        (_, "failure") => match failing_step {
            Some(step) if !step.is_empty() => ("failure", format!("Failed at step: {step}")),
            _ => ("failure", "Build failed".to_string()),
        },
        (_, "cancelled") => ("error", "Build cancelled".to_string()),
        _ => ("error", "Build could not run".to_string()),
    }
}

/// Sets one commit status.
pub async fn send(
    http: &reqwest::Client,
    api_url: &str,
    token: &[u8],
    slug: &str,
    payload: &serde_json::Value,
) -> Result<(), SendError> {
    let sha = payload["build"]["revision"].as_str().unwrap_or_default();
    let (state, description) = status_of(
        payload["event"].as_str().unwrap_or_default(),
        payload["build"]["state"].as_str().unwrap_or_default(),
        payload["failing_step"].as_str(),
    );
    let body = serde_json::json!({
        "state": state,
        "target_url": payload["build"]["url"],
        // GitHub takes at most 140 characters.
        "description": description.chars().take(140).collect::<String>(),
        "context": payload["context"],
    });
    let resp = http
        .post(format!("{api_url}/repos/{slug}/statuses/{sha}"))
        .timeout(super::webhook::TIMEOUT)
        .bearer_auth(String::from_utf8_lossy(token))
        .header(reqwest::header::ACCEPT, "application/vnd.github+json")
        .header("X-GitHub-Api-Version", "2022-11-28")
        .header(reqwest::header::USER_AGENT, concat!("paddock/", env!("CARGO_PKG_VERSION")))
        .json(&body)
        .send()
        .await
        .map_err(|e| SendError::Retry(format!("cannot reach GitHub: {}", crate::tls::error_chain(&e.without_url()))))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let why = format!("GitHub answered {status} for {slug}@{sha}");
    match status.as_u16() {
        // 403 is also GitHub's rate limit answer.
        403 | 408 | 429 | 500..=599 => Err(SendError::Retry(why)),
        _ => Err(SendError::Refused(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_from_remote_urls() {
        let gh = "github.com";
        assert_eq!(slug_of("https://github.com/acme/app.git", gh).as_deref(), Some("acme/app"));
        assert_eq!(slug_of("https://github.com/acme/app", gh).as_deref(), Some("acme/app"));
        assert_eq!(slug_of("git@github.com:acme/app.git", gh).as_deref(), Some("acme/app"));
        assert_eq!(slug_of("ssh://git@ghe.example.com/acme/app/", "ghe.example.com").as_deref(), Some("acme/app"));
        assert_eq!(slug_of("https://gitlab.com/acme/app", gh), None, "another host");
        assert_eq!(slug_of("file:///srv/git/app", gh), None);
        assert_eq!(slug_of("/srv/git/app", gh), None);
        assert_eq!(slug_of("repo", gh), None);
        assert_eq!(slug_of("https://github.com/", gh), None);
    }

    #[test]
    fn repository_host_of_the_api() {
        assert_eq!(repo_host("https://api.github.com"), "github.com");
        assert_eq!(repo_host("https://ghe.example.com/api/v3"), "ghe.example.com");
    }

    #[test]
    fn statuses() {
        assert_eq!(status_of("started", "running", None).0, "pending");
        assert_eq!(status_of("finished", "success", None).0, "success");
        assert_eq!(status_of("finished", "failure", Some("pytest")), ("failure", "Failed at step: pytest".into()));
        assert_eq!(status_of("finished", "exception", None).0, "error");
        assert_eq!(status_of("finished", "cancelled", None), ("error", "Build cancelled".into()));
    }
}
