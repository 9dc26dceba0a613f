//! A registry that lies: enough of the OCI distribution API (read side) for a client to copy an
//! image from it, plus rules that make it misbehave on purpose, for tests of what a client does
//! with an upstream it cannot trust.
//!
//! Honest behaviour: `GET /v2/` (200, or a bearer challenge with [`HostileRegistry::require_token`]
//! and a `/token` endpoint of its own), `GET|HEAD /v2/<name>/manifests/<ref>`,
//! `GET|HEAD /v2/<name>/blobs/<digest>`, `GET /v2/<name>/tags/list`, and distribution-style JSON
//! errors (`{"errors":[{"code":"MANIFEST_UNKNOWN",...}]}`) otherwise. Manifests are served as
//! stored whatever the `Accept` header says; uploads are refused (405). Blobs built on disk are
//! streamed from disk.
//!
//! Misbehaviour: a [`Rule`] (method, path substring, how many times) picks a [`Misbehaviour`]
//! for the requests it matches: bodies too large or trickling, redirects anywhere, canned
//! answers with hostile bytes, lying lengths, digests and content, a hang, a connection dropped
//! mid-body. Rules apply before authentication: a hostile registry misbehaves for everyone.
//!
//! What can be put on the wire: it is a real HTTP/1.1 server (actix-web), so responses are
//! framed as HTTP allows. Header values can carry visible ASCII, space, TAB and any byte from
//! 0x80 to 0xFF ("obs-text", e.g. the UTF-8 encoding of C1 controls such as U+009B, a CSI to
//! some terminals) but never CR, LF, NUL or another control byte: `http` refuses them and so
//! would any conforming client, so no test can rely on them arriving. Bodies can carry any
//! bytes. A lying `Content-Length` is written as is, on a connection closed after the body.
//!
//! Everything is recorded ([`HostileRegistry::requests`]), without secrets: of an
//! `Authorization` header only the scheme is kept. The server stops when dropped.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::body::{BodyStream, SizedStream};
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{App, HttpRequest, HttpResponse, HttpResponseBuilder, HttpServer, web};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, LocalBoxStream, Stream, StreamExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::image::{BlobData, BuiltImage, BuiltIndex, is_non_distributable};

/// The `service` of bearer challenges.
pub const SERVICE: &str = "hostile";
/// Lifetime the token endpoint announces, in seconds.
pub const TOKEN_EXPIRES_IN: u64 = 300;

/// How a matching request is answered instead of (or by distorting) the honest answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Misbehaviour {
    /// `bytes` of filler with `status`, generated while streaming (64 KiB at a time, never held
    /// in memory): `{"filler":"xxxx...` (a JSON document that never ends), typed as a manifest
    /// on manifest paths, `application/octet-stream` on blob paths, JSON elsewhere. With
    /// `declare_length`, a matching `Content-Length`; without, chunked.
    Oversized {
        status: u16,
        bytes: u64,
        declare_length: bool,
    },
    /// The honest answer (or `200` with `body`), at `bytes_per_second` (> 0), with its real
    /// `Content-Length`. At most a tenth of the rate goes at once, so 1/s sends byte by byte.
    Trickle {
        bytes_per_second: u64,
        body: Option<Vec<u8>>,
    },
    /// `status` (301, 302, 307, 308...) with `Location: location`, which may point anywhere.
    Redirect { status: u16, location: String },
    /// A canned answer. Header values must be sendable (see the module documentation);
    /// `Content-Length` and `Transfer-Encoding` are the server's (use [`Lie`] for those).
    Respond {
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    },
    /// The honest answer, with one lie in it.
    Lie(Lie),
    /// Reads the request and never answers; the connection stays open until the server stops.
    Hang,
    /// The honest answer with its real `Content-Length`, but the connection is dropped after
    /// `after_bytes` bytes of body.
    CloseMidBody { after_bytes: u64 },
}

/// The lies of [`Misbehaviour::Lie`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lie {
    /// `Content-Length` says `extra` more bytes than are sent; the connection is closed after
    /// the real body, so a client sees a premature end rather than waiting forever.
    LengthLonger { extra: u64 },
    /// `Content-Length` says `fewer` fewer bytes than the real body, and the whole body is sent
    /// anyway (the connection is then closed). A client that trusts the header reads a
    /// truncated body; one that reads on gets bytes past the message.
    LengthShorter { fewer: u64 },
    /// The right length, but the byte in the middle of the body is flipped, so the content does
    /// not hash to the digest it is served under (an empty body cannot lie this way).
    WrongContent,
    /// `Docker-Content-Digest` says this instead of the content's digest.
    DigestHeader(String),
}

