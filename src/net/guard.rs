//! The address guard: outbound HTTP that a room's members can steer (a model following a
//! pasted link) reaches only the public internet.
//!
//! Without it anyone in the room could make us fetch `http://169.254.169.254/` or an
//! admin port on localhost and read the answer back. Every address a host name resolves
//! to is checked in the resolver the HTTP client connects with ([`guard_client`]), so
//! the address checked is the address connected (no DNS-rebinding window); redirects are
//! not followed by the client: the caller follows them by hand through
//! [`AddressGuard::redirect_target`], so each hop is checked before it is requested.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Which addresses outbound requests may connect to.
#[derive(Debug, Clone)]
pub enum AddressGuard {
    /// Public internet addresses only (production).
    PublicOnly,
    /// Any address (tests with a local stub).
    #[cfg(test)]
    Any,
    /// Public addresses and these (tests: a stub on 127.0.0.1 that redirects elsewhere).
    #[cfg(test)]
    PublicAnd(Vec<IpAddr>),
}

/// A host or address the guard will not connect to.
#[derive(Debug, thiserror::Error)]
#[error("{target} is not a public address ({class})")]
pub struct Refused {
    /// `10.0.0.1`, or `intranet.example (10.0.0.1)` for a host name.
    pub target: String,
    /// What kind of address it is: `loopback`, `private`, `link-local`, …
    pub class: &'static str,
}

/// Why a URL may not be requested (URLs as text: a `Url` is large, and these only end up
/// in messages).
#[derive(Debug, thiserror::Error)]
pub enum Blocked {
    #[error("refused to fetch {0}: only http:// and https:// URLs can be fetched")]
    Scheme(String),
    #[error("{0} has no host to fetch from")]
    NoHost(String),
    #[error("refused to fetch {url}: {refused}")]
    Address { url: String, refused: Refused },
    #[error("{from} redirected to {location:?}, which is not a valid URL: {error}")]
    InvalidRedirect {
        from: String,
        location: String,
        error: url::ParseError,
    },
    #[error("{from} redirected to {next}: {blocked}")]
    Redirect {
        from: String,
        next: String,
        blocked: Box<Blocked>,
    },
}

impl Blocked {
    /// The refused address, when that is why (rather than the scheme or a malformed URL).
    pub fn refused(&self) -> Option<&Refused> {
        match self {
            Self::Address { refused, .. } => Some(refused),
            Self::Redirect { blocked, .. } => blocked.refused(),
            _ => None,
        }
    }
}

impl AddressGuard {
    fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        match self {
            #[cfg(test)]
            Self::Any => Ok(()),
            #[cfg(test)]
            Self::PublicAnd(allowed) if allowed.contains(&ip) => Ok(()),
            _ => non_public(ip).map_or(Ok(()), Err),
        }
    }

    /// Checks what can be checked before connecting: the scheme, and the address when the
    /// host is an IP literal (the client connects to those without resolving them).
    /// Host names are checked by the resolver of [`guard_client`] as they are resolved.
    pub fn check_url(&self, url: &Url) -> Result<(), Blocked> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Blocked::Scheme(url.to_string()));
        }
        let ip = match url.host() {
            None => return Err(Blocked::NoHost(url.to_string())),
            Some(Host::Domain(_)) => return Ok(()),
            Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
        };
        self.check(ip).map_err(|class| Blocked::Address {
            url: url.to_string(),
            refused: Refused {
                target: ip.to_string(),
                class,
            },
        })
    }

    /// Where a redirect from `from` to `location` leads, if that may be fetched.
    pub fn redirect_target(&self, from: &Url, location: &str) -> Result<Url, Blocked> {
        let next = from
            .join(location)
            .map_err(|error| Blocked::InvalidRedirect {
                from: from.to_string(),
                location: location.to_owned(),
                error,
            })?;
        self.check_url(&next).map_err(|blocked| Blocked::Redirect {
            from: from.to_string(),
            next: next.to_string(),
            blocked: Box::new(blocked),
        })?;
        Ok(next)
    }

    /// Checks every address `host` resolved to: one non-public address refuses the host,
    /// since the client may connect to any of them.
    fn check_resolved(&self, host: &str, addrs: &[SocketAddr]) -> Result<(), Refused> {
        for addr in addrs {
            self.check(addr.ip()).map_err(|class| Refused {
                target: format!("{host} ({})", addr.ip()),
                class,
            })?;
        }
        Ok(())
    }
}

