//! Services with several ports, and UDP: the `echo` example (TCP and UDP ports of one
//! service, switched in one transaction) redeployed under load, each test in its own
//! network namespace.

use lab::{require_root, version, Hello, Netns, UdpLoad};
use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switcheroo::{Role, Switcheroo};

const DEPLOYS: usize = 10;

/// Waits for every old instance to exit 0 and returns their output.
fn all_exit_cleanly(old: Vec<Hello>) -> Vec<String> {
    let mut logs = Vec::new();
    for mut h in old {
        h.expect_clean_exit("an old instance");
        logs.extend(h.log.clone());
    }
    logs
}

#[test]
fn two_tcp_ports_switch_together_for_clients_that_alternate_between_them() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let start = |v: usize| {
        let tag = format!("v{v}");
        ns.example("echo", &["--port", "8080", "--port", "8081", "--tag", &tag])
    };
    let mut current = start(0);
    let stop = Arc::new(AtomicBool::new(false));
    let (answers, old) = ns.enter(|| {
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let host = if c % 2 == 0 { "127.0.0.1" } else { "[::1]" };
                    let mut seen: Vec<Result<(u16, usize), String>> = Vec::new();
                    let mut i = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        let port = if i % 2 == 0 { 8080 } else { 8081 };
                        i += 1;
                        let addr: SocketAddr = format!("{host}:{port}").parse().unwrap();
                        let answer = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                            .and_then(|mut s| {
                                let mut text = String::new();
                                s.read_to_string(&mut text).map(|_| text)
                            });
                        seen.push(match answer {
                            Ok(text) => version(&text)
                                .map(|v| (port, v))
                                .ok_or_else(|| format!("{addr}: answer {text:?}")),
                            Err(e) => Err(format!("{addr}: {e}")),
                        });
                    }
                    seen
                })
            })
            .collect();
        let mut old = Vec::new();
        for v in 1..=DEPLOYS {
            std::thread::sleep(Duration::from_millis(250));
            old.push(std::mem::replace(&mut current, start(v)));
        }
        std::thread::sleep(Duration::from_millis(250));
        stop.store(true, Ordering::SeqCst);
        let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (answers, old)
    });
    all_exit_cleanly(old);

    let mut total = 0;
    let mut versions = std::collections::BTreeSet::new();
    for (c, seen) in answers.iter().enumerate() {
        let failed: Vec<_> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "client {c}: {} failed: {failed:?}",
            failed.len()
        );
        let ok: Vec<(u16, usize)> = seen.iter().filter_map(|r| r.clone().ok()).collect();
        total += ok.len();
        // Never an older version on one port after a newer one on the other.
        for pair in ok.windows(2) {
            assert!(
                pair[1].1 >= pair[0].1,
                "client {c}: v{} on port {} after v{} on port {}",
                pair[1].1,
                pair[1].0,
                pair[0].1,
                pair[0].0
            );
        }
        versions.extend(ok.iter().map(|(_, v)| *v));
    }
    eprintln!(
        "{total} connections alternating between 8080 and 8081 over {DEPLOYS} deploys; versions seen {versions:?}"
    );
    assert!(
        versions.len() > DEPLOYS / 2,
        "the clients saw too few versions to tell anything: {versions:?}"
    );
}

