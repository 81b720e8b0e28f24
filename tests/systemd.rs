//! The documented unit, `contrib/systemd/web@.service`, under a real systemd (PID 1 of the
//! test's own namespaces, see `lab::systemd`), with only its paths replaced: deploys by
//! `systemctl start web@vN` under load from loopback and from a veth peer, a probation
//! that hands the port back when a release dies, fails its health checks or is rolled
//! back, stops while serving and while starting, `User=web` with ambient capabilities only,
//! what `systemctl status` and `journalctl` show, a cold start after a "reboot", and the
//! cost of `systemctl restart`.

use lab::systemd::{Boot, Machine};
use lab::{example, get, pid_of, switcheroo_bin};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `target/<profile>`: bound read-only into the machine at the same path.
fn build_dir() -> PathBuf {
    switcheroo_bin().parent().unwrap().to_path_buf()
}

/// The unit as the project ships it, with the paths of this build.
fn unit() -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/systemd/web@.service"
    ))
    .unwrap();
    text.replace("/usr/bin/switcheroo", switcheroo_bin().to_str().unwrap())
}

/// A machine with the unit installed, the user `web`, and releases whose server is
/// `hello` (`/srv/web/vN/bin/server`).
fn machine(boot: Boot) -> Machine {
    let m = Machine::boot(Boot {
        binds: vec![build_dir()],
        ..boot
    });
    eprintln!("systemd booted in {:?}", m.booted_in);
    m.ok(&["useradd", "--system", "--no-create-home", "web"]);
    m.write("/etc/systemd/system/web@.service", &unit());
    m.ok(&["systemctl", "daemon-reload"]);
    m
}

/// Release `name` with `hello` as its server.
fn release(m: &Machine, name: &str) {
    let bin = m.path(&format!("/srv/web/{name}/bin"));
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(example("hello"), bin.join("server")).unwrap();
}

/// Release `name` whose server is the script `text`.
fn release_script(m: &Machine, name: &str, text: &str) {
    m.write(&format!("/srv/web/{name}/bin/server"), text);
    let path = m.path(&format!("/srv/web/{name}/bin/server"));
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// `systemctl start web@NAME`, timed; it must succeed.
fn start(m: &Machine, name: &str) -> Duration {
    let t = Instant::now();
    let out = m.systemctl(&["start", &format!("web@{name}")]);
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "systemctl start web@{name}: {}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.ok(&["journalctl", "--no-pager", "-u", &format!("web@{name}")]),
        m.console_log()
    );
    took
}

/// The pid (in the machine) of the process that answers on 8080 from loopback.
fn serving(m: &Machine) -> u32 {
    let (_, body) = m
        .netns
        .enter(|| get("127.0.0.1:8080".parse().unwrap(), "/"))
        .expect("8080 answers");
    pid_of(&body)
}

/// The pid (in the machine) of release `name`'s server: the child of its run.
fn server_of(m: &Machine, name: &str) -> u32 {
    let run = m.property(&format!("web@{name}"), "MainPID");
    let children = m.ok(&["pgrep", "-P", &run]);
    children
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("web@{name}'s server: {children:?}"))
}

/// Requests every millisecond to 8080 from loopback and from the peer, each on a new
/// connection; counts what failed, and when.
struct Probe {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<Instant>)>>,
}

impl Probe {
    fn start(m: &Machine, peer: &lab::Netns) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (ns, target) in [(&m.netns, "127.0.0.1:8080"), (peer, "192.0.2.1:8080")] {
            let target: SocketAddr = target.parse().unwrap();
            for _ in 0..2 {
                let stop = stop.clone();
                let name = ns.name.clone();
                threads.push(std::thread::spawn(move || {
                    let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
                    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        // A failure counts at the request's start: one sent before a
                        // repair may end, and be seen, after it.
                        let sent = Instant::now();
                        match get(target, "/") {
                            Ok((200, _)) => ok += 1,
                            _ => failed.push(sent),
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    (ok, failed)
                }));
            }
        }
        Probe { stop, threads }
    }

