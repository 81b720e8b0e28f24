//! The whole ruleset, read for a diagnosis: every chain of every table (with its hook,
//! priority and policy) and every rule, its expressions decoded into the few shapes a
//! firewall's input path is made of. Read-only; safe Rust over the dumps.

use crate::attr::{self, Attrs, MsgBuilder};
use crate::{Conn, Error};

/// `linux/netfilter/nf_tables.h` numbers not in `crate::attr::nla`.
mod nft {
    pub const MSG_GETCHAIN: u16 = 4;
    pub const MSG_NEWCHAIN: u16 = 3;
    pub const MSG_GETRULE: u16 = 7;
    pub const MSG_NEWRULE: u16 = 6;
    pub const MSG_NEWSETELEM: u16 = 12;
    pub const MSG_GETSETELEM: u16 = 13;

    pub const SET_ELEM_LIST_TABLE: u16 = 1;
    pub const SET_ELEM_LIST_SET: u16 = 2;
    pub const SET_ELEM_LIST_ELEMENTS: u16 = 3;
    pub const SET_ELEM_KEY: u16 = 1;
    pub const SET_ELEM_FLAGS: u16 = 3;
    pub const SET_ELEM_INTERVAL_END: u32 = 1;

    pub const CHAIN_TABLE: u16 = 1;
    pub const CHAIN_NAME: u16 = 3;
    pub const CHAIN_HOOK: u16 = 4;
    pub const CHAIN_POLICY: u16 = 5;
    pub const CHAIN_TYPE: u16 = 7;
    pub const HOOK_HOOKNUM: u16 = 1;
    pub const HOOK_PRIORITY: u16 = 2;

    pub const RULE_TABLE: u16 = 1;
    pub const RULE_CHAIN: u16 = 2;
    pub const RULE_HANDLE: u16 = 3;
    pub const RULE_EXPRESSIONS: u16 = 4;

    pub const BITWISE_SREG: u16 = 1;
    pub const BITWISE_DREG: u16 = 2;
    pub const BITWISE_MASK: u16 = 4;
    pub const BITWISE_XOR: u16 = 5;
    pub const CT_DREG: u16 = 1;
    pub const CT_KEY: u16 = 2;
    pub const IMMEDIATE_DREG: u16 = 1;
    pub const IMMEDIATE_DATA: u16 = 2;
    pub const DATA_VERDICT: u16 = 2;
    pub const VERDICT_CODE: u16 = 1;
    pub const VERDICT_CHAIN: u16 = 2;
    pub const RANGE_SREG: u16 = 1;
    pub const RANGE_OP: u16 = 2;
    pub const RANGE_FROM: u16 = 3;
    pub const RANGE_TO: u16 = 4;
    pub const LOOKUP_SET: u16 = 1;
    pub const LOOKUP_SREG: u16 = 2;
    pub const LOOKUP_FLAGS: u16 = 5;
}

const NFT: u16 = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8;

/// A table family, as nf_tables numbers them (`NFPROTO_*`).
pub type FamilyNumber = u8;

/// A chain of any table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    /// `NFPROTO_IPV4` (ip), `NFPROTO_IPV6` (ip6), `NFPROTO_INET` (inet), ...
    pub family: FamilyNumber,
    /// Its table.
    pub table: String,
    /// Its name.
    pub name: String,
    /// For a base chain: its hook (`NF_INET_LOCAL_IN` = 1, ...) and priority.
    pub hook: Option<(u32, i32)>,
    /// For a base chain: its policy (`NF_ACCEPT` 1, `NF_DROP` 0).
    pub policy: Option<u32>,
    /// For a base chain: `filter`, `nat` or `route`.
    pub kind: Option<String>,
}

/// A verdict as a rule's `immediate` expression carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `accept`
    Accept,
    /// `drop`
    Drop,
    /// `continue`: go on with the next rule.
    Continue,
    /// `return`: back to the calling chain.
    Return,
    /// `jump CHAIN`
    Jump(String),
    /// `goto CHAIN`
    Goto(String),
    /// Another code.
    Other(i32),
}

