//! Commit latency and its growth, side by side with the iptables way; the kernel's floor;
//! connections per second through the redirect against direct; memory per instance.
//!
//! `cargo bench --bench switch` as root. Runs in a network namespace of its own
//! (unshare(2)), which disappears with the process. Prints a Markdown table and writes
//! `target/switch-bench.csv` for `ci/bench-report`.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switcheroo::Switcheroo;
use switcheroo_sys::{Batch, Conn, Family, Op};

fn sh(cmd: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn median_p99(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let p99 = v[((v.len() * 99).div_ceil(100)).saturating_sub(1)];
    (v[v.len() / 2], p99)
}

/// Fills `chain` of both families' nat tables with `n` foreign rules through
/// iptables-nft-restore (one transaction each).
fn set_foreign_rules(chain: &str, n: usize) {
    for restore in ["iptables-nft-restore", "ip6tables-nft-restore"] {
        let mut input = String::from("*nat\n");
        input.push_str(&format!("-F {chain}\n"));
        for i in 0..n {
            input.push_str(&format!(
                "-A {chain} -p tcp -m tcp --dport {} -j RETURN\n",
                10000 + (i % 50000)
            ));
        }
        input.push_str("COMMIT\n");
        sh(restore, &["--noflush"], Some(&input));
    }
}

/// Time between measured switches. The kernel destroys deleted rules after an RCU grace
/// period, and a transaction that arrives while that is pending waits for it (about 12 ms
/// here, for any nftables writer alike); real deploys are seconds apart, so the
/// measurements are spaced by more than a grace period. The back-to-back figure is
/// reported separately.
const SPACING: Duration = Duration::from_millis(40);

/// Our commit as a deploy makes it: a new instance (its own `Switcheroo`, so its own
/// netlink socket and nothing remembered from an earlier commit) begins (which reads the
/// chains to choose its port) and commits against the current chains, `n` times,
/// `spacing` apart. Only the commit is timed: nothing changes the ruleset between the two,
/// so the commit's read is a generation query, as in a deploy where nobody else wrote
/// meanwhile.
fn ours(make: &dyn Fn() -> Switcheroo, n: usize, spacing: Duration) -> Vec<Duration> {
    let mut keep: Vec<TcpListener> = Vec::new();
    (0..n)
        .map(|_| {
            std::thread::sleep(spacing);
            let sw = make();
            let (listener, takeover) = sw.begin().expect("begin");
            let t = Instant::now();
            takeover.commit().expect("commit");
            let d = t.elapsed();
            keep.push(listener);
            if keep.len() > 8 {
                keep.remove(0);
            }
            d
        })
        .collect()
}

/// The Go original's commit, replayed through the iptables-nft binary: list both chains,
/// insert the new rule in each, list again, delete the old rules by line number.
fn iptables_way(n: usize) -> Vec<Duration> {
    let mut port = 41000u16;
    (0..n)
        .map(|_| {
            port += 1;
            std::thread::sleep(SPACING);
            let t = Instant::now();
            let comment = format!("SWITCHEROO:ns=gobench:port={port}:pid=1");
            for chain in ["PREROUTING", "OUTPUT"] {
                sh(
                    "iptables-nft",
                    &["-t", "nat", "-L", chain, "-n", "--line-numbers"],
                    None,
                );
            }
            for chain in ["PREROUTING", "OUTPUT"] {
                sh(
                    "iptables-nft",
                    &[
                        "-t",
                        "nat",
                        "-I",
                        chain,
                        "-p",
                        "tcp",
                        "--dport",
                        "8081",
                        "-m",
                        "comment",
                        "--comment",
                        &comment,
                        "-j",
                        "REDIRECT",
                        "--to-ports",
                        &port.to_string(),
                    ],
                    None,
                );
            }
            for chain in ["PREROUTING", "OUTPUT"] {
                let listing = sh(
                    "iptables-nft",
                    &["-t", "nat", "-L", chain, "-n", "--line-numbers"],
                    None,
                );
                let old: Vec<String> = listing
                    .lines()
                    .filter(|l| l.contains("SWITCHEROO:ns=gobench:") && !l.contains(&comment))
                    .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                    .collect();
                for num in old.iter().rev() {
                    sh("iptables-nft", &["-t", "nat", "-D", chain, num], None);
                }
            }
            t.elapsed()
        })
        .collect()
}

/// One-shot `nft -f`: insert in both chains and delete the previous rules by handle, in
/// one batch (handles from the previous run's `--echo --handle` output).
fn nft_way(n: usize) -> Vec<Duration> {
    let mut old: Vec<(String, String)> = Vec::new();
    let mut port = 42000u16;
    (0..n)
        .map(|_| {
            port += 1;
            let mut script = String::new();
            for chain in ["PREROUTING", "OUTPUT"] {
                script.push_str(&format!(
                    "insert rule ip nat {chain} tcp dport 8082 fib daddr type local counter redirect to :{port} comment \"nftbench\"\n"
                ));
            }
            for (chain, handle) in &old {
                script.push_str(&format!("delete rule ip nat {chain} handle {handle}\n"));
            }
            std::thread::sleep(SPACING);
            let t = Instant::now();
            let out = sh("nft", &["--echo", "--handle", "-f", "-"], Some(&script));
            let d = t.elapsed();
            old = out
                .lines()
                .filter(|l| l.contains("insert rule ip nat"))
                .filter_map(|l| {
                    let chain = l.split_whitespace().nth(4)?.to_owned();
                    let handle = l.rsplit("# handle ").next()?.trim().to_owned();
                    Some((chain, handle))
                })
                .collect();
            d
        })
        .collect::<Vec<_>>()
        .into_iter()
        .chain(std::iter::once_with(|| {
            // Leave no native rule behind: iptables-nft refuses chains that hold one.
            let script: String = old
                .iter()
                .map(|(chain, handle)| format!("delete rule ip nat {chain} handle {handle}\n"))
                .collect();
            sh("nft", &["-f", "-"], Some(&script));
            Duration::ZERO
        }))
        .filter(|d| !d.is_zero())
        .collect()
}

/// The kernel's floor: one batch holding one no-op message (NEWTABLE of an existing
/// table), sent and acknowledged over one socket.
fn floor(n: usize) -> Vec<Duration> {
    let mut conn = Conn::open().expect("socket");
    let mut batch = Batch::new(None);
    batch.push(Op::AddTable(Family::Ipv4));
    (0..n)
        .map(|_| {
            let t = Instant::now();
            conn.apply(&batch).expect("no-op batch");
            t.elapsed()
        })
        .collect()
}

fn serve(listener: TcpListener) {
    std::thread::spawn(move || {
        let body = format!("hello from pid {} port 0", std::process::id());
        let response = Arc::new(format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        for stream in listener.incoming().flatten() {
            let response = response.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut stream = stream;
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(response.as_bytes());
            });
        }
    });
}

