//! A Kafka broker of a test's own, for fault tests that kill it: killing the shared broker
//! (port 9092) would fail every other test running.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::repo_path;

/// A single-node broker of the test's own, started with `scripts/kafka.sh` on a free port and a
/// cache directory of its own (its data and pid file live there; the jars are linked from the
/// cache `scripts/test.sh` fetched them into). Killed when dropped, even when the test fails.
pub struct OwnBroker {
    cache: tempfile::TempDir,
    port: u16,
}

impl OwnBroker {
    pub fn start() -> OwnBroker {
        let cache = tempfile::tempdir().unwrap();
        let pom = std::fs::read_to_string(repo_path("deploy/kafka/pom.xml")).unwrap();
        let version = pom.split("<kafka.version>").nth(1).and_then(|s| s.split('<').next()).unwrap().to_string();
        let shared = std::env::var_os("WEIR_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/weir"));
        let jars = shared.join(format!("kafka-{version}"));
        // Without the shared jars (never the case under scripts/test.sh), kafka.sh fetches them.
        if jars.join("libs").is_dir() {
            std::os::unix::fs::symlink(&jars, cache.path().join(format!("kafka-{version}"))).unwrap();
        }
        let broker = OwnBroker { cache, port: free_port_pair() };
        broker.up();
        broker
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `scripts/kafka.sh up`: starts the broker (formatting its storage the first time) and waits
    /// until it answers.
    pub fn up(&self) {
        let output = Command::new("bash")
            .arg(repo_path("scripts/kafka.sh"))
            .arg("up")
            .env("WEIR_KAFKA_PORT", self.port.to_string())
            .env("WEIR_CACHE", self.cache.path())
            .env_remove("WEIR_BROKERS")
            .output()
            .expect("running scripts/kafka.sh");
        assert!(
            output.status.success(),
            "kafka.sh up failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log_tail()
        );
    }

    fn pid(&self) -> Option<String> {
        std::fs::read_to_string(self.cache.path().join("kafka-state/broker.pid")).ok().map(|s| s.trim().to_string())
    }

    /// SIGKILL, as a crash: nothing flushed, no controlled shutdown. Returns once it is gone.
    pub fn kill(&self) {
        let Some(pid) = self.pid() else { return };
        let _ = Command::new("kill").args(["-9", &pid]).status();
        let proc = Path::new("/proc").join(&pid);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // A zombie is gone for our purposes: its sockets are closed.
        while proc.exists()
            && !std::fs::read_to_string(proc.join("stat")).is_ok_and(|s| s.contains(") Z "))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.cache.path().join("kafka-state/broker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port whose successor is free too (the broker's controller listens on port + 1).
pub fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free ports");
}
