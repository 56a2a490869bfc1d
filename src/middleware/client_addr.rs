//! The client's address, as throttling keys on it: the connection's peer, or, when the peer is
//! a trusted reverse proxy (`TOLLGATE_TRUSTED_PROXIES`), the right-most `X-Forwarded-For` hop
//! that is not itself a trusted proxy. Hops to the left of that one were written by the client
//! and are never believed; without trusted proxies the header is ignored altogether.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use tollgate_core::config::AccountSettings;

use crate::state::AppState;

/// The address a request comes from (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // Every listener is served with connect info; a request without it comes from no network.
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
        Ok(ClientAddr(client_addr(peer, &parts.headers, &state.config.accounts)))
    }
}

/// The client's address from the peer's and the forwarding headers.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, settings: &AccountSettings) -> IpAddr {
    let peer = peer.to_canonical();
    if !settings.is_trusted_proxy(peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.into_iter().rev() {
        match parse_hop(hop) {
            Some(ip) if settings.is_trusted_proxy(ip) => continue,
            Some(ip) => return ip,
            // What our own proxy appended is unreadable: count it as the proxy's.
            None => return peer,
        }
    }
    peer
}

/// One hop of `X-Forwarded-For`: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let ip = hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn settings(trusted: &[&str]) -> AccountSettings {
        AccountSettings { trusted_proxies: trusted.iter().map(|t| t.parse().unwrap()).collect(), ..Default::default() }
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", v.parse().unwrap());
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_header_is_ignored_unless_the_peer_is_a_trusted_proxy() {
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(client_addr(ip("198.51.100.1"), &headers, &settings(&[])), ip("198.51.100.1"));
        assert_eq!(client_addr(ip("198.51.100.1"), &headers, &settings(&["10.0.0.0/8"])), ip("198.51.100.1"));
        assert_eq!(client_addr(ip("10.0.0.2"), &headers, &settings(&["10.0.0.0/8"])), ip("203.0.113.9"));
    }

    #[test]
    fn the_right_most_untrusted_hop_wins_over_what_the_client_wrote() {
        let trusted = settings(&["10.0.0.0/8", "127.0.0.1/32"]);
        // The client wrote "1.1.1.1"; the outer proxy appended the real address; an inner
        // proxy (10.0.0.7) appended the outer one's.
        let headers = forwarded(&["1.1.1.1, 203.0.113.9", "10.0.0.7"]);
        assert_eq!(client_addr(ip("127.0.0.1"), &headers, &trusted), ip("203.0.113.9"));
        assert_eq!(
            client_addr(ip("::ffff:127.0.0.1"), &forwarded(&["[2001:db8::1]:443"]), &trusted),
            ip("2001:db8::1")
        );
        // Garbage where our proxy writes, or no header: the proxy's own address.
        assert_eq!(client_addr(ip("127.0.0.1"), &forwarded(&["1.1.1.1, nonsense"]), &trusted), ip("127.0.0.1"));
        assert_eq!(client_addr(ip("127.0.0.1"), &HeaderMap::new(), &trusted), ip("127.0.0.1"));
    }
}
