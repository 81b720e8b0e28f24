//! One service per public port: a deploy under another namespace name is refused (naming
//! the namespace that serves and its pid, the ruleset unchanged) unless it moves the
//! service explicitly; `check` says so before the first deploy, and names a process that
//! listens on the public port itself, which the redirect would shadow.

use lab::command::{run, run_to_end, switcheroo, text};
use lab::{example, get, require_root, Netns};
use std::process::{Command, Stdio};
use std::time::Duration;
use switcheroo::{Error, Port, Switcheroo};

#[test]
fn the_library_refuses_a_port_another_namespace_serves_and_moves_it_when_asked() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut a = ns.hello(&["--namespace", "alpha", "--port", "8096"]);
    let before = ns.rule_lines();
    let refused = ns.enter(|| {
        let sw = Switcheroo::builder("beta", 8096).build().unwrap();
        let (_listener, takeover) = sw.begin().unwrap();
        takeover.commit().unwrap_err()
    });
    match &refused {
        Error::PortHeld {
            port,
            namespace,
            pid,
            wanted,
            ..
        } => assert_eq!(
            (*port, namespace.as_str(), *pid, wanted.as_str()),
            (Port::tcp(8096), "alpha", a.pid, "beta")
        ),
        other => panic!("{other:?}"),
    }
    eprintln!("{refused}");
    assert_eq!(ns.rule_lines(), before, "a refused deploy changes nothing");

    // Moved explicitly: one transaction, and alpha's instance retires as if replaced.
    let (listener, report) = ns.enter(|| {
        let sw = Switcheroo::builder("beta", 8096).build().unwrap();
        let (listener, takeover) = sw.begin().unwrap();
        (listener, takeover.moving_from("alpha").commit().unwrap())
    });
    assert_eq!(report.signalled, [a.pid]);
    a.expect_clean_exit("alpha's instance, moved away");
    let rules = ns.rule_lines();
    assert_eq!(rules.len(), 4, "{rules:?}");
    assert!(
        rules.iter().all(|l| l.contains("SWITCHEROO:ns=beta:")),
        "{rules:?}"
    );
    drop(listener);
}

/// `begin` reads the chains and the commit may reuse that read when nothing changed the
/// ruleset since; here another namespace takes the port in between, and the commit must
/// see it.
#[test]
fn a_port_taken_between_begin_and_commit_is_refused() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let (refused, a, before) = ns.enter(|| {
        let sw = Switcheroo::builder("beta", 8095).build().unwrap();
        let (_listener, takeover) = sw.begin().unwrap();
        let a = ns.hello(&["--namespace", "alpha", "--port", "8095"]);
        let before = ns.rule_lines();
        (takeover.commit().unwrap_err(), a, before)
    });
    match &refused {
        Error::PortHeld { namespace, pid, .. } => {
            assert_eq!((namespace.as_str(), *pid), ("alpha", a.pid))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(ns.rule_lines(), before, "a refused deploy changes nothing");
    let (status, body) = ns
        .enter(|| get("127.0.0.1:8095".parse().unwrap(), "/"))
        .unwrap();
    assert_eq!((status, lab::pid_of(&body)), (200, a.pid));
}

#[test]
fn run_and_check_refuse_a_port_another_namespace_serves_until_it_is_moved() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let hello = example("hello");
    let hello = hello.to_str().unwrap();
    let mut web = run(&ns, &["-n", "web", "-p", "8096", "--", hello]);
    let before = ns.rule_lines();

    // Forgetting -n: refused before anything starts, naming who serves.
    let (status, out) = run_to_end(&ns, &["-p", "8096", "--", hello]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "public port 8096/tcp (ip PREROUTING) is served by pid {} of namespace \"web\"",
            web.pid
        )),
        "{out}"
    );
    assert!(out.contains("--move-from web"), "{out}");
    assert!(!out.contains("] started "), "a server was started: {out}");
    assert_eq!(ns.rule_lines(), before);

    // check says the same before a deploy.
    let out = switcheroo(&ns, &["check", "-p", "8096"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "BLOCKER  public    public port 8096/tcp is served by pid {} of namespace \"web\"",
            web.pid
        )),
        "{}",
        text(&out)
    );
    let out = switcheroo(&ns, &["check", "-n", "web", "-p", "8096"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Moving the service to a new name: www serves, web's run exits 0 as replaced.
    let www = run(
        &ns,
        &["-n", "www", "--move-from", "web", "-p", "8096", "--", hello],
    );
    let status = web.wait_exit(Duration::from_secs(15)).expect("web retires");
    assert_eq!(status.code(), Some(0), "{:?}", web.log);
    web.line_containing("was replaced");
    let rules = ns.rule_lines();
    assert!(
        rules.iter().all(|l| l.contains("SWITCHEROO:ns=www:")),
        "{rules:?}"
    );
    let (_, body) = ns
        .enter(|| get("127.0.0.1:8096".parse().unwrap(), "/"))
        .unwrap();
    assert!(body.ends_with(&format!("port {}", www.port)), "{body}");
}

#[test]
fn a_process_listening_on_the_public_port_itself_is_named_by_check_and_run() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    // Not under switcheroo: python's http.server on the public port itself.
    let mut squatter = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "python3",
            "-m",
            "http.server",
            "8095",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ns
        .enter(|| get("127.0.0.1:8095".parse().unwrap(), "/"))
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = squatter.id();
    let out = switcheroo(&ns, &["check", "-n", "site", "-p", "8095"]);
    let said = text(&out);
    assert!(
        said.contains(&format!(
            "warning  public    pid {pid} (python3) listens on public port 8095/tcp itself"
        )),
        "{said}"
    );
    let hello = example("hello");
    let mut h = run(
        &ns,
        &["-n", "site", "-p", "8095", "--", hello.to_str().unwrap()],
    );
    h.line_containing(&format!(
        "pid {pid} (python3) listens on public port 8095/tcp itself"
    ));
    drop(h);
    let _ = squatter.kill();
    let _ = squatter.wait();
}
