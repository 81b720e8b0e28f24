//! The `switcheroo` command, run as a user would: in a throwaway network namespace, with
//! real servers (gunicorn from PyPI, `hello` under socket activation) and in a bare chroot.

use lab::command::{run, run_to_end, server_pid, switcheroo, text};
use lab::{get, pid_of, require_root, Hello, Netns, TempPath, UdpLoad};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_switcheroo");

fn addr(s: &str) -> std::net::SocketAddr {
    s.parse().unwrap()
}

/// A python3 that can import gunicorn; `None` (skip, or fail under CI) otherwise.
fn gunicorn_python() -> Option<&'static str> {
    let ok = Command::new("python3")
        .args(["-c", "import gunicorn"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some("python3");
    }
    let reason = "gunicorn is not installed (python3 -m pip install gunicorn; ci/test does)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason}; CI=true forbids skipping");
    }
    eprintln!("skipped: {reason}");
    None
}

const WSGI_APP: &str = r#"
import os

def app(environ, start_response):
    # The master's pid (the process switcheroo started) and the internal port.
    body = "hello from pid {} port {}".format(os.getppid(), os.environ["SWITCHEROO_PORT"]).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"#;

#[test]
fn gunicorn_deployed_eight_times_under_load_fails_no_request() {
    if !require_root() {
        return;
    }
    let Some(python) = gunicorn_python() else {
        return;
    };
    let ns = Netns::new();
    let dir = TempPath::new(&ns, "wsgi");
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::write(dir.0.join("app.py"), WSGI_APP).unwrap();
    let args = [
        "--namespace",
        "gu",
        "--port",
        "8080",
        "--range",
        "41100-41199",
        "--ready",
        "http:/",
        "--",
        python,
        "-m",
        "gunicorn",
        "--chdir",
        dir.as_str(),
        "--workers",
        "2",
        "--graceful-timeout",
        "10",
        "app:app",
    ];
    const DEPLOYS: usize = 8;
    let started = Instant::now();
    let mut current = run(&ns, &args);
    let mut servers = vec![server_pid(&mut current)];
    let (stats, old) = ns.enter(|| {
        let loads: Vec<lab::load::Load> = ["127.0.0.1:8080", "[::1]:8080"]
            .iter()
            .map(|t| {
                let mut plan = lab::load::Plan::new(addr(t));
                plan.close_clients = 2;
                plan.keepalive_clients = 1;
                lab::load::Load::start(&plan)
            })
            .collect();
        let mut old = Vec::new();
        for _ in 0..DEPLOYS {
            std::thread::sleep(Duration::from_millis(500));
            let mut next = run(&ns, &args);
            servers.push(server_pid(&mut next));
            old.push(std::mem::replace(&mut current, next));
        }
        std::thread::sleep(Duration::from_millis(500));
        let stats: Vec<_> = loads.into_iter().map(lab::load::Load::stop).collect();
        (stats, old)
    });
    let lab::load::Totals {
        ok,
        failed,
        samples,
        answered,
        ..
    } = lab::load::Totals::of(&stats);
    eprintln!(
        "gunicorn: {DEPLOYS} deploys in {:?}: {ok} requests answered, {failed} failed",
        started.elapsed()
    );
    assert_eq!(failed, 0, "failed requests: {samples:?}");
    assert!(ok > 500, "the load ran: {ok} requests");
    for server in &servers {
        assert!(
            answered.contains(server),
            "gunicorn {server} never answered (answered: {answered:?})"
        );
    }
    // Every old wrapper drained, forwarded SIGTERM, and exited with gunicorn's status 0.
    for mut h in old {
        h.expect_clean_exit("an old switcheroo run");
        assert!(
            h.log.iter().any(|l| l.contains("drained in")),
            "no drain: {:?}",
            h.log
        );
    }
    // The rules name the last wrapper, as iptables-nft prints them.
    let lines = ns.rule_lines();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let owner = format!(
        "SWITCHEROO:ns=gu:port={}:pid={}:start=",
        current.port, current.pid
    );
    assert!(lines.iter().all(|l| l.contains(&owner)), "{lines:?}");
    assert!(current.terminate().expect("exits").success());
}