impl Misbehaviour {
    /// A canned `status` with `body` and no extra headers.
    pub fn respond(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::Respond {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// `bytes` of filler with status 200 and no `Content-Length`.
    pub fn oversized(bytes: u64) -> Self {
        Self::Oversized {
            status: 200,
            bytes,
            declare_length: false,
        }
    }

    /// A short name for records and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Oversized { .. } => "oversized",
            Self::Trickle { .. } => "trickle",
            Self::Redirect { .. } => "redirect",
            Self::Respond { .. } => "respond",
            Self::Lie(Lie::LengthLonger { .. }) => "lie:length-longer",
            Self::Lie(Lie::LengthShorter { .. }) => "lie:length-shorter",
            Self::Lie(Lie::WrongContent) => "lie:wrong-content",
            Self::Lie(Lie::DigestHeader(_)) => "lie:digest-header",
            Self::Hang => "hang",
            Self::CloseMidBody { .. } => "close-mid-body",
        }
    }

    /// Panics with a clear message if this cannot be put on the wire.
    fn validate(&self) {
        let status = |code: u16| {
            StatusCode::from_u16(code)
                .unwrap_or_else(|_| panic!("{code} is not an HTTP status code"))
        };
        match self {
            Self::Oversized { status: code, .. } => {
                status(*code);
            }
            Self::Trickle {
                bytes_per_second, ..
            } => assert!(*bytes_per_second > 0, "a trickle needs a rate above 0"),
            Self::Redirect {
                status: code,
                location,
            } => {
                status(*code);
                header_value(location.as_bytes());
            }
            Self::Respond {
                status: code,
                headers,
                ..
            } => {
                status(*code);
                for (name, value) in headers {
                    header_name(name);
                    header_value(value);
                }
            }
            Self::Lie(Lie::DigestHeader(digest)) => {
                header_value(digest.as_bytes());
            }
            Self::Lie(_) | Self::Hang | Self::CloseMidBody { .. } => {}
        }
    }
}

/// When a [`Misbehaviour`] applies: like `fault_proxy::Rule`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Only requests with this method (`GET`, `HEAD`...), or any.
    pub method: Option<&'static str>,
    /// The request's path and query must contain this.
    pub path_contains: String,
    /// How many requests it answers before it stops matching (`usize::MAX`: forever).
    pub times: usize,
    pub misbehaviour: Misbehaviour,
}

impl Rule {
    /// Matches every request whose path and query contain `path_contains`, forever.
    pub fn new(path_contains: &str, misbehaviour: Misbehaviour) -> Self {
        Self {
            method: None,
            path_contains: path_contains.to_owned(),
            times: usize::MAX,
            misbehaviour,
        }
    }

    pub fn method(mut self, method: &'static str) -> Self {
        self.method = Some(method);
        self
    }

    pub fn times(mut self, times: usize) -> Self {
        self.times = times;
        self
    }
}

/// One request as the registry saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// The scheme of the `Authorization` header (`Bearer`, `Basic`), if there was one; the
    /// credentials themselves are never kept.
    pub authorization: Option<String>,
    /// The `Host` header.
    pub host: Option<String>,
    pub peer: Option<SocketAddr>,
    /// The [`Misbehaviour::name`] of the rule that answered, if one did.
    pub misbehaviour: Option<&'static str>,
    /// The status answered; `None` while a [`Misbehaviour::Hang`] holds the request.
    pub status: Option<u16>,
}

/// A request to the registry's own token endpoint. Test credentials only ever reach it, so
/// they are kept, for tests to check what a client sent where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub method: String,
    /// The query (`service=...&scope=...`).
    pub query: String,
    /// HTTP basic credentials, if any.
    pub username: Option<String>,
    pub password: Option<String>,
    pub peer: Option<SocketAddr>,
}

/// Where bytes of a stored blob are.
#[derive(Debug, Clone)]
enum Content {
    Memory(Bytes),
    File(Arc<tempfile::TempPath>, u64),
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Self::Memory(bytes) => bytes.len() as u64,
            Self::File(_, size) => *size,
        }
    }

    fn stream(&self) -> LocalBoxStream<'static, io::Result<Bytes>> {
        match self {
            Self::Memory(bytes) => {
                stream::once(std::future::ready(Ok(bytes.clone()))).boxed_local()
            }
            Self::File(path, _) => {
                let path = path.clone();
                // The path is held only until the file is open: an open file outlives its name,
                // and a stream a client abandoned (its server thread may outlive the test) then
                // keeps no temporary file on disk.
                stream::once(async move { tokio::fs::File::open(&**path).await })
                    .flat_map(|file| match file {
                        Ok(file) => tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024)
                            .boxed_local(),
                        Err(error) => stream::once(std::future::ready(Err(error))).boxed_local(),
                    })
                    .boxed_local()
            }
        }
    }
}

