//! When a release is bad: probation, rollback, promotion and canaries, with `hello`
//! instances as real processes under load (a new connection per request and keep-alive,
//! IPv4 and IPv6), each test in its own network namespace.

use lab::{require_root, Hello, Netns};
use std::time::{Duration, Instant};
use switcheroo::{Role, Rule, Switcheroo};

fn start_load(ns: &Netns) -> Vec<lab::load::Load> {
    ns.enter(lab::load::timeline_on_both_loopbacks)
}

fn stop_load(loads: Vec<lab::load::Load>) -> Vec<lab::load::Sample> {
    lab::load::stop_all(loads)
}

fn failures(samples: &[lab::load::Sample]) -> Vec<&lab::load::Sample> {
    samples.iter().filter(|s| s.result.is_err()).collect()
}

/// The namespace's rules through the library, from inside `ns`.
fn rules(ns: &Netns, namespace: &str) -> Vec<Rule> {
    ns.enter(|| {
        Switcheroo::builder(namespace, 8080)
            .build()
            .unwrap()
            .rules()
            .unwrap()
    })
}

/// (pid, role) of every rule, `dead` folded into the role name.
fn roles(rules: &[Rule]) -> Vec<(u32, String)> {
    rules.iter().map(|r| (r.pid, r.role_name())).collect()
}

/// SIGKILLs `pid` and waits until it has died (a zombie: the test, its parent, reaps it
/// later). A process with threads takes a moment to die after the signal is sent.
fn kill9(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let dead = lab::wait_until(
        Duration::from_secs(10),
        Duration::from_millis(5),
        || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.contains(") Z "))
        },
        |dead| *dead,
    );
    assert!(dead, "pid {pid} survived SIGKILL");
}

fn sigterm(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

#[test]
fn the_new_instance_killed_during_its_probation_hands_back_to_the_old_one() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut old = ns.hello(&[]);
    let loads = start_load(&ns);
    std::thread::sleep(Duration::from_millis(300));
    let new = ns.hello(&["--probation", "60s"]);
    old.line("place below pid=");
    assert_eq!(
        roles(&rules(&ns, "hello"))[..2],
        [
            (new.pid, "active".to_owned()),
            (old.pid, "standby".to_owned())
        ]
    );
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    kill9(new.pid);
    old.line("place active after=");
    let restored = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let samples = stop_load(loads);

    // A request hurt by the crash ended after it (it may have started just before).
    let during: Vec<_> = failures(&samples)
        .into_iter()
        .filter(|s| s.done >= killed)
        .collect();
    let after: Vec<_> = samples.iter().filter(|s| s.at > restored).collect();
    eprintln!(
        "{} requests; {} failed during the crash (from SIGKILL to the old instance's report, {:?}): {:?}; {} after it",
        samples.len(),
        during.len(),
        restored - killed,
        during.iter().map(|s| s.result).collect::<Vec<_>>(),
        after.len()
    );
    assert!(after.len() > 100, "the load ran after the rollback");
    for s in &after {
        assert_eq!(s.result, Ok(old.pid), "a request after the rollback: {s:?}");
    }
    let before: Vec<_> = failures(&samples)
        .into_iter()
        .filter(|s| s.done < killed)
        .collect();
    assert!(
        before.is_empty(),
        "nothing failed before the crash: {before:?}"
    );
    // Only the old instance's rules remain, as the active.
    let now = roles(&rules(&ns, "hello"));
    assert_eq!(now, vec![(old.pid, "active".to_owned()); 4]);
    assert!(
        old.wait_exit(Duration::from_millis(100)).is_none(),
        "it serves on"
    );
}

#[test]
fn a_probation_that_passes_retires_the_old_instance_and_fails_nothing() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut old = ns.hello(&[]);
    let mut kept = ns
        .enter(|| lab::KeepAlive::connect("127.0.0.1:8080".parse().unwrap()))
        .unwrap();
    let loads = start_load(&ns);
    std::thread::sleep(Duration::from_millis(300));
    let mut new = ns.hello(&["--probation", "4s"]);
    old.line("place below pid=");
    // Warm during the probation: not shutting down, so a keep-alive connection it holds
    // is served as before, without `Connection: close`.
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !old.log.iter().any(|l| l.starts_with("retiring")),
        "{:?}",
        old.log
    );
    let r = kept.get("/").unwrap();
    assert_eq!((lab::pid_of(&r.body), r.close), (old.pid, false), "{r:?}");
    new.line("probation passed retired=");
    old.expect_clean_exit("the old instance after the probation");
    std::thread::sleep(Duration::from_millis(300));
    let samples = stop_load(loads);
    let failed = failures(&samples);
    eprintln!("{} requests, {} failed", samples.len(), failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        roles(&rules(&ns, "hello")),
        vec![(new.pid, "active".to_owned()); 4]
    );
}

