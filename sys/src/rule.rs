//! The redirect rule, built exactly as iptables-nft 1.8 builds
//! `-p tcp -m tcp --dport P -m addrtype --dst-type LOCAL -m comment --comment C -j REDIRECT --to-ports Q`
//! (or the same with `-p udp -m udp`), and parsed back from a dump or an echo.
//!
//! Expressions, in iptables-nft's order: `meta l4proto` + `cmp` (for `-p tcp` or `-p udp`),
//! `payload` (transport header, offset 2, 2 bytes: the destination port of TCP and UDP
//! alike) + `cmp` (for `--dport`), xt `match addrtype` rev 1,
//! for a canary xt `match statistic` rev 0 (`--mode random --probability P`), xt `match
//! comment` rev 0, `counter`, xt `target REDIRECT` rev 0; plus the rule's compat attribute
//! (the protocol's number). A native `redir` expression or a comment kept in the rule's udata
//! would make iptables-nft 1.8 call the whole table incompatible, so neither is ever emitted.

use crate::attr::{self, nla, Attrs};
use crate::nftnl::{Expr, RuleObj};
use crate::{xt, Chain, Error, Family, Handle, TABLE};
use nftnl::nftnl_sys as sys;
use std::ffi::CString;

/// The longest comment xt_comment can carry (its 256-byte buffer holds a terminating NUL).
pub const COMMENT_MAX: usize = xt::COMMENT_LEN - 1;

/// The transport protocol a rule matches (`-p tcp -m tcp` or `-p udp -m udp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Protocol {
    /// TCP: connections.
    #[default]
    Tcp,
    /// UDP: datagrams, in flows that conntrack keeps by their 4-tuple.
    Udp,
}

impl Protocol {
    /// Both, TCP first.
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// The IP protocol number (`IPPROTO_TCP` 6, `IPPROTO_UDP` 17).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u8,
            Protocol::Udp => libc::IPPROTO_UDP as u8,
        }
    }

    /// `tcp` or `udp`, as iptables spells it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// The protocol of number `n`, if it is TCP or UDP.
    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a switcheroo rule does: TCP (or UDP) to a local address on `public_port` is
/// redirected to `to_port`, and the rule carries `comment`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Redirect {
    /// The transport protocol matched (`-p tcp -m tcp` or `-p udp -m udp`).
    pub protocol: Protocol,
    /// The destination port that is matched (`--dport`).
    pub public_port: u16,
    /// The port connections are redirected to (`--to-ports`).
    pub to_port: u16,
    /// The rule's `-m comment --comment` text.
    pub comment: String,
    /// Whether the rule also matches `-m addrtype --dst-type LOCAL`. Every rule this crate
    /// builds does; rules written by older tools may not.
    pub local_only: bool,
    /// For a rule that takes only a share of new connections, `-m statistic --mode random
    /// --probability P` with P stored as iptables stores it: `P * 2^31`, rounded (see
    /// [`Redirect::share`]). `None`: every connection.
    pub probability: Option<u32>,
}

/// 2^31: iptables' scale for `--probability` (a u32 compared against a random 31 bits).
const PROBABILITY_ONE: f64 = 2_147_483_648.0;

impl Redirect {
    /// A redirect of local TCP traffic to `public_port` towards `to_port` (see
    /// [`Redirect::with_protocol`] for UDP).
    ///
    /// Fails with [`Error::InvalidRule`] if a port is 0 or the comment is longer than
    /// [`COMMENT_MAX`] bytes, contains a NUL byte, or is not printable ASCII (iptables-nft-save
    /// prints it between double quotes, so `"` and `\` are refused too).
    pub fn new(public_port: u16, to_port: u16, comment: &str) -> Result<Self, Error> {
        let invalid = |why: String| Err(Error::InvalidRule { why });
        if public_port == 0 || to_port == 0 {
            return invalid("port 0 cannot be matched or redirected to".into());
        }
        if comment.len() > COMMENT_MAX {
            return invalid(format!(
                "comment is {} bytes, xt_comment holds at most {COMMENT_MAX}",
                comment.len()
            ));
        }
        if let Some(c) = comment
            .chars()
            .find(|c| !c.is_ascii_graphic() && *c != ' ' || *c == '"' || *c == '\\')
        {
            return invalid(format!(
                "comment contains {c:?}; use printable ASCII without quotes or backslashes"
            ));
        }
        Ok(Redirect {
            protocol: Protocol::Tcp,
            public_port,
            to_port,
            comment: comment.to_owned(),
            local_only: true,
            probability: None,
        })
    }

