//! A read-only diagnosis of a host before the first deploy: can this kernel hold the
//! rules, will the firewall let a redirected connection in, will the internal ports stay
//! free, is conntrack big enough. Nothing is changed.
//!
//! The firewall part follows what happens to a redirected connection. The REDIRECT in nat
//! PREROUTING (priority -100) runs before every filter chain of the input hook, so those
//! chains see the *internal* port (say 40412), not the public one, and a connection in
//! conntrack state NEW with status DNAT. A firewall that accepts "port 8080" and drops
//! the rest drops it; one that accepts `ct status dnat` (iptables: `-m conntrack --ctstate
//! DNAT`) lets it in. Each base chain of the input hook (any table, family and priority)
//! is walked rule by rule with such a packet: a rule the walk cannot decide (a set lookup,
//! an unknown match) is noted, and a drop behind one is reported as a warning, not a
//! blocker.

use crate::error::{Error, Result};
use crate::port::Port;
use std::fmt;
use std::ops::RangeInclusive;
use switcheroo_sys::ruleset::{AnyRule, ChainInfo, Expr, SetKeys, Verdict};
use switcheroo_sys::{Chain, Conn, Family, Protocol, Redirect};

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// All is well.
    Ok,
    /// Worth knowing.
    Info,
    /// May break something; read it.
    Warning,
    /// Deploys will not work (or connections will fail) until it is fixed.
    Blocker,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Level::Ok => "ok",
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Blocker => "BLOCKER",
        })
    }
}

/// One finding of [`diagnose`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How much it matters.
    pub level: Level,
    /// What was looked at: `kernel`, `ipv6`, `firewall`, `public` (who else is on the
    /// public ports), `ports` (the internal range), `conntrack`.
    pub topic: &'static str,
    /// What was found.
    pub what: String,
    /// For a warning or a blocker: what to run now, exactly (a command for a root shell
    /// in the network namespace).
    pub fix: Option<String>,
    /// How to keep the fix across reboots and firewall reloads, where that differs.
    pub keep: Option<String>,
}

/// What the host is checked for.
#[derive(Debug, Clone)]
pub struct Target {
    /// The service namespace that is to deploy (`None`: a port served by any namespace is
    /// reported, as information).
    pub namespace: Option<String>,
    /// The public ports (their protocols matter to the firewall walk).
    pub ports: Vec<Port>,
    /// The internal range.
    pub range: RangeInclusive<u16>,
}

/// Diagnoses the calling thread's network namespace for `target`; see the module docs.
/// Changes nothing. Needs CAP_NET_ADMIN (it reads the ruleset).
pub fn diagnose(target: &Target) -> Result<Vec<Finding>> {
    let mut conn = Conn::open()?;
    let mut findings = vec![kernel(&mut conn)?];
    findings.push(ipv6());
    findings.extend(firewall(&mut conn, target)?);
    findings.extend(public_ports(&mut conn, target)?);
    findings.extend(local_ports(&target.range));
    findings.extend(conntrack());
    Ok(findings)
}

/// Who else is on the public ports: a live instance of another switcheroo namespace (the
/// deploy would be refused), or a process listening on the public port itself (the
/// redirect would take its new connections, silently).
fn public_ports(conn: &mut Conn, target: &Target) -> Result<Vec<Finding>> {
    let rules = crate::transact::read(conn, crate::transact::MAX_ATTEMPTS)?.rules;
    let mut findings = Vec::new();
    for port in &target.ports {
        let mut holders: Vec<(&str, u32, Vec<String>)> = Vec::new();
        for rule in rules.iter().filter(|r| r.alive && r.public() == *port) {
            if target.namespace.as_deref() == Some(rule.namespace.as_str()) {
                continue;
            }
            let place = format!("{} {}", rule.family, rule.chain);
            match holders
                .iter_mut()
                .find(|(ns, pid, _)| (*ns, *pid) == (rule.namespace.as_str(), rule.pid))
            {
                Some((_, _, places)) => places.push(place),
                None => holders.push((&rule.namespace, rule.pid, vec![place])),
            }
        }
        for (namespace, pid, places) in holders {
            findings.push(match &target.namespace {
                Some(wanted) => Finding {
                    level: Level::Blocker,
                    topic: "public",
                    what: format!(
                        "public port {port} is served by pid {pid} of namespace {namespace:?} ({}): a deploy of namespace {wanted:?} is refused, so that it cannot take that service's connections",
                        places.join(", ")
                    ),
                    fix: Some(format!(
                        "deploy that service with its own namespace (switcheroo run -n {namespace} ...), or move it to {wanted:?} in one transaction: switcheroo run -n {wanted} --move-from {namespace} ..."
                    )),
                    keep: None,
                },
                None => Finding {
                    level: Level::Info,
                    topic: "public",
                    what: format!(
                        "public port {port} is served by pid {pid} of namespace {namespace:?} ({})",
                        places.join(", ")
                    ),
                    fix: None,
                    keep: None,
                },
            });
        }
        match crate::sockets::listening_on(port.protocol, port.number) {
            Ok(listeners) => {
                for holder in listeners {
                    let what = match port.protocol {
                        Protocol::Tcp => "listens on",
                        Protocol::Udp => "is bound to",
                    };
                    findings.push(Finding {
                        level: Level::Warning,
                        topic: "public",
                        what: format!(
                            "pid {} ({}) {what} public port {port} itself: once switcheroo redirects the port, new connections from the network and this host go to the redirect's instance, never to it (its established connections stay)",
                            holder.pid, holder.program
                        ),
                        fix: Some(format!(
                            "stop pid {} before the first deploy, or run that server under switcheroo run (it then listens on an internal port)",
                            holder.pid
                        )),
                        keep: Some("disable the service that starts it on this port".into()),
                    });
                }
            }
            Err(e) => log::debug!("cannot read the sockets of port {port}: {e}"),
        }
    }
    Ok(findings)
}

