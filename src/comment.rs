//! A rule's identity, kept in its comment:
//! `SWITCHEROO:ns=<namespace>:port=<internal port>:pid=<pid>:start=<start>`.
//!
//! `start` is field 22 of `/proc/<pid>/stat`, the process start time in clock ticks since
//! boot: with the pid it names one process, even after the pid is reused. Comments of the
//! Go original (`SWITCHEROO:ns=<namespace>:port=<port>:pid=<pid>`) parse too, without a
//! start time. Anything else is somebody else's rule.

use std::fmt;

const PREFIX: &str = "SWITCHEROO";

/// Who owns a rule, as its comment says: the namespace, the internal port, and the process
/// that committed it. `Display` writes the comment; [`Identity::parse`] reads one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The namespace: 1-64 characters of `[A-Za-z0-9_.-]`.
    pub namespace: String,
    /// The internal port the rule redirects to.
    pub port: u16,
    /// The pid of the process that committed the rule.
    pub pid: u32,
    /// The start time of that process (field 22 of `/proc/<pid>/stat`); `None` in comments
    /// of the Go original.
    pub start: Option<u64>,
}

/// Whether `ns` is 1-64 characters of `[A-Za-z0-9_.-]` (so it can never contain the `:`
/// that separates the comment's fields).
pub(crate) fn valid_namespace(ns: &str) -> bool {
    (1..=64).contains(&ns.len())
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Identity {
    /// Parses a rule comment; `None` if it is not exactly one of the two formats (such a
    /// rule belongs to somebody else). Never panics, whatever the input.
    pub fn parse(comment: &str) -> Option<Identity> {
        let mut fields = comment.split(':');
        if fields.next()? != PREFIX {
            return None;
        }
        let namespace = fields.next()?.strip_prefix("ns=")?;
        let port = number(fields.next()?.strip_prefix("port=")?)?;
        let pid = number(fields.next()?.strip_prefix("pid=")?)?;
        let start = match fields.next() {
            None => None,
            Some(f) => Some(number(f.strip_prefix("start=")?)?),
        };
        if fields.next().is_some() || !valid_namespace(namespace) || port == 0 || pid == 0 {
            return None;
        }
        Some(Identity {
            namespace: namespace.to_owned(),
            port,
            pid,
            start,
        })
    }
}

/// A decimal number in canonical form: digits only, no sign, no leading zero, so that a
/// comment has exactly one spelling.
fn number<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}:ns={}:port={}:pid={}",
            self.namespace, self.port, self.pid
        )?;
        if let Some(start) = self.start {
            write!(f, ":start={start}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_string_parses_or_not_without_panicking(s in ".{0,300}") {
            let _ = Identity::parse(&s);
        }

        #[test]
        fn near_misses_never_panic(s in "SWITCHEROO(:[a-z]{0,5}=?[0-9a-zA-Z_.:+-]{0,30}){0,6}") {
            if let Some(id) = Identity::parse(&s) {
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn identities_round_trip(
            ns in "[A-Za-z0-9_.-]{1,64}",
            port in 1u16..,
            pid in 1u32..,
            start in proptest::option::of(any::<u64>()),
        ) {
            let id = Identity { namespace: ns, port, pid, start };
            prop_assert_eq!(Identity::parse(&id.to_string()), Some(id));
        }
    }

    #[test]
    fn comment_round_trips() {
        let id = Identity {
            namespace: "app".into(),
            port: 40400,
            pid: 1234,
            start: Some(98765),
        };
        let text = id.to_string();
        assert_eq!(text, "SWITCHEROO:ns=app:port=40400:pid=1234:start=98765");
        assert_eq!(Identity::parse(&text), Some(id));
    }

    #[test]
    fn go_original_format_parses_without_start() {
        let id = Identity::parse("SWITCHEROO:ns=web:port=40401:pid=77").unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.port, id.pid, id.start),
            ("web", 40401, 77, None)
        );
    }

    #[test]
    fn foreign_and_malformed_comments_are_not_ours() {
        for c in [
            "",
            "docker",
            "SWITCHEROO",
            "SWITCHEROO:ns=:port=1:pid=1",
            "SWITCHEROO:ns=a:port=0:pid=1",
            "SWITCHEROO:ns=a:port=70000:pid=1",
            "SWITCHEROO:ns=a:port=1:pid=+1",
            "SWITCHEROO:ns=a:port=01:pid=1",
            "SWITCHEROO:ns=a:port=1:pid=1:start=",
            "SWITCHEROO:ns=a:port=1:pid=1:start=1:x",
            "SWITCHEROO:ns=a b:port=1:pid=1",
            "switcheroo:ns=a:port=1:pid=1",
        ] {
            assert_eq!(Identity::parse(c), None, "{c:?}");
        }
    }

    #[test]
    fn namespace_rules() {
        assert!(valid_namespace("my-app_v2.prod"));
        assert!(valid_namespace(&"a".repeat(64)));
        assert!(!valid_namespace(&"a".repeat(65)));
        assert!(!valid_namespace(""));
        assert!(!valid_namespace("a:b"));
        assert!(!valid_namespace("ä"));
    }
}
