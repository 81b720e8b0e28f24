//! `quic`: a QUIC echo server on quinn that deploys with switcheroo.
//!
//! ```text
//! quic --cert FILE --key FILE [--namespace NAME] [--port PORT] [--tag TEXT]
//!      [--range MIN-MAX] [--drain-max DURATION]
//! ```
//!
//! Defaults: namespace `quic`, public UDP port 4433, tag `quic`. `--cert` and `--key` are
//! a DER certificate and its PKCS#8 key. Every bidirectional stream is answered with
//! `<tag> pid=<pid> ` followed by what the client sent on it, then finished. Once its
//! commit is done it prints `ready pid=<pid> port=<internal port>` on stdout.
//!
//! A QUIC server needs nothing special to deploy without dropping a connection: conntrack
//! keeps each connection's 4-tuple on the instance that got its first packet, so after a
//! switch the old instance goes on serving its connections while new ones reach the new
//! instance. When it is replaced (its rules go, and SIGTERM follows), this one waits until
//! its connections have been closed (by their clients, or by their idle timeout) for at
//! most `--drain-max` (default 30 s), reads the UDP flows still mapped to it, closes the
//! endpoint, forgets the flows ([`switcheroo::Flows::forget`]) and exits 0. A client that
//! migrates to a new address or port meanwhile starts a new flow, which the new instance
//! gets and cannot decrypt: the connection then fails, so the server tells clients not to
//! migrate actively (`disable_active_migration`).

use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switcheroo::{Shutdown, Socket, Switcheroo, Tenure};

const USAGE: &str = "usage: quic --cert FILE --key FILE [--namespace NAME] [--port PORT] [--tag TEXT] [--range MIN-MAX] [--drain-max DURATION]";

struct Args {
    namespace: String,
    port: u16,
    tag: String,
    range: Option<(u16, u16)>,
    drain_max: Duration,
    cert: String,
    key: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        namespace: "quic".into(),
        port: 4433,
        tag: "quic".into(),
        range: None,
        drain_max: Duration::from_secs(30),
        cert: String::new(),
        key: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--namespace" => args.namespace = value,
            "--port" => args.port = value.parse().map_err(|e| format!("--port: {e}"))?,
            "--tag" => args.tag = value,
            "--cert" => args.cert = value,
            "--key" => args.key = value,
            "--drain-max" => {
                args.drain_max =
                    switcheroo::parse_duration(&value).map_err(|e| format!("--drain-max: {e}"))?
            }
            "--range" => {
                let range = value
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                args.range =
                    Some(range.ok_or_else(|| format!("--range {value:?}: expected MIN-MAX"))?);
            }
            _ => return Err(format!("unknown argument {flag:?}; {USAGE}")),
        }
    }
    if args.cert.is_empty() || args.key.is_empty() {
        return Err(format!("--cert and --key are required; {USAGE}"));
    }
    Ok(args)
}

fn main() {
    // Before any thread exists: every thread inherits the blocked signals.
    let shutdown = match Shutdown::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(run(shutdown)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(shutdown: Shutdown) -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let cert = CertificateDer::from(std::fs::read(&args.cert)?);
    let key = PrivateKeyDer::try_from(std::fs::read(&args.key)?)?;
    let mut server = quinn::ServerConfig::with_single_cert(vec![cert], key)?;
    let mut transport = quinn::TransportConfig::default();
    // A new 4-tuple is a new flow, which conntrack would send to the newest instance.
    transport.max_idle_timeout(Some(Duration::from_secs(10).try_into()?));
    server.transport_config(Arc::new(transport));
    server.migration(false);

    let mut builder = Switcheroo::service(args.namespace.as_str()).udp(args.port);
    if let Some((min, max)) = args.range {
        builder = builder.port_range(min..=max);
    }
    let sw = builder.build()?;
    let (mut bound, takeover) = sw.begin_all()?;
    let Some(Socket::Udp(socket)) = bound.pop().map(|b| b.socket) else {
        return Err("a UDP service binds a UDP socket".into());
    };
    let port = socket.local_addr()?.port();
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let pid = std::process::id();
    let prefix: Arc<[u8]> = format!("{} pid={pid} ", args.tag).into_bytes().into();

    // Serve before the commit: the first packet the new rule sends here must find us.
    let acceptor = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = acceptor.accept().await {
            let prefix = prefix.clone();
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    serve(conn, prefix).await;
                }
            });
        }
    });

    let report = takeover.commit()?;
    eprintln!(
        "switched port={port} in={}us removed={} signalled={:?}",
        report.elapsed.as_micros(),
        report.removed.len(),
        report.signalled
    );
    let mut tenure = Tenure::new(&sw, &report)?;
    println!("ready pid={pid} port={port}");

    // The tenure blocks; it runs on a thread of its own.
    let why = tokio::task::spawn_blocking(move || {
        tenure.until_retired(&shutdown, |change| eprintln!("place {change:?}"))
    })
    .await??;
    eprintln!("retiring ({why}): waiting for the connections to close");
    let started = Instant::now();
    while endpoint.open_connections() > 0 && started.elapsed() < args.drain_max {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open = endpoint.open_connections();
    let flows = sw.flows(port)?;
    endpoint.close(0u32.into(), b"retired");
    let forgotten = flows.forget()?;
    endpoint.wait_idle().await;
    eprintln!(
        "quic drained in {}ms open={open} forgotten={forgotten}",
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Answers every bidirectional stream of `conn` until it closes.
async fn serve(conn: quinn::Connection, prefix: Arc<[u8]>) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let prefix = prefix.clone();
        tokio::spawn(async move {
            let Ok(data) = recv.read_to_end(64 * 1024).await else {
                return;
            };
            let _ = send.write_all(&prefix).await;
            let _ = send.write_all(&data).await;
            let _ = send.finish();
        });
    }
}