/// The blockers among `findings`, for a log line.
pub fn blockers(findings: &[Finding]) -> impl Iterator<Item = &Finding> {
    findings.iter().filter(|f| f.level == Level::Blocker)
}

fn kernel(conn: &mut Conn) -> Result<Finding> {
    let sample = Redirect::new(8080, 40400, "SWITCHEROO:ns=check:port=40400:pid=1:start=1")?;
    for family in Family::ALL {
        match conn.probe_support(family, Chain::Output, &sample) {
            Ok(()) => {}
            Err(switcheroo_sys::Error::Unsupported { what, .. }) => {
                return Ok(Finding {
                    level: Level::Blocker,
                    topic: "kernel",
                    what: format!("{family}: this kernel lacks {what}"),
                    fix: Some("modprobe nf_tables nft_chain_nat nft_compat xt_addrtype xt_comment xt_REDIRECT xt_statistic".into()),
                    keep: Some("a kernel with nf_tables, the nat chain type and the xtables compat layer, as every kernel that runs iptables-nft; or the modules in /etc/modules-load.d/".into()),
                })
            }
            Err(e) => return Err(Error::from(e)),
        }
    }
    Ok(Finding {
        level: Level::Ok,
        topic: "kernel",
        what: "nf_tables with nat chains, REDIRECT and the addrtype, comment and statistic matches (ip and ip6)".into(),
        fix: None,
        keep: None,
    })
}

fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn ipv6() -> Finding {
    let off = match read_proc("/proc/sys/net/ipv6/conf/all/disable_ipv6").as_deref() {
        None => Some("not built into this kernel, or disabled at boot"),
        Some("1") => Some("disabled (net.ipv6.conf.all.disable_ipv6=1)"),
        _ => None,
    };
    match off {
        None => Finding {
            level: Level::Ok,
            topic: "ipv6",
            what: "IPv6 is on: instances listen dual-stack and the ip6 rules redirect IPv6 clients".into(),
            fix: None,
            keep: None,
        },
        Some(why) => Finding {
            level: Level::Info,
            topic: "ipv6",
            what: format!("IPv6 is {why}: instances listen on IPv4 only (the ip6 rules are still written, and unused)"),
            fix: None,
            keep: None,
        },
    }
}

/// What a redirected packet looks like to the input hook.
struct Packet {
    family: u8,
    protocol: Protocol,
    port: u16,
}

/// A register's content during the walk.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Known(Vec<u8>),
    /// An interface name (or index) that is not the loopback's: the packet came from the
    /// network.
    NotLoopback,
    Unknown,
}

/// Three-valued truth.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Truth {
    Yes,
    No,
    Maybe,
}

/// How a chain's walk ends.
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    Accept,
    /// Dropped, and by what (a rule or the policy).
    Drop(String),
    /// The end of a regular chain, or `return`.
    Fallthrough,
}

