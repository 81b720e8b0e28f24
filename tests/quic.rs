//! QUIC across deploys: the `quic` example (quinn) redeployed 10 times while clients keep
//! connections open and send streams on them, and others connect afresh for each stream:
//! no handshake and no stream may fail.

use lab::{require_root, version, Hello, Netns, TempPath};
use quinn::rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEPLOYS: usize = 10;

/// What the clients saw.
#[derive(Default, Debug)]
struct Tally {
    connections: usize,
    streams: usize,
    /// Handshakes that failed.
    failed_handshakes: Vec<String>,
    /// Streams that failed (on a connection that was up).
    failed_streams: Vec<String>,
    /// Connections answered by two versions (a connection cannot move: it would fail).
    mixed: usize,
    /// Streams answered by an instance after a newer one took the port.
    after_switch: usize,
    versions: std::collections::BTreeSet<usize>,
}

fn client_config(cert: &[u8]) -> quinn::ClientConfig {
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.to_vec())).unwrap();
    quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap()
}

/// One connection from a fresh UDP socket (a fresh 4-tuple, as a browser opens one),
/// `streams` streams on it, `pause` apart; then a clean close.
async fn connection(
    config: quinn::ClientConfig,
    target: SocketAddr,
    streams: usize,
    pause: Duration,
    ready: Arc<std::sync::Mutex<Vec<Instant>>>,
    tally: Arc<std::sync::Mutex<Tally>>,
) {
    let local: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let mut endpoint = quinn::Endpoint::client(local).unwrap();
    endpoint.set_default_client_config(config);
    let conn = match endpoint.connect(target, "localhost").unwrap().await {
        Ok(conn) => conn,
        Err(e) => {
            tally.lock().unwrap().failed_handshakes.push(e.to_string());
            return;
        }
    };
    let mut seen = None;
    for i in 0..streams {
        let result: Result<usize, Box<dyn std::error::Error + Send + Sync>> = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            let payload = format!("stream {i}");
            send.write_all(payload.as_bytes()).await?;
            send.finish()?;
            let answer = recv.read_to_end(4096).await?;
            let answer = String::from_utf8_lossy(&answer).into_owned();
            if !answer.ends_with(&payload) {
                return Err(format!("answer {answer:?}").into());
            }
            version(&answer).ok_or_else(|| format!("answer {answer:?}").into())
        }
        .await;
        let after_switch = matches!(&result, Ok(v) if ready.lock().unwrap().get(v + 1).is_some());
        {
            let mut t = tally.lock().unwrap();
            match result {
                Ok(v) => {
                    t.streams += 1;
                    t.versions.insert(v);
                    if seen.is_some_and(|s| s != v) {
                        t.mixed += 1;
                    }
                    seen = Some(v);
                    if after_switch {
                        t.after_switch += 1;
                    }
                }
                Err(e) => t.failed_streams.push(e.to_string()),
            }
        }
        tokio::time::sleep(pause).await;
    }
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    tally.lock().unwrap().connections += 1;
}

#[test]
fn quic_connections_survive_ten_redeploys_without_a_failed_handshake_or_stream() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let dir = TempPath::new(&ns, "quic");
    std::fs::create_dir_all(&dir.0).unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.0.join("cert.der"), dir.0.join("key.der"));
    std::fs::write(&cert_path, key.cert.der()).unwrap();
    std::fs::write(&key_path, key.signing_key.serialize_der()).unwrap();
    let cert = key.cert.der().to_vec();
    let start = |v: usize| -> Hello {
        let tag = format!("v{v}");
        ns.example(
            "quic",
            &[
                "--cert",
                cert_path.to_str().unwrap(),
                "--key",
                key_path.to_str().unwrap(),
                "--tag",
                &tag,
                "--drain-max",
                "10s",
            ],
        )
    };
    let mut current = start(0);
    let rules = ns.save(true);
    assert!(
        rules.contains("-A OUTPUT -p udp -m udp --dport 4433 -m addrtype --dst-type LOCAL"),
        "{rules}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let ready = Arc::new(std::sync::Mutex::new(vec![Instant::now()]));
    let old = ns.enter(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let config = client_config(&cert);
        let targets: [SocketAddr; 2] = [
            "127.0.0.1:4433".parse().unwrap(),
            "[::1]:4433".parse().unwrap(),
        ];
        // Kept open: 40 streams 20 ms apart (about a second); and fresh: one stream each.
        let clients: Vec<_> = (0..6)
            .map(|c| {
                let (stop, tally, ready, config) =
                    (stop.clone(), tally.clone(), ready.clone(), config.clone());
                let (streams, pause) = if c < 3 {
                    (40, Duration::from_millis(20))
                } else {
                    (1, Duration::from_millis(5))
                };
                runtime.spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let target = targets[c % 2];
                        connection(
                            config.clone(),
                            target,
                            streams,
                            pause,
                            ready.clone(),
                            tally.clone(),
                        )
                        .await;
                    }
                })
            })
            .collect();
        let mut old = Vec::new();
        for v in 1..=DEPLOYS {
            std::thread::sleep(Duration::from_millis(600));
            old.push(std::mem::replace(&mut current, start(v)));
            ready.lock().unwrap().push(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::SeqCst);
        runtime.block_on(async {
            for c in clients {
                c.await.unwrap();
            }
        });
        old
    });
    let mut drained = Vec::new();
    for mut h in old {
        h.expect_clean_exit("an old quic instance");
        drained.extend(
            h.log
                .iter()
                .filter(|l| l.starts_with("quic drained"))
                .cloned(),
        );
    }
    let t = tally.lock().unwrap();
    eprintln!(
        "QUIC over {DEPLOYS} deploys: {} connections, {} streams ({} answered by an instance after a newer one took the port), {} failed handshakes, {} failed streams; versions {:?}; {drained:?}",
        t.connections,
        t.streams,
        t.after_switch,
        t.failed_handshakes.len(),
        t.failed_streams.len(),
        t.versions
    );
    assert!(t.failed_handshakes.is_empty(), "{:?}", t.failed_handshakes);
    assert!(t.failed_streams.is_empty(), "{:?}", t.failed_streams);
    assert_eq!(t.mixed, 0, "a connection was answered by two instances");
    assert!(t.after_switch > 0, "no connection outlived a switch");
    assert!(t.versions.len() > DEPLOYS / 2, "{:?}", t.versions);
    // Every old instance closed with no connection left open.
    assert!(
        drained.iter().all(|l| l.contains(" open=0 ")),
        "{drained:?}"
    );
}
