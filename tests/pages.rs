//! The pages over plain HTTP against the real binary: login (with its CSRF cookie), the
//! session cookie's attributes, CSRF on every form, roles on pages and actions, escaping of
//! commit messages and log lines, the live log stream, logout. The browser tests drive the same
//! pages in Chromium.

mod common;

use std::collections::BTreeMap;

use common::Bed;
use reqwest::blocking::Client;

/// A visitor: a client that keeps cookies by hand, so the tests can read their attributes.
struct Visitor {
    client: Client,
    base: String,
    cookies: BTreeMap<String, String>,
    /// Every Set-Cookie seen, raw.
    set_cookies: Vec<String>,
}

struct Page {
    status: u16,
    location: Option<String>,
    retry_after: Option<String>,
    cache_control: Option<String>,
    content_type: String,
    body: String,
}

impl Visitor {
    fn new(bed: &Bed) -> Visitor {
        Visitor { client: Bed::client(None), base: bed.url(), cookies: BTreeMap::new(), set_cookies: Vec::new() }
    }

    fn send(&mut self, req: reqwest::blocking::RequestBuilder) -> Page {
        let cookie: Vec<String> = self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let req = if cookie.is_empty() { req } else { req.header("cookie", cookie.join("; ")) };
        let resp = req.send().expect("request");
        for v in resp.headers().get_all("set-cookie") {
            let raw = v.to_str().expect("ascii").to_string();
            let pair = raw.split(';').next().unwrap_or("");
            if let Some((k, v)) = pair.split_once('=') {
                if v.is_empty() || raw.contains("Max-Age=0") {
                    self.cookies.remove(k);
                } else {
                    self.cookies.insert(k.to_string(), v.to_string());
                }
            }
            self.set_cookies.push(raw);
        }
        Page {
            status: resp.status().as_u16(),
            location: resp.headers().get("location").map(|v| v.to_str().unwrap_or("").to_string()),
            retry_after: resp.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_string()),
            cache_control: resp.headers().get("cache-control").map(|v| v.to_str().unwrap_or("").to_string()),
            content_type: resp
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("").to_string())
                .unwrap_or_default(),
            body: resp.text().unwrap_or_default(),
        }
    }

    fn get(&mut self, path: &str) -> Page {
        let req = self.client.get(format!("{}{path}", self.base));
        self.send(req)
    }

    fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let req = self.client.post(format!("{}{path}", self.base)).form(form);
        self.send(req)
    }

    /// Logs in through the form; returns the session's CSRF token (from the next page).
    fn login(&mut self, name: &str, password: &str) -> String {
        let form = self.get("/login?next=/");
        assert_eq!(form.status, 200);
        let token = hidden(&form.body, "csrf");
        let done = self.post("/login", &[("name", name), ("password", password), ("csrf", &token), ("next", "/")]);
        assert_eq!(done.status, 303, "login of {name}: {}", done.body);
        let console = self.get("/");
        assert_eq!(console.status, 200);
        hidden(&console.body, "csrf")
    }
}

/// The value of the first hidden input named `name`.
fn hidden(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let at = html.find(&marker).unwrap_or_else(|| panic!("no hidden {name} in:\n{html}"));
    let rest = &html[at + marker.len()..];
    rest[..rest.find('"').expect("end quote")].to_string()
}

const MESSAGE: &str = "<script>alert(\"owned\")</script> & fix";

fn config(extra: &str) -> String {
    format!(
        "{extra}\n[pool.local]\nmax_instances = 2\nidle_timeout = \"30s\"\nboot_timeout = \"60s\"\n\n\
         [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"echo '<b>bold</b> & more'\"]\n\n\
         [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n"
    )
}