const NF_INET_LOCAL_IN: u32 = 1;
const IPS_DST_NAT: u32 = 1 << 5;
const IPS_DST_NAT_DONE: u32 = 1 << 8;
const CT_STATE_NEW: u32 = 1 << 3;
const XT_CONNTRACK_STATE: u16 = 1 << 0;
const XT_CONNTRACK_STATUS: u16 = 1 << 6;
const XT_CONNTRACK_STATE_DNAT: u16 = 1 << 7;

/// The keys of the sets the rules look up, by (family, table, set).
type Sets = Vec<((u8, String, String), SetKeys)>;

struct Walk<'a> {
    rules: &'a [AnyRule],
    sets: &'a Sets,
    packet: &'a Packet,
    /// Rules the walk could not decide before the outcome, as `table chain handle N`.
    undecided: Vec<String>,
}

impl Walk<'_> {
    fn chain(&mut self, base: &ChainInfo, name: &str, depth: u32) -> Fate {
        if depth > 16 {
            self.undecided
                .push(format!("{} {name}: jumps nest too deep", base.table));
            return Fate::Fallthrough;
        }
        let rules: Vec<&AnyRule> = self
            .rules
            .iter()
            .filter(|r| r.family == base.family && r.table == base.table && r.chain == name)
            .collect();
        for rule in rules {
            let (truth, verdict) = self.rule(rule);
            let where_ = format!("rule handle {} in {} {}", rule.handle, base.table, name);
            match truth {
                Truth::No => continue,
                Truth::Maybe => {
                    if verdict.is_some() {
                        self.undecided.push(where_);
                    }
                    continue;
                }
                Truth::Yes => {}
            }
            match verdict {
                None | Some(Verdict::Continue) => {}
                Some(Verdict::Accept) => return Fate::Accept,
                Some(Verdict::Drop) => return Fate::Drop(where_),
                Some(Verdict::Return) => return Fate::Fallthrough,
                Some(Verdict::Jump(target)) => match self.chain(base, &target, depth + 1) {
                    Fate::Fallthrough => {}
                    other => return other,
                },
                Some(Verdict::Goto(target)) => return self.chain(base, &target, depth + 1),
                Some(Verdict::Other(code)) => {
                    self.undecided.push(format!("{where_} (verdict {code})"));
                }
            }
        }
        Fate::Fallthrough
    }

    /// Whether the set `set` of `rule`'s table holds `value`.
    fn lookup(&self, rule: &AnyRule, set: &str, value: &Value, invert: bool) -> Truth {
        let keys = self
            .sets
            .iter()
            .find(|((f, t, n), _)| *f == rule.family && *t == rule.table && n == set)
            .and_then(|(_, keys)| keys.0.as_ref());
        match (keys, value) {
            (Some(keys), Value::Known(v)) => {
                let hit = keys
                    .iter()
                    .any(|k| v.len() >= k.len() && v[..k.len()] == k[..]);
                truth_of(hit != invert)
            }
            _ => Truth::Maybe,
        }
    }

    /// Whether `rule` matches the packet, and its verdict (`Drop` for a reject).
    fn rule(&self, rule: &AnyRule) -> (Truth, Option<Verdict>) {
        let mut regs: Vec<(u32, Value)> = Vec::new();
        let mut truth = Truth::Yes;
        let mut verdict = None;
        let load = |regs: &mut Vec<(u32, Value)>, reg: u32, v: Value| {
            regs.retain(|(r, _)| *r != reg);
            regs.push((reg, v));
        };
        let get = |regs: &Vec<(u32, Value)>, reg: u32| {
            regs.iter()
                .find(|(r, _)| *r == reg)
                .map_or(Value::Unknown, |(_, v)| v.clone())
        };
        for expr in &rule.exprs {
            let t = match expr {
                Expr::Meta { key, dreg } => {
                    load(&mut regs, *dreg, self.meta(*key));
                    Truth::Yes
                }
                Expr::Ct { key, dreg } => {
                    load(&mut regs, *dreg, ct(*key));
                    Truth::Yes
                }
                Expr::Payload {
                    base,
                    offset,
                    len,
                    dreg,
                } => {
                    load(&mut regs, *dreg, self.payload(*base, *offset, *len));
                    Truth::Yes
                }
                Expr::Bitwise {
                    sreg,
                    dreg,
                    mask,
                    xor,
                } => {
                    let v = match get(&regs, *sreg) {
                        Value::Known(b) if b.len() >= mask.len() && mask.len() == xor.len() => {
                            Value::Known(
                                b.iter()
                                    .zip(mask)
                                    .zip(xor)
                                    .map(|((b, m), x)| (b & m) ^ x)
                                    .collect(),
                            )
                        }
                        _ => Value::Unknown,
                    };
                    load(&mut regs, *dreg, v);
                    Truth::Yes
                }
                Expr::Cmp { sreg, op, data } => compare(&get(&regs, *sreg), *op, data),
                Expr::Range { sreg, op, from, to } => match get(&regs, *sreg) {
                    Value::Known(b) if b.len() >= from.len() => {
                        let b = &b[..from.len()];
                        let inside = b >= from.as_slice() && b <= to.as_slice();
                        truth_of(inside == (*op == 0))
                    }
                    _ => Truth::Maybe,
                },
                Expr::Lookup { set, sreg, invert } => {
                    self.lookup(rule, set, &get(&regs, *sreg), *invert)
                }
                Expr::Verdict(v) => {
                    verdict = Some(v.clone());
                    Truth::Yes
                }
                Expr::Match { name, rev, info } => self.xt_match(name, *rev, info),
                Expr::Target { name, .. } => {
                    if name == "REJECT" || name == "DROP" {
                        verdict = Some(Verdict::Drop);
                    } else if name == "ACCEPT" {
                        verdict = Some(Verdict::Accept);
                    }
                    Truth::Yes
                }
                Expr::Other(name) => match name.as_str() {
                    "reject" => {
                        verdict = Some(Verdict::Drop);
                        Truth::Yes
                    }
                    "counter" | "log" | "limit" | "quota" | "notrack" | "last" => Truth::Yes,
                    _ => Truth::Maybe,
                },
            };
            match t {
                Truth::No => return (Truth::No, None),
                Truth::Maybe => truth = Truth::Maybe,
                Truth::Yes => {}
            }
        }
        (truth, verdict)
    }

    fn meta(&self, key: u32) -> Value {
        let p = self.packet;
        match key {
            // NFT_META_PROTOCOL: the ethertype, big endian.
            1 => Value::Known(if p.family == nix::libc::NFPROTO_IPV6 as u8 {
                0x86ddu16.to_be_bytes().to_vec()
            } else {
                0x0800u16.to_be_bytes().to_vec()
            }),
            // NFT_META_IIF, NFT_META_IIFNAME
            4 | 6 => Value::NotLoopback,
            // NFT_META_NFPROTO
            15 => Value::Known(vec![p.family]),
            // NFT_META_L4PROTO
            16 => Value::Known(vec![p.protocol.number()]),
            // NFT_META_PKTTYPE: PACKET_HOST
            19 => Value::Known(vec![0]),
            _ => Value::Unknown,
        }
    }

    fn payload(&self, base: u32, offset: u32, len: u32) -> Value {
        // NFT_PAYLOAD_TRANSPORT_HEADER: the destination port is the internal one.
        match (base, offset, len) {
            (2, 2, 2) => Value::Known(self.packet.port.to_be_bytes().to_vec()),
            // TCP flags: a SYN.
            (2, 13, 1) if self.packet.protocol == Protocol::Tcp => Value::Known(vec![0x02]),
            _ => Value::Unknown,
        }
    }

    fn xt_match(&self, name: &str, rev: u32, info: &[u8]) -> Truth {
        let status = IPS_DST_NAT | IPS_DST_NAT_DONE;
        match (name, rev) {
            ("comment", _) | ("limit", _) => Truth::Yes,
            ("addrtype", 1) if info.len() >= 8 => {
                // struct xt_addrtype_info_v1: source, dest (1 << RTN_*), flags. The packet
                // comes from a unicast address to a local one.
                let (source, dest) = (
                    u16::from_ne_bytes([info[0], info[1]]),
                    u16::from_ne_bytes([info[2], info[3]]),
                );
                let flags = u32::from_ne_bytes([info[4], info[5], info[6], info[7]]);
                const UNICAST: u16 = 1 << 1;
                const LOCAL: u16 = 1 << 2;
                if flags & !3 != 0 {
                    return Truth::Maybe; // limited to an interface
                }
                let mut result = true;
                if source != 0 {
                    result &= (source & UNICAST != 0) != (flags & 1 != 0);
                }
                if dest != 0 {
                    result &= (dest & LOCAL != 0) != (flags & 2 != 0);
                }
                truth_of(result)
            }
            ("conntrack", 3) if info.len() >= 154 => {
                let u16_at = |o: usize| u16::from_ne_bytes([info[o], info[o + 1]]);
                let (flags, invert) = (u16_at(146), u16_at(148));
                let (state_mask, status_mask) = (u16_at(150), u16_at(152));
                if flags & !(XT_CONNTRACK_STATE | XT_CONNTRACK_STATUS) != 0 {
                    return Truth::Maybe;
                }
                let mut result = true;
                if flags & XT_CONNTRACK_STATE != 0 {
                    let statebit = CT_STATE_NEW as u16 | XT_CONNTRACK_STATE_DNAT;
                    result &= (state_mask & statebit != 0) != (invert & XT_CONNTRACK_STATE != 0);
                }
                if flags & XT_CONNTRACK_STATUS != 0 {
                    result &= (u32::from(status_mask) & status != 0)
                        != (invert & XT_CONNTRACK_STATUS != 0);
                }
                truth_of(result)
            }
            ("state", 0) if info.len() >= 4 => {
                let mask = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                truth_of(mask & CT_STATE_NEW != 0)
            }
            ("multiport", 1) if info.len() >= 48 => {
                // struct xt_multiport_v1: flags, count, ports[15], pflags[15], invert.
                let (flags, count) = (info[0], info[1] as usize);
                if flags != 1 || count > 15 {
                    return Truth::Maybe; // only destination ports are followed
                }
                let port = |i: usize| u16::from_ne_bytes([info[2 + 2 * i], info[3 + 2 * i]]);
                let pflags = &info[32..47];
                let mut hit = false;
                let mut i = 0;
                while i < count {
                    if pflags[i] != 0 && i + 1 < count {
                        hit |= (port(i)..=port(i + 1)).contains(&self.packet.port);
                        i += 2;
                    } else {
                        hit |= port(i) == self.packet.port;
                        i += 1;
                    }
                }
                truth_of(hit != (info[47] != 0))
            }
            _ => Truth::Maybe,
        }
    }
}

