//! Test harness: throwaway network namespaces, `hello` instances as real processes, and
//! small HTTP clients that run inside a namespace.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Whether privileged tests can run. Without root they skip with a reason, except under
/// CI (`CI=true`), where a skip would make a green run meaningless: there they fail.
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let reason = "needs root (network namespaces and nftables)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason}, and CI=true forbids skipping");
    }
    eprintln!("skipped: {reason}");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace made for one test and deleted, with everything in it, on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!(
            "swt-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {args:?}: {e}"))
    }

    /// Runs a command inside the namespace, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command line (split on spaces) inside the namespace, asserts success.
    pub fn run(&self, line: &str) -> String {
        self.ok(&line.split(' ').collect::<Vec<_>>())
    }

    /// `iptables-nft-save -t nat` (or ip6tables-nft-save) inside the namespace.
    pub fn save(&self, v6: bool) -> String {
        let tool = if v6 {
            "ip6tables-nft-save"
        } else {
            "iptables-nft-save"
        };
        let out = self.exec(&[tool, "-t", "nat"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{tool}: {text}");
        assert!(
            !text.contains("incompatible"),
            "{tool} calls the table incompatible:\n{text}"
        );
        text
    }

    /// The rule lines (`-A ...`) of both save outputs.
    pub fn rule_lines(&self) -> Vec<String> {
        [false, true]
            .iter()
            .flat_map(|v6| {
                let family = if *v6 { "ip6" } else { "ip" };
                self.save(*v6)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .map(|l| format!("{family} {l}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Runs `f` on a thread that has entered the namespace (setns(2) affects only the
    /// calling thread, and threads it spawns inherit it).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }

    /// Starts `hello` in the namespace and waits for its ready line.
    pub fn hello(&self, args: &[&str]) -> Hello {
        self.hello_with(&[], args)
    }

    /// Starts `hello` under `wrapper` (e.g. strace and its options).
    pub fn hello_with(&self, wrapper: &[&str], args: &[&str]) -> Hello {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .args(wrapper)
            .arg(example("hello"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Hello::start(cmd)
    }

    /// A second namespace joined to this one by a veth pair: this side 192.0.2.1/24 and
    /// 2001:db8::1/64, the peer .2 and ::2 (documentation ranges; the traffic never leaves
    /// the two namespaces).
    pub fn peer(&self) -> Netns {
        let peer = Netns::new();
        let (a, b) = (
            format!("va{}", COUNTER.load(Ordering::SeqCst)),
            format!("vb{}", COUNTER.load(Ordering::SeqCst)),
        );
        self.ok(&[
            "ip", "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &peer.name,
        ]);
        self.ok(&["ip", "addr", "add", "192.0.2.1/24", "dev", &a]);
        self.ok(&["ip", "addr", "add", "2001:db8::1/64", "dev", &a, "nodad"]);
        self.ok(&["ip", "link", "set", &a, "up"]);
        peer.ok(&["ip", "addr", "add", "192.0.2.2/24", "dev", &b]);
        peer.ok(&["ip", "addr", "add", "2001:db8::2/64", "dev", &b, "nodad"]);
        peer.ok(&["ip", "link", "set", &b, "up"]);
        peer
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The path of an example binary built by `cargo test` next to the test binary.
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the examples",
        path.display()
    );
    path
}

/// A running `hello`.
pub struct Hello {
    pub child: Child,
    pub pid: u32,
    pub port: u16,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Hello {
    // The child moves into the returned Hello, whose Drop kills and waits for it.
    #[allow(clippy::zombie_processes)]
    pub fn start(mut cmd: Command) -> Hello {
        let mut child = cmd.spawn().expect("spawn hello");
        let (tx, rx) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("ready pid=") {
                        let (pid, port) = rest.split_once(" port=").expect("ready line");
                        return Hello {
                            pid: pid.parse().expect("pid"),
                            port: port.trim().parse().expect("port"),
                            child,
                            lines: rx,
                            log,
                        };
                    }
                    log.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("hello printed no ready line; it said: {log:?}");
                }
            }
        }
    }

    /// Waits for a line of output that starts with `prefix` (seen before or after the
    /// ready line: stdout and stderr are read by separate threads).
    pub fn line(&mut self, prefix: &str) -> String {
        if let Some(l) = self.log.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(l) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.log.push(l.clone());
            if l.starts_with(prefix) {
                return l;
            }
        }
        panic!("no line starting with {prefix:?}; output: {:?}", self.log);
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                while let Ok(line) = self.lines.try_recv() {
                    self.log.push(line);
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

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

/// `GET path` over a new connection; returns (status, body). Call inside a namespace.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Sets a flag when dropped, so that helper threads of a scope stop even when the test
/// body panics (a scope joins its threads before the panic propagates).
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The pid named by a hello body.
pub fn pid_of(body: &str) -> u32 {
    body.strip_prefix("hello from pid ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a hello body: {body:?}"))
}

/// Field 22 of /proc/<pid>/stat: the process start time the rule comment carries.
pub fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    rest.split_whitespace()
        .nth(19)
        .expect("field 22")
        .parse()
        .expect("number")
}

/// The line iptables-nft-save prints for our rule.
pub fn expected_rule(chain: &str, ns: &str, h: &Hello, public: u16) -> String {
    format!(
        "-A {chain} -p tcp -m tcp --dport {public} -m addrtype --dst-type LOCAL -m comment --comment \"SWITCHEROO:ns={ns}:port={}:pid={}:start={}\" -j REDIRECT --to-ports {}",
        h.port,
        h.pid,
        start_time(h.pid),
        h.port
    )
}
