//! A small bearer-token issuer for the distribution registry's `auth.token` mode.
//!
//! It plays the part of Docker Hub's `auth.docker.io`: clients that got a 401 challenge come
//! to its realm with `?service=...&scope=repository:<name>:<actions>` (and basic credentials),
//! and get a JWT signed with an ES256 key whose self-signed certificate the registry trusts
//! (`rootcertbundle`); the certificate travels in the token's `x5c` header.
//!
//! It serves HTTP/1.1 from a plain thread so it works from sync and async tests alike, and
//! counts the tokens it issued so tests can check that clients cache them.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

pub const SERVICE: &str = "tailor-test-registry";
pub const ISSUER: &str = "tailor-test-issuer";

/// Who may get which token.
#[derive(Debug, Clone)]
pub struct IssuerPolicy {
    pub username: String,
    pub password: String,
    /// Whether a request without credentials gets a pull-only token (as Docker Hub gives for
    /// public images) instead of a 401.
    pub anonymous_pull: bool,
    /// Lifetime of issued tokens, in seconds.
    pub expires_in: u64,
}

struct Shared {
    policy: IssuerPolicy,
    key: EncodingKey,
    cert_b64: String,
    issued: AtomicUsize,
    stopping: AtomicBool,
}

/// A running token issuer; stops when dropped.
pub struct TokenIssuer {
    shared: Arc<Shared>,
    port: u16,
    root_cert_bundle: PathBuf,
    _dir: tempfile::TempDir,
}

#[derive(Serialize)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

#[derive(Serialize)]
struct Claims {
    iss: &'static str,
    sub: String,
    aud: &'static str,
    exp: i64,
    nbf: i64,
    iat: i64,
    jti: String,
    access: Vec<Access>,
}

impl TokenIssuer {
    pub fn start(policy: IssuerPolicy) -> Self {
        let key_pair = rcgen::KeyPair::generate().expect("generate an ES256 key");
        let params =
            rcgen::CertificateParams::new(vec![ISSUER.to_owned()]).expect("certificate params");
        let cert = params
            .self_signed(&key_pair)
            .expect("self-sign the issuer certificate");
        let dir = tempfile::tempdir().expect("issuer directory");
        let root_cert_bundle = dir.path().join("issuer.pem");
        std::fs::write(&root_cert_bundle, cert.pem()).expect("write the root cert bundle");
        let shared = Arc::new(Shared {
            policy,
            key: EncodingKey::from_ec_der(&key_pair.serialize_der()),
            cert_b64: base64::engine::general_purpose::STANDARD.encode(cert.der()),
            issued: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the issuer");
        let port = listener.local_addr().expect("issuer address").port();
        let serving = shared.clone();
        std::thread::Builder::new()
            .name("token-issuer".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if serving.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let shared = serving.clone();
                    std::thread::spawn(move || handle(stream, &shared));
                }
            })
            .expect("spawn the issuer thread");
        Self {
            shared,
            port,
            root_cert_bundle,
            _dir: dir,
        }
    }

    /// The realm URL the registry's challenges point at.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    pub fn root_cert_bundle(&self) -> &Path {
        &self.root_cert_bundle
    }

    /// How many tokens were issued so far.
    pub fn issued(&self) -> usize {
        self.shared.issued.load(Ordering::SeqCst)
    }

    /// A token for `repository` with `actions`, minted directly (used by test set-up to push).
    pub fn mint(&self, repository: &str, actions: &[&str]) -> String {
        sign(
            &self.shared,
            &self.shared.policy.username,
            vec![Access {
                kind: "repository".into(),
                name: repository.into(),
                actions: actions.iter().map(|a| a.to_string()).collect(),
            }],
        )
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn sign(shared: &Shared, subject: &str, access: Vec<Access>) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        iss: ISSUER,
        sub: subject.to_owned(),
        aud: SERVICE,
        exp: now + shared.policy.expires_in as i64,
        nbf: now - 5,
        iat: now,
        jti: uuid::Uuid::new_v4().to_string(),
        access,
    };
    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some("JWT".into());
    header.x5c = Some(vec![shared.cert_b64.clone()]);
    jsonwebtoken::encode(&header, &claims, &shared.key).expect("sign a token")
}

fn handle(mut stream: TcpStream, shared: &Shared) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(value.trim().to_owned());
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = respond(shared, target, authorization.as_deref());
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn respond(shared: &Shared, target: &str, authorization: Option<&str>) -> (&'static str, String) {
    let Some(query) = target.strip_prefix("/token") else {
        return ("404 Not Found", r#"{"error":"not found"}"#.into());
    };
    let query = query.trim_start_matches('?');
    let subject = match authorization.and_then(|a| a.strip_prefix("Basic ")) {
        Some(encoded) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok());
            let expected = format!("{}:{}", shared.policy.username, shared.policy.password);
            match decoded {
                Some(pair) if pair == expected => Some(shared.policy.username.clone()),
                _ => {
                    return (
                        "401 Unauthorized",
                        r#"{"details":"incorrect username or password"}"#.into(),
                    );
                }
            }
        }
        None if shared.policy.anonymous_pull => None,
        None => {
            return (
                "401 Unauthorized",
                r#"{"details":"authentication required"}"#.into(),
            );
        }
    };
    let mut access = Vec::new();
    for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if key != "scope" {
            continue;
        }
        let scope = percent_decode(value);
        // type:name:actions; the name sits between the first and the last colon.
        let Some((kind, rest)) = scope.split_once(':') else {
            continue;
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        let actions = actions
            .split(',')
            .filter(|action| subject.is_some() || *action == "pull")
            .map(str::to_owned)
            .collect();
        access.push(Access {
            kind: kind.into(),
            name: name.into(),
            actions,
        });
    }
    let token = sign(shared, subject.as_deref().unwrap_or(""), access);
    shared.issued.fetch_add(1, Ordering::SeqCst);
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": shared.policy.expires_in,
        "issued_at": chrono::Utc::now().to_rfc3339(),
    });
    ("200 OK", body.to_string())
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding() {
        assert_eq!(
            super::percent_decode("repository%3Afoo%2Fbar%3Apull%2Cpush"),
            "repository:foo/bar:pull,push"
        );
        assert_eq!(super::percent_decode("a%2"), "a%2");
    }
}
