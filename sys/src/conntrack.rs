//! Connection tracking over ctnetlink (`NFNL_SUBSYS_CTNETLINK`): the entries that still map
//! connections to a port, and their deletion.
//!
//! A REDIRECT is NAT: conntrack binds each connection (or UDP flow) to the port it was
//! redirected to when its first packet passed, and keeps that binding for the entry's
//! life. When the process behind that port is gone, an entry that outlives it keeps
//! feeding it: a TCP entry left in CLOSE by a reset takes a new SYN from a reused client
//! port and sends it to the dead port (refused), and a UDP flow that resumes goes to a
//! closed port. Deleting the entries that map to a dead port makes the next packet of such
//! a tuple a new connection, redirected afresh.

use crate::attr::{self, Attrs, MsgBuilder};
use crate::error::Context;
use crate::{Conn, Error, Family, Protocol};
use nix::errno::Errno;

/// `linux/netfilter/nfnetlink_conntrack.h`; the libc crate does not carry these.
mod cta {
    pub const MSG_CT_NEW: u16 = 0;
    pub const MSG_CT_GET: u16 = 1;
    pub const MSG_CT_DELETE: u16 = 2;

    pub const TUPLE_ORIG: u16 = 1;
    pub const TUPLE_REPLY: u16 = 2;
    pub const STATUS: u16 = 3;
    pub const PROTOINFO: u16 = 4;
    pub const TIMEOUT: u16 = 7;
    pub const PROTOINFO_TCP: u16 = 1;
    pub const PROTOINFO_TCP_STATE: u16 = 1;
    pub const ID: u16 = 12;
    pub const ZONE: u16 = 18;
    pub const FILTER: u16 = 25;

    pub const TUPLE_PROTO: u16 = 2;
    pub const PROTO_NUM: u16 = 1;
    pub const PROTO_SRC_PORT: u16 = 2;
    pub const PROTO_DST_PORT: u16 = 3;

    pub const FILTER_ORIG_FLAGS: u16 = 1;
    pub const FILTER_REPLY_FLAGS: u16 = 2;
    /// `CTA_FILTER_F_CTA_PROTO_NUM | CTA_FILTER_F_CTA_PROTO_SRC_PORT` (`nf_internals.h`).
    pub const FILTER_PROTO_NUM_SRC_PORT: u32 = (1 << 3) | (1 << 4);
    /// `CTA_FILTER_F_CTA_PROTO_NUM | CTA_FILTER_F_CTA_PROTO_DST_PORT`.
    pub const FILTER_PROTO_NUM_DST_PORT: u32 = (1 << 3) | (1 << 5);
}

const CT: u16 = (libc::NFNL_SUBSYS_CTNETLINK as u16) << 8;

/// A conntrack entry whose reply comes from a local port: enough to delete exactly it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The address family.
    pub family: Family,
    /// The transport protocol.
    pub protocol: Protocol,
    /// The source port of the reply direction: the port the connection was redirected to.
    pub reply_port: u16,
    /// The destination port of the original direction: the port the client asked for.
    pub orig_port: u16,
    /// For TCP, conntrack's state of the connection (`TCP_CONNTRACK_*`: 3 established,
    /// 7 TIME_WAIT, 8 CLOSE, ...).
    pub tcp_state: Option<u8>,
    /// The seconds left before the entry expires (`CTA_TIMEOUT`; conntrack resets it to
    /// the state's timeout on each packet).
    pub timeout: Option<u32>,
    /// The entry's status bits (`CTA_STATUS`, `IPS_*`).
    pub status: u32,
    /// The `CTA_TUPLE_ORIG` attribute as the kernel sent it.
    orig: Vec<u8>,
    /// `CTA_ID` and `CTA_ZONE`, as the kernel sent them.
    id: Option<Vec<u8>>,
    zone: Option<Vec<u8>>,
}

/// `IPS_ASSURED` (`linux/netfilter/nf_conntrack_common.h`).
const IPS_ASSURED: u32 = 1 << 2;
/// `TCP_CONNTRACK_TIME_WAIT` and `TCP_CONNTRACK_CLOSE` (`nf_conntrack_tcp.h`).
const TCP_CONNTRACK_TIME_WAIT: u8 = 7;
const TCP_CONNTRACK_CLOSE: u8 = 8;

impl Entry {
    /// Whether conntrack has seen traffic both ways long enough to call the flow assured
    /// (for UDP: replies, and packets 2 s after the first; such a flow gets the longer
    /// `nf_conntrack_udp_timeout_stream`).
    pub fn assured(&self) -> bool {
        self.status & IPS_ASSURED != 0
    }

