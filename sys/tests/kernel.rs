//! The netlink layer against the running kernel, each test on a thread of its own in a
//! network namespace of its own (`unshare(CLONE_NEWNET)` moves only the calling thread;
//! the namespace disappears with the thread). Needs root; skips without it, except under
//! CI (`CI=true`), where it fails.

use std::process::Command;
use std::time::{Duration, Instant};
use switcheroo_sys::{Batch, Chain, Conn, Error, Family, Op, OwnedTable, Protocol, Redirect};

fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("needs root (network namespaces and nftables); CI=true forbids skipping");
    }
    eprintln!("skipped: needs root (network namespaces and nftables)");
    false
}

/// Runs `f` on a new thread in a new network namespace; `f` gets the path of that
/// namespace for programs that must enter it (`nsenter --net=PATH`).
fn in_new_netns<T: Send>(f: impl FnOnce(&str) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let path = format!(
                "/proc/{}/task/{}/ns/net",
                std::process::id(),
                nix::unistd::gettid()
            );
            f(&path)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn nft(netns: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("nft")
        .args(args)
        .output()
        .expect("run nsenter nft");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn redirect() -> Redirect {
    Redirect::new(8080, 40400, "SWITCHEROO:ns=t:port=40400:pid=1:start=1").unwrap()
}

fn lock(name: &str) -> Batch {
    let mut b = Batch::new(None);
    b.push(Op::AddOwnedTable(OwnedTable::new(name).unwrap()));
    b
}

#[test]
fn an_owned_table_is_held_by_one_socket_survives_a_flush_and_goes_with_its_socket() {
    if !privileged() {
        return;
    }
    in_new_netns(|path| {
        let mut a = Conn::open().unwrap();
        let mut b = Conn::open().unwrap();
        a.apply(&lock("switcheroo-lock-t")).unwrap();
        let err = b.apply(&lock("switcheroo-lock-t")).unwrap_err();
        assert!(err.is_held(), "{err}");
        // An operator's `nft flush ruleset` leaves another socket's owned table alone.
        nft(path, &["flush", "ruleset"]);
        assert!(b.apply(&lock("switcheroo-lock-t")).unwrap_err().is_held());
        assert!(nft(path, &["list", "tables"]).contains("switcheroo-lock-t"));
        // Closing the owner's socket (what a SIGKILL does) releases it. The release comes
        // with the socket's last reference: a child another test thread is forking holds a
        // copy of every descriptor until its exec, so give it a moment.
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match b.apply(&lock("switcheroo-lock-t")) {
                Ok(_) => break,
                Err(e) if e.is_held() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("the closed socket's table was not released: {e}"),
            }
        }
        let mut release = Batch::new(None);
        release.push(Op::DeleteOwnedTable(
            OwnedTable::new("switcheroo-lock-t").unwrap(),
        ));
        b.apply(&release).unwrap();
        assert!(!nft(path, &["list", "tables"]).contains("switcheroo-lock-t"));
    });
}

#[test]
fn a_checked_batch_is_answered_but_never_applied() {
    if !privileged() {
        return;
    }
    in_new_netns(|path| {
        let mut conn = Conn::open().unwrap();
        let before = nft(path, &["list", "ruleset"]);
        let mut b = Batch::new(None);
        b.push(Op::AddTable(Family::Ipv4));
        b.push(Op::AddChain(Family::Ipv4, Chain::Output));
        b.insert_rule(Family::Ipv4, Chain::Output, redirect());
        conn.dry_run(&b).unwrap();
        assert_eq!(nft(path, &["list", "ruleset"]), before);
        // The same batch, checked with an insert into a chain that does not exist: the
        // kernel names the refused operation, and still nothing is applied.
        let mut b = Batch::new(None);
        b.push(Op::AddTable(Family::Ipv4));
        b.insert_rule(Family::Ipv4, Chain::Output, redirect());
        let err = conn.dry_run(&b).unwrap_err();
        assert!(err.is_missing(), "{err}");
        assert_eq!(nft(path, &["list", "ruleset"]), before);
    });
}

#[test]
fn this_kernel_has_every_part_and_a_vanished_chain_is_not_called_unsupported() {
    if !privileged() {
        return;
    }
    in_new_netns(|path| {
        let mut conn = Conn::open().unwrap();
        for family in Family::ALL {
            conn.probe_support(family, Chain::Prerouting, &redirect())
                .unwrap();
        }
        let mut setup = Batch::new(None);
        setup.push(Op::AddTable(Family::Ipv4));
        setup.push(Op::AddChain(Family::Ipv4, Chain::Output));
        conn.apply(&setup).unwrap();
        assert!(conn
            .list_rules(Family::Ipv4, Chain::Output)
            .unwrap()
            .is_empty());
        // Between the dump and the batch, an operator flushes the ruleset.
        nft(path, &["flush", "ruleset"]);
        let mut insert = Batch::new(None);
        insert.insert_rule(Family::Ipv4, Chain::Output, redirect());
        let err = conn.apply(&insert).unwrap_err();
        assert!(err.is_missing(), "{err}");
        assert!(!matches!(err, Error::Unsupported { .. }), "{err}");
        // The probe says the kernel lacks nothing: the chain was deleted, not missing.
        conn.probe_support(Family::Ipv4, Chain::Output, &redirect())
            .unwrap();
        assert_eq!(nft(path, &["list", "ruleset"]), "");
    });
}

#[test]
fn the_netns_cookie_tells_namespaces_apart_and_stays_with_the_socket() {
    if !privileged() {
        return;
    }
    let here = Conn::open().unwrap();
    let (there, cookie_there) = in_new_netns(|_| {
        let c = Conn::open().unwrap();
        let cookie = c.netns_cookie().unwrap();
        (c, cookie)
    });
    assert_ne!(here.netns_cookie().unwrap(), cookie_there);
    // Used from this thread, the socket still belongs to the namespace it was opened in.
    assert_eq!(there.netns_cookie().unwrap(), cookie_there);
    let ns = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
    assert!(switcheroo_sys::netns::is_network_namespace(&ns).unwrap());
    let not_ns = std::fs::File::open("/proc/self/stat").unwrap();
    assert!(!switcheroo_sys::netns::is_network_namespace(&not_ns).unwrap_or(false));
}

/// The socket inodes among this process's open file descriptors.
fn socket_inodes(pid: &str) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .filter(|l| l.starts_with("socket:"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_child_process_does_not_inherit_the_netlink_socket() {
    // No privilege needed: opening and binding a netfilter socket is allowed to anyone.
    let before = socket_inodes("self");
    let conn = Conn::open().unwrap();
    let ours: Vec<String> = socket_inodes("self")
        .into_iter()
        .filter(|s| !before.contains(s))
        .collect();
    // (Other tests of this file may open sockets meanwhile: they are Conns too.)
    assert!(!ours.is_empty());
    let out = Command::new("sh")
        .args(["-c", "for f in /proc/$$/fd/*; do readlink $f; done"])
        .output()
        .unwrap();
    let child = String::from_utf8_lossy(&out.stdout);
    assert!(
        ours.iter().all(|s| !child.contains(s.as_str())),
        "inherited: {child}"
    );
    drop(conn);
}

/// Brings up the loopback of the namespace at `path` and inserts `rule` at the head of a
/// fresh ip nat OUTPUT; returns the socket and what the kernel echoed.
fn loopback_with_output_rule(path: &str, rule: Redirect) -> (Conn, switcheroo_sys::Applied) {
    let up = Command::new("nsenter")
        .arg(format!("--net={path}"))
        .args(["ip", "link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(up.success());
    let mut conn = Conn::open().unwrap();
    let mut b = Batch::new(None);
    b.push(Op::AddTable(Family::Ipv4));
    b.push(Op::AddChain(Family::Ipv4, Chain::Output));
    b.insert_rule(Family::Ipv4, Chain::Output, rule);
    let applied = conn.apply(&b).unwrap();
    (conn, applied)
}

#[test]
fn conntrack_entries_redirected_to_a_port_are_listed_and_deleted_one_by_one() {
    if !privileged() {
        return;
    }
    in_new_netns(|path| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let comment = format!("SWITCHEROO:ns=t:port={port}:pid=1:start=1");
        let rule = Redirect::new(8080, port, &comment).unwrap();
        let (mut conn, _) = loopback_with_output_rule(path, rule);
        // Three connections to 8080, redirected to the listener.
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect("127.0.0.1:8080").unwrap())
            .collect();
        let (tcp, udp) = (Protocol::Tcp, Protocol::Udp);
        let entries = conn.conntrack_to_port(Family::Ipv4, tcp, port).unwrap();
        assert_eq!(entries.len(), 3, "{entries:?}");
        assert!(entries.iter().all(|e| e.reply_port == port));
        // Nothing is redirected to another port, and UDP has nothing on this one.
        assert!(conn
            .conntrack_to_port(Family::Ipv4, tcp, port ^ 1)
            .unwrap()
            .is_empty());
        assert!(conn
            .conntrack_to_port(Family::Ipv4, udp, port)
            .unwrap()
            .is_empty());
        assert!(conn.delete_conntrack(&entries[0]).unwrap());
        assert!(!conn.delete_conntrack(&entries[0]).unwrap(), "gone already");
        assert_eq!(
            conn.conntrack_to_port(Family::Ipv4, tcp, port)
                .unwrap()
                .len(),
            2
        );
        drop(clients);
    });
}

#[test]
fn a_udp_redirect_answers_from_the_public_port_and_its_flow_is_tracked_and_forgotten() {
    if !privileged() {
        return;
    }
    in_new_netns(|path| {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let comment = format!("SWITCHEROO:ns=t:port={port}:pid=1:start=1");
        let rule = Redirect::new(5353, port, &comment)
            .unwrap()
            .with_protocol(Protocol::Udp);
        let (mut conn, applied) = loopback_with_output_rule(path, rule.clone());
        assert_eq!(applied.inserted[0].redirect.as_ref(), Some(&rule));

        // A client "connected" to the public port gets the answer from it: the reply was
        // mapped back by the flow's conntrack entry.
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect("127.0.0.1:5353").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        client.send(b"ping").unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        server.send_to(&buf[..n], from).unwrap();
        assert_eq!(client.recv(&mut buf).unwrap(), 4);

        let entries = conn
            .conntrack_to_port(Family::Ipv4, Protocol::Udp, port)
            .unwrap();
        assert_eq!(entries.len(), 1, "{entries:?}");
        let entry = &entries[0];
        assert_eq!((entry.protocol, entry.reply_port), (Protocol::Udp, port));
        // A new flow with a reply has the unreplied-flow timeout (30 s by default) and is
        // not assured yet.
        assert!(matches!(entry.timeout, Some(1..=30)), "{entry:?}");
        assert!(!entry.assured());
        assert!(conn
            .conntrack_to_port(Family::Ipv4, Protocol::Tcp, port)
            .unwrap()
            .is_empty());
        assert!(conn.delete_conntrack(entry).unwrap());
        assert!(conn
            .conntrack_to_port(Family::Ipv4, Protocol::Udp, port)
            .unwrap()
            .is_empty());
    });
}