#[test]
fn a_server_that_is_not_ready_switches_nothing() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let range = [
        "--range",
        "41200-41299",
        "--port",
        "8080",
        "--namespace",
        "svc",
    ];
    let mut first = run(
        &ns,
        &[&range[..], &["--", lab::example("hello").to_str().unwrap()]].concat(),
    );
    let hello_pid = server_pid(&mut first);
    let before = ns.rule_lines();
    let answer = || {
        ns.enter(|| get(addr("127.0.0.1:8080"), "/"))
            .expect("served")
    };

    let cases: [(&[&str], &str); 4] = [
        (
            &["--", "sh", "-c", "exit 7"],
            "exited with status 7 before it was ready",
        ),
        (
            &["--", "/nonexistent/server"],
            "cannot start /nonexistent/server",
        ),
        (
            &["--ready-timeout", "1s", "--", "sleep", "30"],
            "was not ready after 1s; if it does not speak sd_notify",
        ),
        (
            &[
                "--ready",
                "http:/",
                "--ready-timeout",
                "1500ms",
                "--",
                "sleep",
                "30",
            ],
            "was not ready after 1.5s",
        ),
    ];
    for (args, message) in cases {
        let (status, output) = run_to_end(&ns, &[&range[..], args].concat());
        assert_eq!(status.code(), Some(3), "{args:?}: {output}");
        assert!(output.contains(message), "{args:?}: {output}");
        assert!(output.contains("nothing was switched"), "{output}");
        assert_eq!(ns.rule_lines(), before, "{args:?} changed the ruleset");
        assert_eq!(pid_of(&answer().1), hello_pid, "the old version serves");
    }
    // The timed-out `sleep` was stopped, not left behind; only the first instance runs.
    assert!(
        first.wait_exit(Duration::from_millis(100)).is_none(),
        "the running version was left alone"
    );
    let leftovers: Vec<i32> = ns
        .pids()
        .into_iter()
        .filter(|p| ![first.pid as i32, hello_pid as i32].contains(p))
        .collect();
    assert!(leftovers.is_empty(), "left running: {leftovers:?}");

    // Told to stop before the switch: the server is stopped and run says it did not
    // switch, whatever the server's own status (a `sleep` killed by SIGTERM).
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, BIN, "run"])
        .args(range)
        .args(["--ready", "delay:30s", "--", "sleep", "60"]);
    let mut stopped = Hello::start_with(cmd, "started line", |line| {
        line.contains("started sleep (pid ").then_some((0, 0))
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(stopped.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = stopped.wait_exit(Duration::from_secs(15)).expect("exits");
    assert_eq!(status.code(), Some(3), "{:?}", stopped.log);
    assert!(
        stopped
            .log
            .iter()
            .any(|l| l.contains("before the switch") && l.contains("nothing was switched")),
        "{:?}",
        stopped.log
    );
    assert_eq!(ns.rule_lines(), before);

    // Bad input of any kind: exit 2 before anything starts, ruleset untouched.
    let (status, output) = run_to_end(
        &ns,
        &["--port", "8080", "--range", "8000-9000", "--", "true"],
    );
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains("inside the internal port range"),
        "{output}"
    );
    let (status, output) = run_to_end(&ns, &["--port", "8080", "--ready", "tcp", "--", "true"]);
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains("expected notify, http:/PATH, https:/PATH or delay:DURATION"),
        "{output}"
    );
    assert_eq!(ns.rule_lines(), before);

    // A server that exits on its own after the switch: its status is passed on.
    let mut short = run(
        &ns,
        &[
            &range[..],
            &[
                "--ready",
                "delay:100ms",
                "--",
                "sh",
                "-c",
                "sleep 1; exit 5",
            ],
        ]
        .concat(),
    );
    let status = short.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(5), "{:?}", short.log);
    // It replaced the first instance, which drained and exited 0.
    first.expect_clean_exit("the replaced instance");
}

