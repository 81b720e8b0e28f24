//! Watching the ruleset change: nf_tables' multicast notifications (`NFNLGRP_NFTABLES`,
//! what `nft monitor` reads), decoded into the few events switcheroo cares about.

use crate::attr::{self, Message};
use crate::error::Context;
use crate::nftnl::AlignedBuf;
use crate::socket::NetlinkSocket;
use crate::{parse_rule_message, Error, RuleEntry};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

const NFT: u16 = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8;
/// `NFTA_TABLE_NAME` (`linux/netfilter/nf_tables.h`).
const TABLE_NAME: u16 = 1;

/// One change of the ruleset, as the kernel announced it after the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// A table was created; its family number (`NFPROTO_*`) and name.
    NewTable(u8, String),
    /// A table was deleted; its family number and name.
    DelTable(u8, String),
    /// A rule was added to a nat chain of ours (`PREROUTING`/`OUTPUT` of `ip`/`ip6 nat`).
    NewRule(RuleEntry),
    /// A rule was deleted from a nat chain of ours.
    DelRule(RuleEntry),
    /// The ruleset generation moved (the end of every committed transaction).
    NewGen,
}

/// A netlink socket subscribed to nf_tables' notifications, in the network namespace of
/// the thread that opened it.
#[derive(Debug)]
pub struct Monitor {
    sock: NetlinkSocket,
    rx: AlignedBuf,
    queue: std::collections::VecDeque<Notification>,
}

impl Monitor {
    /// Subscribes to `NFNLGRP_NFTABLES` (needs CAP_NET_ADMIN in the namespace).
    pub fn open() -> Result<Self, Error> {
        let sock = NetlinkSocket::open_netfilter_groups(1 << (libc::NFNLGRP_NFTABLES - 1))
            .map_err(|e| {
                Error::from_errno(
                    "subscribing to nf_tables notifications".into(),
                    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                    Context::Nftables,
                )
            })?;
        Ok(Monitor {
            sock,
            rx: AlignedBuf::zeroed(64 * 1024),
            queue: Default::default(),
        })
    }

    /// The next event, waiting up to `timeout` (forever with `None`); `Ok(None)` when the
    /// time ran out. ENOBUFS means events were lost because they came faster than they
    /// were read.
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Option<Notification>, Error> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(Some(event));
            }
            let timeout = match timeout {
                None => PollTimeout::NONE,
                Some(t) => PollTimeout::try_from(t.as_millis().min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::MAX),
            };
            let mut fds = [PollFd::new(self.sock.fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(Error::from_errno(
                        "waiting for nf_tables notifications".into(),
                        e,
                        Context::Read,
                    ))
                }
            }
            let n = self.sock.recv(self.rx.as_bytes_mut()).map_err(|e| {
                Error::from_errno(
                    "reading nf_tables notifications".into(),
                    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                    Context::Read,
                )
            })?;
            for msg in attr::messages(&self.rx.as_bytes()[..n]) {
                if let Some(event) = decode(msg) {
                    self.queue.push_back(event);
                }
            }
        }
    }
}

impl AsFd for Monitor {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.fd()
    }
}

fn decode(msg: Message<'_>) -> Option<Notification> {
    let table = || {
        let family = attr::nfgen_family(msg.payload)?;
        let name = attr::nfgen_attrs(msg.payload)
            .get(TABLE_NAME)
            .and_then(attr::c_str)?;
        Some((family, name.to_owned()))
    };
    match msg.kind.checked_sub(NFT)? as i32 {
        libc::NFT_MSG_NEWTABLE => table().map(|(f, n)| Notification::NewTable(f, n)),
        libc::NFT_MSG_DELTABLE => table().map(|(f, n)| Notification::DelTable(f, n)),
        libc::NFT_MSG_NEWRULE => parse_rule_message(msg.payload).map(Notification::NewRule),
        libc::NFT_MSG_DELRULE => parse_rule_message(msg.payload).map(Notification::DelRule),
        libc::NFT_MSG_NEWGEN => Some(Notification::NewGen),
        _ => None,
    }
}
