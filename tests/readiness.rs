//! `switcheroo run` before its switch: whatever the `--ready` mode, the server's exit and
//! a stop signal end the wait at once with the true reason (exit 3), a timeout quotes the
//! last probe, a TLS-only server is probed over TLS, and a server that never speaks
//! sd_notify gets a hint.

use lab::command::{run, run_started, run_to_end, server_pid};
use lab::{require_root, Netns, TempPath};
use std::time::{Duration, Instant};

/// Far longer than any of these tests may take: if run waited for it, the test would say.
const TIMEOUT: &str = "120s";
const MODES: [&str; 4] = ["notify", "http:/", "https:/", "delay:100s"];

#[test]
fn a_server_that_exits_before_it_is_ready_ends_the_wait_at_once_in_every_mode() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let before = ns.rule_lines();
    for ready in MODES {
        let started = Instant::now();
        let (status, out) = run_to_end(
            &ns,
            &[
                "-p",
                "8097",
                "--ready",
                ready,
                "--ready-timeout",
                TIMEOUT,
                "--",
                "true",
            ],
        );
        let took = started.elapsed();
        eprintln!(
            "--ready {ready}: run ended {took:?} after it started a server that exits at once"
        );
        assert_eq!(status.code(), Some(3), "--ready {ready}: {out}");
        assert!(
            out.contains("true exited with status 0 before it was ready; nothing was switched"),
            "--ready {ready}: {out}"
        );
        assert!(
            took < Duration::from_secs(60),
            "--ready {ready} waited for its timeout: {took:?}"
        );
        assert_eq!(ns.rule_lines(), before);
    }
}

#[test]
fn a_stop_signal_before_the_switch_ends_the_wait_at_once_in_every_mode() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    for ready in MODES {
        // `sleep` holds the listening socket and never answers: an HTTP probe's connection
        // is accepted by the kernel and then waits.
        let mut h = run_started(
            &ns,
            &[
                "-p",
                "8097",
                "--ready",
                ready,
                "--ready-timeout",
                TIMEOUT,
                "--",
                "sleep",
                "600",
            ],
        );
        let server = server_pid(&mut h);
        std::thread::sleep(Duration::from_millis(1500));
        let signalled = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(h.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = h.wait_exit(Duration::from_secs(60)).expect("run exits");
        let took = signalled.elapsed();
        eprintln!("--ready {ready}: run ended {took:?} after SIGTERM");
        assert_eq!(status.code(), Some(3), "--ready {ready}: {:?}", h.log);
        let log = h.log.join("\n");
        assert!(
            log.contains(
                "told to stop (SIGTERM) before the switch; sleep was stopped, nothing was switched"
            ),
            "--ready {ready}: {log}"
        );
        assert!(
            !ns.pids().contains(&(server as i32)),
            "the server was left running"
        );
        assert!(ns.rule_lines().is_empty());
    }
}

/// A server on fd 3 that answers every GET with `status`, over TLS when given a
/// certificate and key.
const SERVER: &str = r#"
import http.server, os, socket, ssl, sys
status = int(sys.argv[1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = "pid {} says {}".format(os.getpid(), status).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("::", 0), H, bind_and_activate=False)
server.socket = socket.socket(fileno=3)
if len(sys.argv) > 3:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

#[test]
fn the_timeout_quotes_the_last_probe() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let script = TempPath::new(&ns, "server.py");
    std::fs::write(&script.0, SERVER).unwrap();
    let (status, out) = run_to_end(
        &ns,
        &[
            "-p",
            "8097",
            "--ready",
            "http:/healthz",
            "--ready-timeout",
            "5s",
            "--",
            "python3",
            script.as_str(),
            "400",
        ],
    );
    assert_eq!(status.code(), Some(3), "{out}");
    assert!(
        out.contains(
            "was not ready after 5s; the last probe: GET /healthz answered 400 Bad Request"
        ),
        "{out}"
    );
}

#[test]
fn a_tls_only_server_is_ready_over_https() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let script = TempPath::new(&ns, "server.py");
    std::fs::write(&script.0, SERVER).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (crt, key) = (
        TempPath::new(&ns, "cert.pem"),
        TempPath::new(&ns, "key.pem"),
    );
    std::fs::write(&crt.0, cert.cert.pem()).unwrap();
    std::fs::write(&key.0, cert.signing_key.serialize_pem()).unwrap();
    let server = [
        "python3",
        script.as_str(),
        "200",
        crt.as_str(),
        key.as_str(),
    ];
    // Probed over plain HTTP, it never looks ready, and the timeout says what the probe met.
    let (status, out) = run_to_end(
        &ns,
        &[
            &[
                "-p",
                "8097",
                "--ready",
                "http:/",
                "--ready-timeout",
                "2s",
                "--",
            ][..],
            &server,
        ]
        .concat(),
    );
    assert_eq!(status.code(), Some(3), "{out}");
    assert!(out.contains("the last probe: GET /"), "{out}");
    // Over TLS, it is ready and switches.
    let mut h = run(
        &ns,
        &[&["-p", "8097", "--ready", "https:/", "--"][..], &server].concat(),
    );
    let rules = ns.rule_lines();
    assert_eq!(rules.len(), 4, "{rules:?}");
    assert!(rules
        .iter()
        .all(|l| l.contains(&format!("--to-ports {}", h.port))));
    assert!(h.terminate().expect("exits").code().is_some());
}

#[test]
fn a_server_that_never_notifies_gets_a_hint_after_five_seconds() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let (status, out) = run_to_end(
        &ns,
        &["-p", "8097", "--ready-timeout", "7s", "--", "sleep", "60"],
    );
    assert_eq!(status.code(), Some(3), "{out}");
    assert!(
        out.contains("sleep has not sent READY=1 to NOTIFY_SOCKET after 5s; if it does not speak sd_notify, use --ready http:/PATH, https:/PATH or delay:DURATION"),
        "{out}"
    );
    assert!(out.contains("was not ready after 7s"), "{out}");
}
