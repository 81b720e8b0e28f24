//! Safety under concurrent deploys, foreign writers, PID reuse, crashes, bad input and
//! missing privileges; each test in its own throwaway network namespace.

mod common;

use common::{get, pid_of, require_root, Netns};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switcheroo::Switcheroo;
use switcheroo_sys::{Batch, Chain, Conn, Family, Redirect};

fn ours(ns: &Netns) -> Vec<String> {
    ns.rule_lines()
        .into_iter()
        .filter(|l| l.contains("SWITCHEROO"))
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::metadata(format!("/proc/{pid}")).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// Requests 127.0.0.1:8080 in a loop (new connection each) until stopped; counts failures.
struct Probe {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    fn start(ns: &Netns) -> Probe {
        let (stop, ok, failed) = (
            Arc::default(),
            Arc::<AtomicU64>::default(),
            Arc::<AtomicU64>::default(),
        );
        let path = format!("/run/netns/{}", ns.name);
        let thread = {
            let (stop, ok, failed): (Arc<AtomicBool>, _, _) =
                (Arc::clone(&stop), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let f = std::fs::File::open(path).unwrap();
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match get("127.0.0.1:8080".parse().unwrap(), "/") {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        };
        Probe {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn eight_concurrent_deploys_leave_one_rule_set_and_one_instance() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let first = ns.hello(&[]);
    let probe = Probe::start(&ns);
    let racers: Vec<common::Hello> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| ns.hello(&[]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Every racer but the last to commit is told to leave; give them time to drain.
    let deadline = Instant::now() + Duration::from_secs(20);
    let survivors = loop {
        let s: Vec<u32> = racers.iter().map(|h| h.pid).filter(|p| alive(*p)).collect();
        if s.len() <= 1 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = probe.stop();
    assert_eq!(
        failed, 0,
        "requests failed during the race ({ok} succeeded)"
    );
    assert!(ok > 0);
    assert!(!alive(first.pid), "the first instance was replaced");
    assert_eq!(
        survivors.len(),
        1,
        "exactly one instance left: {survivors:?}"
    );
    let rules = ours(&ns);
    assert_eq!(rules.len(), 4, "one rule per (family, chain): {rules:?}");
    assert!(
        rules
            .iter()
            .all(|l| l.contains(&format!("pid={}:", survivors[0]))),
        "{rules:?}"
    );
    let body = ns
        .enter(|| get("127.0.0.1:8080".parse().unwrap(), "/"))
        .unwrap()
        .1;
    assert_eq!(pid_of(&body), survivors[0]);
}

#[test]
fn fifteen_deploys_succeed_while_iptables_nft_edits_the_same_chains() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    ns.run("iptables-nft -t nat -A PREROUTING -p tcp --dport 9999 -j RETURN");
    ns.run("ip6tables-nft -t nat -A OUTPUT -p tcp --dport 9999 -j RETURN");
    let stop = AtomicBool::new(false);
    let foreign_ops = AtomicU64::new(0);
    let mut attempts = Vec::new();
    std::thread::scope(|s| {
        for tool in ["iptables-nft", "ip6tables-nft"] {
            let (ns, stop, foreign_ops) = (&ns, &stop, &foreign_ops);
            s.spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    for op in ["-I", "-D"] {
                        let line =
                            format!("{tool} -t nat {op} PREROUTING -p tcp --dport 1234 -j RETURN");
                        let out = ns.exec(&line.split(' ').collect::<Vec<_>>());
                        assert!(out.status.success(), "{line}");
                        foreign_ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let _stop = common::StopOnDrop(&stop);
        let mut last = None;
        for _ in 0..15 {
            let mut h = ns.hello(&[]);
            let line = h.line("switched");
            let n: u32 = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("attempts="))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no attempts in {line:?}"));
            attempts.push(n);
            last = Some(h);
        }
        stop.store(true, Ordering::Relaxed);
        let last = last.unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let rules = ours(&ns);
        assert_eq!(rules.len(), 4, "{rules:?}");
        assert!(rules
            .iter()
            .all(|l| l.contains(&format!("pid={}:", last.pid))));
    });
    eprintln!(
        "attempts per deploy: {attempts:?}; foreign operations: {}",
        foreign_ops.load(Ordering::Relaxed)
    );
    assert!(
        foreign_ops.load(Ordering::Relaxed) > 10,
        "the foreign writer ran"
    );
    let lines = ns.rule_lines();
    let foreign: Vec<&String> = lines.iter().filter(|l| !l.contains("SWITCHEROO")).collect();
    assert_eq!(
        foreign,
        [
            &"ip -A PREROUTING -p tcp -m tcp --dport 9999 -j RETURN".to_string(),
            &"ip6 -A OUTPUT -p tcp -m tcp --dport 9999 -j RETURN".to_string()
        ],
        "the foreign rules are intact and the writer's own are gone"
    );
}

/// A netlink writer that inserts and deletes a foreign rule in a tight loop, far faster
/// than the iptables binary: the ruleset generation changes every few microseconds.
fn hammer(ns: &Netns, stop: &AtomicBool) -> u64 {
    ns.enter(|| {
        let mut conn = Conn::open().unwrap();
        let rule = Redirect::new(1234, 1235, "foreign writer").unwrap();
        let mut setup = Batch::new(None);
        setup.push(switcheroo_sys::Op::AddTable(Family::Ipv4));
        setup.push(switcheroo_sys::Op::AddChain(
            Family::Ipv4,
            Chain::Prerouting,
        ));
        conn.apply(&setup).unwrap();
        let mut ops = 0;
        while !stop.load(Ordering::Relaxed) {
            let mut insert = Batch::new(None);
            insert.insert_rule(Family::Ipv4, Chain::Prerouting, rule.clone());
            let handle = conn.apply(&insert).unwrap().inserted[0].handle;
            let mut delete = Batch::new(None);
            delete.delete_rule(Family::Ipv4, Chain::Prerouting, handle);
            conn.apply(&delete).unwrap();
            ops += 2;
        }
        ops
    })
}

fn rand_us(max: u64) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        % max
}

/// Deletes every rule of namespace `victim` as soon as it sees one, by handle, from a
/// dump of its own: a writer that makes the handles a commit read vanish.
fn thief(ns: &Netns, stop: &AtomicBool) -> u64 {
    ns.enter(|| {
        let mut conn = Conn::open().unwrap();
        let mut stolen = 0;
        while !stop.load(Ordering::Relaxed) {
            for family in Family::ALL {
                for chain in Chain::ALL {
                    // A dump interrupted by a concurrent change is simply retried.
                    for rule in conn.list_rules(family, chain).unwrap_or_default() {
                        if rule
                            .redirect
                            .is_some_and(|r| r.comment.contains("ns=victim:"))
                        {
                            let mut b = Batch::new(None);
                            b.delete_rule(family, chain, rule.handle);
                            if conn.apply(&b).is_ok() {
                                stolen += 1;
                            }
                        }
                    }
                }
            }
        }
        stolen
    })
}

#[test]
fn a_busy_foreign_netlink_writer_cannot_starve_the_switch() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    // The first deploy of a namespace creates the nat chains; that batch is bound to the
    // ruleset generation and could be starved by a writer this fast, so it runs first.
    let _first = ns.hello(&["--namespace", "busy"]);
    let stop = AtomicBool::new(false);
    let (attempts, ops) = std::thread::scope(|s| {
        let writer = s.spawn(|| hammer(&ns, &stop));
        let _stop = common::StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(50));
        let attempts: Vec<u32> = ns.enter(|| {
            let sw = Switcheroo::builder("busy", 8080).build().unwrap();
            let mut listeners = Vec::new();
            (0..15)
                .map(|_| {
                    let (l, t) = sw.begin().unwrap();
                    listeners.push(l);
                    std::thread::sleep(Duration::from_millis(50));
                    t.commit().unwrap().attempts
                })
                .collect()
        });
        stop.store(true, Ordering::Relaxed);
        (attempts, writer.join().unwrap())
    });
    eprintln!("attempts per commit: {attempts:?}; foreign operations meanwhile: {ops}");
    assert!(ops > 10, "the foreign writer ran ({ops} operations)");
    let rules = ours(&ns);
    assert_eq!(rules.len(), 4, "{rules:?}");
    assert!(ns
        .rule_lines()
        .iter()
        .all(|l| !l.contains("foreign writer")));
}

#[test]
fn commits_get_through_while_another_writer_deletes_their_rules() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let _first = ns.hello(&["--namespace", "victim"]);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let t = s.spawn(|| thief(&ns, &stop));
        let _stop = common::StopOnDrop(&stop);
        let total: u32 = ns.enter(|| {
            let sw = Switcheroo::builder("victim", 8080).build().unwrap();
            let mut listeners = Vec::new();
            (0..20)
                .map(|_| {
                    let (l, t) = sw.begin().unwrap();
                    listeners.push(l);
                    std::thread::sleep(Duration::from_micros(rand_us(20_000)));
                    t.commit().unwrap().attempts
                })
                .sum()
        });
        stop.store(true, Ordering::Relaxed);
        let stolen = t.join().unwrap();
        eprintln!("20 commits took {total} attempts; the thief deleted {stolen} rules");
        assert!(stolen > 0, "the thief ran");
    });
}

#[test]
fn a_batch_whose_handle_vanished_applies_nothing() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let h = ns.hello(&[]);
    let before = ns.rule_lines();
    let err = ns.enter(|| {
        let mut conn = Conn::open().unwrap();
        let live = conn.list_rules(Family::Ipv4, Chain::Output).unwrap();
        let gone = stale_handle(&mut conn);
        // Insert a new rule and delete a live one, plus one handle that no longer exists:
        // the kernel must refuse the whole batch.
        let mut batch = Batch::new(None);
        batch.insert_rule(
            Family::Ipv4,
            Chain::Output,
            Redirect::new(8080, 40999, "SWITCHEROO:ns=hello:port=40999:pid=1:start=1").unwrap(),
        );
        batch.delete_rule(Family::Ipv4, Chain::Output, live[0].handle);
        batch.delete_rule(Family::Ipv4, Chain::Output, gone);
        conn.apply(&batch).unwrap_err()
    });
    assert!(err.is_conflict(), "{err}");
    assert!(err.to_string().contains("nothing was applied"), "{err}");
    assert_eq!(ns.rule_lines(), before, "the batch left no trace");
    let body = ns
        .enter(|| get("127.0.0.1:8080".parse().unwrap(), "/"))
        .unwrap()
        .1;
    assert_eq!(pid_of(&body), h.pid);
}

