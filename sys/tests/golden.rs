//! The oracle for our encoding is what iptables-nft 1.8.9 itself sends. The golden files
//! are the batches it wrote to its netlink socket (captured with `strace -e write=3`) for
//!
//!     iptables-nft  -t nat -I OUTPUT     -p tcp -m tcp --dport 8080 -m addrtype --dst-type LOCAL -m comment --comment "SWITCHEROO:ns=app:port=40400:pid=1234:start=98765" -j REDIRECT --to-ports 40400
//!     ip6tables-nft -t nat -I PREROUTING (same arguments)
//!
//! in a fresh network namespace, so each starts by creating the table and the chain; and
//! the same with `-m statistic --mode random --probability 0.2` (IPv4 OUTPUT) and `0.1`
//! (IPv6 PREROUTING) after the addrtype match, as a canary's rule is written; and the same
//! rules with `-p udp -m udp --dport 8080` (IPv4 OUTPUT, IPv6 PREROUTING, each in a fresh
//! namespace), as a UDP port's rule is written.
//! Our batch must carry the same messages byte for byte; only the netlink header flags
//! differ, because we ask for an ack of the last message and for the echo of the new rule.

use switcheroo_sys::{Batch, Chain, Family, Op, Protocol, Redirect};

const COMMENT: &str = "SWITCHEROO:ns=app:port=40400:pid=1234:start=98765";

struct Msg {
    kind: u16,
    flags: u16,
    seq: u32,
    body: Vec<u8>,
}

fn split(bytes: &[u8]) -> Vec<Msg> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= bytes.len() {
        let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        out.push(Msg {
            kind: u16::from_ne_bytes(bytes[off + 4..off + 6].try_into().unwrap()),
            flags: u16::from_ne_bytes(bytes[off + 6..off + 8].try_into().unwrap()),
            seq: u32::from_ne_bytes(bytes[off + 8..off + 12].try_into().unwrap()),
            body: bytes[off + 16..off + len].to_vec(),
        });
        off += (len + 3) & !3;
    }
    assert_eq!(off, bytes.len(), "trailing bytes");
    out
}

/// `genid` is the generation iptables-nft read in its namespace (the IPv6 capture was taken
/// after the IPv4 one, in the same namespace).
fn check(golden: &[u8], genid: u32, family: Family, chain: Chain) {
    check_rule(
        golden,
        genid,
        family,
        chain,
        Redirect::new(8080, 40400, COMMENT).unwrap(),
    );
}

fn check_rule(golden: &[u8], genid: u32, family: Family, chain: Chain, rule: Redirect) {
    let mut batch = Batch::new(Some(genid));
    batch.push(Op::AddTable(family));
    batch.push(Op::AddChain(family, chain));
    batch.insert_rule(family, chain, rule);
    let ours = split(&batch.to_bytes(1));
    let theirs = split(golden);
    assert_eq!(ours.len(), theirs.len());
    let ack = libc::NLM_F_ACK as u16;
    let echo = libc::NLM_F_ECHO as u16;
    let extra = [0, 0, 0, ack | echo, 0];
    for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(o.kind, t.kind, "message {i} type");
        assert_eq!(o.seq, t.seq, "message {i} seq");
        assert_eq!(o.flags, t.flags | extra[i], "message {i} flags");
        assert_eq!(hex(&o.body), hex(&t.body), "message {i} body");
    }
}

fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .map(|c| {
            c.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn ipv4_output_batch_matches_iptables_nft() {
    check(
        include_bytes!("golden/iptables-nft-ip-output.batch"),
        1,
        Family::Ipv4,
        Chain::Output,
    );
}

#[test]
fn ipv6_prerouting_batch_matches_ip6tables_nft() {
    check(
        include_bytes!("golden/ip6tables-nft-ip6-prerouting.batch"),
        2,
        Family::Ipv6,
        Chain::Prerouting,
    );
}

#[test]
fn ipv4_canary_batch_matches_iptables_nft_statistic() {
    let rule = Redirect::new(8080, 40400, COMMENT)
        .unwrap()
        .with_percent(20)
        .unwrap();
    check_rule(
        include_bytes!("golden/iptables-nft-ip-output-statistic.batch"),
        1,
        Family::Ipv4,
        Chain::Output,
        rule,
    );
}

#[test]
fn ipv6_canary_batch_matches_ip6tables_nft_statistic() {
    let rule = Redirect::new(8080, 40400, COMMENT)
        .unwrap()
        .with_percent(10)
        .unwrap();
    check_rule(
        include_bytes!("golden/ip6tables-nft-ip6-prerouting-statistic.batch"),
        1,
        Family::Ipv6,
        Chain::Prerouting,
        rule,
    );
}

#[test]
fn ipv4_udp_batch_matches_iptables_nft() {
    let rule = Redirect::new(8080, 40400, COMMENT)
        .unwrap()
        .with_protocol(Protocol::Udp);
    check_rule(
        include_bytes!("golden/iptables-nft-ip-output-udp.batch"),
        1,
        Family::Ipv4,
        Chain::Output,
        rule,
    );
}

#[test]
fn ipv6_udp_batch_matches_ip6tables_nft() {
    let rule = Redirect::new(8080, 40400, COMMENT)
        .unwrap()
        .with_protocol(Protocol::Udp);
    check_rule(
        include_bytes!("golden/ip6tables-nft-ip6-prerouting-udp.batch"),
        1,
        Family::Ipv6,
        Chain::Prerouting,
        rule,
    );
}

/// The rule message of a capture, as the kernel would dump it: with a handle appended
/// (the compat attribute, which the kernel does not keep, is ignored by the parser).
fn dumped(golden: &[u8]) -> Vec<u8> {
    let rule = split(golden)
        .into_iter()
        .find(|m| m.kind == (libc::NFNL_SUBSYS_NFTABLES as u16) << 8 | libc::NFT_MSG_NEWRULE as u16)
        .unwrap();
    let mut body = rule.body.clone();
    // NFTA_RULE_HANDLE (3), big endian.
    body.extend_from_slice(&[12, 0, 3, 0]);
    body.extend_from_slice(&7u64.to_be_bytes());
    body
}

#[test]
fn the_captured_udp_rules_parse_back_as_udp_and_tcp_as_tcp() {
    for (golden, protocol) in [
        (
            &include_bytes!("golden/iptables-nft-ip-output-udp.batch")[..],
            Protocol::Udp,
        ),
        (
            &include_bytes!("golden/ip6tables-nft-ip6-prerouting-udp.batch")[..],
            Protocol::Udp,
        ),
        (
            &include_bytes!("golden/iptables-nft-ip-output.batch")[..],
            Protocol::Tcp,
        ),
    ] {
        let entry = switcheroo_sys::parse_rule_message(&dumped(golden)).expect("parses");
        let redirect = entry.redirect.expect("a redirect of ours");
        assert_eq!(redirect.protocol, protocol);
        assert_eq!((redirect.public_port, redirect.to_port), (8080, 40400));
        assert_eq!(redirect.comment, COMMENT);
    }
}

#[test]
fn the_captured_canary_rule_parses_back_with_its_share() {
    let golden = include_bytes!("golden/iptables-nft-ip-output-statistic.batch");
    let entry = switcheroo_sys::parse_rule_message(&dumped(golden)).expect("parses");
    let redirect = entry.redirect.expect("a redirect of ours");
    assert_eq!(redirect.probability, Some(429_496_730));
    assert!((redirect.share() - 0.2).abs() < 1e-9);
    assert_eq!(redirect.comment, COMMENT);
}