#[test]
fn login_roles_csrf_and_escaping_on_the_pages() {
    let mut bed = Bed::new(&[]);
    bed.config("", &config("[web]\naccess = \"login\"\n"));
    bed.start(&["main"]);
    bed.add_user("carl", "committer", "carl-password");
    bed.add_user("vera", "viewer", "vera-password");
    bed.host_cli(&["user", "add", "ada", "--role", "admin", "--password-stdin"], "ada-password\n");
    let rev = bed.commit("main", "a.txt", "1\n", MESSAGE);
    let first = bed.wait("the change's build", || bed.builds().into_iter().find(|b| b["revision"] == rev.as_str()));
    let first = first["id"].as_i64().expect("id");
    bed.wait("the build to succeed", || (bed.get(&format!("/api/builds/{first}"))["state"] == "success").then_some(()));

    // Logged out, every page sends to the login page and back.
    let mut anon = Visitor::new(&bed);
    for path in ["/", "/changes", "/builders", "/machines", "/cost", &format!("/builds/{first}")] {
        let p = anon.get(path);
        assert_eq!(p.status, 303, "{path}");
        let expected = format!("/login?next={path}");
        assert_eq!(p.location.as_deref(), Some(expected.as_str()), "{path}");
    }
    assert_eq!(anon.get(&format!("/builds/{first}/log/stream")).status, 303);
    assert_eq!(anon.post("/force", &[("builder", "b"), ("branch", "main")]).status, 303, "to the login page");

    // The login form: a token tied to a cookie; wrong passwords and foreign posts refused.
    let form = anon.get("/login?next=/changes");
    let login_cookie = anon.set_cookies.last().cloned().unwrap_or_default();
    assert!(login_cookie.starts_with("paddock_login="), "{login_cookie}");
    assert!(login_cookie.contains("HttpOnly") && login_cookie.contains("SameSite=Strict"), "{login_cookie}");
    let token = hidden(&form.body, "csrf");
    let wrong = anon.post("/login", &[("name", "carl"), ("password", "nope-nope"), ("csrf", &token), ("next", "/")]);
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("wrong name or password"), "{}", wrong.body);
    // The page shown again carries a fresh token.
    let token = hidden(&wrong.body, "csrf");
    let nobody = anon.post("/login", &[("name", "zed"), ("password", "whatever1"), ("csrf", &token), ("next", "/")]);
    assert_eq!(nobody.status, 401, "an unknown name reads the same as a wrong password");
    let mut foreign = Visitor::new(&bed);
    let forged = foreign.post("/login", &[("name", "carl"), ("password", "carl-password"), ("csrf", &token)]);
    assert_eq!(forged.status, 403, "a login form without its cookie is refused");
    assert!(!foreign.cookies.contains_key("paddock_session"));

    // Logged in: the session cookie's attributes, and back where we were going.
    let form = anon.get("/login?next=/changes");
    let token = hidden(&form.body, "csrf");
    let ok =
        anon.post("/login", &[("name", "carl"), ("password", "carl-password"), ("csrf", &token), ("next", "/changes")]);
    assert_eq!((ok.status, ok.location.as_deref()), (303, Some("/changes")));
    let session = anon.set_cookies.iter().find(|c| c.starts_with("paddock_session=")).cloned().expect("session cookie");
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age="] {
        assert!(session.contains(attr), "{attr} in {session}");
    }
    assert!(!session.contains("Secure"), "plain http: no Secure flag ({session})");
    let mut carl = anon;
    let off_site = carl.post(
        "/login",
        &[("name", "carl"), ("password", "carl-password"), ("csrf", "x"), ("next", "https://evil.example/")],
    );
    assert_eq!(off_site.status, 403);

    // Escaping: the commit message and the log lines are text, never markup.
    let resp = Bed::client(None)
        .get(format!("{}/", bed.url()))
        .header("cookie", format!("paddock_session={}", carl.cookies["paddock_session"]))
        .send()
        .expect("GET /");
    for (name, value) in [
        ("x-frame-options", "DENY"),
        ("content-security-policy", "frame-ancestors 'none'"),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(resp.headers().get(name).and_then(|v| v.to_str().ok()), Some(value), "{name}");
    }
    let console = carl.get("/");
    assert_eq!(console.status, 200);
    assert!(console.content_type.starts_with("text/html"), "{}", console.content_type);
    assert!(console.body.contains("carl (committer)"), "{}", console.body);
    for page in [console.body.clone(), carl.get("/changes").body] {
        assert!(page.contains("&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt; &amp; fix"), "{page}");
        assert!(!page.contains("<script>alert("), "{page}");
    }
    let build_page = carl.get(&format!("/builds/{first}"));
    assert!(build_page.body.contains("&lt;b&gt;bold&lt;/b&gt; &amp; more"), "{}", build_page.body);
    assert!(!build_page.body.contains("<b>bold</b>"));
    assert!(build_page.body.contains("&lt;script&gt;alert("), "the build's change is shown, escaped");

    // Forms need the session's CSRF token.
    let csrf = hidden(&console.body, "csrf");
    assert_eq!(carl.post("/force", &[("builder", "b"), ("branch", "main")]).status, 403);
    assert_eq!(carl.post("/force", &[("builder", "b"), ("branch", "main"), ("csrf", "forged")]).status, 403);
    assert_eq!(carl.post(&format!("/builds/{first}/rebuild"), &[]).status, 403);
    let forced = carl.post("/force", &[("builder", "b"), ("branch", "main"), ("revision", ""), ("csrf", &csrf)]);
    assert_eq!(forced.status, 303, "{}", forced.body);
    let to = forced.location.expect("where the build is");
    assert!(to.starts_with("/builds/"), "{to}");
    let bad = carl.post("/force", &[("builder", "nope"), ("branch", "main"), ("csrf", &csrf)]);
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("unknown builder"), "{}", bad.body);

    // The API with the cookie: writes need the CSRF header too.
    let cookie = format!("paddock_session={}", carl.cookies["paddock_session"]);
    let api = |csrf_header: Option<&str>| {
        let req = Bed::client(None)
            .post(format!("{}/api/builds", bed.url()))
            .header("cookie", &cookie)
            .json(&serde_json::json!({"builder": "b", "branch": "main"}));
        let req = match csrf_header {
            Some(h) => req.header("x-csrf-token", h),
            None => req,
        };
        req.send().expect("POST").status().as_u16()
    };
    assert_eq!(api(None), 403);
    assert_eq!(api(Some("forged")), 403);
    assert_eq!(api(Some(&csrf)), 201);

    // The finished build's log streams to its end, then says done.
    let stream = carl.get(&format!("/builds/{first}/log/stream?after=0"));
    assert!(stream.content_type.starts_with("text/event-stream"), "{}", stream.content_type);
    assert!(stream.body.contains("event: log"), "{}", stream.body);
    assert!(stream.body.contains("<b>bold</b> & more"), "log text travels as JSON text: {}", stream.body);
    assert!(stream.body.contains("event: done\ndata: success"), "{}", stream.body);
    let download = carl.get(&format!("/builds/{first}/log.txt"));
    assert!(download.body.contains("<b>bold</b> & more"));

    // A committer sees no cost and cannot act as an admin.
    assert_eq!(carl.get("/cost").status, 403);
    assert!(!carl.get("/machines").body.contains("Cost so far"));
    assert!(!console.body.contains("href=\"/cost\""));

    // A viewer: no forms to act, and refused when trying.
    let mut vera = Visitor::new(&bed);
    let vera_csrf = vera.login("vera", "vera-password");
    let page = vera.get("/");
    assert!(!page.body.contains("id=\"force\""), "no force form for a viewer");
    let refused = vera.post("/force", &[("builder", "b"), ("branch", "main"), ("csrf", &vera_csrf)]);
    assert_eq!(refused.status, 403);
    assert!(refused.body.contains("needs the committer role"), "{}", refused.body);
    assert_eq!(vera.post(&format!("/builds/{first}/cancel"), &[("csrf", &vera_csrf)]).status, 403);

    // An admin: the cost dashboard with its chart, and machines with their cost.
    let mut ada = Visitor::new(&bed);
    ada.login("ada", "ada-password");
    let cost = ada.get("/cost");
    assert_eq!(cost.status, 200, "{}", cost.body);
    assert!(cost.body.contains("<svg id=\"cost-chart\""), "{}", cost.body);
    assert!(cost.body.contains("class=\"busy\""), "{}", cost.body);
    assert!(cost.body.contains("id=\"cost-by-builder\""));
    assert!(cost.body.contains("/api/cost?since=30d&amp;by=day&amp;format=csv"), "{}", cost.body);
    assert!(ada.get("/machines").body.contains("Cost so far"));
    let csv = ada.get("/api/cost?since=30d&by=day&format=csv");
    assert_eq!(csv.status, 200);
    assert!(csv.body.starts_with("key,label,cost,"), "{}", csv.body);

    // The actions' forms: the admin pauses the pool, the committer's forced build waits and is
    // cancelled, the admin resumes; a rebuild; the admin terminates the idle machine.
    let ada_csrf = hidden(&ada.get("/machines").body, "csrf");
    let paused = ada.post("/pools/local/pause", &[("csrf", &ada_csrf)]);
    assert_eq!((paused.status, paused.location.as_deref()), (303, Some("/machines")));
    assert!(ada.get("/machines").body.contains("paused by ada"));
    let waiting = carl.post("/force", &[("builder", "b"), ("branch", "main"), ("csrf", &csrf)]);
    let waiting = waiting.location.expect("the build").trim_start_matches("/builds/").parse::<i64>().expect("id");
    let page = carl.get(&format!("/builds/{waiting}"));
    assert!(page.body.contains("id=\"cancel\""), "a cancel button while queued");
    let cancelled = carl.post(&format!("/builds/{waiting}/cancel"), &[("csrf", &csrf)]);
    assert_eq!(cancelled.status, 303);
    let row = bed.get(&format!("/api/builds/{waiting}"));
    assert_eq!((row["state"].as_str(), row["cancelled_by"].as_str()), (Some("cancelled"), Some("carl")));
    assert!(carl.get(&format!("/builds/{waiting}")).body.contains("Cancelled by"));
    assert_eq!(ada.post("/pools/local/resume", &[("csrf", &ada_csrf)]).status, 303);
    let rebuilt = carl.post(&format!("/builds/{first}/rebuild"), &[("csrf", &csrf)]);
    assert_eq!(rebuilt.status, 303);
    let again = rebuilt.location.expect("the rebuild").trim_start_matches("/builds/").parse::<i64>().expect("id");
    let done =
        bed.wait("the rebuild", || Some(bed.get(&format!("/api/builds/{again}"))).filter(|b| b["state"] == "success"));
    assert_eq!(done["revision"], rev.as_str());
    let machine = done["machine"].as_i64().expect("machine");
    let stop = ada.post(&format!("/machines/{machine}/terminate"), &[("csrf", &ada_csrf)]);
    assert_eq!(stop.status, 303, "{}", stop.body);
    bed.wait("the machine to be gone", || {
        bed.machines().into_iter().find(|m| m["id"] == machine && m["state"] == "gone").map(|_| ())
    });
    assert_eq!(carl.post(&format!("/machines/{machine}/terminate"), &[("csrf", &csrf)]).status, 403);

    // Logout ends the session on the master, not only in the browser.
    let old = carl.cookies["paddock_session"].clone();
    let out = carl.post("/logout", &[("csrf", &csrf)]);
    assert_eq!(out.status, 303);
    assert!(!carl.cookies.contains_key("paddock_session"));
    carl.cookies.insert("paddock_session".into(), old);
    assert_eq!(carl.get("/").status, 303, "the old cookie no longer works");
}

