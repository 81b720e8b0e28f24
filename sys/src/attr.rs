//! Safe reading of netlink messages and attributes (no libmnl, no `unsafe`): whatever the
//! kernel or a fuzzer hands us, a malformed length ends the walk instead of reading past the
//! buffer.

/// Attribute numbers from `linux/netfilter/nf_tables.h` and `linux/netfilter/nfnetlink.h`
/// that the `libc` crate does not carry.
pub(crate) mod nla {
    pub const TYPE_MASK: u16 = 0x3fff; // ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

    pub const GEN_ID: u16 = 1;

    pub const RULE_TABLE: u16 = 1;
    pub const RULE_CHAIN: u16 = 2;
    pub const RULE_HANDLE: u16 = 3;
    pub const RULE_EXPRESSIONS: u16 = 4;
    pub const RULE_USERDATA: u16 = 7;

    pub const LIST_ELEM: u16 = 1;
    pub const EXPR_NAME: u16 = 1;
    pub const EXPR_DATA: u16 = 2;

    pub const META_DREG: u16 = 1;
    pub const META_KEY: u16 = 2;

    pub const CMP_SREG: u16 = 1;
    pub const CMP_OP: u16 = 2;
    pub const CMP_DATA: u16 = 3;
    pub const DATA_VALUE: u16 = 1;

    pub const PAYLOAD_DREG: u16 = 1;
    pub const PAYLOAD_BASE: u16 = 2;
    pub const PAYLOAD_OFFSET: u16 = 3;
    pub const PAYLOAD_LEN: u16 = 4;

    // NFTA_MATCH_* and NFTA_TARGET_* share their numbering.
    pub const XT_NAME: u16 = 1;
    pub const XT_REV: u16 = 2;
    pub const XT_INFO: u16 = 3;
}

/// A netlink message written in safe Rust, for the few messages libnftnl does not build
/// (conntrack's): the header with an `nfgenmsg`, then attributes, lengths filled in as
/// each part is closed.
#[derive(Debug, Clone)]
pub(crate) struct MsgBuilder {
    bytes: Vec<u8>,
    open: Vec<usize>,
}

impl MsgBuilder {
    /// A request of `kind` with `flags`, `seq`, for `family` (`nfgen_family`).
    pub fn new(kind: u16, flags: u16, seq: u32, family: u8) -> Self {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel's business
        bytes.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version 0, res_id 0
        MsgBuilder {
            bytes,
            open: Vec::new(),
        }
    }

    /// Appends an attribute with `value`, padded to 4.
    pub fn attr(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = (4 + value.len()) as u16;
        self.bytes.extend_from_slice(&len.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.pad();
        self
    }

    /// Appends an attribute copied whole (header included) from a received message.
    pub fn raw_attr(&mut self, attr: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(attr);
        self.pad();
        self
    }

    /// Opens a nested attribute; [`MsgBuilder::end`] closes it.
    pub fn begin(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.bytes.len());
        self.bytes.extend_from_slice(&0u16.to_ne_bytes());
        self.bytes
            .extend_from_slice(&(kind | libc::NLA_F_NESTED as u16).to_ne_bytes());
        self
    }

    pub fn end(&mut self) -> &mut Self {
        if let Some(start) = self.open.pop() {
            let len = (self.bytes.len() - start) as u16;
            self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }

    /// The message, its length set.
    pub fn finish(mut self) -> Vec<u8> {
        while !self.open.is_empty() {
            self.end();
        }
        let len = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes
    }
}

/// The attributes of a run, each with its whole bytes (header included), for copying.
pub(crate) fn raw_attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & nla::TYPE_MASK;
        if len < 4 || len > rest.len() {
            rest = &[];
            return None;
        }
        let whole = &rest[..len];
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some((kind, whole))
    })
}

/// One netlink message: header fields and the payload after `nlmsghdr`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates the netlink messages of a receive buffer. A header whose length is impossible
/// ends the iteration.
pub(crate) fn messages(buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            rest = &[];
            return None;
        }
        let msg = Message {
            kind: u16::from_ne_bytes(rest[4..6].try_into().ok()?),
            flags: u16::from_ne_bytes(rest[6..8].try_into().ok()?),
            seq: u32::from_ne_bytes(rest[8..12].try_into().ok()?),
            payload: &rest[NLMSG_HDRLEN..len],
        };
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some(msg)
    })
}

/// The attributes after the `nfgenmsg` header of an nfnetlink message payload.
pub(crate) fn nfgen_attrs(payload: &[u8]) -> Attrs<'_> {
    Attrs(payload.get(NFGENMSG_LEN..).unwrap_or(&[]))
}

/// The `nfgen_family` byte of an nfnetlink message payload.
pub(crate) fn nfgen_family(payload: &[u8]) -> Option<u8> {
    payload.first().copied()
}

/// Iterator over `(type, payload)` of a run of netlink attributes.
#[derive(Debug, Clone)]
pub(crate) struct Attrs<'a>(pub &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.0;
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & nla::TYPE_MASK;
        if len < 4 || len > rest.len() {
            self.0 = &[];
            return None;
        }
        self.0 = rest.get(align4(len)..).unwrap_or(&[]);
        Some((kind, &rest[4..len]))
    }
}

impl<'a> Attrs<'a> {
    /// The payload of the first attribute of type `kind`.
    pub fn get(self, kind: u16) -> Option<&'a [u8]> {
        let mut it = self;
        it.find_map(|(k, v)| (k == kind).then_some(v))
    }
}

pub(crate) fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

pub(crate) fn be_u16(v: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(v.try_into().ok()?))
}

pub(crate) fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

/// A NUL-terminated string attribute, without its terminator.
pub(crate) fn c_str(v: &[u8]) -> Option<&str> {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    std::str::from_utf8(&v[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_attribute_ends_the_walk() {
        // len says 12 but only 8 bytes are there.
        let buf = [12u8, 0, 1, 0, 1, 2, 3, 4];
        assert_eq!(Attrs(&buf).count(), 0);
    }

    #[test]
    fn attributes_are_walked_with_padding() {
        // "ab\0" (len 7, padded to 8), then a u32.
        let buf = [7u8, 0, 1, 0, b'a', b'b', 0, 0, 8, 0, 2, 0, 0, 0, 0, 5];
        let got: Vec<_> = Attrs(&buf).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(c_str(got[0].1), Some("ab"));
        assert_eq!(be_u32(got[1].1), Some(5));
    }

    #[test]
    fn message_with_impossible_length_ends_the_walk() {
        let mut buf = vec![0u8; 20];
        buf[0] = 200;
        assert_eq!(messages(&buf).count(), 0);
    }
}
