//! The switch as a user sees it: `hello` instances as real processes in a throwaway
//! network namespace, clients on loopback and in a second namespace behind a veth pair,
//! and the ruleset as `iptables-nft-save` prints it.

use lab::{
    expected_rule, get, pid_of, require_root, start_time, Hello, KeepAlive, Netns, TempPath,
};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use switcheroo::{Chain, Family, Switcheroo};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// The pid of the instance that answers `GET /` on `target`, from inside `ns`.
fn answering_pid(ns: &Netns, target: &str) -> u32 {
    let target = addr(target);
    let (status, body) = ns
        .enter(|| get(target, "/"))
        .unwrap_or_else(|e| panic!("GET / on {target} from {}: {e}", ns.name));
    assert_eq!(status, 200, "{target}: {body}");
    pid_of(&body)
}

const LOCAL: [&str; 2] = ["127.0.0.1:8080", "[::1]:8080"];
/// The server namespace's veth addresses, as seen from the peer namespace.
const REMOTE: [&str; 2] = ["192.0.2.1:8080", "[2001:db8::1]:8080"];

#[test]
fn second_instance_takes_over_for_loopback_and_network_clients() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let peer = ns.peer();

    let mut first = ns.hello(&[]);
    for t in LOCAL {
        assert_eq!(answering_pid(&ns, t), first.pid, "{t} from the host");
    }
    for t in REMOTE {
        assert_eq!(answering_pid(&peer, t), first.pid, "{t} from the network");
    }

    let second = ns.hello(&[]);
    assert_ne!(second.port, first.port, "a fresh internal port");
    for t in LOCAL {
        assert_eq!(answering_pid(&ns, t), second.pid, "{t} from the host");
    }
    for t in REMOTE {
        assert_eq!(answering_pid(&peer, t), second.pid, "{t} from the network");
    }
    first.expect_clean_exit("the replaced instance");
    assert!(
        first.log.iter().any(|l| l.starts_with("retiring (")),
        "the replaced instance left because of SIGTERM: {:?}",
        first.log
    );
}

#[test]
fn slow_request_in_flight_finishes_on_the_old_instance() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut first = ns.hello(&[]);
    // The connection is made to the first instance, and the request is on its way, when
    // the second one commits.
    let mut conn = ns
        .enter(|| lab::KeepAlive::connect(addr("127.0.0.1:8080")))
        .expect("connect");
    let (slow, second, first_alive_after_commit) = std::thread::scope(|s| {
        let slow = s.spawn(move || {
            let started = Instant::now();
            (conn.get("/sleep?ms=1500"), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        let second = ns.hello(&[]);
        let first_alive = first.child.try_wait().expect("try_wait").is_none();
        (slow.join().expect("client thread"), second, first_alive)
    });
    assert!(
        first_alive_after_commit,
        "the old instance was still running when the new one had committed"
    );
    let (response, took) = (slow.0.expect("the slow request is answered"), slow.1);
    let (status, body) = (response.status, response.body);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        pid_of(&body),
        first.pid,
        "the slow request stays with the old instance"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "answered after {took:?}"
    );
    first.expect_clean_exit("the old instance, after answering");
    assert_eq!(answering_pid(&ns, "127.0.0.1:8080"), second.pid);
}

#[test]
fn keep_alive_connections_get_connection_close_then_are_closed() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut first = ns.hello(&[]);
    let (mut busy, mut idle) = ns.enter(|| {
        let open = || KeepAlive::connect(addr("127.0.0.1:8080")).expect("connect");
        (open(), open())
    });
    for conn in [&mut busy, &mut idle] {
        let r = conn.get("/").expect("first request");
        assert_eq!(
            (r.status, pid_of(&r.body), r.close),
            (200, first.pid, false)
        );
    }

    let second = ns.hello(&[]);
    // Printed by the old instance once it is shutting down.
    first.line("retiring (");
    // The next request on an open connection is still answered by the old instance, which
    // says it is the last one and closes.
    let r = busy.get("/").expect("request after the switch");
    assert_eq!((r.status, pid_of(&r.body)), (200, first.pid));
    assert!(r.close, "the response says Connection: close: {r:?}");
    assert!(
        busy.closed_by_server_within(Duration::from_secs(2)),
        "the server closed the connection after that response"
    );
    // A connection with no request in progress is closed by the server after a short wait.
    let waiting = Instant::now();
    assert!(
        idle.closed_by_server_within(Duration::from_secs(5)),
        "the idle keep-alive connection was closed"
    );
    eprintln!("idle connection closed after {:?}", waiting.elapsed());
    first.expect_clean_exit("the old instance");
    // The client's next connection reaches the new instance.
    let mut next = ns.enter(|| KeepAlive::connect(addr("127.0.0.1:8080")).expect("connect"));
    let r = next.get("/").expect("request on a new connection");
    assert_eq!((pid_of(&r.body), r.close), (second.pid, false));
}

