//! One nftables transaction: a begin message that carries the ruleset generation the batch
//! was computed against, the operations, and an end message. The kernel applies all of it
//! or none of it.

use crate::nftnl::{AlignedBuf, Object, TableObj};
use crate::rule::{cstring, rule_in};
use crate::{Chain, Family, Handle, Redirect, TABLE};
use nftnl::nftnl_sys as sys;
use std::fmt;

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create the `nat` table of a family if it does not exist, as iptables-nft does
    /// (`NFT_MSG_NEWTABLE` with `NLM_F_CREATE`).
    AddTable(Family),
    /// Create a nat base chain as iptables-nft does: type nat, the chain's hook, priority
    /// -100, policy accept.
    AddChain(Family, Chain),
    /// Insert a redirect at the head of a chain; the kernel echoes it back with its handle.
    Insert(Family, Chain, Redirect),
    /// Delete the rule with this handle from a chain.
    Delete(Family, Chain, Handle),
    /// Create the empty `inet` table of this name, owned by the sending socket
    /// (`NFT_TABLE_F_OWNER`, Linux 5.12+), and fail if it exists: the kernel refuses every
    /// other socket to change or delete an owned table (EPERM, [`crate::Error::Held`]),
    /// `nft flush ruleset` skips it, and it disappears when its socket is closed, which
    /// a killed process cannot fail to do. Creating a table needs CAP_NET_ADMIN. This makes
    /// it a lock that only a privileged process can hold and that a crash releases.
    AddOwnedTable(OwnedTable),
    /// Delete the `inet` table of this name that the sending socket owns.
    DeleteOwnedTable(OwnedTable),
    /// Delete the `nat` table of a family with all its chains and rules (`nft delete table
    /// ip nat`), the counterpart of [`Op::AddTable`]. Switcheroo never does this to a
    /// host; tests use it to play an operator who does.
    DeleteTable(Family),
}

/// The name of an owned `inet` table: 1 to 255 bytes without NUL (`NFT_NAME_MAXLEN`
/// holds the terminator too).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OwnedTable(String);

impl OwnedTable {
    /// Checks the name; [`crate::Error::InvalidRule`] if it is empty, longer than 255 bytes
    /// or contains a NUL byte.
    pub fn new(name: impl Into<String>) -> Result<Self, crate::Error> {
        let name = name.into();
        if name.is_empty() || name.len() > 255 || name.contains('\0') {
            return Err(crate::Error::InvalidRule {
                why: format!("table name {name:?}: use 1 to 255 bytes without NUL"),
            });
        }
        Ok(OwnedTable(name))
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OwnedTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `NFT_TABLE_F_OWNER` (`linux/netfilter/nf_tables.h`); the libc crate does not carry it.
const NFT_TABLE_F_OWNER: u32 = 1 << 1;

impl Op {
    pub(crate) fn context(&self) -> crate::error::Context {
        use crate::error::Context;
        match self {
            Op::AddTable(_) | Op::AddChain(..) | Op::Insert(..) => Context::Write,
            Op::Delete(..) | Op::DeleteTable(_) => Context::Delete,
            Op::AddOwnedTable(_) | Op::DeleteOwnedTable(_) => Context::OwnedTable,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddTable(family) => write!(f, "creating table {family} {TABLE}"),
            Op::AddChain(family, chain) => write!(f, "creating chain {family} {TABLE} {chain}"),
            Op::Insert(family, chain, r) => write!(
                f,
                "inserting redirect {} -> {} into {family} {TABLE} {chain}",
                r.public_port, r.to_port
            ),
            Op::Delete(family, chain, handle) => {
                write!(
                    f,
                    "deleting rule handle {handle} from {family} {TABLE} {chain}"
                )
            }
            Op::AddOwnedTable(name) => write!(f, "creating owned table inet {name}"),
            Op::DeleteOwnedTable(name) => write!(f, "deleting owned table inet {name}"),
            Op::DeleteTable(family) => write!(f, "deleting table {family} {TABLE}"),
        }
    }
}

/// A transaction under construction.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    genid: Option<u32>,
    ops: Vec<Op>,
}

const MSG_NEWTABLE: u16 = libc::NFT_MSG_NEWTABLE as u16;
const MSG_NEWCHAIN: u16 = libc::NFT_MSG_NEWCHAIN as u16;
const MSG_NEWRULE: u16 = libc::NFT_MSG_NEWRULE as u16;
const MSG_DELRULE: u16 = libc::NFT_MSG_DELRULE as u16;
const MSG_DELTABLE: u16 = libc::NFT_MSG_DELTABLE as u16;
const F_CREATE: u16 = libc::NLM_F_CREATE as u16;
const F_EXCL: u16 = libc::NLM_F_EXCL as u16;
const NFPROTO_INET: u8 = libc::NFPROTO_INET as u8;
const F_ACK: u16 = libc::NLM_F_ACK as u16;
const F_ECHO: u16 = libc::NLM_F_ECHO as u16;

impl Batch {
    /// An empty batch. With `Some(generation)` the kernel rejects the whole batch with
    /// ERESTART ([`crate::Error::Conflict`]) if the ruleset changed since that generation
    /// was read with [`crate::Conn::generation`].
    pub fn new(genid: Option<u32>) -> Self {
        Batch {
            genid,
            ops: Vec::new(),
        }
    }

