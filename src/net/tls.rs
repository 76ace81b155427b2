//! The cluster PKI and the TLS configurations built from it.
//!
//! A cluster has one certificate authority. Each node holds a certificate issued by it whose
//! DNS name is the node id, so "which node is this" and "may it join" are both answered by the
//! TLS handshake:
//!
//! - node to node: mutual TLS ([`peer_server_config`] / [`peer_client_config`]); a process
//!   without a certificate from the cluster CA cannot complete a handshake, so it can neither
//!   read nor inject replication traffic.
//! - client to node: server-authenticated TLS ([`client_facing_server_config`] /
//!   [`client_config`]); the client checks it talks to a node of this cluster, and access
//!   control is left to the (optional) token of the client protocol.
//!
//! Only the *ring* crypto provider is used, and every configuration names it explicitly, so
//! the result does not depend on which provider happens to be installed process-wide.

use crate::core::ids::NodeId;
use crate::net::MAX_STREAMS_PER_CONNECTION;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The ALPN protocol id; a peer that does not offer it fails the handshake instead of
/// exchanging frames it cannot parse.
pub const ALPN: &[u8] = b"dynkv/1";
/// How often an idle connection sends a keep-alive, so NAT/firewall state and the peer's idle
/// timer stay fresh while a node has nothing to say.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a connection may stay silent before it is declared dead; with keep-alives every
/// 2 s, this means five missed keep-alives, i.e. the peer is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a certificate or a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate {what}: {reason}")]
    Generate { what: &'static str, reason: String },
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin} holds no valid PEM {what}: {reason}")]
    Pem {
        origin: String,
        what: &'static str,
        reason: String,
    },
    #[error("host {host:?} is neither an IP address nor a valid DNS name")]
    BadHost { host: String },
    #[error("the CA certificate cannot be used to issue: {reason}")]
    BadCaCertificate { reason: String },
    #[error("invalid TLS configuration: {reason}")]
    Config { reason: String },
}

/// A certificate and its private key, both PEM. This is what `dynkv cert` writes to disk.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    // The private key must not end up in logs.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Installs *ring* as the process-wide rustls provider. Harmless when one is already installed
/// (the error is ignored): the configurations built here name *ring* explicitly anyway; this
/// is for other rustls users in the process.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn generate_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> TlsError {
    move |error| TlsError::Generate {
        what,
        reason: error.to_string(),
    }
}

/// Creates a new cluster CA whose subject common name is `name`.
pub fn generate_ca(name: &str) -> Result<CertifiedKey, TlsError> {
    let key = KeyPair::generate().map_err(generate_error("CA key"))?;
    let mut params = CertificateParams::default();
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name = distinguished_name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .map_err(generate_error("CA certificate"))?;
    Ok(CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate for `node_id`, signed by `ca`, valid for both server and client
/// authentication (a node is both).
///
/// Subject alternative names: the node id (the name peers connect to), every entry of `hosts`
/// (as an IP address when it parses as one, else as a DNS name), `localhost` and `127.0.0.1`.
pub fn issue_node_certificate(
    ca: &CertifiedKey,
    node_id: &NodeId,
    hosts: &[String],
) -> Result<CertifiedKey, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|error| TlsError::Pem {
        origin: "the CA key".into(),
        what: "private key",
        reason: error.to_string(),
    })?;
    let ca_der = parse_certificate_pem(&ca.cert_pem, "the CA certificate")?;
    let ca_names = certificate_names(ca_der.as_ref())?;
    // rcgen 0.14 cannot parse a certificate without the x509-parser feature, so the issuer is
    // rebuilt from the CA's subject name; the issued certificate is checked below to name its
    // issuer with exactly those bytes, which is what chain building compares.
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = distinguished_name_from_der(ca_names.subject)?;
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names: Vec<String> = vec![node_id.as_str().to_string()];
    names.extend(hosts.iter().cloned());
    names.push("localhost".into());
    names.push(Ipv4Addr::LOCALHOST.to_string());
    let mut subject_alt_names = Vec::new();
    for host in names {
        let name = match host.parse::<IpAddr>() {
            Ok(address) => SanType::IpAddress(address),
            Err(_) => {
                // rcgen only checks for ASCII; check the DNS syntax peers will verify against.
                let bad_host = || TlsError::BadHost { host: host.clone() };
                rustls_pki_types::DnsName::try_from(host.as_str()).map_err(|_| bad_host())?;
                SanType::DnsName(host.clone().try_into().map_err(|_| bad_host())?)
            }
        };
        if !subject_alt_names.contains(&name) {
            subject_alt_names.push(name);
        }
    }

    let key = KeyPair::generate().map_err(generate_error("node key"))?;
    let mut params = CertificateParams::default();
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, node_id.as_str());
    params.distinguished_name = distinguished_name;
    params.subject_alt_names = subject_alt_names;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(generate_error("node certificate"))?;
    if certificate_names(cert.der().as_ref())?.issuer != ca_names.subject {
        return Err(TlsError::BadCaCertificate {
            reason: "its subject name could not be reproduced exactly".into(),
        });
    }
    Ok(CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Reads a whole PEM file; the error names the file.
pub fn read_pem_file(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a certificate and its key from two PEM files, checking that each parses; errors name
/// the offending file.
pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read_pem_file(cert_path)?;
    let key_pem = read_pem_file(key_path)?;
    parse_certificate_pem(&cert_pem, &cert_path.display().to_string())?;
    parse_key_pem(&key_pem, &key_path.display().to_string())?;
    Ok(CertifiedKey { cert_pem, key_pem })
}

fn parse_certificate_pem(pem: &str, origin: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|error| TlsError::Pem {
        origin: origin.to_string(),
        what: "certificate",
        reason: error.to_string(),
    })
}

