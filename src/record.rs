//! What the last commit of a namespace left behind, so that the next one can skip the dumps.
//!
//! Dumping a chain costs the kernel about 2.7 µs per rule, so with thousands of foreign
//! rules in PREROUTING the dumps are most of a commit. After a commit, the instance that
//! made it records the ruleset generation and the handles of its namespace's rules, but
//! only when the generation moved by exactly its own transaction (nothing else changed the
//! ruleset since its dump). The next commit reads the generation: if it is still the
//! recorded one, nothing has changed the ruleset of that network namespace since, so the
//! recorded rules are all of the namespace's rules; each is still fetched by handle and
//! checked to be ours before it is trusted. Any mismatch, a missing or unreadable record,
//! falls back to the dumps.
//!
//! That reasoning holds only within one network namespace, and the kernel restarts the
//! generation and the handles in every new one. So a record is keyed by the namespace's
//! cookie (`SO_NETNS_COOKIE`, handed out once per namespace and never reused until reboot;
//! the inode of the nsfs file, by contrast, is reused at once) and by the boot id (a
//! directory may survive a reboot, and cookies restart with it). A record of a namespace
//! that is gone can never match again; records of other boots are deleted, and at most
//! [`MAX_RECORDS`] are kept per directory, the oldest going first.
//!
//! Records are opt-in: only a [`Builder::record_dir`](crate::Builder::record_dir) turns
//! them on, and the directory must belong to the effective user and be writable by nobody
//! else (it is created with mode 0700 if missing).

use log::debug;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use switcheroo_sys::{Chain, Family};

const MAGIC: &str = "switcheroo-record 3";
/// How many records a directory keeps: one per (network namespace, service) that
/// committed, so a host with a few services needs a handful; the bound keeps a test suite
/// that makes thousands of namespaces from filling it.
pub(crate) const MAX_RECORDS: usize = 64;

/// The record of one namespace's last commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub generation: u32,
    pub rules: Vec<(Family, Chain, u64)>,
}

/// Which network namespace and service a record belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Key {
    pub boot: String,
    pub netns_cookie: u64,
    pub namespace: String,
}

impl Key {
    /// The key for `namespace` in the network namespace of cookie `netns_cookie`, in this
    /// boot; `None` without a boot id to tell boots apart.
    pub fn new(netns_cookie: u64, namespace: &str) -> Option<Key> {
        Some(Key {
            boot: boot_id()?.to_owned(),
            netns_cookie,
            namespace: namespace.to_owned(),
        })
    }

    fn file_name(&self) -> String {
        format!("{}-{}-{}", self.boot, self.netns_cookie, self.namespace)
    }
}

/// `/proc/sys/kernel/random/boot_id`, without dashes.
fn boot_id() -> Option<&'static str> {
    static BOOT: OnceLock<Option<String>> = OnceLock::new();
    BOOT.get_or_init(|| {
        let text = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let id: String = text.trim().chars().filter(|c| *c != '-').collect();
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    })
    .as_deref()
}

/// A directory of records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(dir: PathBuf) -> Records {
        Records { dir }
    }

    /// The directory, created if missing, if it is a directory that only this user can
    /// write. Anything else (a symlink, another owner, group-writable) is not used.
    fn usable_dir(&self) -> Option<&Path> {
        let _ = fs::DirBuilder::new().mode(0o700).create(&self.dir);
        let meta = fs::symlink_metadata(&self.dir).ok()?;
        let safe = meta.is_dir()
            && meta.uid() == nix::unistd::geteuid().as_raw()
            && meta.mode() & 0o022 == 0;
        if !safe {
            debug!(
                "{}: not a directory of this user only; no commit record",
                self.dir.display()
            );
        }
        safe.then_some(&self.dir)
    }

    pub fn load(&self, key: &Key) -> Option<Record> {
        let dir = self.usable_dir()?;
        let text = fs::read_to_string(dir.join(key.file_name())).ok()?;
        parse(&text, key)
    }

    pub fn store(&self, key: &Key, record: &Record) {
        let Some(dir) = self.usable_dir() else {
            return;
        };
        let target = dir.join(key.file_name());
        // Overwritten in place from the start, neither renamed nor truncated (either costs
        // a journal transaction, about 0.4 ms, where the directory is not on a tmpfs): what
        // follows the `end` line is ignored. The writer no longer holds the lock (its
        // batch released it), so a reader may catch a write half done, old and new lines
        // mixed: the checksum on the `end` line refuses that, and the reader dumps.
        let created = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&target);
        let (file, new) = match created {
            Ok(file) => (Ok(file), true),
            Err(_) => (fs::OpenOptions::new().write(true).open(&target), false),
        };
        let written = file.and_then(|mut f| f.write_all(format(record, key).as_bytes()));
        if let Err(e) = written {
            debug!("cannot record the commit in {}: {e}", target.display());
            self.forget(key);
        }
        if new {
            prune(dir, key);
        }
    }

    pub fn forget(&self, key: &Key) {
        let _ = fs::remove_file(self.dir.join(key.file_name()));
    }
}