    /// Queues an operation.
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Queues an insert of `redirect` at the head of `family`'s nat `chain`.
    pub fn insert_rule(&mut self, family: Family, chain: Chain, redirect: Redirect) {
        self.push(Op::Insert(family, chain, redirect));
    }

    /// Queues the deletion of the rule `handle` from `family`'s nat `chain`.
    pub fn delete_rule(&mut self, family: Family, chain: Chain, handle: Handle) {
        self.push(Op::Delete(family, chain, handle));
    }

    /// The queued operations, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// The generation the batch is bound to.
    pub fn generation(&self) -> Option<u32> {
        self.genid
    }

    /// Writes the batch into `buf`: the begin message has sequence number `seq`, operation
    /// `i` has `seq + 1 + i`, the end message follows. Only the last operation asks for an
    /// ack: the kernel reports every refused operation anyway, and acks in message order
    /// after the commit's own messages, so that one ack ends the batch's answer (one
    /// message to read instead of one per operation; iptables-nft asks for none). Inserts
    /// ask for an echo, which carries the new rule's handle.
    ///
    /// Without `commit`, the end message is left out: the kernel then checks and acks every
    /// operation as usual but aborts the transaction instead of committing it (what
    /// `nft --check` relies on), so nothing is applied whatever the operations.
    pub(crate) fn encode_with(&self, seq: u32, buf: &mut AlignedBuf, commit: bool) {
        buf.clear();
        buf.put_batch_delimiter(true, seq, self.genid);
        let last = self.ops.len().saturating_sub(1);
        for (i, op) in self.ops.iter().enumerate() {
            let seq = seq.wrapping_add(1 + i as u32);
            let ack = if i == last { F_ACK } else { 0 };
            match op {
                Op::AddTable(family) => {
                    let mut table = TableObj::new();
                    table.set_str(sys::NFTNL_TABLE_NAME as u16, &cstring(TABLE));
                    put(buf, MSG_NEWTABLE, *family, F_CREATE | ack, seq, &table);
                }
                Op::AddChain(family, chain) => {
                    let c = crate::table::base_chain(*chain, chain.name());
                    put(buf, MSG_NEWCHAIN, *family, F_CREATE | ack, seq, &c);
                }
                Op::Insert(family, chain, redirect) => {
                    let rule = redirect.to_object(*family, *chain);
                    // No NLM_F_APPEND and no position: the kernel inserts at the head.
                    put(
                        buf,
                        MSG_NEWRULE,
                        *family,
                        F_CREATE | ack | F_ECHO,
                        seq,
                        &rule,
                    );
                }
                Op::Delete(family, chain, handle) => {
                    let mut rule = rule_in(*chain);
                    rule.set_u64(sys::NFTNL_RULE_HANDLE as u16, handle.0);
                    put(buf, MSG_DELRULE, *family, ack, seq, &rule);
                }
                Op::AddOwnedTable(name) => {
                    let mut table = TableObj::new();
                    table.set_str(sys::NFTNL_TABLE_NAME as u16, &cstring(name.name()));
                    table.set_u32(sys::NFTNL_TABLE_FLAGS as u16, NFT_TABLE_F_OWNER);
                    let flags = F_CREATE | F_EXCL | ack;
                    buf.put(MSG_NEWTABLE, NFPROTO_INET, flags, seq, Some(&table));
                }
                Op::DeleteTable(family) => {
                    let mut table = TableObj::new();
                    table.set_str(sys::NFTNL_TABLE_NAME as u16, &cstring(TABLE));
                    put(buf, MSG_DELTABLE, *family, ack, seq, &table);
                }
                Op::DeleteOwnedTable(name) => {
                    let mut table = TableObj::new();
                    table.set_str(sys::NFTNL_TABLE_NAME as u16, &cstring(name.name()));
                    buf.put(MSG_DELTABLE, NFPROTO_INET, ack, seq, Some(&table));
                }
            }
        }
        if commit {
            let end = seq.wrapping_add(1 + self.ops.len() as u32);
            buf.put_batch_delimiter(false, end, None);
        }
    }

    pub(crate) fn encode(&self, seq: u32, buf: &mut AlignedBuf) {
        self.encode_with(seq, buf, true);
    }

    /// The batch as bytes, as it would be sent with first sequence number `seq`.
    pub fn to_bytes(&self, seq: u32) -> Vec<u8> {
        let mut buf = AlignedBuf::default();
        self.encode(seq, &mut buf);
        buf.as_bytes().to_vec()
    }
}

fn put(buf: &mut AlignedBuf, kind: u16, family: Family, flags: u16, seq: u32, obj: &dyn Object) {
    buf.put(kind, family.nfproto(), flags, seq, Some(obj));
}