#[derive(Debug, Clone)]
struct StoredManifest {
    media_type: String,
    bytes: Bytes,
}

#[derive(Debug, Default)]
struct Repository {
    manifests: HashMap<String, StoredManifest>,
    blobs: HashMap<String, Content>,
}

struct State {
    base_url: String,
    repositories: Mutex<HashMap<String, Repository>>,
    rules: Mutex<Vec<Rule>>,
    /// The realm of bearer challenges, when tokens are required.
    token_realm: Mutex<Option<String>>,
    issued_tokens: Mutex<HashSet<String>>,
    requests: Mutex<Vec<Recorded>>,
    token_requests: Mutex<Vec<TokenRequest>>,
    served_bytes: Arc<AtomicU64>,
    connections: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

/// The running registry; stops when dropped.
pub struct HostileRegistry {
    state: Arc<State>,
    addr: SocketAddr,
    certificate_pem: Option<String>,
    handle: actix_web::dev::ServerHandle,
}

impl HostileRegistry {
    /// Plain HTTP on a free port of 127.0.0.1. Call inside a Tokio runtime.
    pub fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Plain HTTP on `addr` (port 0: a free one; IPv6 works, and a metadata address inside
    /// [`crate::netns::run_isolated`]). Call inside a Tokio runtime.
    pub fn start_on(addr: SocketAddr) -> Self {
        Self::start_with(addr, None)
    }

    /// HTTPS (HTTP/1.1 only) on a free port of 127.0.0.1, with a self-signed certificate for
    /// `localhost`, `127.0.0.1` and `::1` (see [`Self::certificate_pem`]).
    pub fn start_tls() -> Self {
        Self::start_tls_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// HTTPS on `addr`; the certificate also names `addr`'s IP.
    pub fn start_tls_on(addr: SocketAddr) -> Self {
        crate::init();
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
        let certified =
            rcgen::generate_simple_self_signed(names).expect("a self-signed certificate");
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("a TLS configuration");
        // HTTP/1.1 only: lies about lengths are HTTP/1.1 framing.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self::start_with(addr, Some((config, certified.cert.pem())))
    }

    fn start_with(addr: SocketAddr, tls: Option<(rustls::ServerConfig, String)>) -> Self {
        crate::init();
        crate::netns::assert_safe_to_bind(addr.ip());
        let (tls_config, certificate_pem) = tls.unzip();
        // The default realm needs the bound port: bind first, then hand the listener to actix.
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("bind the hostile registry on {addr}: {e}"));
        let addr = listener.local_addr().expect("the registry's address");
        let scheme = if tls_config.is_some() {
            "https"
        } else {
            "http"
        };
        let state = Arc::new(State {
            base_url: format!("{scheme}://{addr}"),
            repositories: Mutex::new(HashMap::new()),
            rules: Mutex::new(Vec::new()),
            token_realm: Mutex::new(None),
            issued_tokens: Mutex::new(HashSet::new()),
            requests: Mutex::new(Vec::new()),
            token_requests: Mutex::new(Vec::new()),
            served_bytes: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(AtomicUsize::new(0)),
            shutdown: CancellationToken::new(),
        });
        let counting = state.connections.clone();
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(handle))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .on_connect(move |_, _| {
            counting.fetch_add(1, Ordering::SeqCst);
        });
        let server = match tls_config {
            None => server.listen(listener),
            Some(config) => server.listen_rustls_0_23(listener, config),
        }
        .expect("serve on the registry's listener")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            state,
            addr,
            certificate_pem,
            handle,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:<port>` (`[::1]:<port>` for IPv6): the registry host in references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://host` (`https://` from [`Self::start_tls`]).
    pub fn base_url(&self) -> String {
        self.state.base_url.clone()
    }

    /// The PEM certificate of a TLS registry, for a client to trust.
    pub fn certificate_pem(&self) -> Option<&str> {
        self.certificate_pem.as_deref()
    }

    /// Serves `image` as `repository:tag` and by digest, with its config and layers as blobs.
    /// Non-distributable (foreign) layers are left out, as on a real registry: they are
    /// fetched from their `urls`. Add one with [`Self::add_blob`] to serve it anyway.
    pub fn add_image(&self, repository: &str, tag: &str, image: &BuiltImage) {
        self.add_image_blobs(repository, image);
        self.add_manifest(repository, tag, image.media_type, image.manifest.clone());
    }

    /// Serves `index` as `repository:tag` and by digest, with every child by digest.
    pub fn add_index(&self, repository: &str, tag: &str, index: &BuiltIndex) {
        for child in &index.children {
            self.add_image_blobs(repository, child);
            self.add_manifest(
                repository,
                &child.digest,
                child.media_type,
                child.manifest.clone(),
            );
        }
        self.add_manifest(repository, tag, index.media_type, index.manifest.clone());
    }

    fn add_image_blobs(&self, repository: &str, image: &BuiltImage) {
        let mut repositories = self.state.repositories.lock().expect("registry content");
        let blobs = &mut repositories.entry(repository.to_owned()).or_default().blobs;
        for blob in image
            .blobs()
            .filter(|b| !is_non_distributable(b.media_type))
        {
            let content = match &blob.data {
                BlobData::Memory(bytes) => Content::Memory(bytes.clone()),
                BlobData::File(path) => Content::File(path.clone(), blob.size),
            };
            blobs.insert(blob.digest.clone(), content);
        }
    }

    /// Serves `bytes` as a manifest of `media_type` under `reference`. A tag is also served
    /// by the digest of the bytes; a digest reference is taken as given, whether or not the
    /// bytes hash to it. That is how an index "points at itself" (see
    /// [`Self::add_self_referencing_index`]) or a digest serves other content.
    pub fn add_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) {
        let stored = StoredManifest {
            media_type: media_type.to_owned(),
            bytes: bytes.into(),
        };
        let mut repositories = self.state.repositories.lock().expect("registry content");
        let manifests = &mut repositories
            .entry(repository.to_owned())
            .or_default()
            .manifests;
        if !is_digest(reference) {
            manifests.insert(crate::sha256_digest(&stored.bytes), stored.clone());
        }
        manifests.insert(reference.to_owned(), stored);
    }

