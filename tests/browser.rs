//! The UI in a real browser: Debian's headless Chromium driven through its ChromeDriver. A
//! logged-out visitor is sent to the login page; a committer logs in, watches a build go from
//! running to success with its log lines arriving live, and forces a build from the console;
//! an admin opens the cost dashboard and sees the chart; a viewer has no force form and is
//! refused when posting one anyway. Screenshots of every page go to a folder the test prints.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Bed, DEADLINE};
use fantoccini::{Client, ClientBuilder, Locator};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// ChromeDriver on a free port, killed with the test.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: the browser tests need Debian's chromium and chromium-driver \
             (apt-get install chromium chromium-driver; .ci/test installs them)"
        );
    }
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver { child, port };
    let http = Bed::client(None);
    let start = Instant::now();
    while !http.get(format!("http://127.0.0.1:{port}/status")).send().is_ok_and(|r| r.status().is_success()) {
        assert!(start.elapsed() < DEADLINE, "chromedriver did not answer on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    driver
}

/// A browser session driven synchronously from the test (the bed's helpers block).
struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    base: String,
    shots: PathBuf,
}

impl Browser {
    fn open(driver: &Driver, base: &str, shots: PathBuf) -> Browser {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]
            }
        });
        let client = rt.block_on(async {
            let mut b = ClientBuilder::rustls().expect("rustls connector");
            b.capabilities(caps.as_object().cloned().unwrap_or_default());
            b.connect(&format!("http://127.0.0.1:{}", driver.port)).await.expect("a Chromium session")
        });
        Browser { rt, client: Some(client), base: base.to_string(), shots }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("open")
    }

    fn goto(&self, path: &str) {
        self.rt.block_on(self.c().goto(&format!("{}{path}", self.base))).expect("goto");
    }

    fn path(&self) -> String {
        let url = self.rt.block_on(self.c().current_url()).expect("url");
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        }
    }

    fn text(&self, css: &str) -> Option<String> {
        self.rt.block_on(async { self.c().find(Locator::Css(css)).await.ok()?.text().await.ok() })
    }

    fn exists(&self, css: &str) -> bool {
        self.rt.block_on(async { self.c().find_all(Locator::Css(css)).await.map(|v| !v.is_empty()).unwrap_or(false) })
    }

    fn count(&self, css: &str) -> usize {
        self.rt.block_on(async { self.c().find_all(Locator::Css(css)).await.map(|v| v.len()).unwrap_or(0) })
    }

    fn fill(&self, css: &str, value: &str) {
        self.rt
            .block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.clear().await?;
                e.send_keys(value).await
            })
            .unwrap_or_else(|e| panic!("fill {css}: {e}"));
    }

    fn click(&self, css: &str) {
        self.rt
            .block_on(async { self.c().find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    fn select(&self, css: &str, value: &str) {
        self.rt
            .block_on(async { self.c().find(Locator::Css(css)).await?.select_by_value(value).await })
            .unwrap_or_else(|e| panic!("select {value} in {css}: {e}"));
    }

    fn script(&self, js: &str) -> serde_json::Value {
        self.rt.block_on(self.c().execute(js, vec![])).expect("script")
    }

    /// Polls until `f` gives `Some`, failing after the deadline with what the page shows.
    fn wait<T>(&self, what: &str, mut f: impl FnMut(&Browser) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if start.elapsed() > DEADLINE {
                let html = self.rt.block_on(self.c().source()).unwrap_or_default();
                panic!("timed out waiting for {what} at {}\n{html}", self.path());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, name: &str) {
        let png = self.rt.block_on(self.c().screenshot()).expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("write screenshot");
    }

    fn login(&self, name: &str, password: &str) {
        self.goto("/login");
        self.fill("#name", name);
        self.fill("#password", password);
        self.click("#login button[type=submit]");
        self.wait(&format!("{name} logged in"), |b| b.text("#user").filter(|t| t.starts_with(name)));
    }

    fn logout(&self) {
        self.click("nav form button[type=submit]");
        self.wait("logged out", |b| (b.path().starts_with("/login") || b.exists("nav a[href='/login']")).then_some(()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
    }
}

#[test]
fn committers_watch_builds_live_force_builds_and_admins_see_costs() {
    let driver = start_driver();
    let mut bed = Bed::new(&[]);
    let go1 = bed.flag("go1");
    let go2 = bed.flag("go2");
    let wait_for = |f: &PathBuf| format!("while [ ! -e {} ]; do sleep 0.1; done", f.display());
    bed.config(
        "",
        &format!(
            "[web]\naccess = \"login\"\n\n\
             [pool.local]\nmax_instances = 2\nidle_timeout = \"60s\"\nboot_timeout = \"60s\"\nhourly_price = 360.0\n\n\
             [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\n\
             steps = [\"echo line-one; {}; echo line-two; {}; echo line-three\"]\n\n\
             [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n",
            wait_for(&go1),
            wait_for(&go2)
        ),
    );
    bed.start(&["main"]);
    bed.add_user("carl", "committer", "carl-password");
    bed.add_user("vera", "viewer", "vera-password");
    bed.add_user("ada", "admin", "ada-password");

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).expect("screenshots folder");
    // Written past the test harness's capture, so it shows in every run's output.
    let _ = writeln!(std::io::stderr(), "browser test screenshots: {}", shots.display());
    let browser = Browser::open(&driver, &bed.url(), shots.clone());

    // Logged out: the console sends to the login page.
    browser.goto("/");
    browser.wait("the login page", |b| (b.path() == "/login?next=/").then_some(()));
    browser.screenshot("login");

    // A committer watches a build run, its log lines arriving without a reload.
    browser.login("carl", "carl-password");
    let rev = bed.commit("main", "a.txt", "1\n", "Make the widget <blink>faster</blink>");
    let build = bed.wait("the build to run", || {
        bed.builds().into_iter().find(|b| b["revision"] == rev.as_str() && b["state"] == "running")
    });
    let id = build["id"].as_i64().expect("id");
    browser.goto(&format!("/builds/{id}"));
    browser.wait("the first log line", |b| b.text("#log").filter(|t| t.contains("line-one")));
    assert_eq!(browser.text("#state").as_deref(), Some("running"));
    // Marks this page load: a reload would lose it, so seeing it later proves the log was live.
    browser.script("window.stillThisPage = true;");
    std::fs::write(&go1, "").expect("go1");
    browser.wait("the second line, live", |b| b.text("#log").filter(|t| t.contains("line-two")));
    assert_eq!(browser.script("return window.stillThisPage === true;"), serde_json::json!(true), "no reload");
    browser.screenshot("build-running");
    std::fs::write(&go2, "").expect("go2");
    browser.wait("the build to succeed", |b| b.text("#state").filter(|t| t == "success"));
    let log = browser.text("#log").unwrap_or_default();
    assert!(log.contains("line-three"), "{log}");
    assert!(browser.exists("#download"));
    assert!(browser.text("#build-changes").unwrap_or_default().contains("<blink>faster</blink>"), "shown as text");
    browser.screenshot("build-success");

    // The console shows it, and the committer forces another build from it.
    browser.goto("/");
    browser.wait("the console's cell", |b| b.text("#console").filter(|t| t.contains("success")));
    browser.screenshot("console");
    browser.select("#force select[name=builder]", "b");
    browser.fill("#force input[name=branch]", "main");
    browser.click("#force button[type=submit]");
    let forced = browser.wait("the forced build's page", |b| {
        let p = b.path();
        p.strip_prefix("/builds/").and_then(|n| n.parse::<i64>().ok()).filter(|n| *n != id)
    });
    browser.wait("the forced build to succeed", |b| b.text("#state").filter(|t| t == "success"));
    let api = bed.get(&format!("/api/builds/{forced}"));
    assert_eq!(api["reason"], "forced by carl");
    browser.goto("/changes");
    browser.screenshot("changes");
    browser.goto("/builders");
    browser.screenshot("builders");
    // From the name in the bar to the account page, where a token is made for scripts.
    browser.click("#user");
    browser.wait("the account page", |b| (b.path() == "/account").then_some(()));
    browser.fill("#new-token input[name=name]", "laptop");
    browser.fill("#new-token input[name=password]", "carl-password");
    browser.click("#new-token button[type=submit]");
    let secret = browser.wait("the new token", |b| b.text("#secret"));
    assert!(secret.starts_with("pdk_"), "{secret}");
    let me = Bed::client(Some(&secret)).get(format!("{}/api/builds/{forced}", bed.url())).send().expect("api");
    assert_eq!(me.status().as_u16(), 200);
    browser.screenshot("account");
    browser.logout();

    // A viewer: no force form, and a forged one is refused.
    browser.login("vera", "vera-password");
    browser.goto("/");
    browser.wait("the console", |b| b.exists("#console").then_some(()));
    assert!(!browser.exists("#force"), "no force form for a viewer");
    browser.script(
        "var f = document.createElement('form'); f.method = 'post'; f.action = '/force';\
         for (var [k, v] of [['builder', 'b'], ['branch', 'main'], ['csrf', document.querySelector('input[name=csrf]').value]]) {\
           var i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); }\
         document.body.appendChild(f); f.submit();",
    );
    let refusal = browser.wait("the refusal", |b| b.text("p.error").filter(|t| t.contains("committer")));
    assert!(refusal.contains("needs the committer role"), "{refusal}");
    browser.screenshot("viewer-refused");
    assert_eq!(bed.builds().len(), 2, "the viewer forced nothing");
    browser.goto("/");
    browser.logout();

    // An admin: the cost dashboard with its chart, and the machines with their cost.
    browser.login("ada", "ada-password");
    browser.goto("/cost");
    browser.wait("the chart", |b| b.exists("#cost-chart").then_some(()));
    // A dime a second: the builds' seconds make a visible bar today, one slot per day of 30.
    assert!(browser.count("#cost-chart g.day") >= 30, "a slot per day");
    let tallest = browser.script(
        "return Math.max.apply(null, Array.from(document.querySelectorAll('#cost-chart rect.busy')).map(r => parseFloat(r.getAttribute('height'))));",
    );
    assert!(tallest.as_f64().unwrap_or(0.0) > 1.0, "a visible busy bar: {tallest}");
    assert!(browser.text("#total").unwrap_or_default().starts_with('$'));
    assert!(browser.exists("#cost-by-pool") && browser.exists("#cost-by-builder") && browser.exists("#cost-by-branch"));
    browser.screenshot("cost");
    browser.goto("/machines");
    browser.wait("the machines", |b| b.exists("#machines").then_some(()));
    browser.screenshot("machines");
    browser.goto("/users");
    browser.wait("the users", |b| b.text("#users").filter(|t| t.contains("carl") && t.contains("(you)")));
    browser.screenshot("users");

    for name in [
        "login",
        "build-running",
        "build-success",
        "console",
        "changes",
        "builders",
        "account",
        "viewer-refused",
        "cost",
        "machines",
        "users",
    ] {
        assert!(shots.join(format!("{name}.png")).exists(), "{name}.png");
    }
}
