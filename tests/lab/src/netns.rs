//! Network namespaces made for one test, and temporary paths that clean up after it.

use crate::process::{example, Hello};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace made for one test (`sw-<pid>-<n>`, loopback up). Dropping it kills
/// every process inside and deletes it, also when the test panics.
pub struct Netns {
    pub name: String,
}

impl Netns {
    // Making one creates a kernel object: not a default value.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Netns {
        let name = format!(
            "sw-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and returns what it did.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {args:?}: {e}", self.name))
    }

    /// Runs a command inside the namespace, asserts that it succeeded, returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Netns::ok`] for a command line without quoting (split on spaces).
    pub fn run(&self, line: &str) -> String {
        self.ok(&line.split(' ').collect::<Vec<_>>())
    }

    /// `iptables-nft-save -t nat` (`ip6tables-nft-save` for `v6`) inside the namespace,
    /// stdout and stderr together. Fails the test if the tool fails or calls the table
    /// incompatible (what iptables-nft says of a table with rules it cannot represent).
    pub fn save(&self, v6: bool) -> String {
        let tool = if v6 {
            "ip6tables-nft-save"
        } else {
            "iptables-nft-save"
        };
        let out = self.exec(&[tool, "-t", "nat"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{tool} failed: {text}");
        assert!(
            !text.contains("incompatible"),
            "{tool} calls the table incompatible:\n{text}"
        );
        text
    }

    /// The rule lines (`-A ...`) of both save outputs, each prefixed with `ip ` or `ip6 `.
    pub fn rule_lines(&self) -> Vec<String> {
        [(false, "ip"), (true, "ip6")]
            .into_iter()
            .flat_map(|(v6, family)| {
                self.save(v6)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .map(|l| format!("{family} {l}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Runs `f` on a thread that entered the namespace with setns(2), which moves only the
    /// calling thread; sockets it opens (TCP clients, the library's netlink socket) belong
    /// to the namespace for their whole life, whichever thread uses them later.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file =
                    std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `hello` with `args` in the namespace and waits for its ready line.
    pub fn hello(&self, args: &[&str]) -> Hello {
        self.hello_with(&[], args)
    }

    /// Starts the example `name` with `args` in the namespace and waits for its
    /// `ready pid=P port=Q` line.
    pub fn example(&self, name: &str, args: &[&str]) -> Hello {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(example(name))
            .args(args);
        Hello::start(cmd)
    }

    /// Starts `hello` under `wrapper` (e.g. `strace` and its options, or `setpriv ...`).
    pub fn hello_with(&self, wrapper: &[&str], args: &[&str]) -> Hello {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .args(wrapper)
            .arg(example("hello"))
            .args(args);
        Hello::start(cmd)
    }

    /// A second namespace joined to this one by a veth pair, so that its clients reach
    /// this one "from the network" (through PREROUTING). Documentation ranges only: this
    /// side 192.0.2.1/24 and 2001:db8::1/64, the peer 192.0.2.2/24 and 2001:db8::2/64.
    pub fn peer(&self) -> Netns {
        let peer = Netns::new();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let (here, there) = (format!("swa{n}"), format!("swb{n}"));
        self.ok(&[
            "ip", "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", &peer.name,
        ]);
        for (ns, dev, v4, v6) in [
            (self, &here, "192.0.2.1/24", "2001:db8::1/64"),
            (&peer, &there, "192.0.2.2/24", "2001:db8::2/64"),
        ] {
            ns.ok(&["ip", "addr", "add", v4, "dev", dev]);
            // nodad: the address is usable at once instead of after duplicate detection.
            ns.ok(&["ip", "-6", "addr", "add", v6, "dev", dev, "nodad"]);
            ns.ok(&["ip", "link", "set", dev, "up"]);
        }
        peer
    }

    /// Takes the commit lock of service `namespace` in this network namespace, as another
    /// privileged deployer in the middle of its commit would: the returned socket owns the
    /// lock table; dropping it releases the lock, as the holder's exit would.
    pub fn hold_lock(&self, namespace: &str) -> switcheroo_sys::Conn {
        use switcheroo_sys::{Batch, Conn, Op, OwnedTable};
        self.enter(|| {
            let mut conn = Conn::open().expect("netlink socket");
            let mut lock = Batch::new(None);
            lock.push(Op::AddOwnedTable(
                OwnedTable::new(format!("switcheroo-lock-{namespace}")).unwrap(),
            ));
            conn.apply(&lock).expect("take the lock");
            conn
        })
    }

    /// The pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A path in the temporary directory, named after `ns` and `what`, removed when dropped
/// (also when the test panics).
pub struct TempPath(pub PathBuf);

impl TempPath {
    pub fn new(ns: &Netns, what: &str) -> TempPath {
        TempPath(std::env::temp_dir().join(format!("{}-{what}", ns.name)))
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sets a flag when dropped, so that helper threads of a scope stop even when the test
/// body panics (a scope joins its threads before the panic propagates).
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
