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
//! to: [`Egress::check_url`] resolves a name, checks every address for the URL's port and
//! returns the allowed ones as a [`Checked`] destination, and [`PolicedClients`] hands the
//! request a client built for exactly that host, port and those addresses, whose resolver
//! refuses every name. So a name that resolves differently a moment later (DNS rebinding), a
//! check made for another port of the same name, or a flood of names filling a cache changes
//! nothing: no client of tailor's ever resolves a tenant's name by itself.
//!
//! A protected endpoint given by a name is resolved again (every minute) before every check; a
//! name that has never resolved protects its whole port (every address on it is refused) rather
//! than nothing, and one on this host (loopback, unspecified or one of this host's interface
//! addresses) is matched by any of this host's addresses on its port, since a listener may be
//! reachable on all of them.

mod clients;

pub use clients::{ClientError, PolicedClients};

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::code::Code;

use ipnet::IpNet;
use reqwest::Url;

/// How long a protected endpoint's resolution is used before its name is resolved again.
const PROTECTED_REFRESH: Duration = Duration::from_secs(60);
/// How soon a protected endpoint's name that failed to resolve is tried again. Until it
/// resolves, its port is refused whatever the address, so it is retried sooner than the
/// refresh, but not on every check: a resolver that is down would cost each check its timeout.
const PROTECTED_RETRY: Duration = Duration::from_secs(5);
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
    /// The port is a protected endpoint's whose name has never resolved: any address on it may
    /// be that endpoint, so every one is refused until the name resolves.
    ProtectedUnresolved {
        what: Protected,
        host: String,
        port: u16,
    },
    /// The name does not resolve (or resolves to nothing usable).
    Unresolvable {
        detail: String,
    },
    /// An HTTP client was asked to resolve a name no check gave it addresses for. Policed
    /// clients refuse every name they were not given; reaching this is a bug in tailor, and
    /// refusing is what keeps it from being an unchecked connection.
    Unchecked,
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
    pub fn code(&self) -> Code {
        match (&self.reason, self.purpose) {
            (DenyReason::Protected(Protected::InternalRegistry), Purpose::Source) => {
                Code::InternalSourceRefused
            }
            _ => Code::EgressDenied,
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
            DenyReason::ProtectedUnresolved { what, host, port } => format!(
                "it may be {} ({host}:{port}): that name could not be resolved, so every \
                 address on port {port} is refused until it does",
                what.describe()
            ),
            DenyReason::Unresolvable { detail } => format!("it does not resolve: {detail}"),
            DenyReason::Unchecked => {
                "it was not checked before the connection, so it is not resolved (a bug in tailor)"
                    .into()
            }
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

/// A destination the policy allowed: the host as the URL spells it, the port, and the
/// addresses (with that port) that may be connected to, and only those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub host: String,
    pub port: u16,
    pub addrs: Vec<SocketAddr>,
}

/// A name lookup standing in for DNS in tests.
#[cfg(test)]
pub(crate) type TestLookup = Arc<dyn Fn(&str) -> Vec<IpAddr> + Send + Sync>;

/// What is known of a protected endpoint's name.
#[derive(Debug, Clone)]
struct ProtectedResolution {
    /// Its addresses when it last resolved; empty if it never has.
    addrs: Vec<IpAddr>,
    /// When it was last looked up, and whether that lookup succeeded.
    at: Instant,
    resolved: bool,
}

/// A protected endpoint's addresses as far as they are known.
enum ProtectedAddrs {
    Known(Vec<IpAddr>),
    /// Looked up, and never resolved.
    Unresolved,
    /// Not looked up yet: only [`Egress::check_literal`], which resolves nothing, meets this;
    /// every [`Egress::check_url`] looks protected names up first.
    NotLookedUp,
}

/// The policy at run time.
pub struct Egress {
    policy: EgressPolicy,
    /// Resolutions of protected endpoints' names.
    protected_addrs: Mutex<HashMap<String, ProtectedResolution>>,
    local_addrs: Vec<IpAddr>,
    #[cfg(test)]
    test_lookup: Option<TestLookup>,
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
            protected_addrs: Mutex::new(HashMap::new()),
            local_addrs: local_addresses(),
            #[cfg(test)]
            test_lookup: None,
        })
    }

    /// A policy whose name lookups are `lookup`'s answers instead of DNS (an empty answer is a
    /// name that does not resolve), and whose host has `local_addrs`.
    #[cfg(test)]
    pub(crate) fn with_lookup(
        policy: EgressPolicy,
        local_addrs: Vec<IpAddr>,
        lookup: TestLookup,
    ) -> Arc<Self> {
        Arc::new(Self {
            policy,
            protected_addrs: Mutex::new(HashMap::new()),
            local_addrs,
            test_lookup: Some(lookup),
        })
    }

    pub fn unrestricted() -> Arc<Self> {
        Self::new(EgressPolicy::unrestricted())
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// Checks `url`'s destination before a request: resolves a name and checks every address
    /// it has for the URL's port. Returns the addresses that may be connected to (`None` for an
    /// address literal, which is checked as it is). Connect only through a client built for
    /// the result ([`PolicedClients`]): resolving the name again would undo the check.
    pub async fn check_url(
        &self,
        url: &Url,
        purpose: Purpose,
    ) -> Result<Option<Checked>, EgressDenied> {
        let port = url.port_or_known_default().unwrap_or(0);
        let deny = |reason| EgressDenied {
            target: target_of(url, port),
            reason,
            purpose,
        };
        // Whatever the destination: an address literal may be a protected name's address.
        self.refresh_protected().await;
        match url.host() {
            None => Err(deny(DenyReason::Unresolvable {
                detail: "the URL has no host".into(),
            })),
            Some(url::Host::Ipv4(ip)) => self
                .check_addr(None, ip.into(), port, purpose)
                .map(|()| None)
                .map_err(deny),
            Some(url::Host::Ipv6(ip)) => self
                .check_addr(None, ip.into(), port, purpose)
                .map(|()| None)
                .map_err(deny),
            Some(url::Host::Domain(host)) => {
                let addrs = self
                    .lookup(&normalise_name(host))
                    .await
                    .map_err(|detail| deny(DenyReason::Unresolvable { detail }))?;
                self.check_resolved(host, &addrs, port, purpose)
                    .map(Some)
                    .map_err(deny)
            }
        }
    }

    /// Checks addresses `host` resolved to earlier (a cached client's) again, for `port`,
    /// without resolving anything: what a protected endpoint's fresh resolution changes.
    pub(crate) async fn recheck(
        &self,
        checked: &Checked,
        purpose: Purpose,
    ) -> Result<Checked, EgressDenied> {
        self.refresh_protected().await;
        let ips: Vec<IpAddr> = checked.addrs.iter().map(SocketAddr::ip).collect();
        self.check_resolved(&checked.host, &ips, checked.port, purpose)
            .map_err(|reason| EgressDenied {
                target: format!("{}:{}", checked.host, checked.port),
                reason,
                purpose,
            })
    }

    fn check_resolved(
        &self,
        host: &str,
        addrs: &[IpAddr],
        port: u16,
        purpose: Purpose,
    ) -> Result<Checked, DenyReason> {
        let allowed = self.check_name(&normalise_name(host), addrs, port, purpose)?;
        Ok(Checked {
            host: host.to_owned(),
            port,
            addrs: allowed
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect(),
        })
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
                Err(
                    reason @ (DenyReason::Protected(_) | DenyReason::ProtectedUnresolved { .. }),
                ) => {
                    return Err(reason);
                }
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
            if let Some(reason) = self.protected_match(p, name, ip, port)
                && self.protected_applies(p, name, Some(ip), port, purpose)
            {
                return Err(reason);
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

    /// Whether `ip:port` (reached as `name`) may be the protected endpoint `p`, and the
    /// refusal if so: same port, and the same address, or both addresses this host's (a
    /// listener on loopback, on every address or on one interface may be reachable on any of
    /// them), or `p` a name that has never resolved (then it may be anything on that port).
    fn protected_match(
        &self,
        p: &ProtectedEndpoint,
        name: Option<&str>,
        ip: IpAddr,
        port: u16,
    ) -> Option<DenyReason> {
        if p.port != port {
            return None;
        }
        let matched = Some(DenyReason::Protected(p.what));
        if name == Some(p.host.as_str()) {
            return matched;
        }
        let addrs = match self.protected_addresses(&p.host) {
            ProtectedAddrs::Known(addrs) => addrs,
            ProtectedAddrs::Unresolved => {
                return Some(DenyReason::ProtectedUnresolved {
                    what: p.what,
                    host: p.host.clone(),
                    port: p.port,
                });
            }
            // `check_literal` only: what it cannot know, the check before connecting decides.
            ProtectedAddrs::NotLookedUp => return None,
        };
        let local =
            |a: IpAddr| a.is_loopback() || a.is_unspecified() || self.local_addrs.contains(&a);
        let same = addrs
            .iter()
            .map(|a| a.to_canonical())
            .any(|a| a == ip || (local(a) && local(ip)));
        if same { matched } else { None }
    }

    /// A protected endpoint's addresses: itself if an address; else its resolution, cached
    /// (looked up by [`Self::refresh_protected`], so that the checks themselves are synchronous).
    fn protected_addresses(&self, host: &str) -> ProtectedAddrs {
        if let Ok(ip) = IpAddr::from_str(host) {
            return ProtectedAddrs::Known(vec![ip]);
        }
        if is_localhost_name(host) {
            return ProtectedAddrs::Known(vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]);
        }
        match self
            .protected_addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(host)
        {
            None => ProtectedAddrs::NotLookedUp,
            Some(r) if r.addrs.is_empty() => ProtectedAddrs::Unresolved,
            Some(r) => ProtectedAddrs::Known(r.addrs.clone()),
        }
    }

    /// Looks the protected endpoints' names up again if their resolution is old (or failed a
    /// little while ago). A name that fails to resolve keeps the addresses it last had: the
    /// endpoint is most likely still there.
    async fn refresh_protected(&self) {
        let names: Vec<String> = {
            let cache = self
                .protected_addrs
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.policy
                .protected
                .iter()
                .filter(|p| IpAddr::from_str(&p.host).is_err() && !is_localhost_name(&p.host))
                .filter(|p| {
                    cache.get(&p.host).is_none_or(|r| {
                        let due = if r.resolved {
                            PROTECTED_REFRESH
                        } else {
                            PROTECTED_RETRY
                        };
                        r.at.elapsed() > due
                    })
                })
                .map(|p| p.host.clone())
                .collect()
        };
        for name in names {
            let looked_up = self.lookup(&name).await;
            let mut cache = self
                .protected_addrs
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let entry = cache
                .entry(name.clone())
                .or_insert_with(|| ProtectedResolution {
                    addrs: Vec::new(),
                    at: Instant::now(),
                    resolved: false,
                });
            entry.at = Instant::now();
            match looked_up {
                Ok(addrs) => {
                    entry.addrs = addrs;
                    entry.resolved = true;
                }
                Err(detail) => {
                    entry.resolved = false;
                    tracing::warn!(name = %name, %detail, "a protected endpoint's name does not resolve; its port is refused on every address until it does");
                }
            }
        }
    }

    /// Resolves `name` (normalised), with a deadline. Addresses are canonical and unique.
    async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        #[cfg(test)]
        if let Some(lookup) = &self.test_lookup {
            return unique_addrs(name, lookup(name));
        }
        let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, 0)))
            .await
            .map_err(|_| format!("resolving {name} took longer than {RESOLVE_TIMEOUT:?}"))?
            .map_err(|e| crate::text::clean(&e.to_string(), crate::text::MESSAGE_CHARS))?;
        unique_addrs(name, resolved.map(|a| a.ip()).collect())
    }
}