#[test]
fn iptables_nft_save_prints_exactly_our_rule_per_chain() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut previous: Option<Hello> = None;
    for round in 0..3 {
        let current = ns.hello(&["--namespace", "web"]);
        for (v6, tool) in [(false, "iptables-nft-save"), (true, "ip6tables-nft-save")] {
            let mut ours: Vec<String> = ns
                .save(v6)
                .lines()
                .filter(|l| l.contains("SWITCHEROO"))
                .map(str::to_owned)
                .collect();
            ours.sort();
            let mut expected = vec![
                expected_rule("PREROUTING", "web", &current, 8080),
                expected_rule("OUTPUT", "web", &current, 8080),
            ];
            expected.sort();
            assert_eq!(ours, expected, "{tool} after deploy {}", round + 1);
        }
        if let Some(mut old) = previous.replace(current) {
            old.expect_clean_exit("the replaced instance");
        }
    }
}

#[test]
fn foreign_rules_survive_every_switch() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    for rule in [
        "iptables-nft -t nat -A PREROUTING -p tcp --dport 9999 -j REDIRECT --to-ports 9998",
        "iptables-nft -t nat -A OUTPUT -p udp --dport 53 -j RETURN",
        "iptables-nft -t nat -I OUTPUT -p tcp --dport 8080 -d 203.0.113.7 -j RETURN",
        "ip6tables-nft -t nat -A PREROUTING -p tcp --dport 9999 -j REDIRECT --to-ports 9998",
        "ip6tables-nft -t nat -A OUTPUT -p udp --dport 53 -j RETURN -m comment --comment dns",
    ] {
        ns.run(rule);
    }
    let foreign = |ns: &Netns| -> Vec<String> {
        ns.rule_lines()
            .into_iter()
            .filter(|l| !l.contains("SWITCHEROO"))
            .collect()
    };
    let before = foreign(&ns);
    assert_eq!(before.len(), 5, "{before:?}");

    let _a = ns.hello(&[]);
    assert_eq!(foreign(&ns), before, "after the first deploy");
    // Foreign rules added between switches, at the head (above ours) and at the tail.
    ns.run("iptables-nft -t nat -I PREROUTING -p tcp --dport 7777 -j RETURN");
    ns.run("iptables-nft -t nat -A OUTPUT -p tcp --dport 7778 -j RETURN");
    ns.run("ip6tables-nft -t nat -I OUTPUT -p tcp --dport 7777 -j RETURN");
    ns.run("ip6tables-nft -t nat -A PREROUTING -p tcp --dport 7778 -j RETURN");
    let between = foreign(&ns);
    assert_eq!(between.len(), 9, "{between:?}");
    let _b = ns.hello(&[]);
    assert_eq!(foreign(&ns), between, "after the second deploy");
    let c = ns.hello(&[]);
    assert_eq!(foreign(&ns), between, "after the third deploy");

    let ours: Vec<String> = ns
        .rule_lines()
        .into_iter()
        .filter(|l| l.contains("SWITCHEROO"))
        .collect();
    assert_eq!(ours.len(), 4, "one rule per (family, chain): {ours:?}");
    assert!(
        ours.iter().all(|l| l.contains(&format!(":pid={}:", c.pid))),
        "{ours:?}"
    );
}