#[test]
fn an_https_master_marks_its_session_cookie_secure() {
    let mut bed = Bed::new(&[]);
    let port = bed.port;
    bed.config_with_master(&format!("listen = \"127.0.0.1:{port}\""), "", &config(""));
    let text = std::fs::read_to_string(bed.path().join("paddock.toml")).expect("config");
    std::fs::write(bed.path().join("paddock.toml"), text.replace("url = \"http://", "url = \"https://"))
        .expect("write");
    bed.start(&["main"]);
    bed.add_user("carl", "committer", "carl-password");
    let mut v = Visitor::new(&bed);
    let form = v.get("/login");
    assert_eq!(form.status, 200, "anonymous may look at a public master's login page");
    let token = hidden(&form.body, "csrf");
    let ok = v.post("/login", &[("name", "carl"), ("password", "carl-password"), ("csrf", &token)]);
    assert_eq!(ok.status, 303);
    let session = v.set_cookies.iter().find(|c| c.starts_with("paddock_session=")).cloned().expect("cookie");
    assert!(session.contains("Secure"), "{session}");
    // Public: the console is open to anonymous visitors, with a login link and no forms.
    let mut anon = Visitor::new(&bed);
    let console = anon.get("/");
    assert_eq!(console.status, 200);
    assert!(console.body.contains("href=\"/login\"") && !console.body.contains("id=\"force\""));
}

