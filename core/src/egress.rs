//! The egress policy: where Tollgate may send a request whose destination a tenant chose
//! (provider base URLs, alert webhooks, and anything later). Only public unicast addresses,
//! unless the operator allows a host or a network (`TOLLGATE_EGRESS_ALLOW`); the address
//! checked is the address connected to; redirects are never followed; and a provider's base
//! URL can only name where calls go, never steer their path.
//!
//! Every such request goes through an [`Egress`]: one pooled client whose resolver drops the
//! addresses the policy refuses (so the answer checked is the answer connected to, with no
//! second lookup), whose requests to IP literals (which no resolver sees) are checked before
//! they are built, which follows no redirects and ignores proxy environment variables.

use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The setting an operator uses to allow private destinations, named in refusals.
pub const ALLOW_SETTING: &str = "TOLLGATE_EGRESS_ALLOW";

// ---------------------------------------------------------------------------------------
// Which addresses are public

/// An IPv4 range: its first address, prefix length, and what it is.
struct Range4(u32, u8, &'static str);
/// An IPv6 range: its first address, prefix length, and what it is.
struct Range6(u128, u8, &'static str);

const fn v4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

const fn v6(segments: [u16; 8]) -> u128 {
    let mut n = 0u128;
    let mut i = 0;
    while i < 8 {
        n = (n << 16) | segments[i] as u128;
        i += 1;
    }
    n
}

/// Every IPv4 range that is not public unicast: the IANA IPv4 Special-Purpose Address
/// Registry (<https://www.iana.org/assignments/iana-ipv4-special-registry/>, RFC 6890 and its
/// updates), every entry of it refused whether or not it is marked globally reachable (no
/// provider or webhook receiver lives there), plus multicast (224.0.0.0/4, the IPv4 Multicast
/// Address Space Registry, <https://www.iana.org/assignments/multicast-addresses/>). Cloud
/// metadata services sit inside these (169.254.169.254, 100.100.100.200, 192.0.0.192). The
/// first match names the address, so narrower ranges come first.
const SPECIAL_V4: &[Range4] = &[
    Range4(v4(0, 0, 0, 0), 8, "\"this network\", 0.0.0.0/8"),
    Range4(v4(10, 0, 0, 0), 8, "private-use, 10.0.0.0/8"),
    Range4(v4(100, 64, 0, 0), 10, "shared address space, carrier-grade NAT, 100.64.0.0/10"),
    Range4(v4(127, 0, 0, 0), 8, "loopback, 127.0.0.0/8"),
    Range4(v4(169, 254, 0, 0), 16, "link-local, cloud metadata, 169.254.0.0/16"),
    Range4(v4(172, 16, 0, 0), 12, "private-use, 172.16.0.0/12"),
    Range4(v4(192, 0, 0, 0), 24, "IETF protocol assignments, 192.0.0.0/24"),
    Range4(v4(192, 0, 2, 0), 24, "documentation, TEST-NET-1, 192.0.2.0/24"),
    Range4(v4(192, 31, 196, 0), 24, "AS112, 192.31.196.0/24"),
    Range4(v4(192, 52, 193, 0), 24, "AMT, 192.52.193.0/24"),
    Range4(v4(192, 88, 99, 0), 24, "6to4 relay anycast, deprecated, 192.88.99.0/24"),
    Range4(v4(192, 168, 0, 0), 16, "private-use, 192.168.0.0/16"),
    Range4(v4(192, 175, 48, 0), 24, "AS112 direct delegation, 192.175.48.0/24"),
    Range4(v4(198, 18, 0, 0), 15, "benchmarking, 198.18.0.0/15"),
    Range4(v4(198, 51, 100, 0), 24, "documentation, TEST-NET-2, 198.51.100.0/24"),
    Range4(v4(203, 0, 113, 0), 24, "documentation, TEST-NET-3, 203.0.113.0/24"),
    Range4(v4(224, 0, 0, 0), 4, "multicast, 224.0.0.0/4"),
    Range4(v4(255, 255, 255, 255), 32, "limited broadcast, 255.255.255.255"),
    Range4(v4(240, 0, 0, 0), 4, "reserved, 240.0.0.0/4"),
];

/// Every IPv6 range that is not public unicast: the IANA IPv6 Special-Purpose Address
/// Registry (<https://www.iana.org/assignments/iana-ipv6-special-registry/>), every entry
/// refused, plus the deprecated IPv4-compatible (::/96, RFC 4291 §2.5.5.1) and site-local
/// (fec0::/10, RFC 3879) ranges, and multicast (ff00::/8). Anything outside global unicast
/// (2000::/3, the IANA IPv6 Address Space registry,
/// <https://www.iana.org/assignments/ipv6-address-space/>) is refused too. The forms that
/// embed an IPv4 address — IPv4-mapped (::ffff:0:0/96), NAT64's well-known prefix
/// (64:ff9b::/96, RFC 6052) and 6to4 (2002::/16, RFC 3056) — are judged by that address,
/// before this list (see [`special_purpose`]).
const SPECIAL_V6: &[Range6] = &[
    Range6(0, 128, "unspecified, ::"),
    Range6(1, 128, "loopback, ::1"),
    Range6(0, 96, "IPv4-compatible, deprecated, ::/96"),
    Range6(v6([0, 0, 0, 0, 0xffff, 0, 0, 0]), 96, "IPv4-translated, ::ffff:0:0:0/96"),
    Range6(v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]), 48, "local-use IPv4/IPv6 translation, 64:ff9b:1::/48"),
    Range6(v6([0x100, 0, 0, 0, 0, 0, 0, 0]), 64, "discard-only, 100::/64"),
    Range6(v6([0x100, 0, 0, 1, 0, 0, 0, 0]), 64, "dummy prefix, 100:0:0:1::/64"),
    Range6(v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 32, "Teredo, 2001::/32"),
    Range6(v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 23, "IETF protocol assignments, 2001::/23"),
    Range6(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]), 32, "documentation, 2001:db8::/32"),
    Range6(v6([0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0]), 48, "AS112 direct delegation, 2620:4f:8000::/48"),
    Range6(v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]), 20, "documentation, 3fff::/20"),
    Range6(v6([0x5f00, 0, 0, 0, 0, 0, 0, 0]), 16, "segment routing SIDs, 5f00::/16"),
    Range6(v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]), 7, "unique local, fc00::/7"),
    Range6(v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, "link-local, fe80::/10"),
    Range6(v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]), 10, "site-local, deprecated, fec0::/10"),
    Range6(v6([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, "multicast, ff00::/8"),
];

const GLOBAL_UNICAST: Range6 = Range6(v6([0x2000, 0, 0, 0, 0, 0, 0, 0]), 3, "");

fn in_v4(ip: u32, range: &Range4) -> bool {
    let shift = 32 - u32::from(range.1);
    ip.checked_shr(shift).unwrap_or(0) == range.0.checked_shr(shift).unwrap_or(0)
}

fn in_v6(ip: u128, range: &Range6) -> bool {
    let shift = 128 - u32::from(range.1);
    ip.checked_shr(shift).unwrap_or(0) == range.0.checked_shr(shift).unwrap_or(0)
}

/// What kind of non-public address `ip` is, or `None` if it is public unicast. An IPv6
/// address that embeds an IPv4 one (mapped, NAT64, 6to4) is what that IPv4 address is.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => special_v4(ip),
        IpAddr::V6(ip) => special_v6(ip),
    }
}

