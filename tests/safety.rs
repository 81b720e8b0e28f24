//! Safety under concurrent deploys, foreign writers, PID reuse, crashes, bad input and
//! missing privileges; each test in its own throwaway network namespace.

use lab::{get, pid_of, require_root, Netns};
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
    let racers: Vec<lab::Hello> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| ns.hello(&[]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Every racer but the last to commit, and the first instance, are told to leave; give
    // them time to drain.
    let deadline = Instant::now() + Duration::from_secs(20);
    let survivors = loop {
        let s: Vec<u32> = racers.iter().map(|h| h.pid).filter(|p| alive(*p)).collect();
        if (s.len() <= 1 && !alive(first.pid)) || Instant::now() > deadline {
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
        let _stop = lab::StopOnDrop(&stop);
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
        let _stop = lab::StopOnDrop(&stop);
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
        let _stop = lab::StopOnDrop(&stop);
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
    let mut first = ns.hello(&[]);
    let before = ns.rule_lines();

    // Killed between begin and commit: the ruleset is as it was.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(lab::example("hello"))
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

    // Killed after its commit: its rules stay, reported dead, and the next deploy replaces
    // them. (The first instance has left by then: as it leaves, its own transaction
    // would remove the rules of a dead owner too, as every transaction does.)
    let mut second = ns.hello(&[]);
    first.expect_clean_exit("the first instance, replaced by the second");
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
        rules.iter().all(|r| r.pid == second.pid && !r.alive),
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
        let mut full = vec![lab::example("hello").to_string_lossy().into_owned()];
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
        lab::example("hello").to_str().unwrap(),
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
    let dir = lab::TempPath::new(&ns, "records");
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
    // Forged well: the checksum on the `end` line (FNV-1a of the lines before it) is
    // recomputed, so only the check of each recorded handle against the kernel remains.
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("end "))
        .map(|l| match l.starts_with("rule ip PREROUTING ") {
            true => format!("rule ip PREROUTING {}\n", foreign[0]),
            false => format!("{l}\n"),
        })
        .collect();
    let sum = body.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    std::fs::write(&path, format!("{body}end {sum:016x}\n")).unwrap();

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

/// `lock_wait=<µs>` and `attempts=<n>` from hello's `switched` line.
fn switch_figures(h: &mut lab::Hello) -> (u64, u32) {
    let line = h.line("switched");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(|v| v.trim_end_matches("us").to_owned())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    (
        field("lock_wait=").parse().unwrap(),
        field("attempts=").parse().unwrap(),
    )
}

const NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
];

/// As `nobody`, in the service's network namespace: holds the abstract socket name the
/// old lock used, and tries without pause to create (or delete) the lock table, with
/// and without the owner flag. Prints how many tries it made and how they ended.
const ATTACKER: &str = r#"
import socket, subprocess, sys, time
held = socket.socket(socket.AF_UNIX)
held.bind("\0switcheroo/hello")
held.listen(1)
tries, refused = 0, 0
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for cmd in (["nft", "add table inet switcheroo-lock-hello { flags owner; }"],
                ["nft", "add table inet switcheroo-lock-hello"],
                ["nft", "delete table inet switcheroo-lock-hello"]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        tries += 1
        refused += out.returncode != 0 and "Operation not permitted" in out.stderr
print(f"attacker tries={tries} refused={refused}", flush=True)
"#;

#[test]
fn an_unprivileged_user_cannot_hold_or_slow_the_commit_lock() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let _first = ns.hello(&[]);
    // The system's python: nobody cannot reach a python under root's home (pyenv).
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists() || !p.starts_with('/'))
        .unwrap();
    let attacker = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(NOBODY)
        .args([python, "-c", ATTACKER, "6"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut figures = Vec::new();
    for _ in 0..5 {
        let mut h = ns.hello(&[]);
        figures.push(switch_figures(&mut h));
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = attacker.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}(lock_wait µs, attempts) per deploy: {figures:?}");
    let field = |name: &str| -> u64 {
        report
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.parse().ok())
            .unwrap_or_else(|| panic!("attacker said {report:?} {:?}", out.stderr))
    };
    assert!(field("tries=") > 10, "the attacker ran: {report}");
    assert_eq!(field("tries="), field("refused="), "every try was refused");
    // Every deploy found the lock free at once: nobody unprivileged held it.
    assert!(figures.iter().all(|(wait, _)| *wait == 0), "{figures:?}");
    let tables = ns.ok(&["nft", "list", "tables"]);
    assert!(!tables.contains("switcheroo-lock"), "released: {tables}");
    assert_eq!(ours(&ns).len(), 4);
}

#[test]
fn two_privileged_deployers_take_turns_on_the_lock() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let first = ns.hello(&[]);
    let before = ns.rule_lines();
    // Another privileged deployer holds the namespace's lock: its socket owns the table.
    let lock = ns.hold_lock("hello");
    // The second deployer has begun (its "bound" line comes right before its commit) and
    // is then waiting for the lock.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(lab::example("hello"))
        .args(["--hold-ms", "0"]);
    let mut second = lab::Hello::start_with(cmd, "bound line", |line| {
        let port = line.strip_prefix("bound port=")?.split(';').next()?;
        Some((0, port.parse().ok()?))
    });
    // `ip netns exec` execs hello: the child is hello.
    second.pid = second.child.id();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ns.rule_lines(),
        before,
        "nothing switched while the lock was held"
    );
    assert!(alive(first.pid));
    drop(lock);
    let (wait, _) = switch_figures(&mut second);
    assert!(wait > 0, "the second deployer waited for the first");
    let rules = ours(&ns);
    assert_eq!(rules.len(), 4, "{rules:?}");
    assert!(rules
        .iter()
        .all(|l| l.contains(&format!("pid={}:", second.pid))));
}

