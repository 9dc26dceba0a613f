//! Where tailor may connect on behalf of a tenant: the egress policy.
//!
//! Image sources, token realms, blob and manifest redirects and completion callbacks are chosen
//! by tenants or by upstream registries, so each of them is checked here before a connection is
//! made. By default tailor refuses
//!
//! - loopback, link-local (which holds every cloud metadata service: 169.254.169.254, and
//!   fd00:ec2::254 on AWS's IPv6), unspecified, multicast and broadcast addresses, and the
//!   other well-known metadata addresses (100.100.100.200, 192.0.0.192), also when written as
//!   IPv4-mapped or NAT64 IPv6 addresses;
//! - tailor's *protected endpoints*: its own listeners and its database, and, for image sources,
//!   the internal registry under any spelling.
//!
//! An operator opens exceptions with `TAILOR_EGRESS_ALLOW` (CIDRs, addresses, host names or
//! `host:port`) and closes more with `TAILOR_EGRESS_DENY`. Precedence: the internal registry is
//! never a source; an own listener or the database only when named exactly (`host:port`);
//! then the deny list; then the allow list; then the default address classes.
//!
//! The check is made on resolved addresses, and the addresses checked are the ones connected
//! to: [`Egress::check_url`] resolves a name, checks every address and *pins* them, and the
//! HTTP client's resolver ([`Egress::resolver`]) hands out exactly the pinned addresses, so a
//! name that resolves differently a moment later (DNS rebinding) changes nothing. A name the
//! resolver meets without a pin (it should not happen) is resolved and checked there, without
//! the port-specific rules.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use reqwest::Url;

/// How long a checked resolution is pinned (and a protected endpoint's resolution cached).
const PIN_FOR: Duration = Duration::from_secs(60);
/// Most pinned names kept; the oldest are dropped beyond it.
const MAX_PINNED: usize = 4096;
/// Longest a name resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// One entry of `TAILOR_EGRESS_ALLOW` or `TAILOR_EGRESS_DENY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// A CIDR or a single address (any port).
    Net(IpNet),
    /// An address and one port.
    AddrPort(IpAddr, u16),
    /// A host name (any port), whatever it resolves to.
    Name(String),
    /// A host name and one port.
    NamePort(String, u16),
}