/// Whether `ip` is a public unicast address (see [`special_purpose`]).
pub fn is_public(ip: IpAddr) -> bool {
    special_purpose(ip).is_none()
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let n = u32::from(ip);
    SPECIAL_V4.iter().find(|r| in_v4(n, r)).map(|r| r.2)
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let n = u128::from(ip);
    let s = ip.segments();
    if let Some(embedded) = ip.to_ipv4_mapped() {
        return special_v4(embedded);
    }
    // NAT64 with the well-known prefix: the IPv4 address is the last 32 bits.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return special_v4(Ipv4Addr::from(n as u32));
    }
    // 6to4: the IPv4 address is bits 16..48.
    if s[0] == 0x2002 {
        return special_v4(Ipv4Addr::from((u32::from(s[1]) << 16) | u32::from(s[2])));
    }
    if let Some(range) = SPECIAL_V6.iter().find(|r| in_v6(n, r)) {
        return Some(range.2);
    }
    (!in_v6(n, &GLOBAL_UNICAST)).then_some("reserved by IANA, not global unicast")
}

// ---------------------------------------------------------------------------------------
// The operator's allowance

/// The destinations the operator allows beyond public addresses (`TOLLGATE_EGRESS_ALLOW`):
/// networks (`10.0.0.0/8`, `::1`) and host names (`models.internal`, `*.corp.example` for
/// its subdomains). A host name allowed may resolve to any address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressAllow {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
    suffixes: Vec<String>,
}