    /// Serves `bytes` as the blob `digest`, whether or not they hash to it.
    pub fn add_blob(&self, repository: &str, digest: &str, bytes: impl Into<Bytes>) {
        self.state
            .repositories
            .lock()
            .expect("registry content")
            .entry(repository.to_owned())
            .or_default()
            .blobs
            .insert(digest.to_owned(), Content::Memory(bytes.into()));
    }

    /// Serves, as `repository:tag`, an OCI index whose one entry is an index that is "itself".
    ///
    /// An index cannot contain its own digest (that would take a SHA-256 fixed point), so the
    /// entry names a made-up digest and the registry serves the same index bytes under it:
    /// a client that follows the entry gets the same index again, forever, unless it checks
    /// that what it fetched by digest hashes to that digest (or bounds its depth). Returns the
    /// digest the entry names.
    pub fn add_self_referencing_index(&self, repository: &str, tag: &str) -> String {
        let claimed = crate::sha256_digest(
            format!("testkit self-referencing index {repository}:{tag}").as_bytes(),
        );
        // The entry's size should be the index's own: iterate until the number of digits settles.
        let mut size = 0usize;
        let bytes = loop {
            let index = json!({
                "schemaVersion": 2,
                "mediaType": crate::image::OCI_INDEX,
                "manifests": [{
                    "mediaType": crate::image::OCI_INDEX,
                    "digest": claimed,
                    "size": size,
                }],
            });
            let bytes = serde_json::to_vec_pretty(&index).expect("index serialises");
            if bytes.len() == size {
                break bytes;
            }
            size = bytes.len();
        };
        self.add_manifest(repository, tag, crate::image::OCI_INDEX, bytes.clone());
        self.add_manifest(repository, &claimed, crate::image::OCI_INDEX, bytes);
        claimed
    }

    /// Adds a misbehaviour rule; the first matching rule with times left answers a request.
    /// Panics if the rule cannot be put on the wire (a header value with CR, LF or NUL...).
    pub fn add_rule(&self, rule: Rule) {
        rule.misbehaviour.validate();
        self.state.rules.lock().expect("rules").push(rule);
    }

    /// Removes every rule: the registry is honest again.
    pub fn clear_rules(&self) {
        self.state.rules.lock().expect("rules").clear();
    }

    /// Requires a bearer token from now on: requests without one issued by the registry's
    /// own token endpoint get `401` with `WWW-Authenticate: Bearer realm="<realm>",
    /// service="hostile",scope="repository:<name>:pull"`. `realm: None` is the registry's
    /// own `/token`; anything else is announced as given (a metadata address, an `http://`
    /// realm for an `https` registry, another host) and nothing is checked.
    pub fn require_token(&self, realm: Option<String>) {
        let realm = realm.unwrap_or_else(|| self.token_realm_default());
        header_value(format!("Bearer realm=\"{realm}\"").as_bytes());
        *self.state.token_realm.lock().expect("token realm") = Some(realm);
    }

    /// The registry's own token endpoint.
    pub fn token_realm_default(&self) -> String {
        format!("{}/token", self.state.base_url)
    }

    /// Every request so far, in order of arrival (of their answers, for those that waited).
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("records").clone()
    }

