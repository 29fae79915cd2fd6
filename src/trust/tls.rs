//! Mutual TLS on every port, with rustls (TLS 1.3 only, ring provider).
//!
//! The server side verifies that the client certificate chains to the region CA and
//! reads the caller's [`Principal`] from it once, in [`incoming`]; gRPC handlers get a
//! [`PeerInfo`] and never see certificates. The client side ([`Connector`]) checks the
//! server certificate against the region CA and then that it carries the identity the
//! region file names for that endpoint, so a valid certificate of another member
//! cannot impersonate this one.
//!
//! With the region's revocation lists (`crls` in `region.toml`), every verifier here
//! (client certificates, servers' certificates, and the chains of origin assertions)
//! refuses a certificate the lists name; reloaded with the configuration.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;

use crate::error::{Error, Result};
use crate::trust::identity::{Principal, principal_from_cert};

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates and key of one party, plus the region CA.
#[derive(Clone)]
pub struct TlsMaterial {
    roots: Arc<RootCertStore>,
    /// The region's revocation lists (none: no revocation checks).
    crls: Vec<CertificateRevocationListDer<'static>>,
    /// Built once: origin assertions are checked with it on every sub-query, and
    /// building it parses every revocation list.
    client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The identity in `chain[0]`.
    pub principal: Principal,
    /// The serial numbers the revocation lists name: every front end checks the
    /// certificate of each request's connection against them, so a revocation reaches
    /// connections opened before it at the next reload.
    pub revoked: Arc<std::collections::HashSet<Vec<u8>>>,
    /// When this party's certificate, the CA, and each revocation list (its next
    /// update) expire, as Unix seconds: for the metrics and `fedgate check`.
    pub expiries: Expiries,
}

/// When the parts of a party's TLS material stop being good, as Unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expiries {
    /// This party's certificate's `notAfter`.
    pub certificate: i64,
    /// The earliest `notAfter` of the CA bundle.
    pub ca: i64,
    /// The earliest `nextUpdate` of the revocation lists, if there are any that say.
    pub crl_next_update: Option<i64>,
}