#[test]
fn a_switch_executes_no_program() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let (old_trace, new_trace) = (
        TempPath::new(&ns, "old.strace"),
        TempPath::new(&ns, "new.strace"),
    );
    let strace = |file: &TempPath| {
        ns.hello_with(
            &[
                "strace",
                "-f",
                "-qq",
                "-e",
                "trace=execve,execveat",
                "-o",
                file.as_str(),
            ],
            &[],
        )
    };
    // Both sides of a switch are traced: the new instance's commit and signal, and the old
    // instance's drain and exit.
    let mut old = strace(&old_trace);
    let mut new = strace(&new_trace);
    old.expect_clean_exit("the traced old instance");
    assert_eq!(answering_pid(&ns, "127.0.0.1:8080"), new.pid);
    // Stopped cleanly, so that strace writes out its trace.
    let status = new.terminate().expect("the traced new instance exits");
    assert!(status.success(), "{status}: {:?}", new.log);

    for (file, who) in [(&old_trace, "old"), (&new_trace, "new")] {
        let text = std::fs::read_to_string(&file.0).expect("strace output");
        let execs: Vec<&str> = text.lines().filter(|l| l.contains("exec")).collect();
        assert_eq!(
            execs.len(),
            1,
            "the {who} instance executed only itself:\n{text}"
        );
        assert!(
            execs[0].contains("examples/hello\"") && execs[0].ends_with("= 0"),
            "{text}"
        );
    }
}

#[test]
fn rules_and_cleanup_through_the_library() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let hello = ns.hello(&["--namespace", "lib"]);
    let other = ns.hello(&[
        "--namespace",
        "other",
        "--port",
        "9090",
        "--range",
        "41000-41099",
    ]);
    assert_eq!(answering_pid(&ns, "127.0.0.1:8080"), hello.pid);

    // The library opens its netlink socket in the calling thread's namespace.
    let (rules, removed, after) = ns.enter(|| {
        let sw = Switcheroo::builder("lib", 8080).build().expect("build");
        let rules = sw.rules().expect("rules");
        let removed = sw.cleanup().expect("cleanup");
        (rules, removed, sw.rules().expect("rules after cleanup"))
    });
    assert_eq!(rules.len(), 4, "{rules:#?}");
    for family in [Family::Ipv4, Family::Ipv6] {
        for chain in [Chain::Prerouting, Chain::Output] {
            let r = rules
                .iter()
                .find(|r| r.family == family && r.chain == chain)
                .unwrap_or_else(|| panic!("no {family:?} {chain:?} rule in {rules:#?}"));
            assert_eq!(
                (
                    r.namespace.as_str(),
                    r.public_port,
                    r.internal_port,
                    r.pid,
                    r.start,
                    r.alive
                ),
                (
                    "lib",
                    8080,
                    hello.port,
                    hello.pid,
                    Some(start_time(hello.pid)),
                    true
                ),
                "{r:#?}"
            );
        }
    }
    assert_eq!(removed, 4);
    assert!(after.is_empty(), "{after:#?}");

    // Gone from the kernel: iptables-nft-save no longer shows them, and 8080 leads nowhere.
    let lines = ns.rule_lines();
    assert!(lines.iter().all(|l| !l.contains("ns=lib:")), "{lines:#?}");
    let refused = ns.enter(|| get(addr("127.0.0.1:8080"), "/")).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // The other namespace's rules are untouched and still route.
    let others = lines
        .iter()
        .filter(|l| l.contains(&format!("ns=other:port={}:", other.port)))
        .count();
    assert_eq!(others, 4, "{lines:#?}");
    assert_eq!(answering_pid(&ns, "127.0.0.1:9090"), other.pid);
}