/// `(generation, [(family, chain, handle)])` of a record file.
fn read_record(path: &std::path::Path) -> (u32, Vec<(String, String, u64)>) {
    let text = std::fs::read_to_string(path).unwrap();
    let generation = text
        .lines()
        .find_map(|l| l.strip_prefix("generation "))
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {text:?}"));
    let rules = text
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("rule ")?.split(' ');
            Some((
                w.next()?.to_owned(),
                w.next()?.to_owned(),
                w.next()?.parse().ok()?,
            ))
        })
        .collect();
    (generation, rules)
}

#[test]
fn a_record_of_a_deleted_namespace_never_hides_a_rule_of_a_new_one() {
    if !require_root() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let ns1 = Netns::new();
    let dir = lab::TempPath::new(&ns1, "records");
    let inode = |ns: &Netns| {
        std::fs::metadata(format!("/run/netns/{}", ns.name))
            .unwrap()
            .ino()
    };
    let ino1 = inode(&ns1);
    let old = ns1.hello(&["--record-dir", dir.as_str()]);
    let (pid, port, start) = (old.pid, old.port, lab::start_time(old.pid));
    let (generation, recorded) = read_record(&record_path(&dir.0, "hello"));
    assert_eq!(recorded.len(), 4, "{recorded:?}");
    drop(old);
    drop(ns1);

    // A new namespace, most likely with the dead one's inode, crafted to the record's
    // generation and handles (the same operations as hello's first commit, batch for
    // batch), plus one more rule of namespace `hello` at the head of ip PREROUTING.
    let ns2 = Netns::new();
    eprintln!(
        "the new namespace reuses the inode: {}",
        inode(&ns2) == ino1
    );
    ns2.enter(|| {
        use switcheroo_sys::{Op, OwnedTable};
        let mut conn = Conn::open().unwrap();
        let lock = || OwnedTable::new("switcheroo-lock-hello").unwrap();
        // hello's first commit is one batch that takes the lock and releases it.
        let mut b = Batch::new(None);
        b.push(Op::AddOwnedTable(lock()));
        let comment = format!("SWITCHEROO:ns=hello:port={port}:pid={pid}:start={start}");
        let same = Redirect::new(8080, port, &comment).unwrap();
        for family in Family::ALL {
            b.push(Op::AddTable(family));
            for chain in Chain::ALL {
                b.push(Op::AddChain(family, chain));
                b.insert_rule(family, chain, same.clone());
            }
        }
        let extra = "SWITCHEROO:ns=hello:port=40499:pid=1:start=1";
        b.insert_rule(
            Family::Ipv4,
            Chain::Prerouting,
            Redirect::new(8080, 40499, extra).unwrap(),
        );
        b.push(Op::DeleteOwnedTable(lock()));
        conn.apply(&b).unwrap();
        while conn.generation().unwrap() < generation {
            let mut bump = Batch::new(None);
            bump.push(Op::AddOwnedTable(OwnedTable::new("bump").unwrap()));
            bump.push(Op::DeleteOwnedTable(OwnedTable::new("bump").unwrap()));
            conn.apply(&bump).unwrap();
        }
        assert_eq!(conn.generation().unwrap(), generation, "crafted generation");
        for (family, chain, handle) in &recorded {
            let family = if family == "ip" {
                Family::Ipv4
            } else {
                Family::Ipv6
            };
            let chain = Chain::from_name(chain).unwrap();
            let rule = conn.get_rule(family, chain, *handle).unwrap();
            assert!(
                rule.is_some_and(|r| r.redirect.is_some_and(|r| r.comment == comment)),
                "crafted handle {family} {chain} {handle}"
            );
        }
    });
    let lines = ours(&ns2);
    assert_eq!(lines.len(), 5, "the record's four and one more: {lines:?}");

    let new = ns2.hello(&["--record-dir", dir.as_str()]);
    let lines = ours(&ns2);
    assert_eq!(lines.len(), 4, "every older rule replaced: {lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&format!("pid={}:", new.pid))),
        "{lines:?}"
    );
}