#[test]
fn a_switch_that_fails_exits_1_and_stops_the_server() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let before = ns.rule_lines();
    // Another privileged deployer of namespace `svc` holds the commit lock (its socket
    // owns the lock table) for longer than a commit waits.
    let lock = ns.hold_lock("svc");
    let (status, output) = run_to_end(
        &ns,
        &[
            "--namespace",
            "svc",
            "--port",
            "8080",
            "--range",
            "41300-41399",
            "--ready",
            "delay:100ms",
            "--",
            lab::example("hello").to_str().unwrap(),
        ],
    );
    drop(lock);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("the switch failed"), "{output}");
    assert!(output.contains("has held the commit lock"), "{output}");
    assert!(
        output.contains("the running version keeps serving"),
        "{output}"
    );
    // The server it started was stopped (hello drains and exits 0 on SIGTERM: run still
    // says 1).
    assert!(output.contains("exited with status 0"), "{output}");
    assert_eq!(ns.rule_lines(), before, "nothing was switched");
    let leftovers = ns.pids();
    assert!(leftovers.is_empty(), "left running: {leftovers:?}");
}

#[test]
fn status_lists_every_namespace_and_cleanup_deletes_one() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let hello = lab::example("hello");
    let hello = hello.to_str().unwrap();
    let mut a = run(
        &ns,
        &[
            "-n",
            "alpha",
            "-p",
            "8080",
            "--range",
            "41300-41349",
            "--",
            hello,
        ],
    );
    let mut b = run(
        &ns,
        &[
            "-n",
            "beta",
            "-p",
            "9090",
            "--range",
            "41350-41399",
            "--routes",
            "localhost",
            "--",
            hello,
        ],
    );

    let out = switcheroo(&ns, &["status", "--rules"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(
        rows[0].split_whitespace().collect::<Vec<_>>(),
        [
            "NAMESPACE",
            "FAMILY",
            "CHAIN",
            "PROTO",
            "PORT",
            "INTERNAL",
            "PID",
            "ROLE"
        ]
    );
    // alpha: both routes in both families; beta: OUTPUT only.
    assert_eq!(rows.len(), 1 + 4 + 2, "{table}");
    let alpha_row = format!("alpha ip PREROUTING tcp 8080 {} {} active", a.port, a.pid);
    let beta_row = format!("beta ip6 OUTPUT tcp 9090 {} {} active", b.port, b.pid);
    let norm: Vec<String> = rows
        .iter()
        .map(|r| r.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(norm.contains(&alpha_row), "{table}");
    assert!(norm.contains(&beta_row), "{table}");

    let out = switcheroo(&ns, &["status", "--json", "--namespace", "beta"]);
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        json.starts_with("{\"instances\":[{\"namespace\":\"beta\""),
        "{json}"
    );
    assert!(
        json.contains("\"rules\":[{\"namespace\":\"beta\""),
        "{json}"
    );
    // One instance, two rules (OUTPUT of both families).
    assert_eq!(json.matches("\"namespace\":").count(), 3, "{json}");
    assert!(
        json.contains("\"family\":\"ip\",\"chain\":\"OUTPUT\""),
        "{json}"
    );
    assert!(
        json.contains(&format!(
            "\"protocol\":\"tcp\",\"port\":9090,\"internal_port\":{},\"pid\":{}",
            b.port, b.pid
        )),
        "{json}"
    );
    assert!(
        json.contains("\"alive\":true,\"role\":\"active\"}"),
        "{json}"
    );

    // A wrapper killed outright: its rules stay and show their owner dead.
    let _ = a.child.kill();
    let _ = a.child.wait();
    let out = switcheroo(&ns, &["status", "--rules", "-n", "alpha"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        table
            .lines()
            .filter(|l| l.trim_end().ends_with(" dead"))
            .count(),
        4,
        "{table}"
    );

    let out = switcheroo(&ns, &["cleanup", "--namespace", "alpha"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "removed 4 rules of namespace alpha"
    );
    let lines = ns.rule_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.contains("SWITCHEROO:ns=beta:")),
        "{lines:?}"
    );
    let out = switcheroo(&ns, &["cleanup", "--namespace", "alpha"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "removed 0 rules of namespace alpha"
    );
    let out = switcheroo(&ns, &["cleanup", "--namespace", "no:colons"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no:colons"), "{}", text(&out));
    assert!(b.terminate().expect("exits").success(), "{:?}", b.log);
}

/// Copies `binary` and every shared library `ldd` lists for it into `root`, at the
/// same paths.
fn install_with_libraries(root: &Path, binary: &Path, name: &str) -> Vec<String> {
    let out = Command::new("ldd").arg(binary).output().expect("run ldd");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut libs = Vec::new();
    for line in listing.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let target = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(path, &target).unwrap_or_else(|e| panic!("copy {path}: {e}"));
        libs.push(path.to_owned());
    }
    std::fs::copy(binary, root.join(name)).unwrap();
    libs
}

#[test]
fn the_command_and_the_library_run_in_a_bare_chroot() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let root = TempPath::new(&ns, "chroot");
    std::fs::create_dir_all(root.0.join("proc")).unwrap();
    let libs = install_with_libraries(&root.0, Path::new(BIN), "switcheroo");
    let hello_libs = install_with_libraries(&root.0, &lab::example("hello"), "hello");
    eprintln!("chroot: switcheroo needs {libs:?}; hello needs {hello_libs:?}");
    let mut files = Vec::new();
    list_files(&root.0, &mut files);
    // Nothing else: no shell, no iptables, no nft.
    assert_eq!(
        files.len(),
        2 + libs
            .iter()
            .chain(&hello_libs)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        "{files:?}"
    );

    // unshare mounts a fresh /proc inside the chroot, in a private mount namespace.
    let in_chroot = |args: &[&str]| -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &ns.name,
            "unshare",
            "--mount",
            "--propagation",
            "private",
        ])
        .arg(format!("--root={}", root.as_str()))
        .args(["--mount-proc=/proc"])
        .args(args);
        cmd
    };
    let mut wrapped = Hello::start_with(
        in_chroot(&[
            "/switcheroo",
            "run",
            "-n",
            "jail",
            "-p",
            "8080",
            "--range",
            "41400-41499",
            "--",
            "/hello",
        ]),
        "switch log line",
        |line| {
            let rest = line.split_once(" is ready: port ")?.1;
            Some((
                0,
                rest.split_once(" -> ")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?,
            ))
        },
    );
    let served = ns
        .enter(|| get(addr("127.0.0.1:8080"), "/"))
        .expect("served");
    assert!(
        served.1.ends_with(&format!("port {}", wrapped.port)),
        "{served:?}"
    );

    let status = in_chroot(&["/switcheroo", "status", "--json"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    // One instance, four rules.
    assert_eq!(
        String::from_utf8_lossy(&status.stdout)
            .matches("\"namespace\":\"jail\"")
            .count(),
        5
    );

    // The library alone (hello switching itself) replaces the wrapped instance.
    let mut direct = Hello::start(in_chroot(&[
        "/hello",
        "--namespace",
        "jail",
        "--range",
        "41400-41499",
    ]));
    let served = ns.enter(|| get(addr("[::1]:8080"), "/")).expect("served");
    assert_eq!(pid_of(&served.1), direct.pid, "{served:?}");
    wrapped.expect_clean_exit("the wrapped instance in the chroot");
    assert!(
        direct.terminate().expect("exits").success(),
        "{:?}",
        direct.log
    );

    let cleanup = in_chroot(&["/switcheroo", "cleanup", "-n", "jail"])
        .output()
        .unwrap();
    assert!(cleanup.status.success(), "{}", text(&cleanup));
    assert!(ns.rule_lines().is_empty());
}

fn list_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            list_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn a_server_that_only_takes_a_port_binds_it_itself() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let site = |version: &str| {
        let dir = TempPath::new(&ns, &format!("site-{version}"));
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(dir.0.join("index.html"), version).unwrap();
        dir
    };
    let (one, two) = (site("one"), site("two"));
    // python's http.server has no socket activation: it binds the {port} it is given.
    let serve = |dir: &TempPath| {
        run(
            &ns,
            &[
                "-n",
                "static",
                "-p",
                "8080",
                "--range",
                "41500-41599",
                "--ready",
                "http:/",
                "--",
                "python3",
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "--directory",
                dir.as_str(),
                "{port}",
            ],
        )
    };
    let body = || {
        ns.enter(|| get(addr("127.0.0.1:8080"), "/"))
            .expect("served")
            .1
    };
    let mut first = serve(&one);
    assert_eq!(body(), "one");
    assert!(
        first.log.iter().all(|l| !l.contains("LISTEN_FDS")),
        "{:?}",
        first.log
    );
    let second = serve(&two);
    assert_eq!(body(), "two");
    assert_ne!(first.port, second.port);
    // The old wrapper drained the queue it read from /proc/net/tcp, then forwarded
    // SIGTERM, which ends http.server by the signal: 128 + 15.
    let status = first.wait_exit(Duration::from_secs(15)).expect("exits");
    assert_eq!(status.code(), Some(143), "{:?}", first.log);
    assert!(
        first.log.iter().any(|l| l.contains("drained in")),
        "{:?}",
        first.log
    );
}