impl Rule {
    /// Parses `10.0.0.0/8`, `127.0.0.1`, `[::1]:5000`, `registry.local` or `registry.local:5000`.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err("an entry is empty".into());
        }
        if entry.contains("://") || entry.contains('/') && IpNet::from_str(entry).is_err() {
            return Err(format!(
                "{entry:?} is not a CIDR, an address, a host name or host:port (no scheme or path)"
            ));
        }
        if let Ok(net) = IpNet::from_str(entry) {
            return Ok(Self::Net(net.trunc()));
        }
        if let Ok(ip) = IpAddr::from_str(entry) {
            return Ok(Self::Net(IpNet::from(ip)));
        }
        if let Ok(addr) = SocketAddr::from_str(entry) {
            return Ok(Self::AddrPort(addr.ip().to_canonical(), addr.port()));
        }
        let (name, port) = match entry.rsplit_once(':') {
            Some((name, port)) => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{entry:?} has an invalid port {port:?}"))?;
                (name, Some(port))
            }
            None => (entry, None),
        };
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
            && !name.starts_with(['.', '-']);
        if !valid {
            return Err(format!("{entry:?} is not a valid host name"));
        }
        let name = normalise_name(name);
        Ok(match port {
            Some(port) => Self::NamePort(name, port),
            None => Self::Name(name),
        })
    }

    /// Parses a comma-separated list, naming the bad entry.
    pub fn parse_list(list: &str) -> Result<Vec<Self>, String> {
        list.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(Self::parse)
            .collect()
    }

    fn matches(&self, name: Option<&str>, ip: Option<IpAddr>, port: Option<u16>) -> bool {
        match self {
            Self::Net(net) => ip.is_some_and(|ip| net.contains(&ip)),
            Self::AddrPort(a, p) => ip == Some(*a) && port == Some(*p),
            Self::Name(n) => name == Some(n.as_str()),
            Self::NamePort(n, p) => name == Some(n.as_str()) && port == Some(*p),
        }
    }

    /// Matches exactly one endpoint: what it takes to reach a protected one.
    fn names_exactly(&self, name: Option<&str>, ip: Option<IpAddr>, port: u16) -> bool {
        match self {
            Self::AddrPort(a, p) => ip == Some(*a) && *p == port,
            Self::NamePort(n, p) => name == Some(n.as_str()) && *p == port,
            _ => false,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            Self::Net(net) => write!(f, "{net}"),
            Self::AddrPort(ip, port) => write!(f, "{}", SocketAddr::new(*ip, *port)),
            Self::Name(name) => f.write_str(name),
            Self::NamePort(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// An endpoint of tailor's own that tenants must not reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protected {
    /// A listener of this process (stager-api's API, an agent).
    OwnListener,
    /// The PostgreSQL server.
    Database,
    /// The internal registry: never an image source.
    InternalRegistry,
}

impl Protected {
    fn describe(self) -> &'static str {
        match self {
            Self::OwnListener => "one of tailor's own listeners",
            Self::Database => "tailor's database",
            Self::InternalRegistry => "the internal registry",
        }
    }
}

/// Why a destination was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// A default-denied address class ("loopback", "link-local", ...).
    AddressClass {
        class: &'static str,
        ip: IpAddr,
    },
    /// `TAILOR_EGRESS_DENY` lists it.
    Operator {
        rule: String,
    },
    Protected(Protected),
    /// The name does not resolve (or resolves to nothing usable).
    Unresolvable {
        detail: String,
    },
}

/// A refused destination. Its message names the target and why, never a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{target} is not an allowed destination: {}", self.explain())]
pub struct EgressDenied {
    /// `host:port` as the request named it.
    pub target: String,
    pub reason: DenyReason,
    pub purpose: Purpose,
}

impl EgressDenied {
    /// `INTERNAL_SOURCE_REFUSED` for the internal registry as an image source,
    /// `EGRESS_DENIED` otherwise.
    pub fn code(&self) -> &'static str {
        match (&self.reason, self.purpose) {
            (DenyReason::Protected(Protected::InternalRegistry), Purpose::Source) => {
                "INTERNAL_SOURCE_REFUSED"
            }
            _ => "EGRESS_DENIED",
        }
    }

    fn explain(&self) -> String {
        match &self.reason {
            DenyReason::AddressClass { class, ip } => format!(
                "{ip} is a {class} address (allow it with TAILOR_EGRESS_ALLOW if this is intended)"
            ),
            DenyReason::Operator { rule } => format!("TAILOR_EGRESS_DENY lists {rule}"),
            DenyReason::Protected(Protected::InternalRegistry)
                if self.purpose == Purpose::Source =>
            {
                "it is the internal registry, which is never an image source".into()
            }
            DenyReason::Protected(p) => format!(
                "it is {} (name it exactly as host:port in TAILOR_EGRESS_ALLOW to allow it)",
                p.describe()
            ),
            DenyReason::Unresolvable { detail } => format!("it does not resolve: {detail}"),
        }
    }
}

/// The classes of addresses refused by default, by name, for messages and `check-config`.
pub const DENIED_CLASSES: &str = "loopback, link-local (cloud metadata: 169.254.169.254, fd00:ec2::254), \
     unspecified, multicast, broadcast, 100.100.100.200, 192.0.0.192";

/// The class of `ip` if it is denied by default.
pub fn denied_class(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => denied_v4(v4),
        IpAddr::V6(v6) => denied_v6(v6),
    }
}

fn denied_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const METADATA: [Ipv4Addr; 2] = [
        Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
        Ipv4Addr::new(192, 0, 0, 192),     // Oracle Cloud (legacy)
    ];
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.octets()[0] == 0 {
        Some("unspecified")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if METADATA.contains(&ip) {
        Some("cloud metadata")
    } else {
        None
    }
}