fn parse_key_pem(pem: &str, origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|error| TlsError::Pem {
        origin: origin.to_string(),
        what: "private key",
        reason: error.to_string(),
    })
}

fn root_store(ca_cert_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(parse_certificate_pem(ca_cert_pem, "the CA certificate")?)
        .map_err(|error| TlsError::BadCaCertificate {
            reason: error.to_string(),
        })?;
    Ok(Arc::new(roots))
}

fn config_error(error: impl std::fmt::Display) -> TlsError {
    TlsError::Config {
        reason: error.to_string(),
    }
}

fn server_builder()
-> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>, TlsError> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)
}

fn client_builder()
-> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, TlsError> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)
}

/// The node's certificate chain and private key, parsed from its PEMs.
fn node_identity(
    node: &CertifiedKey,
) -> Result<
    (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    TlsError,
> {
    Ok((
        vec![parse_certificate_pem(
            &node.cert_pem,
            "the node certificate",
        )?],
        parse_key_pem(&node.key_pem, "the node key")?,
    ))
}

/// Server side of node-to-node traffic: presents `node`'s certificate and REQUIRES a client
/// certificate issued by the cluster CA.
pub fn peer_server_config(
    ca_cert_pem: &str,
    node: &CertifiedKey,
) -> Result<rustls::ServerConfig, TlsError> {
    let (chain, key) = node_identity(node)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(root_store(ca_cert_pem)?, provider())
            .build()
            .map_err(config_error)?;
    let mut config = server_builder()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Server side of client traffic: presents `node`'s certificate; clients are not asked for one
/// (they authenticate, if at all, with a token inside the protocol).
pub fn client_facing_server_config(node: &CertifiedKey) -> Result<rustls::ServerConfig, TlsError> {
    let (chain, key) = node_identity(node)?;
    let mut config = server_builder()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Client side of node-to-node traffic: presents `node`'s certificate and accepts only servers
/// whose certificate, issued by the cluster CA, names the node id being dialled.
pub fn peer_client_config(
    ca_cert_pem: &str,
    node: &CertifiedKey,
) -> Result<rustls::ClientConfig, TlsError> {
    let (chain, key) = node_identity(node)?;
    let mut config = client_builder()?
        .with_root_certificates(root_store(ca_cert_pem)?)
        .with_client_auth_cert(chain, key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Client side of client traffic: verifies the node against the cluster CA, presents nothing.
pub fn client_config(ca_cert_pem: &str) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = client_builder()?
        .with_root_certificates(root_store(ca_cert_pem)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Unread bytes a connection may hold (QUIC's connection-level flow-control window).
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// QUIC transport parameters shared by both sides: keep-alive, idle timeout, and room for
/// every stream of the RPC pool (plus headroom for a peer configured with a larger pool).
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    // IDLE_TIMEOUT is far below the VarInt limit, so the conversion cannot fail.
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_STREAMS_PER_CONNECTION as u32));
    // Data a peer may send that this side has not read yet, over all streams of the
    // connection (quinn's default is unlimited, with 1.25 MB per stream and up to 64 streams):
    // with it, a node buffers at most this per connection, whatever the sender does.
    transport.receive_window(quinn::VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES));
    // The protocol never uses unidirectional streams; refusing them closes a door.
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    transport
}

/// [`transport_config`], and asking the peer to acknowledge only every `threshold`
/// ack-eliciting packets (QUIC's ACK frequency extension; quinn advertises support for it on
/// every connection). A threshold of 1 leaves the RFC 9000 default and asks nothing.
pub fn transport_config_acking_every(threshold: u32) -> quinn::TransportConfig {
    let mut transport = transport_config();
    if threshold > 1 {
        let mut acks = quinn::AckFrequencyConfig::default();
        acks.ack_eliciting_threshold(quinn::VarInt::from_u32(threshold));
        transport.ack_frequency_config(Some(acks));
    }
    transport
}

/// Wraps a rustls server configuration for quinn, with [`transport_config`].
pub fn quic_server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(config_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Wraps a rustls client configuration for quinn, with [`transport_config`].
pub fn quic_client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(config_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// The raw issuer and subject names (whole DER elements) of a certificate.
struct CertificateNames<'a> {
    issuer: &'a [u8],
    subject: &'a [u8],
}

fn bad_ca(reason: &str) -> TlsError {
    TlsError::BadCaCertificate {
        reason: reason.to_string(),
    }
}

/// One DER element inside a larger input.
struct DerElement<'a> {
    tag: u8,
    /// The whole element, header included.
    whole: &'a [u8],
    content: &'a [u8],
    /// The input after this element.
    rest: &'a [u8],
}

fn der_element(input: &[u8]) -> Result<DerElement<'_>, TlsError> {
    let malformed = || bad_ca("malformed DER");
    let (&tag, after_tag) = input.split_first().ok_or_else(malformed)?;
    let (&first, after_length) = after_tag.split_first().ok_or_else(malformed)?;
    let (length, header_bytes, after_header) = if first < 0x80 {
        (first as usize, 2, after_length)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 || after_length.len() < count {
            return Err(malformed());
        }
        let length = after_length[..count]
            .iter()
            .fold(0usize, |length, &byte| (length << 8) | byte as usize);
        (length, 2 + count, &after_length[count..])
    };
    if after_header.len() < length {
        return Err(malformed());
    }
    Ok(DerElement {
        tag,
        whole: &input[..header_bytes + length],
        content: &after_header[..length],
        rest: &after_header[length..],
    })
}

fn expect_element(input: &[u8], tag: u8) -> Result<DerElement<'_>, TlsError> {
    let element = der_element(input)?;
    if element.tag != tag {
        return Err(bad_ca("unexpected DER structure"));
    }
    Ok(element)
}

/// Walks `Certificate -> TBSCertificate` to the issuer and subject names.
fn certificate_names(der: &[u8]) -> Result<CertificateNames<'_>, TlsError> {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const EXPLICIT_VERSION: u8 = 0xa0;
    let certificate = expect_element(der, SEQUENCE)?.content;
    let mut tbs = expect_element(certificate, SEQUENCE)?.content;
    if tbs.first() == Some(&EXPLICIT_VERSION) {
        tbs = expect_element(tbs, EXPLICIT_VERSION)?.rest;
    }
    let serial_number = expect_element(tbs, INTEGER)?;
    let signature_algorithm = expect_element(serial_number.rest, SEQUENCE)?;
    let issuer = expect_element(signature_algorithm.rest, SEQUENCE)?;
    let validity = expect_element(issuer.rest, SEQUENCE)?;
    let subject = expect_element(validity.rest, SEQUENCE)?;
    Ok(CertificateNames {
        issuer: issuer.whole,
        subject: subject.whole,
    })
}