#[test]
fn password_guessing_for_a_name_is_stopped_for_a_while_without_locking_out_others() {
    let mut bed = Bed::new(&[]);
    bed.config("", &config(""));
    bed.start(&["main"]);
    bed.add_user("carl", "committer", "carl-password");
    bed.add_user("dora", "viewer", "dora-password");
    let mut v = Visitor::new(&bed);
    let token = hidden(&v.get("/login").body, "csrf");
    let try_login = |v: &mut Visitor, name: &str, password: &str| {
        v.post("/login", &[("name", name), ("password", password), ("csrf", &token), ("next", "/")])
    };
    for guess in ["password", "123456", "carl", "letmein", "qwerty"] {
        let page = try_login(&mut v, "carl", guess);
        assert_eq!(page.status, 401, "{guess}");
        assert!(page.body.contains("wrong name or password"));
    }
    // The sixth try waits, even with the right password: nothing is checked meanwhile.
    let refused = try_login(&mut v, "Carl", "carl-password");
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.body.contains("too many failed logins; try again in 15 minutes"), "{}", refused.body);
    let wait: u64 = refused.retry_after.as_deref().and_then(|r| r.parse().ok()).expect("Retry-After in seconds");
    assert!((1..=900).contains(&wait), "{wait}");
    assert!(!v.cookies.contains_key("paddock_session"));
    // Another name from the same address logs in; so do API tokens.
    assert_eq!(try_login(&mut v, "dora", "dora-password").status, 303);
    assert!(v.cookies.contains_key("paddock_session"));
    assert!(bed.get("/api/builds")["builds"].is_array());

    // Guesses sent side by side are counted before any is checked: exactly the limit get a
    // password check; the rest wait.
    let token = hidden(&Visitor::new(&bed).get("/login").body, "csrf");
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let tries: Vec<_> = (0..20)
            .map(|i| {
                let (bed, token) = (&bed, &token);
                scope.spawn(move || {
                    let mut v = Visitor::new(bed);
                    v.cookies.insert("paddock_login".into(), token.clone());
                    let guess = format!("guess-{i}");
                    v.post("/login", &[("name", "dora"), ("password", &guess), ("csrf", token)]).status
                })
            })
            .collect();
        tries.into_iter().map(|t| t.join().expect("try")).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 5, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 15, "{statuses:?}");
}

