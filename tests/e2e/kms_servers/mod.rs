//! The KMS servers the BYOK tests talk to over HTTP: a real `moto_server` (AWS KMS), a
//! fault-injecting proxy in front of it (moto ignores key state for crypto, and never
//! throttles or times out), and in-test fakes of Google Cloud KMS and Azure Key Vault that
//! answer with the documented request and response shapes and error codes (`cloud.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

/// Serves `router` on a free loopback port for the rest of the test.
pub(crate) async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{address}")
}

// ---------------------------------------------------------------------------------------
// moto

/// A `moto_server` of this test's own, killed on drop.
pub struct Moto {
    child: Child,
    pub url: String,
    client: reqwest::Client,
}

impl Moto {
    pub async fn start() -> Moto {
        let port = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap().port()
        };
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moto_server is installed (pip install 'moto[server]')");
        // Ready when it logs "Running on", which werkzeug does once its socket listens; the
        // log (a line per request) is drained after that.
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut ready_tx = Some(ready_tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("Running on") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let url = format!("http://127.0.0.1:{port}");
        let moto = Moto {
            child,
            url,
            client: reqwest::Client::new(),
        };
        match tokio::time::timeout(Duration::from_secs(60), ready).await {
            Ok(Ok(())) => moto,
            _ => panic!("moto_server did not start on port {port}"),
        }
    }

    /// Calls a KMS operation directly (moto reads the region from the signature scope and
    /// does not check the signature).
    pub async fn kms(&self, operation: &str, body: Value) -> Value {
        let response = self
            .client
            .post(&self.url)
            .header("X-Amz-Target", format!("TrentService.{operation}"))
            .header("Content-Type", "application/x-amz-json-1.1")
            .header(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0",
            )
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{operation}: {}",
            response.status()
        );
        response.json().await.unwrap_or(Value::Null)
    }

    /// A new symmetric key; returns its ARN.
    pub async fn create_key(&self) -> String {
        let created = self
            .kms("CreateKey", json!({"Description": "ekm test"}))
            .await;
        created["KeyMetadata"]["Arn"].as_str().unwrap().to_owned()
    }

    /// moto's state-changing operations take the bare key id, not the ARN.
    pub fn key_id(arn: &str) -> &str {
        arn.rsplit('/').next().unwrap()
    }

    pub async fn disable(&self, arn: &str) {
        self.kms("DisableKey", json!({"KeyId": Moto::key_id(arn)}))
            .await;
    }

    pub async fn enable(&self, arn: &str) {
        self.kms("EnableKey", json!({"KeyId": Moto::key_id(arn)}))
            .await;
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Credentials for a test environment (moto accepts any).
pub fn aws_environment() -> ekm_kms::Environment {
    ekm_kms::Environment::from_map(HashMap::from([
        ("AWS_ACCESS_KEY_ID".to_owned(), "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), "testing".to_owned()),
    ]))
}

// ---------------------------------------------------------------------------------------
// Faults

/// What a faulty server answers instead of the real one.
#[derive(Clone, Debug)]
pub enum Fault {
    /// An error answer: HTTP status and body.
    Answer(u16, Value),
    /// No answer for this long (longer than the client waits).
    Stall(Duration),
    /// The real answer, this much later (a slow KMS).
    Delay(Duration),
}

/// Faults armed on a server: for an operation (or every one, `"*"`), `times` times
/// (`usize::MAX`: until cleared). Counts the requests it saw.
#[derive(Clone, Default)]
pub struct Faults {
    armed: Arc<Mutex<Vec<(String, Fault, usize)>>>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Faults {
    pub fn arm(&self, operation: &str, fault: Fault, times: usize) {
        self.armed
            .lock()
            .unwrap()
            .push((operation.to_owned(), fault, times));
    }

    pub fn clear(&self) {
        self.armed.lock().unwrap().clear();
    }

    /// How many requests for `operation` arrived.
    pub fn seen(&self, operation: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.as_str() == operation)
            .count()
    }

    /// The fault for this request, if one is armed.
    fn take(&self, operation: &str) -> Option<Fault> {
        self.seen.lock().unwrap().push(operation.to_owned());
        let mut armed = self.armed.lock().unwrap();
        let slot = armed
            .iter_mut()
            .find(|(op, _, times)| (op == operation || op == "*") && *times > 0)?;
        if slot.2 != usize::MAX {
            slot.2 -= 1;
        }
        Some(slot.1.clone())
    }

    async fn apply(&self, operation: &str) -> Option<Response> {
        match self.take(operation)? {
            Fault::Answer(status, body) => Some(
                (
                    StatusCode::from_u16(status).unwrap(),
                    [("content-type", "application/x-amz-json-1.1")],
                    body.to_string(),
                )
                    .into_response(),
            ),
            Fault::Stall(duration) => {
                // A KMS that does not answer in time: the delay is the fault under test.
                tokio::time::sleep(duration).await;
                Some(StatusCode::GATEWAY_TIMEOUT.into_response())
            }
            Fault::Delay(duration) => {
                // A slow KMS: the delay is the fault under test; then the real answer.
                tokio::time::sleep(duration).await;
                None
            }
        }
    }
}

/// An AWS KMS error answer (JSON 1.1 protocol: the type in `__type`).
pub fn aws_error(code: &str, message: &str) -> Fault {
    Fault::Answer(400, json!({"__type": code, "message": message}))
}

/// A proxy in front of moto that answers with the armed faults instead, per KMS operation
/// (`Encrypt`, `Decrypt`, `DescribeKey`, ...); everything else goes to moto unchanged.
pub async fn aws_fault_proxy(moto_url: &str) -> (String, Faults) {
    #[derive(Clone)]
    struct Proxy {
        upstream: String,
        faults: Faults,
        client: reqwest::Client,
    }
    async fn handle(State(proxy): State<Proxy>, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        let operation = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("TrentService."))
            .unwrap_or("")
            .to_owned();
        if let Some(response) = proxy.faults.apply(&operation).await {
            return response;
        }
        let mut upstream = proxy.client.request(
            parts.method.clone(),
            format!("{}{}", proxy.upstream, parts.uri.path()),
        );
        for (name, value) in &parts.headers {
            if name != "host" && name != "content-length" {
                upstream = upstream.header(name, value);
            }
        }
        let answer = upstream.body(body).send().await.unwrap();
        let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
        let content_type = answer
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/x-amz-json-1.1")
            .to_owned();
        let bytes = answer.bytes().await.unwrap_or_default();
        (status, [("content-type", content_type)], bytes).into_response()
    }
    let faults = Faults::default();
    let proxy = Proxy {
        upstream: moto_url.to_owned(),
        faults: faults.clone(),
        client: reqwest::Client::new(),
    };
    let url = serve(Router::new().fallback(handle).with_state(proxy)).await;
    (url, faults)
}

mod cloud;
pub use cloud::*;
