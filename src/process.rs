//! What `/proc/<pid>/stat` says of a process: its parent and its start time.
//!
//! The start time (field 22, clock ticks since boot) together with the pid names one
//! process for good: a later process that gets the same pid starts later. Rule comments
//! carry it, so an instance is signalled only if it is still the process that wrote its
//! rule.

use std::io::{self, Read};

/// Room for one `/proc/<pid>/stat` line, with a wide margin.
const STAT_MAX: usize = 4096;

/// The fields of `/proc/<pid>/stat` that switcheroo reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The process id (field 1).
    pub pid: u32,
    /// The state (field 3): `R` running, `S` sleeping, ..., `Z` zombie (exited, not yet
    /// reaped by its parent), `X` dead.
    pub state: char,
    /// The parent's process id (field 4; 0 for a process whose parent is in another pid
    /// namespace).
    pub parent: u32,
    /// The start time in clock ticks since boot (field 22).
    pub start_time: u64,
}

impl Stat {
    /// Reads `/proc/<pid>/stat` with one `read(2)` into a buffer on the stack: the file
    /// is one line of at most about 1,200 bytes (52 fields of at most 20 digits and a
    /// command of at most 64 bytes), and procfs hands a whole line to a read that has room
    /// for it. NotFound: no such process.
    pub fn of(pid: u32) -> io::Result<Stat> {
        let mut buf = [0u8; STAT_MAX];
        let len = std::fs::File::open(format!("/proc/{pid}/stat"))?.read(&mut buf)?;
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/stat: unexpected format"),
            )
        };
        // A full buffer may hold only the start of a longer line: refuse it, never guess.
        if len == buf.len() {
            return Err(bad());
        }
        // The command may hold any bytes; only the numeric fields after it are read.
        Stat::parse(&String::from_utf8_lossy(&buf[..len])).ok_or_else(bad)
    }

    /// The stat of the calling process.
    pub fn this_process() -> io::Result<Stat> {
        Stat::of(std::process::id())
    }

    /// Parses a `/proc/<pid>/stat` line. Field 2, the command in parentheses, may contain
    /// spaces and parentheses itself, so fields are counted after its last `)`.
    pub fn parse(line: &str) -> Option<Stat> {
        let (head, rest) = line.rsplit_once(')')?;
        let pid = head.split_once(" (")?.0.trim().parse().ok()?;
        // Fields 3.. follow the command: field N is the (N - 3)th of them.
        let mut fields = rest.split_ascii_whitespace();
        let state = fields.next()?.chars().next()?;
        let parent = fields.next()?.parse().ok()?;
        let start_time = fields.nth(22 - 4 - 1)?.parse().ok()?;
        Some(Stat {
            pid,
            state,
            parent,
            start_time,
        })
    }

    /// Whether the process still runs: it has not exited, even if its parent has not
    /// reaped it yet (a zombie keeps its pid and start time until then).
    pub fn running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// The wall-clock time at which a process with start time `start_ticks` (field 22, clock
/// ticks since boot) started: the boot time (`btime` of `/proc/stat`, whole seconds) plus
/// the ticks (`sysconf(_SC_CLK_TCK)` a second). `None` if either cannot be read.
pub fn started_at(start_ticks: u64) -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|hz| *hz > 0)? as u64;
    let since_boot = std::time::Duration::from_millis(start_ticks.saturating_mul(1000) / hz);
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(btime) + since_boot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_survive_odd_command_names() {
        let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        fields[3 - 3] = "Z".into();
        fields[4 - 3] = "77".into();
        fields[22 - 3] = "98765".into();
        let line = format!("1234 (a) b (c) {}", fields.join(" "));
        assert_eq!(
            Stat::parse(&line),
            Some(Stat {
                pid: 1234,
                state: 'Z',
                parent: 77,
                start_time: 98765
            })
        );
        assert!(!Stat::parse(&line).unwrap().running());
        assert_eq!(Stat::parse("1234 (a"), None);
        assert_eq!(Stat::parse(""), None);
    }

    #[test]
    fn a_process_started_after_boot_and_before_now() {
        let me = Stat::this_process().unwrap();
        let at = started_at(me.start_time).unwrap();
        let now = std::time::SystemTime::now();
        assert!(
            at <= now + std::time::Duration::from_secs(1),
            "{at:?} {now:?}"
        );
        assert!(now.duration_since(at).unwrap() < std::time::Duration::from_secs(24 * 3600));
    }

    #[test]
    fn this_process_is_read() {
        let me = Stat::this_process().unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(me.running());
        assert_eq!(me.parent, nix::unistd::getppid().as_raw() as u32);
        assert!(me.start_time > 0);
    }
}