/// One expression, decoded where a firewall's input path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `meta` load of `key` into `dreg`.
    Meta {
        /// `NFT_META_*`
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `ct` load of `key` into `dreg`.
    Ct {
        /// `NFT_CT_*`
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `payload` load of `len` bytes at `offset` of header `base` into `dreg`.
    Payload {
        /// `NFT_PAYLOAD_*_HEADER`
        base: u32,
        /// Offset in the header.
        offset: u32,
        /// Length.
        len: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `cmp`: register `sreg` against `data` with `op` (`NFT_CMP_*`).
    Cmp {
        /// Source register.
        sreg: u32,
        /// `NFT_CMP_EQ`, `NEQ`, `LT`, `LTE`, `GT`, `GTE`.
        op: u32,
        /// The constant.
        data: Vec<u8>,
    },
    /// `bitwise`: `dreg = (sreg & mask) ^ xor` (the boolean form).
    Bitwise {
        /// Source register.
        sreg: u32,
        /// Destination register.
        dreg: u32,
        /// The mask.
        mask: Vec<u8>,
        /// The xor.
        xor: Vec<u8>,
    },
    /// `range`: register between `from` and `to` (op `NFT_RANGE_EQ` 0 or `NEQ` 1).
    Range {
        /// Source register.
        sreg: u32,
        /// `NFT_RANGE_EQ` or `NFT_RANGE_NEQ`.
        op: u32,
        /// Low end.
        from: Vec<u8>,
        /// High end.
        to: Vec<u8>,
    },
    /// `lookup` of register `sreg` in set `set`.
    Lookup {
        /// The set's name.
        set: String,
        /// Source register.
        sreg: u32,
        /// Inverted (`!=`).
        invert: bool,
    },
    /// `immediate` verdict (into register 0).
    Verdict(Verdict),
    /// An xtables match: name, revision, info blob.
    Match {
        /// Its name.
        name: String,
        /// Its revision.
        rev: u32,
        /// Its info blob.
        info: Vec<u8>,
    },
    /// An xtables target: name, revision, info blob.
    Target {
        /// Its name.
        name: String,
        /// Its revision.
        rev: u32,
        /// Its info blob.
        info: Vec<u8>,
    },
    /// Any other expression, by name (`counter`, `log`, `reject`, `limit`, ...).
    Other(String),
}

/// A rule of any chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnyRule {
    /// Its table's family.
    pub family: FamilyNumber,
    /// Its table.
    pub table: String,
    /// Its chain.
    pub chain: String,
    /// Its handle.
    pub handle: u64,
    /// Its expressions, in order.
    pub exprs: Vec<Expr>,
}

impl Conn {
    /// Every chain of every table of every family in the socket's network namespace.
    pub fn all_chains(&mut self) -> Result<Vec<ChainInfo>, Error> {
        let op = || "listing every nftables chain".to_string();
        let mut out = Vec::new();
        self.dump_raw(
            &op,
            |seq| {
                MsgBuilder::new(NFT | nft::MSG_GETCHAIN, libc::NLM_F_DUMP as u16, seq, 0).finish()
            },
            |msg| {
                if msg.kind == NFT | nft::MSG_NEWCHAIN {
                    if let Some(chain) = parse_chain(msg.payload) {
                        out.push(chain);
                    }
                }
            },
        )?;
        Ok(out)
    }

    /// Every rule of every chain of every table in the socket's network namespace, each
    /// chain's in order.
    pub fn all_rules(&mut self) -> Result<Vec<AnyRule>, Error> {
        let op = || "listing every nftables rule".to_string();
        let mut out = Vec::new();
        self.dump_raw(
            &op,
            |seq| MsgBuilder::new(NFT | nft::MSG_GETRULE, libc::NLM_F_DUMP as u16, seq, 0).finish(),
            |msg| {
                if msg.kind == NFT | nft::MSG_NEWRULE {
                    if let Some(rule) = parse_any_rule(msg.payload) {
                        out.push(rule);
                    }
                }
            },
        )?;
        Ok(out)
    }
}

/// The keys of a set, when it is a plain set (no intervals): `None` for an interval set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetKeys(pub Option<Vec<Vec<u8>>>);

impl Conn {
    /// The keys of set `set` of table `table` (family `family`).
    pub fn set_keys(
        &mut self,
        family: FamilyNumber,
        table: &str,
        set: &str,
    ) -> Result<SetKeys, Error> {
        let op = || format!("listing the elements of set {set} of table {table}");
        let mut keys = Vec::new();
        let mut interval = false;
        self.dump_raw(
            &op,
            |seq| {
                let mut m = MsgBuilder::new(
                    NFT | nft::MSG_GETSETELEM,
                    libc::NLM_F_DUMP as u16,
                    seq,
                    family,
                );
                m.attr(nft::SET_ELEM_LIST_TABLE, &nul_terminated(table));
                m.attr(nft::SET_ELEM_LIST_SET, &nul_terminated(set));
                m.finish()
            },
            |msg| {
                if msg.kind != NFT | nft::MSG_NEWSETELEM {
                    return;
                }
                let Some(list) = attr::nfgen_attrs(msg.payload).get(nft::SET_ELEM_LIST_ELEMENTS)
                else {
                    return;
                };
                for (kind, elem) in Attrs(list) {
                    if kind != attr::nla::LIST_ELEM {
                        continue;
                    }
                    let flags = Attrs(elem)
                        .get(nft::SET_ELEM_FLAGS)
                        .and_then(attr::be_u32)
                        .unwrap_or(0);
                    interval |= flags & nft::SET_ELEM_INTERVAL_END != 0;
                    if let Some(key) = Attrs(elem)
                        .get(nft::SET_ELEM_KEY)
                        .and_then(|k| Attrs(k).get(attr::nla::DATA_VALUE))
                    {
                        keys.push(key.to_vec());
                    }
                }
            },
        )?;
        Ok(SetKeys((!interval).then_some(keys)))
    }
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn parse_chain(payload: &[u8]) -> Option<ChainInfo> {
    let family = attr::nfgen_family(payload)?;
    let (mut table, mut name, mut hook, mut policy, mut kind) = (None, None, None, None, None);
    for (k, v) in attr::nfgen_attrs(payload) {
        match k {
            nft::CHAIN_TABLE => table = attr::c_str(v).map(str::to_owned),
            nft::CHAIN_NAME => name = attr::c_str(v).map(str::to_owned),
            nft::CHAIN_HOOK => {
                let num = Attrs(v).get(nft::HOOK_HOOKNUM).and_then(attr::be_u32);
                let prio = Attrs(v).get(nft::HOOK_PRIORITY).and_then(attr::be_u32);
                hook = Some((num?, prio? as i32));
            }
            nft::CHAIN_POLICY => policy = attr::be_u32(v),
            nft::CHAIN_TYPE => kind = attr::c_str(v).map(str::to_owned),
            _ => {}
        }
    }
    Some(ChainInfo {
        family,
        table: table?,
        name: name?,
        hook,
        policy,
        kind,
    })
}

/// Parses an `NFT_MSG_NEWRULE` payload into a rule of any shape; never panics.
pub fn parse_any_rule(payload: &[u8]) -> Option<AnyRule> {
    let family = attr::nfgen_family(payload)?;
    let (mut table, mut chain, mut handle, mut exprs) = (None, None, None, Vec::new());
    for (k, v) in attr::nfgen_attrs(payload) {
        match k {
            nft::RULE_TABLE => table = attr::c_str(v).map(str::to_owned),
            nft::RULE_CHAIN => chain = attr::c_str(v).map(str::to_owned),
            nft::RULE_HANDLE => handle = attr::be_u64(v),
            nft::RULE_EXPRESSIONS => {
                for (kind, elem) in Attrs(v) {
                    if kind != attr::nla::LIST_ELEM {
                        continue;
                    }
                    let name = Attrs(elem)
                        .get(attr::nla::EXPR_NAME)
                        .and_then(attr::c_str)?;
                    let data = Attrs(Attrs(elem).get(attr::nla::EXPR_DATA).unwrap_or(&[]));
                    exprs.push(parse_expr(name, data));
                }
            }
            _ => {}
        }
    }
    Some(AnyRule {
        family,
        table: table?,
        chain: chain?,
        handle: handle?,
        exprs,
    })
}

fn u32_of(a: &Attrs<'_>, k: u16) -> Option<u32> {
    a.clone().get(k).and_then(attr::be_u32)
}

fn data_of(a: &Attrs<'_>, k: u16) -> Option<Vec<u8>> {
    Attrs(a.clone().get(k)?)
        .get(attr::nla::DATA_VALUE)
        .map(<[u8]>::to_vec)
}

fn parse_expr(name: &str, a: Attrs<'_>) -> Expr {
    let other = || Expr::Other(name.to_owned());
    let parsed = match name {
        "meta" => Some(Expr::Meta {
            key: u32_of(&a, attr::nla::META_KEY).unwrap_or(u32::MAX),
            // A meta that sets (sreg) rather than loads has no dreg.
            dreg: u32_of(&a, attr::nla::META_DREG).unwrap_or(u32::MAX),
        }),
        "ct" => Some(Expr::Ct {
            key: u32_of(&a, nft::CT_KEY).unwrap_or(u32::MAX),
            dreg: u32_of(&a, nft::CT_DREG).unwrap_or(u32::MAX),
        }),
        "payload" => (|| {
            Some(Expr::Payload {
                base: u32_of(&a, attr::nla::PAYLOAD_BASE)?,
                offset: u32_of(&a, attr::nla::PAYLOAD_OFFSET)?,
                len: u32_of(&a, attr::nla::PAYLOAD_LEN)?,
                dreg: u32_of(&a, attr::nla::PAYLOAD_DREG)?,
            })
        })(),
        "cmp" => (|| {
            Some(Expr::Cmp {
                sreg: u32_of(&a, attr::nla::CMP_SREG)?,
                op: u32_of(&a, attr::nla::CMP_OP)?,
                data: data_of(&a, attr::nla::CMP_DATA)?,
            })
        })(),
        "bitwise" => (|| {
            Some(Expr::Bitwise {
                sreg: u32_of(&a, nft::BITWISE_SREG)?,
                dreg: u32_of(&a, nft::BITWISE_DREG)?,
                mask: data_of(&a, nft::BITWISE_MASK)?,
                xor: data_of(&a, nft::BITWISE_XOR)?,
            })
        })(),
        "range" => (|| {
            Some(Expr::Range {
                sreg: u32_of(&a, nft::RANGE_SREG)?,
                op: u32_of(&a, nft::RANGE_OP)?,
                from: data_of(&a, nft::RANGE_FROM)?,
                to: data_of(&a, nft::RANGE_TO)?,
            })
        })(),
        "lookup" => (|| {
            Some(Expr::Lookup {
                set: attr::c_str(a.clone().get(nft::LOOKUP_SET)?)?.to_owned(),
                sreg: u32_of(&a, nft::LOOKUP_SREG)?,
                invert: u32_of(&a, nft::LOOKUP_FLAGS).unwrap_or(0) & 1 != 0,
            })
        })(),
        "immediate" => (|| {
            if u32_of(&a, nft::IMMEDIATE_DREG)? != 0 {
                return None; // a data load, not a verdict
            }
            let verdict = Attrs(Attrs(a.clone().get(nft::IMMEDIATE_DATA)?).get(nft::DATA_VERDICT)?);
            let code = u32_of(&verdict, nft::VERDICT_CODE)? as i32;
            let target = || {
                verdict
                    .clone()
                    .get(nft::VERDICT_CHAIN)
                    .and_then(attr::c_str)
                    .map(str::to_owned)
            };
            Some(Expr::Verdict(match code {
                1 => Verdict::Accept,
                0 => Verdict::Drop,
                -1 => Verdict::Continue,
                -5 => Verdict::Return,
                -3 => Verdict::Jump(target()?),
                -4 => Verdict::Goto(target()?),
                other => Verdict::Other(other),
            }))
        })(),
        "match" | "target" => (|| {
            let (n, rev, info) = (
                attr::c_str(a.clone().get(attr::nla::XT_NAME)?)?.to_owned(),
                u32_of(&a, attr::nla::XT_REV)?,
                a.clone().get(attr::nla::XT_INFO)?.to_vec(),
            );
            Some(if name == "match" {
                Expr::Match { name: n, rev, info }
            } else {
                Expr::Target { name: n, rev, info }
            })
        })(),
        _ => None,
    };
    parsed.unwrap_or_else(other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_rule_messages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = parse_any_rule(&bytes);
            let _ = parse_chain(&bytes);
        }
    }
}
