//! The operator dashboard in a real browser: headless Chromium, driven through
//! chromedriver's W3C WebDriver HTTP API, loads `/dashboard` from a running
//! `tandem up`, sees the decode worker, clicks scale-up for decode and sees a
//! second decode worker register (in the page, the admin API and the store).
//! A screenshot of the page is saved; the test prints where.
//!
//! Needs the Debian packages `chromium` and `chromium-driver` (scripts/test
//! installs them); without them the test fails and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tandem_protocol::Role;

mod common;
use common::up::Up;
use common::{free_port, fresh_temp_dir, healthy, http_client, wait_for, wait_until};

const MODEL: &str = "SmolLM2-135M-Instruct";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `tandem up` with one decode worker, once it serves (`/health` answers 200).
fn start_cluster(http: &reqwest::blocking::Client) -> Up {
    let up = Up::start(
        "dashboard",
        &["--prefill", "0", "--decode", "1", "--threads", "1"],
        Duration::from_secs(30),
        true,
    );
    let health = format!("{}/health", up.root());
    wait_until(
        "the cluster serves (/health 200)",
        Duration::from_secs(30),
        || healthy(http, &health),
        || up.log(),
    );
    up
}

/// The ids of the decode workers `/admin/workers` lists.
fn admin_decode(up: &Up, http: &reqwest::blocking::Client) -> Vec<String> {
    let Ok(r) = http
        .get(format!("{}/workers", up.file.admin_url))
        .bearer_auth(&up.file.admin_token)
        .send()
    else {
        return Vec::new();
    };
    let v: Value = r
        .text()
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    v["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter(|w| w["role"] == "decode")
                .filter_map(|w| w["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// chromedriver, killed on drop.
struct ChromeDriver {
    child: Child,
    url: String,
    profile: PathBuf,
}

impl ChromeDriver {
    fn start(http: &reqwest::blocking::Client) -> Self {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: the dashboard test runs headless Chromium through chromedriver; \
                 install the Debian packages `chromium` and `chromium-driver` \
                 (`apt-get install chromium chromium-driver`; scripts/test installs them)"
            );
        }
        let port = free_port();
        let profile = fresh_temp_dir("dashboard-chromium");
        let log = std::fs::File::create(profile.join("chromedriver.log")).expect("log");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("chromedriver starts");
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            profile,
        };
        let status = format!("{}/status", driver.url);
        wait_for(
            "chromedriver is ready",
            Duration::from_secs(15),
            || {
                let text = http.get(&status).send().ok()?.text().ok()?;
                let v: Value = serde_json::from_str(&text).ok()?;
                v["value"]["ready"].as_bool().filter(|r| *r)
            },
            String::new,
        );
        driver
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A WebDriver session (one headless Chromium), closed on drop.
struct Browser<'a> {
    http: &'a reqwest::blocking::Client,
    base: String,
}

impl<'a> Browser<'a> {
    fn open(http: &'a reqwest::blocking::Client, driver: &ChromeDriver) -> Self {
        let user_data = driver.profile.join("profile");
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                            "--no-first-run", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync",
                            "--disable-dev-shm-usage", "--window-size=1400,1250",
                            format!("--user-data-dir={}", user_data.display()),
                        ],
                    },
                },
            },
        });
        let v = call(
            http,
            "POST",
            &format!("{}/session", driver.url),
            Some(&caps),
        )
        .unwrap_or_else(|e| panic!("chromedriver could not start Chromium: {e}"));
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {v}"));
        Self {
            http,
            base: format!("{}/session/{id}", driver.url),
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        call(self.http, method, &format!("{}{path}", self.base), body)
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(&json!({ "url": url })))
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    /// Runs `script` (a function body) in the page and returns its result.
    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": [] })),
        )
        .unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    fn click(&self, css: &str) {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(&json!({ "using": "css selector", "value": css })),
            )
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        let id = v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element reference for {css}: {v}"));
        self.cmd("POST", &format!("/element/{id}/click"), Some(&json!({})))
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// The page as PNG bytes.
    fn screenshot(&self) -> Vec<u8> {
        let v = self
            .cmd("GET", "/screenshot", None)
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        base64_decode(v.as_str().expect("base64 PNG")).expect("valid base64")
    }

    /// The ids of the decode workers the page lists.
    fn decode_rows(&self) -> Vec<String> {
        let v = self.js("return Array.from(document.querySelectorAll(\
             '[data-testid=worker-row][data-role=decode]')).map(r => r.dataset.id)");
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = call(self.http, "DELETE", &self.base, None);
    }
}

/// One WebDriver command: the response's `value`, or the error it reports.
fn call(
    http: &reqwest::blocking::Client,
    method: &str,
    url: &str,
    body: Option<&Value>,
) -> Result<Value, String> {
    let req = match method {
        "GET" => http.get(url),
        "DELETE" => http.delete(url),
        _ => http.post(url),
    };
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(b.to_string()),
        None => req,
    };
    let r = req.send().map_err(|e| format!("{method} {url}: {e}"))?;
    let status = r.status();
    let text = r.text().map_err(|e| format!("{method} {url}: {e}"))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("{method} {url}: {e}: {text}"))?;
    if status.is_success() {
        Ok(v["value"].clone())
    } else {
        Err(format!(
            "{method} {url}: {status}: {} {}",
            v["value"]["error"], v["value"]["message"]
        ))
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Where the screenshot goes: `$TANDEM_DASHBOARD_SCREENSHOT`, else `target/dashboard.png`.
fn screenshot_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_DASHBOARD_SCREENSHOT") {
        return PathBuf::from(p);
    }
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("dashboard.png")
}