    /// Requests to the registry's own token endpoint.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.state.token_requests.lock().expect("records").clone()
    }

    /// Bytes of response bodies handed to connections so far (headers not counted).
    pub fn served_bytes(&self) -> u64 {
        self.state.served_bytes.load(Ordering::SeqCst)
    }

    /// TCP (or TLS) connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Stops the server, answering nothing more; hung requests are let go.
    pub async fn stop(self) {
        self.state.shutdown.cancel();
        self.handle.stop(false).await;
    }
}

impl Drop for HostileRegistry {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
        // Sends the stop command now; the returned future only waits for its completion.
        drop(self.handle.stop(false));
        // The server's worker thread may outlive the test with the state: let go of the images
        // now, so a layer built on disk (a temporary file) goes with its last handle.
        self.state
            .repositories
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

fn is_digest(reference: &str) -> bool {
    reference.contains(':')
}

fn header_name(name: &str) -> HeaderName {
    HeaderName::from_bytes(name.as_bytes())
        .unwrap_or_else(|_| panic!("{name:?} cannot be an HTTP header name"))
}

fn header_value(value: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(value).unwrap_or_else(|_| {
        panic!(
            "{:?} cannot be sent as an HTTP header value: only visible ASCII, space, TAB and \
             bytes 0x80-0xFF can (no CR, LF, NUL or other control bytes)",
            String::from_utf8_lossy(value)
        )
    })
}

/// How a body is framed on the wire.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// `Content-Length` as given; the body must match it.
    Sized(u64),
    /// Chunked transfer encoding.
    Chunked,
    /// `Content-Length` as given, whatever the body is; the connection is closed after it.
    Declared(u64),
}

/// What a body stream does on its way out.
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    bytes_per_second: Option<u64>,
    flip_at: Option<u64>,
    cut_after: Option<u64>,
}

/// A response before it is shaped: status, headers, body and its honest length.
struct Answer {
    status: u16,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Content,
}

impl Answer {
    fn new(status: u16, content_type: &str, body: Content) -> Self {
        Self {
            status,
            headers: vec![(
                actix_web::http::header::CONTENT_TYPE,
                header_value(content_type.as_bytes()),
            )],
            body,
        }
    }

    fn json(status: u16, value: serde_json::Value) -> Self {
        Self::new(
            status,
            "application/json",
            Content::Memory(Bytes::from(value.to_string())),
        )
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        Self::json(
            status,
            json!({ "errors": [{ "code": code, "message": message, "detail": null }] }),
        )
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((header_name(name), header_value(value.as_bytes())));
        self
    }
}

async fn handle(req: HttpRequest, state: web::Data<State>) -> HttpResponse {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| req.path().to_owned());
    let method = req.method().as_str().to_owned();
    let rule = take_matching_rule(&state, &method, &path);
    let mut record = Recorded {
        method,
        path,
        authorization: req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            }),
        host: req
            .headers()
            .get(actix_web::http::header::HOST)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        peer: req.peer_addr(),
        misbehaviour: rule.as_ref().map(Misbehaviour::name),
        status: None,
    };
    let head_only = req.method() == actix_web::http::Method::HEAD;
    let response = match rule {
        Some(Misbehaviour::Hang) => {
            state.requests.lock().expect("records").push(record);
            state.shutdown.cancelled().await;
            return HttpResponse::ServiceUnavailable().force_close().finish();
        }
        Some(misbehaviour) => misbehave(&req, &state, misbehaviour, head_only),
        None => {
            let answer = honest_answer(&req, &state);
            let framing = Framing::Sized(answer.body.len());
            shaped(&state, answer, framing, Shape::default(), head_only)
        }
    };
    record.status = Some(response.status().as_u16());
    state.requests.lock().expect("records").push(record);
    response
}

fn take_matching_rule(state: &State, method: &str, path: &str) -> Option<Misbehaviour> {
    let mut rules = state.rules.lock().expect("rules");
    let rule = rules.iter_mut().find(|r| {
        r.times > 0 && path.contains(&r.path_contains) && r.method.is_none_or(|m| m == method)
    })?;
    rule.times = rule.times.saturating_sub(1);
    Some(rule.misbehaviour.clone())
}

