//! The xtables extension payloads iptables-nft puts in `match`/`target` expressions
//! (nft_compat), encoded and parsed byte for byte. Sizes are the kernel structs rounded up
//! with `XT_ALIGN` (8 bytes), which is what iptables-nft sends and what the kernel's
//! size check expects.

use crate::nftnl::Object;
use crate::Family;
use std::ffi::CStr;

/// An xtables extension a rule of ours uses, as nft_compat's query names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extension {
    pub name: &'static CStr,
    pub rev: u32,
    pub target: bool,
    /// The kernel module that provides it.
    pub module: &'static str,
}

impl Extension {
    pub fn kind(&self) -> &'static str {
        if self.target {
            "target"
        } else {
            "match"
        }
    }
}

/// The extensions of a redirect rule, in rule order; the statistic match only for a rule
/// that takes a share of connections.
pub(crate) fn extensions(statistic: bool) -> Vec<Extension> {
    let mut all = vec![
        Extension {
            name: c"addrtype",
            rev: ADDRTYPE_REV,
            target: false,
            module: "xt_addrtype",
        },
        Extension {
            name: c"comment",
            rev: COMMENT_REV,
            target: false,
            module: "xt_comment",
        },
        Extension {
            name: c"REDIRECT",
            rev: REDIRECT_REV,
            target: true,
            module: "xt_REDIRECT",
        },
    ];
    if statistic {
        all.insert(
            1,
            Extension {
                name: c"statistic",
                rev: STATISTIC_REV,
                target: false,
                module: "xt_statistic",
            },
        );
    }
    all
}

/// The attributes of an `NFNL_MSG_COMPAT_GET` request (`linux/netfilter/nf_tables_compat.h`:
/// `NFTA_COMPAT_NAME` = 1, `NFTA_COMPAT_REV` = 2, `NFTA_COMPAT_TYPE` = 3, the type 1 for a
/// target and 0 for a match; the integers big endian).
#[derive(Debug)]
pub(crate) struct CompatQuery(Extension);

impl CompatQuery {
    pub fn new(ext: Extension) -> Self {
        CompatQuery(ext)
    }
}

// SAFETY: three attributes: a name of at most 29 bytes (XT_EXTENSION_MAXNAMELEN) and two
// integers, under 64 bytes.
unsafe impl Object for CompatQuery {
    unsafe fn build_payload(&self, nlh: *mut libc::nlmsghdr) {
        let ext = self.0;
        // SAFETY: the caller gives a header with MSG_ROOM bytes of room; the strings are
        // NUL-terminated and outlive the calls, which copy them.
        unsafe {
            mnl::mnl_sys::mnl_attr_put_strz(nlh.cast(), 1, ext.name.as_ptr());
            mnl::mnl_sys::mnl_attr_put_u32(nlh.cast(), 2, ext.rev.to_be());
            mnl::mnl_sys::mnl_attr_put_u32(nlh.cast(), 3, u32::from(ext.target).to_be());
        }
    }
}

/// `XT_ALIGN`: xtables payloads are padded to 8 bytes.
pub(crate) const fn xt_align(n: usize) -> usize {
    (n + 7) & !7
}

/// `struct xt_addrtype_info_v1 { __u16 source; __u16 dest; __u32 flags; }`, revision 1.
pub(crate) const ADDRTYPE_REV: u32 = 1;
pub(crate) const ADDRTYPE_LEN: usize = 8;
/// `XT_ADDRTYPE_LOCAL = 1 << RTN_LOCAL`.
pub(crate) const ADDRTYPE_LOCAL: u16 = 1 << libc::RTN_LOCAL;

/// `--dst-type LOCAL`, nothing else: no source type, no interface limit, no inversion.
pub(crate) fn addrtype_dst_local() -> [u8; ADDRTYPE_LEN] {
    let mut info = [0u8; ADDRTYPE_LEN];
    info[2..4].copy_from_slice(&ADDRTYPE_LOCAL.to_ne_bytes());
    info
}

pub(crate) fn is_addrtype_dst_local(info: &[u8]) -> bool {
    info.len() == ADDRTYPE_LEN && info == addrtype_dst_local()
}

/// `struct xt_statistic_info { __u16 mode, flags; union { struct { __u32 probability; }
/// random; struct { __u32 every, packet, count; } nth; } u; struct xt_statistic_priv
/// *master __aligned(8); }`, revision 0: 24 bytes.
pub(crate) const STATISTIC_REV: u32 = 0;
pub(crate) const STATISTIC_LEN: usize = 24;

/// `--mode random --probability P`, with P given as iptables stores it: `P * 2^31`,
/// rounded. iptables-nft 1.8.9 also writes the value into `u.nth.count` (its final check
/// sets `count = every - packet` whatever the mode, and `every` shares the union's first
/// word with `probability`), so the same is done here: the golden capture has it.
pub(crate) fn statistic_random(probability: u32) -> [u8; STATISTIC_LEN] {
    let mut info = [0u8; STATISTIC_LEN];
    // mode XT_STATISTIC_MODE_RANDOM (0), flags 0 (no --invert).
    info[4..8].copy_from_slice(&probability.to_ne_bytes());
    info[12..16].copy_from_slice(&probability.to_ne_bytes());
    info
}

