//! A plain TCP listener that proves whether a client connected to an address at all.
//!
//! Tests of what a client refuses (a redirect to 127.0.0.2, a realm on 169.254.169.254, a
//! foreign layer URL) assert on the target's side: [`TcpTarget::accepted`] counts raw TCP
//! connections, before any HTTP, so even a client that gave up after connecting is seen. It
//! answers every connection with a small `200 OK`, so that a client which did connect would
//! succeed and the test could not mistake a refusal for a failure of the target.
//!
//! Link-local and metadata addresses can only be bound inside [`crate::netns::run_isolated`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How much of a connection's first bytes are kept.
const FIRST_BYTES_LIMIT: usize = 4096;
/// How long to wait for a request head before answering anyway (a TLS client never sends one).
const READ_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nConnection: close\r\n\r\ntcp-target";

/// One accepted connection.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub peer: SocketAddr,
    /// Up to 4 KiB read before answering: the request line and headers of an HTTP client.
    pub first_bytes: Vec<u8>,
}

/// The running target; stops accepting when dropped.
pub struct TcpTarget {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    accept_loop: tokio::task::AbortHandle,
}

impl TcpTarget {
    /// Listens on `addr` (port 0: any free port). Call inside a Tokio runtime. Panics for a
    /// link-local or metadata address outside a private namespace (see [`crate::netns`]).
    pub fn bind(addr: SocketAddr) -> Self {
        crate::netns::assert_safe_to_bind(addr.ip());
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("bind the TCP target on {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let listener =
            tokio::net::TcpListener::from_std(listener).expect("a Tokio runtime to listen in");
        let addr = listener.local_addr().expect("the target's address");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let recording = accepted.clone();
        let accept_loop = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    // Out of file descriptors and the like: try again, without spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let slot = {
                    let mut accepted = recording.lock().expect("target records");
                    accepted.push(Accepted {
                        peer,
                        first_bytes: Vec::new(),
                    });
                    accepted.len() - 1
                };
                tokio::spawn(serve(stream, slot, recording.clone()));
            }
        })
        .abort_handle();
        Self {
            addr,
            accepted,
            accept_loop,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port` (`[v6]:port` for IPv6), for URLs and references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://host:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many TCP connections were accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.lock().expect("target records").len()
    }

    /// Each connection's first bytes, decoded lossily (e.g. `GET /path HTTP/1.1\r\n...`).
    pub fn received(&self) -> Vec<String> {
        self.connections()
            .iter()
            .map(|c| String::from_utf8_lossy(&c.first_bytes).into_owned())
            .collect()
    }

    pub fn connections(&self) -> Vec<Accepted> {
        self.accepted.lock().expect("target records").clone()
    }

    /// Waits up to `timeout` for at least `n` connections; returns whether they came.
    pub async fn wait_for_connections(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.accepted() >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// Reads the request head (or what arrives within the timeout), records it, answers 200.
async fn serve(
    mut stream: tokio::net::TcpStream,
    slot: usize,
    accepted: Arc<Mutex<Vec<Accepted>>>,
) {
    let mut first_bytes = Vec::new();
    let mut buffer = [0u8; 1024];
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        while first_bytes.len() < FIRST_BYTES_LIMIT {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = FIRST_BYTES_LIMIT - first_bytes.len();
                    first_bytes.extend_from_slice(&buffer[..n.min(room)]);
                    if first_bytes.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    // Recorded before answering: a client that got the answer finds its request recorded.
    accepted.lock().expect("target records")[slot].first_bytes = first_bytes;
    let _ = stream.write_all(RESPONSE).await;
    let _ = stream.shutdown().await;
}
