//! TLS for the device edge (`--tls-listen`: wss:// and https; `--mqtts-listen`: mqtts://). It
//! owns loading the certificate chain, key and optional client CA (`--tls-cert`, `--tls-key`,
//! `--tls-client-ca`) into a rustls server configuration, swapping in a new one on SIGHUP
//! ([`TlsFiles::reload`]; a bad file keeps the old configuration and logs one line), each
//! executor's [`Acceptor`] (its cached configuration, the handshake rate bound and the handshake
//! timeout), and the device identity a client certificate carries ([`peer_names`],
//! [`check_identity`]). It does not read HTTP, WebSocket or MQTT: a finished handshake yields a
//! stream that the router ([`crate::net::router`]) or the MQTT connection
//! ([`crate::net::mqtt`]) serves exactly like a TCP socket (generic over [`Conn`],
//! monomorphised: the plain TCP path is unchanged). The session itself, on rustls's unbuffered
//! API so that an idle connection holds no TLS buffer, is [`session`]'s.
//!
//! Where a TLS connection lives: on the executor that accepted it. A TLS session cannot be handed
//! to another executor the way `/v1/ingest` hands a plain socket to its device's owner (the
//! session keys and sequence numbers live in this process's memory, tied to one task), so a TLS
//! device connection stays where it was accepted and its heartbeats cross the mesh to their
//! shard's owner, as MQTT connections and `--routing forward` do. One mesh hop per frame is the
//! cost; it is small next to the TLS record work.
//!
//! Client certificates (mTLS, `--tls-client-ca`): a client that presents a certificate must
//! present one that chains to that CA (otherwise the handshake fails). A *device* connection
//! (`/v1/ingest` over wss, MQTT over mqtts) must then present one, and the certificate must name
//! the token's subject: for a device token, one of the certificate's names (its subject CN, or a
//! DNS or URI subject-alternative name) equals the device id; for a gateway token, one name
//! equals the gateway prefix. The token is still required: the certificate binds the connection
//! to a device, the token says what it may do (and can be revoked or expire without reissuing
//! certificates). The HTTP API and subscribers over TLS need no client certificate (operators'
//! tools), but a certificate they present must still chain to the CA.
//!
//! Invariants: every executor serves handshakes with the newest configuration that loaded (a
//! generation counter, one atomic load per accept); an open connection keeps the configuration
//! it was accepted with (rustls holds its own reference), so a reload drops no connection; an
//! executor starts at most [`TLS_HANDSHAKES_PER_S_MAX`] handshakes per second (burst
//! [`TLS_HANDSHAKE_BURST_MAX`]) and each one ends within [`TLS_HANDSHAKE_TIMEOUT_MS`].

use std::cell::{Cell, RefCell};
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use crate::auth::Scope;
use crate::limits::{
    TLS_HANDSHAKES_PER_S_MAX, TLS_HANDSHAKE_BURST_MAX, TLS_HANDSHAKE_TIMEOUT_MS, TLS_PEM_BYTES_MAX,
};
use crate::rt::{self, TcpStream};

mod session;

/// A TLS server session over a TCP socket (rustls's unbuffered API, see [`session`]), boxed once
/// per connection: the session state (about a kilobyte inline) would otherwise be laid out again
/// in every nested connection future that holds the stream (router, kind, WebSocket), which
/// multiplied the idle cost per connection.
pub type TlsStream = Box<session::Session>;

/// A connection's byte stream as the router and the connection kinds see it: a TCP socket or a
/// TLS session over one. Generic (monomorphised), so the plain path pays nothing for TLS.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + 'static {
    /// The client's address, if the socket still knows it.
    fn peer(&self) -> Option<SocketAddr>;
    /// The socket's descriptor if the connection may be handed to another executor (a plain
    /// socket); `None` for a TLS session, which stays where it was accepted.
    fn handoff_fd(&self) -> Option<RawFd>;
    /// The names of the client certificate (`None`: no TLS, or no certificate presented).
    fn client_names(&self) -> Option<Vec<String>>;
    /// Whether the connection came over TLS.
    fn is_tls(&self) -> bool;
    /// The TCP socket's descriptor (for socket options; never to read or write).
    fn socket_fd(&self) -> RawFd;
    /// Ends our sending side (TCP: FIN; TLS: close_notify, then FIN), reading stays open.
    fn shutdown_write(&mut self) -> impl std::future::Future<Output = std::io::Result<()>>;
}

