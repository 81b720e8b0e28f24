//! A service's public ports, and where an instance's lead.

use std::fmt;
use std::str::FromStr;
use switcheroo_sys::Protocol;

/// One public port of a service: a protocol and a port number. `Display` and `FromStr`
/// use `443/udp`, `443/tcp`, and `443` for TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port number clients use.
    pub number: u16,
}

impl Port {
    /// TCP port `number`.
    pub const fn tcp(number: u16) -> Port {
        Port {
            protocol: Protocol::Tcp,
            number,
        }
    }

    /// UDP port `number`.
    pub const fn udp(number: u16) -> Port {
        Port {
            protocol: Protocol::Udp,
            number,
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.number, self.protocol)
    }
}

impl FromStr for Port {
    type Err = String;

    /// `PORT`, `PORT/tcp` or `PORT/udp`, PORT 1-65535.
    fn from_str(s: &str) -> std::result::Result<Port, String> {
        let (number, protocol) = match s.split_once('/') {
            None => (s, Protocol::Tcp),
            Some((n, "tcp")) => (n, Protocol::Tcp),
            Some((n, "udp")) => (n, Protocol::Udp),
            Some((_, other)) => {
                return Err(format!(
                    "{s:?}: unknown protocol {other:?}; give PORT, PORT/tcp or PORT/udp"
                ))
            }
        };
        match number.parse::<u16>() {
            Ok(n) if n > 0 => Ok(Port {
                protocol,
                number: n,
            }),
            _ => Err(format!("{s:?}: the port must be a number from 1 to 65535")),
        }
    }
}

/// One public port of an instance and the internal port it leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The public port.
    pub public: Port,
    /// The internal port.
    pub internal: u16,
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.public, self.internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_and_print() {
        assert_eq!("443".parse(), Ok(Port::tcp(443)));
        assert_eq!("443/tcp".parse(), Ok(Port::tcp(443)));
        assert_eq!("53/udp".parse(), Ok(Port::udp(53)));
        assert_eq!(Port::udp(53).to_string(), "53/udp");
        for bad in ["0", "65536", "53/sctp", "", "/udp", "x/tcp"] {
            assert!(bad.parse::<Port>().is_err(), "{bad}");
        }
    }
}