/// Deletes the records of other boots, then the oldest beyond [`MAX_RECORDS`]. Runs when
/// a record file is created, which happens once per (network namespace, service).
fn prune(dir: &Path, keep: &Key) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut current = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((boot, _)) = name.split_once('-') else {
            continue;
        };
        if boot.len() != 32 || !boot.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue; // not a record
        }
        if boot != keep.boot {
            let _ = fs::remove_file(entry.path());
        } else if name != keep.file_name() {
            let modified = entry.metadata().and_then(|m| m.modified()).ok();
            current.push((modified, entry.path()));
        }
    }
    if current.len() >= MAX_RECORDS {
        current.sort();
        for (_, path) in &current[..=current.len() - MAX_RECORDS] {
            let _ = fs::remove_file(path);
        }
    }
}

fn format(record: &Record, key: &Key) -> String {
    let mut text = format!(
        "{MAGIC}\nboot {}\nnetns {}\nnamespace {}\ngeneration {}\n",
        key.boot, key.netns_cookie, key.namespace, record.generation
    );
    for (family, chain, handle) in &record.rules {
        text.push_str(&format!("rule {family} {chain} {handle}\n"));
    }
    let sum = checksum(&text);
    text.push_str(&format!("end {sum:016x}\n"));
    text
}

/// FNV-1a over the lines before `end`: tells a record from a mix of two.
fn checksum(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn parse(text: &str, key: &Key) -> Option<Record> {
    // Everything up to the `end` line, which must carry the checksum of it.
    let end = text.find("\nend ")? + 1;
    let (body, tail) = text.split_at(end);
    let sum = tail.lines().next()?.strip_prefix("end ")?;
    if sum != format!("{:016x}", checksum(body)) {
        return None;
    }
    let mut lines = body.lines();
    let mut field = |name: &str| Some(lines.next()?.strip_prefix(name)?.to_owned());
    if !field(MAGIC)?.is_empty() {
        return None;
    }
    let for_key = field("boot ")? == key.boot
        && field("netns ")? == key.netns_cookie.to_string()
        && field("namespace ")? == key.namespace;
    if !for_key {
        return None;
    }
    let generation = field("generation ")?.parse().ok()?;
    let mut rules = Vec::new();
    for line in lines {
        let mut words = line.strip_prefix("rule ")?.split(' ');
        let family = match words.next()? {
            "ip" => Family::Ipv4,
            "ip6" => Family::Ipv6,
            _ => return None,
        };
        let chain = Chain::from_name(words.next()?)?;
        let handle = words.next()?.parse().ok()?;
        if words.next().is_some() {
            return None;
        }
        rules.push((family, chain, handle));
    }
    Some(Record { generation, rules })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(cookie: u64) -> Key {
        Key {
            boot: "0123456789abcdef0123456789abcdef".into(),
            netns_cookie: cookie,
            namespace: "app".into(),
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let record = Record {
            generation: 42,
            rules: vec![
                (Family::Ipv4, Chain::Prerouting, 5),
                (Family::Ipv6, Chain::Output, 7),
            ],
        };
        let text = format(&record, &key(9));
        assert!(
            text.starts_with("switcheroo-record 3\nboot 0123456789abcdef0123456789abcdef\nnetns 9\nnamespace app\ngeneration 42\nrule ip PREROUTING 5\nrule ip6 OUTPUT 7\nend "),
            "{text}"
        );
        assert_eq!(parse(&text, &key(9)), Some(record.clone()));
        assert_eq!(parse(&text, &key(10)), None, "another network namespace");
        assert_eq!(parse(&text[..text.len() - 20], &key(9)), None, "cut short");
        let longer = format!("{text}rule ip OUTPUT 99\nend 0\n");
        assert_eq!(
            parse(&longer, &key(9)),
            Some(record.clone()),
            "a longer earlier record's tail is ignored"
        );
        // A reader that catches a rewrite half done sees the start of the new record and
        // the rest of the old one: refused.
        let older = format(
            &Record {
                generation: 41,
                rules: vec![
                    (Family::Ipv4, Chain::Prerouting, 1),
                    (Family::Ipv4, Chain::Output, 2),
                    (Family::Ipv6, Chain::Prerouting, 3),
                ],
            },
            &key(9),
        );
        let cut = text.find("rule ip6").unwrap();
        let mixed = format!("{}{}", &text[..cut], &older[cut..]);
        assert_eq!(parse(&mixed, &key(9)), None, "{mixed}");
        for (from, to) in [
            ("rule ip PREROUTING", "rule ip FORWARD"),
            ("generation 42", "generation x"),
            ("generation 42", "generation 43"),
        ] {
            assert_eq!(parse(&text.replace(from, to), &key(9)), None, "{from}");
        }
    }

    #[test]
    fn records_of_other_boots_go_and_at_most_max_stay() {
        let dir = std::env::temp_dir().join(format!("switcheroo-records-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let records = Records::new(dir.clone());
        let record = Record {
            generation: 1,
            rules: vec![(Family::Ipv4, Chain::Output, 3)],
        };
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("ffffffffffffffffffffffffffffffff-1-app"),
            "old boot",
        )
        .unwrap();
        fs::write(dir.join("notes.txt"), "not a record").unwrap();
        let mut key = key(0);
        key.boot = boot_id().unwrap().to_owned();
        for cookie in 0..(MAX_RECORDS as u64 + 10) {
            key.netns_cookie = cookie;
            records.store(&key, &record);
        }
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.contains(&"notes.txt".to_owned()));
        assert!(!names.iter().any(|n| n.starts_with("ffff")), "{names:?}");
        assert_eq!(names.len(), MAX_RECORDS + 1, "{names:?}");
        assert_eq!(records.load(&key), Some(record), "the newest stays");
        fs::remove_dir_all(&dir).unwrap();
    }
}
