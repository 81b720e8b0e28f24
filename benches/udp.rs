//! Services with several ports, and UDP: what a commit of a 3-port service costs against a
//! 1-port one, how many datagrams a steady UDP load loses per 1,000 deploys (with the flow
//! drain and the forgetting, and without), and how many QUIC connections fail per 1,000
//! deploys, side by side in one run.
//!
//! `cargo build --release --examples && cargo bench --bench udp [-- --deploys N --baseline-deploys N --quic-deploys N]`
//! as root. Runs in a network namespace of its own (unshare(2)); `echo` and `quic`
//! instances are real processes.
//!
//! UDP load: 4 clients on long-lived flows (one connected socket each, a datagram every
//! 3 ms, each waiting for its answer) and 2 clients whose every datagram is a new flow, on
//! 127.0.0.1 and ::1. A datagram not answered within 100 ms is sent again: "lost" counts
//! those, "never answered" the ones still unanswered after 20 tries. QUIC load: 3 clients
//! that keep connections open (40 streams, 20 ms apart) and 3 that connect for one stream.
//! `BENCH_LOG=FILE` appends the examples' stderr (their drain lines) to FILE.

use lab::bench::arg;
use lab::{FlowLog, UdpLoad};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switcheroo::Switcheroo;

fn example(name: &str) -> std::path::PathBuf {
    lab::bench::hello_path().with_file_name(name)
}

/// Starts an example; returns it once it printed its ready line.
fn start(name: &str, args: &[&str]) -> Child {
    let mut child = Command::new(example(name))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(match std::env::var_os("BENCH_LOG") {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => Stdio::null(),
        })
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e} (cargo build --release --examples)"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("ready line");
    assert!(
        line.starts_with("ready pid="),
        "{name} did not start: {line:?}"
    );
    child
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// begin_all + commit of `sw`, `n` times, 40 ms apart (see the switch bench on spacing).
fn commits(sw: &Switcheroo, n: usize) -> Vec<Duration> {
    let mut keep = Vec::new();
    (0..n)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(40));
            let (sockets, takeover) = sw.begin_all().expect("begin_all");
            let t = Instant::now();
            takeover.commit().expect("commit");
            let d = t.elapsed();
            keep.push(sockets);
            if keep.len() > 4 {
                keep.remove(0);
            }
            d
        })
        .collect()
}

fn commit_latency() {
    let one = Switcheroo::service("one").tcp(8080).build().unwrap();
    let three = Switcheroo::service("three")
        .tcp(80)
        .tcp(443)
        .udp(443)
        .build()
        .unwrap();
    commits(&one, 5);
    commits(&three, 5);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        a.extend(commits(&one, 20));
        b.extend(commits(&three, 20));
    }
    let (a, b) = (median(a), median(b));
    println!("## commit latency, 200 commits each, interleaved\n");
    println!("| service | rules per commit (insert + delete) | median |");
    println!("|---|---:|---:|");
    println!(
        "| 1 port (8080/tcp) | 4 + 4 | {:.0} µs |",
        a.as_secs_f64() * 1e6
    );
    println!(
        "| 3 ports (80/tcp, 443/tcp, 443/udp) | 12 + 12 | {:.0} µs ({:.2}×) |\n",
        b.as_secs_f64() * 1e6,
        b.as_secs_f64() / a.as_secs_f64()
    );
}

