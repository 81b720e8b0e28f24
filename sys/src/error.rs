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
    /// The kernel lacks a part switcheroo needs.
    #[error(
        "{op}: {errno}: this kernel lacks {what}; load the module or use a kernel built with it"
    )]
    Unsupported {
        /// The operation that showed it.
        op: String,
        /// The missing part, e.g. "nf_tables" or "the xtables compat layer (nft_compat, xt_addrtype, xt_comment, xt_REDIRECT)".
        what: &'static str,
        /// The kernel's answer.
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
    /// Creating the nat table or a nat base chain.
    NatChain,
    /// Inserting a rule made of xt matches and targets.
    Insert,
    /// Deleting a rule by handle.
    Delete,
    /// A dump or a lookup.
    Read,
}

const NFTABLES: &str = "nf_tables (CONFIG_NF_TABLES)";
const NAT: &str = "the nat chain type (nft_chain_nat) or NAT for this family";
const COMPAT: &str =
    "the xtables compat layer (nft_compat with xt_addrtype, xt_comment, xt_REDIRECT)";

impl Error {
    pub(crate) fn from_errno(op: String, errno: Errno, context: Context) -> Self {
        use Context::*;
        match (errno, context) {
            (Errno::EPERM | Errno::EACCES, _) => Error::PermissionDenied { op, errno },
            (Errno::ERESTART, Batch) | (Errno::ENOENT, Delete) => Error::Conflict { op, errno },
            (Errno::EPROTONOSUPPORT | Errno::EAFNOSUPPORT | Errno::EOPNOTSUPP, Nftables | Read) => {
                Error::Unsupported {
                    op,
                    what: NFTABLES,
                    errno,
                }
            }
            (Errno::ENOENT | Errno::EOPNOTSUPP | Errno::EAFNOSUPPORT, NatChain) => {
                Error::Unsupported {
                    op,
                    what: NAT,
                    errno,
                }
            }
            (Errno::ENOENT | Errno::EOPNOTSUPP, Insert) => Error::Unsupported {
                op,
                what: COMPAT,
                errno,
            },
            _ => Error::Kernel { op, errno },
        }
    }

    /// Whether retrying from a fresh dump can succeed.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
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
        assert!(!Error::from_errno(String::new(), Errno::ENOENT, Context::Insert).is_conflict());
    }

    #[test]
    fn missing_compat_layer_is_named() {
        let e = Error::from_errno("inserting".into(), Errno::ENOENT, Context::Insert);
        assert!(e.to_string().contains("nft_compat"), "{e}");
    }
}
