//! Where notifications may go, checked on the address actually connected to.
//!
//! `fraiseql_obs.notification_allowed_hosts` (default `*`) is a comma-separated
//! list of entries, each optionally with `:port` (`[v6]:port` for IPv6):
//! * `*` — any host name, **public addresses only**;
//! * `*.example.com` — that domain's hosts, public addresses only;
//! * `hooks.example.com` — that host, whatever it resolves to (naming a host
//!   explicitly is how a local relay such as `localhost` is allowed);
//! * `10.1.2.3`, `fd00::/8`, `127.0.0.0/8` — addresses or CIDR ranges, allowed
//!   even when they are local.
//!
//! The host is resolved once; every address is checked; the connection is
//! made to a checked address (no second lookup, so DNS rebinding between
//! check and connect is impossible). Local addresses — loopback, private,
//! link-local (169.254.169.254, the cloud metadata service, among them),
//! unique-local, CGNAT, unspecified, multicast, broadcast, and IPv4-mapped
//! forms of these — are refused unless an entry allows them explicitly, as
//! GitLab refuses webhooks to the local network by default. Decimal, octal
//! and hex IPv4 forms are resolved like any name, so the check sees the
//! address they stand for.
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    AnyName,
    Domain(String),
    Name(String),
    Net(IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    pattern: Pattern,
    port: Option<u16>,
}

fn parse_net(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, bits) = match s.split_once('/') {
        Some((ip, b)) => (ip, Some(b.parse::<u8>().ok()?)),
        None => (s, None),
    };
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = bits.unwrap_or(max);
    (bits <= max).then_some((ip, bits))
}

fn parse_entry(raw: &str) -> Option<Entry> {
    let e = raw.trim().to_ascii_lowercase();
    if e.is_empty() {
        return None;
    }
    // a port: "host:port", "[v6]:port", "v4/len:port"; a bare IPv6 has no port
    let (body, port) = if let Some(rest) = e.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse::<u16>().ok()?),
            None if after.is_empty() || after.starts_with('/') => None,
            None => return None,
        };
        let body = if let Some(len) = after.strip_prefix('/') {
            format!("{inside}/{len}")
        } else {
            inside.to_string()
        };
        (body, port)
    } else if e.matches(':').count() == 1 {
        let (h, p) = e.split_once(':')?;
        (h.to_string(), Some(p.parse::<u16>().ok()?))
    } else {
        (e.clone(), None)
    };
    let pattern = if body == "*" {
        Pattern::AnyName
    } else if let Some(d) = body.strip_prefix("*.") {
        Pattern::Domain(d.trim_end_matches('.').to_string())
    } else if let Some((ip, bits)) = parse_net(&body) {
        Pattern::Net(ip, bits)
    } else if body.contains('/') || body.contains('*') {
        return None;
    } else {
        Pattern::Name(body.trim_end_matches('.').to_string())
    };
    Some(Entry { pattern, port })
}

/// The parsed allow-list; entries that do not parse are reported.
pub struct AllowList {
    entries: Vec<Entry>,
    pub invalid: Vec<String>,
}

impl AllowList {
    pub fn parse(list: &str) -> Self {
        let mut entries = Vec::new();
        let mut invalid = Vec::new();
        for raw in list.split(',').filter(|r| !r.trim().is_empty()) {
            match parse_entry(raw) {
                Some(e) => entries.push(e),
                None => invalid.push(raw.trim().to_string()),
            }
        }
        AllowList { entries, invalid }
    }

    fn port_ok(e: &Entry, port: u16) -> bool {
        e.port.is_none_or(|p| p == port)
    }

    /// Whether the host name may be contacted at all (before resolving), and
    /// whether it was named explicitly (then local addresses are fine too).
    fn name_admits(&self, host: &str, port: u16) -> (bool, bool) {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let mut admitted = false;
        let mut explicit = false;
        for e in self.entries.iter().filter(|e| Self::port_ok(e, port)) {
            match &e.pattern {
                Pattern::AnyName => admitted = true,
                Pattern::Domain(d) if host.ends_with(&format!(".{d}")) => admitted = true,
                Pattern::Name(n) if *n == host => {
                    admitted = true;
                    explicit = true;
                }
                _ => {}
            }
        }
        (admitted, explicit)
    }

    fn net_admits(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical(ip);
        self.entries
            .iter()
            .filter(|e| Self::port_ok(e, port))
            .any(|e| match e.pattern {
                Pattern::Net(net, bits) => in_net(ip, canonical(net), bits),
                _ => false,
            })
    }

