//! Third-party servers under `switcheroo run`, each with the shutdown recipe of the
//! README's "Servers in other languages", deployed 8 times under keep-alive load (and new
//! connections), on IPv4 and IPv6: no request may fail. The apps are in `tests/servers/`.

use lab::command::{have, run};
use lab::{require_root, Netns};
use std::process::Command;
use std::time::Duration;

const DEPLOYS: usize = 8;

fn dir() -> String {
    format!("{}/tests/servers", env!("CARGO_MANIFEST_DIR"))
}

/// Deploys `server` with run's `options` 8 times under load; 0 failed requests.
fn deployed_under_keepalive_load(name: &str, options: &[&str], server: &[&str]) {
    let ns = Netns::new();
    let mut args = vec![
        "-n",
        "web",
        "-p",
        "8080",
        "--range",
        "41700-41799",
        "--ready",
        "http:/",
    ];
    args.extend_from_slice(options);
    args.push("--");
    args.extend_from_slice(server);
    let mut current = run(&ns, &args);
    let (stats, old) = ns.enter(|| {
        let loads: Vec<lab::load::Load> = ["127.0.0.1:8080", "[::1]:8080"]
            .iter()
            .map(|t| {
                let mut plan = lab::load::Plan::new(t.parse().unwrap());
                plan.close_clients = 1;
                plan.keepalive_clients = 2;
                lab::load::Load::start(&plan)
            })
            .collect();
        let mut old = Vec::new();
        for _ in 0..DEPLOYS {
            std::thread::sleep(Duration::from_millis(500));
            old.push(std::mem::replace(&mut current, run(&ns, &args)));
        }
        std::thread::sleep(Duration::from_millis(500));
        let stats: Vec<_> = loads.into_iter().map(lab::load::Load::stop).collect();
        (stats, old)
    });
    let totals = lab::load::Totals::of(&stats);
    eprintln!(
        "{name}: {DEPLOYS} deploys under keep-alive load: {} requests answered, {} failed",
        totals.ok, totals.failed
    );
    assert_eq!(totals.failed, 0, "{name}: {:?}", totals.samples);
    assert!(totals.ok > 500, "the load ran: {}", totals.ok);
    assert!(
        totals.answered.len() > DEPLOYS / 2,
        "{name}: few servers answered: {:?}",
        totals.answered
    );
    // run passes on the server's status: 0, or 143 for a server that ends its graceful
    // shutdown by re-raising SIGTERM (uvicorn 0.29+ does).
    for mut h in old {
        let status = h.wait_exit(Duration::from_secs(20));
        let code = status.and_then(|s| s.code());
        assert!(
            matches!(code, Some(0 | 143)),
            "an old {name} under run ended with {status:?}: {:?}",
            h.log
        );
    }
}

#[test]
fn node_http_on_fd_3() {
    if !require_root() || !have("node", &["-e", "0"], "node") {
        return;
    }
    let script = format!("{}/server.js", dir());
    deployed_under_keepalive_load("node", &[], &["node", &script]);
}

#[test]
fn uvicorn_on_fd_3() {
    if !require_root() || !have("python3", &["-c", "import uvicorn"], "uvicorn") {
        return;
    }
    deployed_under_keepalive_load(
        "uvicorn",
        &["--notify-replaced", "USR1"],
        &[
            "python3",
            "-m",
            "uvicorn",
            "--app-dir",
            &dir(),
            "--fd",
            "3",
            "--no-access-log",
            "app:asgi",
        ],
    );
}

#[test]
fn gunicorn_gthread_with_keep_alive() {
    if !require_root() || !have("python3", &["-c", "import gunicorn"], "gunicorn") {
        return;
    }
    let config = format!("{}/gunicorn.conf.py", dir());
    deployed_under_keepalive_load(
        "gunicorn gthread",
        &["--notify-replaced", "USR1"],
        &[
            "python3",
            "-m",
            "gunicorn",
            "--config",
            &config,
            "--chdir",
            &dir(),
            "--worker-class",
            "gthread",
            "--workers",
            "2",
            "--threads",
            "4",
            "--keep-alive",
            "5",
            "--graceful-timeout",
            "10",
            "app:app",
        ],
    );
}

#[test]
fn go_net_http_on_fd_3() {
    if !require_root() || !have("go", &["version"], "go (golang-go)") {
        return;
    }
    // Built into a directory of the test's own, caches included.
    let build = std::env::temp_dir().join(format!("switcheroo-go-{}", std::process::id()));
    std::fs::create_dir_all(&build).unwrap();
    let binary = build.join("server");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(format!("{}/server.go", dir()))
        .env("GOCACHE", build.join("cache"))
        .env("GOPATH", build.join("path"))
        .env("GOFLAGS", "-modcacherw")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    deployed_under_keepalive_load(
        "go net/http",
        &["--notify-replaced", "USR1"],
        &[binary.to_str().unwrap()],
    );
    let _ = std::fs::remove_dir_all(&build);
}