fn denied_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        Some("cloud metadata")
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64: the IPv4 address in the low 32 bits is what is reached.
        denied_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ))
    } else if s[0] == 0x2002 {
        // 6to4: the IPv4 address in bits 16..48.
        denied_v4(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ))
    } else {
        None
    }
}

fn normalise_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn is_localhost_name(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost")
}

/// A protected endpoint as configured (`host` may be a name or an address).
#[derive(Debug, Clone)]
struct ProtectedEndpoint {
    what: Protected,
    host: String,
    port: u16,
}

/// The rules, as configured. Built once at start-up.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    protected: Vec<ProtectedEndpoint>,
    /// No checks at all: the CLI, run with an operator's own authority.
    unrestricted: bool,
}

impl EgressPolicy {
    pub fn new(allow: Vec<Rule>, deny: Vec<Rule>) -> Self {
        Self {
            allow,
            deny,
            protected: Vec::new(),
            unrestricted: false,
        }
    }

    /// Allows everything: for `tailor copy`, which acts for the operator who runs it.
    pub fn unrestricted() -> Self {
        Self {
            unrestricted: true,
            ..Self::default()
        }
    }

    /// Protects `host:port` (a name or an address; an unspecified address means every
    /// address of this host).
    pub fn protect(mut self, what: Protected, host: &str, port: u16) -> Self {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.protected.push(ProtectedEndpoint {
            what,
            host: normalise_name(host),
            port,
        });
        self
    }

    /// Protects the host:port of a `postgres://` URL, if it names one.
    pub fn protect_database(self, database_url: &str) -> Self {
        match Url::parse(database_url) {
            Ok(url) => match (url.host_str(), url.port().or(Some(5432))) {
                (Some(host), Some(port)) if !host.is_empty() => {
                    self.protect(Protected::Database, host, port)
                }
                _ => self,
            },
            Err(_) => self,
        }
    }

    /// Protects a `host:port` as written in settings (`TAILOR_INTERNAL_REGISTRY`), with
    /// `default_port` when it names none.
    pub fn protect_host_port(self, what: Protected, host_port: &str, default_port: u16) -> Self {
        match split_host_port(host_port) {
            Some((host, port)) => self.protect(what, &host, port.unwrap_or(default_port)),
            None => self,
        }
    }

    pub fn allow_rules(&self) -> &[Rule] {
        &self.allow
    }

    pub fn is_unrestricted(&self) -> bool {
        self.unrestricted
    }

    /// One paragraph for `check-config` and start-up logs.
    pub fn describe(&self) -> String {
        if self.unrestricted {
            return "egress: unrestricted".into();
        }
        let list = |rules: &[Rule]| {
            if rules.is_empty() {
                "none".to_owned()
            } else {
                rules
                    .iter()
                    .map(Rule::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let protected: Vec<String> = self
            .protected
            .iter()
            .map(|p| format!("{} ({}:{})", p.what.describe(), p.host, p.port))
            .collect();
        format!(
            "egress: denied by default: {DENIED_CLASSES}; protected: {}; allowed (TAILOR_EGRESS_ALLOW): {}; denied (TAILOR_EGRESS_DENY): {}",
            if protected.is_empty() {
                "none".to_owned()
            } else {
                protected.join(", ")
            },
            list(&self.allow),
            list(&self.deny),
        )
    }
}

/// `host[:port]` (with `[v6]` brackets) into its parts.
fn split_host_port(value: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None => None,
        };
        return Some((host.to_owned(), port));
    }
    match value.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            Some((host.to_owned(), Some(port.parse().ok()?)))
        }
        Some(_) => Some((value.to_owned(), None)),
        None => Some((value.to_owned(), None)),
    }
}

/// Which destination a request is for: a source (where the internal registry is refused) or
/// anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An image source, its token realm and its redirects.
    Source,
    /// A completion callback.
    Callback,
}

