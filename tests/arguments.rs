//! `switcheroo run`'s arguments as users get them wrong: every mistake is exit 2 before
//! anything starts, with a message that says what to write; and `--stop-signal` is what
//! the server gets after the drain.

use lab::command::{run, run_to_end, switcheroo, text};
use lab::{require_root, Netns, TempPath};
use std::time::Duration;

#[test]
fn bad_input_is_exit_2_before_anything_starts_and_says_what_to_write() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let marker = TempPath::new(&ns, "started");
    // A server that would leave a mark if it ever ran.
    let touch = format!("touch {}", marker.as_str());
    let cases: [(&[&str], &str); 8] = [
        (
            &["-p", "8099", "--stop-signl", "QUIT", "--"],
            "unexpected argument '--stop-signl'",
        ),
        (
            &["-n", "web/v2", "-p", "8099", "--"],
            "\"web/v2\" is not a namespace",
        ),
        (
            &["-p", "8099", "--ready", "http://localhost/", "--"],
            "give only the path (http:/PATH, e.g. http:/healthz)",
        ),
        (
            &["-p", "8099", "--stop-signal", "NOPE", "--"],
            "\"NOPE\" is not a signal name",
        ),
        (
            &["-p", "8099", "--drain-idle", "soon", "--"],
            "invalid duration \"soon\"",
        ),
        (
            &["-p", "0", "--"],
            "the port must be a number from 1 to 65535",
        ),
        (
            &["-p", "8099", "--range", "8000-9000", "--"],
            "public port 8099 lies inside the internal port range",
        ),
        (
            &["-p", "53/udp", "--ready", "http:/", "--"],
            "probes a TCP port, and every --port is UDP",
        ),
    ];
    for (options, message) in cases {
        let args = [options, &["sh", "-c", &touch]].concat();
        let (status, out) = run_to_end(&ns, &args);
        assert_eq!(status.code(), Some(2), "{args:?}: {out}");
        assert!(out.contains(message), "{args:?}: {out}");
        assert!(!marker.0.exists(), "{args:?} started the server");
        assert!(ns.rule_lines().is_empty());
    }
    // Options after the command are the server's; the message says how to write it.
    let (status, out) = run_to_end(&ns, &["sh", "-c", &touch, "-p", "8091"]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("--port is missing"), "{out}");
    assert!(
        out.contains(
            "options of run go first, then --, then the command: switcheroo run -p 8091 -- sh"
        ),
        "{out}"
    );
    assert!(!marker.0.exists());
    // The same mistakes in other subcommands.
    let out = switcheroo(&ns, &["cleanup", "-n", "no:colons"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = switcheroo(&ns, &["status", "--bogus"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// A server on fd 3 that says which signal ended it: 0 for SIGQUIT, 1 for anything else.
const SIGNALLED: &str = r#"
import http.server, os, signal, socket, sys
def stop(signum, frame):
    print("server got", signal.Signals(signum).name, flush=True)
    os._exit(0 if signum == signal.SIGQUIT else 1)
for s in (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT):
    signal.signal(s, stop)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("::", 0), H, bind_and_activate=False)
server.socket = socket.socket(fileno=3)
server.serve_forever()
"#;

#[test]
fn the_stop_signal_is_what_the_server_gets_after_the_drain() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let script = TempPath::new(&ns, "server.py");
    std::fs::write(&script.0, SIGNALLED).unwrap();
    let args = [
        "-n",
        "web",
        "-p",
        "8099",
        "--ready",
        "http:/",
        "--stop-signal",
        "QUIT",
        "--",
        "python3",
        script.as_str(),
    ];
    let mut old = run(&ns, &args);
    let mut new = run(&ns, &args);
    let status = old.wait_exit(Duration::from_secs(15)).expect("replaced");
    assert_eq!(status.code(), Some(0), "{:?}", old.log);
    old.line_containing("server got SIGQUIT");
    old.line_containing("then stopping python3 with SIGQUIT");
    // An operator's stop goes the same way.
    let status = new.terminate().expect("stopped");
    assert_eq!(status.code(), Some(0), "{:?}", new.log);
    new.line_containing("server got SIGQUIT");
}
