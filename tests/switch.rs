//! The switch as a user sees it: `hello` instances as real processes in a throwaway
//! network namespace, clients on loopback and on a second namespace behind a veth pair.

mod common;

use common::{expected_rule, get, pid_of, privileged, Netns};
use std::net::SocketAddr;
use std::time::Duration;
use switcheroo::{Chain, Family, Switcheroo};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn answering_pid(ns: &Netns, target: &str) -> u32 {
    let target = addr(target);
    let (status, body) = ns.enter(|| get(target, "/")).expect("request");
    assert_eq!(status, 200, "{body}");
    pid_of(&body)
}

#[test]
fn second_instance_takes_over_for_loopback_and_network_clients() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let peer = ns.peer();
    let local = ["127.0.0.1:8080", "[::1]:8080"];
    let remote = ["192.0.2.1:8080", "[2001:db8::1]:8080"];

    let mut first = ns.hello(&[]);
    for t in local {
        assert_eq!(answering_pid(&ns, t), first.pid, "{t}");
    }
    for t in remote {
        assert_eq!(
            answering_pid(&peer, t),
            first.pid,
            "{t} from the peer namespace"
        );
    }

    let second = ns.hello(&[]);
    for t in local {
        assert_eq!(answering_pid(&ns, t), second.pid, "{t}");
    }
    for t in remote {
        assert_eq!(
            answering_pid(&peer, t),
            second.pid,
            "{t} from the peer namespace"
        );
    }
    let status = first
        .wait_exit(Duration::from_secs(15))
        .expect("first instance exits");
    assert!(
        status.success(),
        "first instance exited with {status}: {:?}",
        first.log
    );
}

#[test]
fn slow_request_in_flight_finishes_on_the_old_instance() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let mut first = ns.hello(&[]);
    let (body, second_pid) = std::thread::scope(|s| {
        let slow = s.spawn(|| ns.enter(|| get(addr("127.0.0.1:8080"), "/sleep?ms=1500")));
        std::thread::sleep(Duration::from_millis(300));
        let second = ns.hello(&[]);
        let (status, body) = slow.join().unwrap().expect("slow request answered");
        assert_eq!(status, 200);
        let pid = second.pid;
        std::mem::forget(second); // killed with the namespace
        (body, pid)
    });
    assert_eq!(
        pid_of(&body),
        first.pid,
        "the slow request stays with the old instance"
    );
    assert_ne!(first.pid, second_pid);
    let status = first
        .wait_exit(Duration::from_secs(15))
        .expect("old instance exits");
    assert!(status.success());
    assert_eq!(answering_pid(&ns, "127.0.0.1:8080"), second_pid);
}

#[test]
fn iptables_nft_save_prints_exactly_our_rule_per_chain() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let mut first = ns.hello(&["--namespace", "web"]);
    let second = ns.hello(&["--namespace", "web"]);
    first
        .wait_exit(Duration::from_secs(15))
        .expect("first exits");
    for v6 in [false, true] {
        let ours: Vec<String> = ns
            .save(v6)
            .lines()
            .filter(|l| l.contains("SWITCHEROO"))
            .map(str::to_owned)
            .collect();
        assert_eq!(
            ours,
            vec![
                expected_rule("PREROUTING", "web", &second, 8080),
                expected_rule("OUTPUT", "web", &second, 8080),
            ],
            "ip{}tables-nft-save",
            if v6 { "6" } else { "" }
        );
    }
}

#[test]
fn foreign_rules_survive_every_switch() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    for rule in [
        "iptables-nft -t nat -A PREROUTING -p tcp --dport 9999 -j REDIRECT --to-ports 9998",
        "iptables-nft -t nat -A OUTPUT -p udp --dport 53 -j RETURN -m comment --comment dns",
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
    assert_eq!(before.len(), 4);

    let _a = ns.hello(&[]);
    assert_eq!(foreign(&ns), before);
    // A foreign rule inserted at the head, above ours, between switches.
    ns.run("iptables-nft -t nat -I PREROUTING -p tcp --dport 7777 -j RETURN");
    ns.run("ip6tables-nft -t nat -I OUTPUT -p tcp --dport 7777 -j RETURN");
    let between = foreign(&ns);
    assert_eq!(between.len(), 6);
    let _b = ns.hello(&[]);
    assert_eq!(foreign(&ns), between);
    let c = ns.hello(&[]);
    assert_eq!(foreign(&ns), between);
    let ours: Vec<String> = ns
        .rule_lines()
        .into_iter()
        .filter(|l| l.contains("SWITCHEROO"))
        .collect();
    assert_eq!(ours.len(), 4, "one rule per (family, chain): {ours:?}");
    assert!(
        ours.iter().all(|l| l.contains(&format!("pid={}:", c.pid))),
        "{ours:?}"
    );
}

#[test]
fn a_switch_executes_no_program() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let mut first = ns.hello(&[]);
    let trace = std::env::temp_dir().join(format!("switcheroo-exec-{}", ns.name));
    let trace_s = trace.to_str().unwrap().to_owned();
    let second = ns.hello_with(
        &[
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=execve,execveat",
            "-o",
            &trace_s,
        ],
        &[],
    );
    // The traced instance did a real switch: it removed the first instance's rules.
    first
        .wait_exit(Duration::from_secs(15))
        .expect("first instance exits");
    assert_eq!(answering_pid(&ns, "127.0.0.1:8080"), second.pid);
    let text = std::fs::read_to_string(&trace).expect("strace output");
    let _ = std::fs::remove_file(&trace);
    let execs: Vec<&str> = text.lines().filter(|l| l.contains("execve")).collect();
    assert_eq!(execs.len(), 1, "only hello itself was executed:\n{text}");
    assert!(execs[0].contains("examples/hello"), "{text}");
}

#[test]
fn rules_and_cleanup_through_the_library() {
    if !privileged() {
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
    let (rules, removed, after) = ns.enter(|| {
        let sw = Switcheroo::builder("lib", 8080).build().unwrap();
        let rules = sw.rules().unwrap();
        let removed = sw.cleanup().unwrap();
        (rules, removed, sw.rules().unwrap())
    });
    assert_eq!(rules.len(), 4);
    for family in [Family::Ipv4, Family::Ipv6] {
        for chain in [Chain::Prerouting, Chain::Output] {
            let r = rules
                .iter()
                .find(|r| r.family == family && r.chain == chain)
                .expect("rule");
            assert_eq!(
                (r.public_port, r.internal_port, r.pid),
                (8080, hello.port, Some(hello.pid))
            );
            assert!(r.alive);
        }
    }
    assert_eq!(removed, 4);
    assert!(after.is_empty());
    // The other namespace's rules are untouched.
    let lines = ns.rule_lines();
    assert!(lines.iter().all(|l| !l.contains("ns=lib:")), "{lines:?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains(&format!("ns=other:port={}", other.port)))
            .count(),
        4
    );
}