/// Rebuilds an rcgen name from a DER `Name`. Supports what rcgen can re-encode byte for byte:
/// single-valued RDNs with UTF8String, PrintableString or IA5String values, each attribute
/// type at most once (the caller checks the re-encoding).
fn distinguished_name_from_der(name: &[u8]) -> Result<DistinguishedName, TlsError> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let mut relative_names = expect_element(name, SEQUENCE)?.content;
    let mut result = DistinguishedName::new();
    while !relative_names.is_empty() {
        let set = expect_element(relative_names, SET)?;
        relative_names = set.rest;
        let attribute = expect_element(set.content, SEQUENCE)?;
        if !attribute.rest.is_empty() {
            return Err(bad_ca("multi-valued names are not supported"));
        }
        let oid = expect_element(attribute.content, OID)?;
        let value = der_element(oid.rest)?;
        let text = std::str::from_utf8(value.content)
            .map_err(|_| bad_ca("name value is not text"))?
            .to_string();
        let value = match value.tag {
            0x0c => DnValue::Utf8String(text),
            0x13 => DnValue::PrintableString(
                text.try_into()
                    .map_err(|_| bad_ca("invalid PrintableString"))?,
            ),
            0x16 => DnValue::Ia5String(text.try_into().map_err(|_| bad_ca("invalid IA5String"))?),
            _ => return Err(bad_ca("unsupported string type in name")),
        };
        result.push(DnType::from_oid(&decode_oid(oid.content)?), value);
    }
    Ok(result)
}

