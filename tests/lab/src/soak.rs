//! Soak: one long-lived instance of each kind (`hello` on the library, and `hello` under
//! `switcheroo run`) watches while this process commits another service 1,000 times in
//! the same chains; their resident memory and open file descriptors, and this process's,
//! after 100 commits and after all of them.
//!
//! Shared by `tests/soak.rs` (which asserts that no descriptor leaks) and
//! `benches/soak.rs` (which prints the figures).

use crate::{example, Hello, Netns};
use std::process::Command;
use switcheroo::Switcheroo;

/// Resident memory (KiB) and open descriptors of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub rss_kib: u64,
    pub fds: usize,
}

pub fn usage(pid: &str) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    Usage { rss_kib, fds }
}

/// The usage of each watcher and of the committing process, after `early` commits and
/// after `total`.
#[derive(Debug)]
pub struct Soak {
    pub early: usize,
    pub total: usize,
    /// (who, after `early`, after `total`)
    pub rows: Vec<(&'static str, Usage, Usage)>,
}

pub fn run(early: usize, total: usize) -> Soak {
    let ns = Netns::new();
    let mut lib = ns.hello(&[
        "--namespace",
        "watch-lib",
        "--port",
        "8080",
        "--range",
        "41000-41099",
    ]);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(crate::switcheroo_bin())
        .args([
            "run",
            "-n",
            "watch-run",
            "-p",
            "8081",
            "--range",
            "41100-41199",
            "--",
        ])
        .arg(example("hello"));
    let mut wrapped = Hello::start(cmd);
    wrapped.pid = wrapped.child.id();
    wrapped.line_containing(" is ready: port ");
    let watchers = [
        ("hello (library, Tenure)", lib.pid),
        ("switcheroo run", wrapped.pid),
    ];
    let snapshot = || {
        let mut v: Vec<Usage> = watchers
            .iter()
            .map(|(_, pid)| usage(&pid.to_string()))
            .collect();
        v.push(usage("self"));
        v
    };
    // The watchers read what is pending at their own pace: a snapshot counts once the
    // open descriptors stay the same for 300 ms (or after 3 s).
    let settled = || {
        let mut last = snapshot();
        for _ in 0..10 {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now = snapshot();
            let same = now.iter().zip(&last).all(|(a, b)| a.fds == b.fds);
            last = now;
            if same {
                break;
            }
        }
        last
    };
    let (at_early, at_total) = ns.enter(|| {
        let sw = Switcheroo::builder("others", 9090)
            .port_range(42000..=42099)
            .build()
            .unwrap();
        let mut at_early = Vec::new();
        for i in 1..=total {
            let (listener, takeover) = sw.begin().expect("begin");
            takeover.commit().expect("commit");
            drop(listener);
            if i == early {
                at_early = settled();
            }
        }
        let at_total = settled();
        sw.cleanup().unwrap();
        (at_early, at_total)
    });
    let names = [
        "hello (library, Tenure)",
        "switcheroo run",
        "this process (1,000 commits)",
    ];
    let rows = names
        .iter()
        .zip(at_early.into_iter().zip(at_total))
        .map(|(name, (a, b))| (*name, a, b))
        .collect();
    let _ = lib.terminate();
    let _ = wrapped.terminate();
    Soak { early, total, rows }
}

pub fn table(s: &Soak) -> String {
    let mut out = format!(
        "| process | resident memory after {} | after {} | open fds after {} | after {} |\n|---|---:|---:|---:|---:|\n",
        s.early, s.total, s.early, s.total
    );
    for (who, a, b) in &s.rows {
        out.push_str(&format!(
            "| {who} | {} KiB | {} KiB | {} | {} |\n",
            a.rss_kib, b.rss_kib, a.fds, b.fds
        ));
    }
    out
}