    /// The same redirect for `protocol` (a new one is TCP).
    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// The same redirect for only a share of new connections, `percent` of them (1-99),
    /// with the `--probability` that iptables would store for `percent / 100`.
    /// [`Error::InvalidRule`] outside 1-99.
    pub fn with_percent(mut self, percent: u8) -> Result<Self, Error> {
        if !(1..=99).contains(&percent) {
            return Err(Error::InvalidRule {
                why: format!("a share of {percent}% of connections: give 1 to 99"),
            });
        }
        self.probability = Some((PROBABILITY_ONE * f64::from(percent) / 100.0).round() as u32);
        Ok(self)
    }

    /// The share of new connections the rule takes, 0.0-1.0 (1.0 without a statistic
    /// match).
    pub fn share(&self) -> f64 {
        self.probability
            .map_or(1.0, |p| f64::from(p) / PROBABILITY_ONE)
    }

    /// The libnftnl rule object for this redirect in `family`'s nat `chain`.
    pub(crate) fn to_object(&self, family: Family, chain: Chain) -> RuleObj {
        self.object(family, &cstring(chain.name()))
    }

    /// The rule object in the nat chain named `chain` (a probe's chain, see
    /// [`crate::Conn::probe_support`]).
    pub(crate) fn object(&self, family: Family, chain: &std::ffi::CStr) -> RuleObj {
        let mut rule = RuleObj::new();
        rule.set_str(sys::NFTNL_RULE_TABLE as u16, &cstring(TABLE));
        rule.set_str(sys::NFTNL_RULE_CHAIN as u16, chain);
        let proto = self.protocol.number();
        rule.set_u32(sys::NFTNL_RULE_COMPAT_PROTO as u16, proto.into());
        rule.set_u32(sys::NFTNL_RULE_COMPAT_FLAGS as u16, 0);

        // -p tcp / -p udp
        let mut meta = Expr::new(c"meta");
        meta.set_u32(sys::NFTNL_EXPR_META_KEY, libc::NFT_META_L4PROTO as u32);
        meta.set_u32(sys::NFTNL_EXPR_META_DREG, libc::NFT_REG_1 as u32);
        rule.add_expr(meta);
        rule.add_expr(cmp_eq(&[proto]));

        // -m tcp --dport P / -m udp --dport P
        let mut payload = Expr::new(c"payload");
        payload.set_u32(sys::NFTNL_EXPR_PAYLOAD_DREG, libc::NFT_REG_1 as u32);
        payload.set_u32(
            sys::NFTNL_EXPR_PAYLOAD_BASE,
            libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
        );
        payload.set_u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, 2);
        payload.set_u32(sys::NFTNL_EXPR_PAYLOAD_LEN, 2);
        rule.add_expr(payload);
        rule.add_expr(cmp_eq(&self.public_port.to_be_bytes()));

        if self.local_only {
            rule.add_expr(xt_expr(
                c"match",
                c"addrtype",
                xt::ADDRTYPE_REV,
                &xt::addrtype_dst_local(),
            ));
        }
        if let Some(probability) = self.probability {
            rule.add_expr(xt_expr(
                c"match",
                c"statistic",
                xt::STATISTIC_REV,
                &xt::statistic_random(probability),
            ));
        }
        rule.add_expr(xt_expr(
            c"match",
            c"comment",
            xt::COMMENT_REV,
            &xt::comment(&self.comment),
        ));

        let mut counter = Expr::new(c"counter");
        counter.set_u64(sys::NFTNL_EXPR_CTR_BYTES, 0);
        counter.set_u64(sys::NFTNL_EXPR_CTR_PACKETS, 0);
        rule.add_expr(counter);