fn misbehave(
    req: &HttpRequest,
    state: &State,
    misbehaviour: Misbehaviour,
    head_only: bool,
) -> HttpResponse {
    match misbehaviour {
        Misbehaviour::Oversized {
            status,
            bytes,
            declare_length,
        } => {
            let content_type = if req.path().contains("/manifests/") {
                crate::image::OCI_MANIFEST
            } else if req.path().contains("/blobs/") {
                "application/octet-stream"
            } else {
                "application/json"
            };
            let mut builder = builder(
                status,
                &[(
                    actix_web::http::header::CONTENT_TYPE,
                    header_value(content_type.as_bytes()),
                )],
            );
            let framing = if declare_length {
                Framing::Sized(bytes)
            } else {
                Framing::Chunked
            };
            let body = if head_only {
                stream::empty().boxed_local()
            } else {
                filler(bytes)
            };
            finish(&mut builder, body, framing, Shape::default(), state)
        }
        Misbehaviour::Trickle {
            bytes_per_second,
            body,
        } => {
            let answer = match body {
                Some(body) => Answer::new(
                    200,
                    "application/octet-stream",
                    Content::Memory(body.into()),
                ),
                None => honest_answer(req, state),
            };
            let framing = Framing::Sized(answer.body.len());
            let shape = Shape {
                bytes_per_second: Some(bytes_per_second),
                ..Shape::default()
            };
            shaped(state, answer, framing, shape, head_only)
        }
        Misbehaviour::Redirect { status, location } => builder(
            status,
            &[(
                actix_web::http::header::LOCATION,
                header_value(location.as_bytes()),
            )],
        )
        .finish(),
        Misbehaviour::Respond {
            status,
            headers,
            body,
        } => {
            let headers: Vec<(HeaderName, HeaderValue)> = headers
                .iter()
                .map(|(name, value)| (header_name(name), header_value(value)))
                .collect();
            let answer = Answer {
                status,
                headers,
                body: Content::Memory(body.into()),
            };
            let framing = Framing::Sized(answer.body.len());
            shaped(state, answer, framing, Shape::default(), head_only)
        }
        Misbehaviour::Lie(lie) => {
            let mut answer = honest_answer(req, state);
            let length = answer.body.len();
            let (framing, shape) = match lie {
                Lie::LengthLonger { extra } => {
                    (Framing::Declared(length + extra), Shape::default())
                }
                Lie::LengthShorter { fewer } => (
                    Framing::Declared(length.saturating_sub(fewer)),
                    Shape::default(),
                ),
                Lie::WrongContent => (
                    Framing::Sized(length),
                    Shape {
                        flip_at: Some(length / 2),
                        ..Shape::default()
                    },
                ),
                Lie::DigestHeader(digest) => {
                    answer
                        .headers
                        .retain(|(name, _)| name.as_str() != "docker-content-digest");
                    answer = answer.header("Docker-Content-Digest", &digest);
                    (Framing::Sized(length), Shape::default())
                }
            };
            shaped(state, answer, framing, shape, head_only)
        }
        Misbehaviour::CloseMidBody { after_bytes } => {
            let answer = honest_answer(req, state);
            let framing = Framing::Sized(answer.body.len());
            let shape = Shape {
                cut_after: Some(after_bytes),
                ..Shape::default()
            };
            shaped(state, answer, framing, shape, head_only)
        }
        Misbehaviour::Hang => unreachable!("answered by the caller"),
    }
}

fn builder(status: u16, headers: &[(HeaderName, HeaderValue)]) -> HttpResponseBuilder {
    let mut builder =
        HttpResponse::build(StatusCode::from_u16(status).expect("validated status code"));
    for (name, value) in headers {
        builder.append_header((name.clone(), value.clone()));
    }
    builder
}

fn shaped(
    state: &State,
    answer: Answer,
    framing: Framing,
    shape: Shape,
    head_only: bool,
) -> HttpResponse {
    let mut builder = builder(answer.status, &answer.headers);
    let body = if head_only {
        stream::empty().boxed_local()
    } else {
        answer.body.stream()
    };
    finish(&mut builder, body, framing, shape, state)
}

fn finish(
    builder: &mut HttpResponseBuilder,
    body: LocalBoxStream<'static, io::Result<Bytes>>,
    framing: Framing,
    shape: Shape,
    state: &State,
) -> HttpResponse {
    let body = Shaper::new(body, shape, state.served_bytes.clone()).into_stream();
    match framing {
        Framing::Sized(length) => builder.body(SizedStream::new(length, body)),
        Framing::Chunked => builder.body(BodyStream::new(body)),
        Framing::Declared(length) => {
            // No chunking and a Content-Length of our own: actix writes the body as it comes
            // ("until close" framing on its side) under the header we chose.
            builder
                .no_chunking(length)
                .force_close()
                .body(BodyStream::new(body))
        }
    }
}