/// A client builder that connects only where `guard` allows: no proxy (a proxy would
/// resolve and connect on our behalf, past the guard), every resolved address checked,
/// and no redirects followed (the caller checks each hop with
/// [`AddressGuard::redirect_target`]).
pub fn guard_client(guard: &AddressGuard) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver(guard.clone())))
        .redirect(reqwest::redirect::Policy::none())
}

/// The refusal inside a failed request's causes, if the guard's resolver refused its host.
pub fn refusal_in<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e Refused> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        source = e.source();
    }
    None
}

/// The resolver a guarded client connects through: the system resolver, then the guard
/// on every address, so only checked addresses ever reach the connector.
struct GuardedResolver(AddressGuard);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            guard.check_resolved(&host, &addrs)?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Why `ip` is not a public internet address, or None when it is.
fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => non_public_v4(ip),
        IpAddr::V6(ip) => non_public_v6(ip),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, ..) => "unspecified, 0.0.0.0/8",
        (127, ..) => "loopback",
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => "private",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "shared carrier-grade NAT, 100.64.0.0/10",
        (192, 0, 0) => "IETF protocol assignments, 192.0.0.0/24",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, ..) => "multicast",
        (255, 255, 255) if ip.is_broadcast() => "broadcast",
        (240..=255, ..) => "reserved",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    // Addresses that carry an IPv4 address reach that address: judge it instead.
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        non_public_v4(Ipv4Addr::new(a, b, c, d))
    };
    Some(match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => "unspecified",
        [0, 0, 0, 0, 0, 0, 0, 1] => "loopback",
        // IPv4-mapped, ::ffff:0:0/96.
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => return embedded(hi, lo),
        // NAT64 well-known prefix, 64:ff9b::/96.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => return embedded(hi, lo),
        [0x64, 0xff9b, 1, ..] => "NAT64 local use",
        // 6to4, 2002::/16.
        [0x2002, hi, lo, ..] => return embedded(hi, lo),
        [0x2001, 0xdb8, ..] => "documentation",
        [0x2001, 0, ..] => "Teredo",
        [0x2001, 0..=0x1ff, ..] => "IETF protocol assignments, 2001::/23",
        [0x3fff, 0..=0x0fff, ..] => "documentation",
        [x, ..] if x & 0xfe00 == 0xfc00 => "unique-local",
        [x, ..] if x & 0xffc0 == 0xfe80 => "link-local",
        [x, ..] if x & 0xff00 == 0xff00 => "multicast",
        // Global unicast is 2000::/3; everything else is reserved or special-purpose
        // (IPv4-compatible ::/96, discard-only 100::/64, site-local fec0::/10, …).
        [x, ..] if x & 0xe000 != 0x2000 => "reserved",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_refused_if_any_of_its_addresses_is_not_public() {
        let guard = AddressGuard::PublicOnly;
        let public: SocketAddr = "93.184.215.14:0".parse().unwrap();
        let private: SocketAddr = "10.1.2.3:0".parse().unwrap();
        assert!(guard.check_resolved("example.org", &[public]).is_ok());
        let refused = guard
            .check_resolved("rebind.example", &[public, private])
            .unwrap_err();
        assert_eq!(refused.target, "rebind.example (10.1.2.3)");
        assert_eq!(refused.class, "private");
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "93.184.215.14",
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(non_public(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn each_redirect_hop_is_checked() {
        let guard = AddressGuard::PublicOnly;
        let from = Url::parse("https://example.org/a/b").unwrap();
        assert_eq!(
            guard.redirect_target(&from, "../c?d=1").unwrap().as_str(),
            "https://example.org/c?d=1"
        );
        assert_eq!(
            guard
                .redirect_target(&from, "//other.example/")
                .unwrap()
                .as_str(),
            "https://other.example/"
        );
        for (location, class) in [
            (
                "http://169.254.169.254/latest/meta-data",
                Some("link-local"),
            ),
            ("http://[::1]:8080/", Some("loopback")),
            ("file:///etc/passwd", None),
            ("http://10.0.0.1/", Some("private")),
        ] {
            let blocked = guard.redirect_target(&from, location).unwrap_err();
            let problem = blocked.to_string();
            assert!(
                problem.contains("refused to fetch"),
                "{location}: {problem}"
            );
            assert_eq!(blocked.refused().map(|r| r.class), class, "{location}");
        }
    }
}
