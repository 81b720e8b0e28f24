//! The container recipes of the README under a real dockerd (`lab::docker`: confined to a
//! network namespace of the test), with images built by `contrib/docker/context` and
//! `contrib/docker/Dockerfile` (the switcheroo command, `hello` as the server, their
//! libraries; no shell): releases joining a holder container that publishes 8080, releases
//! on the host network beside Docker's own rules, and a probation across containers.
//! Load comes from a client namespace through Docker's published port (or the host
//! network's address).

use lab::docker::Dockerd;
use lab::load::{Load, Plan, Totals};
use lab::{example, get, pid_of, switcheroo_bin, Netns};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const JOIN: &[&str] = &[
    "--network",
    "container:web-net",
    "--pid",
    "container:web-net",
    "--cap-add",
    "NET_ADMIN",
    "--cap-add",
    "KILL",
];
const HOST: &[&str] = &[
    "--network",
    "host",
    "--pid",
    "host",
    "--cap-add",
    "NET_ADMIN",
    "--cap-add",
    "KILL",
];

/// A daemon with the image `web:v1` built from the recipe (and tagged v2..v6: the same
/// bits, as a redeploy of one build would be).
fn daemon() -> Option<Dockerd> {
    if !lab::docker::available() {
        return None;
    }
    let d = Dockerd::start();
    eprintln!("dockerd answered in {:?}", d.started_in);
    let ctx = d.scratch("ctx");
    let out = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/docker/context"
    ))
    .arg(&ctx)
    .args(["--server", example("hello").to_str().unwrap()])
    .args(["--switcheroo", switcheroo_bin().to_str().unwrap()])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "contrib/docker/context: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Instant::now();
    d.ok(&["build", "-q", "-t", "web:v1", ctx.to_str().unwrap()]);
    for v in 2..=6 {
        d.ok(&["tag", "web:v1", &format!("web:v{v}")]);
    }
    let size: u64 = d
        .ok(&["image", "inspect", "-f", "{{.Size}}", "web:v1"])
        .parse()
        .unwrap();
    eprintln!(
        "image web:v1 built in {:?}: {:.1} MB (switcheroo stripped, hello as built by this test run)",
        t.elapsed(),
        size as f64 / 1e6
    );
    // The image holds no shell, no iptables, no nft.
    for missing in ["/bin/sh", "/usr/sbin/iptables", "/usr/sbin/nft"] {
        let out = d.docker(&["run", "--rm", "--entrypoint", missing, "web:v1"]);
        assert!(!out.status.success(), "{missing} exists in the image");
    }
    Some(d)
}

/// The pid that answers `addr` from `client`, if any.
fn answering(client: &Netns, addr: SocketAddr) -> Option<u32> {
    client
        .enter(|| get(addr, "/"))
        .ok()
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| pid_of(&body))
}

