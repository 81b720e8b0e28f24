//! The server's whole process tree. `run` is the subreaper of its server
//! (`PR_SET_CHILD_SUBREAPER`): a process the server forks and leaves behind (a worker, a
//! `socat ... fork` child serving one connection) becomes `run`'s child instead of PID 1's,
//! so `run` waits for it, reaps it, and leaves only when the last one has; no supervisor
//! then cuts a connection such a process still serves.

use log::debug;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use switcheroo::process::Stat;
use switcheroo_sys::PidFd;

/// Makes this process the subreaper of its descendants.
pub fn become_subreaper() -> Result<(), String> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("cannot become the subreaper of the server's processes: {e}"))
}

/// What a round of reaping found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// The server's own status, if it exited.
    pub server: Option<WaitStatus>,
    /// Whether any child (the server, or a process of its tree left to `run`) remains.
    pub children_left: bool,
}

/// Reaps every child that has exited, without blocking.
pub fn reap(server: Pid) -> Reaped {
    let mut reaped = Reaped::default();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                reaped.children_left = true;
                return reaped;
            }
            Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, ..))) => {
                if pid == server {
                    reaped.server = Some(status);
                } else {
                    debug!("reaped pid {pid} of the server's tree: {status:?}");
                }
            }
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            // ECHILD: no child at all.
            Err(_) => return reaped,
        }
    }
}

/// The processes below `root`, from the parent links of every process in `/proc`.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(stat) = Stat::of(pid) {
                if stat.running() {
                    children.entry(stat.parent).or_default().push(pid);
                }
            }
        }
    }
    below(root, &children)
}

/// Everything below `root` in a parent -> children map, depth first.
fn below(root: u32, children: &HashMap<u32, Vec<u32>>) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if !out.contains(&child) {
                out.push(child);
                stack.push(child);
            }
        }
    }
    out
}

/// Sends `signal` to every process below this one. Each is signalled through a pidfd
/// opened first and checked second (its parent still in the tree), so a pid reused in
/// between is left alone.
pub fn signal_all(signal: Signal) -> usize {
    let me = std::process::id();
    let tree = descendants(me);
    let mut sent = 0;
    for pid in &tree {
        let Ok(fd) = PidFd::open(*pid) else { continue };
        let still_ours = Stat::of(*pid).is_ok_and(|s| s.parent == me || tree.contains(&s.parent));
        if still_ours && fd.send_signal(signal as i32).is_ok() {
            sent += 1;
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_below_a_process_is_every_descendant_and_nothing_else() {
        let map: HashMap<u32, Vec<u32>> = [
            (1, vec![10, 20]),
            (10, vec![11]),
            (11, vec![12]),
            (20, vec![]),
        ]
        .into_iter()
        .collect();
        let mut tree = below(10, &map);
        tree.sort();
        assert_eq!(tree, [11, 12]);
        assert!(below(20, &map).is_empty());
        let mut all = below(1, &map);
        all.sort();
        assert_eq!(all, [10, 11, 12, 20]);
    }

    #[test]
    fn a_child_of_this_process_is_in_its_tree() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        assert!(descendants(std::process::id()).contains(&child.id()));
        let _ = child.kill();
        let _ = child.wait();
    }
}
