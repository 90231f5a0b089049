//! The HTTP listener: accepts connections up to a cap, optionally speaks TLS (rustls, ring
//! provider), serves HTTP/1.1 through hyper with a header-read timeout, and on shutdown
//! gives open requests a deadline before it closes what is left.
//!
//! Why our own accept loop rather than `axum::serve`: that one has no connection cap, no
//! header-read timeout (a half-sent header held a socket for 101 s) and waits for every
//! connection on shutdown (a slow client kept the process alive 25 s after SIGTERM).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tower::Service;

/// How connections are limited.
#[derive(Clone)]
pub struct ListenerConfig {
    /// Time allowed for a request's head, counted from when the connection is ready for one:
    /// so it is also the idle keep-alive timeout, and bounds the TLS handshake.
    pub header_read_timeout: Duration,
    /// Connections served at once; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// After the shutdown signal, how long open requests may still run.
    pub shutdown_timeout: Duration,
    pub tls: Option<TlsAcceptor>,
}

/// Loads a PEM certificate chain and private key for the listener.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .with_context(|| {
            format!(
                "--tls-cert {}: not a readable PEM certificate chain",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        bail!("--tls-cert {}: no certificate in the file", cert.display());
    }
    // The key's parse error is not shown: it could quote key bytes.
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|_| {
        anyhow::anyhow!(
            "--tls-key {}: not a readable PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        )
    })?;
    // ring explicitly: the build has two providers (aws-lc-rs comes with the AWS SDK), so
    // rustls cannot pick a process default on its own.
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| {
        format!(
            "--tls-cert {} and --tls-key {} do not form a usable pair",
            cert.display(),
            key.display()
        )
    })?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains within the deadline.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: ListenerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let config = Arc::new(config);
    tokio::pin!(shutdown);

    // Logged once each time the cap is reached, not once per waiting connection.
    let mut at_cap = false;
    loop {
        while connections.try_join_next().is_some() {}
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                at_cap = false;
                permit
            }
            Err(_) => {
                if !at_cap {
                    at_cap = true;
                    tracing::warn!(
                        max_connections = config.max_connections,
                        "connection limit reached; new connections wait"
                    );
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before accept: keep
                    // serving the connections we have, try again shortly.
                    tracing::warn!(error = %error, "accept failed");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            },
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(connection(
            stream,
            remote,
            router.clone(),
            http.clone(),
            config.clone(),
            permit,
            stop_rx.clone(),
        ));
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let open = connections.len();
    let drained = tokio::time::timeout(config.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            of = open,
            shutdown_timeout_ms = config.shutdown_timeout.as_millis() as u64,
            "shutdown deadline reached; closing the remaining connections"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// One connection: the TLS handshake (bounded by the header-read timeout), then HTTP/1.1
/// until the client leaves, a timeout closes it, or shutdown asks it to finish.
async fn connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    router: Router,
    http: hyper::server::conn::http1::Builder,
    config: Arc<ListenerConfig>,
    _permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    match &config.tls {
        None => http_connection(stream, remote, router, http, stop).await,
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(config.header_read_timeout, acceptor.accept(stream));
            let tls = tokio::select! {
                () = stopped(&mut stop) => return,
                tls = handshake => tls,
            };
            match tls {
                Ok(Ok(tls)) => http_connection(tls, remote, router, http, stop).await,
                Ok(Err(error)) => {
                    tracing::debug!(%remote, error = %error, "TLS handshake failed")
                }
                Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
            }
        }
    }
}

async fn http_connection<I>(
    io: I,
    remote: SocketAddr,
    router: Router,
    http: hyper::server::conn::http1::Builder,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        // Handlers read the source address for event metadata, as with axum::serve.
        request.extensions_mut().insert(ConnectInfo(remote));
        router.clone().call(request)
    });
    let served = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = stopped(&mut stop) => {
            // Idle connections close now; a request in progress finishes (or meets the
            // shutdown deadline).
            served.as_mut().graceful_shutdown();
            served.as_mut().await
        }
    };
    if let Err(error) = result {
        // Header-read timeouts, resets and malformed requests: the client's problem.
        tracing::debug!(%remote, error = %error, "connection ended with an error");
    }
}

/// Resolves once shutdown has begun (or the listener is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, not across an await.
    let _ = stop.wait_for(|stopped| *stopped).await.map(|_| ());
}
