//! A programmable HTTP proxy in front of a registry, for what a healthy registry never does:
//! answer 429 with `Retry-After`, 403, 500, or serve a crafted manifest, or the network between
//! does: cut a response part-way, or carry it at a limited rate. Requests that match no rule are
//! forwarded unchanged (bodies streamed both ways), so the rest of the protocol, auth and
//! ranges included, is the real registry's.

use std::sync::{Arc, Mutex};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use futures_util::StreamExt;

/// A canned answer for matching requests.
#[derive(Debug, Clone)]
pub struct Rule {
    pub method: Option<&'static str>,
    /// The request path must contain this.
    pub path_contains: String,
    /// How many requests it answers before it stops matching (`usize::MAX`: forever).
    pub times: usize,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Instead of a canned answer: forward the request, and cut the connection after this
    /// many bytes of the registry's response body.
    pub cut_after: Option<u64>,
}

impl Rule {
    pub fn new(path_contains: &str, status: u16) -> Self {
        Self {
            method: None,
            path_contains: path_contains.to_owned(),
            times: usize::MAX,
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_after: None,
        }
    }

    /// Forwards matching requests, cutting each response after `bytes` bytes of body.
    pub fn cut_after(path_contains: &str, bytes: u64) -> Self {
        Self {
            cut_after: Some(bytes),
            ..Self::new(path_contains, 0)
        }
    }

    pub fn times(mut self, times: usize) -> Self {
        self.times = times;
        self
    }

    pub fn method(mut self, method: &'static str) -> Self {
        self.method = Some(method);
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
}

struct State {
    upstream: String,
    rules: Mutex<Vec<Rule>>,
    answered: Mutex<Vec<(String, u16)>>,
    client: reqwest::Client,
    /// Bytes per second of every forwarded response body (0: as fast as it comes).
    rate: std::sync::atomic::AtomicU64,
    /// Response body bytes forwarded to clients so far.
    forwarded: Arc<std::sync::atomic::AtomicU64>,
}

/// The running proxy; stops with the test's runtime.
pub struct FaultProxy {
    state: Arc<State>,
    port: u16,
}

impl FaultProxy {
    /// Starts a proxy to `upstream_base_url` (`http://127.0.0.1:<port>`). Call inside a Tokio runtime.
    pub fn start(upstream_base_url: &str) -> Self {
        let state = Arc::new(State {
            upstream: upstream_base_url.trim_end_matches('/').to_owned(),
            rules: Mutex::new(Vec::new()),
            answered: Mutex::new(Vec::new()),
            rate: Default::default(),
            forwarded: Default::default(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("proxy client"),
        });
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(handle))
        })
        .workers(1)
        .bind("127.0.0.1:0")
        .expect("bind the proxy");
        let port = server.addrs()[0].port();
        tokio::spawn(server.run());
        Self { state, port }
    }

    /// `127.0.0.1:<port>`, to use as the registry host in references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn add(&self, rule: Rule) {
        self.state.rules.lock().unwrap().push(rule);
    }

    /// Drops every rule: from now on everything is forwarded.
    pub fn clear_rules(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    /// Carries every forwarded response body at `bytes_per_second` from now on (0: unlimited),
    /// as a slow link would.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.state
            .rate
            .store(bytes_per_second, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes of response bodies forwarded to clients so far (what crossed the "link").
    pub fn forwarded_bytes(&self) -> u64 {
        self.state
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The requests a rule answered: (path, status).
    pub fn answered(&self) -> Vec<(String, u16)> {
        self.state.answered.lock().unwrap().clone()
    }
}

async fn handle(
    req: HttpRequest,
    mut payload: web::Payload,
    state: web::Data<State>,
) -> HttpResponse {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let canned = {
        let mut rules = state.rules.lock().unwrap();
        rules
            .iter_mut()
            .find(|r| {
                r.times > 0
                    && path_and_query.contains(&r.path_contains)
                    && r.method.is_none_or(|m| m == req.method().as_str())
            })
            .map(|rule| {
                rule.times -= 1;
                rule.clone()
            })
    };
    let mut cut_after = None;
    if let Some(rule) = canned.as_ref().filter(|rule| rule.cut_after.is_some()) {
        state
            .answered
            .lock()
            .unwrap()
            .push((path_and_query.clone(), 0));
        cut_after = rule.cut_after;
    } else if let Some(rule) = canned {
        state
            .answered
            .lock()
            .unwrap()
            .push((path_and_query, rule.status));
        let mut response =
            HttpResponse::build(actix_web::http::StatusCode::from_u16(rule.status).unwrap());
        for (name, value) in &rule.headers {
            response.insert_header((name.as_str(), value.as_str()));
        }
        return response.body(rule.body);
    }

    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        match chunk {
            Ok(chunk) => body.extend_from_slice(&chunk),
            Err(_) => return HttpResponse::BadRequest().finish(),
        }
    }
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes()).unwrap();
    let mut forward = state
        .client
        .request(method, format!("{}{path_and_query}", state.upstream));
    for (name, value) in req.headers() {
        // Keep Host: the registry builds upload Locations from it, so they point back at us.
        if name.as_str() != "content-length" {
            forward = forward.header(name.as_str(), value.as_bytes());
        }
    }
    let upstream = match forward.body(body).send().await {
        Ok(response) => response,
        Err(error) => return HttpResponse::BadGateway().body(error.to_string()),
    };
    let mut response = HttpResponse::build(
        actix_web::http::StatusCode::from_u16(upstream.status().as_u16()).unwrap(),
    );
    for (name, value) in upstream.headers() {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            response.insert_header((name.as_str(), value.as_bytes()));
        }
    }
    if let Some(length) = upstream.content_length() {
        response.no_chunking(length);
    }
    let rate = state.rate.load(std::sync::atomic::Ordering::Relaxed);
    let forwarded = state.forwarded.clone();
    let mut left = cut_after.unwrap_or(u64::MAX);
    let body = upstream
        .bytes_stream()
        .map(move |chunk| {
            let mut chunk = chunk.map_err(std::io::Error::other)?;
            if left == 0 {
                return Err(std::io::Error::other("cut by the fault proxy"));
            }
            if chunk.len() as u64 > left {
                chunk.truncate(left as usize);
            }
            left -= chunk.len() as u64;
            Ok(chunk)
        })
        .then(move |item| {
            let forwarded = forwarded.clone();
            async move {
                if let Ok(chunk) = &item {
                    if rate > 0 {
                        let seconds = chunk.len() as f64 / rate as f64;
                        tokio::time::sleep(std::time::Duration::from_secs_f64(seconds)).await;
                    }
                    forwarded.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                item
            }
        });
    response.streaming(body)
}