/// `hello` under `switcheroo run` in namespace `web` on port 8080, with `extra` options.
fn run_hello(ns: &Netns, extra: &[&str]) -> Hello {
    let hello = lab::example("hello");
    let hello = hello.to_str().unwrap();
    let mut args = vec!["-n", "web", "-p", "8080", "--range", "41400-41499"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", hello]);
    run(ns, &args)
}

#[test]
fn run_with_probation_hands_back_when_the_new_wrapper_is_killed() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut old = run_hello(&ns, &[]);
    let old_server = server_pid(&mut old);
    let loads = ns.enter(lab::load::timeline_on_both_loopbacks);
    std::thread::sleep(Duration::from_millis(300));
    let new = run_hello(&ns, &["--probation", "60s", "--ready", "http:/"]);
    old.line("[");
    let demoted = format!("pid {} now takes new connections before", new.pid);
    old.line_containing(&demoted);
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    old.line_containing("takes every new connection again");
    let restored = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let samples = lab::load::stop_all(loads);
    let during = samples
        .iter()
        .filter(|s| s.result.is_err() && s.done >= killed)
        .count();
    let after: Vec<_> = samples.iter().filter(|s| s.at > restored).collect();
    eprintln!(
        "{} requests; {during} failed during the crash ({:?} from SIGKILL to the old wrapper's report); {} after it",
        samples.len(),
        restored - killed,
        after.len()
    );
    assert!(after.len() > 100);
    for s in &after {
        assert_eq!(s.result, Ok(old_server), "after the rollback: {s:?}");
    }
    assert!(samples.iter().all(|s| s.result.is_ok() || s.done >= killed));
    let out = switcheroo(&ns, &["status", "--json", "-n", "web"]);
    let json = String::from_utf8_lossy(&out.stdout);
    // One instance, active in its four rules.
    assert_eq!(
        json.matches("\"alive\":true,\"role\":\"active\"").count(),
        4,
        "{json}"
    );
    assert_eq!(
        json.matches(&format!("\"pid\":{}", old.pid)).count(),
        6,
        "{json}"
    );
}

