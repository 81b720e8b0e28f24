//! Test harness: throwaway network namespaces, `hello` instances as real processes, and
//! small HTTP clients that run inside a namespace.
//!
//! Nothing here touches the ruleset of the machine's own network namespace: every command
//! that reads or edits nftables runs through `ip netns exec` in a namespace made for the
//! test, and every socket is opened by a thread that entered that namespace.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Whether the privileged tests can run here: root, and allowed to create network
/// namespaces (a root without CAP_SYS_ADMIN, e.g. in an unprivileged container, is not).
/// If not, the test prints `skipped: <reason>` and returns early, except under CI
/// (`CI=true`), where a skip would make a green run meaningless: there it fails.
pub fn require_root() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (network namespaces and nftables)".into());
        }
        let name = format!("sw-probe-{}", std::process::id());
        let added = Command::new("ip").args(["netns", "add", &name]).output();
        match added {
            Ok(out) if out.status.success() => {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
                Ok(())
            }
            Ok(out) => Err(format!(
                "`ip netns add` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run `ip` (iproute2): {e}")),
        }
    });
    match probe {
        Ok(()) => true,
        Err(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{reason}; CI=true forbids skipping")
        }
        Err(reason) => {
            eprintln!("skipped: {reason}");
            false
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace made for one test (`sw-<pid>-<n>`, loopback up). Dropping it kills
/// every process inside and deletes it, also when the test panics.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!(
            "sw-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and returns what it did.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {args:?}: {e}", self.name))
    }

    /// Runs a command inside the namespace, asserts that it succeeded, returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Netns::ok`] for a command line without quoting (split on spaces).
    pub fn run(&self, line: &str) -> String {
        self.ok(&line.split(' ').collect::<Vec<_>>())
    }

    /// `iptables-nft-save -t nat` (`ip6tables-nft-save` for `v6`) inside the namespace,
    /// stdout and stderr together. Fails the test if the tool fails or calls the table
    /// incompatible (what iptables-nft says of a table with rules it cannot represent).
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
        assert!(out.status.success(), "{tool} failed: {text}");
        assert!(
            !text.contains("incompatible"),
            "{tool} calls the table incompatible:\n{text}"
        );
        text
    }

    /// The rule lines (`-A ...`) of both save outputs, each prefixed with `ip ` or `ip6 `.
    pub fn rule_lines(&self) -> Vec<String> {
        [(false, "ip"), (true, "ip6")]
            .into_iter()
            .flat_map(|(v6, family)| {
                self.save(v6)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .map(|l| format!("{family} {l}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Runs `f` on a thread that entered the namespace with setns(2), which moves only the
    /// calling thread; sockets it opens (TCP clients, the library's netlink socket) belong
    /// to the namespace for their whole life, whichever thread uses them later.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file =
                    std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `hello` with `args` in the namespace and waits for its ready line.
    pub fn hello(&self, args: &[&str]) -> Hello {
        self.hello_with(&[], args)
    }

    /// Starts the example `name` with `args` in the namespace and waits for its
    /// `ready pid=P port=Q` line.
    pub fn example(&self, name: &str, args: &[&str]) -> Hello {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(example(name))
            .args(args);
        Hello::start(cmd)
    }

    /// Starts `hello` under `wrapper` (e.g. `strace` and its options, or `setpriv ...`).
    pub fn hello_with(&self, wrapper: &[&str], args: &[&str]) -> Hello {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .args(wrapper)
            .arg(example("hello"))
            .args(args);
        Hello::start(cmd)
    }

    /// A second namespace joined to this one by a veth pair, so that its clients reach
    /// this one "from the network" (through PREROUTING). Documentation ranges only: this
    /// side 192.0.2.1/24 and 2001:db8::1/64, the peer 192.0.2.2/24 and 2001:db8::2/64.
    pub fn peer(&self) -> Netns {
        let peer = Netns::new();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let (here, there) = (format!("swa{n}"), format!("swb{n}"));
        self.ok(&[
            "ip", "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", &peer.name,
        ]);
        for (ns, dev, v4, v6) in [
            (self, &here, "192.0.2.1/24", "2001:db8::1/64"),
            (&peer, &there, "192.0.2.2/24", "2001:db8::2/64"),
        ] {
            ns.ok(&["ip", "addr", "add", v4, "dev", dev]);
            // nodad: the address is usable at once instead of after duplicate detection.
            ns.ok(&["ip", "-6", "addr", "add", v6, "dev", dev, "nodad"]);
            ns.ok(&["ip", "link", "set", dev, "up"]);
        }
        peer
    }

    /// Takes the commit lock of service `namespace` in this network namespace, as another
    /// privileged deployer in the middle of its commit would: the returned socket owns the
    /// lock table; dropping it releases the lock, as the holder's exit would.
    pub fn hold_lock(&self, namespace: &str) -> switcheroo_sys::Conn {
        use switcheroo_sys::{Batch, Conn, Op, OwnedTable};
        self.enter(|| {
            let mut conn = Conn::open().expect("netlink socket");
            let mut lock = Batch::new(None);
            lock.push(Op::AddOwnedTable(
                OwnedTable::new(format!("switcheroo-lock-{namespace}")).unwrap(),
            ));
            conn.apply(&lock).expect("take the lock");
            conn
        })
    }

    /// The pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
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
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
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

/// A running `hello`, started by [`Netns::hello`]. Dropping it kills the process.
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
        self.line_where(&format!("starting with {prefix:?}"), |l| {
            l.starts_with(prefix)
        })
    }

    /// Waits up to 10 s for a line that contains `text` and returns it.
    pub fn line_containing(&mut self, text: &str) -> String {
        self.line_where(&format!("containing {text:?}"), |l| l.contains(text))
    }

    fn line_where(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.log.iter().find(|l| wanted(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
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

/// An HTTP response as the clients below read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Whether it carried `Connection: close`.
    pub close: bool,
    pub body: String,
}

/// Reads one response: status line, headers, then a body of `Content-Length` bytes.
fn read_response(reader: &mut impl BufRead) -> io::Result<Response> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let (mut len, mut close) = (None, false);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(bad(format!("bad header {header:?}")));
        };
        if name.eq_ignore_ascii_case("content-length") {
            len = value.trim().parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.trim().eq_ignore_ascii_case("close");
        }
    }
    let len = len.ok_or_else(|| bad("no Content-Length".into()))?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8(body).map_err(|e| bad(e.to_string()))?;
    Ok(Response {
        status,
        close,
        body,
    })
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    Ok(stream)
}

/// `GET path` over a new connection (`Connection: close`); returns (status, body). Call
/// it inside a namespace ([`Netns::enter`]).
pub fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: switcheroo\r\nConnection: close\r\n\r\n"
    )?;
    let response = read_response(&mut BufReader::new(stream))?;
    Ok((response.status, response.body))
}

/// A keep-alive HTTP/1.1 connection: requests in turn over one TCP connection.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    /// Connects; call it inside a namespace ([`Netns::enter`]). The connection can then be
    /// used from any thread.
    pub fn connect(addr: SocketAddr) -> io::Result<KeepAlive> {
        Ok(KeepAlive {
            reader: BufReader::new(connect(addr)?),
        })
    }

    /// `GET path` on this connection.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        write!(
            self.reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: switcheroo\r\n\r\n"
        )?;
        read_response(&mut self.reader)
    }

    /// Waits up to `timeout` for the server to close the connection without sending
    /// anything more; false if it stayed open (or sent bytes).
    pub fn closed_by_server_within(&mut self, timeout: Duration) -> bool {
        let stream = self.reader.get_mut();
        if stream.set_read_timeout(Some(timeout)).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        matches!(self.reader.read(&mut byte), Ok(0))
    }
}