/// The policy at run time: checks, and the pins that make checks stick.
pub struct Egress {
    policy: EgressPolicy,
    pinned: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
    /// Resolutions of protected endpoints' names.
    protected_addrs: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
    local_addrs: Vec<IpAddr>,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress")
            .field("policy", &self.policy)
            .finish()
    }
}

impl Egress {
    pub fn new(policy: EgressPolicy) -> Arc<Self> {
        Arc::new(Self {
            policy,
            pinned: Mutex::new(HashMap::new()),
            protected_addrs: Mutex::new(HashMap::new()),
            local_addrs: local_addresses(),
        })
    }

    pub fn unrestricted() -> Arc<Self> {
        Self::new(EgressPolicy::unrestricted())
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// The resolver for HTTP clients whose destinations this policy governs.
    pub fn resolver(self: &Arc<Self>) -> Arc<EgressResolver> {
        Arc::new(EgressResolver(self.clone()))
    }

    /// Checks `url`'s destination before a request: resolves a name, checks every address it
    /// has, and pins them for the connection that follows.
    pub async fn check_url(&self, url: &Url, purpose: Purpose) -> Result<(), EgressDenied> {
        let port = url.port_or_known_default().unwrap_or(0);
        let target = match url.host() {
            Some(host) => format!("{host}:{port}"),
            None => url.as_str().to_owned(),
        };
        let deny = |reason| EgressDenied {
            target: target.clone(),
            reason,
            purpose,
        };
        match url.host() {
            None => Err(deny(DenyReason::Unresolvable {
                detail: "the URL has no host".into(),
            })),
            Some(url::Host::Ipv4(ip)) => self
                .check_addr(None, ip.into(), port, purpose)
                .map_err(deny),
            Some(url::Host::Ipv6(ip)) => self
                .check_addr(None, ip.into(), port, purpose)
                .map_err(deny),
            Some(url::Host::Domain(name)) => {
                let name = normalise_name(name);
                self.refresh_protected().await;
                let addrs = match self.pinned(&name) {
                    Some(addrs) => addrs,
                    None => lookup(&name, port)
                        .await
                        .map_err(|detail| deny(DenyReason::Unresolvable { detail }))?,
                };
                let allowed = self
                    .check_name(&name, &addrs, port, purpose)
                    .map_err(deny)?;
                self.pin(&name, allowed);
                Ok(())
            }
        }
    }

    /// What can be refused without resolving anything: for `POST /stage`, so that a request
    /// naming a denied address fails at once with 422. `host_port` is `host[:port]` as in a
    /// reference; `default_port` applies when it names none.
    pub fn check_literal(
        &self,
        host_port: &str,
        default_port: u16,
        purpose: Purpose,
    ) -> Result<(), EgressDenied> {
        let Some((host, port)) = split_host_port(host_port) else {
            return Ok(());
        };
        let port = port.unwrap_or(default_port);
        // The URL parser normalises what a browser or curl would connect to: `127.1`,
        // `0x7f.0.0.1`, `2130706433`, `[::ffff:127.0.0.1]`.
        let parsed = Url::parse(&format!(
            "http://{}/",
            if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            }
        ));
        let target = format!("{host}:{port}");
        let deny = |reason| EgressDenied {
            target: target.clone(),
            reason,
            purpose,
        };
        match parsed.as_ref().ok().and_then(Url::host) {
            Some(url::Host::Ipv4(ip)) => self
                .check_addr(None, ip.into(), port, purpose)
                .map_err(deny),
            Some(url::Host::Ipv6(ip)) => self
                .check_addr(None, ip.into(), port, purpose)
                .map_err(deny),
            Some(url::Host::Domain(name)) => {
                let name = normalise_name(name);
                if let Some(reason) = self.name_verdict(&name, port, purpose) {
                    return Err(deny(reason));
                }
                // `localhost` needs no resolver to be known for loopback (RFC 6761).
                if is_localhost_name(&name) {
                    let loopback = [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
                    self.check_name(&name, &loopback, port, purpose)
                        .map_err(deny)?;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Rules that apply to a name before its addresses are known.
    fn name_verdict(&self, name: &str, port: u16, purpose: Purpose) -> Option<DenyReason> {
        if self.policy.unrestricted {
            return None;
        }
        for p in &self.policy.protected {
            if p.port == port
                && p.host == name
                && self.protected_applies(p, Some(name), None, port, purpose)
            {
                return Some(DenyReason::Protected(p.what));
            }
        }
        if let Some(rule) = self
            .policy
            .deny
            .iter()
            .find(|r| r.matches(Some(name), None, Some(port)))
        {
            return Some(DenyReason::Operator {
                rule: rule.to_string(),
            });
        }
        None
    }

    /// Checks every address `name` resolved to; returns those that may be connected to. An
    /// address that is a protected endpoint refuses the whole name; addresses of a denied class
    /// are left out, and the name is refused only if none remains.
    fn check_name(
        &self,
        name: &str,
        addrs: &[IpAddr],
        port: u16,
        purpose: Purpose,
    ) -> Result<Vec<IpAddr>, DenyReason> {
        if let Some(reason) = self.name_verdict(name, port, purpose) {
            return Err(reason);
        }
        let mut allowed = Vec::new();
        let mut first_denial = None;
        for ip in addrs {
            match self.check_addr(Some(name), *ip, port, purpose) {
                Ok(()) => allowed.push(ip.to_canonical()),
                Err(reason @ DenyReason::Protected(_)) => return Err(reason),
                Err(reason) => {
                    first_denial.get_or_insert(reason);
                }
            }
        }
        match first_denial {
            Some(reason) if allowed.is_empty() => Err(reason),
            _ => Ok(allowed),
        }
    }

    /// The verdict for one address (and the name it was reached by, if any).
    fn check_addr(
        &self,
        name: Option<&str>,
        ip: IpAddr,
        port: u16,
        purpose: Purpose,
    ) -> Result<(), DenyReason> {
        if self.policy.unrestricted {
            return Ok(());
        }
        let ip = ip.to_canonical();
        for p in &self.policy.protected {
            if self.protected_matches(p, name, ip, port)
                && self.protected_applies(p, name, Some(ip), port, purpose)
            {
                return Err(DenyReason::Protected(p.what));
            }
        }
        if let Some(rule) = self
            .policy
            .deny
            .iter()
            .find(|r| r.matches(name, Some(ip), Some(port)))
        {
            return Err(DenyReason::Operator {
                rule: rule.to_string(),
            });
        }
        if self
            .policy
            .allow
            .iter()
            .any(|r| r.matches(name, Some(ip), Some(port)))
        {
            return Ok(());
        }
        match denied_class(ip) {
            Some(class) => Err(DenyReason::AddressClass { class, ip }),
            None => Ok(()),
        }
    }

    /// Whether a protected endpoint's rule is in force for this request: the internal
    /// registry refuses sources absolutely; the others yield to an exact allow entry.
    fn protected_applies(
        &self,
        p: &ProtectedEndpoint,
        name: Option<&str>,
        ip: Option<IpAddr>,
        port: u16,
        purpose: Purpose,
    ) -> bool {
        match p.what {
            Protected::InternalRegistry if purpose == Purpose::Source => true,
            _ => !self
                .policy
                .allow
                .iter()
                .any(|r| r.names_exactly(name, ip, port)),
        }
    }

    /// Whether `ip:port` (reached as `name`) is the protected endpoint `p`: same port, and the
    /// same address, or both on this host's loopback, or `p` listening on every address.
    fn protected_matches(
        &self,
        p: &ProtectedEndpoint,
        name: Option<&str>,
        ip: IpAddr,
        port: u16,
    ) -> bool {
        if p.port != port {
            return false;
        }
        if name == Some(p.host.as_str()) {
            return true;
        }
        let local =
            |a: IpAddr| a.is_loopback() || a.is_unspecified() || self.local_addrs.contains(&a);
        self.protected_addresses(&p.host).iter().any(|a| {
            let a = a.to_canonical();
            a == ip
                || (a.is_loopback() && (ip.is_loopback() || ip.is_unspecified()))
                || (a.is_unspecified() && local(ip))
                || (ip.is_unspecified() && local(a))
                || (ip.is_loopback() && a.is_unspecified())
        })
    }

    /// A protected endpoint's addresses: itself if an address; else its resolution, cached.
    /// (Resolved synchronously through the cache filled by [`Self::refresh_protected`].)
    fn protected_addresses(&self, host: &str) -> Vec<IpAddr> {
        if let Ok(ip) = IpAddr::from_str(host) {
            return vec![ip];
        }
        if is_localhost_name(host) {
            return vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ];
        }
        self.protected_addrs
            .lock()
            .expect("not poisoned")
            .get(host)
            .map(|(addrs, _)| addrs.clone())
            .unwrap_or_default()
    }

    /// Resolves the protected endpoints' names again if their cached resolution is old.
    async fn refresh_protected(&self) {
        let names: Vec<String> = {
            let cache = self.protected_addrs.lock().expect("not poisoned");
            self.policy
                .protected
                .iter()
                .filter(|p| IpAddr::from_str(&p.host).is_err() && !is_localhost_name(&p.host))
                .filter(|p| {
                    cache
                        .get(&p.host)
                        .is_none_or(|(_, at)| at.elapsed() > PIN_FOR)
                })
                .map(|p| p.host.clone())
                .collect()
        };
        for name in names {
            if let Ok(addrs) = lookup(&name, 0).await {
                self.protected_addrs
                    .lock()
                    .expect("not poisoned")
                    .insert(name, (addrs, Instant::now()));
            }
        }
    }

    /// Pins the checked addresses of `name` for the connection that follows.
    fn pin(&self, name: &str, addrs: Vec<IpAddr>) {
        let mut pinned = self.pinned.lock().expect("not poisoned");
        if pinned.len() >= MAX_PINNED {
            pinned.retain(|_, (_, at)| at.elapsed() < PIN_FOR);
            if pinned.len() >= MAX_PINNED {
                pinned.clear();
            }
        }
        pinned.insert(name.to_owned(), (addrs, Instant::now()));
    }

    fn pinned(&self, name: &str) -> Option<Vec<IpAddr>> {
        self.pinned
            .lock()
            .expect("not poisoned")
            .get(name)
            .filter(|(_, at)| at.elapsed() < PIN_FOR)
            .map(|(addrs, _)| addrs.clone())
    }
}

async fn lookup(name: &str, port: u16) -> Result<Vec<IpAddr>, String> {
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port)))
        .await
        .map_err(|_| format!("resolving {name} took longer than {RESOLVE_TIMEOUT:?}"))?
        .map_err(|e| crate::text::clean(&e.to_string(), crate::text::MESSAGE_CHARS))?;
    let mut addrs: Vec<IpAddr> = resolved.map(|a| a.ip().to_canonical()).collect();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{name} has no addresses"));
    }
    Ok(addrs)
}

