//! Errors of netlink operations, mapped from the kernel's errno to what a caller can act on.

use nix::errno::Errno;

/// What failed in a netlink operation, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel refused for lack of privilege (EPERM/EACCES).
    #[error("{op}: {errno} (needs CAP_NET_ADMIN in this network namespace)")]
    PermissionDenied {
        /// The operation, e.g. "dumping rules of ip nat OUTPUT".
        op: String,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The ruleset changed between the dump and the batch: the generation moved (ERESTART)
    /// or a rule to delete is already gone (ENOENT). Nothing of the batch was applied; dump
    /// again and retry.
    #[error("{op}: {errno}: the ruleset changed since it was read; nothing was applied, retry from a fresh dump")]
    Conflict {
        /// The operation that found the ruleset changed.
        op: String,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The kernel lacks a part switcheroo needs, as a probe of that very part showed (see
    /// [`crate::Conn::probe_support`]); never inferred from one errno of another operation.
    #[error(
        "{op}: {errno}: this kernel lacks {what}; load the module or use a kernel built with it"
    )]
    Unsupported {
        /// The operation that showed it.
        op: String,
        /// The missing part, e.g. "nf_tables" or "the xtables match addrtype revision 1 (xt_addrtype)".
        what: String,
        /// The kernel's answer.
        errno: Errno,
    },
    /// A table this batch creates for its own socket (an owned table, the namespace's commit
    /// lock) belongs to another socket: another process holds the lock.
    #[error("{op}: {errno}: held by another process")]
    Held {
        /// The operation.
        op: String,
        /// The kernel's answer (EPERM: owned by another socket).
        errno: Errno,
    },
    /// Any other errno from the kernel or the socket.
    #[error("{op}: {errno}")]
    Kernel {
        /// The operation.
        op: String,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The kernel answered something this crate cannot make sense of.
    #[error("{op}: unexpected netlink reply: {why}")]
    Protocol {
        /// The operation.
        op: String,
        /// What was wrong with the reply.
        why: String,
    },
    /// A rule that cannot be encoded as iptables-nft would encode it.
    #[error("invalid rule: {why}")]
    InvalidRule {
        /// What is wrong with it.
        why: String,
    },
}

/// What kind of message an errno answered: the same errno means different things for
/// different messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Context {
    /// Opening the socket or any request that needs nf_tables itself.
    Nftables,
    /// The batch as a whole (its begin message carries the generation).
    Batch,
    /// Creating or deleting a table owned by this socket.
    OwnedTable,
    /// An operation on the ruleset inside a batch: creating a table or chain, inserting a
    /// rule. ENOENT there means that something named by the operation is missing: a table
    /// or chain that a concurrent writer deleted, or a kernel part (chain type, xtables
    /// extension). Which one only a probe can tell.
    Write,
    /// Deleting a rule by handle.
    Delete,
    /// A dump or a lookup.
    Read,
}

const NFTABLES: &str = "nf_tables (CONFIG_NF_TABLES)";

impl Error {
    pub(crate) fn from_errno(op: String, errno: Errno, context: Context) -> Self {
        use Context::*;
        match (errno, context) {
            // Owned tables: another socket's table refuses us with EPERM; the whole batch
            // is refused for lack of CAP_NET_ADMIN on its begin message (Context::Batch).
            (Errno::EPERM | Errno::EEXIST, OwnedTable) => Error::Held { op, errno },
            (Errno::EPERM | Errno::EACCES, _) => Error::PermissionDenied { op, errno },
            (Errno::ERESTART, Batch) | (Errno::ENOENT, Delete) => Error::Conflict { op, errno },
            // The socket's protocol or the nf_tables subsystem itself is absent: these
            // errnos answer exactly that question.
            (Errno::EPROTONOSUPPORT | Errno::EAFNOSUPPORT, Nftables) => Error::Unsupported {
                op,
                what: NFTABLES.to_owned(),
                errno,
            },
            _ => Error::Kernel { op, errno },
        }
    }

    /// Whether retrying from a fresh dump can succeed.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// Whether the kernel answered that something an operation named does not exist
    /// (ENOENT or EOPNOTSUPP on a write): a table or chain deleted under the batch, or a
    /// kernel part that is missing. [`crate::Conn::probe_support`] tells which.
    pub fn is_missing(&self) -> bool {
        matches!(
            self,
            Error::Kernel {
                errno: Errno::ENOENT | Errno::EOPNOTSUPP,
                ..
            }
        )
    }

    /// Whether an owned table (a commit lock) is held by another socket.
    pub fn is_held(&self) -> bool {
        matches!(self, Error::Held { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eperm_names_the_capability() {
        let e = Error::from_errno(
            "dumping rules of ip nat OUTPUT".into(),
            Errno::EPERM,
            Context::Read,
        );
        assert!(matches!(e, Error::PermissionDenied { .. }));
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
        assert!(
            e.to_string()
                .starts_with("dumping rules of ip nat OUTPUT: EPERM"),
            "{e}"
        );
    }

    #[test]
    fn vanished_handle_and_generation_are_conflicts() {
        assert!(Error::from_errno(String::new(), Errno::ENOENT, Context::Delete).is_conflict());
        assert!(Error::from_errno(String::new(), Errno::ERESTART, Context::Batch).is_conflict());
        assert!(!Error::from_errno(String::new(), Errno::ENOENT, Context::Write).is_conflict());
    }

    #[test]
    fn enoent_on_a_write_is_not_taken_for_a_missing_module() {
        // A chain deleted under the batch and a missing extension both answer ENOENT: the
        // error says only what the kernel said, and the caller probes.
        let e = Error::from_errno("inserting".into(), Errno::ENOENT, Context::Write);
        assert!(e.is_missing());
        assert!(!matches!(e, Error::Unsupported { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "inserting: ENOENT: No such file or directory"
        );
    }

    #[test]
    fn an_owned_table_of_another_socket_is_held() {
        let e = Error::from_errno("locking".into(), Errno::EPERM, Context::OwnedTable);
        assert!(e.is_held());
        let e = Error::from_errno("locking".into(), Errno::EPERM, Context::Batch);
        assert!(matches!(e, Error::PermissionDenied { .. }));
    }
}
