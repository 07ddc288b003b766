//! Helpers shared by the end-to-end tests that start `tandem` processes.
// Each test file uses its own subset.
#![allow(dead_code)]

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
