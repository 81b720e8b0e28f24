//! `run` is the subreaper of its server: a server that forks a process per connection
//! (`socat ... fork`) leaves its children with their `run`, which waits for the last of
//! them before it exits, so no connection a child still serves is cut and nothing is left
//! to PID 1; `--kill-after` bounds the wait with SIGKILL to the whole tree.

use lab::command::{have, run};
use lab::{require_root, Netns};
use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;
use switcheroo::process::Stat;

/// socat forking a child per connection that answers after `secs` seconds.
fn forking_server(secs: u32) -> Vec<String> {
    [
        "-n",
        "fork",
        "-p",
        "8085",
        "--ready",
        "delay:300ms",
        "--",
        "socat",
        "TCP-LISTEN:{port},fork,reuseaddr",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(std::iter::once(format!("SYSTEM:sleep {secs}; echo done")))
    .collect()
}

/// Connects to the public port; the thread returns what the server sent before it closed.
fn client(ns: &Netns) -> std::thread::JoinHandle<String> {
    let stream = ns
        .enter(|| TcpStream::connect("127.0.0.1:8085"))
        .expect("connect");
    std::thread::spawn(move || {
        let mut stream = stream;
        let mut got = String::new();
        let _ = stream.read_to_string(&mut got);
        got
    })
}

/// The processes in `ns` whose parent is `parent`.
fn children(ns: &Netns, parent: u32) -> Vec<u32> {
    ns.pids()
        .into_iter()
        .map(|p| p as u32)
        .filter(|p| Stat::of(*p).is_ok_and(|s| s.parent == parent))
        .collect()
}

#[test]
fn a_child_the_server_forked_finishes_its_connection_before_run_exits() {
    if !require_root() || !have("socat", &["-V"], "socat") {
        return;
    }
    let ns = Netns::new();
    // The child answers after 8 s: long enough to outlast the new run's start, the drain
    // and the checks below on a loaded machine.
    let args = forking_server(8);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut old = run(&ns, &args);
    let answer = client(&ns);
    std::thread::sleep(Duration::from_millis(300));
    let _new = run(&ns, &args);
    // The old socat got SIGTERM after the drain and exited; its child stays with run.
    old.line_containing("waiting for the");
    let orphans = children(&ns, old.pid);
    assert!(!orphans.is_empty(), "the child should now be run's own");
    assert!(
        children(&ns, 1).iter().all(|p| !orphans.contains(p)),
        "nothing was left to PID 1"
    );
    assert!(
        old.wait_exit(Duration::from_millis(500)).is_none(),
        "run waits for the child"
    );
    assert_eq!(
        answer.join().unwrap().trim(),
        "done",
        "the connection was served to its end"
    );
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("run exits after the child");
    eprintln!("the old run ended with {status}: {:?}", old.log);
    assert!(status.code().is_some(), "{status}");
}

#[test]
fn kill_after_bounds_the_wait_for_the_whole_tree() {
    if !require_root() || !have("socat", &["-V"], "socat") {
        return;
    }
    let ns = Netns::new();
    let mut args = forking_server(60);
    args.splice(0..0, ["--kill-after".to_string(), "1s".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut old = run(&ns, &args);
    let answer = client(&ns);
    std::thread::sleep(Duration::from_millis(300));
    let _new = run(&ns, &args);
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("run exits after --kill-after");
    old.line_containing("sent SIGKILL to");
    assert_eq!(
        answer.join().unwrap(),
        "",
        "the connection was cut by the SIGKILL"
    );
    eprintln!("the old run ended with {status}");
    assert!(
        children(&ns, old.pid).is_empty(),
        "every process of the tree is gone"
    );
}
