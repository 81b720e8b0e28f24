//! Third-party servers under `switcheroo run`, each with the shutdown recipe of the
//! README's "Servers in other languages", deployed 8 times under keep-alive load (and new
//! connections), on IPv4 and IPv6: no request may fail. The apps are in `tests/servers/`.

use lab::command::{have, run};
use lab::load::Totals;
use lab::{require_root, Netns};
use std::process::Command;
use std::time::Duration;

const DEPLOYS: usize = 8;

fn dir() -> String {
    format!("{}/tests/servers", env!("CARGO_MANIFEST_DIR"))
}

/// Deploys `server` with run's `options` 8 times under load; 0 failed requests.
fn deployed_under_keepalive_load(name: &str, options: &[&str], server: &[&str]) {
    let totals = deploy_under_keepalive_load(name, options, server);
    assert_eq!(totals.failed, 0, "{name}: {:?}", totals.samples);
}

/// Deploys `server` with run's `options` 8 times under load (2 keep-alive clients and one
/// with a new connection per request, on 127.0.0.1 and ::1); what the clients saw. Every
/// replaced instance must have exited 0 (or 143, see below).
fn deploy_under_keepalive_load(name: &str, options: &[&str], server: &[&str]) -> Totals {
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
        "{name}: {DEPLOYS} deploys under keep-alive load: {} requests answered, {} failed ({} on a reused keep-alive connection)",
        totals.ok, totals.failed, totals.failed_reused
    );
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
    totals
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
    // Stock: srv.Shutdown on SIGTERM closes idle keep-alive connections at once, and a
    // request sent at that moment fails (Go's idle-close race): counted, not asserted.
    let stock = deploy_under_keepalive_load("go net/http, stock", &[], &[binary.to_str().unwrap()]);
    no_connection_refused_or_cut(&stock, "go net/http, stock");
    // The recipe: told as soon as it is replaced, it says `Connection: close` first.
    deployed_under_keepalive_load(
        "go net/http",
        &["--notify-replaced", "USR1"],
        &[binary.to_str().unwrap()],
    );
    let _ = std::fs::remove_dir_all(&build);
}