fn decode_oid(bytes: &[u8]) -> Result<Vec<u64>, TlsError> {
    let (&first, rest) = bytes.split_first().ok_or_else(|| bad_ca("empty OID"))?;
    let mut arcs = vec![u64::from(first / 40), u64::from(first % 40)];
    let mut value: u64 = 0;
    for &byte in rest {
        if value > (u64::MAX >> 7) {
            return Err(bad_ca("OID arc too large"));
        }
        value = (value << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            arcs.push(value);
            value = 0;
        }
    }
    Ok(arcs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[test]
    fn node_certificates_chain_to_their_ca() {
        let ca = generate_ca("dynkv test cluster (ünïcode)").unwrap();
        let issued =
            issue_node_certificate(&ca, &node("n1"), &["10.0.0.1".into(), "kv.example".into()])
                .unwrap();
        let ca_der = parse_certificate_pem(&ca.cert_pem, "ca").unwrap();
        let node_der = parse_certificate_pem(&issued.cert_pem, "node").unwrap();
        assert_eq!(
            certificate_names(node_der.as_ref()).unwrap().issuer,
            certificate_names(ca_der.as_ref()).unwrap().subject
        );
        // The node's certificate is accepted for its node id and its hosts.
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            root_store(&ca.cert_pem).unwrap(),
            provider(),
        )
        .build()
        .unwrap();
        for name in ["n1", "kv.example", "10.0.0.1", "localhost", "127.0.0.1"] {
            let server_name = rustls_pki_types::ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(
                    &node_der,
                    &[],
                    &server_name,
                    &[],
                    rustls_pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|error| panic!("{name}: {error}"));
        }
        let other = rustls_pki_types::ServerName::try_from("n2").unwrap();
        assert!(
            verifier
                .verify_server_cert(
                    &node_der,
                    &[],
                    &other,
                    &[],
                    rustls_pki_types::UnixTime::now()
                )
                .is_err()
        );
    }

    #[test]
    fn bad_hosts_and_files_are_named_in_errors() {
        let ca = generate_ca("ca").unwrap();
        assert!(matches!(
            issue_node_certificate(&ca, &node("n1"), &["bad host!".into()]),
            Err(TlsError::BadHost { host }) if host == "bad host!"
        ));
        let missing = std::env::temp_dir().join("dynkv-net-test-missing.pem");
        let error = load_certified_key(&missing, &missing).unwrap_err();
        assert!(
            error.to_string().contains("dynkv-net-test-missing.pem"),
            "{error}"
        );

        let directory = std::env::temp_dir().join(format!("dynkv-net-tls-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let cert_path = directory.join("node.crt");
        let key_path = directory.join("node.key");
        let issued = issue_node_certificate(&ca, &node("n1"), &[]).unwrap();
        std::fs::write(&cert_path, &issued.cert_pem).unwrap();
        std::fs::write(&key_path, "not a key").unwrap();
        let error = load_certified_key(&cert_path, &key_path).unwrap_err();
        assert!(error.to_string().contains("node.key"), "{error}");
        std::fs::write(&key_path, &issued.key_pem).unwrap();
        let loaded = load_certified_key(&cert_path, &key_path).unwrap();
        assert_eq!(loaded.cert_pem, issued.cert_pem);
        assert!(!format!("{loaded:?}").contains("PRIVATE KEY"));
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn configurations_build() {
        let ca = generate_ca("ca").unwrap();
        let issued = issue_node_certificate(&ca, &node("n1"), &[]).unwrap();
        quic_server_config(peer_server_config(&ca.cert_pem, &issued).unwrap()).unwrap();
        quic_server_config(client_facing_server_config(&issued).unwrap()).unwrap();
        quic_client_config(peer_client_config(&ca.cert_pem, &issued).unwrap()).unwrap();
        quic_client_config(client_config(&ca.cert_pem).unwrap()).unwrap();
    }
}