/// The probability of a `--mode random` statistic payload without inversion, as written
/// by [`statistic_random`] (and by iptables-nft).
pub(crate) fn parse_statistic_random(info: &[u8]) -> Option<u32> {
    if info.len() != STATISTIC_LEN || info[0..4] != [0; 4] || info[8..12] != [0; 4] {
        return None;
    }
    let probability = u32::from_ne_bytes(info[4..8].try_into().ok()?);
    (info[12..16] == probability.to_ne_bytes() && info[16..].iter().all(|&b| b == 0))
        .then_some(probability)
}

/// `struct xt_comment_info { char comment[XT_MAX_COMMENT_LEN]; }`, revision 0.
pub(crate) const COMMENT_REV: u32 = 0;
pub(crate) const COMMENT_LEN: usize = 256;

/// The comment, NUL padded. The caller guarantees at most 255 bytes and no NUL.
pub(crate) fn comment(text: &str) -> [u8; COMMENT_LEN] {
    let mut info = [0u8; COMMENT_LEN];
    info[..text.len()].copy_from_slice(text.as_bytes());
    info
}

pub(crate) fn parse_comment(info: &[u8]) -> Option<&str> {
    if info.len() != COMMENT_LEN {
        return None;
    }
    crate::attr::c_str(info)
}

/// REDIRECT revision 0 takes the family's own legacy range struct.
pub(crate) const REDIRECT_REV: u32 = 0;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: only the port range is set, the address is the
/// incoming interface's (PREROUTING) or loopback (OUTPUT).
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 1 << 1;

/// IPv4: `struct nf_nat_ipv4_multi_range_compat { unsigned int rangesize; struct
/// nf_nat_ipv4_range { unsigned int flags; __be32 min_ip, max_ip; __be16 min, max; } range[1]; }`,
/// 20 bytes, aligned to 24.
const V4_LEN: usize = 20;
/// IPv6: `struct nf_nat_range { unsigned int flags; union nf_inet_addr min_addr, max_addr;
/// __be16 min_proto, max_proto; }`, 40 bytes.
const V6_LEN: usize = 40;

pub(crate) fn redirect_len(family: Family) -> usize {
    match family {
        Family::Ipv4 => xt_align(V4_LEN),
        Family::Ipv6 => xt_align(V6_LEN),
    }
}

/// `--to-ports PORT`.
pub(crate) fn redirect(family: Family, port: u16) -> Vec<u8> {
    let mut info = vec![0u8; redirect_len(family)];
    let flags = NF_NAT_RANGE_PROTO_SPECIFIED.to_ne_bytes();
    let port = port.to_be_bytes();
    match family {
        Family::Ipv4 => {
            info[0..4].copy_from_slice(&1u32.to_ne_bytes()); // rangesize
            info[4..8].copy_from_slice(&flags);
            info[16..18].copy_from_slice(&port);
            info[18..20].copy_from_slice(&port);
        }
        Family::Ipv6 => {
            info[0..4].copy_from_slice(&flags);
            info[36..38].copy_from_slice(&port);
            info[38..40].copy_from_slice(&port);
        }
    }
    info
}

/// The port of a `--to-ports PORT` (single port, no address) REDIRECT payload.
pub(crate) fn parse_redirect(family: Family, info: &[u8]) -> Option<u16> {
    if info.len() != redirect_len(family) {
        return None;
    }
    let port = match family {
        Family::Ipv4 => {
            let (min, max) = (&info[16..18], &info[18..20]);
            let rest_zero = info[8..16].iter().chain(&info[20..]).all(|&b| b == 0);
            (info[0..4] == 1u32.to_ne_bytes()
                && info[4..8] == NF_NAT_RANGE_PROTO_SPECIFIED.to_ne_bytes()
                && min == max
                && rest_zero)
                .then(|| u16::from_be_bytes([min[0], min[1]]))
        }
        Family::Ipv6 => {
            let (min, max) = (&info[36..38], &info[38..40]);
            (info[0..4] == NF_NAT_RANGE_PROTO_SPECIFIED.to_ne_bytes()
                && min == max
                && info[4..36].iter().all(|&b| b == 0))
            .then(|| u16::from_be_bytes([min[0], min[1]]))
        }
    }?;
    (port != 0).then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_round_trips_for_both_families() {
        for family in Family::ALL {
            let info = redirect(family, 40400);
            assert_eq!(parse_redirect(family, &info), Some(40400));
        }
        assert_eq!(redirect(Family::Ipv4, 1).len(), 24);
        assert_eq!(redirect(Family::Ipv6, 1).len(), 40);
    }

    #[test]
    fn redirect_of_other_family_does_not_parse() {
        assert_eq!(
            parse_redirect(Family::Ipv6, &redirect(Family::Ipv4, 80)),
            None
        );
        assert_eq!(
            parse_redirect(Family::Ipv4, &redirect(Family::Ipv6, 80)),
            None
        );
    }

    #[test]
    fn statistic_round_trips() {
        let info = statistic_random(429_496_730);
        assert_eq!(parse_statistic_random(&info), Some(429_496_730));
        let mut inverted = info;
        inverted[2] = 1;
        assert_eq!(parse_statistic_random(&inverted), None);
    }

    #[test]
    fn comment_round_trips() {
        let info = comment("SWITCHEROO:ns=a");
        assert_eq!(parse_comment(&info), Some("SWITCHEROO:ns=a"));
    }

    #[test]
    fn addrtype_is_dest_local_only() {
        assert!(is_addrtype_dst_local(&addrtype_dst_local()));
        assert_eq!(addrtype_dst_local(), [0, 0, 4, 0, 0, 0, 0, 0]);
    }
}