#[test]
fn udp_flows_stay_with_their_instance_until_it_retires_and_every_datagram_is_answered() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    // Long-lived flows never go quiet, so an old instance keeps them for --drain-max,
    // then forgets them and they continue on the current instance.
    let start = |v: usize| {
        let tag = format!("v{v}");
        ns.example(
            "echo",
            &[
                "--port",
                "5353/udp",
                "--port",
                "8080",
                "--tag",
                &tag,
                "--drain-max",
                "1s",
            ],
        )
    };
    let mut current = start(0);
    let first_rules = ns.save(false);
    let (flows, fresh, ready, old) = ns.enter(|| {
        let load = UdpLoad::start(5353);
        let mut ready = vec![Instant::now()];
        let mut old = Vec::new();
        for v in 1..=DEPLOYS {
            std::thread::sleep(Duration::from_millis(400));
            old.push(std::mem::replace(&mut current, start(v)));
            ready.push(Instant::now());
        }
        // The last replaced instance forgets its flows after --drain-max and exits; the
        // flows then move on to the current one.
        old.last_mut().unwrap().wait_exit(Duration::from_secs(15));
        std::thread::sleep(Duration::from_millis(500));
        let (flows, fresh) = load.stop();
        (flows, fresh, ready, old)
    });
    let logs = all_exit_cleanly(old);

    // The rules are iptables-nft's own `-p udp -m udp` rules.
    let pid = current.pid;
    let udp_rule = first_rules
        .lines()
        .find(|l| l.starts_with("-A OUTPUT -p udp"))
        .unwrap_or_else(|| panic!("no UDP rule in:\n{first_rules}"));
    assert!(
        udp_rule.starts_with("-A OUTPUT -p udp -m udp --dport 5353 -m addrtype --dst-type LOCAL -m comment --comment \"SWITCHEROO:ns=echo:port=")
            && udp_rule.contains(" -j REDIRECT --to-ports "),
        "{udp_rule}"
    );
    let now = ns.save(false);
    assert_eq!(
        now.lines()
            .filter(|l| l.contains("SWITCHEROO:ns=echo"))
            .count(),
        4,
        "one rule per port and chain for the current instance:\n{now}"
    );
    assert!(now.contains(&format!(":pid={pid}:")), "{now}");

    let mut sticky = 0;
    let (mut datagrams, mut resent) = (0, 0);
    for (id, flow) in flows.iter().enumerate() {
        assert!(
            flow.lost.is_empty(),
            "flow {id}: never answered: {:?}",
            flow.lost
        );
        datagrams += flow.answers.len();
        resent += flow.resent;
        for pair in flow.answers.windows(2) {
            assert!(
                pair[1].1 >= pair[0].1,
                "flow {id}: v{} answered after v{}",
                pair[1].1,
                pair[0].1
            );
        }
        // Answers by an instance after a newer one took the port: the flow stayed.
        sticky += flow
            .answers
            .iter()
            .filter(|(at, v)| ready.get(v + 1).is_some_and(|newer| at > newer))
            .count();
        let last = flow.answers.last().map(|a| a.1);
        assert_eq!(
            last,
            Some(DEPLOYS),
            "flow {id} does not end on the current instance"
        );
    }
    assert!(sticky > 0, "no flow stayed on its instance after a switch");
    let mut fresh_datagrams = 0;
    for (id, log) in fresh.iter().enumerate() {
        assert!(
            log.lost.is_empty(),
            "new flows {id}: never answered: {:?}",
            log.lost
        );
        fresh_datagrams += log.answers.len();
        resent += log.resent;
    }
    let late: usize = logs
        .iter()
        .filter_map(|l| l.split(" late=").nth(1)?.trim().parse::<usize>().ok())
        .sum();
    let forgotten: usize = logs
        .iter()
        .filter_map(|l| {
            l.split(" forgotten=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    eprintln!(
        "UDP over {DEPLOYS} deploys: {datagrams} datagrams on 4 long-lived flows ({sticky} answered by an instance after a newer one took the port), {fresh_datagrams} on new flows; every one answered; {resent} sent again after 100 ms without an answer; old instances forgot {forgotten} flows, {late} datagrams arrived in the moment between their last answer and the forgetting"
    );
}

#[test]
fn a_probation_keeps_and_hands_back_every_port_of_the_previous_instance() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let args = |tag: &'static str| {
        [
            "--port",
            "8080",
            "--port",
            "5353/udp",
            "--tag",
            tag,
            "--probation",
            "60s",
        ]
    };
    let mut v0 = ns.example("echo", &args("v0"));
    let mut v1 = ns.example("echo", &args("v1"));
    let ask = |ns: &Netns| {
        ns.enter(|| {
            let mut tcp = String::new();
            let _ =
                TcpStream::connect("127.0.0.1:8080").and_then(|mut s| s.read_to_string(&mut tcp));
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            udp.connect("127.0.0.1:5353").unwrap();
            udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            udp.send(b"x").unwrap();
            let mut buf = [0u8; 256];
            let n = udp.recv(&mut buf).unwrap_or(0);
            (version(&tcp), version(&String::from_utf8_lossy(&buf[..n])))
        })
    };
    assert_eq!(ask(&ns), (Some(1), Some(1)));
    // v0 stays below on both ports, in every chain: the standby.
    let rules = ns.enter(|| {
        Switcheroo::service("echo")
            .tcp(8080)
            .udp(5353)
            .build()
            .unwrap()
            .rules()
            .unwrap()
    });
    let standby: Vec<String> = rules
        .iter()
        .filter(|r| r.pid == v0.pid)
        .map(|r| format!("{} {} {}", r.family, r.chain, r.public()))
        .collect();
    assert_eq!(standby.len(), 8, "{rules:#?}");
    assert!(
        rules.iter().all(|r| r.role
            == if r.pid == v0.pid {
                Role::Standby
            } else {
                Role::Active
            }),
        "{rules:#?}"
    );
    // v1 dies: v0 takes both ports back at once.
    let _ = v1.child.kill();
    let _ = v1.child.wait();
    v0.line_containing("place Active");
    assert_eq!(ask(&ns), (Some(0), Some(0)));
    let left = ns.save(false);
    assert_eq!(
        left.lines()
            .filter(|l| l.contains(&format!(":pid={}:", v0.pid)))
            .count(),
        4,
        "{left}"
    );
    assert!(!left.contains(&format!(":pid={}:", v1.pid)), "{left}");
}