fn conn_rate(target: &str, secs: u64, sources: u32) -> f64 {
    let mut plan = lab::load::Plan::new(target.parse().unwrap());
    plan.close_clients = 4;
    plan.keepalive_clients = 0;
    plan.sources = sources;
    let l = lab::load::Load::start(&plan);
    std::thread::sleep(Duration::from_secs(secs));
    let started = l.started;
    let stats = l.stop();
    assert_eq!(stats.failed(), 0, "failures while measuring {target}");
    stats.ok() as f64 / started.elapsed().as_secs_f64()
}

fn enter_private_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("unshare(CLONE_NEWNET): {e} (run as root)"));
    sh("ip", &["link", "set", "lo", "up"], None);
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("switch bench: skipped under `cargo test`; run `cargo bench --bench switch`");
        return;
    }
    enter_private_netns();
    let iptables = have("iptables-nft");
    let nft = have("nft");
    let sw = Switcheroo::builder("bench", 8080).build().unwrap();
    let fresh = || Switcheroo::builder("bench", 8080).build().unwrap();
    // The same service with commit records on, kept in a directory of the bench's own
    // (never the machine's /run).
    let records = std::env::temp_dir().join(format!("switcheroo-bench-{}", std::process::id()));
    let fresh_recorded = || {
        Switcheroo::builder("bench", 8080)
            .record_dir(&records)
            .build()
            .unwrap()
    };
    ours(&fresh, 5, SPACING); // create the tables and chains, warm up

    let mut csv = String::from(
        "foreign_rules,where,ours_median_us,ours_p99_us,ours_recorded_median_us,iptables_median_us,nft_median_us\n",
    );
    println!("## commit latency (our chains hold N foreign rules in PREROUTING, both families)\n");
    println!("| foreign rules | ours median | ours p99 | ours with a record dir (median) | iptables-nft binary, Go sequence (median) | ratio | nft -f one batch (median) | ratio |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    let mut recorded_ratios = Vec::new();
    let mut medians = Vec::new();
    for &n in &[0usize, 100, 1_000, 10_000] {
        set_foreign_rules("PREROUTING", n);
        let runs = if n >= 10_000 { 50 } else { 200 };
        let (m, p99) = median_p99(ours(&fresh, runs, SPACING));
        // The first commit of a series dumps (the other service's commits moved the
        // generation); the rest read the record.
        let (recorded, _) = median_p99(ours(&fresh_recorded, runs, SPACING));
        let slow_runs = if n >= 10_000 { 5 } else { 15 };
        let ipt = iptables.then(|| median_p99(iptables_way(slow_runs)).0);
        let nf = nft.then(|| median_p99(nft_way(slow_runs)).0);
        let ratio = |o: Option<Duration>| {
            o.map_or("-".to_string(), |o| {
                format!("{:.0}×", o.as_secs_f64() / m.as_secs_f64())
            })
        };
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} |",
            us(m),
            us(p99),
            us(recorded),
            ipt.map_or("-".into(), us),
            ratio(ipt),
            nf.map_or("-".into(), us),
            ratio(nf)
        );
        csv.push_str(&format!(
            "{n},PREROUTING,{:.1},{:.1},{:.1},{},{}\n",
            m.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            recorded.as_secs_f64() * 1e6,
            ipt.map_or(String::new(), |d| format!("{:.1}", d.as_secs_f64() * 1e6)),
            nf.map_or(String::new(), |d| format!("{:.1}", d.as_secs_f64() * 1e6)),
        ));
        ratios.push((n, ipt.map(|i| i.as_secs_f64() / m.as_secs_f64())));
        recorded_ratios.push((n, ipt.map(|i| i.as_secs_f64() / recorded.as_secs_f64())));
        medians.push((n, m));
    }
    set_foreign_rules("PREROUTING", 0);

    // 10,000 rules elsewhere in the same table: not in our chains, so they must not cost.
    set_foreign_rules("POSTROUTING", 10_000);
    let (elsewhere, _) = median_p99(ours(&fresh, 200, SPACING));
    set_foreign_rules("POSTROUTING", 0);
    csv.push_str(&format!(
        "10000,POSTROUTING,{:.1},,,,\n",
        elsewhere.as_secs_f64() * 1e6
    ));
    println!(
        "\n10,000 foreign rules in POSTROUTING (same table, not our chains): ours median {} (empty chains: {})",
        us(elsewhere),
        us(medians[0].1)
    );

    // One instance committing again and again (a tenure's resign, a probation's end):
    // what it remembers of its own last transaction replaces the dumps while nothing else
    // has changed the ruleset.
    let again: Vec<Duration> = (0..200)
        .map(|_| {
            std::thread::sleep(SPACING);
            let (_listener, takeover) = sw.begin().expect("begin");
            let t = Instant::now();
            takeover.commit().expect("commit");
            t.elapsed()
        })
        .collect();
    let (again, _) = median_p99(again);
    println!(
        "the same instance committing again (no dump: it remembers its last transaction), empty chains: median {}",
        us(again)
    );
    let (b2b, _) = median_p99(ours(&fresh, 100, Duration::ZERO));
    println!(
        "back to back (no spacing, empty chains, a new instance each): ours median {}",
        us(b2b)
    );
    let (fl, _) = median_p99(floor(1000));
    println!(
        "floor: one no-op batch round trip on one socket: median {}",
        us(fl)
    );

    // Connections through the redirect against directly to the internal port.
    let (listener, takeover) = sw.begin().unwrap();
    let port = takeover.port();
    serve(listener);
    takeover.commit().unwrap();
    // One second each, alternating. From one client address, a client at this rate reuses
    // its ephemeral ports within seconds while the server still holds those connections in
    // TIME_WAIT; through the redirect many such SYNs are refused by the TIME_WAIT socket's
    // timestamp check (TcpExtPAWSTimewait counts them) and wait a second for the SYN to be
    // retransmitted, so that figure measures port reuse, not NAT. From 1,000 client
    // addresses, as real traffic comes, it is the redirect's own cost; that is the target.
    let rates = |sources: u32| {
        let (mut direct, mut redirected) = (0.0, 0.0);
        for _ in 0..3 {
            direct += conn_rate(&format!("127.0.0.1:{port}"), 1, sources) / 3.0;
            std::thread::sleep(Duration::from_secs(1));
            redirected += conn_rate("127.0.0.1:8080", 1, sources) / 3.0;
            std::thread::sleep(Duration::from_secs(1));
        }
        (direct, redirected)
    };
    let (direct1, redirected1) = rates(0);
    let (direct, redirected) = rates(1000);
    println!(
        "connections/s (new connection per request, 4 client threads), 1,000 client addresses: direct {direct:.0}, through the redirect {redirected:.0} ({:.0}%); one client address: direct {direct1:.0}, through the redirect {redirected1:.0} ({:.0}%)",
        redirected / direct * 100.0,
        redirected1 / direct1 * 100.0
    );

    // Memory: resident memory per instance, from 100 instances that have each begun (so
    // hold their socket, buffers and listener) and committed: 100 services, each on a
    // public port of its own (two services may not share one).
    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap()
    };
    let before = rss();
    let instances: Vec<_> = (0..100)
        .map(|i| {
            let sw = Switcheroo::builder(format!("memory{i}"), 8100 + i)
                .port_range(43000..=43999)
                .build()
                .unwrap();
            let (l, t) = sw.begin().unwrap();
            t.commit().unwrap();
            (sw, l)
        })
        .collect();
    let per_instance = (rss() - before) as f64 / 100.0;
    for (sw, _) in &instances {
        sw.cleanup().unwrap();
    }
    drop(instances);
    println!(
        "memory: {per_instance:.0} KiB resident per instance (Switcheroo with its netlink socket and 64 KiB receive buffer, listener; 100 instances in one process)"
    );

    println!("\n## targets");
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "- median commit ≤ 1 ms on empty chains: {} ({})",
        us(medians[0].1),
        met(medians[0].1 <= Duration::from_millis(1))
    );
    if let Some((_, Some(r))) = ratios.first() {
        println!(
            "- ≥ 50× faster than the iptables-binary sequence on empty chains: {r:.0}× ({})",
            met(*r >= 50.0)
        );
    }
    if let (Some((_, Some(r))), Some((_, Some(rr)))) = (ratios.last(), recorded_ratios.last()) {
        println!(
            "- ≥ 20× faster with 10,000 foreign rules: {r:.0}× by default ({}), {rr:.0}× with a record dir ({})",
            met(*r >= 20.0),
            met(*rr >= 20.0)
        );
    }
    let growth = elsewhere.as_secs_f64() / medians[0].1.as_secs_f64();
    println!("- cost grows only with our chains: 10,000 rules elsewhere in the table cost {growth:.2}× empty ({})", met(growth < 1.5));
    println!(
        "- connections through the redirect ≥ 90% of direct (1,000 client addresses): {:.0}% ({})",
        redirected / direct * 100.0,
        met(redirected / direct >= 0.9)
    );

    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/switch-bench.csv", csv);
    sw.cleanup().unwrap();
    let _ = std::fs::remove_dir_all(&records);
}
