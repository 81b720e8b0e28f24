//! What switcheroo's tests and benches share: throwaway network namespaces, the example
//! servers as real processes, small HTTP and UDP clients, the load generator, and the
//! chaos and soak scenarios. An unpublished crate of the workspace, a dev-dependency of
//! `switcheroo`.
//!
//! Nothing here touches the ruleset of the machine's own network namespace: every command
//! that reads or edits nftables runs through `ip netns exec` in a namespace made for the
//! test, and every socket is opened by a thread that entered that namespace.

pub mod bench;
pub mod chaos;
pub mod command;
pub mod docker;
pub mod http;
pub mod load;
mod netns;
mod process;
pub mod soak;
pub mod systemd;
pub mod udp;

pub use http::{get, KeepAlive, Response};
pub use netns::{Netns, StopOnDrop, TempPath};
pub use process::{example, expected_rule, pid_of, start_time, switcheroo_bin, Hello};
pub use udp::{version, FlowLog, UdpLoad};

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Looks (`look`) every `every` until `done` holds for what it saw, or `timeout` has
/// passed; what it saw last. For what happens in the background after an action (a unit
/// settling, a container removed, a journal line stored): a test asserts on the result.
pub fn wait_until<T>(
    timeout: Duration,
    every: Duration,
    mut look: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = look();
        if done(&seen) || Instant::now() >= deadline {
            return seen;
        }
        std::thread::sleep(every);
    }
}

/// Whether the privileged tests can run here: root, and allowed to create network
/// namespaces (a root without CAP_SYS_ADMIN, e.g. in an unprivileged container, is not).
/// If not, the test prints `skipped: <reason>` and returns early, except under CI
/// (`CI=true`), where a skip would make a green run meaningless: there it fails.
pub fn require_root() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (network namespaces and nftables)".into());
        }
        let name = format!("sw-probe-{}", std::process::id());
        let added = Command::new("ip").args(["netns", "add", &name]).output();
        match added {
            Ok(out) if out.status.success() => {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
                Ok(())
            }
            Ok(out) => Err(format!(
                "`ip netns add` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run `ip` (iproute2): {e}")),
        }
    });
    match probe {
        Ok(()) => true,
        Err(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{reason}; CI=true forbids skipping")
        }
        Err(reason) => {
            eprintln!("skipped: {reason}");
            false
        }
    }
}
