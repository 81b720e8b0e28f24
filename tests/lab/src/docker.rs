//! A real dockerd (Debian's docker.io), confined to a network namespace made for the test:
//! started through `nsenter --net` into a private mount namespace whose `/run` is a fresh
//! tmpfs and whose `/etc` is an overlay (dockerd writes `/etc/docker/key.json`), with its
//! data, exec root, socket and pid file in a temporary directory and its containers'
//! cgroups under `/<namespace name>`. Its iptables rules (the published ports' DNAT, the
//! bridge's masquerade) live only in that namespace. Dropping it removes the containers,
//! stops dockerd, removes the cgroups and deletes the namespace.
//!
//! Never run dockerd in the machine's own network namespace: it would write its rules
//! there.

use crate::{Netns, TempPath};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DOCKERD: &str = "/usr/sbin/dockerd";
/// The client of the same package (a newer one elsewhere on PATH may not speak its API).
const DOCKER: &str = "/usr/bin/docker";

/// Whether dockerd can run here (root, docker.io installed); else the test skips with
/// the reason, or fails under CI (`CI=true`).
pub fn available() -> bool {
    if !crate::require_root() {
        return false;
    }
    let missing = [DOCKERD, DOCKER, "/usr/bin/nsenter", "/usr/bin/unshare"]
        .into_iter()
        .find(|p| !Path::new(p).exists());
    match missing {
        None => true,
        Some(p) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{p} is missing (ci/setup installs docker.io); CI=true forbids skipping")
        }
        Some(p) => {
            eprintln!("skipped: {p} is missing (ci/setup installs docker.io)");
            false
        }
    }
}

pub struct Dockerd {
    /// The namespace dockerd and its bridge live in (`ip netns exec` reaches it).
    pub netns: Netns,
    dir: TempPath,
    daemon: Child,
    /// Docker's bridge network, `10.213.0.1/24`.
    pub bridge: &'static str,
    /// How long dockerd took to answer `docker version`.
    pub started_in: Duration,
}

impl Dockerd {
    /// Starts dockerd in a new namespace; fails the test if it does not answer within 20 s.
    pub fn start() -> Dockerd {
        let netns = Netns::new();
        let dir = TempPath::new(&netns, "dockerd");
        std::fs::create_dir_all(&dir.0).unwrap();
        let d = dir.as_str();
        let script = format!(
            "mount -t tmpfs dkrun /run
             mkdir -p {d}/etc {d}/etc.work
             mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc,workdir={d}/etc.work /etc
             exec {DOCKERD} --data-root {d}/data --exec-root {d}/exec -H unix://{d}/docker.sock \
               --pidfile {d}/dockerd.pid --iptables=true --cgroup-parent=/{name} \
               --bip 10.213.0.1/24 --storage-driver overlay2 --log-level warn",
            name = netns.name
        );
        let started = Instant::now();
        let log = std::fs::File::create(dir.0.join("dockerd.log")).unwrap();
        let daemon = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", netns.name))
            .args(["unshare", "--mount", "--propagation", "slave", "sh", "-ec"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let mut dockerd = Dockerd {
            netns,
            dir,
            daemon,
            bridge: "10.213.0.1",
            started_in: Duration::ZERO,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if dockerd.docker(&["version"]).status.success() {
                dockerd.started_in = started.elapsed();
                return dockerd;
            }
            if Instant::now() > deadline || matches!(dockerd.daemon.try_wait(), Ok(Some(_))) {
                panic!("dockerd did not start; it said:\n{}", dockerd.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What dockerd logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("dockerd.log")).unwrap_or_default()
    }

    /// A directory for the test's own files, removed with the daemon.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.0.join("scratch").join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    /// `DOCKER_HOST` for a client of this daemon.
    pub fn host(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.as_str())
    }

    /// `docker args...` against this daemon.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new(DOCKER)
            .args(args)
            .env("DOCKER_HOST", self.host())
            .env("DOCKER_BUILDKIT", "0")
            .env("DOCKER_CONFIG", self.dir.0.join("client"))
            .output()
            .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
    }

    /// `docker args...`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits up to `timeout` until no container, running or not, is named `name` (a
    /// `--rm` container is removed some time after it exits); whether it is gone.
    pub fn wait_gone(&self, name: &str, timeout: Duration) -> bool {
        let filter = format!("name=^{name}$");
        crate::wait_until(
            timeout,
            Duration::from_millis(50),
            || self.ok(&["ps", "-aq", "--filter", &filter]).is_empty(),
            |gone| *gone,
        )
    }

    /// The ids of the containers, running or not.
    pub fn containers(&self) -> Vec<String> {
        self.ok(&["ps", "-aq", "--no-trunc"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The names of the containers, running or not, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .ok(&["ps", "-a", "--format", "{{.Names}}"])
            .lines()
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = self
            .docker(&["ps", "-aq"])
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect::<Vec<_>>();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = self.docker(&args);
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !matches!(self.daemon.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // Whatever is left in the namespace (containerd, shims) goes with it (Netns's
        // drop); then the containers' cgroups, in every hierarchy.
        for pid in self.netns.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let cg = h.path().join(&self.netns.name);
                kill_cgroups(&cg);
                let deadline = Instant::now() + Duration::from_secs(5);
                while cg.exists() && Instant::now() < deadline {
                    crate::systemd::remove_cgroups(&cg);
                    if cg.exists() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        // The data root holds overlay mounts only in dockerd's mount namespace, gone now.
    }
}

/// SIGKILL to every process in the cgroup `dir` and those below it.
fn kill_cgroups(dir: &Path) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                kill_cgroups(&entry.path());
            }
        }
    }
}