    /// (answered, when each failed request was sent).
    fn stop(self) -> (u64, Vec<Instant>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = (0, Vec::new());
        for t in self.threads {
            let (ok, failed) = t.join().unwrap();
            all.0 += ok;
            all.1.extend(failed);
        }
        all.1.sort();
        all
    }
}

#[test]
fn deploys_by_systemctl_start_under_load_and_what_systemd_shows() {
    if !lab::systemd::available() {
        return;
    }
    let m = machine(Boot::default());
    let peer = m.netns.peer();
    for v in ["v1", "v2", "v3", "v4"] {
        release(&m, v);
    }
    start(&m, "v1");
    let probe = Probe::start(&m, &peer);
    let mut took = Vec::new();
    for (i, v) in ["v2", "v3", "v4"].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(300));
        took.push(start(&m, v));
        // start returned: the release serves.
        assert_eq!(
            serving(&m),
            server_of(&m, v),
            "after systemctl start web@{v}"
        );
        // The release two before was replaced (the one before is the standby of the
        // probation): it left by itself, a clean stop.
        if i >= 1 {
            let old = format!("web@{}", ["v1", "v2", "v3"][i - 1]);
            let state = m.wait_state(&old, "inactive", Duration::from_secs(10));
            assert_eq!(state, "inactive", "{old}");
            assert_eq!(m.property(&old, "SubState"), "dead", "{old}");
            assert_eq!(m.property(&old, "Result"), "success", "{old}");
            assert_eq!(m.property(&old, "ExecMainStatus"), "0", "{old}");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = probe.stop();
    eprintln!(
        "3 deploys: systemctl start took {took:?}; {ok} requests, {} failed",
        failed.len()
    );
    assert_eq!(failed.len(), 0);
    assert!(ok > 200, "the load ran: {ok}");

    // What an operator sees: the role in `systemctl status`, the switch and the drain in
    // the journal, the process of user web with only the ambient capabilities.
    let status = m.property("web@v4", "StatusText");
    assert!(
        status.starts_with("serving (active); port 8080/tcp"),
        "{status}"
    );
    let standby = m.wait_property(
        "web@v3",
        "StatusText",
        |s| s.starts_with("standby"),
        Duration::from_secs(10),
    );
    assert!(standby.starts_with("standby"), "{standby}");
    let v2 = m.journal_with("web@v2", "exited with status 0", Duration::from_secs(10));
    assert!(v2.contains("is ready: port 8080/tcp ->"), "{v2}");
    assert!(v2.contains("port 8080/tcp drained in"), "{v2}");
    assert!(v2.contains("exited with status 0"), "{v2}");
    let status = String::from_utf8_lossy(&m.systemctl(&["status", "--no-pager", "web@v4"]).stdout)
        .into_owned();
    assert!(status.contains("Status: \"serving (active)"), "{status}");
    let run = m.main_pid("web@v4").expect("web@v4 runs");
    let proc_status = std::fs::read_to_string(format!("/proc/{run}/status")).unwrap();
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    assert_ne!(
        field("Uid:").split_whitespace().next(),
        Some("0"),
        "runs as web"
    );
    let caps = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    let (net_admin, kill) = (1u64 << 12, 1u64 << 5);
    assert_eq!(
        caps,
        net_admin | kill,
        "only the ambient capabilities: {caps:#x}"
    );
    // The record of the last commit, in the directory systemd made for the user.
    let records: Vec<_> = std::fs::read_dir(m.path("/run/switcheroo"))
        .unwrap()
        .collect();
    assert!(!records.is_empty(), "a commit record in RuntimeDirectory");

    // `systemctl restart` of the only instance: nothing serves between its stop and its
    // new start. Measured, for the README.
    m.ok(&["systemctl", "stop", "web@v3"]);
    let probe = Probe::start(&m, &peer);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    m.ok(&["systemctl", "restart", "web@v4"]);
    let restart = t.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = probe.stop();
    let gap = match (failed.first(), failed.last()) {
        (Some(a), Some(b)) => *b - *a,
        _ => Duration::ZERO,
    };
    eprintln!(
        "systemctl restart of the only instance took {restart:?}: {} of {} requests failed, over {gap:?}",
        failed.len(),
        ok + failed.len() as u64
    );
}

