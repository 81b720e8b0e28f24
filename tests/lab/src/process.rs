//! The example servers and other programs as real processes, and what they print.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

/// The `switcheroo` command that cargo built for the running test or bench (with the `cli`
/// feature): `target/<profile>/switcheroo`, beside `target/<profile>/deps/<test>`.
pub fn switcheroo_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps")
        .join("switcheroo");
    assert!(
        path.exists(),
        "{} is missing: run the tests with --features cli",
        path.display()
    );
    path
}

/// The path of an example binary: `target/<profile>/deps/<test>` runs the tests, so the
/// example is `target/<profile>/examples/<name>`. `cargo test` builds examples only as
/// test harnesses, so the binary is built (or brought up to date: a stale `hello` would
/// test old code) here, once per test process, by the cargo that runs the tests.
pub fn example(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var_os("CARGO")
            .or_else(|| option_env!("CARGO").map(Into::into))
            .unwrap_or_else(|| "cargo".into());
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
        let out = Command::new(&cargo)
            .args(["build", "--example", name, "--profile", profile])
            .args(["--manifest-path", manifest])
            .output()
            .unwrap_or_else(|e| panic!("running {cargo:?}: {e}"));
        assert!(
            out.status.success(),
            "building example {name} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        built.push(name.to_owned());
    }
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing after the build",
        path.display()
    );
    path
}

/// A running `hello`, started by [`crate::Netns::hello`]. Dropping it kills the process.
pub struct Hello {
    pub child: Child,
    /// The pid of hello itself (from its ready line; differs from the child's under a wrapper).
    pub pid: u32,
    /// Its internal port.
    pub port: u16,
    lines: mpsc::Receiver<String>,
    /// What it printed so far, stdout and stderr interleaved.
    pub log: Vec<String>,
}

impl Hello {
    /// Spawns `cmd` and waits up to 10 s for `ready pid=P port=Q`; fails the test with the
    /// process's output if it does not come.
    // The child moves into the returned Hello, whose Drop kills and reaps it.
    pub fn start(cmd: Command) -> Hello {
        Hello::start_with(cmd, "ready line", |line| {
            line.strip_prefix("ready pid=")?
                .split_once(" port=")
                .and_then(|(pid, port)| Some((pid.parse().ok()?, port.trim().parse().ok()?)))
        })
    }

    /// Spawns `cmd` and waits up to 10 s for a line of output that `ready` turns into
    /// (pid, internal port).
    // The child moves into the returned Hello, whose Drop kills and reaps it.
    #[allow(clippy::zombie_processes)]
    pub fn start_with(
        mut cmd: Command,
        what: &str,
        ready: impl Fn(&str) -> Option<(u32, u16)>,
    ) -> Hello {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let (tx, rx) = mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("piped"));
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("piped"));
        for stream in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut log = Vec::new();
        loop {
            let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait();
                    while let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                        log.push(line);
                    }
                    panic!(
                        "{cmd:?} printed no {what} within 10 s (exit: {status:?}); it said:\n{}",
                        log.join("\n")
                    );
                }
            };
            if let Some((pid, port)) = ready(&line) {
                log.push(line);
                return Hello {
                    child,
                    pid,
                    port,
                    lines: rx,
                    log,
                };
            }
            log.push(line);
        }
    }

    fn collect(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
    }

    /// Waits up to 10 s for a line of output that starts with `prefix` and returns it
    /// (stdout and stderr are read by separate threads, so order across them is loose).
    pub fn line(&mut self, prefix: &str) -> String {
        self.line_where(
            &format!("starting with {prefix:?}"),
            |l| l.starts_with(prefix),
            Duration::from_secs(10),
        )
    }

    /// Waits up to 10 s for a line that contains `text` and returns it.
    pub fn line_containing(&mut self, text: &str) -> String {
        self.line_within(text, Duration::from_secs(10))
    }

    /// Waits up to `timeout` for a line that contains `text` and returns it.
    pub fn line_within(&mut self, text: &str, timeout: Duration) -> String {
        self.line_where(
            &format!("containing {text:?}"),
            |l| l.contains(text),
            timeout,
        )
    }

    fn line_where(
        &mut self,
        what: &str,
        wanted: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> String {
        if let Some(l) = self.log.iter().find(|l| wanted(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        while let Ok(l) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.log.push(l.clone());
            if wanted(&l) {
                return l;
            }
        }
        panic!(
            "pid {}: no line {what}; output:\n{}",
            self.pid,
            self.log.join("\n")
        );
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The reader threads see EOF right after the exit; take their last lines.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.log.push(line);
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.collect();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to 15 s for a clean exit (status 0) and fails the test with the output
    /// otherwise.
    pub fn expect_clean_exit(&mut self, what: &str) {
        match self.wait_exit(Duration::from_secs(15)) {
            Some(status) => assert!(
                status.success(),
                "{what} (pid {}) exited with {status}; output:\n{}",
                self.pid,
                self.log.join("\n")
            ),
            None => panic!(
                "{what} (pid {}) still runs after 15 s; output:\n{}",
                self.pid,
                self.log.join("\n")
            ),
        }
    }

    /// Sends SIGTERM and waits up to 15 s for the exit.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.wait_exit(Duration::from_secs(15))
    }
}

impl Drop for Hello {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pid named by a hello body (`hello from pid <pid> port <port>`).
pub fn pid_of(body: &str) -> u32 {
    body.strip_prefix("hello from pid ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a hello body: {body:?}"))
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot), which the rule
/// comment carries, read with the library's own parser.
pub fn start_time(pid: u32) -> u64 {
    switcheroo::process::Stat::of(pid)
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"))
        .start_time
}

/// The line `iptables-nft-save` prints for the rule of `hello` in `chain`.
pub fn expected_rule(chain: &str, ns: &str, h: &Hello, public: u16) -> String {
    format!(
        "-A {chain} -p tcp -m tcp --dport {public} -m addrtype --dst-type LOCAL -m comment --comment \"SWITCHEROO:ns={ns}:port={port}:pid={pid}:start={start}\" -j REDIRECT --to-ports {port}",
        port = h.port,
        pid = h.pid,
        start = start_time(h.pid),
    )
}