/// Waits until `addr` is answered by a pid other than `old` (None: by anyone); that pid,
/// and how long it took.
fn until_new(client: &Netns, addr: SocketAddr, old: Option<u32>) -> (u32, Duration) {
    let t = Instant::now();
    loop {
        if let Some(pid) = answering(client, addr).filter(|p| Some(*p) != old) {
            return (pid, t.elapsed());
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "nobody new answers {addr}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `docker wait NAME` in the background: the container's exit status once it stops.
fn waiter(d: &Dockerd, name: &str) -> std::thread::JoinHandle<String> {
    let host = d.host();
    let name = name.to_owned();
    std::thread::spawn(move || {
        let out = std::process::Command::new("/usr/bin/docker")
            .args(["wait", &name])
            .env("DOCKER_HOST", host)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// Keep-alive and new-connection load on `addr` from `client`.
fn load(client: &Netns, addr: SocketAddr) -> Load {
    let mut plan = Plan::new(addr);
    plan.close_clients = 2;
    plan.keepalive_clients = 2;
    plan.pause = Duration::from_millis(1);
    plan.timeline = true;
    client.enter(|| Load::start(&plan))
}

/// Five deploys of `web:v2`..`web:v6` with `flags`; each replaced container exits 0 by
/// itself and is gone. Returns the requests' totals.
fn five_deploys(d: &Dockerd, client: &Netns, addr: SocketAddr, flags: &[&str]) -> Totals {
    let run = |v: u32| {
        let name = format!("web-v{v}");
        let image = format!("web:v{v}");
        let args: Vec<&str> = [
            &["run", "-d", "--rm", "--name", &name][..],
            flags,
            &[&image],
        ]
        .concat();
        let t = Instant::now();
        d.ok(&args);
        (waiter(d, &name), t)
    };
    let (mut previous, _) = run(1);
    let (mut pid, _) = until_new(client, addr, None);
    let running = load(client, addr);
    for v in 2..=6 {
        std::thread::sleep(Duration::from_millis(300));
        let (next, started) = run(v);
        let (new_pid, _) = until_new(client, addr, Some(pid));
        let status = previous.join().unwrap();
        eprintln!(
            "web-v{v}: serving {:?} after docker run; web-v{} exited {status}",
            started.elapsed(),
            v - 1
        );
        assert_eq!(status, "0", "web-v{} exit status", v - 1);
        assert!(
            d.wait_gone(&format!("web-v{}", v - 1), Duration::from_secs(10)),
            "web-v{} is not gone",
            v - 1
        );
        (previous, pid) = (next, new_pid);
    }
    std::thread::sleep(Duration::from_millis(300));
    let totals = Totals::of(&[running.stop()]);
    drop(previous);
    totals
}

/// The holder container `web-net` (`switcheroo hold`, publishing 8080), and a client
/// namespace with the address that reaches the published port.
fn holder(d: &Dockerd) -> (Netns, SocketAddr) {
    let client = d.netns.peer();
    d.ok(&[
        "run",
        "-d",
        "--name",
        "web-net",
        "-p",
        "8080:8080",
        "web:v1",
        "hold",
    ]);
    (client, "192.0.2.1:8080".parse().unwrap())
}

#[test]
fn releases_joining_a_holder_deploy_through_the_published_port() {
    let Some(d) = daemon() else { return };
    let (client, addr) = holder(&d);
    let totals = five_deploys(&d, &client, addr, JOIN);
    eprintln!(
        "holder: 5 deploys, {} requests through the published port, {} failed",
        totals.ok, totals.failed
    );
    assert_eq!(totals.failed, 0, "{:?}", totals.samples);
    assert!(totals.ok > 500, "the load ran: {}", totals.ok);
    // The holder and the last release are all that is left.
    assert_eq!(d.names(), ["web-net", "web-v6"]);
    // The holder's `hold` stops on SIGTERM with status 0, ending the namespace.
    let t = Instant::now();
    d.ok(&["stop", "web-net"]);
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.ExitCode}}", "web-net"]),
        "0"
    );
    eprintln!("docker stop of the holder took {:?}", t.elapsed());
}

/// `iptables-nft-save` of both families in `ns`, without switcheroo's rules, the counters
/// and the comment lines (which hold the time).
fn docker_rules(ns: &Netns) -> String {
    let mut text = String::new();
    for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
        let all = ns.ok(&[tool]);
        for line in all.lines() {
            if line.starts_with('#') || line.contains("SWITCHEROO:") {
                continue;
            }
            let line = match line.rfind(" [") {
                Some(i) if line.starts_with(':') => &line[..i],
                _ => line,
            };
            // Tables switcheroo created (IPv6's nat, where Docker writes nothing) show as a
            // table with only its base chains: not Docker's rules.
            text.push_str(tool);
            text.push(' ');
            text.push_str(line);
            text.push('\n');
        }
    }
    // Keep only the tables that hold a rule.
    let mut kept = String::new();
    let mut table = Vec::new();
    for line in text.lines() {
        let body = line.split_once(' ').unwrap().1;
        if body.starts_with('*') {
            table.clear();
        }
        table.push(line);
        if body == "COMMIT" {
            if table
                .iter()
                .any(|l| l.split_once(' ').unwrap().1.starts_with("-A "))
            {
                for l in &table {
                    kept.push_str(l);
                    kept.push('\n');
                }
            }
            table.clear();
        }
    }
    kept
}

#[test]
fn releases_on_the_host_network_leave_dockers_rules_alone() {
    let Some(d) = daemon() else { return };
    let client = d.netns.peer();
    // Another container with a published port, so that Docker's nat and filter tables
    // hold its DNAT and forwarding rules.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "other",
        "-p",
        "9090:9090",
        "web:v1",
        "hold",
    ]);
    let before = docker_rules(&d.netns);
    assert!(before.contains("DNAT"), "{before}");
    let addr: SocketAddr = "192.0.2.1:8080".parse().unwrap();
    let totals = five_deploys(&d, &client, addr, HOST);
    eprintln!(
        "host network: 5 deploys, {} requests, {} failed",
        totals.ok, totals.failed
    );
    assert_eq!(totals.failed, 0, "{:?}", totals.samples);
    assert!(totals.ok > 500, "the load ran: {}", totals.ok);
    let ours: Vec<String> = d
        .netns
        .rule_lines()
        .into_iter()
        .filter(|l| l.contains("SWITCHEROO:ns=web:"))
        .collect();
    assert_eq!(ours.len(), 4, "the last release's rules: {ours:?}");
    assert_eq!(docker_rules(&d.netns), before, "Docker's rules changed");
}