    /// Whether the entry is a TCP connection that ended in CLOSE (after a reset): until it
    /// expires (10 s), a new SYN from the same client port that the client did not reset
    /// itself follows it to the port it mapped to, instead of being redirected afresh.
    pub fn is_closed(&self) -> bool {
        self.tcp_state == Some(TCP_CONNTRACK_CLOSE)
    }

    /// Whether the entry stands for a connection or flow that still carries traffic: any
    /// UDP flow, a TCP connection in any state but TIME_WAIT and CLOSE.
    pub fn is_open(&self) -> bool {
        !matches!(
            self.tcp_state,
            Some(TCP_CONNTRACK_TIME_WAIT | TCP_CONNTRACK_CLOSE)
        )
    }
}

impl Conn {
    /// The conntrack entries of `family` and `protocol` whose reply comes from local port
    /// `port`: what was redirected to that port. The dump is filtered by the kernel
    /// (`CTA_FILTER` on the reply tuple's protocol and source port, Linux 5.8+) and again
    /// here, for kernels that ignore the filter. Needs CAP_NET_ADMIN.
    pub fn conntrack_to_port(
        &mut self,
        family: Family,
        protocol: Protocol,
        port: u16,
    ) -> Result<Vec<Entry>, Error> {
        let op = || format!("dumping the {family} conntrack entries redirected to port {port}");
        self.conntrack_dump(&op, family, protocol, Side::Reply, port)
    }

    /// The conntrack entries of `family` and `protocol` whose client asked for port
    /// `port` (the original direction's destination): with a REDIRECT in place, their
    /// [`Entry::reply_port`] says which local port took each. Filtered as
    /// [`Conn::conntrack_to_port`] is. Needs CAP_NET_ADMIN.
    pub fn conntrack_for_port(
        &mut self,
        family: Family,
        protocol: Protocol,
        port: u16,
    ) -> Result<Vec<Entry>, Error> {
        let op = || format!("dumping the {family} conntrack entries of clients of port {port}");
        self.conntrack_dump(&op, family, protocol, Side::Original, port)
    }

    fn conntrack_dump(
        &mut self,
        op: &dyn Fn() -> String,
        family: Family,
        protocol: Protocol,
        side: Side,
        port: u16,
    ) -> Result<Vec<Entry>, Error> {
        let (tuple, port_attr, flags_attr, flags) = match side {
            Side::Reply => (
                cta::TUPLE_REPLY,
                cta::PROTO_SRC_PORT,
                cta::FILTER_REPLY_FLAGS,
                cta::FILTER_PROTO_NUM_SRC_PORT,
            ),
            Side::Original => (
                cta::TUPLE_ORIG,
                cta::PROTO_DST_PORT,
                cta::FILTER_ORIG_FLAGS,
                cta::FILTER_PROTO_NUM_DST_PORT,
            ),
        };
        let mut entries = Vec::new();
        self.dump_raw(
            op,
            |seq| {
                let mut m = MsgBuilder::new(
                    CT | cta::MSG_CT_GET,
                    libc::NLM_F_DUMP as u16,
                    seq,
                    family.nfproto(),
                );
                m.begin(tuple)
                    .begin(cta::TUPLE_PROTO)
                    .attr(cta::PROTO_NUM, &[protocol.number()])
                    .attr(port_attr, &port.to_be_bytes())
                    .end()
                    .end();
                m.begin(cta::FILTER)
                    .attr(flags_attr, &flags.to_ne_bytes())
                    .end();
                m.finish()
            },
            |msg| {
                if msg.kind != CT | cta::MSG_CT_NEW {
                    return;
                }
                if let Some(entry) = parse_entry(family, msg.payload) {
                    let matches = match side {
                        Side::Reply => entry.reply_port == port,
                        Side::Original => entry.orig_port == port,
                    };
                    if entry.protocol == protocol && matches {
                        entries.push(entry);
                    }
                }
            },
        )?;
        Ok(entries)
    }