impl Conn for TcpStream {
    fn peer(&self) -> Option<SocketAddr> {
        self.peer_addr().ok()
    }
    fn handoff_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
    fn client_names(&self) -> Option<Vec<String>> {
        None
    }
    fn is_tls(&self) -> bool {
        false
    }
    fn socket_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    async fn shutdown_write(&mut self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
            .await
            .map_err(std::io::Error::from)
    }
}

impl Conn for TlsStream {
    fn peer(&self) -> Option<SocketAddr> {
        self.socket().peer_addr().ok()
    }
    fn handoff_fd(&self) -> Option<RawFd> {
        None
    }
    fn client_names(&self) -> Option<Vec<String>> {
        let cert = self.peer_certificates()?.first()?;
        Some(peer_names(cert))
    }
    fn is_tls(&self) -> bool {
        true
    }
    fn socket_fd(&self) -> RawFd {
        self.socket().as_raw_fd()
    }
    async fn shutdown_write(&mut self) -> std::io::Result<()> {
        futures_lite::AsyncWriteExt::close(self).await
    }
}

/// The names a certificate gives its subject: the subject's common names, then its DNS and URI
/// subject-alternative names (empty if it does not parse).
pub fn peer_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = x
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::URI(s) => names.push((*s).to_owned()),
                _ => {}
            }
        }
    }
    names
}

/// Why a device connection's client certificate does not fit its token (the answer's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityError {
    /// `--tls-client-ca` is set and the device presented no certificate.
    Missing,
    /// The certificate names neither the token's device id nor its gateway prefix.
    Mismatch,
}

impl IdentityError {
    /// A short, stable reason.
    pub fn reason(self) -> &'static str {
        match self {
            IdentityError::Missing => "client certificate required",
            IdentityError::Mismatch => "client certificate does not name the token's device",
        }
    }
}

/// What a connection's client certificate says, as far as a device's token must agree with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCert {
    /// Nothing to check: plain TCP, or no `--tls-client-ca`.
    Unchecked,
    /// TLS with `--tls-client-ca`, and no certificate presented.
    Missing,
    /// The names of the certificate presented (it chains to the CA: rustls checked that).
    Names(Vec<String>),
}

impl ClientCert {
    /// What `stream` presented; `mtls`: whether `--tls-client-ca` is set.
    pub fn of<S: Conn>(stream: &S, mtls: bool) -> ClientCert {
        if !mtls || !stream.is_tls() {
            return ClientCert::Unchecked;
        }
        match stream.client_names() {
            Some(names) => ClientCert::Names(names),
            None => ClientCert::Missing,
        }
    }

    /// Checks a device connection's token scope against the certificate (see the module doc).
    pub fn check(&self, scope: &Scope) -> Result<(), IdentityError> {
        let subject = match scope {
            Scope::Device(id) => id,
            Scope::Gateway(prefix) => prefix,
            // Not device connections: the token alone decides.
            Scope::Ops | Scope::Subscriber(_) => return Ok(()),
        };
        match self {
            ClientCert::Unchecked => Ok(()),
            ClientCert::Missing => Err(IdentityError::Missing),
            ClientCert::Names(names) if names.iter().any(|n| n == subject) => Ok(()),
            ClientCert::Names(_) => Err(IdentityError::Mismatch),
        }
    }
}

/// Why TLS could not be configured. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{what} {}: {source}", path.display())]
    Read {
        /// `--tls-cert`, `--tls-key` or `--tls-client-ca`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind expected, or is too large.
    #[error("{what} {}: {reason}", path.display())]
    Pem {
        /// `--tls-cert`, `--tls-key` or `--tls-client-ca`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key does not belong to the certificate, or rustls refused the pair.
    #[error("--tls-cert {} and --tls-key {}: {reason}", cert.display(), key.display())]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The TLS files, the configuration loaded from them last, and its generation.
pub struct TlsFiles {
    /// `--tls-cert`: PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// `--tls-key`: PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// `--tls-client-ca`: PEM CA certificates for client certificates (mTLS), if any.
    pub client_ca: Option<PathBuf>,
    /// The configuration new handshakes use.
    current: RwLock<Arc<ServerConfig>>,
    /// Bumped on every successful reload (executors compare it to their cached copy).
    generation: AtomicU64,
}

impl TlsFiles {
    /// Loads the files once (start-up: an error is fatal, see `main`).
    pub fn load(
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
    ) -> Result<TlsFiles, TlsError> {
        let config = build(&cert, &key, client_ca.as_deref())?;
        Ok(TlsFiles {
            cert,
            key,
            client_ca,
            current: RwLock::new(Arc::new(config)),
            generation: AtomicU64::new(0),
        })
    }

    /// Whether client certificates are checked (`--tls-client-ca`).
    pub fn mtls(&self) -> bool {
        self.client_ca.is_some()
    }

    /// Reads the files again (SIGHUP). Success: new handshakes use the new certificate, open
    /// connections keep theirs. Failure: the old configuration stays and one line says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        match build(&self.cert, &self.key, self.client_ca.as_deref()) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::info!(
                    generation,
                    cert = %self.cert.display(),
                    "TLS certificate reloaded; new handshakes use it, open connections keep theirs"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; still serving the previous certificate");
                Err(e)
            }
        }
    }

    fn snapshot(&self) -> (u64, Arc<ServerConfig>) {
        // The generation first: a reload between the two reads is seen again on the next accept.
        let generation = self.generation.load(Ordering::Acquire);
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (generation, config)
    }
}