/// The answer an honest registry would give.
fn honest_answer(req: &HttpRequest, state: &State) -> Answer {
    let path = req.path();
    if path == "/token" {
        return token_answer(req, state);
    }
    let Some(api_path) = path.strip_prefix("/v2") else {
        return Answer::error(404, "NOT_FOUND", "not a distribution API path");
    };
    let api_path = api_path.trim_start_matches('/');
    let (repository, route) = match route(api_path) {
        Some((repository, route)) => (Some(repository), Some(route)),
        None if api_path.is_empty() => (None, None),
        None => return Answer::error(404, "NAME_UNKNOWN", "no such route or repository"),
    };
    if let Some(challenge) = challenge_unless_authorised(req, state, repository) {
        return Answer::error(401, "UNAUTHORIZED", "authentication required")
            .header("WWW-Authenticate", &challenge)
            .header("Docker-Distribution-API-Version", "registry/2.0");
    }
    let method = req.method().as_str();
    if !matches!(method, "GET" | "HEAD") {
        return Answer::error(405, "UNSUPPORTED", "this registry is read-only");
    }
    let (Some(repository), Some(route)) = (repository, route) else {
        return Answer::json(200, json!({}))
            .header("Docker-Distribution-API-Version", "registry/2.0");
    };
    let repositories = state.repositories.lock().expect("registry content");
    let stored = repositories.get(repository);
    match route {
        Route::Manifest(reference) => match stored.and_then(|r| r.manifests.get(reference)) {
            Some(manifest) => Answer::new(
                200,
                &manifest.media_type,
                Content::Memory(manifest.bytes.clone()),
            )
            .header(
                "Docker-Content-Digest",
                &crate::sha256_digest(&manifest.bytes),
            ),
            None => Answer::error(404, "MANIFEST_UNKNOWN", "manifest unknown"),
        },
        Route::Blob(digest) => match stored.and_then(|r| r.blobs.get(digest)) {
            Some(content) => Answer::new(200, "application/octet-stream", content.clone())
                .header("Docker-Content-Digest", digest),
            None => Answer::error(404, "BLOB_UNKNOWN", "blob unknown to registry"),
        },
        Route::Tags => match stored {
            Some(stored) => {
                let mut tags: Vec<&String> =
                    stored.manifests.keys().filter(|r| !is_digest(r)).collect();
                tags.sort();
                Answer::json(200, json!({ "name": repository, "tags": tags }))
            }
            None => Answer::error(404, "NAME_UNKNOWN", "repository name not known to registry"),
        },
    }
}

enum Route<'a> {
    Manifest(&'a str),
    Blob(&'a str),
    Tags,
}

/// Splits `<name>/manifests/<ref>` and the like; the name may contain slashes.
fn route(api_path: &str) -> Option<(&str, Route<'_>)> {
    if let Some(repository) = api_path.strip_suffix("/tags/list") {
        return (!repository.is_empty()).then_some((repository, Route::Tags));
    }
    let (repository, kind, reference) = [("/manifests/", 0), ("/blobs/", 1)]
        .iter()
        .filter_map(|(marker, kind)| {
            api_path
                .rfind(marker)
                .map(|at| (&api_path[..at], *kind, &api_path[at + marker.len()..]))
        })
        .max_by_key(|(repository, _, _)| repository.len())?;
    if repository.is_empty() || reference.is_empty() || reference.contains('/') {
        return None;
    }
    Some((
        repository,
        if kind == 0 {
            Route::Manifest(reference)
        } else {
            Route::Blob(reference)
        },
    ))
}

/// The `WWW-Authenticate` value to answer with, unless tokens are not required or the request
/// carries one the registry issued.
fn challenge_unless_authorised(
    req: &HttpRequest,
    state: &State,
    repository: Option<&str>,
) -> Option<String> {
    let realm = state.token_realm.lock().expect("token realm").clone()?;
    let presented = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if presented.is_some_and(|token| state.issued_tokens.lock().expect("tokens").contains(token)) {
        return None;
    }
    let mut challenge = format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\"");
    if let Some(repository) = repository {
        challenge.push_str(&format!(",scope=\"repository:{repository}:pull\""));
    }
    Some(challenge)
}

/// The token endpoint: any credentials, or none, get a token; they are recorded.
fn token_answer(req: &HttpRequest, state: &State) -> Answer {
    let credentials = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|encoded| {
            base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
        })
        .map(|decoded| {
            let decoded = String::from_utf8_lossy(&decoded).into_owned();
            match decoded.split_once(':') {
                Some((user, password)) => (user.to_owned(), Some(password.to_owned())),
                None => (decoded, None),
            }
        });
    let (username, password) = match credentials {
        Some((user, password)) => (Some(user), password),
        None => (None, None),
    };
    state
        .token_requests
        .lock()
        .expect("records")
        .push(TokenRequest {
            method: req.method().as_str().to_owned(),
            query: req.query_string().to_owned(),
            username,
            password,
            peer: req.peer_addr(),
        });
    let token = format!("hostile-{}", uuid::Uuid::new_v4().simple());
    state
        .issued_tokens
        .lock()
        .expect("tokens")
        .insert(token.clone());
    Answer::json(
        200,
        json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_EXPIRES_IN,
            "issued_at": chrono::Utc::now().to_rfc3339(),
        }),
    )
}

