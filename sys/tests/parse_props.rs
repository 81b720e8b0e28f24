//! The rule-dump parser faces whatever the kernel (or anyone sharing the table) hands it:
//! it must never panic, and whatever we encode it must read back unchanged.

use proptest::prelude::*;
use switcheroo_sys::{parse_rule_message, Batch, Chain, Family, Protocol, Redirect};

/// The NEWRULE message of a one-insert batch, as the payload after `nlmsghdr`, with the
/// handle attribute the kernel adds to dumps and echoes.
fn encoded_rule(family: Family, chain: Chain, redirect: &Redirect, handle: u64) -> Vec<u8> {
    let mut batch = Batch::new(None);
    batch.insert_rule(family, chain, redirect.clone());
    let bytes = batch.to_bytes(1);
    // Skip the 20-byte batch begin message; the rule message follows.
    let len = u32::from_ne_bytes(bytes[20..24].try_into().unwrap()) as usize;
    let mut payload = bytes[20 + 16..20 + len].to_vec();
    payload.extend_from_slice(&12u16.to_ne_bytes());
    payload.extend_from_slice(&3u16.to_ne_bytes()); // NFTA_RULE_HANDLE
    payload.extend_from_slice(&handle.to_be_bytes());
    payload
}

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![Just(Family::Ipv4), Just(Family::Ipv6)]
}

fn chain() -> impl Strategy<Value = Chain> {
    prop_oneof![Just(Chain::Prerouting), Just(Chain::Output)]
}

fn redirect() -> impl Strategy<Value = Redirect> {
    (
        1u16..,
        1u16..,
        "[ !#-\\[\\]-~]{0,255}",
        proptest::option::of(1u8..=99),
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)],
    )
        .prop_map(|(p, q, c, percent, protocol)| {
            let r = Redirect::new(p, q, &c)
                .expect("valid by construction")
                .with_protocol(protocol);
            match percent {
                Some(percent) => r.with_percent(percent).expect("1-99"),
                None => r,
            }
        })
}

proptest! {
    #[test]
    fn encoded_rules_parse_back(f in family(), c in chain(), r in redirect(), h in 1u64..) {
        let entry = parse_rule_message(&encoded_rule(f, c, &r, h)).expect("our own rule parses");
        prop_assert_eq!(entry.family, f);
        prop_assert_eq!(entry.chain, c);
        prop_assert_eq!(entry.handle.get(), h);
        prop_assert_eq!(entry.redirect, Some(r));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_rule_message(&bytes);
    }

    #[test]
    fn corrupted_rules_never_panic(
        r in redirect(),
        f in family(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encoded_rule(f, Chain::Output, &r, 7);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let _ = parse_rule_message(&bytes);
        let end = cut.index(bytes.len() + 1);
        let _ = parse_rule_message(&bytes[..end]);
    }

    #[test]
    fn a_rule_of_another_family_is_not_misread(r in redirect()) {
        // An IPv4 encoding relabelled as IPv6 must not yield a redirect: the REDIRECT
        // payloads differ in size.
        let mut bytes = encoded_rule(Family::Ipv4, Chain::Output, &r, 7);
        bytes[0] = libc::NFPROTO_IPV6 as u8;
        prop_assert_eq!(parse_rule_message(&bytes).and_then(|e| e.redirect), None);
    }
}