/// The handle of a rule that existed: one is inserted and deleted, and the handle the
/// kernel gave it is kept (handles are never reused, so it names nothing now).
fn stale_handle(conn: &mut Conn) -> switcheroo_sys::Handle {
    let mut b = Batch::new(None);
    b.insert_rule(
        Family::Ipv4,
        Chain::Output,
        Redirect::new(1, 2, "short-lived").unwrap(),
    );
    let handle = conn.apply(&b).unwrap().inserted[0].handle;
    let mut d = Batch::new(None);
    d.delete_rule(Family::Ipv4, Chain::Output, handle);
    conn.apply(&d).unwrap();
    handle
}

#[test]
fn a_reused_pid_is_never_signalled_and_go_format_rules_are_replaced() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    // Two bystanders whose pids appear in stale rules.
    let mut reused = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sleep", "60"])
        .spawn()
        .unwrap();
    let mut go_owner = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sleep", "60"])
        .spawn()
        .unwrap();
    // A rule in our encoding naming the bystander's pid with another start time: the pid
    // "was reused" since the rule was written.
    ns.run(&format!(
        "iptables-nft -t nat -I OUTPUT -p tcp -m tcp --dport 8080 -m addrtype --dst-type LOCAL -m comment --comment SWITCHEROO:ns=hello:port=40450:pid={}:start=1 -j REDIRECT --to-ports 40450",
        reused.id()
    ));
    // A rule as the Go original wrote it: no addrtype, no start time.
    ns.run(&format!(
        "iptables-nft -t nat -I PREROUTING -p tcp --dport 8080 -m comment --comment SWITCHEROO:ns=hello:port=40451:pid={} -j REDIRECT --to-ports 40451",
        go_owner.id()
    ));
    let stale = ns.enter(|| {
        Switcheroo::builder("hello", 8080)
            .build()
            .unwrap()
            .rules()
            .unwrap()
    });
    assert_eq!(
        stale.len(),
        2,
        "both count as this namespace's rules: {stale:?}"
    );
    assert!(stale.iter().all(|r| !r.alive || r.start.is_none()));

    let h = ns.hello(&[]);
    let rules = ours(&ns);
    assert_eq!(rules.len(), 4, "the stale rules were replaced: {rules:?}");
    assert!(rules.iter().all(|l| l.contains(&format!("pid={}:", h.pid))));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        reused.try_wait().unwrap().is_none(),
        "the process holding a reused pid was left alone"
    );
    assert!(
        go_owner.try_wait().unwrap().is_none(),
        "a rule without start time never gets its pid signalled"
    );
    let _ = reused.kill();
    let _ = go_owner.kill();
    let _ = (reused.wait(), go_owner.wait());
}