fn not_after(der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

impl TlsMaterial {
    /// Loads the region CA bundle and this party's certificate and key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial> {
        Self::load_with_crls(ca, &[], cert, key)
    }

    /// Loads the region CA bundle, its revocation lists (PEM `X509 CRL` blocks or
    /// DER), and this party's certificate and key.
    pub fn load_with_crls(
        ca: &Path,
        crl_files: &[std::path::PathBuf],
        cert: &Path,
        key: &Path,
    ) -> Result<TlsMaterial> {
        let ca_certs = load_certs(ca)?;
        let ca_expiry = ca_certs
            .iter()
            .filter_map(|c| not_after(c))
            .min()
            .unwrap_or(i64::MAX);
        let mut roots = RootCertStore::empty();
        for c in ca_certs {
            roots
                .add(c)
                .map_err(|e| Error::Tls(format!("CA bundle {}: {e}", ca.display())))?;
        }
        // Per issuer, only its newest list (the highest CRL number, then the latest
        // thisUpdate) goes to the verifiers: rustls checks a certificate against the
        // first list of its issuer it finds, so an older list named before a newer
        // one would silently un-revoke every certificate revoked since. The serials
        // of every list are still refused per request (`revoked`): a revocation is
        // never undone by another file.
        let mut newest: std::collections::BTreeMap<Vec<u8>, NewestList> =
            std::collections::BTreeMap::new();
        let mut revoked = std::collections::HashSet::new();
        for f in crl_files {
            for crl in load_crls(f)? {
                use x509_parser::prelude::*;
                let (_, parsed) = CertificateRevocationList::from_der(crl.as_ref())
                    .map_err(|e| Error::Tls(format!("revocation list {}: {e}", f.display())))?;
                revoked.extend(
                    parsed
                        .iter_revoked_certificates()
                        .map(|r| r.raw_serial().to_vec()),
                );
                let number = parsed
                    .crl_number()
                    .map(|n| n.to_bytes_be())
                    .unwrap_or_default();
                let issuer = parsed.issuer().as_raw().to_vec();
                let list = NewestList {
                    // Big-endian without leading zeros: the longer number is larger.
                    order: (number.len(), number, parsed.last_update().timestamp()),
                    next_update: parsed.next_update().map(|t| t.timestamp()),
                    file: f.clone(),
                    der: crl,
                };
                match newest.get(&issuer) {
                    Some(kept) if kept.order >= list.order => {
                        tracing::warn!(
                            ignored = %list.file.display(),
                            kept = %kept.file.display(),
                            "A revocation list is older than another of the same issuer; the newer one is used"
                        );
                    }
                    Some(kept) => {
                        tracing::warn!(
                            ignored = %kept.file.display(),
                            kept = %list.file.display(),
                            "A revocation list is older than another of the same issuer; the newer one is used"
                        );
                        newest.insert(issuer, list);
                    }
                    None => {
                        newest.insert(issuer, list);
                    }
                }
            }
        }
        let crl_next_update = newest.values().filter_map(|l| l.next_update).min();
        let crls: Vec<_> = newest.into_values().map(|l| l.der).collect();
        let chain = load_certs(cert)?;
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| Error::Tls(format!("private key {}: {e}", key.display())))?;
        let principal = principal_from_cert(&chain[0])
            .map_err(|e| Error::Tls(format!("certificate {}: {e}", cert.display())))?;
        let expiries = Expiries {
            certificate: not_after(&chain[0]).unwrap_or(i64::MAX),
            ca: ca_expiry,
            crl_next_update,
        };
        let roots = Arc::new(roots);
        let client_verifier = client_verifier(&roots, &crls)?;
        let m = TlsMaterial {
            roots,
            crls,
            client_verifier,
            chain,
            key: Arc::new(key_der),
            principal,
            revoked: Arc::new(revoked),
            expiries,
        };
        // Building both configs checks that the key matches the certificate and that
        // every revocation list parses.
        m.server_config()?;
        m.client_config()?;
        Ok(m)
    }

    /// The verifier of client certificates (and of origin assertions' chains): the
    /// region CA, and the revocation lists for end entities. A list names the
    /// certificates of one issuer; the region has one, so a certificate with no list
    /// of its issuer is refused rather than let through unchecked.
    fn client_verifier(&self) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
        Ok(self.client_verifier.clone())
    }

    /// The verifier of servers' certificates, with the same lists.
    fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>> {
        let mut b = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider());
        if !self.crls.is_empty() {
            b = b
                .with_crls(self.crls.iter().cloned())
                .only_check_end_entity_revocation();
        }
        b.build()
            .map_err(|e| Error::Tls(format!("server verifier: {e}")))
    }

    /// This party's certificate chain, end entity first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// This party's private key as a signer (origin assertions are signed with the
    /// gateway's own TLS key, so no other key has to be issued or kept).
    pub fn signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>> {
        rustls::crypto::ring::sign::any_supported_type(&self.key)
            .map_err(|e| Error::Tls(format!("private key of {}: {e}", self.principal)))
    }

    /// Checks that `chain` (end entity first) is issued by the region CA and valid at
    /// `now`, as for a client certificate in the TLS handshake.
    pub fn verify_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<()> {
        let Some((end, rest)) = chain.split_first() else {
            return Err(Error::Tls("empty certificate chain".into()));
        };
        self.client_verifier()?
            .verify_client_cert(end, rest, now)
            .map(|_| ())
            .map_err(|e| Error::Tls(e.to_string()))
    }

    /// Checks that this party's own certificate chains to the region CA and is valid
    /// now, the way peers will check it.
    pub fn verify_own_certificate(&self) -> Result<()> {
        self.client_verifier()?
            .verify_client_cert(
                &self.chain[0],
                &self.chain[1..],
                rustls_pki_types::UnixTime::now(),
            )
            .map_err(|e| {
                Error::Tls(format!(
                    "certificate of {} is not accepted by the region CA: {e}",
                    self.principal
                ))
            })?;
        Ok(())
    }

    /// A TLS 1.3 server config that requires a client certificate from the region CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let verifier = self.client_verifier()?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| Error::Tls(format!("certificate and key do not fit: {e}")))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The server config of the HTTP port: the same identity and client verification,
    /// offering HTTP/1.1 besides HTTP/2 (curl, browsers and scripting languages' HTTP
    /// clients may offer either).
    pub fn http_server_config(&self) -> Result<Arc<ServerConfig>> {
        let mut cfg = (*self.server_config()?).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The server config of the PostgreSQL port: the same identity and client
    /// verification, with PostgreSQL's ALPN name (clients from PostgreSQL 17 offer it;
    /// older ones offer none, which is accepted).
    pub fn postgres_server_config(&self) -> Result<Arc<ServerConfig>> {
        let mut cfg = (*self.server_config()?).clone();
        cfg.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A TLS 1.3 client config presenting this party's certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let verifier = self.server_verifier()?;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| Error::Tls(format!("certificate and key do not fit: {e}")))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// The TLS client settings of a gateway's connections to a database: the server's
/// certificate must chain to `ca` (without one, no TLS connection can succeed, which is
/// what a database with TLS disabled needs), with a client certificate when given.
pub fn database_client_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    if let Some(ca) = ca {
        for c in load_certs(ca)? {
            roots
                .add(c)
                .map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = load_certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| Error::Tls(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Tls(format!("database client certificate and key: {e}")))
        }
    }
}

/// One issuer's newest revocation list while the files are read.
struct NewestList {
    /// (length of the CRL number, its big-endian bytes, thisUpdate): larger is newer.
    order: (usize, Vec<u8>, i64),
    next_update: Option<i64>,
    file: std::path::PathBuf,
    der: CertificateRevocationListDer<'static>,
}

/// The verifier of client certificates over `roots`, with `crls` for end entities.
fn client_verifier(
    roots: &Arc<RootCertStore>,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let mut b = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
    if !crls.is_empty() {
        b = b
            .with_crls(crls.iter().cloned())
            .only_check_end_entity_revocation();
    }
    b.build()
        .map_err(|e| Error::Tls(format!("client verifier: {e}")))
}

/// The revocation lists in a file: PEM `X509 CRL` blocks, or one DER list.
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
        if crls.is_empty() {
            return Err(Error::Tls(format!(
                "{} holds no revocation list (PEM \"X509 CRL\")",
                path.display()
            )));
        }
        return Ok(crls);
    }
    Ok(vec![CertificateRevocationListDer::from(bytes)])
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// What the TLS edge learned about a connection, available to every request on it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The remote address.
    pub remote: SocketAddr,
    /// The identity in the client certificate (verified to chain to the region CA).
    pub principal: Principal,
    /// The client certificate's serial number.
    pub serial: Arc<[u8]>,
}