#[test]
fn the_dashboard_scales_decode_up_in_a_real_browser() {
    let started = Instant::now();
    let http = http_client(Duration::from_secs(30));

    let driver = ChromeDriver::start(&http);
    let mut up = start_cluster(&http);
    eprintln!("dashboard test: cluster up after {:?}", started.elapsed());

    let browser = Browser::open(&http, &driver);
    let button_disabled = || {
        browser
            .js("return document.querySelector('[data-testid=scale-decode-up]').disabled")
            .as_bool()
    };
    let admin_message =
        || browser.js("return document.querySelector('[data-testid=admin-message]').innerText");

    // A wrong token: the page says the router refused it and keeps the controls off.
    browser.go(&format!("{}/dashboard#token=not-the-token", up.root()));
    wait_until(
        "the page reports the refused token",
        Duration::from_secs(10),
        || admin_message().as_str().is_some_and(|m| m.contains("401")),
        || format!("the page says {}", admin_message()),
    );
    assert_eq!(
        button_disabled(),
        Some(true),
        "no controls without a good token"
    );

    // The right token, from the link's fragment.
    browser.go(&format!(
        "{}/dashboard#token={}",
        up.root(),
        up.file.admin_token
    ));
    let first = wait_for(
        "the page lists the decode worker",
        Duration::from_secs(15),
        || Some(browser.decode_rows()).filter(|r| r.len() == 1),
        || format!("the page lists {:?}", browser.decode_rows()),
    );
    assert_eq!(
        browser.js("return location.hash"),
        json!(""),
        "the page takes the token out of the address bar"
    );
    let registered = up.ids_of(Role::Decode);
    assert_eq!(first, registered, "the page lists what the store holds");

    // Requests while the page watches, so that its charts and tiles show them.
    let api = up.file.api_url.clone();
    let load = {
        let http = http.clone();
        std::thread::spawn(move || {
            for i in 0..8 {
                let body = json!({
                    "model": MODEL,
                    "messages": [
                        {"role": "system", "content": "You answer operators of a serving fleet."},
                        {"role": "user", "content": format!("Say hello, operator {i}.")},
                    ],
                    "max_tokens": 12,
                    "temperature": 0,
                });
                let _ = http
                    .post(format!("{api}/chat/completions"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send();
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };

    // The controls are live once the token is accepted.
    wait_for(
        "the scale-up button is enabled",
        Duration::from_secs(10),
        || button_disabled().filter(|d| !d),
        || format!("the page says {}", admin_message()),
    );
    browser.click("[data-testid=scale-decode-up]");
    eprintln!(
        "dashboard test: clicked decode scale-up after {:?}",
        started.elapsed()
    );

    let page_text = || {
        // The page as it was when the wait failed, for whoever reads the failure.
        let shot = match std::fs::write(screenshot_path(), browser.screenshot()) {
            Ok(()) => format!("screenshot at {}", screenshot_path().display()),
            Err(e) => format!("no screenshot: {e}"),
        };
        format!(
            "{shot}; page says {} (message: {}); admin API lists {:?}; store holds {:?}; {}",
            browser.js("return document.querySelector('[data-testid=scale-card]').innerText"),
            admin_message(),
            admin_decode(&up, &http),
            up.ids_of(Role::Decode),
            up.log()
        )
    };
    let rows = wait_for(
        "a second decode worker registers and shows in the page",
        Duration::from_secs(30),
        || {
            let rows = browser.decode_rows();
            (rows.len() == 2
                && up.ids_of(Role::Decode).len() == 2
                && admin_decode(&up, &http).len() == 2)
                .then_some(rows)
        },
        page_text,
    );
    assert!(rows.contains(&first[0]), "the first worker stays: {rows:?}");
    wait_until(
        "the page shows 2 decode replicas desired and running",
        Duration::from_secs(10),
        || {
            let v = browser.js(
                "return [document.querySelector('[data-testid=scale-decode-desired]').textContent, \
                 document.querySelector('[data-testid=scale-decode-running]').textContent]",
            );
            v == json!(["2", "2"])
        },
        page_text,
    );
    eprintln!(
        "dashboard test: second decode worker {rows:?} after {:?}",
        started.elapsed()
    );

    // The SLA form writes the targets through the admin API.
    browser.js(
        "const i = document.querySelector('[data-testid=targets-ttft]'); \
         i.value = '900'; i.dispatchEvent(new Event('input')); \
         document.querySelector('[data-testid=targets-save]').click(); return null",
    );
    let targets_url = format!("{}/targets", up.file.admin_url);
    wait_for(
        "the TTFT target set in the page reaches the store",
        Duration::from_secs(10),
        || {
            let text = http
                .get(&targets_url)
                .bearer_auth(&up.file.admin_token)
                .send()
                .ok()?
                .text()
                .ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            (v["ttft_ms"].as_f64() == Some(900.0)).then_some(())
        },
        || {
            format!(
                "the page says {}",
                browser
                    .js("return document.querySelector('[data-testid=targets-message]').innerText")
            )
        },
    );

    let _ = load.join();
    // Let one more poll draw the charts with the requests above.
    std::thread::sleep(Duration::from_millis(1600));
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
    let path = screenshot_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("screenshot dir");
    }
    std::fs::write(&path, &png).expect("screenshot written");
    eprintln!("dashboard test: screenshot at {}", path.display());

    drop(browser);
    drop(driver);
    up.stop(Duration::from_secs(20));
    eprintln!("dashboard test: done in {:?}", started.elapsed());
}