        rule.add_expr(xt_expr(
            c"target",
            c"REDIRECT",
            xt::REDIRECT_REV,
            &xt::redirect(family, self.to_port),
        ));
        rule
    }
}

/// A rule object naming only its table and chain (for deletes and dump filters).
pub(crate) fn rule_in(chain: Chain) -> RuleObj {
    let mut rule = RuleObj::new();
    rule.set_str(sys::NFTNL_RULE_TABLE as u16, &cstring(TABLE));
    rule.set_str(sys::NFTNL_RULE_CHAIN as u16, &cstring(chain.name()));
    rule
}

/// A table or chain name as a C string. Every caller passes a constant name or an
/// [`OwnedTable`](crate::OwnedTable), which refuses NUL bytes when it is made.
pub(crate) fn cstring(s: &str) -> CString {
    CString::new(s).expect("table and chain names have no NUL")
}

fn cmp_eq(value: &[u8]) -> Expr {
    let mut cmp = Expr::new(c"cmp");
    cmp.set_u32(sys::NFTNL_EXPR_CMP_SREG, libc::NFT_REG_1 as u32);
    cmp.set_u32(sys::NFTNL_EXPR_CMP_OP, libc::NFT_CMP_EQ as u32);
    cmp.set_bytes(sys::NFTNL_EXPR_CMP_DATA, value);
    cmp
}

fn xt_expr(kind: &std::ffi::CStr, name: &std::ffi::CStr, rev: u32, info: &[u8]) -> Expr {
    // NFTNL_EXPR_MT_* and NFTNL_EXPR_TG_* share their numbering.
    let mut e = Expr::new(kind);
    e.set_str(sys::NFTNL_EXPR_MT_NAME, name);
    e.set_u32(sys::NFTNL_EXPR_MT_REV, rev);
    e.set_xt_info(sys::NFTNL_EXPR_MT_INFO, info);
    e
}

/// A rule from a dump or an echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleEntry {
    /// The family of the table the rule is in.
    pub family: Family,
    /// The chain the rule is in.
    pub chain: Chain,
    /// The rule's kernel handle.
    pub handle: Handle,
    /// The redirect, if the rule is exactly in switcheroo's encoding (with or without the
    /// addrtype match); `None` for every other rule.
    pub redirect: Option<Redirect>,
}

/// Parses the payload (after `nlmsghdr`) of an `NFT_MSG_NEWRULE` message. Returns `None`
/// for anything that is not a rule with a handle in `PREROUTING` or `OUTPUT` of the `nat`
/// table of `ip`/`ip6`; never panics, whatever the bytes.
pub fn parse_rule_message(payload: &[u8]) -> Option<RuleEntry> {
    let family = match attr::nfgen_family(payload)? as i32 {
        libc::NFPROTO_IPV4 => Family::Ipv4,
        libc::NFPROTO_IPV6 => Family::Ipv6,
        _ => return None,
    };
    let (mut table, mut chain, mut handle, mut exprs, mut udata) = (None, None, None, None, false);
    for (kind, value) in attr::nfgen_attrs(payload) {
        match kind {
            nla::RULE_TABLE => table = attr::c_str(value),
            nla::RULE_CHAIN => chain = attr::c_str(value),
            nla::RULE_HANDLE => handle = attr::be_u64(value),
            nla::RULE_EXPRESSIONS => exprs = Some(value),
            nla::RULE_USERDATA => udata = true,
            _ => {}
        }
    }
    if table? != TABLE {
        return None;
    }
    // The kernel keeps no NFTA_RULE_COMPAT (it only informs the xt checks at insert time),
    // so a dump or an echo is recognised by its expressions alone.
    let redirect = match (exprs, udata) {
        (Some(exprs), false) => parse_redirect(family, exprs),
        _ => None,
    };
    Some(RuleEntry {
        family,
        chain: Chain::from_name(chain?)?,
        handle: Handle(handle?),
        redirect,
    })
}