fn truth_of(b: bool) -> Truth {
    if b {
        Truth::Yes
    } else {
        Truth::No
    }
}

/// conntrack's view of a redirected connection's first packet.
fn ct(key: u32) -> Value {
    match key {
        // NFT_CT_STATE
        0 => Value::Known(CT_STATE_NEW.to_ne_bytes().to_vec()),
        // NFT_CT_DIRECTION: original
        1 => Value::Known(vec![0]),
        // NFT_CT_STATUS
        2 => Value::Known((IPS_DST_NAT | IPS_DST_NAT_DONE).to_ne_bytes().to_vec()),
        _ => Value::Unknown,
    }
}

fn compare(v: &Value, op: u32, data: &[u8]) -> Truth {
    match v {
        Value::Known(b) if b.len() >= data.len() => {
            let b = &b[..data.len()];
            truth_of(match op {
                0 => b == data,
                1 => b != data,
                2 => b < data,
                3 => b <= data,
                4 => b > data,
                5 => b >= data,
                _ => return Truth::Maybe,
            })
        }
        Value::NotLoopback => {
            // iifname "lo" (a NUL-padded name) or iif 1 (the loopback's index).
            let is_lo = data.starts_with(b"lo\0") || data == b"lo" || data == 1u32.to_ne_bytes();
            match (is_lo, op) {
                (true, 0) => Truth::No,
                (true, 1) => Truth::Yes,
                _ => Truth::Maybe,
            }
        }
        _ => Truth::Maybe,
    }
}