impl EgressAllow {
    /// Parses a list separated by commas or spaces; an error names the entry at fault.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut allow = EgressAllow::default();
        for entry in text.split([',', ' ', '\n', '\t']).map(str::trim).filter(|e| !e.is_empty()) {
            let bare = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')).unwrap_or(entry);
            if let Ok(net) = bare.parse::<IpNet>() {
                allow.nets.push(net.trunc());
            } else if let Ok(ip) = bare.parse::<IpAddr>() {
                allow.nets.push(IpNet::from(ip));
            } else {
                let name = entry.trim_end_matches('.').to_ascii_lowercase();
                let (wildcard, name) = match name.strip_prefix("*.") {
                    Some(rest) => (true, rest.to_owned()),
                    None => (false, name),
                };
                let valid = !name.is_empty()
                    && name.len() <= 253
                    && name.split('.').all(|label| {
                        !label.is_empty()
                            && label.len() <= 63
                            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    });
                if !valid {
                    return Err(format!(
                        "{entry:?} is neither a network (10.0.0.0/8, fd00::/8, 192.168.1.20) nor a host name \
                         (models.internal, *.corp.example)"
                    ));
                }
                if wildcard { allow.suffixes.push(format!(".{name}")) } else { allow.hosts.push(name) }
            }
        }
        Ok(allow)
    }

    /// This allowance plus every address (the deprecated `TOLLGATE_WEBHOOKS_ALLOW_PRIVATE`).
    pub fn with_every_address(mut self) -> Self {
        self.nets.extend(["0.0.0.0/0", "::/0"].iter().filter_map(|n| n.parse::<IpNet>().ok()));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.hosts.is_empty() && self.suffixes.is_empty()
    }

    fn permits_address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    fn permits_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host) || self.suffixes.iter().any(|s| host.ends_with(s.as_str()))
    }
}

impl fmt::Display for EgressAllow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nets = self.nets.iter().map(ToString::to_string);
        let hosts = self.hosts.iter().cloned();
        let suffixes = self.suffixes.iter().map(|s| format!("*{s}"));
        let all: Vec<String> = nets.chain(hosts).chain(suffixes).collect();
        write!(f, "{}", all.join(","))
    }
}

/// Which destinations may be called: public addresses, and what the operator allows.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow: EgressAllow,
}

impl EgressPolicy {
    pub fn new(allow: EgressAllow) -> Self {
        Self { allow }
    }

    /// Whether `ip`, reached under the name `host` (none for an IP literal), may be called.
    pub fn permits(&self, host: Option<&str>, ip: IpAddr) -> bool {
        is_public(ip) || self.allow.permits_address(ip) || host.is_some_and(|h| self.allow.permits_host(h))
    }

    /// Refuses a URL whose host is an IP literal the policy does not permit (a name is
    /// checked by the resolver, with each address it resolves to).
    pub fn check_literal(&self, url: &Url) -> Result<(), Refused> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Domain(_)) => return Ok(()),
            None => return Err(Refused { host: String::new(), kind: RefusedKind::NoHost }),
        };
        if self.permits(None, ip) {
            return Ok(());
        }
        let kind = RefusedKind::Address(special_purpose(ip).unwrap_or("not public"));
        Err(Refused { host: url.host_str().unwrap_or_default().to_owned(), kind })
    }

    /// The addresses of `found` the policy permits for `host`; refused if it resolved to
    /// some and none is permitted.
    fn filter(&self, host: &str, found: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refused> {
        let total = found.len();
        let permitted: Vec<SocketAddr> = found.into_iter().filter(|a| self.permits(Some(host), a.ip())).collect();
        if permitted.is_empty() && total > 0 {
            return Err(Refused { host: host.to_owned(), kind: RefusedKind::Resolved });
        }
        Ok(permitted)
    }
}