#[test]
fn a_crash_before_commit_leaves_nothing_and_after_commit_is_replaced() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let first = ns.hello(&[]);
    let before = ns.rule_lines();

    // Killed between begin and commit: the ruleset is as it was.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(common::example("hello"))
        .args(["--hold-ms", "60000"])
        .stderr(std::process::Stdio::piped());
    let mut held = cmd.spawn().unwrap();
    let mut stderr = std::io::BufReader::new(held.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.starts_with("bound port="), "{line}");
    held.kill().unwrap();
    held.wait().unwrap();
    assert_eq!(ns.rule_lines(), before);
    assert!(alive(first.pid));

    // Killed after its commit: its rules stay, reported dead, and the next deploy replaces them.
    let mut second = ns.hello(&[]);
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    let rules = ns.enter(|| {
        Switcheroo::builder("hello", 8080)
            .build()
            .unwrap()
            .rules()
            .unwrap()
    });
    assert_eq!(rules.len(), 4);
    assert!(
        rules.iter().all(|r| r.pid == Some(second.pid) && !r.alive),
        "{rules:?}"
    );
    let third = ns.hello(&[]);
    let lines = ours(&ns);
    assert_eq!(lines.len(), 4);
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&format!("pid={}:", third.pid))),
        "{lines:?}"
    );
}