/// Whose firewall a chain belongs to: the command that lets redirected connections in
/// now, and how to keep it.
fn fix_for(chain: &ChainInfo, chains: &[ChainInfo]) -> (String, String) {
    let v6 = chain.family == nix::libc::NFPROTO_IPV6 as u8;
    let tool = if v6 { "ip6tables" } else { "iptables" };
    let ufw = chains
        .iter()
        .any(|c| c.family == chain.family && c.table == chain.table && c.name.starts_with("ufw"));
    let family = family_name(chain.family);
    let nft = format!(
        "nft insert rule {family} {} {} ct status dnat accept",
        chain.table, chain.name
    );
    if chain.table == "firewalld" {
        (
            nft,
            "firewalld accepts redirected connections only with StrictForwardPorts=no: set it in /etc/firewalld/firewalld.conf and run `firewall-cmd --reload`".into(),
        )
    } else if ufw {
        let file = if v6 { "before6.rules" } else { "before.rules" };
        (
            format!("{tool} -I ufw-before-input -m conntrack --ctstate DNAT -j ACCEPT"),
            format!("add `-A ufw-before-input -m conntrack --ctstate DNAT -j ACCEPT` to /etc/ufw/{file} (before COMMIT) and run `ufw reload`"),
        )
    } else if chain.table == "filter" && (family == "ip" || family == "ip6") {
        (
            format!("{tool} -I {} -m conntrack --ctstate DNAT -j ACCEPT", chain.name),
            "save it where your distribution keeps its iptables rules (iptables-save > /etc/iptables/rules.v4 on Debian)".into(),
        )
    } else {
        (
            nft,
            "add the rule to the file that loads this table (/etc/nftables.conf)".into(),
        )
    }
}