/// The text of the element with `id` (the first `>` after it up to the next `<`).
fn text_of(html: &str, id: &str) -> String {
    let at = html.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id} in:\n{html}"));
    let rest = &html[at..];
    let start = rest.find('>').expect("tag end") + 1;
    rest[start..start + rest[start..].find('<').expect("next tag")].to_string()
}

#[test]
fn a_user_manages_own_tokens_password_and_sessions_from_the_account_page() {
    let mut bed = Bed::new(&[]);
    bed.config("", &config("[web]\naccess = \"login\"\n"));
    bed.start(&["main"]);
    bed.add_user("carl", "committer", "carl-password");
    let dora_token = bed.add_user("dora", "viewer", "dora-password");
    assert_eq!(Visitor::new(&bed).get("/account").location.as_deref(), Some("/login?next=/account"));
    let mut v = Visitor::new(&bed);
    let csrf = v.login("carl", "carl-password");
    let mut other = Visitor::new(&bed);
    other.login("carl", "carl-password");
    let page = v.get("/account");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<strong>carl</strong>, a committer") && page.body.contains("<td>tests</td>"),
        "{}",
        page.body
    );

    // A token, shown once, works as carl; the list shows it.
    // Making one asks for the password: a borrowed session cannot mint a lasting token.
    let refused = v.post("/account/tokens", &[("csrf", &csrf), ("name", "laptop"), ("password", "guess")]);
    assert_eq!((refused.status, text_of(&refused.body, "account-error")), (401, "the password is wrong".into()));
    let made = v.post("/account/tokens", &[("csrf", &csrf), ("name", "laptop"), ("password", "carl-password")]);
    assert_eq!(made.status, 200, "{}", made.body);
    assert_eq!(made.cache_control.as_deref(), Some("no-store"), "the secret is not kept in caches");
    let secret = text_of(&made.body, "secret");
    assert!(secret.starts_with("pdk_") && secret.len() == 68, "{secret}");
    let api =
        |token: &str| Bed::client(Some(token)).get(format!("{}/api/builds", bed.url())).send().expect("api").status();
    assert_eq!(api(&secret), 200);
    let page = v.get("/account");
    assert!(page.body.contains("<td>laptop</td>") && !page.body.contains(&secret), "shown only once");
    // Not without a name, nor with the API token itself (a leaked token must not breed).
    assert_eq!(v.post("/account/tokens", &[("csrf", &csrf), ("name", " "), ("password", "carl-password")]).status, 400);
    let by_token = Bed::client(Some(&secret))
        .post(format!("{}/account/tokens", bed.url()))
        .form(&[("name", "more"), ("password", "carl-password")])
        .send()
        .expect("post");
    assert_eq!(by_token.status().as_u16(), 403);
    assert_eq!(
        v.post("/account/tokens", &[("csrf", "forged"), ("name", "x"), ("password", "carl-password")]).status,
        403
    );

    // Someone else's token is not carl's to revoke; his own goes.
    // (Newest first: carl's first line is the laptop token.)
    let tokens = bed.host_cli(&["token", "list"], "");
    let id_of = |user: &str| -> String {
        tokens
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(user))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no token of {user} in:\n{tokens}"))
            .to_string()
    };
    let (dora_id, carl_id) = (id_of("dora"), id_of("carl"));
    assert_eq!(v.post(&format!("/account/tokens/{dora_id}/revoke"), &[("csrf", &csrf)]).status, 404);
    assert_eq!(api(&dora_token), 200);
    assert_eq!(v.post(&format!("/account/tokens/{carl_id}/revoke"), &[("csrf", &csrf)]).status, 303);
    assert_eq!(api(&secret), 401);

    // The password: the current one first, the new twice and long enough; then every session ends.
    let change = |v: &mut Visitor, current: &str, new: &str, repeat: &str| {
        v.post("/account/password", &[("csrf", &csrf), ("current", current), ("new", new), ("repeat", repeat)])
    };
    let wrong = change(&mut v, "guess", "new-password", "new-password");
    assert_eq!(wrong.status, 401);
    assert_eq!(text_of(&wrong.body, "account-error"), "the password is wrong");
    assert_eq!(change(&mut v, "carl-password", "new-password", "other-password").status, 400);
    let short = change(&mut v, "carl-password", "short", "short");
    assert_eq!((short.status, text_of(&short.body, "account-error").contains("at least 8")), (400, true));
    let done = change(&mut v, "carl-password", "new-password", "new-password");
    assert_eq!((done.status, done.location.as_deref()), (303, Some("/login?next=/account")));
    assert!(!v.cookies.contains_key("paddock_session"), "the browser is told to forget it");
    assert_eq!(v.get("/account").status, 303, "this session ended");
    assert_eq!(other.get("/account").status, 303, "and the other one");
    let mut again = Visitor::new(&bed);
    let token = hidden(&again.get("/login").body, "csrf");
    assert_eq!(again.post("/login", &[("name", "carl"), ("password", "carl-password"), ("csrf", &token)]).status, 401);
    let csrf = again.login("carl", "new-password");

    // Log out everywhere, and (when asked) revoke every token too.
    let mut second = Visitor::new(&bed);
    second.login("carl", "new-password");
    let carl_tests_token = bed.host_cli(&["token", "create", "carl", "--name", "ci"], "").trim().to_string();
    assert_eq!(api(&carl_tests_token), 200);
    let out = again.post("/account/logout-all", &[("csrf", &csrf)]);
    assert_eq!(out.location.as_deref(), Some("/login"));
    assert_eq!(again.get("/account").status, 303);
    assert_eq!(second.get("/account").status, 303);
    assert_eq!(api(&carl_tests_token), 200, "tokens stay unless asked");
    let csrf = again.login("carl", "new-password");
    again.post("/account/logout-all", &[("csrf", &csrf), ("revoke_tokens", "on")]);
    assert_eq!(api(&carl_tests_token), 401);
    assert_eq!(api(&dora_token), 200, "only carl's");
}

