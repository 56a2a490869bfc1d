//! A headless Chromium driven over W3C WebDriver: a small client over reqwest, and the
//! `chromedriver` process it talks to.
//!
//! [`Browser::launch`] starts `chromedriver` on a port the OS picks, opens a session with
//! a fresh profile, and owns both: dropping the [`Browser`] kills chromedriver's whole
//! process group (Chromium included), also when a test fails or times out half-way.
//! [`Browser::quit`] ends the session politely first.
//!
//! Pages load asynchronously to the driver, so tests find elements with the `wait_for*`
//! methods, which poll until [`WAIT`] passes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// How long the `wait_for*` methods poll before giving up.
pub const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);

/// The key under which W3C WebDriver returns an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

const INSTALL_HINT: &str = "install them with `apt-get install -y chromium chromium-driver` (Debian; .ci/run does), \
     or point TOLLGATE_TEST_CHROMIUM and TOLLGATE_TEST_CHROMEDRIVER at a Chromium and its matching chromedriver";

/// The Chromium binary: `TOLLGATE_TEST_CHROMIUM`, else Debian's `/usr/bin/chromium`.
fn chromium_path() -> PathBuf {
    std::env::var_os("TOLLGATE_TEST_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// The chromedriver binary: `TOLLGATE_TEST_CHROMEDRIVER`, else Debian's `/usr/bin/chromedriver`.
fn chromedriver_path() -> PathBuf {
    std::env::var_os("TOLLGATE_TEST_CHROMEDRIVER").map_or_else(|| PathBuf::from("/usr/bin/chromedriver"), PathBuf::from)
}

/// On a Debian machine where the tests run as root (a fresh CI or development box), installs
/// Debian's Chromium and chromedriver once per test process, so `cargo test` needs nothing
/// installed by hand. Elsewhere it does nothing, and the caller explains what to install.
async fn install_debian_chromium() {
    static INSTALL: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    INSTALL
        .get_or_init(|| async {
            let root = std::fs::read_to_string("/proc/self/status")
                .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
                .unwrap_or(false);
            if !root || !std::path::Path::new("/usr/bin/apt-get").exists() {
                return;
            }
            eprintln!("browser tests: installing Debian's chromium and chromium-driver (apt-get)...");
            let script =
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver";
            let outcome = Command::new("sh").arg("-c").arg(script).stdin(Stdio::null()).output().await;
            if let Ok(out) = outcome
                && !out.status.success()
            {
                eprintln!("browser tests: the install failed:\n{}", String::from_utf8_lossy(&out.stderr));
            }
        })
        .await;
}

/// A running chromedriver, leader of its own process group so that the browsers it starts
/// can be killed with it.
struct Chromedriver {
    child: Child,
    /// `http://127.0.0.1:{port}`.
    url: String,
    /// Chromium's profile and chromedriver's output; removed after both are killed.
    dir: tempfile::TempDir,
}

impl Chromedriver {
    async fn start() -> anyhow::Result<Self> {
        let (chromium, chromedriver) = (chromium_path(), chromedriver_path());
        if !(chromium.is_file() && chromedriver.is_file()) {
            install_debian_chromium().await;
        }
        for binary in [&chromium, &chromedriver] {
            if !binary.is_file() {
                bail!(
                    "{} not found: the browser tests need Chromium and chromedriver; {INSTALL_HINT}",
                    binary.display()
                );
            }
        }
        let dir = tempfile::tempdir()?;
        let log_path = dir.path().join("chromedriver.log");
        let log = std::fs::File::create(&log_path)?;
        // Port 0: chromedriver binds a free port and prints which, so no other process
        // can take it between our choosing and its binding.
        let child = Command::new(&chromedriver)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("could not start {}", chromedriver.display()))?;
        let mut driver = Self { child, url: String::new(), dir };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let port = text
                .split("started successfully on port ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|digits| digits.parse::<u16>().ok());
            if let Some(port) = port {
                driver.url = format!("http://127.0.0.1:{port}");
                return Ok(driver);
            }
            if let Some(status) = driver.child.try_wait()? {
                bail!("chromedriver exited ({status}) before listening:\n{text}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("chromedriver did not listen within {WAIT:?}:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything chromedriver printed so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }
}

impl Drop for Chromedriver {
    /// Kills chromedriver's process group: chromedriver and every Chromium process it
    /// started (Chromium outlives a chromedriver killed alone).
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A WebDriver session on a headless Chromium of its own.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:{port}/session/{id}`.
    session: String,
    /// Held to be killed when the session is dropped; declared last, so after the rest.
    _driver: Chromedriver,
}

/// An element of the current page. It goes stale when the page changes: find it again then.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
    /// The selector it was found with, for error messages.
    css: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile.
    pub async fn launch() -> anyhow::Result<Self> {
        let driver = Chromedriver::start().await?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let profile = driver.dir.path().join("profile");
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            // Without these Chromium stalls on a closed network, calling home.
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-quic".to_owned(),
            "--window-size=1280,1024".to_owned(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium_path(), "args": args},
        }}});
        let response = http.post(format!("{}/session", driver.url)).json(&capabilities).send().await;
        let value = match response {
            Ok(response) => unwrap_reply("new session", response).await,
            Err(e) => Err(e.into()),
        }
        .with_context(|| format!("could not start Chromium; chromedriver said:\n{}", driver.log()))?;
        let id = value["sessionId"].as_str().ok_or_else(|| anyhow!("no sessionId in {value}"))?;
        let session = format!("{}/session/{id}", driver.url);
        Ok(Self { http, session, _driver: driver })
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let what = format!("{method} {path}");
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| format!("WebDriver {what}"))?;
        unwrap_reply(&what, response).await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.command(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.command(reqwest::Method::POST, path, Some(body)).await
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.post("/url", json!({"url": url})).await.map(drop)
    }

    /// Reloads the current page.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        self.post("/refresh", json!({})).await.map(drop)
    }

    pub async fn current_url(&self) -> anyhow::Result<String> {
        let value = self.get("/url").await?;
        value.as_str().map(str::to_owned).ok_or_else(|| anyhow!("URL is not a string: {value}"))
    }

    /// The current page's HTML, as the browser now has it.
    pub async fn source(&self) -> anyhow::Result<String> {
        let value = self.get("/source").await?;
        value.as_str().map(str::to_owned).ok_or_else(|| anyhow!("source is not a string"))
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    pub async fn execute(&self, script: &str) -> anyhow::Result<Value> {
        self.post("/execute/sync", json!({"script": script, "args": []})).await
    }

    /// Makes the window as tall as the page (up to a limit), so a screenshot shows all of it.
    async fn fit_window_to_page(&self) -> anyhow::Result<()> {
        const MAX_HEIGHT: u64 = 8_000;
        let height = self.execute("return document.documentElement.scrollHeight").await?;
        let height = height.as_u64().ok_or_else(|| anyhow!("page height is not a number: {height}"))?;
        let rect = self.get("/window/rect").await?;
        // The window's frame is taller than the viewport that the page is measured in.
        let inner = self.execute("return window.innerHeight").await?.as_u64().unwrap_or(0);
        let frame = rect["height"].as_u64().unwrap_or(0).saturating_sub(inner);
        let wanted = (height + frame).min(MAX_HEIGHT);
        self.post("/window/rect", json!({"width": rect["width"], "height": wanted})).await.map(drop)
    }

    /// Resizes the window to `width` × `height` CSS pixels (the viewport is the window, headless).
    pub async fn set_window_size(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.post("/window/rect", json!({"width": width, "height": height})).await.map(drop)
    }

    /// Saves a PNG of the whole page (the window made as tall as the page) to `path`.
    pub async fn save_screenshot(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        self.fit_window_to_page().await?;
        std::fs::write(path, self.screenshot().await?)?;
        Ok(())
    }

    /// The browser's cookies for the current page, as a `Cookie` header's value.
    pub async fn cookie_header(&self) -> anyhow::Result<String> {
        let value = self.get("/cookie").await?;
        let cookies = value.as_array().ok_or_else(|| anyhow!("cookies are not a list: {value}"))?;
        let pairs: Vec<String> =
            cookies.iter().filter_map(|c| Some(format!("{}={}", c["name"].as_str()?, c["value"].as_str()?))).collect();
        Ok(pairs.join("; "))
    }

    /// A PNG of what the window shows.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        let value = self.get("/screenshot").await?;
        decode_base64(value.as_str().ok_or_else(|| anyhow!("screenshot is not a string"))?)
    }

    fn element(&self, value: &Value, css: &str) -> anyhow::Result<Element<'_>> {
        let id = value[ELEMENT_KEY].as_str().ok_or_else(|| anyhow!("not an element reference: {value}"))?;
        Ok(Element { browser: self, id: id.to_owned(), css: css.to_owned() })
    }

    /// Every element that matches `css` now (none is no error).
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element<'_>>> {
        let value = self.post("/elements", json!({"using": "css selector", "value": css})).await?;
        let found = value.as_array().ok_or_else(|| anyhow!("elements are not a list: {value}"))?;
        found.iter().map(|v| self.element(v, css)).collect()
    }

    /// The first element that matches `css`, once there is one.
    pub async fn wait_for(&self, css: &str) -> anyhow::Result<Element<'_>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(first) = self.find_all(css).await?.into_iter().next() {
                return Ok(first);
            }
            if tokio::time::Instant::now() > deadline {
                let url = self.current_url().await.unwrap_or_default();
                bail!("no element matches `{css}` on {url} after {WAIT:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The first element that matches `css` once its text contains `expected`.
    pub async fn wait_for_text(&self, css: &str, expected: &str) -> anyhow::Result<Element<'_>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            // The element may go stale between finding and reading it while a page loads.
            let seen = match self.find_all(css).await?.into_iter().next() {
                Some(element) => element.text().await.ok().map(|text| (element, text)),
                None => None,
            };
            match seen {
                Some((element, text)) if text.contains(expected) => return Ok(element),
                _ if tokio::time::Instant::now() > deadline => {
                    let url = self.current_url().await.unwrap_or_default();
                    let text = seen.map_or_else(|| "no such element".to_owned(), |(_, text)| format!("{text:?}"));
                    bail!("`{css}` on {url} did not come to contain {expected:?} within {WAIT:?}; it shows {text}");
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// The current URL, once `wanted` accepts it (`what` describes it for the error).
    pub async fn wait_for_url(&self, what: &str, wanted: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let url = self.current_url().await?;
            if wanted(&url) {
                return Ok(url);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the browser is on {url}, not on {what}, after {WAIT:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Types `fields` (by `name`) into the form `form` as a user would, replacing what the
    /// fields held, and clicks its submit button.
    pub async fn fill_and_submit(&self, form: &str, fields: &[(&str, &str)]) -> anyhow::Result<()> {
        for (name, text) in fields {
            let field = self.wait_for(&format!("{form} [name='{name}']")).await?;
            field.clear().await?;
            field.send_keys(text).await?;
        }
        self.wait_for(&format!("{form} [type='submit']")).await?.click().await
    }

    /// Saves `screenshot.png` and `page.html` of the current page into `dir`, and says where
    /// (or why not) in one line each.
    pub async fn save_page(&self, dir: &Path) -> String {
        let mut lines = Vec::new();
        if let Err(e) = std::fs::create_dir_all(dir) {
            return format!("could not create {}: {e}", dir.display());
        }
        let png = dir.join("screenshot.png");
        if let Err(e) = self.fit_window_to_page().await {
            lines.push(format!("(the screenshot shows the window only: {e:#})"));
        }
        match self.screenshot().await.and_then(|bytes| Ok(std::fs::write(&png, bytes)?)) {
            Ok(()) => lines.push(format!("screenshot: {}", png.display())),
            Err(e) => lines.push(format!("no screenshot: {e:#}")),
        }
        let html = dir.join("page.html");
        match self.source().await.and_then(|text| Ok(std::fs::write(&html, text)?)) {
            Ok(()) => lines.push(format!("page HTML: {}", html.display())),
            Err(e) => lines.push(format!("no page HTML: {e:#}")),
        }
        if let Ok(url) = self.current_url().await {
            lines.push(format!("page URL: {url}"));
        }
        lines.join("\n")
    }

    /// Ends the session (Chromium exits), then chromedriver.
    pub async fn quit(self) -> anyhow::Result<()> {
        self.command(reqwest::Method::DELETE, "", None).await.map(drop)
    }
}

impl Element<'_> {
    fn path(&self, action: &str) -> String {
        format!("/element/{}/{action}", self.id)
    }

    async fn act(&self, action: &str, body: Value) -> anyhow::Result<()> {
        self.browser.post(&self.path(action), body).await.map(drop).with_context(|| format!("`{}`", self.css))
    }

    /// Types `text` into the element.
    pub async fn send_keys(&self, text: &str) -> anyhow::Result<()> {
        self.act("value", json!({"text": text})).await
    }

    /// Empties an input.
    pub async fn clear(&self) -> anyhow::Result<()> {
        self.act("clear", json!({})).await
    }

    /// Clicks the element (an `<option>` is selected); waits for a navigation it starts.
    pub async fn click(&self) -> anyhow::Result<()> {
        self.act("click", json!({})).await
    }

    /// The element's rendered text.
    pub async fn text(&self) -> anyhow::Result<String> {
        let value = self.browser.get(&self.path("text")).await.with_context(|| format!("`{}`", self.css))?;
        value.as_str().map(str::to_owned).ok_or_else(|| anyhow!("text is not a string: {value}"))
    }

    /// Whether a checkbox, radio button or option is selected.
    pub async fn is_selected(&self) -> anyhow::Result<bool> {
        let value = self.browser.get(&self.path("selected")).await.with_context(|| format!("`{}`", self.css))?;
        value.as_bool().ok_or_else(|| anyhow!("selected is not a boolean: {value}"))
    }
}

/// The `value` of a WebDriver reply, or its error as an `anyhow` error.
async fn unwrap_reply(what: &str, response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let text = response.text().await?;
    let mut body: Value =
        serde_json::from_str(&text).with_context(|| format!("WebDriver {what}: {status}, not JSON: {text}"))?;
    let value = body["value"].take();
    if status.is_success() {
        return Ok(value);
    }
    let (error, message) = (value["error"].as_str().unwrap_or("?"), value["message"].as_str().unwrap_or(""));
    bail!("WebDriver {what}: {status} {error}: {message}")
}

/// Decodes standard base64 (as WebDriver sends screenshots).
fn decode_base64(text: &str) -> anyhow::Result<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    let digits: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut bytes = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut group = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            group |= sextet(c).ok_or_else(|| anyhow!("not base64: {:?}", char::from(c)))? << (18 - 6 * i);
        }
        let [_, b0, b1, b2] = group.to_be_bytes();
        bytes.extend_from_slice(&[b0, b1, b2][..chunk.len().saturating_sub(1)]);
    }
    Ok(bytes)
}
