//! What the last commit of a namespace left behind, so that the next one can skip the dumps.
//!
//! Dumping a chain costs the kernel about 2.7 µs per rule, so with thousands of foreign
//! rules in PREROUTING the dumps are most of a commit. After a commit, the instance that
//! made it records the ruleset generation and the handles of its rules, but only when the
//! generation moved by exactly its own transaction (nothing else changed the ruleset since
//! its dump). The next commit reads the generation: if it is still the recorded one, the
//! ruleset is exactly as it was then, so the recorded rules are all of this namespace's;
//! each is still fetched by handle and checked to be ours before it is trusted. Any
//! mismatch, a missing or unreadable record, falls back to the dumps.
//!
//! Records live in `/run/switcheroo/`, a directory only its owner may write, one file per
//! network namespace (by the inode of its nsfs file) and service namespace. Without a
//! usable directory (a non-root user, a chroot without /run) there is simply no cache.

use log::debug;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use switcheroo_sys::{Chain, Family};

const DIR: &str = "/run/switcheroo";
const MAGIC: &str = "switcheroo-cache 1";

/// The record of one namespace's last commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub generation: u32,
    pub rules: Vec<(Family, Chain, u64)>,
}

fn path(netns: u64, namespace: &str) -> PathBuf {
    PathBuf::from(DIR).join(format!("net{netns}-{namespace}"))
}

/// The directory, created if needed, if only this user can write it.
fn dir() -> Option<PathBuf> {
    let _ = fs::DirBuilder::new().mode(0o700).create(DIR);
    let meta = fs::symlink_metadata(DIR).ok()?;
    let safe =
        meta.is_dir() && meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o022 == 0;
    safe.then(|| PathBuf::from(DIR))
}

pub(crate) fn load(netns: Option<u64>, namespace: &str) -> Option<Record> {
    let netns = netns?;
    dir()?;
    let text = fs::read_to_string(path(netns, namespace)).ok()?;
    parse(&text)
}

pub(crate) fn store(netns: Option<u64>, namespace: &str, record: &Record) {
    let (Some(netns), Some(_)) = (netns, dir()) else {
        return;
    };
    let target = path(netns, namespace);
    // Overwritten in place from the start, neither renamed nor truncated (either costs a
    // journal transaction, about 0.4 ms, where /run is not a tmpfs): what follows the `end`
    // line is ignored. Writers hold the namespace's lock; a reader without it (`begin`)
    // that catches a write half done finds handles that fail the checks, and dumps.
    #[allow(clippy::suspicious_open_options)]
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .open(&target)
        .and_then(|mut f| f.write_all(format(record).as_bytes()));
    if let Err(e) = written {
        debug!("cannot record the commit in {}: {e}", target.display());
        forget(Some(netns), namespace);
    }
}

pub(crate) fn forget(netns: Option<u64>, namespace: &str) {
    if let Some(netns) = netns {
        let _ = fs::remove_file(path(netns, namespace));
    }
}

fn format(record: &Record) -> String {
    let mut text = format!("{MAGIC}\ngeneration {}\n", record.generation);
    for (family, chain, handle) in &record.rules {
        text.push_str(&format!("rule {family} {chain} {handle}\n"));
    }
    text.push_str("end\n");
    text
}

fn parse(text: &str) -> Option<Record> {
    let mut lines = text.lines();
    if lines.next()? != MAGIC {
        return None;
    }
    let generation = lines.next()?.strip_prefix("generation ")?.parse().ok()?;
    let mut rules = Vec::new();
    for line in lines {
        if line == "end" {
            return Some(Record { generation, rules });
        }
        let mut words = line.strip_prefix("rule ")?.split(' ');
        let family = match words.next()? {
            "ip" => Family::Ipv4,
            "ip6" => Family::Ipv6,
            _ => return None,
        };
        let chain = words.next()?;
        let chain = Chain::ALL.into_iter().find(|c| c.name() == chain)?;
        let handle = words.next()?.parse().ok()?;
        if words.next().is_some() {
            return None;
        }
        rules.push((family, chain, handle));
    }
    // No `end`: cut short.
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let record = Record {
            generation: 42,
            rules: vec![
                (Family::Ipv4, Chain::Prerouting, 5),
                (Family::Ipv6, Chain::Output, 7),
            ],
        };
        let text = format(&record);
        assert_eq!(
            text,
            "switcheroo-cache 1\ngeneration 42\nrule ip PREROUTING 5\nrule ip6 OUTPUT 7\nend\n"
        );
        assert_eq!(parse(&text[..text.len() - 4]), None, "cut short");
        let longer = format!("{text}rule ip OUTPUT 99\nend\n");
        assert_eq!(
            parse(&longer),
            parse(&text),
            "a longer earlier record's tail is ignored"
        );
        assert_eq!(parse(&text), Some(record));
        assert_eq!(parse("switcheroo-cache 2\ngeneration 1\n"), None);
        assert_eq!(parse("switcheroo-cache 1\ngeneration x\n"), None);
        assert_eq!(
            parse("switcheroo-cache 1\ngeneration 1\nrule ip FORWARD 1\n"),
            None
        );
        assert_eq!(
            parse("switcheroo-cache 1\ngeneration 1\nrule ip OUTPUT 1 2\n"),
            None
        );
    }
}