/// A server on fd 3 (socket activation) whose /healthz answers 200 until the file named
/// by its first argument exists, then 500 (a count of answers would race with readiness
/// probes that gave up on a slow start).
const FAILING_HEALTH: &str = r#"
import http.server, os, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if self.path == "/healthz" and os.path.exists(sys.argv[1]) else 200
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

#[test]
fn failed_health_checks_during_the_probation_roll_back_and_run_exits_4() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let marker = TempPath::new(&ns, "unhealthy");
    let mut old = run_hello(&ns, &[]);
    let old_server = server_pid(&mut old);
    let mut new = run(
        &ns,
        &[
            "-n",
            "web",
            "-p",
            "8080",
            "--range",
            "41400-41499",
            "--probation",
            "60s",
            "--ready",
            "http:/healthz",
            "--",
            "python3",
            "-c",
            FAILING_HEALTH,
            marker.as_str(),
        ],
    );
    // Once the new server answers on the public port, its health fails.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ns
        .enter(|| get(addr("127.0.0.1:8080"), "/"))
        .map_or(true, |(_, body)| pid_of(&body) == old_server)
    {
        assert!(Instant::now() < deadline, "{:?}", new.log);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&marker.0, "").unwrap();
    let status = new.wait_exit(Duration::from_secs(20)).expect("rolled back");
    assert_eq!(status.code(), Some(4), "{:?}", new.log);
    let log = new.log.join("\n");
    assert!(log.contains("3 health checks in a row failed"), "{log}");
    assert!(
        log.contains("was rolled back") && log.contains(&format!("pid {} serves now", old.pid)),
        "{log}"
    );
    let (status, body) = ns.enter(|| get(addr("127.0.0.1:8080"), "/")).unwrap();
    assert_eq!((status, pid_of(&body)), (200, old_server));
    assert!(
        old.wait_exit(Duration::from_millis(100)).is_none(),
        "the old one serves on"
    );
}

