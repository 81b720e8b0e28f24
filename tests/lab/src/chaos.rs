//! Chaos: deploys of `hello` through the library (namespace `lib`, port 8080) and under
//! `switcheroo run` (namespace `wrap`, port 8081), with SIGKILLs at random moments to the
//! deploying process, the old instance, the wrapper and its server, while iptables-nft
//! churns the same chains and clients load both ports. After every step the invariants of
//! DESIGN.md are checked from the ruleset; at the end, one clean deploy of each kind must
//! leave no rule of a dead owner, no zombie, no stray process, and answer.
//!
//! Shared by `tests/chaos.rs` (about a minute) and `benches/chaos.rs` (longer).

use crate::load;
use crate::{example, get, pid_of, Hello, Netns};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub steps: usize,
    pub deploys: usize,
    pub kills: usize,
    /// Kills by target: deployer (library), old instance (library), new wrapper, wrapper,
    /// server under a wrapper.
    pub kills_by: [usize; 5],
    pub requests: u64,
    pub failed: u64,
    pub churn: usize,
    /// Steps (per port) whose port had a live instance before and after them, and the
    /// requests to that port that failed during those steps: what the deploys and the
    /// kills of processes that were not serving cost.
    pub served_steps: usize,
    pub failed_while_served: u64,
    /// Those failures by the step's kind (library deploy, killed library deployer, killed
    /// serving library instance, wrapped deploy, killed serving wrapper, killed server).
    pub served_failures_by_step: [u64; 7],
    /// Invariant violations seen (each a description); must stay empty.
    pub violations: Vec<String>,
}

/// Whether `namespace`'s rules lead to a live instance.
fn served(ns: &Netns, namespace: &str) -> bool {
    let rules = our_rules(ns);
    let mine: Vec<_> = rules.iter().filter(|r| r.namespace == namespace).collect();
    !mine.is_empty() && mine.iter().all(|r| r.alive)
}

/// Our rules in `ns`, from the library (namespace, family, chain, alive, pid).
fn our_rules(ns: &Netns) -> Vec<switcheroo::Rule> {
    ns.enter(|| switcheroo::all_rules().expect("read the rules"))
}

/// The invariants that hold whatever was killed when: at most one rule per (family,
/// chain, namespace) (no probation or canary here), one owner per namespace across its
/// chains, and iptables-nft can still read the table.
fn check_invariants(ns: &Netns, step: usize, violations: &mut Vec<String>) {
    let rules = our_rules(ns);
    for namespace in ["lib", "wrap"] {
        let mine: Vec<&switcheroo::Rule> =
            rules.iter().filter(|r| r.namespace == namespace).collect();
        let mut places: Vec<(String, String)> = mine
            .iter()
            .map(|r| (r.family.to_string(), r.chain.to_string()))
            .collect();
        let n = places.len();
        places.sort();
        places.dedup();
        if places.len() != n {
            violations.push(format!(
                "step {step}: namespace {namespace} has two rules in one chain: {mine:?}"
            ));
        }
        let mut owners: Vec<u32> = mine.iter().map(|r| r.pid).collect();
        owners.dedup();
        if owners.len() > 1 {
            violations.push(format!(
                "step {step}: namespace {namespace} is split between owners {owners:?}"
            ));
        }
        if !mine.is_empty() && mine.len() != 4 {
            violations.push(format!(
                "step {step}: namespace {namespace} has {} rules, not 4: {mine:?}",
                mine.len()
            ));
        }
    }
    // Panics (a violation of its own) if iptables-nft calls the table incompatible.
    ns.save(false);
    ns.save(true);
}

/// Starts a process in `ns` without waiting for anything.
fn spawn(ns: &Netns, program: &std::path::Path, args: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn")
}