#[test]
fn admins_add_users_set_roles_and_remove_them_from_the_users_page() {
    let mut bed = Bed::new(&[]);
    bed.config("", &config("[web]\naccess = \"login\"\n"));
    bed.start(&["main"]);
    bed.host_cli(&["user", "add", "ada", "--role", "admin", "--password-stdin"], "ada-password\n");
    bed.add_user("carl", "committer", "carl-password");
    let mut carl = Visitor::new(&bed);
    let carl_csrf = carl.login("carl", "carl-password");
    assert_eq!(carl.get("/users").status, 403, "admins only");
    let form = |csrf: &str, name: &str, role: &str, theirs: &str, mine: &str| -> Vec<(String, String)> {
        [("csrf", csrf), ("name", name), ("role", role), ("new_password", theirs), ("password", mine)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let post_form = |v: &mut Visitor, f: &[(String, String)]| {
        let pairs: Vec<(&str, &str)> = f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        v.post("/users", &pairs)
    };
    assert_eq!(post_form(&mut carl, &form(&carl_csrf, "x", "admin", "long-enough", "carl-password")).status, 403);
    assert!(!carl.get("/").body.contains("href=\"/users\""));

    let mut ada = Visitor::new(&bed);
    let csrf = ada.login("ada", "ada-password");
    let page = ada.get("/users");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("admin (you)") && page.body.contains("<td>carl</td>"), "{}", page.body);
    let add = |v: &mut Visitor, name: &str, role: &str, password: &str| {
        post_form(v, &form(&csrf, name, role, password, "ada-password"))
    };
    // The admin's own password is asked for: an unattended browser cannot make an admin.
    let unconfirmed = post_form(&mut ada, &form(&csrf, "x", "admin", "long-enough", "guess"));
    assert_eq!((unconfirmed.status, text_of(&unconfirmed.body, "users-error")), (401, "the password is wrong".into()));
    // Nor can an admin's API token.
    let by_token = Bed::client(Some(bed.token()))
        .post(format!("{}/users", bed.url()))
        .form(&form("", "x", "admin", "long-enough", "x"))
        .send()
        .expect("post");
    assert_eq!(by_token.status().as_u16(), 403);
    assert_eq!(add(&mut ada, "..", "viewer", "long-enough").status, 400, "a name that reads as a path");
    assert_eq!(add(&mut ada, "dora", "viewer", "dora-password").status, 303);
    let taken = add(&mut ada, "dora", "viewer", "dora-password");
    assert_eq!((taken.status, text_of(&taken.body, "users-error")), (409, "dora exists already".into()));
    assert_eq!(add(&mut ada, "bad name", "viewer", "long-enough").status, 400);
    assert_eq!(add(&mut ada, "eve", "root", "long-enough").status, 400);
    assert_eq!(add(&mut ada, "eve", "viewer", "short").status, 400);
    assert_eq!(post_form(&mut ada, &form("forged", "eve", "viewer", "long-enough", "ada-password")).status, 403);
    let mut dora = Visitor::new(&bed);
    dora.login("dora", "dora-password");
    assert_eq!(dora.get("/cost").status, 403);

    // A role change applies to the next request; oneself is off limits.
    let set = |v: &mut Visitor, name: &str, role: &str, password: &str| {
        v.post(&format!("/users/{name}/role"), &[("csrf", &csrf), ("role", role), ("password", password)])
    };
    assert_eq!(set(&mut ada, "dora", "admin", "guess").status, 401);
    assert_eq!(dora.get("/cost").status, 403);
    assert_eq!(set(&mut ada, "dora", "admin", "ada-password").status, 303);
    assert_eq!(dora.get("/cost").status, 200);
    assert_eq!(set(&mut ada, "ada", "viewer", "ada-password").status, 409);
    assert_eq!(ada.post("/users/ada/remove", &[("csrf", &csrf)]).status, 409);
    assert_eq!(set(&mut ada, "nobody", "viewer", "ada-password").status, 404);

    // Removing a user ends their sessions and revokes their tokens.
    let carl_token = bed.host_cli(&["token", "create", "carl"], "").trim().to_string();
    assert_eq!(ada.post("/users/carl/remove", &[("csrf", &csrf)]).status, 303);
    assert_eq!(carl.get("/").status, 303, "sent to log in");
    let api = Bed::client(Some(&carl_token)).get(format!("{}/api/builds", bed.url())).send().expect("api");
    assert_eq!(api.status().as_u16(), 401);
    assert!(!ada.get("/users").body.contains("<td>carl</td>"));
}
