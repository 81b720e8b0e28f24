//! Which traffic the redirect applies to.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};
use switcheroo_sys::Chain;

/// The set of routes the public port is redirected for: connections from the network
/// (`PREROUTING`), from the host itself (`OUTPUT`), or both (the default).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Routes(u8);

impl Routes {
    /// Connections that arrive from the network: a rule in `PREROUTING`.
    pub const NETWORK: Routes = Routes(1);
    /// Connections the host makes to its own addresses, e.g. `127.0.0.1:8080` or `[::1]:8080`:
    /// a rule in `OUTPUT`.
    pub const LOCALHOST: Routes = Routes(2);

    /// No route; a starting point for building a set with `|=`.
    pub const fn empty() -> Routes {
        Routes(0)
    }

    /// Both routes.
    pub const fn all() -> Routes {
        Routes(Self::NETWORK.0 | Self::LOCALHOST.0)
    }

    /// Whether every route of `other` is in `self`.
    pub const fn contains(self, other: Routes) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no route is selected.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether the route served by `chain` is selected.
    pub(crate) fn has_chain(self, chain: Chain) -> bool {
        self.contains(match chain {
            Chain::Prerouting => Routes::NETWORK,
            Chain::Output => Routes::LOCALHOST,
        })
    }
}

impl Default for Routes {
    fn default() -> Self {
        Routes::all()
    }
}

impl BitOr for Routes {
    type Output = Routes;

    fn bitor(self, rhs: Routes) -> Routes {
        Routes(self.0 | rhs.0)
    }
}

impl BitOrAssign for Routes {
    fn bitor_assign(&mut self, rhs: Routes) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (Routes::NETWORK, "NETWORK"),
            (Routes::LOCALHOST, "LOCALHOST"),
        ]
        .into_iter()
        .filter(|(r, _)| self.contains(*r))
        .map(|(_, n)| n)
        .collect();
        if names.is_empty() {
            f.write_str("(none)")
        } else {
            f.write_str(&names.join(" | "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_chains() {
        assert!(Routes::NETWORK.has_chain(Chain::Prerouting));
        assert!(!Routes::NETWORK.has_chain(Chain::Output));
        assert!(Routes::default().has_chain(Chain::Output));
        assert_eq!(Routes::NETWORK | Routes::LOCALHOST, Routes::all());
        assert_eq!(format!("{:?}", Routes::all()), "NETWORK | LOCALHOST");
    }
}
