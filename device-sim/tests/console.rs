//! The web console in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromedriver, on a port it picks), against a real hub with a device-sim fleet connected.
//!
//! They live beside device-sim's tests because they need its fleet: the devices answer
//! methods, take C2D messages and report desired properties the way IoT Edge agents do, and
//! device-sim's summary says what each received. Every page is saved as a screenshot under
//! `target/console-screenshots/` (with `FLEETHUB_UPDATE_SCREENSHOTS=1`, also over the ones the
//! README shows in `docs/console/`), and every test ends by reading the browser's console:
//! nothing may have been logged as an error but the refusals the test provoked.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

mod support;
use support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long a test waits for something to appear on the page.
const PATIENCE: Duration = Duration::from_secs(30);

/// Chromium and its driver, ended by process id on drop, with a temp profile.
struct Browser {
    driver: Child,
    client: Option<Client>,
    profile: PathBuf,
}

/// chromedriver's `se/log` (browser console entries since the last call); fantoccini has no
/// verb for it.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

impl Browser {
    async fn start() -> Browser {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
            );
        }
        let profile = std::env::temp_dir().join(format!(
            "fleethub-console-chromium-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        // "ChromeDriver was started successfully on port N."
        let stdout = driver.stdout.take().expect("chromedriver stdout");
        let port = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let port = lines.by_ref().map_while(Result::ok).find_map(|l| {
                l.split("successfully on port ")
                    .nth(1)
                    .and_then(|p| p.trim_end_matches('.').trim().parse::<u16>().ok())
            });
            // Keep draining so chromedriver never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            port
        })
        .await
        .unwrap()
        .expect("chromedriver's port");
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session in Chromium");
        // A page that takes this long to load is a failure, not something to wait out.
        client
            .update_timeouts(fantoccini::wd::TimeoutConfiguration::new(
                None,
                Some(PATIENCE),
                None,
            ))
            .await
            .expect("page load timeout");
        Browser {
            driver,
            client: Some(client),
            profile,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("browser open")
    }

    async fn goto(&self, url: &str) {
        self.c().goto(url).await.expect("navigate");
    }

    /// Waits for `css` to be on the page.
    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .c()
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(e) => e,
            Err(e) => {
                self.screenshot("failure").await;
                let toast = match self.c().find(Locator::Css("#toast")).await {
                    Ok(t) => t.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                panic!("{css} never appeared ({e}); messages on the page: {toast:?}")
            }
        }
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap_or_default()
    }

    /// Waits until `css`'s text satisfies `ok`; returns it.
    async fn until_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = match self.c().find(Locator::Css(css)).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if ok(&text) {
                return text;
            }
            if Instant::now() > deadline {
                self.screenshot("failure").await;
                panic!("{css}: waited for {what}, last saw {text:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        self.find(css).await.click().await.expect("click");
    }

    async fn fill(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        e.clear().await.expect("clear");
        e.send_keys(text).await.expect("type");
    }

    /// Saves the page as `name.png`.
    async fn screenshot(&self, name: &str) {
        let png = self.c().screenshot().await.expect("screenshot");
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = root.join("target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
        if std::env::var_os("FLEETHUB_UPDATE_SCREENSHOTS").is_some() {
            let docs = root.join("docs/console");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::write(docs.join(format!("{name}.png")), &png).unwrap();
        }
    }

    /// The console entries logged at level SEVERE since the last call, except those that
    /// contain one of `expected`.
    async fn console_errors(&self, expected: &[&str]) -> Vec<String> {
        let log = self.c().issue_cmd(BrowserLog).await.expect("browser log");
        log.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .filter(|m| !expected.iter().any(|x| m.contains(x)))
            .collect()
    }

    async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The API with the admin token (what an operator's script would do beside the console).
async fn api(hub: &Hub, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client
        .request(method, format!("{}{path}", hub.api))
        .bearer_auth(&hub.token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("API call");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Signs in with the keyboard alone: the token field has the focus when the page opens, and
/// Enter submits.
async fn sign_in(b: &Browser, hub: &Hub) {
    b.goto(&format!("{}/ui", hub.api)).await;
    b.find("#token").await;
    let focused = b
        .c()
        .execute(
            "return document.activeElement && document.activeElement.id",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(focused, json!("token"), "the token field has the focus");
    b.c()
        .active_element()
        .await
        .unwrap()
        .send_keys(&format!("{}\u{E007}", hub.token))
        .await
        .unwrap();
    b.find("#overview-cards").await;
}

async fn wait_summary(child: Child) -> Value {
    tokio::task::spawn_blocking(move || summary(child))
        .await
        .unwrap()
}

/// Sign-in (a wrong token refused), the overview counting devices as they connect without a
/// reload, a device's page: live telemetry, desired edited (and the etag conflict shown when
/// someone else wrote first), C2D sent, a method invoked; routes checked as typed; queues;
/// a device created, disabled and deleted with confirmation; sign-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_watches_the_fleet_and_steers_a_device() {
    let hub = Hub::start("");
    let path = scenario(
        &hub.dir,
        r#"
name = "console"
[fleet]
devices = 5
id_prefix = "ui-"
connect_rate = 50
c2d = true
[telemetry]
rate = "2/s"
duration = "90s"
qos = 1
[telemetry.body]
seq = { "$counter" = {} }
temperature = { "$drift" = { start = 21.0, step = 0.5, min = 15.0, max = 30.0 } }
[desired]
apply_delay = "200ms"
"#,
    );
    let b = Browser::start().await;

    // A wrong token: refused, no session.
    b.goto(&format!("{}/ui", hub.api)).await;
    b.fill("#token", "not-the-token").await;
    b.click("#signin-submit").await;
    b.until_text("#signin-error", "the refusal", |t| {
        t.contains("not the admin token")
    })
    .await;
    let (status, _) = (
        reqwest::get(format!("{}/ui/api/hub", hub.api))
            .await
            .unwrap()
            .status()
            .as_u16(),
        (),
    );
    assert_eq!(status, 401, "the console's API without a session");
    b.screenshot("signin").await;

    // Signed in before the fleet starts: the overview counts the devices as they connect.
    b.fill("#token", &hub.token).await;
    b.click("#signin-submit").await;
    b.until_text("#stat-connected", "the first sample", |t| t == "0")
        .await;
    let sim = run_scenario(&path, &hub.data_dir(), &[]);
    let seen = b
        .until_text("#stat-connected", "5 connected", |t| t == "5")
        .await;
    assert_eq!(seen, "5");
    b.until_text("#stat-in", "messages flowing", |t| {
        t.parse::<f64>().is_ok_and(|v| v > 0.0)
    })
    .await;
    assert_eq!(
        b.text("#stat-devices").await,
        "6",
        "5 devices and the hub's own"
    );
    b.screenshot("overview").await;

    // The device list from the twin query language, with each device's group, and a
    // device's page.
    let (status, _) = api(
        &hub,
        reqwest::Method::POST,
        "/products",
        Some(json!({ "name": "Sensor" })),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = api(
        &hub,
        reqwest::Method::PATCH,
        "/devices/ui-1",
        Some(json!({ "deviceGroup": "Sensor/Production" })),
    )
    .await;
    assert_eq!(status, 200);
    b.goto(&format!("{}/ui#/devices", hub.api)).await;
    b.until_text("#device-table tr[data-device='ui-1']", "its group", |t| {
        t.contains("Sensor/Production") && t.contains("connected")
    })
    .await;
    b.fill(
        "#device-query",
        "SELECT * FROM devices WHERE deviceId = 'ui-3'",
    )
    .await;
    b.click("#device-search button[type=submit]").await;
    b.until_text("#device-table tbody", "one row", |t| {
        t.contains("ui-3") && !t.contains("ui-1")
    })
    .await;
    b.screenshot("devices").await;
    let deadline = Instant::now() + PATIENCE;
    while api(&hub, reqwest::Method::GET, "/devices/ui-3", None)
        .await
        .1["connectionState"]
        != "Connected"
    {
        assert!(Instant::now() < deadline, "ui-3 never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.click("#device-table a").await;
    b.find("#desired-editor").await;
    b.until_text("#telemetry", "live telemetry", |t| {
        t.contains("temperature")
    })
    .await;

    // Desired: saved with the etag, applied and reported back by the simulated device.
    let editor = b.find("#desired-editor").await;
    editor.clear().await.unwrap();
    editor
        .send_keys(r#"{"telemetryInterval": 5, "mode": "eco"}"#)
        .await
        .unwrap();
    b.click("#save-desired").await;
    let etag_line = b
        .until_text("#twin-etag", "desired $version 2", |t| {
            t.contains("desired $version 2")
        })
        .await;
    let (_, twin) = api(&hub, reqwest::Method::GET, "/twins/ui-3", None).await;
    assert_eq!(twin["properties"]["desired"]["mode"], "eco", "{twin}");
    assert_eq!(twin["properties"]["desired"]["telemetryInterval"], 5);
    assert!(etag_line.contains(twin["etag"].as_str().unwrap()));
    // The device applied version 2 and said so.
    let deadline = Instant::now() + PATIENCE;
    loop {
        b.click("#refresh-twin").await;
        let reported = b.text("#reported").await;
        if reported.contains("\"lastDesiredVersion\": 2") {
            break;
        }
        assert!(Instant::now() < deadline, "never reported: {reported}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Someone else writes the twin; the console's save is refused with the conflict shown.
    let (status, _) = api(
        &hub,
        reqwest::Method::PATCH,
        "/twins/ui-3",
        Some(json!({ "properties": { "desired": { "mode": "turbo" } } })),
    )
    .await;
    assert_eq!(status, 200);
    let editor = b.find("#desired-editor").await;
    editor.clear().await.unwrap();
    editor.send_keys(r#"{"mode": "quiet"}"#).await.unwrap();
    b.click("#save-desired").await;
    b.until_text("#etag-conflict", "the conflict", |t| {
        t.contains("Nothing was written")
    })
    .await;
    let (_, twin) = api(&hub, reqwest::Method::GET, "/twins/ui-3", None).await;
    assert_eq!(
        twin["properties"]["desired"]["mode"], "turbo",
        "not overwritten"
    );
    b.screenshot("device").await;

    // C2D and a direct method.
    b.fill("#c2d-body", "reboot at noon").await;
    b.fill("#c2d-props", "kind=notice").await;
    b.click("#c2d-form button[type=submit]").await;
    b.until_text("#c2d-result", "queued", |t| t.contains("Queued"))
        .await;
    b.fill("#method-name", "ping").await;
    b.fill("#method-payload", r#"{"n": 42}"#).await;
    b.click("#method-form button[type=submit]").await;
    let status = b.until_text("#method-status", "200", |t| t == "200").await;
    assert_eq!(status, "200");
    let answer = b.text("#method-response").await;
    assert!(
        answer.contains("\"n\": 42") && answer.contains("ui-3"),
        "{answer}"
    );
    b.screenshot("device-actions").await;

    // Routes: checked as typed, the error with its column.
    b.goto(&format!("{}/ui#/routes", hub.api)).await;
    b.fill(
        "#route-check",
        "FROM /messages/* WHERE $body.temperature >> 30 INTO $upstream",
    )
    .await;
    let error = b
        .until_text("#route-error", "an error with its column", |t| {
            t.starts_with("Column ")
        })
        .await;
    let column: usize = error
        .trim_start_matches("Column ")
        .split(':')
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{error}"));
    // "FROM /messages/* WHERE $body.temperature >" ends at 42; the second '>' is 43.
    assert_eq!(column, 43, "{error}");
    b.find("#route-check-result .caret").await;
    b.fill(
        "#route-check",
        "FROM /messages/* WHERE $body.temperature > 30 INTO $upstream",
    )
    .await;
    b.until_text("#route-check-result", "valid", |t| t.starts_with("Valid"))
        .await;
    b.screenshot("routes").await;

    // Queues: the table and the chart over time.
    b.goto(&format!("{}/ui#/queues", hub.api)).await;
    b.until_text("#queue-table", "the events endpoint", |t| {
        t.contains("$events")
    })
    .await;
    b.find("#main svg.chart polyline").await;
    b.screenshot("queues").await;

    // Products and their device groups, with how many devices each holds.
    b.goto(&format!("{}/ui#/fleet", hub.api)).await;
    b.until_text("#groups", "the group with its device", |t| {
        t.lines()
            .any(|l| l.starts_with("Sensor/Production") && l.trim_end().ends_with('1'))
    })
    .await;
    b.screenshot("fleet").await;

    // Create, disable and delete a device (the delete confirmed in a dialog).
    b.goto(&format!("{}/ui#/devices", hub.api)).await;
    b.fill("#new-device-id", "spare-1").await;
    b.click("#create-device button[type=submit]").await;
    b.find("#toggle-status").await;
    b.click("#toggle-status").await;
    b.until_text("#device-status", "disabled", |t| t.contains("disabled"))
        .await;
    let (_, d) = api(&hub, reqwest::Method::GET, "/devices/spare-1", None).await;
    assert_eq!(d["status"], "disabled");
    b.click("#delete-device").await;
    b.click("#confirm-yes").await;
    b.find("#device-search").await;
    let (status, _) = api(&hub, reqwest::Method::GET, "/devices/spare-1", None).await;
    assert_eq!(status, 404, "deleted");

    // Narrow screens: the overview at a phone's width.
    b.c().set_window_size(390, 844).await.unwrap();
    b.goto(&format!("{}/ui#/", hub.api)).await;
    b.find("#stat-connected").await;
    b.screenshot("overview-phone").await;
    b.c().set_window_size(1280, 900).await.unwrap();

    let errors = b
        .console_errors(&[
            // The refusals this test provoked on purpose.
            "/ui/session - Failed to load resource: the server responded with a status of 401",
            "/ui/api/twins/ui-3 - Failed to load resource: the server responded with a status of 412",
            // The route typed with an error: the check answers 400 with the column.
            "/ui/api/routes/check - Failed to load resource: the server responded with a status of 400",
        ])
        .await;
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");

    // Sign out: the cookie no longer opens the API.
    b.click("#signout").await;
    b.find("#token").await;
    b.close().await;

    let s = wait_summary(sim).await;
    assert_eq!(
        s["received_by"]["c2d"], 1,
        "the C2D message reached the device: {s}"
    );
    assert!(s["methods_answered"].as_u64() >= Some(1), "{s}");
}

/// A phased rollout created in the console: the bars move as devices apply and report, pause
/// and resume act on it, and a second rollout is aborted after confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phased_rollout_moves_on_the_deployments_page() {
    let hub = Hub::start("");
    let path = scenario(
        &hub.dir,
        r#"
name = "console-rollout"
[fleet]
devices = 20
id_prefix = "ro-"
connect_rate = 100
[telemetry]
rate = "1/min"
duration = "90s"
qos = 1
[telemetry.body]
firmware = "1.0.0"
[desired]
apply_delay = "700ms"
"#,
    );
    let b = Browser::start().await;
    sign_in(&b, &hub).await;
    // Reloads in a row: each page's live stream is closed when it is left (Chromium kept
    // them for a minute otherwise, and the seventh load waited that long for a connection).
    for _ in 0..8 {
        b.goto("about:blank").await;
        b.goto(&format!("{}/ui#/", hub.api)).await;
        b.find("#stat-connected").await;
    }
    // The fleet runs long enough for a slow machine; the test waits for its summary.
    let sim = run_scenario(&path, &hub.data_dir(), &[]);
    b.until_text("#stat-connected", "20 connected", |t| t == "20")
        .await;
    b.goto(&format!("{}/ui#/deployments", hub.api)).await;
    b.fill("#dep-id", "fw-2").await;
    b.fill("#dep-target", "STARTS_WITH(deviceId, 'ro-')").await;
    b.fill(
        "#dep-content",
        r#"{"deviceContent": {"properties.desired.firmware": {"version": "2.0.0"}}}"#,
    )
    .await;
    b.fill(
        "#dep-rollout",
        r#"{"phases": [10, 50, 100], "successThreshold": 100, "failureThreshold": 50, "observeSecs": 2}"#,
    )
    .await;
    b.click("#create-deployment button[type=submit]").await;
    let card = "section[data-deployment='fw-2']";
    b.find(card).await;

    // Pause holds the first phase; resume lets it go on.
    b.click(&format!("{card} button[data-action=pause]")).await;
    b.until_text(&format!("{card} .rollout-status"), "paused", |t| {
        t == "paused"
    })
    .await;
    b.screenshot("deployment-paused").await;
    // What the page reads: the member lists left out, their lengths kept (10% of 20).
    let (_, list) = api(
        &hub,
        reqwest::Method::GET,
        "/deployments?summary=true",
        None,
    )
    .await;
    let d = &list["items"][0];
    assert_eq!(d["rolloutMembers"]["members"], 2, "{d}");
    assert_eq!(d["rolloutState"]["members"], json!([]), "{d}");
    let (_, full) = api(&hub, reqwest::Method::GET, "/deployments/fw-2", None).await;
    assert_eq!(
        full["rolloutState"]["members"].as_array().map(Vec::len),
        Some(2)
    );
    b.click(&format!("{card} button[data-action=resume]")).await;

    // Watch the success count climb through the phases to all 20, without a reload.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = b.text(&format!("{card} .m-success")).await;
        let n: u64 = text.parse().unwrap_or(0);
        if seen.last() != Some(&n) {
            seen.push(n);
            if n > 0 && n < 20 {
                b.screenshot("deployment-moving").await;
            }
        }
        let status = b.text(&format!("{card} .rollout-status")).await;
        if n == 20 && status == "completed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rollout stuck: {seen:?} {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.iter().any(|&n| n > 0 && n < 20),
        "the bar moved through a phase: {seen:?}"
    );
    assert_eq!(b.text(&format!("{card} .m-targeted")).await, "20");
    b.screenshot("deployments").await;

    // Abort, confirmed in a dialog.
    b.fill("#dep-id", "fw-3").await;
    b.fill("#dep-target", "deviceId = 'nobody'").await;
    b.click("#create-deployment button[type=submit]").await;
    let card3 = "section[data-deployment='fw-3']";
    b.click(&format!("{card3} button[data-action=abort]")).await;
    b.click("#confirm-yes").await;
    b.until_text(&format!("{card3} .rollout-status"), "aborted", |t| {
        t == "aborted"
    })
    .await;
    let (_, d) = api(&hub, reqwest::Method::GET, "/deployments/fw-3", None).await;
    assert_eq!(d["rolloutState"]["status"], "aborted", "{d}");

    let errors = b.console_errors(&[]).await;
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    b.close().await;
    let s = wait_summary(sim).await;
    assert_eq!(s["connected"], 20, "{s}");
}

/// Without a session the console's API and streams are closed; a write needs the CSRF token
/// and this host as origin; the cookie is HttpOnly and SameSite=Strict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_session_is_a_cookie_and_writes_need_the_csrf_token() {
    let hub = Hub::start("");
    let client = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", hub.api);
    // The assets: cached by ETag (a 304 when unchanged), an unknown one a 404.
    let js = client.get(url("/ui/assets/app.js")).send().await.unwrap();
    assert_eq!(js.status().as_u16(), 200);
    let tag = js.headers()["etag"].to_str().unwrap().to_string();
    let again = client
        .get(url("/ui/assets/app.js"))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 304);
    let css = client.get(url("/ui/assets/app.css")).send().await.unwrap();
    assert_ne!(
        css.headers()["etag"].to_str().unwrap(),
        tag,
        "one tag per asset"
    );
    let none = client.get(url("/ui/assets/nope.js")).send().await.unwrap();
    assert_eq!(none.status().as_u16(), 404);
    for path in ["/ui/api/hub", "/ui/live/overview", "/ui/api/devices"] {
        let r = client.get(url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} without a session");
    }
    // The API's own routes stay bearer-only: a console cookie does not open them.
    let r = client
        .post(url("/ui/session"))
        .json(&json!({ "token": hub.token }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap()
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let csrf = r.json::<Value>().await.unwrap()["csrfToken"]
        .as_str()
        .unwrap()
        .to_string();
    let pair = cookie.split(';').next().unwrap().to_string();
    let r = client
        .get(url("/hub"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "the API needs the bearer token");
    let r = client
        .get(url("/ui/api/hub"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // Writes: no token, a wrong token, a foreign origin: refused, nothing created.
    let create = |csrf: Option<&str>, origin: Option<&str>| {
        let mut req = client
            .post(url("/ui/api/devices"))
            .header("cookie", &pair)
            .json(&json!({ "deviceId": "x1" }));
        if let Some(t) = csrf {
            req = req.header("x-csrf-token", t);
        }
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    assert_eq!(create(None, None).await.unwrap().status().as_u16(), 403);
    assert_eq!(
        create(Some("wrong"), None).await.unwrap().status().as_u16(),
        403
    );
    assert_eq!(
        create(Some(&csrf), Some("http://evil.example"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    let (status, _) = api(&hub, reqwest::Method::GET, "/devices/x1", None).await;
    assert_eq!(status, 404, "nothing was created");
    let own_origin = hub.api.clone();
    assert_eq!(
        create(Some(&csrf), Some(&own_origin))
            .await
            .unwrap()
            .status()
            .as_u16(),
        201
    );

    // Sign-out ends the session.
    let r = client
        .delete(url("/ui/session"))
        .header("cookie", &pair)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let r = client
        .get(url("/ui/api/hub"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "signed out");
}

/// Page weight and time to first render of each console page with 10,000 devices registered,
/// beside the same pages with 10 devices in the same run (what grows with the registry). A
/// measurement for BENCHMARKS.md, not a pass/fail test:
/// `cargo test --release -p device-sim --test console -- --ignored --nocapture page_weight`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by hand, see BENCHMARKS.md"]
async fn page_weight_and_first_render_with_10000_devices() {
    let hub = Hub::start("");
    register(&hub, 0..10).await;
    create_rollout(&hub, "fw-all", 1, "2").await;
    let b = Browser::start().await;
    sign_in(&b, &hub).await;
    let small = measure_pages(&b, &hub).await;
    let started = Instant::now();
    register(&hub, 10..10_000).await;
    eprintln!(
        "registered 9,990 more devices in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // A second rollout, whose first phase holds 5,000 devices (the first one's phase was
    // drawn from 10).
    create_rollout(&hub, "fw-big", 2, "3").await;
    let large = measure_pages(&b, &hub).await;
    println!("| page | devices registered | requests | page weight (bytes) | transferred, assets revalidated (bytes) | of which API data (bytes) | first byte ms | first contentful paint ms | data shown ms |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for ((name, a), (_, z)) in small.iter().zip(&large) {
        for (n, f) in [("10", a), ("10,000", z)] {
            println!(
                "| {name} | {n} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
                f[0], f[1], f[2], f[3], f[4], f[5], f[6]
            );
        }
    }
    for path in ["/deployments", "/deployments?summary=true"] {
        let body = reqwest::Client::new()
            .get(format!("{}{path}", hub.api))
            .bearer_auth(&hub.token)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        println!(
            "GET {path} (2 rollouts over 10,000 devices): {} bytes",
            body.len()
        );
    }
    b.close().await;
}

/// A phased deployment (50%, then all) of firmware `version` to every `dev-` device.
async fn create_rollout(hub: &Hub, id: &str, priority: u32, version: &str) {
    let (_, d) = api(
        hub,
        reqwest::Method::POST,
        "/deployments",
        Some(json!({
            "id": id, "targetCondition": "STARTS_WITH(deviceId, 'dev-')", "priority": priority,
            "content": { "deviceContent": { "properties.desired.firmware": { "version": version } } },
            "rollout": { "phases": [50, 100], "successThreshold": 95, "failureThreshold": 5 }
        })),
    )
    .await;
    assert_eq!(d["id"], id, "{d}");
}

async fn register(hub: &Hub, range: std::ops::Range<usize>) {
    let client = reqwest::Client::new();
    let ids: Vec<String> = range.map(|i| format!("dev-{i:05}")).collect();
    for chunk in ids.chunks(32) {
        let calls = chunk.iter().map(|id| {
            client
                .post(format!("{}/devices", hub.api))
                .bearer_auth(&hub.token)
                .json(&json!({ "deviceId": id }))
                .send()
        });
        for r in futures_util::future::join_all(calls).await {
            assert_eq!(r.unwrap().status().as_u16(), 201);
        }
    }
}

/// Each page loaded afresh (the assets revalidated from the cache): requests, bytes of all
/// bodies, bytes transferred, API bytes, first byte, first contentful paint, and when the
/// page's data was on screen (ms from navigation start).
async fn measure_pages(b: &Browser, hub: &Hub) -> Vec<(&'static str, [f64; 7])> {
    let pages = [
        ("overview", "#/", "#stat-connected"),
        ("devices", "#/devices", "#device-table tbody tr"),
        ("device", "#/devices/dev-00007", "#reported"),
        ("routes", "#/routes", "#route-table table"),
        ("queues", "#/queues", "#queue-table table"),
        ("fleet", "#/fleet", "#images table"),
        (
            "deployments",
            "#/deployments",
            "section[data-deployment='fw-all'] .m-targeted",
        ),
    ];
    let mut out = Vec::new();
    for (name, hash, ready) in pages {
        b.goto("about:blank").await;
        b.goto(&format!("{}/ui{hash}", hub.api)).await;
        b.c()
            .wait()
            .at_most(PATIENCE)
            .every(Duration::from_millis(5))
            .for_element(Locator::Css(ready))
            .await
            .unwrap_or_else(|e| panic!("{name}: {ready}: {e}"));
        let shown = b
            .c()
            .execute("return performance.now()", vec![])
            .await
            .unwrap();
        let figures = b
            .c()
            .execute(
                r#"const nav = performance.getEntriesByType('navigation')[0];
                   const res = performance.getEntriesByType('resource');
                   const fcp = performance.getEntriesByName('first-contentful-paint')[0];
                   const sum = (list, f) => list.reduce((a, e) => a + (e[f] || 0), 0);
                   const all = [nav, ...res];
                   const api = res.filter((e) => e.name.includes('/ui/api/'));
                   return [all.length, sum(all, 'decodedBodySize'), sum(all, 'transferSize'),
                           sum(api, 'decodedBodySize'), nav.responseStart,
                           fcp ? fcp.startTime : null];"#,
                vec![],
            )
            .await
            .unwrap();
        let n = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        out.push((
            name,
            [
                n(&figures[0]),
                n(&figures[1]),
                n(&figures[2]),
                n(&figures[3]),
                n(&figures[4]),
                n(&figures[5]),
                n(&shown),
            ],
        ));
    }
    out
}
