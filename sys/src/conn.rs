//! The netfilter netlink socket: requests, dumps and batches, each answered in full before
//! the next one is sent.

use crate::attr::{self, nla, Message};
use crate::error::Context;
use crate::nftnl::{AlignedBuf, ChainObj};
use crate::rule::{cstring, rule_in};
use crate::socket::NetlinkSocket;
use crate::{parse_rule_message, Batch, Chain, Error, Family, Op, Redirect, RuleEntry, TABLE};
use nftnl::nftnl_sys as sys;
use nix::errno::Errno;
use std::time::Duration;

/// A dump is delivered in skbs of up to 32 KiB (the kernel caps its allocation there), so
/// 64 KiB always holds one whole.
const RECV_BUF: usize = 64 * 1024;
/// How long to wait for the kernel before calling a request failed. It always answers in
/// microseconds; this only turns a lost reply into an error instead of a hang.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

const NFT: u16 = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8;
const MSG_NEWRULE: u16 = NFT | libc::NFT_MSG_NEWRULE as u16;
const MSG_NEWGEN: u16 = NFT | libc::NFT_MSG_NEWGEN as u16;
const F_ACK: u16 = libc::NLM_F_ACK as u16;
const F_DUMP: u16 = libc::NLM_F_DUMP as u16;
const F_DUMP_INTR: u16 = libc::NLM_F_DUMP_INTR as u16;

/// A netlink socket to nf_tables (`NETLINK_NETFILTER`), in the network namespace of the
/// thread that opened it. Reusing one `Conn` for a dump and the batch that follows saves a
/// socket per step.
///
/// Keep it open across transactions: closing a netfilter socket after a batch that deleted
/// rules waits for the kernel to finish destroying them, one RCU grace period (15-30 ms
/// measured on a 2-core machine), because nf_tables flushes its destroy work when a
/// netlink socket is released.
pub struct Conn {
    sock: NetlinkSocket,
    seq: u32,
    rx: AlignedBuf,
    tx: AlignedBuf,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("portid", &self.sock.portid())
            .field("seq", &self.seq)
            .finish()
    }
}