/// Deletes both nat tables, as `nft flush ruleset` would; counts each deletion.
fn flush_nat(conn: &mut Conn, deletions: &AtomicU64) {
    for family in Family::ALL {
        let mut b = Batch::new(None);
        b.push(switcheroo_sys::Op::DeleteTable(family));
        if conn.apply(&b).is_ok() {
            deletions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn tables_deleted_under_a_commit_mean_retries_never_unsupported() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let stop = AtomicBool::new(false);
    let deletions = AtomicU64::new(0);
    let mut retried = 0;
    let mut commits = 0;
    let mut attempts_seen = Vec::new();
    std::thread::scope(|s| {
        // Racing writers delete both nat tables, chains and rules and all, as `nft flush
        // ruleset` would. One every millisecond or so: a commit's first attempt, bound to
        // the generation of its read, then meets a changed ruleset and takes the lock the
        // long way. The other the moment a commit takes its lock (the kernel announces the
        // lock table): between that attempt's read and its batch, or during the read.
        let churner = s.spawn(|| {
            ns.enter(|| {
                let mut conn = Conn::open().unwrap();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_micros(
                        500 + (deletions.load(Ordering::Relaxed) % 7) * 150,
                    ));
                    flush_nat(&mut conn, &deletions);
                }
            })
        });
        let watcher = s.spawn(|| {
            ns.enter(|| {
                let mut monitor = switcheroo_sys::monitor::Monitor::open().unwrap();
                let mut conn = Conn::open().unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let event = monitor.next(Some(Duration::from_millis(50))).unwrap();
                    if let Some(switcheroo_sys::monitor::Notification::NewTable(_, name)) = event {
                        if name == "switcheroo-lock-flushed" {
                            flush_nat(&mut conn, &deletions);
                        }
                    }
                }
            })
        });
        let _stop = lab::StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(100));
        ns.enter(|| {
            let sw = Switcheroo::builder("flushed", 8080).build().unwrap();
            let mut listeners = Vec::new();
            while commits < 200 && retried < 5 {
                let (l, t) = sw.begin().unwrap();
                listeners.push(l);
                if listeners.len() > 50 {
                    listeners.remove(0);
                }
                commits += 1;
                match t.commit() {
                    Ok(report) => {
                        attempts_seen.push(report.attempts);
                        if report.attempts > 1 {
                            retried += 1;
                        }
                    }
                    Err(switcheroo::Error::Conflict { attempts, .. }) => {
                        // Possible in principle; its count must be the real one.
                        assert_eq!(attempts, sw.max_attempts(), "the real count");
                    }
                    Err(e) => panic!("commit {commits}: {e}"),
                }
            }
        });
        stop.store(true, Ordering::Relaxed);
        watcher.join().unwrap();
        churner.join().unwrap();
    });
    eprintln!(
        "{commits} commits, {} table deletions under them, attempts per commit: {attempts_seen:?}",
        deletions.load(Ordering::Relaxed)
    );
    assert!(
        retried > 0,
        "the deletions raced the commits: {attempts_seen:?}"
    );
    // With the writer stopped, a commit lands as usual and leaves exactly its rules.
    let port = ns.enter(|| {
        let sw = Switcheroo::builder("flushed", 8080).build().unwrap();
        let (_l, t) = sw.begin().unwrap();
        let port = t.port();
        assert_eq!(t.commit().unwrap().attempts, 1);
        port
    });
    let lines = ours(&ns);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines.iter().all(|l| l.contains(&format!("port={port}:"))));
}
