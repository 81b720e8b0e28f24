//! `switcheroo hold`: the process of a holder container, which owns the network and pid
//! namespaces that the releases join (Kubernetes calls its equivalent "pause").
//!
//! As PID 1 of that pid namespace it inherits every process whose parent exits, so it
//! reaps them; a release's `run` is the subreaper of its own server, so only what a `run`
//! left behind (a `run` SIGKILLed with its children still alive) ends up here. It stops
//! on SIGTERM or SIGINT (exit 0), which ends the namespace and everything in it.

use crate::exit::Exit;
use log::{debug, error, info};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub fn hold() -> Exit {
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        signals.add(s);
    }
    let fd = signals
        .thread_block()
        .map_err(|e| e.to_string())
        .and_then(|()| {
            SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC).map_err(|e| e.to_string())
        });
    let fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            error!("switcheroo hold: cannot watch its signals: {e}");
            return Exit::Failed;
        }
    };
    info!(
        "holding the namespaces as pid {} until SIGTERM",
        std::process::id()
    );
    loop {
        match fd.read_signal() {
            Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => reap(),
                Ok(s) => {
                    info!("{s}: the holder stops");
                    return Exit::Success;
                }
                Err(_) => {}
            },
            Ok(None) | Err(Errno::EINTR) => {}
            Err(e) => {
                error!("switcheroo hold: reading its signals: {e}");
                return Exit::Failed;
            }
        }
    }
}

/// Waits for every child that has exited (one SIGCHLD may stand for several).
fn reap() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => debug!("reaped {status:?}"),
        }
    }
}