fn firewall(conn: &mut Conn, target: &Target) -> Result<Vec<Finding>> {
    let chains = conn.all_chains()?;
    let rules = conn.all_rules()?;
    let mut sets: Sets = Vec::new();
    for rule in &rules {
        for expr in &rule.exprs {
            if let Expr::Lookup { set, .. } = expr {
                let key = (rule.family, rule.table.clone(), set.clone());
                if !sets.iter().any(|(k, _)| *k == key) {
                    let keys = conn
                        .set_keys(rule.family, &rule.table, set)
                        .unwrap_or(SetKeys(None));
                    sets.push((key, keys));
                }
            }
        }
    }
    let mut bases: Vec<&ChainInfo> = chains
        .iter()
        .filter(|c| c.hook.is_some_and(|(hook, _)| hook == NF_INET_LOCAL_IN))
        .filter(|c| c.kind.as_deref() == Some("filter"))
        .filter(|c| {
            [
                nix::libc::NFPROTO_IPV4,
                nix::libc::NFPROTO_IPV6,
                nix::libc::NFPROTO_INET,
            ]
            .contains(&(c.family as i32))
        })
        .collect();
    bases.sort_by_key(|c| (c.family, c.hook.map(|h| h.1)));
    let mut findings = Vec::new();
    let public: Vec<String> = target.ports.iter().map(Port::to_string).collect();
    let protocols: Vec<Protocol> = {
        let mut p: Vec<Protocol> = target.ports.iter().map(|p| p.protocol).collect();
        p.sort();
        p.dedup();
        if p.is_empty() {
            vec![Protocol::Tcp]
        } else {
            p
        }
    };
    for base in &bases {
        let families: Vec<u8> = if base.family == nix::libc::NFPROTO_INET as u8 {
            vec![nix::libc::NFPROTO_IPV4 as u8, nix::libc::NFPROTO_IPV6 as u8]
        } else {
            vec![base.family]
        };
        let mut worst: Option<(Level, String)> = None;
        'walk: for family in families {
            for protocol in &protocols {
                for port in [*target.range.start(), *target.range.end()] {
                    let packet = Packet {
                        family,
                        protocol: *protocol,
                        port,
                    };
                    let mut walk = Walk {
                        rules: &rules,
                        sets: &sets,
                        packet: &packet,
                        undecided: Vec::new(),
                    };
                    let outcome = match walk.chain(base, &base.name, 0) {
                        Fate::Fallthrough if base.policy == Some(0) => {
                            Fate::Drop("the chain's policy drop".into())
                        }
                        Fate::Fallthrough => Fate::Accept,
                        other => other,
                    };
                    if let Fate::Drop(by) = outcome {
                        let (level, note) = if walk.undecided.is_empty() {
                            (Level::Blocker, String::new())
                        } else {
                            (
                                Level::Warning,
                                format!(
                                    " unless one of these, which this check cannot evaluate, accepts it first: {}",
                                    walk.undecided.join(", ")
                                ),
                            )
                        };
                        let what = format!(
                            "{} {} (hook input, priority {}, policy {}) drops a redirected {protocol} connection: the REDIRECT runs first, so the chain sees internal port {port} (not {}) with ct status dnat, and {by} drops it{note}",
                            family_name(base.family),
                            chain_label(base),
                            base.hook.map_or(0, |h| h.1),
                            if base.policy == Some(0) { "drop" } else { "accept" },
                            if public.is_empty() { "the public port".to_owned() } else { public.join(", ") },
                        );
                        if worst.as_ref().is_none_or(|(l, _)| level > *l) {
                            worst = Some((level, what));
                        }
                        if level == Level::Blocker {
                            break 'walk;
                        }
                    }
                }
            }
        }
        match worst {
            Some((level, what)) => {
                let (fix, keep) = fix_for(base, &chains);
                findings.push(Finding {
                    level,
                    topic: "firewall",
                    what,
                    fix: Some(fix),
                    keep: Some(keep),
                })
            }
            None => findings.push(Finding {
                level: Level::Ok,
                topic: "firewall",
                what: format!(
                    "{} {} (hook input, priority {}) lets redirected connections in",
                    family_name(base.family),
                    chain_label(base),
                    base.hook.map_or(0, |h| h.1)
                ),
                fix: None,
                keep: None,
            }),
        }
    }
    if bases.is_empty() {
        findings.push(Finding {
            level: Level::Ok,
            topic: "firewall",
            what: "no filter chain on the input hook: nothing drops redirected connections".into(),
            fix: None,
            keep: None,
        });
    }
    Ok(findings)
}