/// `deploys` deploys of `echo` (with `extra` arguments), 300 ms apart, under the UDP load.
fn udp_run(deploys: usize, extra: &[&str]) -> (Vec<FlowLog>, Vec<FlowLog>, Duration) {
    let args = |v: usize| {
        let mut a = vec![
            "--namespace".to_owned(),
            "udpbench".to_owned(),
            "--port".to_owned(),
            "5353/udp".to_owned(),
            "--tag".to_owned(),
            format!("v{v}"),
            "--drain-max".to_owned(),
            "1s".to_owned(),
            "--range".to_owned(),
            "41000-48999".to_owned(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let launch = |v: usize| {
        let a = args(v);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        start("echo", &refs)
    };
    let mut current = launch(0);
    let load = UdpLoad::start(5353);
    let started = Instant::now();
    let mut old: Vec<Child> = Vec::new();
    for v in 1..=deploys {
        std::thread::sleep(Duration::from_millis(300));
        old.push(std::mem::replace(&mut current, launch(v)));
        old.retain_mut(|c| c.try_wait().map(|s| s.is_none()).unwrap_or(false));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (flows, fresh) = load.stop();
    let elapsed = started.elapsed();
    for mut c in old.into_iter().chain([current]) {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = switcheroo::cleanup("udpbench");
    (flows, fresh, elapsed)
}

fn udp_losses(deploys: usize, baseline_deploys: usize) {
    println!(
        "## UDP: 4 long-lived flows (a datagram every 3 ms each) and 2 clients on new flows\n"
    );
    println!("| old instance | deploys | datagrams | lost (not answered within 100 ms, sent again) | of which never answered (20 tries) | lost per 1,000 deploys | long-lived flows that ended stuck |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (what, n, extra) in [
        (
            "drains its flows (1 s quiet, at most 1 s), then forgets them",
            deploys,
            &[][..],
        ),
        (
            "closes at once, forgets nothing",
            baseline_deploys,
            &["--no-drain"][..],
        ),
    ] {
        if n == 0 {
            continue;
        }
        let (flows, fresh, _) = udp_run(n, extra);
        let all: Vec<&FlowLog> = flows.iter().chain(&fresh).collect();
        let datagrams: usize = all.iter().map(|l| l.answers.len() + l.lost.len()).sum();
        let resent: usize = all.iter().map(|l| l.resent).sum();
        let never: usize = all.iter().map(|l| l.lost.len()).sum();
        let stuck = flows
            .iter()
            .filter(|f| f.answers.last().map(|a| a.1) != Some(n))
            .count();
        println!(
            "| {what} | {n} | {datagrams} | {resent} | {never} | {:.1} | {stuck} of 4 |",
            resent as f64 * 1000.0 / n as f64
        );
    }
    println!();
}

fn quic(deploys: usize) {
    use quinn::rustls::pki_types::CertificateDer;
    let dir = std::env::temp_dir().join(format!("switcheroo-quic-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.der"), dir.join("key.der"));
    std::fs::write(&cert_path, key.cert.der()).unwrap();
    std::fs::write(&key_path, key.signing_key.serialize_der()).unwrap();
    let launch = |v: usize| {
        let tag = format!("v{v}");
        start(
            "quic",
            &[
                "--namespace",
                "quicbench",
                "--cert",
                cert_path.to_str().unwrap(),
                "--key",
                key_path.to_str().unwrap(),
                "--tag",
                &tag,
                "--drain-max",
                "10s",
                "--range",
                "41000-48999",
            ],
        )
    };
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(key.cert.der().to_vec()))
        .unwrap();
    let config = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
    let mut current = launch(0);
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default()); // conns, streams, failed conns, failed streams
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (stop, counts, config) = (stop.clone(), counts.clone(), config.clone());
            let (streams, pause) = if c < 3 {
                (40, Duration::from_millis(20))
            } else {
                (1, Duration::from_millis(5))
            };
            let target: SocketAddr = if c % 2 == 0 {
                "127.0.0.1:4433".parse().unwrap()
            } else {
                "[::1]:4433".parse().unwrap()
            };
            runtime.spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let local: SocketAddr = if target.is_ipv4() {
                        "0.0.0.0:0".parse().unwrap()
                    } else {
                        "[::]:0".parse().unwrap()
                    };
                    let mut endpoint = quinn::Endpoint::client(local).unwrap();
                    endpoint.set_default_client_config(config.clone());
                    let conn = match endpoint.connect(target, "localhost").unwrap().await {
                        Ok(conn) => conn,
                        Err(_) => {
                            counts[2].fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                    };
                    counts[0].fetch_add(1, Ordering::SeqCst);
                    for i in 0..streams {
                        let ok = async {
                            let (mut send, mut recv) = conn.open_bi().await.ok()?;
                            let payload = format!("stream {i}");
                            send.write_all(payload.as_bytes()).await.ok()?;
                            send.finish().ok()?;
                            let answer = recv.read_to_end(4096).await.ok()?;
                            answer.ends_with(payload.as_bytes()).then_some(())
                        }
                        .await;
                        let slot = if ok.is_some() { 1 } else { 3 };
                        counts[slot].fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(pause).await;
                    }
                    conn.close(0u32.into(), b"done");
                    endpoint.wait_idle().await;
                }
            })
        })
        .collect();
    let mut old: Vec<Child> = Vec::new();
    for v in 1..=deploys {
        std::thread::sleep(Duration::from_millis(600));
        old.push(std::mem::replace(&mut current, launch(v)));
        old.retain_mut(|c| c.try_wait().map(|s| s.is_none()).unwrap_or(false));
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    runtime.block_on(async {
        for c in clients {
            let _ = c.await;
        }
    });
    for mut c in old.into_iter().chain([current]) {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = switcheroo::cleanup("quicbench");
    let _ = std::fs::remove_dir_all(&dir);
    let [conns, streams, failed_conns, failed_streams] =
        counts.each_ref().map(|c| c.load(Ordering::SeqCst));
    println!("## QUIC: 3 clients keep connections open (40 streams, 20 ms apart), 3 connect for one stream\n");
    println!("| deploys | connections | streams | failed handshakes | failed streams | failed connections per 1,000 deploys |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {deploys} | {conns} | {streams} | {failed_conns} | {failed_streams} | {:.1} |\n",
        (failed_conns + failed_streams) as f64 * 1000.0 / deploys as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("udp bench: skipped under `cargo test`; run `cargo bench --bench udp`");
        return;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("unshare(CLONE_NEWNET): {e} (run as root)"));
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
    commit_latency();
    udp_losses(
        arg(&args, "--deploys", 100),
        arg(&args, "--baseline-deploys", 10),
    );
    let quic_deploys = arg(&args, "--quic-deploys", 50);
    if quic_deploys > 0 {
        quic(quic_deploys);
    }
}