/// A certificate's serial number (empty if it cannot be read; such a certificate
/// never passed the handshake's verification anyway).
pub fn serial_of(der: &[u8]) -> Arc<[u8]> {
    use x509_parser::prelude::*;
    X509Certificate::from_der(der)
        .map(|(_, c)| Arc::from(c.raw_serial()))
        .unwrap_or_else(|_| Arc::from(&[][..]))
}

/// An accepted, authenticated connection.
pub struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsMaterial {
    /// Whether the revocation lists in force name this party's own certificate.
    pub fn own_certificate_revoked(&self) -> bool {
        self.chain
            .first()
            .is_some_and(|c| self.revoked.contains(&*serial_of(c)))
    }
}

impl TlsConn {
    /// Whether the client chose HTTP/2 in the handshake (ALPN `h2`).
    pub fn negotiated_h2(&self) -> bool {
        self.io.get_ref().1.alpn_protocol() == Some(b"h2".as_slice())
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts TCP connections, completes the TLS handshake and reads the principal.
///
/// Connections whose handshake fails (no certificate, wrong CA, expired) or whose
/// certificate carries no readable identity are closed and logged with the reason;
/// they never reach the gRPC layer. Whether a readable identity belongs to the region
/// is decided by the gRPC layer, which can tell the caller why in a status message.
pub fn incoming(
    listener: TcpListener,
    config: Arc<arc_swap::ArcSwap<ServerConfig>>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // The listener goes as soon as the server stops taking connections, so
            // a stopped gateway frees its port at once (and a restarted one can
            // bind it again).
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => break,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            // The configuration in force when the connection arrives: a rotated
            // certificate is used from the next connection on.
            let acceptor = TlsAcceptor::from(config.load_full());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first().cloned());
                let serial = cert
                    .as_ref()
                    .map(|c| serial_of(c))
                    .unwrap_or_else(|| Arc::from(&[][..]));
                let principal = match cert.map(|c| principal_from_cert(&c)) {
                    Some(Ok(p)) => p,
                    Some(Err(e)) => {
                        tracing::warn!(%remote, error = %e, "Connection refused: certificate identity");
                        return;
                    }
                    None => {
                        tracing::warn!(%remote, "Connection refused: no client certificate");
                        return;
                    }
                };
                let _ = tx
                    .send(Ok(TlsConn {
                        io: tls,
                        info: PeerInfo {
                            remote,
                            principal,
                            serial,
                        },
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A tonic connector that dials a gateway over mutual TLS and checks its identity.
#[derive(Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
    host: String,
    port: u16,
    expected: Option<Principal>,
}

impl Connector {
    /// A connector for `host:port` that expects the server to be `expected` (when given).
    pub fn new(
        config: Arc<ClientConfig>,
        host: &str,
        port: u16,
        expected: Option<Principal>,
    ) -> Self {
        Connector {
            config,
            host: host.to_string(),
            port,
            expected,
        }
    }

    /// A lazily connecting channel through this connector.
    pub fn channel(self, connect_timeout: Duration) -> Result<tonic::transport::Channel> {
        let uri = if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        };
        let ep = tonic::transport::Endpoint::from_shared(uri)
            .map_err(|e| Error::Config(format!("endpoint {}:{}: {e}", self.host, self.port)))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        Ok(ep.connect_with_connector_lazy(self))
    }

    async fn connect(self) -> std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tls = TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await?;
        if let Some(want) = &self.expected {
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first().cloned());
            let got = cert
                .map(|c| principal_from_cert(&c))
                .transpose()
                .map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
                })?;
            if got.as_ref() != Some(want) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "gateway at {}:{} presented identity {}, expected {want}",
                        self.host,
                        self.port,
                        got.map(|p| p.to_string()).unwrap_or_else(|| "none".into())
                    ),
                ));
            }
        }
        Ok(TokioIo::new(tls))
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect())
    }
}