fn family_name(family: u8) -> &'static str {
    match family as i32 {
        nix::libc::NFPROTO_IPV4 => "ip",
        nix::libc::NFPROTO_IPV6 => "ip6",
        nix::libc::NFPROTO_INET => "inet",
        _ => "?",
    }
}

fn chain_label(c: &ChainInfo) -> String {
    format!("{} {}", c.table, c.name)
}

fn local_ports(range: &RangeInclusive<u16>) -> Vec<Finding> {
    let Some(local) = read_proc("/proc/sys/net/ipv4/ip_local_port_range") else {
        return Vec::new();
    };
    let mut it = local
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (it.next(), it.next()) else {
        return Vec::new();
    };
    let (start, end) = (*range.start(), *range.end());
    if end < lo || start > hi {
        return vec![Finding {
            level: Level::Ok,
            topic: "ports",
            what: format!(
                "the internal range {start}-{end} is outside the ephemeral range {lo}-{hi}"
            ),
            fix: None,
            keep: None,
        }];
    }
    let reserved = read_proc("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    let covered = reserved.split(',').any(|part| {
        let mut ends = part.trim().split('-').filter_map(|n| n.parse::<u16>().ok());
        match (ends.next(), ends.next()) {
            (Some(a), Some(b)) => a <= start && end <= b,
            (Some(a), None) => a == start && start == end,
            _ => false,
        }
    });
    if covered {
        return vec![Finding {
            level: Level::Ok,
            topic: "ports",
            what: format!(
                "the internal range {start}-{end} is reserved (ip_local_reserved_ports {reserved})"
            ),
            fix: None,
            keep: None,
        }];
    }
    vec![Finding {
        level: Level::Warning,
        topic: "ports",
        what: format!("the internal range {start}-{end} overlaps the ephemeral range {lo}-{hi}: outgoing connections can take its ports, which a deploy then skips (with all taken, it fails)"),
        fix: Some(format!("sysctl -w net.ipv4.ip_local_reserved_ports={start}-{end}")),
        keep: Some(format!("the same in a file of /etc/sysctl.d/, or choose a range outside {lo}-{hi}")),
    }]
}

