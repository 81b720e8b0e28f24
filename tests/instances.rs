//! Every instance in sight: `status` lists the instances in the chains and those that were
//! replaced but still finish connections, with their roles, since when, and what they
//! hold; `run` says how its drain goes, in its log and, under a service manager, in
//! `STATUS=`.

use lab::command::{run_with_env, switcheroo, text};
use lab::{example, require_root, Netns, TempPath};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// Starts `GET /sleep?ms=MS` on a connection of its own; the thread returns the answer.
fn slow_request(ns: &Netns, ms: u64) -> std::thread::JoinHandle<String> {
    let stream = ns
        .enter(|| TcpStream::connect("127.0.0.1:8080"))
        .expect("connect");
    std::thread::spawn(move || {
        let mut stream = stream;
        write!(
            stream,
            "GET /sleep?ms={ms} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    })
}

/// The rows of `switcheroo status` for `namespace`, each split into cells.
fn rows(ns: &Netns, namespace: &str) -> Vec<Vec<String>> {
    let out = switcheroo(ns, &["status", "-n", namespace]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[test]
fn status_shows_a_replaced_instance_draining_with_the_connections_it_still_holds() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut old = ns.hello(&[]);
    let slow = slow_request(&ns, 6000);
    std::thread::sleep(Duration::from_millis(300));
    let new = ns.hello(&[]);
    old.line_containing("retiring");
    std::thread::sleep(Duration::from_millis(500));
    let table = rows(&ns, "hello");
    eprintln!("{table:?}");
    let row = |pid: u32| {
        table
            .iter()
            .find(|r| r[1] == pid.to_string())
            .unwrap_or_else(|| panic!("pid {pid} not listed: {table:?}"))
            .clone()
    };
    let (o, n) = (row(old.pid), row(new.pid));
    assert_eq!((o[2].as_str(), n[2].as_str()), ("draining", "active"));
    assert!(
        o[3].ends_with('Z') && n[3].ends_with('Z'),
        "since: {o:?} {n:?}"
    );
    assert_eq!(o[4], format!("8080/tcp->{}", old.port), "{o:?}");
    assert_eq!(&o[5..7], ["1", "tcp"], "the slow request: {o:?}");
    let json = String::from_utf8_lossy(&switcheroo(&ns, &["status", "--json"]).stdout).into_owned();
    assert!(
        json.contains(&format!(
            "{{\"namespace\":\"hello\",\"pid\":{},\"role\":\"draining\"",
            old.pid
        )),
        "{json}"
    );
    assert!(
        json.contains("\"connections\":{\"tcp\":1,\"udp\":0}"),
        "{json}"
    );
    // The slow request finishes on the old instance, which then exits and leaves the list.
    assert!(slow.join().unwrap().contains(&format!("pid {}", old.pid)));
    old.expect_clean_exit("the replaced instance");
    let table = rows(&ns, "hello");
    assert_eq!(table.len(), 1, "{table:?}");
    assert_eq!(table[0][1], new.pid.to_string());
}

#[test]
fn run_reports_its_drain_in_the_log_and_to_the_service_manager() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    // A service manager's notify socket (a path: abstract sockets belong to a network
    // namespace, and run lives in the test's).
    let dir = TempPath::new(&ns, "notify");
    std::fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join("notify.sock");
    let manager = UnixDatagram::bind(&path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let socket = path.to_str().unwrap();
    let hello = example("hello");
    let args = ["-n", "web", "-p", "8080", "--", hello.to_str().unwrap()];
    let mut old = run_with_env(&ns, &[("NOTIFY_SOCKET", socket)], &args);
    let slow = slow_request(&ns, 12_000);
    std::thread::sleep(Duration::from_millis(300));
    let _new = run_with_env(&ns, &[], &args);
    // Within a few seconds of the drain (a report every 5 s), the old run says what its
    // server still holds.
    old.line_within(
        "still serves 1 tcp on port 8080/tcp",
        Duration::from_secs(20),
    );
    let mut said = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline
        && !said
            .iter()
            .any(|s: &String| s.contains("STATUS=draining:") && s.contains("1 tcp"))
    {
        if let Ok(n) = manager.recv(&mut buf) {
            said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    eprintln!("{said:#?}");
    let all = said.join("\n");
    assert!(all.contains("READY=1"), "{all}");
    assert!(
        all.contains("STATUS=serving (active); port 8080/tcp"),
        "{all}"
    );
    assert!(all.contains("STOPPING=1"), "{all}");
    assert!(all.contains("still serves 1 tcp"), "{all}");
    assert!(slow.join().unwrap().contains("200 OK"));
    let status = old.wait_exit(Duration::from_secs(15)).expect("exits");
    assert_eq!(status.code(), Some(0), "{:?}", old.log);
}
