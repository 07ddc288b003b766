//! Helpers shared by the end-to-end tests that start `tandem` processes.
// Each test file uses its own subset.
#![allow(dead_code)]

pub mod up;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The `tandem` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tandem");

/// The default model, as the test command fetched it.
pub fn model_path() -> String {
    tandem_engine::paths::test_model_path()
        .display()
        .to_string()
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Whether process `pid` is running (a zombie counts as exited).
pub fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); /proc says whether it is really running.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// An empty directory `tandem-{name}-{pid}` in the system's temporary directory.
pub fn fresh_temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}

/// An HTTP client with the given request timeout.
pub fn http_client(timeout: Duration) -> reqwest::blocking::Client {
    // reqwest uses whichever rustls provider is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .timeout(timeout)
        .build()
        .expect("HTTP client")
}

/// Whether `url` answers with a success status (false while nothing listens there).
pub fn healthy(http: &reqwest::blocking::Client, url: &str) -> bool {
    http.get(url).send().is_ok_and(|r| r.status().is_success())
}

/// Runs `cmd` to its end and returns its standard output, failing with its
/// standard error unless it succeeds; `what` names it in failures.
pub fn stdout_of(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} does not run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Runs `tandem args...` (see [`stdout_of`]).
pub fn tandem(args: &[&str]) -> String {
    stdout_of(Command::new(BIN).args(args), &format!("tandem {args:?}"))
}

/// Polls `f` every 100 ms until it returns `Some`, failing with `what` (and
/// what `last` says then) after `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Option<T>,
    last: impl FnOnce() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("{what}: not within {limit:?}; {}", last());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls until `done` holds (see [`wait_for`]).
pub fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
    last: impl FnOnce() -> String,
) {
    wait_for(what, limit, || done().then_some(()), last);
}

/// Waits up to `limit` for `child` to exit and returns its status; `what`
/// names the wait in the failure.
pub fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    wait_for(
        what,
        limit,
        || child.try_wait().expect("try_wait"),
        String::new,
    )
}

/// A child process, killed if the test ends before it is stopped.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// SIGTERM, then the exit status within `limit`; `what` names the process.
    pub fn terminate(mut self, limit: Duration, what: &str) -> ExitStatus {
        signal(self.0.id(), libc::SIGTERM);
        wait_exit(&mut self.0, limit, &format!("{what} stops on SIGTERM"))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