/// A path in the temporary directory, named after `ns` and `what`, removed when dropped
/// (also when the test panics).
pub struct TempPath(pub PathBuf);

impl TempPath {
    pub fn new(ns: &Netns, what: &str) -> TempPath {
        TempPath(std::env::temp_dir().join(format!("{}-{what}", ns.name)))
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sets a flag when dropped, so that helper threads of a scope stop even when the test
/// body panics (a scope joins its threads before the panic propagates).
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The pid named by a hello body (`hello from pid <pid> port <port>`).
pub fn pid_of(body: &str) -> u32 {
    body.strip_prefix("hello from pid ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a hello body: {body:?}"))
}

/// Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), which the rule
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

/// The version in an answer `v<N> pid=<P> ...`.
pub fn version(answer: &str) -> Option<usize> {
    answer.strip_prefix('v')?.split(' ').next()?.parse().ok()
}

/// One UDP client's record: for each datagram (numbered), the version that answered and
/// when, and how many times it had to be sent again.
pub struct FlowLog {
    pub answers: Vec<(Instant, usize)>,
    /// Datagrams that had to be sent more than once (their first copy or its answer was
    /// lost).
    pub resent: usize,
    pub lost: Vec<String>,
}

/// Sends `payload` on `socket` (connected) and waits for the answer that ends with it,
/// sending again every 100 ms, 20 times at most. `None` if it never came.
pub fn ask(socket: &UdpSocket, payload: &str, resent: &mut usize) -> Option<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 512];
    for attempt in 0..20 {
        if attempt == 1 {
            *resent += 1;
        }
        if socket.send(payload.as_bytes()).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let deadline = Instant::now() + Duration::from_millis(100);
        while Instant::now() < deadline {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    // An answer to an earlier copy of an earlier datagram: skip it.
                    if text.ends_with(&format!(" {payload}")) {
                        return Some(text);
                    }
                }
                Err(_) => break,
            }
        }
    }
    None
}

