//! The byte stream under a device's link: a plain TCP socket, or a TLS session over one for
//! `wss://` and `mqtts://` URLs (rustls client on *ring*, trusting only the CA file given with
//! `--tls-ca`, so the same generator measures TLS on and off). This module owns loading that CA
//! into a client configuration and the client handshake; it does not speak WebSocket or MQTT.
//! Invariant: a TLS link verifies the server's certificate against `--tls-ca` and the URL's
//! host name; there is no "insecure" mode.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_tungstenite::tokio::TokioAdapter;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The client side of TLS for one run: the configuration every link shares and the name the
/// server's certificate must carry.
#[derive(Debug, Clone)]
pub struct TlsClient {
    /// rustls client configuration trusting `--tls-ca` only.
    config: Arc<rustls::ClientConfig>,
    /// The URL's host (DNS name or IP address).
    name: ServerName<'static>,
}

impl TlsClient {
    /// A client trusting the PEM CA certificates in `ca`, checking the server's certificate for
    /// `host` (a DNS name or an IP address).
    pub fn new(ca: &Path, host: &str) -> Result<TlsClient, String> {
        let pem = std::fs::read(ca).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "--tls-ca {}: no PEM CERTIFICATE in the file",
                ca.display()
            ));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host} is neither a DNS name nor an IP address"))?;
        Ok(TlsClient {
            config: Arc::new(config),
            name,
        })
    }

    /// Runs the client handshake over `tcp`.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<Transport> {
        let connector = futures_rustls::TlsConnector::from(Arc::clone(&self.config));
        let tls = connector
            .connect(self.name.clone(), TokioAdapter::new(tcp))
            .await?;
        Ok(Transport::Tls(Box::new(TokioAdapter::new(tls))))
    }
}

/// rustls on *ring*, as the server uses it (see src/net/tls.rs).
#[allow(deprecated)]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A link's stream (tokio's I/O traits; wrap in [`TokioAdapter`] for futures-io users).
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the session is large next to a socket).
    Tls(Box<TokioAdapter<futures_rustls::client::TlsStream<TokioAdapter<TcpStream>>>>),
}

impl Transport {
    /// The TCP socket under the stream, if plain (for its non-blocking `try_read`).
    pub fn plain(&self) -> Option<&TcpStream> {
        match self {
            Transport::Plain(tcp) => Some(tcp),
            Transport::Tls(_) => None,
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("geobeat-load-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let e = TlsClient::new(&missing, "localhost").unwrap_err();
        assert!(
            e.starts_with("--tls-ca ") && e.contains("missing.pem"),
            "{e}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = TlsClient::new(&empty, "localhost").unwrap_err();
        assert!(e.contains("no PEM CERTIFICATE"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