fn unique_addrs(name: &str, resolved: Vec<IpAddr>) -> Result<Vec<IpAddr>, String> {
    let mut addrs: Vec<IpAddr> = Vec::with_capacity(resolved.len());
    for ip in resolved.into_iter().map(|ip| ip.to_canonical()) {
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    if addrs.is_empty() {
        return Err(format!("{name} has no addresses"));
    }
    Ok(addrs)
}

/// `host:port` of a URL, for messages.
fn target_of(url: &Url, port: u16) -> String {
    match url.host() {
        Some(host) => format!("{host}:{port}"),
        None => url.as_str().to_owned(),
    }
}

/// Finds an [`EgressDenied`] in an error's chain of causes (a refusal by a policed client's
/// resolver reaches the caller wrapped in the HTTP client's connect error).
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
    fn resolved_names_are_checked_and_their_checked_addresses_returned() {
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
        let checked = block_on(async {
            open.check_url(&url("http://localhost:1234/"), Purpose::Callback)
                .await
                .unwrap()
                .expect("a name is resolved")
        });
        assert_eq!((checked.host.as_str(), checked.port), ("localhost", 1234));
        assert!(
            checked
                .addrs
                .contains(&SocketAddr::from((Ipv4Addr::LOCALHOST, 1234))),
            "{checked:?}"
        );
        let literal = block_on(async {
            open.check_url(&url("http://10.1.2.3:1234/"), Purpose::Callback)
                .await
                .unwrap()
        });
        assert_eq!(literal, None, "an address literal is checked as it is");
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

    // DNS rebinding and cache exhaustion against the policed clients. A real TCP listener on
    // 127.0.0.1 stands for the internal registry (a protected endpoint); loopback is allowed,
    // so only the protected rule stands between a tenant's name and it. Name lookups are the
    // test's (`Egress::with_lookup`), so a name can resolve to one address for the check and to
    // the listener's a moment later. Every client is bound to 127.0.0.1: a connection to the
    // "public" address a name was checked against then fails at once on this machine (EINVAL)
    // and nothing leaves it, while a connection to the listener would succeed and be counted.

    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The address names resolve to when they are checked: public, and never reached.
    const PUBLIC: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    /// Names an attacker makes tailor check to flush caches: more than the old pin map held
    /// (4096) and than the client cache holds.
    const FLOOD: usize = 4100;
    /// The longest any step of these tests may take.
    const DEADLINE: Duration = Duration::from_secs(20);

    /// A name lookup the test rewrites at will; `*.flood.test` names resolve to [`PUBLIC`].
    #[derive(Clone, Default)]
    struct Dns(Arc<Mutex<HashMap<String, Vec<IpAddr>>>>);

    impl Dns {
        fn set(&self, name: &str, addrs: &[IpAddr]) {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(name.to_owned(), addrs.to_vec());
        }

        fn lookup(&self) -> TestLookup {
            let names = self.0.clone();
            Arc::new(move |name: &str| {
                if name.ends_with(".flood.test") {
                    return vec![PUBLIC];
                }
                names
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(name)
                    .cloned()
                    .unwrap_or_default()
            })
        }
    }

    /// The protected endpoint: a listener that counts the connections it accepts.
    struct Listener {
        port: u16,
        accepted: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Listener {
        async fn start() -> Self {
            let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .unwrap();
            let port = listener.local_addr().unwrap().port();
            let accepted = Arc::new(AtomicUsize::new(0));
            let count = accepted.clone();
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                }
            });
            Self {
                port,
                accepted,
                task,
            }
        }

        /// Asserts nothing connected, after giving a connection in flight time to be accepted;
        /// then proves the listener would have counted one.
        async fn assert_never_reached(self) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                self.accepted.load(Ordering::SeqCst),
                0,
                "something connected to the protected endpoint"
            );
            tokio::time::timeout(
                DEADLINE,
                tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)),
            )
            .await
            .expect("connecting in time")
            .expect("the listener accepts");
            tokio::time::timeout(DEADLINE, async {
                while self.accepted.load(Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the listener counts what connects to it");
            self.task.abort();
        }
    }

    /// Loopback allowed; the listener's port on 127.0.0.1 is the internal registry.
    fn policy(port: u16) -> EgressPolicy {
        EgressPolicy::new(Rule::parse_list("127.0.0.0/8, ::1").unwrap(), vec![]).protect(
            Protected::InternalRegistry,
            "127.0.0.1",
            port,
        )
    }

    fn template() -> clients::ClientTemplate {
        let tls = crate::tls::client_config(&[]).unwrap();
        Arc::new(move || {
            reqwest::Client::builder()
                .local_address(IpAddr::V4(Ipv4Addr::LOCALHOST))
                .connect_timeout(Duration::from_secs(2))
                .tls_backend_preconfigured(tls.clone())
        })
    }

    fn clients(egress: &Arc<Egress>) -> PolicedClients {
        PolicedClients::new(egress.clone(), Purpose::Source, template()).unwrap()
    }

    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(DEADLINE, f)
            .await
            .unwrap_or_else(|_| panic!("{what} took longer than {DEADLINE:?}"))
    }

    /// An attacker's flood: names that each get a check and a client.
    async fn flood(clients: &PolicedClients) {
        within("the flood", async {
            for n in 0..FLOOD {
                let url = url(&format!("https://n{n}.flood.test/v2/"));
                clients.client_for(&url).await.unwrap();
            }
        })
        .await;
    }

    /// Sends through `http`, which must not reach the listener; any answer or failure is fine.
    async fn send(http: &reqwest::Client, url: &Url) {
        let _ = within("a request", http.get(url.clone()).send()).await;
    }

    #[tokio::test]
    async fn a_name_rebound_to_a_protected_endpoint_after_its_check_is_never_connected_to() {
        let listener = Listener::start().await;
        let dns = Dns::default();
        dns.set("victim.test", &[PUBLIC]);
        let egress = Egress::with_lookup(policy(listener.port), vec![], dns.lookup());
        let clients = clients(&egress).with_limits(Duration::from_millis(200), 16);
        let victim = url(&format!("http://victim.test:{}/v2/", listener.port));

        let http = within("the check", clients.client_for(&victim))
            .await
            .expect("a public address is allowed");
        // Between the check and the connection the name is rebound to the internal registry,
        // the check expires, and a flood of names evicts whatever remembered it.
        dns.set("victim.test", &[Ipv4Addr::LOCALHOST.into()]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        flood(&clients).await;
        send(&http, &victim).await;
        // The next request is checked again, on the new address, and refused.
        let denied = within("the second check", clients.client_for(&victim))
            .await
            .expect_err("the internal registry is never a source");
        assert_eq!(denied.code(), "INTERNAL_SOURCE_REFUSED", "{denied}");
        listener.assert_never_reached().await;
    }

    #[tokio::test]
    async fn a_check_for_one_port_never_lends_its_addresses_to_another() {
        let listener = Listener::start().await;
        let dns = Dns::default();
        dns.set("evil.test", &[PUBLIC]);
        let egress = Egress::with_lookup(policy(listener.port), vec![], dns.lookup());
        let clients = clients(&egress);
        let protected_port = url(&format!("http://evil.test:{}/v2/", listener.port));
        let other_port = url("http://evil.test:443/v2/");

        let http = within("the check", clients.client_for(&protected_port))
            .await
            .expect("a public address is allowed");
        // Now the name means the internal registry's address. On port 443 that is allowed
        // (loopback is, and nothing is protected there); on the listener's port it is not.
        dns.set("evil.test", &[Ipv4Addr::LOCALHOST.into()]);
        flood(&clients).await;
        within("the other port's check", clients.client_for(&other_port))
            .await
            .expect("loopback is allowed on another port");
        let checked = within("a check", egress.check_url(&other_port, Purpose::Source))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            checked.addrs,
            [SocketAddr::from((Ipv4Addr::LOCALHOST, 443))],
            "addresses are checked, and handed out, for one port"
        );
        // The request to the listener's port goes where that port's check allowed.
        send(&http, &protected_port).await;
        let denied = within("the second check", clients.client_for(&protected_port))
            .await
            .expect_err("the addresses allowed on 443 are not reused for another port");
        assert_eq!(denied.code(), "INTERNAL_SOURCE_REFUSED", "{denied}");
        listener.assert_never_reached().await;
    }

    #[tokio::test]
    async fn filling_the_client_cache_past_its_bound_never_yields_an_unchecked_connection() {
        let listener = Listener::start().await;
        let dns = Dns::default();
        dns.set("victim.test", &[PUBLIC]);
        let egress = Egress::with_lookup(policy(listener.port), vec![], dns.lookup());
        let clients = clients(&egress).with_limits(clients::CLIENT_TTL, 8);
        let victim = url(&format!("http://victim.test:{}/v2/", listener.port));

        let http = within("the check", clients.client_for(&victim))
            .await
            .unwrap();
        dns.set("victim.test", &[Ipv4Addr::LOCALHOST.into()]);
        flood(&clients).await;
        assert!(clients.cached() <= 8, "{} clients kept", clients.cached());
        send(&http, &victim).await;
        // Evicted: checked again, on the new address, and refused.
        let denied = within("the second check", clients.client_for(&victim))
            .await
            .expect_err("an evicted destination is checked again");
        assert_eq!(denied.code(), "INTERNAL_SOURCE_REFUSED", "{denied}");
        listener.assert_never_reached().await;
    }

    #[tokio::test]
    async fn a_policed_client_resolves_no_name_by_itself() {
        let listener = Listener::start().await;
        let dns = Dns::default();
        dns.set("checked.test", &[PUBLIC]);
        let egress = Egress::with_lookup(
            EgressPolicy::new(Rule::parse_list("127.0.0.0/8, ::1").unwrap(), vec![]),
            vec![],
            dns.lookup(),
        );
        let clients = clients(&egress);
        let port = listener.port;
        // The client for an address literal, and the client for a checked name, asked for a
        // name they were given no addresses for (a misuse): refused, not resolved.
        let literal = within("a check", clients.client_for(&url("http://10.1.2.3/")))
            .await
            .unwrap();
        let named = within(
            "a check",
            clients.client_for(&url(&format!("http://checked.test:{port}/"))),
        )
        .await
        .unwrap();
        for http in [literal, named] {
            let error = within(
                "a request",
                http.get(url(&format!("http://localhost:{port}/"))).send(),
            )
            .await
            .expect_err("no name is resolved by a policed client");
            let denied = find_denial(&error).expect("the refusal is an egress denial");
            assert_eq!(denied.reason, DenyReason::Unchecked);
        }
        listener.assert_never_reached().await;
    }

    #[tokio::test]
    async fn the_unrestricted_policy_connects_to_what_names_resolve_to() {
        let listener = Listener::start().await;
        let clients = clients(&Egress::unrestricted());
        let target = url(&format!("http://localhost:{}/", listener.port));
        let http = within("the check", clients.client_for(&target))
            .await
            .unwrap();
        send(&http, &target).await;
        assert!(listener.accepted.load(Ordering::SeqCst) > 0);
        listener.task.abort();
    }

    #[test]
    fn a_protected_name_that_never_resolved_protects_its_whole_port() {
        let dns = Dns::default();
        let policy = || {
            EgressPolicy::new(vec![], vec![]).protect_database("postgres://u:p@db.test:5432/tailor")
        };
        let egress = Egress::with_lookup(policy(), vec![], dns.lookup());
        // Before any check has looked the name up, the early check cannot know; the check
        // before connecting does.
        assert!(
            egress
                .check_literal("10.1.2.3:5432", 443, Purpose::Source)
                .is_ok()
        );
        dns.set("registry.test", &["10.1.2.3".parse().unwrap()]);
        block_on(async {
            for target in ["http://10.1.2.3:5432/", "http://registry.test:5432/"] {
                let denied = egress
                    .check_url(&url(target), Purpose::Source)
                    .await
                    .expect_err(target);
                assert_eq!(denied.code(), "EGRESS_DENIED");
                assert!(
                    matches!(denied.reason, DenyReason::ProtectedUnresolved { .. }),
                    "{denied:?}"
                );
                assert!(
                    denied.to_string().contains("db.test:5432")
                        && denied.to_string().contains("could not be resolved"),
                    "{denied}"
                );
            }
            for target in ["http://10.1.2.3:5433/", "http://registry.test:443/"] {
                assert!(
                    egress
                        .check_url(&url(target), Purpose::Source)
                        .await
                        .is_ok(),
                    "{target}: other ports are not affected"
                );
            }
        });
        assert!(
            egress
                .check_literal("10.1.2.3:5432", 443, Purpose::Source)
                .is_err(),
            "once looked up and unresolved, the early check refuses too"
        );
        // Once the name resolves, only its addresses are protected.
        dns.set("db.test", &["10.9.9.9".parse().unwrap()]);
        let egress = Egress::with_lookup(policy(), vec![], dns.lookup());
        block_on(async {
            assert!(
                egress
                    .check_url(&url("http://10.1.2.3:5432/"), Purpose::Source)
                    .await
                    .is_ok()
            );
            let denied = egress
                .check_url(&url("http://10.9.9.9:5432/"), Purpose::Source)
                .await
                .unwrap_err();
            assert_eq!(denied.reason, DenyReason::Protected(Protected::Database));
        });
    }

    #[test]
    fn a_protected_endpoint_on_this_host_matches_every_address_of_this_host() {
        let this_host: IpAddr = "10.9.8.7".parse().unwrap();
        let policy = EgressPolicy::new(Rule::parse_list("127.0.0.0/8").unwrap(), vec![])
            .protect(Protected::OwnListener, "127.0.0.1", 8080)
            .protect(Protected::Database, "10.9.8.7", 5432);
        let egress = Egress::with_lookup(policy, vec![this_host], Dns::default().lookup());
        block_on(async {
            for target in [
                // A listener on loopback may be reachable on this host's other addresses.
                "http://10.9.8.7:8080/",
                // One on an interface address may be reachable on loopback.
                "http://127.0.0.1:5432/",
            ] {
                let denied = egress
                    .check_url(&url(target), Purpose::Callback)
                    .await
                    .expect_err(target);
                assert!(
                    matches!(denied.reason, DenyReason::Protected(_)),
                    "{target}: {denied:?}"
                );
            }
            for target in [
                "http://10.9.8.8:8080/",
                "http://10.9.8.7:8081/",
                "http://127.0.0.1:8081/",
            ] {
                assert!(
                    egress
                        .check_url(&url(target), Purpose::Callback)
                        .await
                        .is_ok(),
                    "{target}"
                );
            }
        });
    }
}