/// 64 KiB of filler, shared by every oversized body.
static FILLER: [u8; 64 * 1024] = [b'x'; 64 * 1024];
const FILLER_PREFIX: &[u8] = b"{\"filler\":\"";

/// `total` bytes of `{"filler":"xxx...`, made as they are sent.
fn filler(total: u64) -> LocalBoxStream<'static, io::Result<Bytes>> {
    stream::unfold(0u64, move |sent| async move {
        if sent >= total {
            return None;
        }
        let source: &'static [u8] = if sent == 0 { FILLER_PREFIX } else { &FILLER };
        let take = (total - sent).min(source.len() as u64) as usize;
        Some((Ok(Bytes::from_static(&source[..take])), sent + take as u64))
    })
    .boxed_local()
}

/// Applies a [`Shape`] to a body and counts what goes out.
struct Shaper {
    inner: LocalBoxStream<'static, io::Result<Bytes>>,
    pending: Bytes,
    position: u64,
    shape: Shape,
    served: Arc<AtomicU64>,
    done: bool,
}

impl Shaper {
    fn new(
        inner: LocalBoxStream<'static, io::Result<Bytes>>,
        shape: Shape,
        served: Arc<AtomicU64>,
    ) -> Self {
        Self {
            inner,
            pending: Bytes::new(),
            position: 0,
            shape,
            served,
            done: false,
        }
    }

    fn into_stream(self) -> Pin<Box<dyn Stream<Item = io::Result<Bytes>>>> {
        Box::pin(stream::unfold(self, |mut shaper| async move {
            let item = shaper.next_chunk().await?;
            Some((item, shaper))
        }))
    }

    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.done {
            return None;
        }
        if self.shape.cut_after.is_some_and(|cut| self.position >= cut) {
            self.done = true;
            // Let the server flush the head and the bytes so far first: an error straight away
            // would drop them with the connection, and the client would see no response at all.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Some(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "hostile registry: dropping the connection mid-body on purpose",
            )));
        }
        while self.pending.is_empty() {
            match self.inner.next().await {
                None => return None,
                Some(Err(error)) => {
                    self.done = true;
                    return Some(Err(error));
                }
                Some(Ok(chunk)) => self.pending = chunk,
            }
        }
        let mut take = self.pending.len() as u64;
        if let Some(rate) = self.shape.bytes_per_second {
            let step = (rate / 10).max(1);
            take = take.min(step);
            // The first piece goes at once; each later one waits its share of a second.
            if self.position > 0 {
                tokio::time::sleep(Duration::from_secs_f64(take as f64 / rate as f64)).await;
            }
        }
        if let Some(cut) = self.shape.cut_after {
            take = take.min(cut - self.position);
        }
        let mut chunk = self.pending.split_to(take as usize);
        if let Some(flip) = self.shape.flip_at
            && (self.position..self.position + take).contains(&flip)
        {
            let mut owned = BytesMut::from(&chunk[..]);
            owned[(flip - self.position) as usize] ^= 0x01;
            chunk = owned.freeze();
        }
        self.position += take;
        self.served.fetch_add(take, Ordering::SeqCst);
        Some(Ok(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_split_names_with_slashes() {
        let Some((name, Route::Manifest(reference))) = route("a/b/c/manifests/v1") else {
            panic!("a manifest route")
        };
        assert_eq!((name, reference), ("a/b/c", "v1"));
        let Some((name, Route::Blob(digest))) = route("x/blobs/sha256:00") else {
            panic!("a blob route")
        };
        assert_eq!((name, digest), ("x", "sha256:00"));
        // A repository may be called "manifests" or "blobs".
        let Some((name, Route::Blob(_))) = route("manifests/blobs/sha256:00") else {
            panic!("a blob route")
        };
        assert_eq!(name, "manifests");
        assert!(matches!(
            route("lib/app/tags/list"),
            Some(("lib/app", Route::Tags))
        ));
        assert!(route("").is_none());
        assert!(route("app/manifests/").is_none());
        assert!(route("app/uploads/x").is_none());
    }

    #[test]
    #[should_panic(expected = "cannot be sent as an HTTP header value")]
    fn header_values_with_line_breaks_are_refused() {
        Misbehaviour::Respond {
            status: 500,
            headers: vec![("X-Injected".into(), b"a\r\nSet-Cookie: b".to_vec())],
            body: Vec::new(),
        }
        .validate();
    }

    #[test]
    fn obs_text_and_tab_are_sendable() {
        Misbehaviour::Respond {
            status: 500,
            headers: vec![("X-Hostile".into(), b"a\tb\xc2\x9b31m\xff".to_vec())],
            body: b"\0\r\n\x1b[31m".to_vec(),
        }
        .validate();
    }
}