/// One expression: its name and the attributes of its data.
fn expressions(list: &[u8]) -> impl Iterator<Item = (&str, Attrs<'_>)> {
    Attrs(list).filter_map(|(kind, elem)| {
        if kind != nla::LIST_ELEM {
            return None;
        }
        let name = Attrs(elem).get(nla::EXPR_NAME).and_then(attr::c_str)?;
        let data = Attrs(elem).get(nla::EXPR_DATA).unwrap_or(&[]);
        Some((name, Attrs(data)))
    })
}

fn u32_attr(a: &Attrs<'_>, kind: u16) -> Option<u32> {
    a.clone().get(kind).and_then(attr::be_u32)
}

fn cmp_eq_value<'a>(a: &Attrs<'a>) -> Option<&'a [u8]> {
    (u32_attr(a, nla::CMP_SREG)? == libc::NFT_REG_1 as u32
        && u32_attr(a, nla::CMP_OP)? == libc::NFT_CMP_EQ as u32)
        .then(|| Attrs(a.clone().get(nla::CMP_DATA)?).get(nla::DATA_VALUE))?
}

fn xt_parts<'a>(a: &Attrs<'a>) -> Option<(&'a str, u32, &'a [u8])> {
    Some((
        attr::c_str(a.clone().get(nla::XT_NAME)?)?,
        u32_attr(a, nla::XT_REV)?,
        a.clone().get(nla::XT_INFO)?,
    ))
}

/// Recognises exactly the expression sequence `Redirect::to_object` builds (the addrtype
/// match and the counter optional), and nothing else.
fn parse_redirect(family: Family, list: &[u8]) -> Option<Redirect> {
    let mut it = expressions(list).peekable();

    let (name, meta) = it.next()?;
    (name == "meta"
        && u32_attr(&meta, nla::META_KEY)? == libc::NFT_META_L4PROTO as u32
        && u32_attr(&meta, nla::META_DREG)? == libc::NFT_REG_1 as u32)
        .then_some(())?;
    let (name, cmp) = it.next()?;
    let protocol = match (name, cmp_eq_value(&cmp)?) {
        ("cmp", [n]) => Protocol::from_number(*n)?,
        _ => return None,
    };

    let (name, payload) = it.next()?;
    (name == "payload"
        && u32_attr(&payload, nla::PAYLOAD_DREG)? == libc::NFT_REG_1 as u32
        && u32_attr(&payload, nla::PAYLOAD_BASE)? == libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32
        && u32_attr(&payload, nla::PAYLOAD_OFFSET)? == 2
        && u32_attr(&payload, nla::PAYLOAD_LEN)? == 2)
        .then_some(())?;
    let (name, cmp) = it.next()?;
    let port: [u8; 2] = (name == "cmp")
        .then(|| cmp_eq_value(&cmp))??
        .try_into()
        .ok()?;
    let public_port = u16::from_be_bytes(port);

    let mut local_only = false;
    let mut probability = None;
    let mut comment = None;
    while let Some((name, data)) = it.peek() {
        if *name != "match" {
            break;
        }
        match xt_parts(data)? {
            ("addrtype", xt::ADDRTYPE_REV, info)
                if !local_only && probability.is_none() && comment.is_none() =>
            {
                xt::is_addrtype_dst_local(info).then_some(())?;
                local_only = true;
            }
            ("statistic", xt::STATISTIC_REV, info)
                if probability.is_none() && comment.is_none() =>
            {
                probability = Some(xt::parse_statistic_random(info)?);
            }
            ("comment", xt::COMMENT_REV, info) if comment.is_none() => {
                comment = Some(xt::parse_comment(info)?.to_owned());
            }
            _ => return None,
        }
        it.next();
    }
    if it.peek().map(|(name, _)| *name) == Some("counter") {
        it.next();
    }
    let (name, target) = it.next()?;
    let to_port = match (name, xt_parts(&target)?) {
        ("target", ("REDIRECT", xt::REDIRECT_REV, info)) => xt::parse_redirect(family, info)?,
        _ => return None,
    };
    if it.next().is_some() || public_port == 0 {
        return None;
    }
    Some(Redirect {
        protocol,
        public_port,
        to_port,
        comment: comment?,
        local_only,
        probability,
    })
}
