//! Neighbours in the same nat chains: Docker's rules (`tests/neighbours/docker.rules`, as
//! Docker writes them) and kube-proxy's iptables mode (a `KUBE-SERVICES` chain with 300
//! services, jumped to from PREROUTING and OUTPUT), loaded as they write them. 20 deploys
//! of `hello` under load from loopback and from a veth peer, while a kube-proxy-like
//! writer keeps deleting its jump and inserting it again at the head of both chains: no
//! request fails, and their rules are byte for byte what they were.

use lab::{require_root, Netns};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const DEPLOYS: usize = 20;
const SERVICES: usize = 300;

/// kube-proxy's nat rules for `SERVICES` ClusterIP services, in iptables-save form.
fn kube_proxy_rules() -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    chains.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE\n");
    for i in 0..SERVICES {
        let (svc, sep) = (format!("KUBE-SVC-{i:016X}"), format!("KUBE-SEP-{i:016X}"));
        let (a, b) = (i / 250, i % 250 + 1);
        chains.push_str(&format!(":{svc} - [0:0]\n:{sep} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d 10.96.{a}.{b}/32 -p tcp -m comment --comment \"default/svc{i}:http cluster IP\" -m tcp --dport 80 -j {svc}\n\
             -A {svc} -m comment --comment \"default/svc{i}:http -> 10.244.{a}.{b}:8080\" -j {sep}\n\
             -A {sep} -s 10.244.{a}.{b}/32 -m comment --comment \"default/svc{i}:http\" -j KUBE-MARK-MASQ\n\
             -A {sep} -p tcp -m comment --comment \"default/svc{i}:http\" -m tcp -j DNAT --to-destination 10.244.{a}.{b}:8080\n"
        ));
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// `iptables-nft-save` without comments, counters or switcheroo's own rules.
fn theirs(ns: &Netns) -> String {
    let out = ns.exec(&["iptables-nft-save"]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains("SWITCHEROO:"))
        .map(|l| match l.rfind(" [") {
            Some(i) if l.starts_with(':') => l[..i].to_owned(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn docker_and_kube_proxy_rules_survive_twenty_deploys_under_load_untouched() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let peer = ns.peer();
    let kube = std::env::temp_dir().join(format!("{}-kube.rules", ns.name));
    std::fs::write(&kube, kube_proxy_rules()).unwrap();
    let docker = format!(
        "{}/tests/neighbours/docker.rules",
        env!("CARGO_MANIFEST_DIR")
    );
    for file in [kube.to_str().unwrap(), &docker] {
        ns.ok(&[
            "sh",
            "-c",
            &format!("iptables-nft-restore --noflush < {file}"),
        ]);
    }
    let _ = std::fs::remove_file(&kube);
    let before = theirs(&ns);
    assert!(
        before.contains("-A KUBE-SERVICES -d 10.96.1.50/32"),
        "{before}"
    );

    let mut current = ns.hello(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    // kube-proxy's resync, roughly: its jumps go, and come back at the head.
    let writer = {
        let (stop, name) = (stop.clone(), ns.name.clone());
        std::thread::spawn(move || {
            let mut moves = 0;
            while !stop.load(Ordering::SeqCst) {
                for chain in ["PREROUTING", "OUTPUT"] {
                    let jump =
                        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES";
                    // Each step again until it succeeds: iptables-nft, like kube-proxy,
                    // may meet a concurrent commit of ours and fail that once.
                    for op in ["-D", "-I"] {
                        let script = format!("iptables-nft -t nat {op} {chain} {jump}");
                        let done = (0..5).any(|_| {
                            std::process::Command::new("ip")
                                .args(["netns", "exec", &name, "sh", "-c", &script])
                                .status()
                                .is_ok_and(|s| s.success())
                        });
                        assert!(done, "the kube-proxy-like writer failed 5 times: {script}");
                    }
                    moves += 1;
                }
                std::thread::sleep(Duration::from_millis(rand::random_range(50..150)));
            }
            moves
        })
    };
    let loads = vec![
        ns.enter(|| {
            let mut plan = lab::load::Plan::new("127.0.0.1:8080".parse().unwrap());
            plan.close_clients = 2;
            plan.keepalive_clients = 1;
            lab::load::Load::start(&plan)
        }),
        peer.enter(|| {
            let mut plan = lab::load::Plan::new("192.0.2.1:8080".parse().unwrap());
            plan.close_clients = 2;
            plan.keepalive_clients = 1;
            lab::load::Load::start(&plan)
        }),
    ];
    let mut old = Vec::new();
    for _ in 0..DEPLOYS {
        std::thread::sleep(Duration::from_millis(250));
        old.push(std::mem::replace(&mut current, ns.hello(&[])));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stats: Vec<_> = loads.into_iter().map(lab::load::Load::stop).collect();
    stop.store(true, Ordering::SeqCst);
    let moves = writer.join().unwrap();
    for mut h in old {
        h.expect_clean_exit("an old instance");
    }
    let totals = lab::load::Totals::of(&stats);
    let after = theirs(&ns);
    let nat = ns.save(false);
    eprintln!(
        "{DEPLOYS} deploys beside Docker's rules and {SERVICES} kube-proxy services, the kube-proxy jump moved to the head {moves} times: {} requests (loopback and peer), {} failed",
        totals.ok, totals.failed
    );
    assert_eq!(totals.failed, 0, "{:?}", totals.samples);
    assert!(totals.ok > 500, "the load ran: {}", totals.ok);
    assert!(moves > 10, "the writer ran: {moves}");
    assert_eq!(after, before, "the neighbours' rules changed");
    // Ours: one per chain, for the last instance, whoever is at the head.
    let ours: Vec<&str> = nat.lines().filter(|l| l.contains("SWITCHEROO:")).collect();
    assert_eq!(ours.len(), 2, "{nat}");
    assert!(
        ours.iter()
            .all(|l| l.contains(&format!(":pid={}:", current.pid))),
        "{nat}"
    );
}