/// A directory of the test's own for a server's state, removed afterwards.
fn state_dir(what: &str) -> lab::TempPath {
    let dir = lab::TempPath(
        std::env::temp_dir().join(format!("switcheroo-{what}-{}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0).unwrap();
    dir
}

#[test]
fn nginx_from_a_template_stopped_with_quit() {
    if !require_root() || !have("nginx", &["-v"], "nginx") {
        return;
    }
    let state = state_dir("nginx");
    // The config from a template: the internal port ({port}, so nginx binds it itself)
    // and a directory per instance (pid file, temp paths).
    let script = format!(
        "d={state}/{{port}}; mkdir -p $d && sed -e s/@PORT@/{{port}}/ -e s,@DIR@,$d, {dir}/nginx.conf.in > $d/nginx.conf && exec nginx -c $d/nginx.conf -p $d",
        state = state.as_str(),
        dir = dir()
    );
    let totals =
        deploy_under_keepalive_load("nginx", &["--stop-signal", "QUIT"], &["sh", "-c", &script]);
    no_connection_refused_or_cut(&totals, "nginx");
}

/// What switcheroo answers for with a stock server that has no way to say
/// `Connection: close` before it stops: no new connection fails, ever. A request on a
/// keep-alive connection that the server closes as the request goes out (its graceful
/// stop closes idle connections at once) is the server's race; it is counted, not
/// asserted.
fn no_connection_refused_or_cut(totals: &Totals, name: &str) {
    assert_eq!(
        totals.failed - totals.failed_reused,
        0,
        "{name}: a new connection failed: {:?}",
        totals.samples
    );
}

#[test]
fn caddy_with_its_port_from_the_environment() {
    if !require_root() || !have("caddy", &["version"], "caddy") {
        return;
    }
    let state = state_dir("caddy");
    // Caddy takes {$PORT} in its Caddyfile; PID only lets the tests' clients tell
    // instances apart.
    let script = format!(
        "export PID=$$ PORT={{port}} XDG_DATA_HOME={state}/data XDG_CONFIG_HOME={state}/config; exec caddy run --config {dir}/Caddyfile --adapter caddyfile",
        state = state.as_str(),
        dir = dir()
    );
    let totals = deploy_under_keepalive_load("caddy", &[], &["sh", "-c", &script]);
    no_connection_refused_or_cut(&totals, "caddy");
}

#[test]
fn puma_on_the_passed_socket_bound_by_its_address() {
    if !require_root() || !have("puma", &["--version"], "puma") {
        return;
    }
    // puma takes a socket passed by socket activation only for a bind of exactly its
    // address: the dual-stack [::] and the internal port.
    let script = format!(
        "exec puma --bind tcp://[::]:$SWITCHEROO_PORT {}/config.ru",
        dir()
    );
    let totals = deploy_under_keepalive_load(
        "puma",
        &["--notify-replaced", "WINCH"],
        &["sh", "-c", &script],
    );
    assert_eq!(totals.failed, 0, "puma: {:?}", totals.samples);
}

/// One HTTP/2 client's counts (tests/servers/h2client.py).
#[derive(Debug)]
struct H2Counts {
    ok: u64,
    failed: u64,
    /// Unprocessed streams (above the GOAWAY's last stream) the client sent again.
    retried: u64,
    goaways: u64,
    cuts: u64,
}

/// Deploys `server` (TLS, HTTP/2) 3 times while one client keeps 4 streams in flight on
/// one connection and reconnects; what the client saw.
fn http2_across_deploys(name: &str, options: &[&str], server: &[&str]) -> H2Counts {
    const H2_DEPLOYS: usize = 3;
    let ns = Netns::new();
    let mut args = vec![
        "-n",
        "h2",
        "-p",
        "8443",
        "--range",
        "41800-41899",
        "--ready",
        "https:/",
    ];
    args.extend_from_slice(options);
    args.push("--");
    args.extend_from_slice(server);
    let mut current = run(&ns, &args);
    let client = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3"])
        .arg(format!("{}/h2client.py", dir()))
        .args(["127.0.0.1", "8443", "6"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut old = Vec::new();
    for _ in 0..H2_DEPLOYS {
        std::thread::sleep(Duration::from_millis(900));
        old.push(std::mem::replace(&mut current, run(&ns, &args)));
    }
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name}: the HTTP/2 client failed: {text}"
    );
    let field = |key: &str| -> u64 {
        text.split_once(&format!("\"{key}\": "))
            .and_then(|(_, rest)| rest.split([',', '}']).next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {text:?}"))
    };
    let counts = H2Counts {
        ok: field("ok"),
        failed: field("failed"),
        retried: field("retried"),
        goaways: field("goaways"),
        cuts: field("cuts"),
    };
    eprintln!("{name} over HTTP/2, {H2_DEPLOYS} deploys under one multiplexed client: {counts:?}");
    assert!(counts.ok > 100, "{name}: the client ran: {counts:?}");
    for mut h in old {
        assert!(
            h.wait_exit(Duration::from_secs(20)).is_some(),
            "{name}: an old instance still runs"
        );
    }
    counts
}

/// A self-signed certificate and key for `localhost`, written into `dir`.
fn certificate(dir: &std::path::Path) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
}

#[test]
fn http2_across_deploys_nginx_and_caddy_send_goaway() {
    if !require_root()
        || !have("nginx", &["-v"], "nginx")
        || !have("caddy", &["version"], "caddy")
        || !have("python3", &["-c", "import h2"], "python3 h2")
    {
        return;
    }
    let state = state_dir("h2");
    certificate(&state.0);
    let nginx = format!(
        "d={state}/{{port}}; mkdir -p $d && cp {state}/cert.pem {state}/key.pem $d/ && sed -e s/@PORT@/{{port}}/ -e s,@DIR@,$d, {dir}/nginx-h2.conf.in > $d/nginx.conf && exec nginx -c $d/nginx.conf -p $d",
        state = state.as_str(),
        dir = dir()
    );
    let n = http2_across_deploys("nginx", &["--stop-signal", "QUIT"], &["sh", "-c", &nginx]);
    let caddy = format!(
        "export PID=$$ PORT={{port}} CERT={state}/cert.pem KEY={state}/key.pem XDG_DATA_HOME={state}/data XDG_CONFIG_HOME={state}/config; exec caddy run --config {dir}/Caddyfile.h2 --adapter caddyfile",
        state = state.as_str(),
        dir = dir()
    );
    let c = http2_across_deploys("caddy", &[], &["sh", "-c", &caddy]);
    for (name, counts) in [("nginx", n), ("caddy", c)] {
        assert_eq!(
            counts.cuts, 0,
            "{name} cut a connection without GOAWAY: {counts:?}"
        );
        assert_eq!(counts.failed, 0, "{name}: {counts:?}");
        assert!(counts.goaways >= 1, "{name} sent no GOAWAY: {counts:?}");
        eprintln!(
            "{name}: {} streams sent again after a GOAWAY",
            counts.retried
        );
    }
}