#[test]
fn a_switcheroo_acts_in_the_namespace_it_was_built_for_whichever_thread_calls() {
    if !require_root() {
        return;
    }
    let a = Netns::new();
    let b = Netns::new();
    let fd = std::fs::File::open(format!("/run/netns/{}", a.name)).expect("open netns A");
    // Built on the test's own thread (in the machine's namespace) for namespace A; used
    // only from threads that sit in namespace B.
    let sw = Switcheroo::builder("decided", 8080)
        .netns(fd)
        .build()
        .expect("build for A");
    let (port, report, rules) = b.enter(|| {
        let (listener, takeover) = sw.begin().expect("begin from B");
        let port = takeover.port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                // Read the request head first: closing with unread bytes would reset.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n")
                    && std::io::Read::read(&mut stream, &mut byte).is_ok_and(|n| n == 1)
                {
                    head.push(byte[0]);
                }
                let body = format!("hello from pid {} port {port}", std::process::id());
                let _ = std::io::Write::write_all(
                    &mut stream,
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        let report = takeover.commit().expect("commit from B");
        (port, report, sw.rules().expect("rules from B"))
    });
    assert_eq!(report.inserted.len(), 4, "{report:#?}");
    assert_eq!(rules.len(), 4, "{rules:#?}");
    assert!(rules.iter().all(|r| r.internal_port == port && r.alive));

    // Everything happened in A: its ruleset holds the rules, its port 8080 answers from
    // the listener, which is bound in A.
    let lines = a.rule_lines();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains(&format!("ns=decided:port={port}:")))
            .count(),
        4,
        "{lines:#?}"
    );
    assert_eq!(answering_pid(&a, "127.0.0.1:8080"), std::process::id());
    assert_eq!(
        answering_pid(&a, &format!("127.0.0.1:{port}")),
        std::process::id()
    );
    // ... and nothing in B: no table, nothing listening.
    assert_eq!(
        b.ok(&["nft", "list", "ruleset"]),
        "",
        "B's ruleset is untouched"
    );
    let refused = b
        .enter(|| get(addr(&format!("127.0.0.1:{port}")), "/"))
        .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    // A socket lost after an error is reopened in A too, not in the calling thread's
    // namespace: cleanup from B, after a failed call from B, still acts on A.
    let removed = b.enter(|| {
        let bad = sw.begin(); // fine, but exercises the shared socket again from B
        drop(bad);
        sw.cleanup().expect("cleanup from B")
    });
    assert_eq!(removed, 4);
    assert!(a.rule_lines().iter().all(|l| !l.contains("ns=decided:")));
}

#[test]
fn a_services_check_looks_at_its_own_network_namespace() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    ns.ok(&[
        "sh",
        "-c",
        "nft add table inet host && nft add chain inet host input '{ type filter hook input priority 0; policy drop; }'",
    ]);
    // Built inside the namespace, called from the test's own thread (another namespace,
    // without that chain): the blocker found is the namespace's.
    let sw = ns.enter(|| {
        Switcheroo::service("chk")
            .tcp(8080)
            .udp(5353)
            .build()
            .unwrap()
    });
    let findings = sw.diagnose().unwrap();
    let blockers: Vec<_> = switcheroo::check::blockers(&findings).collect();
    assert_eq!(blockers.len(), 1, "{findings:#?}");
    assert!(
        blockers[0].what.contains("inet host input"),
        "{findings:#?}"
    );
    assert_eq!(
        blockers[0].fix.as_deref(),
        Some("nft insert rule inet host input ct status dnat accept")
    );
}

#[test]
fn a_deploy_after_a_crash_forgets_the_crashed_instances_connections() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut crashed = ns.hello(&[]);
    // Three clients with fixed source ports, connected to the instance that will crash.
    let sources: Vec<u16> = (47000..47003).collect();
    let connect_from = |port: u16| {
        let socket = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            None,
        )
        .unwrap();
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReuseAddr, &true).unwrap();
        let local = nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, port);
        nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&socket), &local).unwrap();
        let public = nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, 8080);
        nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&socket), &public)
            .map(|()| std::net::TcpStream::from(socket))
    };
    let open: Vec<_> = ns.enter(|| {
        sources
            .iter()
            .map(|p| connect_from(*p).expect("connect"))
            .collect()
    });
    // The clients reset their connections (SO_LINGER 0) and the instance crashes:
    // conntrack keeps their entries (CLOSE, for 10 s), mapped to the dead port, and a SYN
    // from the same client port would reopen one and follow it there.
    for stream in open {
        let linger = nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger).unwrap();
    }
    let _ = crashed.child.kill();
    let _ = crashed.child.wait();
    let mapped = || {
        ns.enter(|| {
            let mut conn = switcheroo_sys::Conn::open().unwrap();
            conn.conntrack_to_port(Family::Ipv4, switcheroo::Protocol::Tcp, crashed.port)
                .unwrap()
                .into_iter()
                .filter(|e| e.tcp_state != Some(7)) // TIME_WAIT reopens by itself
                .count()
        })
    };
    assert!(
        mapped() > 0,
        "the reset connections left no entry to test with"
    );
    let next = ns.hello(&[]);
    assert_eq!(
        mapped(),
        0,
        "the deploy did not forget the dead port's connections"
    );
    // The same client ports reach the new instance instead of the dead port.
    for port in sources {
        let mut stream = ns
            .enter(|| connect_from(port))
            .unwrap_or_else(|e| panic!("from port {port}: {e}"));
        use std::io::{Read, Write};
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        assert!(body.contains(&format!("pid {}", next.pid)), "{body}");
    }
}