/// reqwest's resolver for policed clients: the pinned addresses if [`Egress::check_url`] ran
/// (it always does), else a fresh resolution with every address checked.
pub struct EgressResolver(Arc<Egress>);

impl reqwest::dns::Resolve for EgressResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.0.clone();
        let name = normalise_name(name.as_str());
        Box::pin(async move {
            let addrs = match egress.pinned(&name) {
                Some(addrs) => addrs,
                None => {
                    let addrs = lookup(&name, 0).await.map_err(|detail| {
                        Box::new(EgressDenied {
                            target: name.clone(),
                            reason: DenyReason::Unresolvable { detail },
                            purpose: Purpose::Source,
                        }) as Box<dyn std::error::Error + Send + Sync>
                    })?;
                    for ip in &addrs {
                        // Without the port, only the address rules can be applied here.
                        if let Some(reason) = egress.addr_only_verdict(&name, *ip) {
                            return Err(Box::new(EgressDenied {
                                target: name.clone(),
                                reason,
                                purpose: Purpose::Source,
                            })
                                as Box<dyn std::error::Error + Send + Sync>);
                        }
                    }
                    addrs
                }
            };
            let addrs: reqwest::dns::Addrs =
                Box::new(addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

impl Egress {
    fn addr_only_verdict(&self, name: &str, ip: IpAddr) -> Option<DenyReason> {
        if self.policy.unrestricted {
            return None;
        }
        if let Some(rule) = self
            .policy
            .deny
            .iter()
            .find(|r| r.matches(Some(name), Some(ip), None))
        {
            return Some(DenyReason::Operator {
                rule: rule.to_string(),
            });
        }
        let allowed = self.policy.allow.iter().any(|r| match r {
            Rule::Net(_) | Rule::Name(_) => r.matches(Some(name), Some(ip), None),
            Rule::NamePort(n, _) => n == name,
            Rule::AddrPort(a, _) => *a == ip,
        });
        if allowed {
            return None;
        }
        denied_class(ip).map(|class| DenyReason::AddressClass { class, ip })
    }
}

/// Finds an [`EgressDenied`] in an error's chain of causes (a refusal by the resolver reaches
/// the caller wrapped in the HTTP client's connect error).
pub fn find_denial(error: &(dyn std::error::Error + 'static)) -> Option<EgressDenied> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(denied) = e.downcast_ref::<EgressDenied>() {
            return Some(denied.clone());
        }
        current = e.source();
    }
    None
}

/// This host's interface addresses (for a listener bound to 0.0.0.0 or ::).
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we walk read-only and free with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut addrs) != 0 {
            return out;
        }
        let mut cursor = addrs;
        while !cursor.is_null() {
            let addr = (*cursor).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cursor = (*cursor).ifa_next;
        }
        libc::freeifaddrs(addrs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn rules_parse_every_form_and_name_bad_entries() {
        assert_eq!(
            Rule::parse_list("10.0.0.0/8, 127.0.0.1, [::1]:5000, Registry.Local., hub.local:443")
                .unwrap(),
            vec![
                Rule::Net("10.0.0.0/8".parse().unwrap()),
                Rule::Net("127.0.0.1/32".parse().unwrap()),
                Rule::AddrPort("::1".parse().unwrap(), 5000),
                Rule::Name("registry.local".into()),
                Rule::NamePort("hub.local".into(), 443),
            ]
        );
        for bad in ["http://x", "x:0", "x:99999", "a b", "x/y"] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_classes_cover_metadata_in_every_spelling() {
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "100.100.100.200",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(denied_class(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "2001:db8::1",
            "fd00::1",
        ] {
            assert!(denied_class(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }

    #[test]
    fn literal_checks_normalise_what_a_client_would_connect_to() {
        let egress = Egress::new(EgressPolicy::default());
        for host in [
            "127.1",
            "0x7f.0.0.1",
            "2130706433",
            "[::ffff:127.0.0.1]",
            "localhost",
            "LOCALHOST.",
            "a.localhost",
            "169.254.169.254",
        ] {
            assert!(
                egress.check_literal(host, 443, Purpose::Source).is_err(),
                "{host}"
            );
        }
        assert!(
            egress
                .check_literal("registry.example:5000", 443, Purpose::Source)
                .is_ok()
        );
    }

    #[test]
    fn the_internal_registry_is_never_a_source_even_when_loopback_is_allowed() {
        let policy = EgressPolicy::new(Rule::parse_list("127.0.0.0/8").unwrap(), vec![])
            .protect_host_port(Protected::InternalRegistry, "127.0.0.1:5000", 443);
        let egress = Egress::new(policy);
        for spelling in [
            "127.0.0.1:5000",
            "127.1:5000",
            "127.0.0.2:5000",
            "[::1]:5000",
            "localhost:5000",
            "0.0.0.0:5000",
        ] {
            let denied = egress
                .check_literal(spelling, 443, Purpose::Source)
                .expect_err(spelling);
            assert_eq!(denied.code(), "INTERNAL_SOURCE_REFUSED", "{spelling}");
        }
        assert!(
            egress
                .check_literal("127.0.0.1:5001", 443, Purpose::Source)
                .is_ok()
        );
        // A callback to it is refused too, as any protected endpoint, with the general code.
        let denied = egress
            .check_literal("127.0.0.1:5000", 443, Purpose::Callback)
            .unwrap_err();
        assert_eq!(denied.code(), "EGRESS_DENIED");
        block_on(async {
            let denied = egress
                .check_url(&url("http://localhost:5000/v2/"), Purpose::Source)
                .await
                .unwrap_err();
            assert_eq!(denied.code(), "INTERNAL_SOURCE_REFUSED");
        });
    }

    #[test]
    fn protected_endpoints_yield_only_to_an_exact_entry() {
        let base = || {
            EgressPolicy::new(Rule::parse_list("127.0.0.0/8").unwrap(), vec![])
                .protect_database("postgres://u:p@127.0.0.1:5432/db")
                .protect(Protected::OwnListener, "0.0.0.0", 8080)
        };
        let egress = Egress::new(base());
        for target in ["127.0.0.1:5432", "127.0.0.1:8080"] {
            let denied = egress
                .check_literal(target, 443, Purpose::Callback)
                .unwrap_err();
            assert_eq!(denied.code(), "EGRESS_DENIED");
        }
        let mut allow = Rule::parse_list("127.0.0.0/8").unwrap();
        allow.push(Rule::parse("127.0.0.1:8080").unwrap());
        let egress = Egress::new(EgressPolicy { allow, ..base() });
        assert!(
            egress
                .check_literal("127.0.0.1:8080", 443, Purpose::Callback)
                .is_ok()
        );
    }

    #[test]
    fn deny_wins_over_allow_and_names_the_rule() {
        let egress = Egress::new(EgressPolicy::new(
            Rule::parse_list("10.0.0.0/8").unwrap(),
            Rule::parse_list("10.1.0.0/16").unwrap(),
        ));
        let denied = egress
            .check_literal("10.1.2.3:443", 443, Purpose::Source)
            .unwrap_err();
        assert!(
            denied
                .to_string()
                .contains("TAILOR_EGRESS_DENY lists 10.1.0.0/16"),
            "{denied}"
        );
        assert!(
            egress
                .check_literal("10.2.2.3", 443, Purpose::Source)
                .is_ok()
        );
    }

    #[test]
    fn resolved_names_are_checked_and_pinned() {
        let egress = Egress::new(EgressPolicy::default());
        block_on(async {
            let denied = egress
                .check_url(&url("http://localhost:1234/"), Purpose::Callback)
                .await
                .unwrap_err();
            assert!(matches!(
                denied.reason,
                DenyReason::AddressClass {
                    class: "loopback",
                    ..
                }
            ));
            let unresolvable = egress
                .check_url(&url("http://no-such-host.invalid/"), Purpose::Callback)
                .await
                .unwrap_err();
            assert!(matches!(
                unresolvable.reason,
                DenyReason::Unresolvable { .. }
            ));
        });
        let open = Egress::new(EgressPolicy::new(
            Rule::parse_list("localhost").unwrap(),
            vec![],
        ));
        block_on(async {
            open.check_url(&url("http://localhost:1234/"), Purpose::Callback)
                .await
                .unwrap();
        });
        assert!(open.pinned("localhost").is_some());
    }

    #[test]
    fn the_unrestricted_policy_allows_everything() {
        let egress = Egress::unrestricted();
        assert!(
            egress
                .check_literal("169.254.169.254", 80, Purpose::Source)
                .is_ok()
        );
    }
}
