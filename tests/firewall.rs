//! Real hosts have firewalls. The REDIRECT runs before every filter chain of the input
//! hook, so a firewall that accepts the public port and drops the rest drops every
//! redirected connection from the network. For four shapes of firewall (loaded from
//! `tests/firewalls/` as their tools write them), `switcheroo check` names the chain and
//! the fix, connections from a veth peer fail as it predicts, and once its fix is applied
//! a deploy under load from the peer loses nothing.

use lab::{require_root, Netns};
use std::process::Output;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_switcheroo");

fn firewall_file(name: &str) -> String {
    format!("{}/tests/firewalls/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `switcheroo check` for the service `hello` (the namespace `hello` deploys in) on 8080.
fn check(ns: &Netns) -> (Output, String) {
    let out = ns.exec(&[BIN, "check", "-n", "hello", "-p", "8080"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out, text)
}

/// The `fix:` line under the firewall blocker of `check`'s text.
fn firewall_fix(text: &str) -> String {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with("BLOCKER  firewall"));
    lines.next().expect("a firewall blocker");
    let fix = lines.next().expect("a fix line").trim_start();
    fix.strip_prefix("fix:")
        .unwrap_or_else(|| panic!("no fix: {text}"))
        .trim()
        .to_owned()
}

/// Loads `file` into `ns`, as its tool would.
fn load_firewall(ns: &Netns, file: &str) {
    let path = firewall_file(file);
    let cmd = if file.ends_with(".nft") {
        format!("nft -f {path}")
    } else {
        format!("iptables-nft-restore < {path}")
    };
    ns.ok(&["sh", "-c", &cmd]);
}

fn connects_from(peer: &Netns, target: &str) -> bool {
    let target: std::net::SocketAddr = target.parse().unwrap();
    peer.enter(|| std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok())
}

/// The whole story for one firewall shape; `chain` is how `check` names the chain.
fn firewall_shape(file: &str, chain: &str, fix_starts: &str) {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let peer = ns.peer();
    load_firewall(&ns, file);
    let before = ns.run("nft list ruleset");

    let (out, text) = check(&ns);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let blocker = text
        .lines()
        .find(|l| l.starts_with("BLOCKER  firewall"))
        .unwrap_or_else(|| panic!("no firewall blocker:\n{text}"));
    assert!(blocker.contains(chain), "{blocker}");
    assert!(
        blocker.contains("internal port 40400 (not 8080/tcp)"),
        "{blocker}"
    );
    let fix = firewall_fix(&text);
    assert!(fix.starts_with(fix_starts), "{fix}");
    assert_eq!(
        ns.run("nft list ruleset"),
        before,
        "check changed the ruleset"
    );
    eprintln!("{file}: check says\n{text}");

    // As predicted: the service answers on loopback, and the peer's connections die.
    let mut hello = ns.hello(&[]);
    let public = "192.0.2.1:8080";
    assert!(
        !connects_from(&peer, public),
        "{file}: the firewall let it in"
    );
    let direct = format!("192.0.2.1:{}", hello.port);
    assert!(!connects_from(&peer, &direct), "the internal port is open");

    // The fix it printed, as printed; then nothing blocks.
    ns.ok(&["sh", "-c", &fix]);
    let (out, text) = check(&ns);
    assert_eq!(out.status.code(), Some(0), "after `{fix}`:\n{text}");
    assert!(text.contains("nothing blocks a deploy"), "{text}");
    assert!(
        connects_from(&peer, public),
        "{file}: still dropped after `{fix}`"
    );

    // Three deploys under load from the peer: nothing lost.
    let loads = peer.enter(|| {
        let mut plan = lab::load::Plan::new(public.parse().unwrap());
        plan.close_clients = 2;
        plan.keepalive_clients = 1;
        lab::load::Load::start(&plan)
    });
    let mut old = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        old.push(std::mem::replace(&mut hello, ns.hello(&[])));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stats = loads.stop();
    let totals = lab::load::Totals::of(&[stats]);
    eprintln!(
        "{file}: after the fix, 3 deploys under load from the peer: {} requests, {} failed",
        totals.ok, totals.failed
    );
    assert_eq!(totals.failed, 0, "{:?}", totals.samples);
    assert!(totals.ok > 100, "the load ran: {}", totals.ok);
    for mut h in old {
        h.expect_clean_exit("an old instance");
    }
}

#[test]
fn an_iptables_default_drop_input_is_named_and_fixed() {
    firewall_shape(
        "iptables-default-drop.rules",
        "ip filter INPUT (hook input, priority 0, policy drop)",
        "iptables -I INPUT -m conntrack --ctstate DNAT -j ACCEPT",
    );
}

#[test]
fn an_nft_inet_table_with_policy_drop_at_another_priority_is_named_and_fixed() {
    firewall_shape(
        "nft-inet-drop.nft",
        "inet host input (hook input, priority 10, policy drop)",
        "nft insert rule inet host input ct status dnat accept",
    );
}

#[test]
fn a_ufw_ruleset_is_named_with_ufw_s_own_fix() {
    firewall_shape(
        "ufw.rules",
        "ip filter INPUT (hook input, priority 0, policy drop)",
        "iptables -I ufw-before-input -m conntrack --ctstate DNAT -j ACCEPT",
    );
}

#[test]
fn a_firewalld_ruleset_with_strict_forward_ports_is_named_and_fixed() {
    firewall_shape(
        "firewalld.nft",
        "inet firewalld filter_INPUT (hook input, priority 10, policy accept)",
        "nft insert rule inet firewalld filter_INPUT ct status dnat accept",
    );
}

#[test]
fn check_on_an_open_host_finds_no_blocker_and_says_so_in_json() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let out = ns.exec(&[BIN, "check", "-p", "8080", "-p", "5353/udp", "--json"]);
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert!(json.starts_with("{\"findings\":["), "{json}");
    assert!(json.trim_end().ends_with("\"blockers\":0}"), "{json}");
    assert!(
        json.contains("\"level\":\"ok\",\"topic\":\"kernel\""),
        "{json}"
    );
    assert!(json.contains("no filter chain on the input hook"), "{json}");
}