/// A server on fd 3 whose /healthz answers 200 twice, then 500.
const FAILING_HEALTH: &str = r#"#!/usr/bin/python3
import http.server, os, socket, sys
# Healthy until the test creates `unhealthy` beside this script (a count of answers would
# race with readiness probes that gave up on a slow start).
marker = os.path.join(os.path.dirname(sys.argv[0]), "unhealthy")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if self.path == "/healthz" and os.path.exists(marker) else 200
        body = "hello from pid {} port {}".format(os.getpid(), os.environ["SWITCHEROO_PORT"]).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("::", 0), H, bind_and_activate=False)
server.socket = socket.socket(fileno=3)
server.serve_forever()
"#;

/// Waits until `unit` has ended as failed with `status`, and checks it was not restarted.
fn failed_with(m: &Machine, unit: &str, status: &str) {
    assert_eq!(
        m.wait_state(unit, "failed", Duration::from_secs(15)),
        "failed",
        "{unit}: {}",
        m.journal(unit)
    );
    assert_eq!(m.property(unit, "ExecMainStatus"), status, "{unit}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.property(unit, "NRestarts"), "0", "{unit} was restarted");
    assert_eq!(m.property(unit, "ActiveState"), "failed", "{unit}");
}

/// Polls 8080 every millisecond until `pid` answers; how long that took.
fn until_served_by(m: &Machine, pid: u32, since: Instant) -> Duration {
    let deadline = since + Duration::from_secs(10);
    m.netns.enter(|| loop {
        if let Ok((200, body)) = get("127.0.0.1:8080".parse().unwrap(), "/") {
            if pid_of(&body) == pid {
                return since.elapsed();
            }
        }
        assert!(Instant::now() < deadline, "pid {pid} never served again");
        std::thread::sleep(Duration::from_millis(1));
    })
}

#[test]
fn a_probation_hands_the_port_back_when_a_release_dies_fails_or_is_rolled_back() {
    if !lab::systemd::available() {
        return;
    }
    let m = machine(Boot::default());
    let peer = m.netns.peer();
    for v in ["v1", "v2", "v4", "v5"] {
        release(&m, v);
    }
    release_script(&m, "v3", FAILING_HEALTH);
    start(&m, "v1");
    let v1 = server_of(&m, "v1");
    let probe = Probe::start(&m, &peer);

    // v2's server SIGKILLed during its probation: v1 serves again, web@v2 fails with 4.
    start(&m, "v2");
    let v2_server_host = {
        let run = m.main_pid("web@v2").unwrap();
        std::fs::read_to_string(format!("/proc/{run}/task/{run}/children"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<i32>()
            .unwrap()
    };
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(v2_server_host),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restored = until_served_by(&m, v1, killed);
    failed_with(&m, "web@v2", "4");

    // v3 fails /healthz 3 times in a row: the same, by itself.
    start(&m, "v3");
    m.write("/srv/web/v3/bin/unhealthy", "");
    let bad = Instant::now();
    let restored_health = until_served_by(&m, v1, bad);
    failed_with(&m, "web@v3", "4");

    // `switcheroo rollback` from a shell: the same, by hand.
    start(&m, "v4");
    let rolled = Instant::now();
    let bin = switcheroo_bin();
    let said = m.ok(&[bin.to_str().unwrap(), "rollback", "-n", "web"]);
    let restored_rollback = until_served_by(&m, v1, rolled);
    assert!(said.contains("rolled back from pid"), "{said}");
    failed_with(&m, "web@v4", "4");

    // An operator stops the serving release during its probation: the standby serves at
    // once, and the stopped release ends cleanly.
    start(&m, "v5");
    let stopped = Instant::now();
    let restored_stop = std::thread::scope(|s| {
        let stop = s.spawn(|| m.ok(&["systemctl", "stop", "web@v5"]));
        let restored = until_served_by(&m, v1, stopped);
        stop.join().unwrap();
        restored
    });
    assert_eq!(m.property("web@v5", "Result"), "success");
    assert_eq!(m.property("web@v1", "ActiveState"), "active");

    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = probe.stop();
    let after_crash: Vec<_> = failed.iter().filter(|t| **t > killed + restored).collect();
    eprintln!(
        "back on v1: {restored:?} after v2's server was SIGKILLed, {restored_health:?} after v3 started failing /healthz, {restored_rollback:?} after switcheroo rollback, {restored_stop:?} after systemctl stop of v5; {ok} requests, {} failed, {} of them after the crash was repaired",
        failed.len(),
        after_crash.len()
    );
    // Outside the instant of the crash, nothing fails.
    assert!(after_crash.is_empty(), "{after_crash:?}");
    assert!(restored < Duration::from_secs(1), "{restored:?}");
}

#[test]
fn a_release_stopped_while_starting_switches_nothing_and_an_enabled_one_starts_at_boot() {
    if !lab::systemd::available() {
        return;
    }
    let layers = lab::TempPath(
        std::env::temp_dir().join(format!("switcheroo-layers-{}", std::process::id())),
    );
    let m = machine(Boot {
        after: Some(layers.0.clone()),
        ..Boot::default()
    });
    release(&m, "v1");
    release_script(&m, "slow", "#!/bin/sh\nexec sleep 600\n");
    start(&m, "v1");
    m.ok(&["systemctl", "enable", "web@v1"]);
    let before = m.netns.rule_lines();

    // Still waiting for /healthz: systemctl stop returns at once, nothing switched.
    m.ok(&["systemctl", "start", "--no-block", "web@slow"]);
    m.wait_state("web@slow", "activating", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    m.ok(&["systemctl", "stop", "web@slow"]);
    let stop = t.elapsed();
    eprintln!("systemctl stop of a release still starting took {stop:?}");
    assert!(stop < Duration::from_secs(5), "{stop:?}");
    assert_eq!(m.netns.rule_lines(), before, "nothing was switched");
    let j = m.journal_with(
        "web@slow",
        "told to stop (SIGTERM) before the switch",
        Duration::from_secs(10),
    );
    assert!(
        j.contains("told to stop (SIGTERM) before the switch"),
        "{j}"
    );

    // A "reboot": a new machine on the same /etc, booted to multi-user.target. The
    // enabled release starts by itself and serves.
    drop(m);
    let m = Machine::boot(Boot {
        binds: vec![build_dir()],
        unit: "multi-user.target".into(),
        after: Some(layers.0.clone()),
        ..Boot::default()
    });
    // The releases are where the machine keeps them (/srv, with its writable layers).
    assert_eq!(
        m.wait_state("web@v1", "active", Duration::from_secs(15)),
        "active",
        "{}",
        m.journal("web@v1")
    );
    assert_eq!(serving(&m), server_of(&m, "v1"));
    let us = |args: &[&str]| -> u64 {
        let out = m.systemctl(&[&["show", "--value", "-p"], args].concat());
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    // The manager's own start, and the unit's.
    let began = us(&["UserspaceTimestampMonotonic"]);
    let active = us(&["ActiveEnterTimestampMonotonic", "web@v1"]);
    eprintln!(
        "cold start: web@v1 active and serving {} ms after systemd started",
        active.saturating_sub(began) / 1000
    );
}

/// A release that owes nothing to the build: Python's own HTTP server on the socket that
/// `switcheroo run` passes (fd 3, `LISTEN_FDS=1`), finishing its requests on SIGTERM.
const PYTHON_RELEASE: &str = r#"#!/usr/bin/python3
import http.server, os, signal, socket, threading

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        body = f"hello from pid {os.getpid()} port {os.environ['SWITCHEROO_PORT']}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)
server.daemon_threads = False
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
server.server_close()
"#;

#[test]
fn the_debian_package_installs_into_a_fresh_root_and_deploys() {
    if !lab::systemd::available()
        || !lab::command::have("dpkg-deb", &["--version"], "dpkg-deb (dpkg-dev)")
        || !lab::command::have("dpkg-shlibdeps", &["--help"], "dpkg-shlibdeps (dpkg-dev)")
    {
        return;
    }
    // Nothing of the build is in this machine: /usr is an overlay of the host's (which
    // has no switcheroo), dpkg's database a writable copy.
    let m = Machine::boot(Boot {
        writable_usr: true,
        ..Boot::default()
    });
    assert!(
        !m.path("/usr/bin/switcheroo").exists(),
        "the fresh root already has a switcheroo"
    );
    let built = m.layers.join("deb");
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/ci/package"))
        .args(["--binary", switcheroo_bin().to_str().unwrap(), "--out"])
        .arg(&built)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ci/package: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    std::fs::copy(&deb, m.path("/root/switcheroo.deb")).unwrap();
    let t = Instant::now();
    m.ok(&["dpkg", "-i", "/root/switcheroo.deb"]);
    eprintln!(
        "{} ({} KiB) installed in {:?}",
        deb.file_name().unwrap().to_string_lossy(),
        std::fs::metadata(&deb).unwrap().len() / 1024,
        t.elapsed()
    );

    // What the package holds, as a user finds it.
    let status = m.ok(&[
        "dpkg-query",
        "-W",
        "-f",
        "${Status} ${Depends}",
        "switcheroo",
    ]);
    assert!(status.starts_with("install ok installed "), "{status}");
    assert!(status.contains("libmnl0"), "Depends: {status}");
    let help = m.ok(&["switcheroo", "--help"]);
    assert!(help.contains("run"), "{help}");
    for page in [
        "switcheroo",
        "switcheroo-run",
        "switcheroo-status",
        "switcheroo-rollback",
    ] {
        let path = format!("/usr/share/man/man1/{page}.1.gz");
        let text = m.ok(&["sh", "-c", &format!("zcat {path}")]);
        assert!(
            text.contains(".TH"),
            "{path} is not a man page: {text:.200}"
        );
    }
    let run_page = m.ok(&["sh", "-c", "zcat /usr/share/man/man1/switcheroo-run.1.gz"]);
    assert!(run_page.contains("stop\\-signal"), "{run_page}");
    let completion = m.ok(&[
        "bash",
        "-c",
        ". /usr/share/bash-completion/completions/switcheroo && complete -p switcheroo",
    ]);
    assert!(completion.contains("switcheroo"), "{completion}");
    for path in [
        "/usr/share/zsh/vendor-completions/_switcheroo",
        "/usr/share/fish/vendor_completions.d/switcheroo.fish",
    ] {
        assert!(m.path(path).is_file(), "{path}");
    }

    // The example unit, installed as its comment says, deploys a release that is not
    // part of the build.
    m.ok(&[
        "cp",
        "/usr/share/doc/switcheroo/examples/web@.service",
        "/etc/systemd/system/",
    ]);
    m.ok(&["useradd", "--system", "--no-create-home", "web"]);
    m.ok(&["systemctl", "daemon-reload"]);
    for v in ["v1", "v2"] {
        release_script(&m, v, PYTHON_RELEASE);
    }
    let peer = m.netns.peer();
    let first = start(&m, "v1");
    assert_eq!(serving(&m), server_of(&m, "v1"));
    let probe = Probe::start(&m, &peer);
    std::thread::sleep(Duration::from_millis(300));
    let second = start(&m, "v2");
    assert_eq!(serving(&m), server_of(&m, "v2"));
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = probe.stop();
    eprintln!(
        "installed package: systemctl start web@v1 {first:?}, web@v2 {second:?}; \
         {ok} requests, {} failed",
        failed.len()
    );
    assert_eq!(failed.len(), 0);
    assert!(ok > 100, "the load ran: {ok}");
    let status = m.property("web@v2", "StatusText");
    assert!(status.starts_with("serving (active)"), "{status}");
}
