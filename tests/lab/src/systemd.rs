//! A real systemd (the machine's own, 252 on Debian 12) as PID 1 of a test's own
//! network, pid, mount, uts, ipc and cgroup namespaces, on a private root (tmpfs, `/usr`
//! bound read-only, `/etc` an overlay of the host's, fresh `/tmp`, `/run`, `/var`, `/dev`),
//! driven from outside with `nsenter ... systemctl`. Booted in under a second; dropping
//! the machine kills its PID 1 (and with it the pid namespace), removes its cgroups and
//! deletes its network namespace. Nothing is left outside the test's temporary directory,
//! and the machine's own `/tmp` is never seen by that systemd.

use crate::{Netns, TempPath};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BOOT: &str = include_str!("systemd-root.sh");

/// How a machine boots.
#[derive(Debug, Clone)]
pub struct Boot {
    /// Host paths bound read-only at the same place (the build's binaries).
    pub binds: Vec<PathBuf>,
    /// What systemd starts: `test.target` (the journal only) or `multi-user.target`.
    pub unit: String,
    /// `/usr` and `/var/lib/dpkg` as overlays, so that a package can be installed.
    pub writable_usr: bool,
    /// The writable layers of an earlier machine (its `/etc` with units and users), as
    /// after a reboot.
    pub after: Option<PathBuf>,
}

impl Default for Boot {
    fn default() -> Self {
        Boot {
            binds: Vec::new(),
            unit: "test.target".into(),
            writable_usr: false,
            after: None,
        }
    }
}

/// Whether systemd can boot here as a test's PID 1: root, namespaces, a cgroup2
/// hierarchy, systemd, `script` and `nsenter`. Outside CI a missing part skips (with the
/// reason printed); under CI it fails.
pub fn available() -> bool {
    if !crate::require_root() {
        return false;
    }
    let missing = [
        "/usr/lib/systemd/systemd",
        "/usr/bin/script",
        "/usr/bin/nsenter",
    ]
    .into_iter()
    .find(|p| !Path::new(p).exists())
    .map(|p| format!("{p} is missing"))
    .or_else(|| cgroup2_root().err());
    match missing {
        None => true,
        Some(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{reason}; CI=true forbids skipping")
        }
        Some(reason) => {
            eprintln!("skipped: {reason}");
            false
        }
    }
}

/// The cgroup2 hierarchy: `/sys/fs/cgroup/unified` on a hybrid host, `/sys/fs/cgroup` on a
/// pure v2 one.
pub(crate) fn cgroup2_root() -> Result<PathBuf, String> {
    for path in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(path).join("cgroup.procs").exists()
            && Path::new(path).join("cgroup.controllers").exists()
        {
            return Ok(PathBuf::from(path));
        }
    }
    Err("no cgroup2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup".into())
}

/// A booted systemd.
pub struct Machine {
    /// Its network namespace (`ip netns exec` reaches it; `enter` from the test).
    pub netns: Netns,
    /// Its writable layers (`etc`, and `usr` with a writable /usr): give them to
    /// [`Boot::after`] to boot again "after a reboot".
    pub layers: PathBuf,
    dir: TempPath,
    cgroup: PathBuf,
    pid1: u32,
    console: Child,
    /// When `systemctl is-system-running` first said running or degraded.
    pub booted_in: Duration,
}