/// The outcome of a batch the kernel applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The inserted rules as the kernel echoed them (with their handles), in the order of
    /// the batch's inserts.
    pub inserted: Vec<RuleEntry>,
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Conn {
    /// Opens and binds a `NETLINK_NETFILTER` socket (`socket(2)`, `bind(2)`).
    pub fn open() -> Result<Self, Error> {
        let op = || "opening a netfilter netlink socket".to_string();
        let sock = NetlinkSocket::open_netfilter()
            .map_err(|e| Error::from_errno(op(), io_errno(&e), Context::Nftables))?;
        crate::pidfd::set_recv_timeout(sock.fd(), RECV_TIMEOUT)
            .map_err(|errno| Error::from_errno(op(), errno, Context::Nftables))?;
        Ok(Conn {
            sock,
            // Any start works; a time-based one keeps replies to an earlier socket with the
            // same port id from being mistaken for ours.
            seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as u32)
                .unwrap_or(1),
            rx: AlignedBuf::zeroed(RECV_BUF),
            tx: AlignedBuf::default(),
        })
    }

    /// The cookie of the network namespace the socket belongs to (`SO_NETNS_COOKIE`,
    /// Linux 5.14+): a number the kernel gives each namespace once and never reuses until
    /// reboot, unlike the inode of its nsfs file. ENOPROTOOPT on older kernels.
    pub fn netns_cookie(&self) -> Result<u64, Errno> {
        crate::netns::cookie(self.sock.fd())
    }

    pub(crate) fn next_seq(&mut self, count: u32) -> u32 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(count);
        seq
    }

    /// Sends the messages `msgs` (built in safe Rust) in one `sendmsg`.
    pub(crate) fn send_all(
        &mut self,
        op: &dyn Fn() -> String,
        context: Context,
        msgs: &[Vec<u8>],
    ) -> Result<(), Error> {
        self.tx.clear();
        for msg in msgs {
            self.tx.put_bytes(msg);
        }
        self.send(op, context)
    }

    fn send(&mut self, op: &dyn Fn() -> String, context: Context) -> Result<(), Error> {
        let bytes = self.tx.as_bytes();
        match self.sock.send(bytes) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => Err(Error::Protocol {
                op: op(),
                why: format!("sent {n} of {} bytes", bytes.len()),
            }),
            Err(e) => Err(Error::from_errno(op(), io_errno(&e), context)),
        }
    }

    /// Receives replies and hands each message to `on_msg` until it returns `Some`.
    pub(crate) fn recv_until<T>(
        &mut self,
        op: &dyn Fn() -> String,
        context: Context,
        mut on_msg: impl FnMut(Message<'_>) -> Option<Result<T, Error>>,
    ) -> Result<T, Error> {
        loop {
            let n = self
                .sock
                .recv(self.rx.as_bytes_mut())
                .map_err(|e| Error::from_errno(op(), io_errno(&e), context))?;
            for msg in attr::messages(&self.rx.as_bytes()[..n]) {
                if let Some(done) = on_msg(msg) {
                    return done;
                }
            }
        }
    }

    /// Sends one request and waits for its ack (or error), passing other replies to
    /// `on_reply`.
    fn request(
        &mut self,
        op: &dyn Fn() -> String,
        context: Context,
        build: impl FnOnce(u32, &mut AlignedBuf),
        mut on_reply: impl FnMut(Message<'_>),
    ) -> Result<(), Error> {
        let seq = self.next_seq(1);
        self.tx.clear();
        build(seq, &mut self.tx);
        self.send(op, context)?;
        self.recv_until(op, context, |msg| {
            if msg.seq != seq {
                return None;
            }
            match msg.kind as i32 {
                libc::NLMSG_ERROR => Some(match ack_errno(msg.payload) {
                    Some(0) => Ok(()),
                    Some(e) => Err(Error::from_errno(op(), Errno::from_raw(e), context)),
                    None => Err(short_ack(op)),
                }),
                _ => {
                    on_reply(msg);
                    None
                }
            }
        })
    }

    /// Sends the message `build` makes for a sequence number and waits for its ack (or
    /// error), passing other replies to `on_reply`: for messages built in safe Rust.
    pub(crate) fn request_raw(
        &mut self,
        op: &dyn Fn() -> String,
        context: Context,
        build: impl FnOnce(u32) -> Vec<u8>,
        on_reply: impl FnMut(Message<'_>),
    ) -> Result<(), Error> {
        self.request(op, context, |seq, buf| buf.put_bytes(&build(seq)), on_reply)
    }

    /// Sends the dump request `build` makes and passes every message of the dump to
    /// `on_msg`. An interrupted dump (`NLM_F_DUMP_INTR`) fails with [`Error::Conflict`].
    fn dump(
        &mut self,
        op: &dyn Fn() -> String,
        build: impl FnOnce(u32, &mut AlignedBuf),
        mut on_msg: impl FnMut(Message<'_>),
    ) -> Result<(), Error> {
        let seq = self.next_seq(1);
        self.tx.clear();
        build(seq, &mut self.tx);
        self.send(op, Context::Read)?;
        let mut interrupted = false;
        self.recv_until(op, Context::Read, |msg| {
            if msg.seq != seq {
                return None;
            }
            interrupted |= msg.flags & F_DUMP_INTR != 0;
            match msg.kind as i32 {
                libc::NLMSG_DONE if interrupted => Some(Err(Error::Conflict {
                    op: op(),
                    errno: Errno::EINTR,
                })),
                libc::NLMSG_DONE => Some(Ok(())),
                libc::NLMSG_ERROR => Some(match ack_errno(msg.payload) {
                    Some(0) => Ok(()),
                    Some(e) => Err(Error::from_errno(op(), Errno::from_raw(e), Context::Read)),
                    None => Err(short_ack(op)),
                }),
                _ => {
                    on_msg(msg);
                    None
                }
            }
        })
    }

    /// [`Conn::dump`] of a request built in safe Rust.
    pub(crate) fn dump_raw(
        &mut self,
        op: &dyn Fn() -> String,
        build: impl FnOnce(u32) -> Vec<u8>,
        on_msg: impl FnMut(Message<'_>),
    ) -> Result<(), Error> {
        self.dump(op, |seq, buf| buf.put_bytes(&build(seq)), on_msg)
    }

    /// The current ruleset generation (`NFT_MSG_GETGEN`). A batch bound to it with
    /// [`Batch::new`] is refused if anything changed the ruleset since.
    pub fn generation(&mut self) -> Result<u32, Error> {
        let op = || "reading the nf_tables ruleset generation".to_string();
        let mut genid = None;
        self.request(
            &op,
            Context::Nftables,
            |seq, buf| {
                buf.put(
                    libc::NFT_MSG_GETGEN as u16,
                    libc::AF_UNSPEC as u8,
                    F_ACK,
                    seq,
                    None,
                )
            },
            |msg| {
                if msg.kind == MSG_NEWGEN {
                    genid = attr::nfgen_attrs(msg.payload)
                        .get(nla::GEN_ID)
                        .and_then(attr::be_u32);
                }
            },
        )?;
        genid.ok_or_else(|| Error::Protocol {
            op: op(),
            why: "no NFTA_GEN_ID in the reply".into(),
        })
    }

    /// Dumps the rules of `family`'s nat `chain`, filtered by table and chain in the kernel
    /// (`NFT_MSG_GETRULE` with `NLM_F_DUMP`), in chain order. A missing table or chain
    /// dumps as no rules; see [`Conn::chain_exists`].
    ///
    /// A dump interrupted by a concurrent change (`NLM_F_DUMP_INTR`) fails with
    /// [`Error::Conflict`].
    pub fn list_rules(&mut self, family: Family, chain: Chain) -> Result<Vec<RuleEntry>, Error> {
        let op = || format!("dumping rules of {family} {TABLE} {chain}");
        let mut rules = Vec::new();
        self.dump(
            &op,
            |seq, buf| {
                let filter = rule_in(chain);
                buf.put(
                    libc::NFT_MSG_GETRULE as u16,
                    family.nfproto(),
                    F_DUMP,
                    seq,
                    Some(&filter),
                );
            },
            |msg| {
                if msg.kind == MSG_NEWRULE {
                    // Filtered in the kernel; the check keeps a surprise out anyway.
                    if let Some(rule) = parse_rule_message(msg.payload)
                        .filter(|r| r.family == family && r.chain == chain)
                    {
                        rules.push(rule);
                    }
                }
            },
        )?;
        Ok(rules)
    }

    /// Whether `family`'s nat `chain` exists (`NFT_MSG_GETCHAIN`; ENOENT means no).
    pub fn chain_exists(&mut self, family: Family, chain: Chain) -> Result<bool, Error> {
        let op = || format!("looking up chain {family} {TABLE} {chain}");
        let result = self.request(
            &op,
            Context::Read,
            |seq, buf| {
                let mut c = ChainObj::new();
                c.set_str(sys::NFTNL_CHAIN_TABLE as u16, &cstring(TABLE));
                c.set_str(sys::NFTNL_CHAIN_NAME as u16, &cstring(chain.name()));
                buf.put(
                    libc::NFT_MSG_GETCHAIN as u16,
                    family.nfproto(),
                    F_ACK,
                    seq,
                    Some(&c),
                );
            },
            |_| {},
        );
        match result {
            Ok(()) => Ok(true),
            Err(Error::Kernel {
                errno: Errno::ENOENT,
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The rule with the raw handle number `handle` in `family`'s nat `chain`
    /// (`NFT_MSG_GETRULE` without a dump: one rule, whatever the chain holds), or `None` if
    /// there is no such rule. The [`Handle`](crate::Handle) of the result comes from the kernel's reply.
    pub fn get_rule(
        &mut self,
        family: Family,
        chain: Chain,
        handle: u64,
    ) -> Result<Option<RuleEntry>, Error> {
        let op = || format!("looking up rule {handle} of {family} {TABLE} {chain}");
        let mut found = None;
        let result = self.request(
            &op,
            Context::Read,
            |seq, buf| {
                let mut rule = rule_in(chain);
                rule.set_u64(sys::NFTNL_RULE_HANDLE as u16, handle);
                buf.put(
                    libc::NFT_MSG_GETRULE as u16,
                    family.nfproto(),
                    F_ACK,
                    seq,
                    Some(&rule),
                );
            },
            |msg| {
                if msg.kind == MSG_NEWRULE {
                    found = parse_rule_message(msg.payload).filter(|r| {
                        r.family == family && r.chain == chain && r.handle.get() == handle
                    });
                }
            },
        );
        match result {
            Ok(()) => Ok(found),
            Err(Error::Kernel {
                errno: Errno::ENOENT,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends `batch` as one transaction and waits for the kernel's verdict on every message.
    ///
    /// Either every operation was applied, and the inserted rules are returned as the kernel
    /// echoed them, or none was, and the error names the first operation the kernel refused:
    /// [`Error::Conflict`] if the generation moved or a handle to delete is gone (retry from a
    /// fresh dump), [`Error::PermissionDenied`] without CAP_NET_ADMIN, [`Error::Held`] if an
    /// owned table to create belongs to another socket, and [`Error::Kernel`] for the rest:
    /// ENOENT on a write means that a table or chain it names is gone or that the kernel
    /// lacks a part of the rule; [`Conn::probe_support`] tells which.
    pub fn apply(&mut self, batch: &Batch) -> Result<Applied, Error> {
        self.send_batch(batch, true)
    }

    /// Sends `batch` without its end message: the kernel checks every operation as it
    /// would for [`Conn::apply`], answers each, then aborts the transaction (the way
    /// `nft --check` works). Nothing is applied, whatever the outcome.
    pub fn dry_run(&mut self, batch: &Batch) -> Result<(), Error> {
        self.send_batch(batch, false).map(drop)
    }

    fn send_batch(&mut self, batch: &Batch, commit: bool) -> Result<Applied, Error> {
        let ops = batch.ops();
        let count = ops.len() as u32;
        let begin = self.next_seq(count + 2);
        batch.encode_with(begin, &mut self.tx, commit);
        let op = || {
            let list: Vec<String> = ops.iter().map(Op::to_string).collect();
            let verb = if commit { "applying" } else { "checking" };
            format!("{verb} batch [{}]", list.join("; "))
        };
        let mut replies = self.exchange(begin, count, &op)?;
        if let Some((i, errno)) = replies.failure() {
            let op = format!("{} (in a batch of {count}; nothing was applied)", ops[i]);
            return Err(Error::from_errno(op, errno, ops[i].context()));
        }
        let mut inserted = Vec::new();
        if !commit {
            return Ok(Applied { inserted });
        }
        for (i, op) in ops.iter().enumerate() {
            if let Op::Insert(family, chain, redirect) = op {
                match replies.echoed[i].take() {
                    Some(rule) if rule.redirect.as_ref() == Some(redirect) => inserted.push(rule),
                    other => {
                        return Err(Error::Protocol {
                            op: format!("{op} (applied)"),
                            why: format!(
                            "the kernel's echo of the new rule in {family} {chain} was {other:?}"
                        ),
                        })
                    }
                }
            }
        }
        Ok(Applied { inserted })
    }

    /// Sends the batch in `self.tx` (begin message `begin`, then `count` operations, the
    /// last of which asks for an ack) and collects the kernel's answer to each operation:
    /// an error for each it refused, the echo of each insert, and the last one's ack, which
    /// the kernel sends after everything else of the batch, so it ends the answer. An
    /// operation without an error was applied (or checked). An error on the begin message
    /// refuses the whole batch (generation, privilege) and is returned as such.
    fn exchange(
        &mut self,
        begin: u32,
        count: u32,
        op: &dyn Fn() -> String,
    ) -> Result<Replies, Error> {
        self.send(op, Context::Batch)?;
        let mut replies = Replies {
            errnos: vec![None; count as usize],
            echoed: vec![None; count as usize],
        };
        if count == 0 {
            return Ok(replies);
        }
        let index = |seq: u32| {
            let i = seq.wrapping_sub(begin).wrapping_sub(1);
            (i < count).then_some(i as usize)
        };
        let last = count as usize - 1;
        self.recv_until(op, Context::Batch, |msg| {
            if msg.kind as i32 == libc::NLMSG_ERROR {
                let errno = match ack_errno(msg.payload) {
                    Some(e) => e,
                    None => return Some(Err(short_ack(op))),
                };
                if msg.seq == begin {
                    let e = if errno == 0 { libc::EPROTO } else { errno };
                    return Some(Err(Error::from_errno(
                        op(),
                        Errno::from_raw(e),
                        Context::Batch,
                    )));
                }
                let i = index(msg.seq)?;
                replies.errnos[i] = Some(errno);
                (i == last).then_some(Ok(()))
            } else {
                if msg.kind == MSG_NEWRULE {
                    if let Some(i) = index(msg.seq) {
                        replies.echoed[i] = parse_rule_message(msg.payload);
                    }
                }
                None
            }
        })?;
        Ok(replies)
    }

    /// Asks the kernel whether it has every part that `redirect` in `family`'s nat `chain`
    /// needs, changing nothing. Each xtables extension of the rule is looked up with
    /// nft_compat's own query (`NFNL_MSG_COMPAT_GET`, as iptables-nft does before it uses
    /// one); then a batch that creates a nat base chain of a name of its own in the nat
    /// table and inserts the rule there is sent without its end message, so the kernel
    /// checks every step and aborts (see [`Conn::dry_run`]).
    ///
    /// `Ok(())`: nothing is missing, so an ENOENT on a write of the same rule means that a
    /// table or chain it named was deleted meanwhile. [`Error::Unsupported`] names the
    /// missing part.
    pub fn probe_support(
        &mut self,
        family: Family,
        chain: Chain,
        redirect: &Redirect,
    ) -> Result<(), Error> {
        for ext in crate::xt::extensions(redirect.probability.is_some()) {
            self.probe_extension(family, ext)?;
        }
        let probe_chain = format!("switcheroo-probe-{}", self.seq);
        let count = 3;
        let begin = self.next_seq(count + 2);
        self.tx.clear();
        self.tx.put_batch_delimiter(true, begin, None);
        let mut table = crate::nftnl::TableObj::new();
        table.set_str(sys::NFTNL_TABLE_NAME as u16, &cstring(TABLE));
        let f_create = libc::NLM_F_CREATE as u16;
        self.tx.put(
            libc::NFT_MSG_NEWTABLE as u16,
            family.nfproto(),
            f_create | F_ACK,
            begin + 1,
            Some(&table),
        );
        let c = crate::table::base_chain(chain, &probe_chain);
        self.tx.put(
            libc::NFT_MSG_NEWCHAIN as u16,
            family.nfproto(),
            f_create | F_ACK,
            begin + 2,
            Some(&c),
        );
        let rule = redirect.object(family, &cstring(&probe_chain));
        self.tx.put(
            libc::NFT_MSG_NEWRULE as u16,
            family.nfproto(),
            f_create | F_ACK,
            begin + 3,
            Some(&rule),
        );
        let op = || format!("checking that {family} {TABLE} can hold a nat chain with the rule");
        let replies = self.exchange(begin, count, &op)?;
        match replies.failure() {
            None => Ok(()),
            Some((1, errno)) => Err(Error::from_errno(
                format!("checking table {family} {TABLE}"),
                errno,
                Context::Read,
            )),
            Some((2, errno)) if matches!(errno, Errno::ENOENT | Errno::EOPNOTSUPP) => {
                Err(Error::Unsupported {
                    op: format!("checking a nat base chain in {family} {TABLE}"),
                    what: format!("the nat chain type for {family} (nft_chain_nat)"),
                    errno,
                })
            }
            Some((2, errno)) => Err(Error::from_errno(
                format!("checking a nat base chain in {family} {TABLE}"),
                errno,
                Context::Read,
            )),
            Some((_, errno)) if matches!(errno, Errno::ENOENT | Errno::EOPNOTSUPP) => {
                Err(Error::Unsupported {
                    op: format!("checking the redirect rule in a nat chain of {family}"),
                    what: "an expression the rule needs (nft_compat's match and target, \
                           counter, meta or payload)"
                        .to_owned(),
                    errno,
                })
            }
            Some((_, errno)) => Err(Error::from_errno(
                format!("checking the redirect rule in a nat chain of {family}"),
                errno,
                Context::Read,
            )),
        }
    }

    /// Looks up one xtables extension (`NFNL_MSG_COMPAT_GET`): ENOENT when the kernel has
    /// no such match or target, EPROTONOSUPPORT without that revision, and EINVAL when
    /// nfnetlink has no nft_compat subsystem to ask at all.
    fn probe_extension(&mut self, family: Family, ext: crate::xt::Extension) -> Result<(), Error> {
        let op = || {
            format!(
                "looking up the xtables {} {} revision {} for {family}",
                ext.kind(),
                ext.name.to_string_lossy(),
                ext.rev
            )
        };
        let query = crate::xt::CompatQuery::new(ext);
        let kind = (libc::NFNL_SUBSYS_NFT_COMPAT as u16) << 8; // NFNL_MSG_COMPAT_GET = 0
        let result = self.request(
            &op,
            Context::Read,
            |seq, buf| buf.put(kind, family.nfproto(), F_ACK, seq, Some(&query)),
            |_| {},
        );
        match result {
            Err(Error::Kernel { op, errno })
                if matches!(
                    errno,
                    Errno::ENOENT | Errno::EPROTONOSUPPORT | Errno::EINVAL
                ) =>
            {
                let what = if errno == Errno::EINVAL {
                    "the xtables compat layer (nft_compat)".to_owned()
                } else {
                    format!(
                        "the xtables {} {} revision {} ({})",
                        ext.kind(),
                        ext.name.to_string_lossy(),
                        ext.rev,
                        ext.module
                    )
                };
                Err(Error::Unsupported { op, what, errno })
            }
            other => other,
        }
    }
}

/// The kernel's answers to the operations of one batch.
struct Replies {
    /// Per operation: its errno if the kernel answered it (only refused operations and
    /// the last one are answered; `None` is applied or checked).
    errnos: Vec<Option<i32>>,
    /// Per operation: the rule the kernel echoed, for inserts.
    echoed: Vec<Option<RuleEntry>>,
}

impl Replies {
    /// The first operation the kernel refused, and why.
    fn failure(&self) -> Option<(usize, Errno)> {
        self.errnos.iter().enumerate().find_map(|(i, e)| match e {
            Some(e) if *e != 0 => Some((i, Errno::from_raw(*e))),
            _ => None,
        })
    }
}

/// The errno of an `NLMSG_ERROR` payload (`struct nlmsgerr`), positive; 0 is an ack.
pub(crate) fn ack_errno(payload: &[u8]) -> Option<i32> {
    let error = i32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?);
    Some(error.checked_neg().unwrap_or(libc::EPROTO))
}

fn short_ack(op: &dyn Fn() -> String) -> Error {
    Error::Protocol {
        op: op(),
        why: "truncated NLMSG_ERROR".into(),
    }
}
