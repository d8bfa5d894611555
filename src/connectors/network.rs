//! The SSRF guard: which addresses a connector may call.
//!
//! A workflow author controls what weir sends, and a service URL may name any host, so without a
//! guard weir could be made to call its own network: the cloud metadata endpoint
//! (169.254.169.254), an admin port on localhost, a database on a private subnet. Calls to
//! addresses in the ranges below are refused unless `network.allow` lists them:
//!
//! | range | why |
//! |---|---|
//! | `0.0.0.0/8`, `::/128` | unspecified (Linux connects `0.0.0.0` to localhost) |
//! | `127.0.0.0/8`, `::1/128` | loopback |
//! | `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`, `fc00::/7` | private (RFC 1918, unique local) |
//! | `169.254.0.0/16`, `fe80::/10` | link-local (cloud metadata) |
//! | `100.64.0.0/10` | carrier-grade NAT (RFC 6598) |
//!
//! IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`) addresses are judged by the
//! IPv4 address inside them. Literal addresses in a service URL are checked when the connector is
//! built (so a bad config fails at load); host names are checked on every connection by
//! [`GuardedResolver`], the HTTP client's DNS resolver, which drops refused addresses from the
//! answer. Checking the name once and letting the client resolve it again would let a DNS server
//! answer a public address to the check and a private one to the connection (DNS rebinding); here
//! the addresses checked are the addresses connected to. Connectors follow no redirects and use no
//! proxy, since either would connect somewhere the resolver never sees.
//!
//! The policy's settings ([`NetworkPolicy`], `network:` in `weir.yaml`) are config data; the
//! checks below are its behaviour, kept here with the resolver that applies them.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, LazyLock},
};

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

pub use crate::config::NetworkPolicy;
use crate::telemetry::Event;

/// Ranges refused unless allowed, with what they are (for the error message).
static REFUSED: LazyLock<Vec<(IpNet, &'static str)>> = LazyLock::new(|| {
    [
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
    ]
    .into_iter()
    .map(|(net, kind)| (net.parse().expect("static ranges parse"), kind))
    .collect()
});

/// An address the policy refuses. Errors of refused calls carry it as their source, so the
/// connector can tell a refusal (permanent) from a network failure (retryable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{addr}{} is in {range} ({kind}) and not in network.allow", host.as_ref().map(|h| format!(" (resolved from {h})")).unwrap_or_default())]
pub struct Refused {
    /// The host name it was resolved from, if it was not a literal address.
    pub host: Option<String>,
    pub addr: IpAddr,
    pub range: IpNet,
    pub kind: &'static str,
}

impl NetworkPolicy {
    /// Why `addr` may not be called, or `None` if it may.
    pub fn check(&self, addr: IpAddr) -> Result<(), Refused> {
        let addr = canonical(addr);
        if self.allow.iter().any(|net| net.contains(&addr)) {
            return Ok(());
        }
        match REFUSED.iter().find(|(net, _)| net.contains(&addr)) {
            Some(&(range, kind)) => Err(Refused { host: None, addr, range, kind }),
            None => Ok(()),
        }
    }

    /// Checks the host of `url` if it is a literal address; names are checked when resolved.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        let host = url.host_str().unwrap_or_default();
        match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(addr) => self.check(addr),
            Err(_) => Ok(()),
        }
    }

    /// A DNS resolver for `service`'s HTTP client that only returns addresses this policy allows.
    pub fn resolver(&self, service: &str) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver { policy: self.clone(), service: service.to_string() })
    }
}

/// The address an IPv4-mapped or NAT64 IPv6 address stands for; others unchanged.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// Resolves with the system resolver and drops refused addresses; a name with none left is an
/// error carrying the first [`Refused`] (and counted).
#[derive(Debug)]
pub struct GuardedResolver {
    policy: NetworkPolicy,
    service: String,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let service = self.service.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| policy.check(a.ip()).map_err(|r| refused.get_or_insert(r)).is_ok())
                .collect();
            match (allowed.is_empty(), refused) {
                // Some addresses allowed (localhost's 127.0.0.1 but not ::1): connect to those.
                (false, _) | (true, None) => Ok(Box::new(allowed.into_iter()) as Addrs),
                (true, Some(refused)) => {
                    Event::OutboundRefused { service: &service, host: &host, addr: refused.addr }.emit();
                    Err(Refused { host: Some(host), ..refused }.into())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> NetworkPolicy {
        NetworkPolicy { allow: allow.iter().map(|a| a.parse().unwrap()).collect() }
    }

    #[test]
    fn internal_ranges_are_refused_and_public_ones_pass() {
        let p = policy(&[]);
        for (addr, kind) in [
            ("10.0.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("0.0.0.0", "unspecified"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd12::1", "private"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("64:ff9b::a00:1", "private"),
        ] {
            let err = p.check(addr.parse().unwrap()).unwrap_err();
            assert_eq!(err.kind, kind, "{addr}");
        }
        for addr in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert_eq!(p.check(addr.parse().unwrap()), Ok(()), "{addr}");
        }
    }

    #[test]
    fn the_allow_list_opens_exactly_its_ranges() {
        let p = policy(&["127.0.0.1/32", "10.1.0.0/16"]);
        assert_eq!(p.check("127.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(p.check("::ffff:127.0.0.1".parse().unwrap()), Ok(()), "mapped addresses match IPv4 entries");
        assert_eq!(p.check("10.1.200.3".parse().unwrap()), Ok(()));
        assert!(p.check("127.0.0.2".parse().unwrap()).is_err());
        assert!(p.check("10.2.0.1".parse().unwrap()).is_err());
        assert!(p.check("::1".parse().unwrap()).is_err());
    }

    #[test]
    fn literal_hosts_in_urls_are_checked() {
        let p = policy(&[]);
        let err = p.check_url(&"http://[::1]:8080/x".parse().unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "::1 is in ::1/128 (loopback) and not in network.allow");
        assert!(p.check_url(&"http://169.254.169.254/latest".parse().unwrap()).is_err());
        assert_eq!(p.check_url(&"http://localhost:1/".parse().unwrap()), Ok(()), "names are checked when resolved");
    }

    #[tokio::test]
    async fn the_resolver_returns_only_allowed_addresses() {
        let err = policy(&[]).resolver("svc").resolve("localhost".parse().unwrap()).await.err().expect("refused");
        let refused = err.downcast_ref::<Refused>().expect("the refusal is the error");
        assert_eq!((refused.host.as_deref(), refused.kind), (Some("localhost"), "loopback"));
        let addrs: Vec<SocketAddr> =
            policy(&["127.0.0.1/32"]).resolver("svc").resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(!addrs.is_empty(), "localhost resolves to 127.0.0.1");
        assert!(addrs.iter().all(|a| a.ip() == IpAddr::from([127, 0, 0, 1])), "::1 is dropped: {addrs:?}");
    }

    #[test]
    fn allow_entries_parse_or_name_the_bad_one() {
        let p: NetworkPolicy = serde_yaml_ng::from_str("allow: [127.0.0.1, 10.1.0.0/16, 'fd00::/8']").unwrap();
        assert_eq!(
            p.allow,
            vec!["127.0.0.1/32".parse::<IpNet>().unwrap(), "10.1.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()]
        );
        for bad in ["10.0.0.0/33", "10.0.0", "localhost"] {
            let err = serde_yaml_ng::from_str::<NetworkPolicy>(&format!("allow: ['{bad}']")).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?} is not a CIDR")), "{err}");
        }
    }
}
