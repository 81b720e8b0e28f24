//! A fleet rolled by Ansible behind HAProxy, as `contrib/ansible/` does it: three hosts
//! (real systemd machines, `lab::systemd`, with sshd and the shipped unit
//! `contrib/systemd/web@.service`), a load balancer namespace running HAProxy with
//! `option httpchk`, and a controller namespace that runs `ansible-playbook` over SSH and
//! the client load through the balancer, all on a bridge of their own
//! (198.51.100.0/24, a documentation range, on veths only).
//!
//! Three rollouts under load lose no request at the balancer and HAProxy never marks a
//! host down; a release that never becomes ready stops the rollout at the first host; the
//! rollback play puts the previous release back everywhere.

use lab::load::{Load, Plan, Totals};
use lab::systemd::{Boot, Machine};
use lab::{get, pid_of, switcheroo_bin, Netns, TempPath};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LB: &str = "198.51.100.2";
const CONTROLLER: &str = "198.51.100.3";
const HOSTS: [&str; 3] = ["198.51.100.11", "198.51.100.12", "198.51.100.13"];

fn contrib(path: &str) -> String {
    format!("{}/contrib/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn have_tools() -> bool {
    lab::systemd::available()
        && lab::command::have("haproxy", &["-v"], "haproxy")
        && lab::command::have("ansible-playbook", &["--version"], "ansible-core (pip)")
        && lab::command::have("/usr/sbin/sshd", &["-V"], "openssh-server")
        && lab::command::have("ssh", &["-V"], "openssh-client")
}

struct Fleet {
    hosts: Vec<Machine>,
    lb: Netns,
    controller: Netns,
    haproxy: Option<Child>,
    dir: TempPath,
    // Dropped last: the bridge the others hang on.
    _lan: Netns,
}

impl Fleet {
    fn new() -> Fleet {
        let lan = Netns::new();
        let dir = TempPath::new(&lan, "fleet");
        std::fs::create_dir_all(dir.0.join("releases")).unwrap();
        lan.ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        lan.ok(&["ip", "link", "set", "br0", "up"]);
        let plug = |i: usize, ns: &str, addr: &str| {
            let port = format!("p{i}");
            lan.ok(&[
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            lan.ok(&["ip", "link", "set", &port, "master", "br0", "up"]);
            let run = |args: &[&str]| {
                let out = Command::new("ip")
                    .args(["-n", ns])
                    .args(args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "ip {args:?} in {ns}: {out:?}");
            };
            run(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            run(&["link", "set", "eth0", "up"]);
        };
        let lb = Netns::new();
        let controller = Netns::new();
        plug(0, &lb.name, LB);
        plug(1, &controller.name, CONTROLLER);

        let key = dir.0.join("id");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "fleet-test", "-f"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-keygen: {out:?}");
        let public = std::fs::read_to_string(dir.0.join("id.pub")).unwrap();
        let unit = std::fs::read_to_string(contrib("systemd/web@.service"))
            .unwrap()
            .replace("/usr/bin/switcheroo", switcheroo_bin().to_str().unwrap());
        let build = switcheroo_bin().parent().unwrap().to_path_buf();
        let t = Instant::now();
        let hosts: Vec<Machine> = std::thread::scope(|scope| {
            let booting: Vec<_> = HOSTS
                .iter()
                .enumerate()
                .map(|(i, addr)| {
                    let (build, unit, public, plug) = (&build, &unit, &public, &plug);
                    scope.spawn(move || {
                        let m = Machine::boot(Boot {
                            binds: vec![build.clone()],
                            ..Boot::default()
                        });
                        plug(2 + i, &m.netns.name, addr);
                        m.ok(&["useradd", "--system", "--no-create-home", "web"]);
                        m.write("/etc/systemd/system/web@.service", unit);
                        m.write("/root/.ssh/authorized_keys", public);
                        m.ok(&["chmod", "-R", "go-rwx", "/root/.ssh"]);
                        m.write("/etc/ssh/sshd_config.d/fleet-test.conf", "UsePAM no\n");
                        m.ok(&["systemctl", "daemon-reload"]);
                        m.ok(&["systemctl", "start", "ssh"]);
                        m
                    })
                })
                .collect();
            booting.into_iter().map(|b| b.join().unwrap()).collect()
        });
        eprintln!("3 hosts booted with sshd in {:?}", t.elapsed());

        Fleet {
            hosts,
            lb,
            controller,
            haproxy: None,
            dir,
            _lan: lan,
        }
    }

    /// Starts HAProxy in the balancer's namespace and waits until it sees every host up.
    fn start_balancer(&mut self) {
        let dir = &self.dir;
        let cfg = dir.0.join("haproxy.cfg");
        let mut text = format!(
            "global\n    maxconn 4000\n    stats socket {sock} mode 600 level admin\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    \
             timeout server 30s\n    # A check's answer may take a loaded host 2 s; \
             a refused or reset one fails at once.\n    timeout check 2s\n    # A host that refuses or resets is a failed request, \
             not a retry elsewhere.\n    retries 0\n\
             frontend web\n    bind {LB}:80\n    default_backend hosts\n\
             backend hosts\n    option httpchk GET /healthz\n    \
             default-server inter 500ms fall 2 rise 1\n",
            sock = dir.0.join("haproxy.sock").display()
        );
        for (i, addr) in HOSTS.iter().enumerate() {
            text.push_str(&format!("    server h{} {addr}:8080 check\n", i + 1));
        }
        std::fs::write(&cfg, text).unwrap();
        let haproxy = Command::new("ip")
            .args(["netns", "exec", &self.lb.name, "haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("haproxy.log")).unwrap())
            .spawn()
            .expect("start haproxy");
        self.haproxy = Some(haproxy);
        let t = Instant::now();
        while self.stats().iter().filter(|(_, s, _)| s == "UP").count() < 3 {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "HAProxy: {:?}\n{}",
                self.stats(),
                std::fs::read_to_string(self.dir.0.join("haproxy.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("HAProxy sees 3 hosts up {:?} after its start", t.elapsed());
    }

    /// A release archive (`bin/server`, a script) for `contrib/ansible/rollout.yml`.
    fn archive(&self, version: &str, script: &str) -> PathBuf {
        let tree = self.dir.0.join("releases").join(version);
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        let server = tree.join("bin/server");
        std::fs::write(&server, script).unwrap();
        std::fs::set_permissions(&server, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let archive = self
            .dir
            .0
            .join("releases")
            .join(format!("{version}.tar.gz"));
        let out = Command::new("tar")
            .arg("-czf")
            .arg(&archive)
            .arg("-C")
            .arg(&tree)
            .arg("bin")
            .output()
            .unwrap();
        assert!(out.status.success(), "tar: {out:?}");
        archive
    }

    /// `ansible-playbook -i INVENTORY contrib/ansible/PLAY -e ...` from the controller.
    fn play(&self, play: &str, extra: &[String]) -> (Output, Duration) {
        let inventory = self.dir.0.join("inventory");
        let mut text = String::from("[web]\n");
        for (i, addr) in HOSTS.iter().enumerate() {
            text.push_str(&format!("h{} ansible_host={addr}\n", i + 1));
        }
        text.push_str(&format!(
            "[web:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n\
             ansible_python_interpreter=/usr/bin/python3\n\
             ansible_ssh_common_args=-F /dev/null -o UserKnownHostsFile=/dev/null \
             -o StrictHostKeyChecking=no\n",
            self.dir.0.join("id").display()
        ));
        std::fs::write(&inventory, text).unwrap();
        let home = self.dir.0.join("ansible");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.controller.name,
            "ansible-playbook",
            "-i",
        ])
        .arg(&inventory)
        .arg(contrib(&format!("ansible/{play}")));
        for e in extra {
            cmd.args(["-e", e]);
        }
        let t = Instant::now();
        let out = cmd
            .env("ANSIBLE_HOME", &home)
            .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", home.join("cp"))
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_PIPELINING", "True")
            .output()
            .expect("run ansible-playbook");
        (out, t.elapsed())
    }

    /// HAProxy's `show stat`: (server, status, chkdown) of each host.
    fn stats(&self) -> Vec<(String, String, u64)> {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.dir.0.join("haproxy.sock"))
        else {
            return Vec::new();
        };
        s.write_all(b"show stat\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or("")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (px, sv, status, chkdown) =
            (col("pxname"), col("svname"), col("status"), col("chkdown"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > chkdown && f[px] == "hosts" && f[sv].starts_with('h'))
            .map(|f| {
                (
                    f[sv].to_owned(),
                    f[status].to_owned(),
                    f[chkdown].parse().unwrap_or(0),
                )
            })
            .collect()
    }

    /// HAProxy's count of UP-to-DOWN transitions, all hosts.
    fn check_downs(&self) -> u64 {
        self.stats().iter().map(|(_, _, n)| n).sum()
    }

    /// The pid (in host `i`) of release `version`'s server, if its unit runs.
    fn server_of(&self, i: usize, version: &str) -> Option<u32> {
        let m = &self.hosts[i];
        let run = m.property(&format!("web@{version}"), "MainPID");
        let out = m.exec(&["pgrep", "-P", &run]);
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// The pid that answers on host `i`'s public port, from the controller.
    fn serving(&self, i: usize) -> Option<u32> {
        let addr: SocketAddr = format!("{}:8080", HOSTS[i]).parse().unwrap();
        self.controller
            .enter(|| get(addr, "/"))
            .ok()
            .map(|(_, body)| pid_of(&body))
    }

    fn assert_all_serve(&self, version: &str) {
        for i in 0..HOSTS.len() {
            let expected = self.server_of(i, version);
            assert!(
                expected.is_some(),
                "web@{version} does not run on h{}",
                i + 1
            );
            assert_eq!(self.serving(i), expected, "h{} serves web@{version}", i + 1);
        }
    }

    fn load(&self) -> Load {
        let mut plan = Plan::new(format!("{LB}:80").parse().unwrap());
        plan.close_clients = 2;
        plan.keepalive_clients = 2;
        plan.pause = Duration::from_millis(5);
        self.controller.enter(|| Load::start(&plan))
    }

    /// Watches each host's public port from the controller: when each started to answer
    /// from a new pid.
    fn watch(&self) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let initial: Vec<Option<u32>> = (0..HOSTS.len()).map(|i| self.serving(i)).collect();
        let (s, w) = (stop.clone(), seen.clone());
        let ns = self.controller.name.clone();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut last = initial;
            while !s.load(Ordering::Relaxed) {
                for (i, addr) in HOSTS.iter().enumerate() {
                    let addr: SocketAddr = format!("{addr}:8080").parse().unwrap();
                    if let Ok((200, body)) = get(addr, "/") {
                        let pid = Some(pid_of(&body));
                        if pid != last[i] {
                            w.lock().unwrap().push((i, Instant::now()));
                            last[i] = pid;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Watch { stop, seen, thread }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(haproxy) = &mut self.haproxy {
            let _ = haproxy.kill();
            let _ = haproxy.wait();
        }
        // The ssh multiplexing masters Ansible left in the controller's namespace go with
        // it (Netns's drop kills what is inside); the hosts with their machines.
    }
}

struct Watch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(usize, Instant)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Watch {
    /// When each host switched, in order.
    fn stop(self) -> Vec<(usize, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}

fn must(play: &str, (out, took): (Output, Duration)) -> Duration {
    assert!(
        out.status.success(),
        "{play} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

#[test]
fn ansible_rolls_releases_across_hosts_behind_haproxy_without_a_failed_request() {
    if !have_tools() {
        return;
    }
    let mut fleet = Fleet::new();
    let hello = lab::example("hello");
    let good = format!("#!/bin/sh\nexec {} \"$@\"\n", hello.display());
    let archives: Vec<PathBuf> = ["v1", "v2", "v3", "v4"]
        .iter()
        .map(|v| fleet.archive(v, &good))
        .collect();
    let bad = fleet.archive(
        "v5",
        "#!/bin/sh\necho 'v5: cannot open its database' >&2\nexit 1\n",
    );
    let rollout = |fleet: &Fleet, v: &str, archive: &Path, serial: usize| {
        fleet.play(
            "rollout.yml",
            &[
                format!("version={v}"),
                format!("release_archive={}", archive.display()),
                format!("serial={serial}"),
            ],
        )
    };

    // The first release on every host at once (nothing serves yet): a cold start, before
    // the balancer is up.
    let took = must("rollout v1", rollout(&fleet, "v1", &archives[0], 3));
    eprintln!("rollout of v1 (cold, 3 hosts at once): {took:?}");
    fleet.assert_all_serve("v1");
    fleet.start_balancer();
    let downs = fleet.check_downs();

    // Three rollouts under load through the balancer.
    let running = fleet.load();
    for (v, archive) in ["v2", "v3", "v4"].iter().zip(&archives[1..]) {
        std::thread::sleep(Duration::from_millis(300));
        let watch = fleet.watch();
        let began = Instant::now();
        let took = must(&format!("rollout {v}"), rollout(&fleet, v, archive, 1));
        let seen = watch.stop();
        let mut at = began;
        let per_host: Vec<String> = seen
            .iter()
            .map(|(i, when)| {
                let step = when.duration_since(at);
                at = *when;
                format!("h{} {} ms", i + 1, step.as_millis())
            })
            .collect();
        eprintln!(
            "rollout of {v}: {took:?} in all; switched {}",
            per_host.join(", ")
        );
        assert_eq!(seen.len(), 3, "each host switched once: {seen:?}");
        fleet.assert_all_serve(v);
    }
    std::thread::sleep(Duration::from_millis(300));
    let totals = Totals::of(&[running.stop()]);
    eprintln!(
        "3 rollouts: {} requests through HAProxy, {} failed; HAProxy check-downs {} (before {downs})",
        totals.ok,
        totals.failed,
        fleet.check_downs()
    );
    assert_eq!(totals.failed, 0, "{:?}", totals.samples);
    assert!(totals.ok > 1000, "the load ran: {}", totals.ok);
    assert_eq!(downs, 0, "{:?}", fleet.stats());
    assert_eq!(fleet.check_downs(), downs, "{:?}", fleet.stats());
    // Enabled for boot: only the newest.
    for m in &fleet.hosts {
        assert_eq!(m.property("web@v4", "UnitFileState"), "enabled");
        assert_eq!(m.property("web@v3", "UnitFileState"), "disabled");
    }

    // A release that never becomes ready: the first host fails, the play stops there.
    let running = fleet.load();
    let (out, took) = rollout(&fleet, "v5", &bad, 1);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the bad rollout succeeded:\n{text}");
    let totals = Totals::of(&[running.stop()]);
    eprintln!(
        "rollout of a release that exits at start: failed after {took:?}; {} requests, {} failed",
        totals.ok, totals.failed
    );
    assert_eq!(totals.failed, 0, "{:?}", totals.samples);
    let state = fleet.hosts[0].wait_state("web@v5", "failed", Duration::from_secs(15));
    assert_eq!(state, "failed");
    for (i, m) in fleet.hosts.iter().enumerate().skip(1) {
        assert_eq!(
            m.property("web@v5", "ActiveState"),
            "inactive",
            "h{} was touched",
            i + 1
        );
        assert!(!m.path("/srv/web/v5").exists(), "h{} got v5", i + 1);
    }
    fleet.assert_all_serve("v4");

    // Back to v3, the standby of every host's probation.
    let running = fleet.load();
    let took = must(
        "rollback v3",
        fleet.play(
            "rollback.yml",
            &[
                "version=v3".into(),
                format!("switcheroo_bin={}", switcheroo_bin().display()),
            ],
        ),
    );
    let totals = Totals::of(&[running.stop()]);
    eprintln!(
        "rollback to v3: {took:?}; {} requests, {} failed; HAProxy check-downs {}",
        totals.ok,
        totals.failed,
        fleet.check_downs()
    );
    assert_eq!(totals.failed, 0, "{:?}", totals.samples);
    fleet.assert_all_serve("v3");
    // The replaced release leaves by itself once its last connection (HAProxy's included)
    // has ended: `deactivating` while it drains, then `failed` with status 4.
    let t = Instant::now();
    for m in &fleet.hosts {
        assert_eq!(
            m.wait_state("web@v4", "failed", Duration::from_secs(60)),
            "failed"
        );
        assert_eq!(m.property("web@v4", "ExecMainStatus"), "4");
        assert_eq!(m.property("web@v3", "UnitFileState"), "enabled");
        assert_eq!(m.property("web@v4", "UnitFileState"), "disabled");
    }
    eprintln!(
        "the rolled-back releases had all exited {:?} after the play",
        t.elapsed()
    );
    assert_eq!(fleet.check_downs(), downs, "{:?}", fleet.stats());
}