fn ruleset(ns: &Netns) -> String {
    ns.ok(&["nft", "list", "ruleset"])
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let _running = ns.hello(&[]);
    // Both ports of a small range held by someone else.
    let holders =
        ns.enter(|| [41000u16, 41001].map(|p| std::net::TcpListener::bind(("::", p)).unwrap()));
    let before = ruleset(&ns);
    let cases: [(&[&str], &str); 6] = [
        (&["--namespace", "bad:name"], "invalid namespace"),
        (&["--namespace", &"x".repeat(65)], "invalid namespace"),
        (&["--port", "0"], "invalid public port 0"),
        (&["--range", "40499-40400"], "reversed"),
        (&["--range", "0-100"], "port 0"),
        (&["--port", "40450"], "lies inside the internal port range"),
    ];
    for (args, expect) in cases
        .iter()
        .copied()
        .chain([(&["--range", "41000-41001"][..], "no free port")])
    {
        let mut full = vec![common::example("hello").to_string_lossy().into_owned()];
        full.extend(args.iter().map(|a| a.to_string()));
        let out = ns.exec(&full.iter().map(String::as_str).collect::<Vec<_>>());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expect),
            "{args:?}: {stderr}"
        );
        assert_eq!(ruleset(&ns), before, "{args:?} changed the ruleset");
    }
    drop(holders);
}

