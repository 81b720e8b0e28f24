//! The oracle for our encoding is what iptables-nft 1.8.9 itself sends. The golden files
//! are the batches it wrote to its netlink socket (captured with `strace -e write=3`) for
//!
//!     iptables-nft  -t nat -I OUTPUT     -p tcp -m tcp --dport 8080 -m addrtype --dst-type LOCAL -m comment --comment "SWITCHEROO:ns=app:port=40400:pid=1234:start=98765" -j REDIRECT --to-ports 40400
//!     ip6tables-nft -t nat -I PREROUTING (same arguments)
//!
//! in a fresh network namespace, so each starts by creating the table and the chain.
//! Our batch must carry the same messages byte for byte; only the netlink header flags
//! differ, because we ask for acks and for the echo of the new rule.

use switcheroo_sys::{Batch, Chain, Family, Op, Redirect};

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
    let mut batch = Batch::new(Some(genid));
    batch.push(Op::AddTable(family));
    batch.push(Op::AddChain(family, chain));
    batch.insert_rule(family, chain, Redirect::new(8080, 40400, COMMENT).unwrap());
    let ours = split(&batch.to_bytes(1));
    let theirs = split(golden);
    assert_eq!(ours.len(), theirs.len());
    let ack = libc::NLM_F_ACK as u16;
    let echo = libc::NLM_F_ECHO as u16;
    let extra = [0, ack, ack, ack | echo, 0];
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