/// A destination the policy refused. Its `Display` is the message for the tenant: it names
/// the host they gave (and, for an IP literal, what range it is in), never the addresses a
/// name resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    host: String,
    kind: RefusedKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RefusedKind {
    /// An IP literal in this range.
    Address(&'static str),
    /// A name that resolved only to refused addresses.
    Resolved,
    NoHost,
}

impl Refused {
    /// The refusal somewhere in `error`'s chain of sources (a request refused by the resolver
    /// fails with a connection error that carries it).
    pub fn find<'e>(error: &'e (dyn StdError + 'static)) -> Option<&'e Refused> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(refused) = e.downcast_ref::<Refused>() {
                return Some(refused);
            }
            current = e.source();
        }
        None
    }

    pub fn host(&self) -> &str {
        &self.host
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = &self.host;
        match &self.kind {
            RefusedKind::Address(range) => write!(f, "The destination {host} is on a private network ({range})")?,
            RefusedKind::Resolved => write!(
                f,
                "The destination {host} is on a private network (it resolves only to private, local or reserved addresses)"
            )?,
            RefusedKind::NoHost => return write!(f, "The destination URL names no host."),
        }
        write!(
            f,
            ": Tollgate calls only public addresses, unless the operator of this Tollgate allows the destination \
             ({ALLOW_SETTING})."
        )
    }
}

impl StdError for Refused {}

// ---------------------------------------------------------------------------------------
// The client

/// Resolves names with the system resolver and keeps only the addresses the policy permits.
struct CheckedResolver {
    policy: Arc<EgressPolicy>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the connector puts the URL's port on each address.
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted = policy.filter(&host, found)?;
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// The one way to send a request to a tenant-chosen destination: a pooled client (clone it
/// freely) that enforces an [`EgressPolicy`].
#[derive(Clone)]
pub struct Egress {
    policy: Arc<EgressPolicy>,
    client: reqwest::Client,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress").field("policy", &self.policy).finish()
    }
}

impl Egress {
    /// A client enforcing `policy`, with the timeouts and pool settings `configure` sets. It
    /// follows no redirects and ignores proxy settings (a proxy would resolve names itself).
    /// A rustls crypto provider must be installed first.
    pub fn new(
        policy: EgressPolicy,
        configure: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
    ) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        let builder = configure(reqwest::Client::builder())
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(CheckedResolver { policy: policy.clone() });
        Ok(Self { policy, client: builder.build()? })
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// A POST to `url`, refused now if its host is an IP literal the policy does not permit
    /// (a name is checked when it is resolved: the request then fails with an error that
    /// carries the [`Refused`]; see [`Refused::find`]).
    pub fn post(&self, url: Url) -> Result<reqwest::RequestBuilder, Refused> {
        self.policy.check_literal(&url)?;
        Ok(self.client.post(url))
    }

    /// A GET of `url`, checked as [`Egress::post`] checks a POST (for testing a provider
    /// connection with a models call).
    pub fn get(&self, url: Url) -> Result<reqwest::RequestBuilder, Refused> {
        self.policy.check_literal(&url)?;
        Ok(self.client.get(url))
    }