/// A client on one long-lived flow (one connected socket: one 4-tuple), a datagram every
/// 3 ms, each waiting for its answer.
pub fn long_lived_flow(target: SocketAddr, id: usize, stop: Arc<AtomicBool>) -> FlowLog {
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(any).unwrap();
    socket.connect(target).unwrap();
    let mut log = FlowLog {
        answers: Vec::new(),
        resent: 0,
        lost: Vec::new(),
    };
    let mut seq = 0;
    while !stop.load(Ordering::SeqCst) {
        let payload = format!("flow{id} {seq}");
        match ask(&socket, &payload, &mut log.resent).and_then(|a| version(&a)) {
            Some(v) => log.answers.push((Instant::now(), v)),
            None => log.lost.push(payload),
        }
        seq += 1;
        std::thread::sleep(Duration::from_millis(3));
    }
    log
}

/// A client whose every datagram is a new flow (a new socket each time), as DNS clients do.
pub fn new_flows(target: SocketAddr, id: usize, stop: Arc<AtomicBool>) -> FlowLog {
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let mut log = FlowLog {
        answers: Vec::new(),
        resent: 0,
        lost: Vec::new(),
    };
    let mut seq = 0;
    while !stop.load(Ordering::SeqCst) {
        let socket = UdpSocket::bind(any).unwrap();
        socket.connect(target).unwrap();
        let payload = format!("new{id} {seq}");
        match ask(&socket, &payload, &mut log.resent).and_then(|a| version(&a)) {
            Some(v) => log.answers.push((Instant::now(), v)),
            None => log.lost.push(payload),
        }
        seq += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    log
}

/// UDP clients on `port` of 127.0.0.1 and ::1: 4 on long-lived flows ([`long_lived_flow`])
/// and 2 on new flows ([`new_flows`]), alternating the two addresses. Start it from a
/// thread inside the server's network namespace.
pub struct UdpLoad {
    stop: Arc<AtomicBool>,
    flows: Vec<std::thread::JoinHandle<FlowLog>>,
    fresh: Vec<std::thread::JoinHandle<FlowLog>>,
}

impl UdpLoad {
    pub fn start(port: u16) -> UdpLoad {
        let targets: [SocketAddr; 2] = [
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |n: usize, client: fn(SocketAddr, usize, Arc<AtomicBool>) -> FlowLog| {
            (0..n)
                .map(|id| {
                    let stop = stop.clone();
                    std::thread::spawn(move || client(targets[id % 2], id, stop))
                })
                .collect()
        };
        UdpLoad {
            flows: spawn(4, long_lived_flow),
            fresh: spawn(2, new_flows),
            stop,
        }
    }

    /// Stops the clients; what the long-lived flows and the new-flow clients saw.
    pub fn stop(self) -> (Vec<FlowLog>, Vec<FlowLog>) {
        self.stop.store(true, Ordering::SeqCst);
        let join = |v: Vec<std::thread::JoinHandle<FlowLog>>| -> Vec<FlowLog> {
            v.into_iter().map(|t| t.join().unwrap()).collect()
        };
        (join(self.flows), join(self.fresh))
    }
}