fn conntrack() -> Vec<Finding> {
    let num = |name: &str| {
        read_proc(&format!("/proc/sys/net/netfilter/{name}")).and_then(|v| v.parse::<u64>().ok())
    };
    let (Some(count), Some(max)) = (num("nf_conntrack_count"), num("nf_conntrack_max")) else {
        return vec![Finding {
            level: Level::Info,
            topic: "conntrack",
            what: "conntrack is not loaded yet (the first NAT rule loads it): its limits cannot be read".into(),
            fix: None,
            keep: None,
        }];
    };
    let time_wait = num("nf_conntrack_tcp_timeout_time_wait")
        .unwrap_or(120)
        .max(1);
    let rate = max / time_wait;
    let full = count * 100 / max.max(1);
    let mut out = vec![Finding {
        level: Level::Info,
        topic: "conntrack",
        what: format!("{count} of {max} entries in use; with TIME_WAIT entries kept {time_wait} s, the table holds about {rate} new connections a second (every redirected connection has an entry)"),
        fix: None,
        keep: None,
    }];
    if full >= 80 {
        out.push(Finding {
            level: Level::Warning,
            topic: "conntrack",
            what: format!("the conntrack table is {full}% full: when it is full the kernel drops new connections (\"nf_conntrack: table full\")"),
            fix: Some(format!("sysctl -w net.netfilter.nf_conntrack_max={}", max * 2)),
            keep: Some("the same in a file of /etc/sysctl.d/; or shorten net.netfilter.nf_conntrack_tcp_timeout_time_wait".into()),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet() -> Packet {
        Packet {
            family: nix::libc::NFPROTO_IPV4 as u8,
            protocol: Protocol::Tcp,
            port: 40400,
        }
    }

    fn base(policy: u32) -> ChainInfo {
        ChainInfo {
            family: nix::libc::NFPROTO_IPV4 as u8,
            table: "filter".into(),
            name: "INPUT".into(),
            hook: Some((NF_INET_LOCAL_IN, 0)),
            policy: Some(policy),
            kind: Some("filter".into()),
        }
    }

    fn rule(handle: u64, exprs: Vec<Expr>) -> AnyRule {
        AnyRule {
            family: nix::libc::NFPROTO_IPV4 as u8,
            table: "filter".into(),
            chain: "INPUT".into(),
            handle,
            exprs,
        }
    }

    fn walk(rules: &[AnyRule], policy: u32) -> (Fate, Vec<String>) {
        let chains = [base(policy)];
        let p = packet();
        let sets = Vec::new();
        let mut w = Walk {
            rules,
            sets: &sets,
            packet: &p,
            undecided: Vec::new(),
        };
        let o = w.chain(&chains[0], "INPUT", 0);
        (o, w.undecided)
    }

    #[test]
    fn the_public_port_rule_does_not_match_but_ct_status_dnat_does() {
        let dport = |port: u16| {
            vec![
                Expr::Meta { key: 16, dreg: 1 },
                Expr::Cmp {
                    sreg: 1,
                    op: 0,
                    data: vec![6],
                },
                Expr::Payload {
                    base: 2,
                    offset: 2,
                    len: 2,
                    dreg: 1,
                },
                Expr::Cmp {
                    sreg: 1,
                    op: 0,
                    data: port.to_be_bytes().to_vec(),
                },
                Expr::Verdict(Verdict::Accept),
            ]
        };
        let (o, _) = walk(&[rule(1, dport(8080))], 0);
        assert_eq!(o, Fate::Fallthrough, "8080 is not what the chain sees");
        let (o, _) = walk(&[rule(1, dport(40400))], 0);
        assert_eq!(o, Fate::Accept);
        // `ct <key> & mask != 0 accept`, as nft encodes `ct status dnat accept` and
        // `ct state established,related accept`.
        let ct_bits = |key: u32, mask: u32| {
            vec![
                Expr::Ct { key, dreg: 1 },
                Expr::Bitwise {
                    sreg: 1,
                    dreg: 1,
                    mask: mask.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                },
                Expr::Cmp {
                    sreg: 1,
                    op: 1,
                    data: vec![0; 4],
                },
                Expr::Verdict(Verdict::Accept),
            ]
        };
        let (dnat, established) = (ct_bits(2, 0x20), ct_bits(0, 6));
        assert_eq!(walk(&[rule(2, dnat)], 0).0, Fate::Accept);
        assert_eq!(walk(&[rule(3, established)], 0).0, Fate::Fallthrough);
    }

    #[test]
    fn loopback_rules_do_not_match_and_unknown_ones_are_noted() {
        let mut lo = b"lo".to_vec();
        lo.resize(16, 0);
        let rules = [
            rule(
                1,
                vec![
                    Expr::Meta { key: 6, dreg: 1 },
                    Expr::Cmp {
                        sreg: 1,
                        op: 0,
                        data: lo,
                    },
                    Expr::Verdict(Verdict::Accept),
                ],
            ),
            rule(
                2,
                vec![Expr::Other("fib".into()), Expr::Verdict(Verdict::Accept)],
            ),
        ];
        let (o, undecided) = walk(&rules, 0);
        assert_eq!(o, Fate::Fallthrough);
        assert_eq!(undecided, ["rule handle 2 in filter INPUT"]);
    }

    #[test]
    fn xt_conntrack_dnat_state_is_understood() {
        let mut info = vec![0u8; 160];
        info[146..148].copy_from_slice(&XT_CONNTRACK_STATE.to_ne_bytes());
        info[150..152].copy_from_slice(&XT_CONNTRACK_STATE_DNAT.to_ne_bytes());
        let m = |info: Vec<u8>| {
            rule(
                1,
                vec![
                    Expr::Match {
                        name: "conntrack".into(),
                        rev: 3,
                        info,
                    },
                    Expr::Verdict(Verdict::Accept),
                ],
            )
        };
        assert_eq!(walk(&[m(info.clone())], 0).0, Fate::Accept);
        // ESTABLISHED,RELATED
        info[150..152].copy_from_slice(&6u16.to_ne_bytes());
        assert_eq!(walk(&[m(info)], 0).0, Fate::Fallthrough);
    }
}