    /// Checks `url` as a request to it would be checked, resolving its host now: for telling
    /// a tenant at once when they save a destination. A name that does not resolve passes
    /// (it may later); every request is checked again when it is sent.
    pub async fn vet(&self, url: &Url) -> Result<(), Refused> {
        self.policy.check_literal(url)?;
        if let Some(url::Host::Domain(host)) = url.host() {
            let port = url.port_or_known_default().unwrap_or(443);
            if let Ok(found) = tokio::net::lookup_host((host, port)).await {
                self.policy.filter(host, found.collect())?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Provider base URLs

/// Why a provider base URL is refused (the reason reads after "Base URL: ").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseUrlError {
    #[error("must be a URL of at most 2000 characters, without spaces, control characters or backslashes")]
    Malformed,
    #[error("is not a valid URL: {0}")]
    Invalid(String),
    #[error("must start with http:// or https://")]
    Scheme,
    #[error("must not contain a user name or password (put the credential in the API key)")]
    Userinfo,
    #[error("must not contain a query string (?…): Tollgate adds each API's own path to the base URL")]
    Query,
    #[error("must not contain a fragment (#…): Tollgate adds each API's own path to the base URL")]
    Fragment,
    #[error("must not contain . or .. path segments")]
    DotSegment,
}

/// A provider base URL as it may be saved and called: http(s), with a host, and nothing that
/// could take the path out of Tollgate's hands (user info, query, fragment, dot segments,
/// backslashes). Used when a connection is saved and again on every call, so a URL stored
/// before these rules fails closed.
pub fn check_base_url(text: &str) -> Result<Url, BaseUrlError> {
    if text.len() > 2000 || text.chars().any(|c| c.is_control() || c.is_whitespace() || c == '\\') {
        return Err(BaseUrlError::Malformed);
    }
    let url = Url::parse(text).map_err(|e| BaseUrlError::Invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(BaseUrlError::Scheme);
    }
    if url.host().is_none() {
        return Err(BaseUrlError::Invalid("it names no host".to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(BaseUrlError::Userinfo);
    }
    if url.query().is_some() {
        return Err(BaseUrlError::Query);
    }
    if url.fragment().is_some() {
        return Err(BaseUrlError::Fragment);
    }
    // The parser removes dot segments, so look at the text: after the scheme and authority.
    let after_scheme = text.split_once("://").map_or("", |(_, rest)| rest);
    let raw_path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
    let dot = |segment: &str| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    };
    if raw_path.split('/').any(dot) {
        return Err(BaseUrlError::DotSegment);
    }
    Ok(url)
}

/// The URL of `path` (`chat/completions`, `v1/messages`) under a provider's base URL: the
/// base URL's path followed by `path`, checked by [`check_base_url`] first.
pub fn provider_endpoint(base_url: &str, path: &str) -> Result<Url, BaseUrlError> {
    let mut url = check_base_url(base_url)?;
    url.path_segments_mut().map_err(|()| BaseUrlError::Scheme)?.pop_if_empty().extend(path.split('/'));
    Ok(url)
}

/// A destination URL as people may see it: without user name, password or query values.
pub fn display_url(text: &str) -> String {
    match Url::parse(text) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            let had_query = url.query().is_some();
            url.set_query(None);
            url.set_fragment(None);
            let shown = url.to_string();
            let mut shown = if text.ends_with('/') { shown } else { shown.trim_end_matches('/').to_owned() };
            if had_query {
                shown.push_str("?…");
            }
            shown
        }
        // Not a URL: at least nothing before an `@` in what looks like its authority.
        Err(_) => {
            let (scheme, rest) = text.split_once("://").unwrap_or(("", text));
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let host = rest[..end].rsplit_once('@').map_or(&rest[..end], |(_, host)| host);
            let path = rest[end..].split(['?', '#']).next().unwrap_or_default();
            if scheme.is_empty() { format!("{host}{path}") } else { format!("{scheme}://{host}{path}") }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn every_ipv4_special_purpose_range_is_refused() {
        // The first and last address of every range, and an address inside.
        for text in [
            "0.0.0.0",
            "0.255.255.255",
            "0.1.2.3",
            "10.0.0.0",
            "10.255.255.255",
            "100.64.0.0",
            "100.127.255.255",
            "100.100.100.200", // Alibaba Cloud metadata
            "127.0.0.1",
            "127.255.255.255",
            "169.254.0.0",
            "169.254.169.254", // cloud metadata
            "169.254.255.255",
            "172.16.0.0",
            "172.31.255.255",
            "192.0.0.0",
            "192.0.0.8",
            "192.0.0.170",
            "192.0.0.192", // Oracle Cloud metadata
            "192.0.0.255",
            "192.0.2.1",
            "192.31.196.1",
            "192.52.193.1",
            "192.88.99.1",
            "192.168.0.0",
            "192.168.255.255",
            "192.175.48.1",
            "198.18.0.0",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.255",
            "240.0.0.1",
            "250.1.2.3",
            "255.255.255.254",
            "255.255.255.255",
        ] {
            assert!(!is_public(ip(text)), "{text} must be refused");
        }
    }

    #[test]
    fn public_ipv4_next_to_the_ranges_passes() {
        for text in [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.0.3.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
        ] {
            assert!(is_public(ip(text)), "{text} is public");
        }
    }

    #[test]
    fn every_ipv6_special_purpose_range_is_refused() {
        for text in [
            "::",
            "::1",
            "::127.0.0.1",      // IPv4-compatible
            "::8.8.8.8",        // IPv4-compatible: the whole range, whatever it embeds
            "::ffff:0:8.8.8.8", // IPv4-translated
            "64:ff9b:1::1",
            "64:ff9b:1:ffff::8.8.8.8",
            "100::1",
            "100::ffff:ffff:ffff:ffff",
            "100:0:0:1::1",
            "2001::1",                              // Teredo
            "2001:0:4136:e378:8000:63bf:3fff:fdd2", // Teredo
            "2001:1::1",
            "2001:2::1",
            "2001:10::1",
            "2001:1ff:ffff::1",
            "2001:db8::1",
            "2001:db8:ffff:ffff::1",
            "2620:4f:8000::1",
            "3fff::1",
            "3fff:fff::1",
            "5f00::1",
            "fc00::1",
            "fd00:ec2::254", // AWS metadata over IPv6
            "fdff:ffff::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "feff::1",
            "ff02::1",
            "ffff::1",
            "4000::1", // outside global unicast
            "1000::1",
            "8000::1",
        ] {
            assert!(!is_public(ip(text)), "{text} must be refused");
        }
    }

    #[test]
    fn ipv6_forms_embedding_ipv4_are_judged_by_it() {
        for text in [
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.1.2.3",
            "64:ff9b::169.254.169.254",
            "64:ff9b::198.18.0.1",
            "2002:7f00:1::1",    // 6to4 of 127.0.0.1
            "2002:a00:1::1",     // 6to4 of 10.0.0.1
            "2002:a9fe:a9fe::1", // 6to4 of 169.254.169.254
            "2002:f000:1::1",    // 6to4 of 240.0.0.1
        ] {
            assert!(!is_public(ip(text)), "{text} must be refused");
        }
        for text in ["::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1"] {
            assert!(is_public(ip(text)), "{text} embeds a public address");
        }
        assert_eq!(special_purpose(ip("64:ff9b::127.0.0.1")), Some("loopback, 127.0.0.0/8"));
    }

    #[test]
    fn public_ipv6_passes() {
        for text in ["2606:4700::1111", "2a00:1450:4001::1", "2001:200::1", "2001:4860:4860::8888", "3ffe::1"] {
            assert!(is_public(ip(text)), "{text} is public");
        }
    }

    #[test]
    fn the_operator_allows_networks_and_host_names() {
        let allow = EgressAllow::parse("10.0.0.0/8, [::1] models.internal,*.corp.example,192.168.1.20").unwrap();
        let policy = EgressPolicy::new(allow.clone());
        assert!(policy.permits(None, ip("10.2.3.4")));
        assert!(policy.permits(None, ip("::ffff:10.2.3.4")), "a mapped address is its IPv4 address");
        assert!(policy.permits(None, ip("::1")));
        assert!(policy.permits(None, ip("192.168.1.20")));
        assert!(!policy.permits(None, ip("192.168.1.21")));
        assert!(!policy.permits(None, ip("127.0.0.1")));
        assert!(policy.permits(Some("models.internal"), ip("172.16.0.5")));
        assert!(policy.permits(Some("MODELS.internal."), ip("172.16.0.5")));
        assert!(policy.permits(Some("gpu.corp.example"), ip("172.16.0.5")));
        assert!(!policy.permits(Some("corp.example.evil"), ip("172.16.0.5")));
        assert!(!policy.permits(Some("other.internal"), ip("172.16.0.5")));
        assert!(policy.permits(Some("other.internal"), ip("8.8.8.8")));
        assert_eq!(allow.to_string(), "10.0.0.0/8,::1/128,192.168.1.20/32,models.internal,*.corp.example");
        assert!(EgressAllow::parse("10.0.0.0/33").is_err());
        assert!(EgressAllow::parse("http://x").is_err());
        assert!(EgressAllow::parse("").unwrap().is_empty());
        let every = EgressAllow::default().with_every_address();
        assert!(EgressPolicy::new(every).permits(None, ip("127.0.0.1")));
    }

    #[test]
    fn ip_literals_are_checked_before_any_request() {
        let policy = EgressPolicy::default();
        for url in [
            "http://127.0.0.1:8080/v1",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://2130706433/", // 127.0.0.1 as one number
            "http://0x7f.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[64:ff9b::a9fe:a9fe]/",
        ] {
            let refused = policy.check_literal(&Url::parse(url).unwrap()).unwrap_err();
            let message = refused.to_string();
            assert!(message.contains("private network") && message.contains(ALLOW_SETTING), "{url}: {message}");
        }
        assert!(policy.check_literal(&Url::parse("https://8.8.8.8/").unwrap()).is_ok());
        assert!(policy.check_literal(&Url::parse("http://localhost/").unwrap()).is_ok(), "names go to the resolver");
    }

    #[test]
    fn resolved_addresses_are_filtered_and_never_named() {
        let policy = EgressPolicy::default();
        let found = vec!["127.0.0.1:0".parse().unwrap(), "8.8.8.8:0".parse().unwrap()];
        assert_eq!(policy.filter("mixed.example", found).unwrap(), vec!["8.8.8.8:0".parse().unwrap()]);
        let refused = policy.filter("db.example", vec!["10.0.0.7:0".parse().unwrap()]).unwrap_err();
        assert!(!refused.to_string().contains("10.0.0.7"), "{refused}");
        assert!(refused.to_string().contains("db.example is on a private network"), "{refused}");
    }

    #[test]
    fn base_urls_cannot_steer_the_path() {
        for (url, error) in [
            ("https://api.example.com/v1?x=", BaseUrlError::Query),
            ("https://api.example.com/v1?", BaseUrlError::Query),
            ("https://api.example.com/v1#", BaseUrlError::Fragment),
            ("https://api.example.com/v1#x", BaseUrlError::Fragment),
            ("https://user:pw@api.example.com/v1", BaseUrlError::Userinfo),
            ("https://user@api.example.com/v1", BaseUrlError::Userinfo),
            ("https://api.example.com/v1/..", BaseUrlError::DotSegment),
            ("https://api.example.com/v1/%2e%2E/admin", BaseUrlError::DotSegment),
            ("https://api.example.com/./v1", BaseUrlError::DotSegment),
            ("https://api.example.com\\@evil/v1", BaseUrlError::Malformed),
            ("https://api.example.com/v1\n", BaseUrlError::Malformed),
            ("ftp://api.example.com/v1", BaseUrlError::Scheme),
            ("file:///etc/passwd", BaseUrlError::Scheme),
        ] {
            let got = check_base_url(url).err();
            let same = got.as_ref().is_some_and(|g| std::mem::discriminant(g) == std::mem::discriminant(&error));
            assert!(same, "{url}: {got:?}, expected {error:?}");
        }
        assert_eq!(
            provider_endpoint("https://api.openai.com/v1", "chat/completions").unwrap().as_str(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            provider_endpoint("https://api.anthropic.com", "v1/messages").unwrap().as_str(),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(
            provider_endpoint("http://127.0.0.1:9/v1/", "embeddings").unwrap().as_str(),
            "http://127.0.0.1:9/v1/embeddings"
        );
        assert!(provider_endpoint("https://api.example.com/v1?x=", "chat/completions").is_err());
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(display_url("https://user:hunter2@api.example.com/v1"), "https://api.example.com/v1");
        assert_eq!(display_url("https://api.example.com/v1?key=hunter2"), "https://api.example.com/v1?…");
        assert_eq!(display_url("https://api.example.com/v1"), "https://api.example.com/v1");
        assert_eq!(display_url("https://api.anthropic.com"), "https://api.anthropic.com");
        assert!(!display_url("http://us er:hunter2@host/x").contains("hunter2"));
    }
}