impl Machine {
    /// Boots a machine; fails the test if it is not running within 20 s.
    pub fn boot(boot: Boot) -> Machine {
        let netns = Netns::new();
        let dir = TempPath::new(&netns, "machine");
        std::fs::create_dir_all(dir.0.join("root")).unwrap();
        let layers = boot.after.clone().unwrap_or_else(|| dir.0.join("layers"));
        std::fs::create_dir_all(&layers).unwrap();
        let script = dir.0.join("boot.sh");
        std::fs::write(&script, BOOT).unwrap();
        let cgroup = cgroup2_root().unwrap().join(&netns.name);
        std::fs::create_dir_all(&cgroup).unwrap();
        let inner = format!(
            "ip netns exec {name} unshare --pid --fork --mount --uts --ipc --cgroup sh {script}",
            name = netns.name,
            script = script.display()
        );
        let binds: Vec<String> = boot.binds.iter().map(|b| b.display().to_string()).collect();
        let started = Instant::now();
        // Into the cgroup first (`ip netns exec` remounts /sys and would hide it), and with
        // `sh -e`, so that a failed write stops everything instead of leaving systemd in
        // the host's root cgroup. `script` gives systemd a pty for its console.
        let console = Command::new("sh")
            .args([
                "-ec",
                "echo $$ > \"$CG/cgroup.procs\"; exec script -qfec \"$INNER\" \"$LOG\"",
            ])
            .env("CG", &cgroup)
            .env("INNER", &inner)
            .env("LOG", dir.0.join("console.log"))
            .env("NAME", &netns.name)
            .env("ROOT", dir.0.join("root"))
            .env("UPPER", &layers)
            .env("BINDS", binds.join(" "))
            .env("UNIT", &boot.unit)
            .env("WRITABLE_USR", if boot.writable_usr { "1" } else { "0" })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the machine");
        let mut machine = Machine {
            netns,
            layers,
            dir,
            cgroup,
            pid1: 0,
            console,
            booted_in: Duration::ZERO,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if machine.pid1 == 0 {
                machine.pid1 =
                    std::fs::read_to_string(machine.cgroup.join("init.scope/cgroup.procs"))
                        .ok()
                        .and_then(|s| s.lines().next()?.trim().parse().ok())
                        .unwrap_or(0);
            }
            if machine.pid1 != 0 {
                let state = machine.systemctl(&["is-system-running"]);
                let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
                if state == "running" || state == "degraded" {
                    machine.booted_in = started.elapsed();
                    return machine;
                }
            }
            if Instant::now() > deadline || matches!(machine.console.try_wait(), Ok(Some(_))) {
                panic!(
                    "systemd did not boot in {}; its console said:\n{}",
                    machine.netns.name,
                    machine.console_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What systemd printed on its console.
    pub fn console_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("console.log")).unwrap_or_default()
    }

    /// Runs `args` inside the machine (every namespace of its PID 1, as `systemctl` and
    /// `journalctl` need).
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid1.to_string(), "-a"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("nsenter {args:?}: {e}"))
    }

    /// [`Machine::exec`] that must succeed; its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed ({}): {}{}",
            self.netns.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl args...` inside the machine.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.exec(&[&["systemctl"], args].concat())
    }

    /// One property of a unit (`systemctl show -p NAME --value UNIT`).
    pub fn property(&self, unit: &str, name: &str) -> String {
        let out = self.systemctl(&["show", "-p", name, "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits up to `timeout` for `unit`'s ActiveState to be `state` (a unit that is
    /// draining passes through `deactivating` first); the state it ended in.
    pub fn wait_state(&self, unit: &str, state: &str, timeout: Duration) -> String {
        self.wait_property(unit, "ActiveState", |now| now == state, timeout)
    }

    /// Waits up to `timeout` for property `name` of `unit` to satisfy `want`; its last
    /// value.
    pub fn wait_property(
        &self,
        unit: &str,
        name: &str,
        want: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> String {
        crate::wait_until(
            timeout,
            Duration::from_millis(50),
            || self.property(unit, name),
            |now| want(now),
        )
    }

    /// `unit`'s journal, messages only.
    pub fn journal(&self, unit: &str) -> String {
        self.ok(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
    }

    /// `unit`'s journal once it holds `text`, or after `timeout`: journald stores a
    /// process's last lines on its own schedule, after the unit may have ended.
    pub fn journal_with(&self, unit: &str, text: &str, timeout: Duration) -> String {
        crate::wait_until(
            timeout,
            Duration::from_millis(100),
            || self.journal(unit),
            |journal| journal.contains(text),
        )
    }

    /// The machine's file `path` (absolute inside it), as the host reaches it.
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid1))
    }

    /// Writes `contents` to the machine's file `path`, making its directories.
    pub fn write(&self, path: &str, contents: &str) {
        let host = self.path(path);
        std::fs::create_dir_all(host.parent().unwrap()).unwrap();
        std::fs::write(&host, contents).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }

    /// The pid, as the host sees it, of a unit's main process.
    pub fn main_pid(&self, unit: &str) -> Option<u32> {
        let inner: u32 = self
            .property(unit, "MainPID")
            .parse()
            .ok()
            .filter(|p| *p != 0)?;
        // The unit's cgroup lists host pids; the one whose NSpid ends in `inner` is it.
        let procs = self.property(unit, "ControlGroup");
        let file = self
            .cgroup
            .join(procs.trim_start_matches('/'))
            .join("cgroup.procs");
        let pids = std::fs::read_to_string(file).ok()?;
        pids.lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("NSpid:"))
                            .and_then(|v| v.split_whitespace().last()?.parse::<u32>().ok())
                    })
                    == Some(inner)
            })
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SIGKILL to PID 1 ends the pid namespace: every process of the machine dies.
        if self.pid1 != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid1 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.console.kill();
        let _ = self.console.wait();
        // Its cgroups, deepest first, once their processes are gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.cgroup.exists() && Instant::now() < deadline {
            remove_cgroups(&self.cgroup);
            if self.cgroup.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Removes the cgroup directory `dir` and those below it, deepest first.
pub(crate) fn remove_cgroups(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroups(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