#[test]
fn rollback_and_promote_under_load_fail_nothing() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut a = ns.hello(&[]);
    let loads = start_load(&ns);
    std::thread::sleep(Duration::from_millis(300));

    // B on probation, then rolled back: A serves again, B retires.
    let mut b = ns.hello(&["--probation", "60s"]);
    a.line("place below pid=");
    std::thread::sleep(Duration::from_millis(300));
    let rolled = ns.enter(|| switcheroo::rollback("hello")).unwrap();
    assert_eq!((rolled.from, rolled.serving), (b.pid, Some(a.pid)));
    b.expect_clean_exit("the rolled-back instance");
    assert!(
        b.log.iter().any(|l| l.starts_with("retiring (rolled back")),
        "{:?}",
        b.log
    );
    // Nothing more to roll back to: a typed error, the ruleset unchanged.
    let before = ns.rule_lines();
    let err = ns.enter(|| switcheroo::rollback("hello")).unwrap_err();
    assert!(
        matches!(err, switcheroo::Error::NothingToRollBack { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("no live standby"), "{err}");
    assert_eq!(ns.rule_lines(), before);

    // C as a 30% canary, then promoted: it becomes the active; without a probation of
    // its own, A retires at once.
    let mut c = ns.hello(&["--canary", "30"]);
    std::thread::sleep(Duration::from_millis(500));
    let roles_now = roles(&rules(&ns, "hello"));
    assert_eq!(
        roles_now[..2],
        [
            (c.pid, "canary 30%".to_owned()),
            (a.pid, "active".to_owned())
        ]
    );
    let promoted = ns.enter(|| switcheroo::promote("hello")).unwrap();
    assert_eq!((promoted.promoted, promoted.standby), (c.pid, Some(a.pid)));
    c.line("place promoted");
    a.expect_clean_exit("the previous active after the promotion");
    std::thread::sleep(Duration::from_millis(300));
    let samples = stop_load(loads);
    let failed = failures(&samples);
    eprintln!("{} requests, {} failed", samples.len(), failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        roles(&rules(&ns, "hello")),
        vec![(c.pid, "active".to_owned()); 4]
    );
    let err = ns.enter(|| switcheroo::promote("hello")).unwrap_err();
    assert!(matches!(err, switcheroo::Error::NoCanary { .. }), "{err}");
}

#[test]
fn a_canary_of_20_percent_takes_17_to_23_percent_of_new_connections() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let active = ns.hello(&[]);
    let canary = ns.hello(&["--canary", "20"]);
    let loads = ns.enter(|| {
        ["127.0.0.1:8080", "[::1]:8080"]
            .iter()
            .map(|t| {
                let mut plan = lab::load::Plan::new(t.parse().unwrap());
                plan.close_clients = 2;
                plan.keepalive_clients = 0;
                plan.timeline = true;
                lab::load::Load::start(&plan)
            })
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while loads.iter().map(|l| l.stats.ok()).sum::<u64>() < 4000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let samples = stop_load(loads);
    let fresh: Vec<_> = samples
        .iter()
        .filter(|s| s.new_connection)
        .take(4000)
        .collect();
    assert_eq!(fresh.len(), 4000, "4,000 new connections");
    // iptables-nft reads the canary's rule as an ordinary rule.
    let lines = ns.rule_lines();
    let statistic = lines
        .iter()
        .filter(|l| {
            l.contains("-m statistic --mode random --probability 0.20000000019 -m comment")
                && l.contains(&format!("pid={}:", canary.pid))
        })
        .count();
    assert_eq!(statistic, 4, "{lines:#?}");
    let to_canary = fresh.iter().filter(|s| s.result == Ok(canary.pid)).count();
    let to_active = fresh.iter().filter(|s| s.result == Ok(active.pid)).count();
    let share = to_canary as f64 / 4000.0 * 100.0;
    eprintln!("canary 20%: {to_canary} of 4,000 new connections ({share:.1}%), active {to_active}");
    assert_eq!(to_canary + to_active, 4000, "every connection answered");
    assert!((17.0..=23.0).contains(&share), "{share:.1}%");
}

#[test]
fn eight_concurrent_deploys_with_probation_leave_one_active_and_one_standby() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let first = ns.hello(&[]);
    let racers: Vec<Hello> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| ns.hello(&["--probation", "60s"])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<Hello> = racers;
    all.push(first);
    // Every instance that was neither kept as the active nor as the standby is told to go.
    let deadline = Instant::now() + Duration::from_secs(20);
    let alive = |h: &Hello| {
        std::fs::read_to_string(format!("/proc/{}/stat", h.pid)).is_ok_and(|s| !s.contains(") Z "))
    };
    while all.iter().filter(|h| alive(h)).count() > 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let rules = rules(&ns, "hello");
    for (family, chain) in [
        (switcheroo::Family::Ipv4, switcheroo::Chain::Prerouting),
        (switcheroo::Family::Ipv4, switcheroo::Chain::Output),
        (switcheroo::Family::Ipv6, switcheroo::Chain::Prerouting),
        (switcheroo::Family::Ipv6, switcheroo::Chain::Output),
    ] {
        let here: Vec<&Rule> = rules
            .iter()
            .filter(|r| (r.family, r.chain) == (family, chain))
            .collect();
        let count = |role| here.iter().filter(|r| r.role == role).count();
        assert_eq!(count(Role::Active), 1, "{family} {chain}: {here:#?}");
        assert!(count(Role::Standby) <= 1, "{family} {chain}: {here:#?}");
        assert_eq!(here.len(), count(Role::Active) + count(Role::Standby));
        assert!(here.iter().all(|r| r.alive));
    }
    let owners: std::collections::BTreeSet<u32> = rules.iter().map(|r| r.pid).collect();
    let running: std::collections::BTreeSet<u32> =
        all.iter().filter(|h| alive(h)).map(|h| h.pid).collect();
    assert_eq!(
        owners, running,
        "the rules' owners are exactly the instances still running"
    );
    assert!((1..=2).contains(&running.len()), "{running:?}");
}

#[test]
fn a_killed_standby_leaves_dead_rules_that_the_next_transaction_removes() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    // A, then B on probation (A the standby), then a 10% canary C above B.
    let a = ns.hello(&[]);
    let b = ns.hello(&["--probation", "60s"]);
    let mut c = ns.hello(&["--canary", "10"]);
    assert_eq!(
        roles(&rules(&ns, "hello"))[..3],
        [
            (c.pid, "canary 10%".to_owned()),
            (b.pid, "active".to_owned()),
            (a.pid, "standby".to_owned())
        ]
    );
    // The standby is SIGKILLed: its rules stay, dead.
    kill9(a.pid);
    assert_eq!(
        roles(&rules(&ns, "hello"))[..3],
        [
            (c.pid, "canary 10%".to_owned()),
            (b.pid, "active".to_owned()),
            (a.pid, "dead".to_owned())
        ]
    );
    // A rollback removes the canary, and A's dead rules with it.
    let rolled = ns.enter(|| switcheroo::rollback("hello")).unwrap();
    assert_eq!((rolled.from, rolled.serving), (c.pid, Some(b.pid)));
    assert_eq!(
        rolled.removed.len(),
        8,
        "the canary's 4 and A's 4 dead rules"
    );
    assert_eq!(
        roles(&rules(&ns, "hello")),
        vec![(b.pid, "active".to_owned()); 4]
    );
    // The rolled-back canary leaves (SIGTERM); as it leaves, its own transaction would
    // remove the rules of a dead owner too, as every transaction does.
    c.expect_clean_exit("the rolled-back canary");
    // D on probation over B, B killed as the standby: the next deploy removes its rules.
    let d = ns.hello(&["--probation", "60s"]);
    kill9(b.pid);
    assert!(rules(&ns, "hello")
        .iter()
        .any(|r| r.pid == b.pid && !r.alive));
    // A rollback has nothing live to go back to and changes nothing...
    let before = ns.rule_lines();
    let err = ns.enter(|| switcheroo::rollback("hello")).unwrap_err();
    assert!(err.to_string().contains("no live standby"), "{err}");
    assert_eq!(ns.rule_lines(), before);
    // ... and a plain deploy leaves only its own rules.
    let e = ns.hello(&[]);
    assert_eq!(
        roles(&rules(&ns, "hello")),
        vec![(e.pid, "active".to_owned()); 4]
    );
    drop(d);
}

#[test]
fn an_operator_stopping_the_active_during_probation_hands_over_at_once() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut old = ns.hello(&[]);
    let loads = start_load(&ns);
    std::thread::sleep(Duration::from_millis(300));
    let mut new = ns.hello(&["--probation", "60s"]);
    old.line("place below pid=");
    std::thread::sleep(Duration::from_millis(300));
    sigterm(new.pid);
    new.line("retiring (signal 15, left the chain)");
    old.line("place active after=");
    new.expect_clean_exit("the stopped active");
    std::thread::sleep(Duration::from_millis(500));
    let samples = stop_load(loads);
    let failed = failures(&samples);
    eprintln!("{} requests, {} failed", samples.len(), failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        roles(&rules(&ns, "hello")),
        vec![(old.pid, "active".to_owned()); 4]
    );
    assert!(
        old.wait_exit(Duration::from_millis(100)).is_none(),
        "it serves on"
    );
}