    /// Deletes exactly the entries of `entries` (as [`Conn::delete_conntrack`] does one),
    /// sending their delete requests together (in as few `sendmsg` calls as fit the
    /// socket's buffers), so that the kernel deletes them one right after another instead
    /// of one per round trip; returns how many it deleted (the others were gone already).
    /// The first error other than "gone already" is returned after every answer was read.
    pub fn delete_conntrack_all(&mut self, entries: &[Entry]) -> Result<usize, Error> {
        /// Requests per send: their acks (each echoing its request) fit the receive
        /// buffer whatever the sizes.
        const CHUNK: usize = 64;
        let mut deleted = 0;
        let mut first_error = None;
        for chunk in entries.chunks(CHUNK) {
            let op = || {
                format!(
                    "deleting {} conntrack entries redirected to port {}",
                    chunk.len(),
                    chunk[0].reply_port
                )
            };
            let first = self.next_seq(chunk.len() as u32);
            let msgs: Vec<Vec<u8>> = chunk
                .iter()
                .enumerate()
                .map(|(i, entry)| delete_message(entry, first.wrapping_add(i as u32)))
                .collect();
            self.send_all(&op, Context::Read, &msgs)?;
            let mut answered = 0;
            self.recv_until(&op, Context::Read, |msg| {
                let i = msg.seq.wrapping_sub(first) as usize;
                if i >= chunk.len() || msg.kind as i32 != libc::NLMSG_ERROR {
                    return None;
                }
                answered += 1;
                match crate::conn::ack_errno(msg.payload) {
                    Some(0) => deleted += 1,
                    Some(e) if e == Errno::ENOENT as i32 => {}
                    Some(e) => {
                        first_error.get_or_insert(Error::from_errno(
                            op(),
                            Errno::from_raw(e),
                            Context::Read,
                        ));
                    }
                    None => {
                        first_error.get_or_insert(Error::Protocol {
                            op: op(),
                            why: "a short ack".into(),
                        });
                    }
                }
                (answered == chunk.len()).then_some(Ok(()))
            })?;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(deleted),
        }
    }

    /// Deletes exactly `entry` (`IPCTNL_MSG_CT_DELETE` by its original tuple, zone and id,
    /// so a newer entry of the same tuple is left alone). `Ok(false)`: it was gone already.
    pub fn delete_conntrack(&mut self, entry: &Entry) -> Result<bool, Error> {
        let op = || {
            format!(
                "deleting a {} conntrack entry redirected to port {}",
                entry.family, entry.reply_port
            )
        };
        let result = self.request_raw(&op, Context::Read, |seq| delete_message(entry, seq), |_| {});
        match result {
            Ok(()) => Ok(true),
            Err(Error::Kernel {
                errno: Errno::ENOENT,
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Which direction's tuple a dump filters on.
#[derive(Debug, Clone, Copy)]
enum Side {
    /// The original direction's destination port (what the client asked for).
    Original,
    /// The reply direction's source port (where the connection went).
    Reply,
}

/// The request that deletes exactly `entry`: by its original tuple, zone and id.
fn delete_message(entry: &Entry, seq: u32) -> Vec<u8> {
    let mut m = MsgBuilder::new(
        CT | cta::MSG_CT_DELETE,
        libc::NLM_F_ACK as u16,
        seq,
        entry.family.nfproto(),
    );
    m.raw_attr(&entry.orig);
    for attr in [&entry.zone, &entry.id].into_iter().flatten() {
        m.raw_attr(attr);
    }
    m.finish()
}

/// An entry from a ctnetlink message payload (after `nlmsghdr`).
fn parse_entry(family: Family, payload: &[u8]) -> Option<Entry> {
    if attr::nfgen_family(payload)? != family.nfproto() {
        return None;
    }
    let body = payload.get(4..)?;
    let (mut orig, mut id, mut zone, mut reply, mut tcp_state) = (None, None, None, None, None);
    let (mut timeout, mut status) = (None, 0);
    for (kind, whole) in attr::raw_attrs(body) {
        match kind {
            cta::TUPLE_ORIG => orig = Some(whole.to_vec()),
            cta::ID => id = Some(whole.to_vec()),
            cta::ZONE => zone = Some(whole.to_vec()),
            cta::TUPLE_REPLY => reply = Some(whole.get(4..)?),
            cta::TIMEOUT => timeout = attr::be_u32(whole.get(4..)?),
            cta::STATUS => status = attr::be_u32(whole.get(4..)?)?,
            cta::PROTOINFO => {
                tcp_state = Attrs(whole.get(4..)?)
                    .get(cta::PROTOINFO_TCP)
                    .and_then(|tcp| Attrs(tcp).get(cta::PROTOINFO_TCP_STATE))
                    .and_then(|state| state.first().copied());
            }
            _ => {}
        }
    }
    let proto = Attrs(reply?).get(cta::TUPLE_PROTO)?;
    let protocol = Protocol::from_number(*Attrs(proto).get(cta::PROTO_NUM)?.first()?)?;
    let reply_port = attr::be_u16(Attrs(proto).get(cta::PROTO_SRC_PORT)?)?;
    let orig_proto = Attrs(orig.as_deref()?.get(4..)?).get(cta::TUPLE_PROTO)?;
    let orig_port = attr::be_u16(Attrs(orig_proto).get(cta::PROTO_DST_PORT)?)?;
    Some(Entry {
        family,
        protocol,
        reply_port,
        orig_port,
        tcp_state,
        timeout,
        status,
        orig: orig?,
        id,
        zone,
    })
}
