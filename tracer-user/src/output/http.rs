//! The `/metrics` HTTP endpoint, served by hyper. In a DaemonSet it listens
//! beyond loopback from a process holding CAP_SYS_ADMIN, so request parsing
//! is left to a maintained HTTP implementation, and every connection is
//! bounded in size, time and number: a malformed request gets a 400 and a
//! close, a slow one (slowloris) is cut off, and neither can hold the
//! runtime the tracing loop shares.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, ACCEPT, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

/// What the endpoint serves: the metrics in both text formats. A trait so
/// that this transport does not import the metrics it carries.
pub trait Exposition: Send + Sync + 'static {
    /// OpenMetrics text.
    fn encode(&self) -> String;
    /// The classic Prometheus text format.
    fn encode_classic(&self) -> String;
}

/// The whole request head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection ends after this, whatever it is doing.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's smallest read buffer: a longer request head is refused (431).
const MAX_HEAD: usize = 8 << 10;
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 32;

/// Answers `GET /metrics` until the runtime ends.
pub async fn serve<M: Exposition>(listener: TcpListener, m: Arc<M>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            // Out of descriptors, say: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let m = m.clone();
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| answer(req, m.clone())),
                );
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

async fn answer<M: Exposition>(
    req: Request<Incoming>,
    m: Arc<M>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n"));
    }
    if req.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "ctdrop serves /metrics only\n",
        ));
    }
    // Prometheus asks for OpenMetrics; curl, promtool and older scrapers
    // get the classic format.
    let openmetrics = req.headers().get_all(ACCEPT).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.to_ascii_lowercase()
                .contains("application/openmetrics-text")
        })
    });
    let (ctype, body) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.encode(),
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            m.encode_classic(),
        )
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    Ok(r)
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}