/// Reads a PEM file, bounded in size.
fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut bytes = Vec::new();
    file.take(TLS_PEM_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > TLS_PEM_BYTES_MAX {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            reason: format!("larger than {TLS_PEM_BYTES_MAX} bytes"),
        });
    }
    Ok(bytes)
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(what, path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        what,
        path: path.to_owned(),
        reason: format!("not a PEM certificate file: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            reason: "no PEM CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

/// Builds a rustls server configuration (ring; TLS 1.2 and 1.3) from the files.
fn build(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerConfig, TlsError> {
    let chain = read_certs("--tls-cert", cert)?;
    let key_pem = read_pem("--tls-key", key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        what: "--tls-key",
        path: key.to_owned(),
        reason: format!("no PEM private key (PKCS#8, SEC1 or PKCS#1): {e}"),
    })?;
    let pair = |reason: String| TlsError::Pair {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let provider = Arc::new(ring_provider());
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| pair(format!("unusable private key: {e}")))?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| pair(format!("the key does not match the certificate: {e}")))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| pair(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("--tls-client-ca", ca)? {
                roots.add(c).map_err(|e| TlsError::Pem {
                    what: "--tls-client-ca",
                    path: ca.to_owned(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
            // Optional at the handshake: the device kinds require one (`check_identity`), the
            // HTTP API does not; a certificate presented must chain to this CA either way.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Pem {
                    what: "--tls-client-ca",
                    path: ca.to_owned(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(Single(Arc::new(certified))));
    // No session tickets: they would cost a ticket key rotation per process for little gain on
    // devices that stay connected; the default in-memory session cache still resumes.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// rustls on *ring*: its default cipher suites and key exchanges (X25519, P-256, P-384). rustls
/// 0.23.48 deprecates this provider because *ring* has no post-quantum key exchange; aws-lc-rs
/// has one but needs cmake and a C toolchain at build time. A device fleet's clients do not
/// offer post-quantum groups yet; revisit with rustls 0.24.
#[allow(deprecated)]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// One certificate for every handshake.
#[derive(Debug)]
struct Single(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Single {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Watches SIGHUP on a thread of its own and reloads `files` on each one, until [`HupWatch`] is
/// dropped.
pub struct HupWatch {
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HupWatch {
    /// Starts the watcher.
    pub fn start(files: Arc<TlsFiles>) -> std::io::Result<HupWatch> {
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("geobeat-tls-reload".into())
            .spawn(move || {
                for _ in signals.forever() {
                    let _ = files.reload();
                }
            })?;
        Ok(HupWatch {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for HupWatch {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One executor's TLS acceptor: its copy of the current configuration and its handshake rate
/// bound (a token bucket in thousandths of a handshake).
pub struct Acceptor {
    files: Arc<TlsFiles>,
    /// The generation and configuration last taken from `files`.
    cached: RefCell<(u64, Arc<ServerConfig>)>,
    /// Thousandths of handshakes that may start now.
    tokens_milli: Cell<u64>,
    /// When the bucket was last refilled.
    refilled: Cell<Instant>,
}

impl Acceptor {
    /// An executor's acceptor serving `files`.
    pub fn new(files: Arc<TlsFiles>) -> Acceptor {
        let (generation, config) = files.snapshot();
        Acceptor {
            files,
            cached: RefCell::new((generation, config)),
            tokens_milli: Cell::new(u64::from(TLS_HANDSHAKE_BURST_MAX) * 1000),
            refilled: Cell::new(Instant::now()),
        }
    }

    /// Whether client certificates are checked.
    pub fn mtls(&self) -> bool {
        self.files.mtls()
    }

    /// Takes one handshake from the rate bound; false: over the rate (close the socket unread).
    pub fn admit(&self) -> bool {
        let now = Instant::now();
        let elapsed_us = now.duration_since(self.refilled.get()).as_micros() as u64;
        let cap = u64::from(TLS_HANDSHAKE_BURST_MAX) * 1000;
        // Rate per µs in thousandths: handshakes/s × 1000 / 1e6.
        let add = elapsed_us.saturating_mul(u64::from(TLS_HANDSHAKES_PER_S_MAX)) / 1000;
        if add > 0 {
            self.tokens_milli
                .set((self.tokens_milli.get() + add).min(cap));
            self.refilled.set(now);
        }
        let t = self.tokens_milli.get();
        if t >= 1000 {
            self.tokens_milli.set(t - 1000);
            true
        } else {
            false
        }
    }

    /// Runs the server handshake on `stream` with the newest configuration, within
    /// [`TLS_HANDSHAKE_TIMEOUT_MS`]: the session, or why not (a short reason for the metric).
    pub async fn handshake(&self, stream: TcpStream) -> Result<TlsStream, &'static str> {
        let config = {
            let latest = self.files.generation.load(Ordering::Acquire);
            let mut cached = self.cached.borrow_mut();
            if cached.0 != latest {
                *cached = self.files.snapshot();
            }
            cached.1.clone()
        };
        match rt::timeout(
            Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS),
            session::Session::accept(stream, config),
        )
        .await
        {
            Some(Ok(s)) => Ok(Box::new(s)),
            Some(Err(_)) => Err("handshake_failed"),
            None => Err("handshake_timeout"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_bound_admits_the_burst_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(TlsFiles {
            cert: dir.path().join("c"),
            key: dir.path().join("k"),
            client_ca: None,
            current: RwLock::new(Arc::new(
                ServerConfig::builder_with_provider(Arc::new(ring_provider()))
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_cert_resolver(
                        Arc::new(rustls::server::ResolvesServerCertUsingSni::new()),
                    ),
            )),
            generation: AtomicU64::new(0),
        });
        let a = Acceptor::new(files);
        // Freeze the refill: the bucket starts full.
        let admitted = (0..TLS_HANDSHAKE_BURST_MAX * 2)
            .filter(|_| {
                a.refilled.set(Instant::now());
                a.admit()
            })
            .count();
        // At most the burst plus what a few µs refill between calls.
        assert!(admitted >= TLS_HANDSHAKE_BURST_MAX as usize);
        assert!(admitted < (TLS_HANDSHAKE_BURST_MAX as usize) * 2);
    }

    #[test]
    fn a_device_certificate_must_name_the_tokens_device_or_gateway_prefix() {
        let names = ClientCert::Names(vec!["fleet device".into(), "dev-1".into()]);
        let device = |id: &str| Scope::Device(id.into());
        assert_eq!(names.check(&device("dev-1")), Ok(()));
        assert_eq!(names.check(&device("dev-2")), Err(IdentityError::Mismatch));
        // A gateway's certificate names its prefix exactly (not a device under it).
        let gw = ClientCert::Names(vec!["fleet-a/".into()]);
        assert_eq!(gw.check(&Scope::Gateway("fleet-a/".into())), Ok(()));
        assert_eq!(
            names.check(&Scope::Gateway("dev-".into())),
            Err(IdentityError::Mismatch)
        );
        assert_eq!(
            ClientCert::Missing.check(&device("dev-1")),
            Err(IdentityError::Missing)
        );
        // Plain TCP or no client CA: the token alone decides; so it does for ops and subscribers.
        assert_eq!(ClientCert::Unchecked.check(&device("dev-1")), Ok(()));
        assert_eq!(ClientCert::Missing.check(&Scope::Ops), Ok(()));
        assert_eq!(
            ClientCert::Missing.check(&Scope::Subscriber(String::new())),
            Ok(())
        );
    }

    #[test]
    fn missing_and_garbage_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let e = build(&cert, &key, None).unwrap_err().to_string();
        assert!(
            e.starts_with("--tls-cert ") && e.contains("cert.pem"),
            "{e}"
        );
        std::fs::write(&cert, "hello").unwrap();
        let e = build(&cert, &key, None).unwrap_err().to_string();
        assert!(e.contains("no PEM CERTIFICATE"), "{e}");
    }
}