#[test]
fn rollback_canary_and_promote_through_the_command() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut old = run_hello(&ns, &[]);
    let old_server = server_pid(&mut old);
    let mut new = run_hello(&ns, &["--probation", "60s"]);
    // Rolled back by hand: the new run exits 4 and says who serves.
    let out = switcheroo(&ns, &["rollback", "-n", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "rolled back from pid {} to pid {}",
            new.pid, old.pid
        )),
        "{}",
        text(&out)
    );
    let status = new.wait_exit(Duration::from_secs(15)).expect("exits");
    assert_eq!(status.code(), Some(4), "{:?}", new.log);
    assert!(
        new.log
            .iter()
            .any(|l| l.contains("was rolled back")
                && l.contains(&format!("pid {} serves now", old.pid))),
        "{:?}",
        new.log
    );
    // Nothing more to roll back to: exit 1, the ruleset unchanged.
    let before = ns.rule_lines();
    let out = switcheroo(&ns, &["rollback", "-n", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("nothing to roll back to"),
        "{}",
        text(&out)
    );
    assert_eq!(ns.rule_lines(), before);
    let (_, body) = ns.enter(|| get(addr("127.0.0.1:8080"), "/")).unwrap();
    assert_eq!(pid_of(&body), old_server);

    // A 25% canary: status shows its role and weight; promote makes it the active, and
    // without a probation of its own the old one retires at once.
    let mut canary = run_hello(&ns, &["--canary", "25"]);
    let out = switcheroo(&ns, &["status", "--json", "-n", "web"]);
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        json.matches("\"role\":\"canary\",\"weight\":25").count(),
        4,
        "{json}"
    );
    let table =
        String::from_utf8_lossy(&switcheroo(&ns, &["status", "--rules"]).stdout).into_owned();
    assert!(table.contains("canary 25%"), "{table}");
    let out = switcheroo(&ns, &["promote", "-n", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("pid {} is the active now", canary.pid)),
        "{}",
        text(&out)
    );
    old.expect_clean_exit("the previous active after the promotion");
    let canary_server = server_pid(&mut canary);
    let (_, body) = ns.enter(|| get(addr("127.0.0.1:8080"), "/")).unwrap();
    assert_eq!(pid_of(&body), canary_server);
    let out = switcheroo(&ns, &["promote", "-n", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no live canary"), "{}", text(&out));
}

/// A third-party UDP server: Python's socket module on the datagram socket passed as fd 3
/// (a DNS server in miniature: one answer per datagram, with its pid and the version it
/// was given), plus a TCP listener as fd 4 to show the order and the names. It sends
/// READY=1 itself, and on SIGTERM answers what is queued and exits 0.
const PY_UDP_SERVER: &str = r#"
import os, signal, socket, sys
assert os.environ["LISTEN_PID"] == str(os.getpid())
assert os.environ["LISTEN_FDS"] == "2", os.environ["LISTEN_FDS"]
assert os.environ["LISTEN_FDNAMES"] == "dns:zone", os.environ["LISTEN_FDNAMES"]
udp = socket.socket(fileno=3)
tcp = socket.socket(fileno=4)
assert udp.type == socket.SOCK_DGRAM and tcp.type == socket.SOCK_STREAM
prefix = ("%s pid=%d " % (sys.argv[1], os.getpid())).encode()
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
n = os.environ["NOTIFY_SOCKET"]
note = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
note.sendto(b"READY=1", "\0" + n[1:] if n.startswith("@") else n)
udp.settimeout(0.05)
while not stop:
    try:
        data, peer = udp.recvfrom(2048)
    except (socket.timeout, InterruptedError):
        continue
    udp.sendto(prefix + data, peer)
udp.setblocking(False)
while True:
    try:
        data, peer = udp.recvfrom(2048)
    except BlockingIOError:
        break
    udp.sendto(prefix + data, peer)
"#;

#[test]
fn a_python_udp_server_under_run_is_redeployed_under_load_without_a_lost_reply() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let script = TempPath::new(&ns, "udp-server.py");
    std::fs::write(&script.0, PY_UDP_SERVER).unwrap();
    const DEPLOYS: usize = 8;
    let start = |v: usize| {
        let tag = format!("v{v}");
        run(
            &ns,
            &[
                "-n",
                "dns",
                "-p",
                "dns=5353/udp",
                "-p",
                "zone=5353/tcp",
                "--range",
                "41600-41699",
                "--drain-max",
                "1s",
                "--",
                "python3",
                script.as_str(),
                &tag,
            ],
        )
    };
    let mut current = start(0);
    let rules = ns.save(false);
    assert!(
        rules.contains("-A PREROUTING -p udp -m udp --dport 5353 -m addrtype --dst-type LOCAL")
            && rules
                .contains("-A PREROUTING -p tcp -m tcp --dport 5353 -m addrtype --dst-type LOCAL"),
        "{rules}"
    );
    let out = switcheroo(&ns, &["status", "--rules", "-n", "dns"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        table.lines().filter(|l| l.contains(" udp ")).count(),
        4,
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.contains(" tcp ")).count(),
        4,
        "{table}"
    );

    let (flows, fresh, old) = ns.enter(|| {
        let load = UdpLoad::start(5353);
        let mut old = Vec::new();
        for v in 1..=DEPLOYS {
            std::thread::sleep(Duration::from_millis(400));
            old.push(std::mem::replace(&mut current, start(v)));
        }
        // The last replaced run forgets its flows after --drain-max and exits; the flows
        // then move on to the current server.
        old.last_mut().unwrap().wait_exit(Duration::from_secs(15));
        std::thread::sleep(Duration::from_millis(500));
        let (flows, fresh) = load.stop();
        (flows, fresh, old)
    });
    let mut forgotten = 0;
    for mut h in old {
        h.expect_clean_exit("an old switcheroo run");
        forgotten += h
            .log
            .iter()
            .filter_map(|l| {
                l.split("forgot ")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum::<usize>();
    }
    let (mut datagrams, mut resent) = (0, 0);
    for (id, log) in flows.iter().chain(&fresh).enumerate() {
        assert!(
            log.lost.is_empty(),
            "client {id}: never answered: {:?}",
            log.lost
        );
        datagrams += log.answers.len();
        resent += log.resent;
    }
    // (A client on new flows may see an older version after a newer one: its new socket
    // can get the source port of an earlier one, and that 4-tuple is still the earlier
    // flow, kept by conntrack where it started.)
    for (id, flow) in flows.iter().enumerate() {
        for pair in flow.answers.windows(2) {
            assert!(
                pair[1].1 >= pair[0].1,
                "flow {id}: v{} after v{}",
                pair[1].1,
                pair[0].1
            );
        }
        assert_eq!(
            flow.answers.last().map(|a| a.1),
            Some(DEPLOYS),
            "flow {id} does not end on the current server"
        );
    }
    eprintln!(
        "python UDP server under run: {DEPLOYS} deploys, {datagrams} datagrams (4 long-lived flows, 2 clients on new flows), every one answered; {resent} sent again after 100 ms without an answer; old wrappers forgot {forgotten} flows"
    );
}

#[test]
fn a_rust_server_takes_a_tcp_and_a_udp_socket_from_run_by_name() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let echo = lab::example("echo");
    let mut h = run(
        &ns,
        &[
            "-n",
            "both",
            "-p",
            "web=8080",
            "-p",
            "dns=5353/udp",
            "--range",
            "41800-41899",
            "--",
            echo.to_str().unwrap(),
            "--tag",
            "v7",
        ],
    );
    let (tcp, udp) = ns.enter(|| {
        let mut tcp = String::new();
        std::net::TcpStream::connect("127.0.0.1:8080")
            .and_then(|mut s| std::io::Read::read_to_string(&mut s, &mut tcp))
            .expect("tcp");
        let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
        socket.connect("[::1]:5353").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket.send(b"q").unwrap();
        let mut buf = [0u8; 128];
        let n = socket.recv(&mut buf).expect("udp answer");
        (tcp, String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    // echo names each socket by its LISTEN_FDNAMES entry.
    assert!(
        tcp.starts_with("v7 pid=") && tcp.trim_end().ends_with(" port=web"),
        "{tcp}"
    );
    assert!(udp.starts_with("v7 pid=") && udp.ends_with(" q"), "{udp}");
    let _ = h.terminate();
}