fn kill9(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// `hello`'s arguments for the library service.
const LIB: [&str; 6] = [
    "--namespace",
    "lib",
    "--port",
    "8080",
    "--range",
    "41000-41099",
];
/// `switcheroo`'s arguments for the wrapped service, up to the server.
const WRAP: [&str; 8] = [
    "run",
    "-n",
    "wrap",
    "-p",
    "8081",
    "--range",
    "41100-41199",
    "--",
];

/// A library deploy.
fn deploy_lib(ns: &Netns) -> Hello {
    ns.hello(&LIB)
}

/// A deploy under `switcheroo run`; returns the wrapper and its server's pid.
fn deploy_wrapped(ns: &Netns) -> (Hello, u32) {
    let hello = example("hello");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(crate::switcheroo_bin())
        .args(WRAP)
        .arg(&hello);
    // hello under activation prints `ready pid=<its pid> port=<fd 3's port>`.
    let mut h = Hello::start(cmd);
    let server = h.pid;
    h.pid = h.child.id();
    // Wait for the switch itself.
    h.line_containing(" is ready: port ");
    (h, server)
}

/// Runs the chaos for about `secs` seconds; `seed` makes the choices repeatable.
pub fn run(secs: u64, seed: u64) -> Summary {
    let ns = Netns::new();
    let mut rng = Rng(seed | 1);
    let mut summary = Summary::default();
    let mut lib = Some(deploy_lib(&ns));
    let (w, s) = deploy_wrapped(&ns);
    let mut wrapped: Option<(Hello, u32)> = Some((w, s));
    let mut retired: Vec<Hello> = Vec::new();

    let stop = Arc::new(AtomicBool::new(false));
    let churner = {
        let (stop, name) = (stop.clone(), ns.name.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let script = "iptables-nft -t nat -I PREROUTING -p tcp --dport 9999 -j ACCEPT && \
                              iptables-nft -t nat -I OUTPUT -p udp --dport 9999 -j ACCEPT && \
                              iptables-nft -t nat -D PREROUTING -p tcp --dport 9999 -j ACCEPT && \
                              iptables-nft -t nat -D OUTPUT -p udp --dport 9999 -j ACCEPT";
                let _ = Command::new("ip")
                    .args(["netns", "exec", &name, "sh", "-c", script])
                    .status();
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        })
    };
    let loads: Vec<load::Load> = ns.enter(|| {
        ["127.0.0.1:8080", "127.0.0.1:8081"]
            .iter()
            .map(|t| {
                let mut plan = load::Plan::new(t.parse().unwrap());
                plan.close_clients = 1;
                plan.keepalive_clients = 1;
                plan.pause = Duration::from_millis(2);
                plan.timeout = Duration::from_secs(2);
                load::Load::start(&plan)
            })
            .collect()
    });

    let hello = example("hello");
    // CHAOS_KINDS=0,4 restricts the steps to those kinds (to tell causes apart).
    let only: Option<Vec<u64>> = std::env::var("CHAOS_KINDS")
        .ok()
        .map(|k| k.split(',').filter_map(|n| n.parse().ok()).collect());
    let until = Instant::now() + Duration::from_secs(secs);
    let failed_now =
        |loads: &[load::Load]| -> Vec<u64> { loads.iter().map(|l| l.stats.failed()).collect() };
    while Instant::now() < until {
        summary.steps += 1;
        let before: Vec<bool> = ["lib", "wrap"].iter().map(|n| served(&ns, n)).collect();
        let failed_before = failed_now(&loads);
        let kind = match &only {
            Some(kinds) => kinds[rng.below(kinds.len() as u64) as usize],
            None => rng.below(7),
        };
        match kind {
            // A library deploy.
            0 | 1 => {
                summary.deploys += 1;
                retired.extend(lib.replace(deploy_lib(&ns)));
            }
            // A library deployer SIGKILLed at a random moment of its start or commit.
            2 => {
                summary.deploys += 1;
                let mut child = spawn(&ns, &hello, &LIB);
                std::thread::sleep(Duration::from_micros(rng.below(30_000)));
                kill9(child.id());
                let _ = child.wait();
                summary.kills += 1;
                summary.kills_by[0] += 1;
            }
            // The serving library instance SIGKILLed.
            3 => {
                if let Some(mut h) = lib.take() {
                    kill9(h.pid);
                    let _ = h.child.wait();
                    summary.kills += 1;
                    summary.kills_by[1] += 1;
                }
            }
            // A wrapped deploy; sometimes its wrapper is SIGKILLed at a random moment.
            4 => {
                summary.deploys += 1;
                if rng.below(2) == 0 {
                    retired.extend(wrapped.replace(deploy_wrapped(&ns)).map(|(h, _)| h));
                } else {
                    let args = [&WRAP[..], &[hello.to_str().unwrap()]].concat();
                    let mut child = spawn(&ns, &crate::switcheroo_bin(), &args);
                    std::thread::sleep(Duration::from_micros(rng.below(60_000)));
                    kill9(child.id());
                    let _ = child.wait();
                    summary.kills += 1;
                    summary.kills_by[2] += 1;
                }
            }
            // The serving wrapper SIGKILLed (its server gets SIGTERM from the kernel).
            5 => {
                if let Some((mut h, _)) = wrapped.take() {
                    kill9(h.pid);
                    let _ = h.child.wait();
                    summary.kills += 1;
                    summary.kills_by[3] += 1;
                }
            }
            // The server under the serving wrapper SIGKILLed.
            _ => {
                if let Some((h, server)) = wrapped.take() {
                    kill9(server);
                    summary.kills += 1;
                    summary.kills_by[4] += 1;
                    retired.push(h);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100 + rng.below(200)));
        check_invariants(&ns, summary.steps, &mut summary.violations);
        let failed_after = failed_now(&loads);
        for (i, namespace) in ["lib", "wrap"].iter().enumerate() {
            if before[i] && served(&ns, namespace) {
                summary.served_steps += 1;
                summary.failed_while_served += failed_after[i] - failed_before[i];
                summary.served_failures_by_step[kind as usize] +=
                    failed_after[i] - failed_before[i];
            }
        }
    }

    // One clean deploy of each kind repairs whatever the kills left.
    let mut lib = deploy_lib(&ns);
    let (mut wrapper, server) = deploy_wrapped(&ns);
    std::thread::sleep(Duration::from_millis(500));
    let stats: Vec<_> = loads.into_iter().map(load::Load::stop).collect();
    stop.store(true, Ordering::SeqCst);
    summary.churn = churner.join().unwrap();
    let totals = load::Totals::of(&stats);
    summary.requests = totals.ok + totals.failed;
    summary.failed = totals.failed;

    // Every old instance and wrapper ends (replaced ones drain and exit).
    for mut h in retired {
        if h.wait_exit(Duration::from_secs(20)).is_none() {
            summary
                .violations
                .push(format!("pid {} still runs after it was replaced", h.pid));
        }
    }
    check_invariants(&ns, summary.steps + 1, &mut summary.violations);
    for rule in our_rules(&ns) {
        if !rule.alive {
            summary.violations.push(format!(
                "after the clean deploys, a rule of dead pid {:?} remains: {rule:?}",
                rule.pid
            ));
        }
        let owner = if rule.namespace == "lib" {
            lib.pid
        } else {
            wrapper.pid
        };
        if rule.pid != owner {
            summary.violations.push(format!(
                "a rule of {:?} is not the current owner's ({owner}): {rule:?}",
                rule.pid
            ));
        }
    }
    // The service answers, from the current instances.
    for (port, pid) in [(8080, lib.pid), (8081, server)] {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        match ns.enter(|| get(addr, "/")) {
            Ok((200, body)) if pid_of(&body) == pid => {}
            other => summary
                .violations
                .push(format!("port {port} answered {other:?}, not pid {pid}")),
        }
    }
    // Only the current instances remain: hello, the wrapper and its server; no zombie.
    // (A server whose wrapper was killed got SIGTERM and drains for a moment.)
    let mut expected = vec![lib.pid as i32, wrapper.pid as i32, server as i32];
    expected.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pids = ns.pids();
    pids.sort();
    while pids != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        pids = ns.pids();
        pids.sort();
    }
    if pids != expected {
        let described: Vec<String> = pids
            .iter()
            .map(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .unwrap_or_default()
                    .trim()
                    .chars()
                    .take(60)
                    .collect()
            })
            .collect();
        summary.violations.push(format!(
            "processes left in the namespace: {described:?} (expected only {expected:?})"
        ));
    }
    for p in &pids {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
        {
            summary.violations.push(format!("zombie: {stat}"));
        }
    }
    let _ = lib.terminate();
    let _ = wrapper.terminate();
    summary
}

/// A small xorshift generator: the choices are the seed's, and a failing seed can be
/// replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