#[test]
fn without_cap_net_admin_nothing_changes_and_the_error_says_why() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let _running = ns.hello(&[]);
    let before = ruleset(&ns);
    let out = ns.exec(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        common::example("hello").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
    assert_eq!(ruleset(&ns), before);
}

#[test]
fn a_non_root_user_with_only_net_admin_and_kill_can_deploy() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut root_owned = ns.hello(&[]);
    let caps: &[&str] = &[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all,+net_admin,+kill",
        "--ambient-caps=-all,+net_admin,+kill",
    ];
    let mut first = ns.hello_with(caps, &[]);
    // It replaced (and could signal) an instance of another user, root.
    assert!(root_owned
        .wait_exit(Duration::from_secs(15))
        .expect("root-owned instance exits")
        .success());
    let second = ns.hello_with(caps, &[]);
    assert!(first
        .wait_exit(Duration::from_secs(15))
        .expect("first exits")
        .success());
    let body = ns
        .enter(|| get("127.0.0.1:8080".parse().unwrap(), "/"))
        .unwrap()
        .1;
    assert_eq!(pid_of(&body), second.pid);
    let status = std::fs::read_to_string(format!("/proc/{}/status", second.pid)).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "runs as nobody"
    );
}

/// The one record a commit left in `dir` for namespace `namespace`
/// (`<boot id>-<netns cookie>-<namespace>`).
fn record_path(dir: &std::path::Path, namespace: &str) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(dir)
        .expect("the record directory exists")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&format!("-{namespace}")))
        })
        .collect();
    assert_eq!(found.len(), 1, "one record: {found:?}");
    found[0].clone()
}

/// `nft -a` handles of the rules in `family nat chain` whose line contains `needle`.
fn handles(ns: &Netns, family: &str, chain: &str, needle: &str) -> Vec<u64> {
    ns.ok(&["nft", "-a", "list", "chain", family, "nat", chain])
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.rsplit_once("# handle ")?.1.trim().parse().ok())
        .collect()
}

#[test]
fn a_forged_commit_record_cannot_make_a_deploy_touch_foreign_rules() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    ns.run("iptables-nft -t nat -I PREROUTING -p tcp --dport 7777 -j RETURN");
    let dir = common::TempPath::new(&ns, "records");
    let mut a = ns.hello(&["--record-dir", dir.as_str()]);
    let path = record_path(&dir.0, "hello");
    let text = std::fs::read_to_string(&path).expect("the commit left a record");
    let recorded: Vec<&str> = text.lines().filter(|l| l.starts_with("rule ")).collect();
    let mut expected: Vec<String> = Vec::new();
    for (family, chain) in [
        ("ip", "PREROUTING"),
        ("ip", "OUTPUT"),
        ("ip6", "PREROUTING"),
        ("ip6", "OUTPUT"),
    ] {
        for h in handles(&ns, family, chain, &format!("redirect to :{} ", a.port)) {
            expected.push(format!("rule {family} {chain} {h}"));
        }
    }
    assert_eq!(recorded, expected, "the record names exactly A's rules");

    // Point the record's IPv4 PREROUTING entry at the foreign rule, generation unchanged.
    let foreign = handles(&ns, "ip", "PREROUTING", "dport 7777");
    assert_eq!(foreign.len(), 1);
    let forged: String = text
        .lines()
        .map(|l| match l.starts_with("rule ip PREROUTING ") {
            true => format!("rule ip PREROUTING {}\n", foreign[0]),
            false => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&path, forged).unwrap();

    let b = ns.hello(&["--record-dir", dir.as_str()]);
    a.expect_clean_exit("A, replaced despite the forged record");
    assert_eq!(
        handles(&ns, "ip", "PREROUTING", "dport 7777"),
        foreign,
        "foreign rule intact"
    );
    let rules = ours(&ns);
    assert_eq!(rules.len(), 4, "{rules:?}");
    assert!(
        rules.iter().all(|l| l.contains(&format!("pid={}:", b.pid))),
        "{rules:?}"
    );
}