#[test]
fn a_killed_container_in_its_probation_hands_the_port_back() {
    let Some(d) = daemon() else { return };
    let (client, addr) = holder(&d);
    let release = |v: u32| {
        let name = format!("web-v{v}");
        let image = format!("web:v{v}");
        let args: Vec<&str> = [
            &["run", "-d", "--rm", "--name", &name][..],
            JOIN,
            &[
                &image,
                "run",
                "-n",
                "web",
                "-p",
                "8080",
                "--ready",
                "http:/",
                "--probation",
                "5m",
                "--",
                "/srv/server",
            ],
        ]
        .concat();
        d.ok(&args);
    };
    release(1);
    let (v1, _) = until_new(&client, addr, None);
    let running = load(&client, addr);
    std::thread::sleep(Duration::from_millis(300));
    release(2);
    let (v2, took) = until_new(&client, addr, Some(v1));
    eprintln!("web-v2 serving {took:?} after docker run returned; web-v1 is its standby");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        d.ok(&["ps", "--format", "{{.Names}}", "--filter", "name=^web-v1$"]),
        "web-v1",
        "the standby keeps running"
    );

    let killed = Instant::now();
    d.ok(&["kill", "web-v2"]);
    let kill_returned = killed.elapsed();
    let (back, _) = until_new(&client, addr, Some(v2));
    let restored = killed.elapsed();
    assert_eq!(back, v1, "the standby serves again");
    std::thread::sleep(Duration::from_secs(1));
    let stats = running.stop();
    let totals = Totals::of(std::slice::from_ref(&stats));
    eprintln!(
        "docker kill web-v2 (which returned in {kill_returned:?}): web-v1 serves again \
         {restored:?} after it was sent; {} requests, {} failed",
        totals.ok, totals.failed
    );
    // Nothing restarts the killed release: the holder and v1 are all that run.
    assert_eq!(d.names(), ["web-net", "web-v1"]);
    assert_eq!(answering(&client, addr), Some(v1));
    // Requests fail only at the instant of the kill: those v2 was serving. A new
    // connection sent once v1 served again never fails; a keep-alive client may find its
    // connection to v2 reset once, and reconnects to v1.
    let timeline = stats.timeline.lock().unwrap();
    let repaired = killed + restored;
    let late_new: Vec<_> = timeline
        .iter()
        .filter(|r| r.result.is_err() && r.new_connection && r.at > repaired)
        .collect();
    let reused = timeline
        .iter()
        .filter(|r| r.result.is_err() && !r.new_connection)
        .count();
    assert!(late_new.is_empty(), "{late_new:?}");
    assert!(
        reused <= 2,
        "{reused} keep-alive requests failed: {:?}",
        totals.samples
    );
}