    /// The address to connect to for `host:port`, or why not.
    pub fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        self.check(host, port).map_err(|e| {
            if self.invalid.is_empty() {
                e
            } else {
                format!(
                    "{e} (entries ignored as invalid: {})",
                    self.invalid.join(", ")
                )
            }
        })
    }

    fn check(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            // an address: allowed by a matching address or range, or by `*`
            // when it is public
            let ip = canonical(ip);
            let any = self
                .entries
                .iter()
                .any(|e| e.pattern == Pattern::AnyName && Self::port_ok(e, port));
            return if self.net_admits(ip, port) || (any && is_public(ip)) {
                Ok(SocketAddr::new(ip, port))
            } else if any {
                Err(format!(
                    "{host} is a local or reserved address, refused; allow it explicitly in fraiseql_obs.notification_allowed_hosts"
                ))
            } else {
                Err(not_allowed(host, port))
            };
        }
        // a name: it must be admitted before it is even looked up
        let (by_name, explicit) = self.name_admits(bare, port);
        if !by_name {
            return Err(not_allowed(host, port));
        }
        let addrs: Vec<SocketAddr> = (bare, port)
            .to_socket_addrs()
            .map_err(|e| format!("{host}: cannot resolve: {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("{host}: no address"));
        }
        // every address must pass: a name that resolves to one public and one
        // private address is refused rather than raced
        for a in &addrs {
            let ip = canonical(a.ip());
            if !(explicit || is_public(ip) || self.net_admits(ip, port)) {
                return Err(format!(
                    "{host} resolves to a local or reserved address ({ip}), refused; allow it explicitly in fraiseql_obs.notification_allowed_hosts"
                ));
            }
        }
        Ok(SocketAddr::new(canonical(addrs[0].ip()), port))
    }
}

fn not_allowed(host: &str, port: u16) -> String {
    format!("{host}:{port} is not allowed by fraiseql_obs.notification_allowed_hosts")
}

/// An IPv4-mapped or IPv4-compatible IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                // ::a.b.c.d (deprecated compatible form), not :: or ::1
                if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
                    IpAddr::V4(Ipv4Addr::new(
                        (s[6] >> 8) as u8,
                        s[6] as u8,
                        (s[7] >> 8) as u8,
                        s[7] as u8,
                    ))
                } else {
                    ip
                }
            }
        },
        v4 => v4,
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits as u32)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits as u32)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A globally routable unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 CGNAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || o[0] >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link local
                || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 (and 64:ff9b:1::/48, local) of any IPv4
                || s[0] == 0x2002 // 6to4 of any IPv4
                || (s[0] == 0x2001 && s[1] == 0) // 2001::/32 Teredo: tunnels to any IPv4
                || (s[0] == 0x2001 && s[1] == 2 && s[2] == 0) // 2001:2::/48 benchmarking
                || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x20) // 2001:20::/28 ORCHIDv2
                || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0)) // 100::/64 discard
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_and_translations_are_not_public() {
        for a in [
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2002:7f00:1::",
            "2001:2::1",
            "2001:20::1",
            "100::1",
            "::127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(!is_public(ip), "{a}");
        }
        assert!(is_public("2606:4700::1111".parse().unwrap()));
    }

    #[test]
    fn default_refuses_local_networks() {
        let l = AllowList::parse("*");
        for host in [
            "127.0.0.1",
            "[::1]",
            "169.254.169.254",
            "10.0.0.1",
            "192.168.1.1",
            "172.16.0.1",
            "[fd00::1]",
            "[fe80::1]",
            "0.0.0.0",
            "[::]",
            "224.0.0.1",
            "[::ffff:127.0.0.1]",
            "[::ffff:169.254.169.254]",
            "100.64.0.1",
            "localhost",
            // decimal, hex and octal forms of 127.0.0.1, as getaddrinfo reads them
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
        ] {
            assert!(l.resolve(host, 80).is_err(), "{host} must be refused");
        }
    }

    #[test]
    fn explicit_entries_allow_local_destinations() {
        let l = AllowList::parse("localhost, 127.0.0.1:8080, [::1], 10.0.0.0/8");
        assert!(l.resolve("localhost", 25).is_ok());
        assert_eq!(
            l.resolve("127.0.0.1", 8080).unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert!(l.resolve("127.0.0.1", 8081).is_err(), "port not listed");
        assert!(l.resolve("[::1]", 9).is_ok());
        assert!(l.resolve("10.9.8.7", 443).is_ok());
        assert!(l.resolve("11.0.0.1", 443).is_err(), "not in the list");
        assert!(l.resolve("169.254.169.254", 80).is_err());
    }

    #[test]
    fn wildcards_and_names() {
        let l = AllowList::parse("*.example.com:443");
        assert!(l.name_admits("hooks.example.com", 443).0);
        assert!(!l.name_admits("hooks.example.com", 80).0);
        assert!(!l.name_admits("example.com.evil.net", 443).0);
        assert!(!l.name_admits("evilexample.com", 443).0);
        let none = AllowList::parse("");
        assert!(none.resolve("127.0.0.1", 80).is_err());
    }

    #[test]
    fn entries_parse() {
        let l =
            AllowList::parse("a.b, *.c.d:8443, [2001:db8::1]:443, 192.168.0.0/16, ::1, x/y, *x");
        assert_eq!(l.entries.len(), 5);
        assert_eq!(l.invalid, vec!["x/y".to_string(), "*x".to_string()]);
    }

    #[test]
    fn public_addresses() {
        assert!(is_public("93.184.216.34".parse().unwrap()));
        assert!(is_public("2606:2800:220:1::1".parse().unwrap()));
        assert!(!is_public("::ffff:10.0.0.1".parse().unwrap()));
    }
}