/// Turns a transport error's text into advice a person can act on. TLS 1.3 clients
/// learn that their certificate was refused only from the server's alert, whose name
/// alone ("UnknownCA") is cryptic.
pub fn explain_transport_error(text: &str) -> String {
    let hints = [
        (
            "CertificateRevoked",
            "the gateway refused this certificate: the region has revoked it",
        ),
        (
            "Revoked",
            "a certificate has been revoked by the region (the gateway's, or this one)",
        ),
        (
            "UnknownCA",
            "the gateway refused this certificate: it does not chain to the region CA",
        ),
        // A CA with the region CA's name but another key: the chain is found, and its
        // signature fails.
        (
            "DecryptError",
            "the gateway refused this certificate: it does not chain to the region CA (signature check failed)",
        ),
        (
            "UnknownIssuer",
            "the gateway's certificate does not chain to the CA given with --ca",
        ),
        (
            "CertificateExpired",
            "the gateway refused this certificate: it has expired (or is not yet valid)",
        ),
        ("Expired", "a certificate has expired (or is not yet valid)"),
        (
            "CertificateRequired",
            "the gateway requires a client certificate (give --cert and --key)",
        ),
        (
            "NotValidForName",
            "the gateway's certificate is not valid for the address dialled",
        ),
        ("BadCertificate", "the gateway refused this certificate"),
        ("Connection refused", "nothing is listening at that address"),
    ];
    for (needle, hint) in hints {
        if text.contains(hint) {
            return text.to_string();
        }
        if text.contains(needle) {
            return format!("{hint} ({text})");
        }
    }
    text.to_string()
}

/// The caller's principal, put there by the TLS edge.
pub fn caller<T>(req: &tonic::Request<T>) -> std::result::Result<Principal, tonic::Status> {
    req.extensions()
        .get::<PeerInfo>()
        .map(|i| i.principal.clone())
        .ok_or_else(|| Error::Internal("connection without TLS identity".into()).to_status())
}
