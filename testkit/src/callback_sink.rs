//! A fake Cloud Controller endpoint: records the completion callbacks POSTed to it, and can be
//! told to fail the first few (to exercise retries) or be stopped and started again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

#[derive(Default)]
struct State {
    received: Mutex<Vec<(String, serde_json::Value)>>,
    fail_next: Mutex<usize>,
}

pub struct CallbackSink {
    state: Arc<State>,
    port: u16,
    handle: actix_web::dev::ServerHandle,
}

impl CallbackSink {
    /// Starts on a free loopback port, or on `port` (to come back after a restart).
    pub fn start_on(port: u16) -> Self {
        Self::start_with(Arc::new(State::default()), port)
    }

    pub fn start() -> Self {
        Self::start_on(0)
    }

    fn start_with(state: Arc<State>, port: u16) -> Self {
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(receive))
        })
        .workers(1)
        .bind(("127.0.0.1", port))
        .expect("bind the callback sink");
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            state,
            port,
            handle,
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Answer the next `n` callbacks with 500.
    pub fn fail_next(&self, n: usize) {
        *self.state.fail_next.lock().unwrap() = n;
    }

    /// Callbacks received so far (path, body), failed ones excluded.
    pub fn received(&self) -> Vec<(String, serde_json::Value)> {
        self.state.received.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for a callback on `path`.
    pub async fn wait_for(&self, path: &str, timeout: Duration) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((_, body)) = self.received().into_iter().find(|(p, _)| p == path) {
                return Some(body);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}

async fn receive(req: HttpRequest, body: web::Bytes, state: web::Data<State>) -> HttpResponse {
    {
        let mut fail = state.fail_next.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            return HttpResponse::InternalServerError().finish();
        }
    }
    let value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    state
        .received
        .lock()
        .unwrap()
        .push((req.path().to_owned(), value));
    HttpResponse::Ok().finish()
}
