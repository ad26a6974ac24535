//! Requests: made, read, refused, signed; and a leaf signed by an issuing CA accepted through
//! its chain by the relay's own TLS configurations with only the root as CA.

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;

use super::*;
use crate::testing::handshake;
use crate::{Identity, TrustAnchors, client_config, server_config};

/// A request for `name` by a fresh key, after `edit` changed its parameters.
fn custom(name: &str, edit: impl FnOnce(&mut CertificateParams)) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    edit(&mut params);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn refusal(csr: &str) -> String {
    match read(csr.as_bytes()) {
        Err(Error::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_made_request_reads_back_with_its_name_and_key() {
    let made = make("site-b").unwrap();
    let requested = read(made.csr_pem.as_bytes()).unwrap();
    assert_eq!(requested.name, "site-b");
    let key = KeyPair::from_pem(&made.key_pem).unwrap();
    assert_eq!(requested.public_key_der, key.subject_public_key_info());
    // DER is read as well as PEM.
    let der = CertificateSigningRequestDer::from_pem_slice(made.csr_pem.as_bytes()).unwrap();
    assert_eq!(read(der.as_ref()).unwrap(), requested);
    // The same key again: the same public key, a new request.
    let again = with_key(&made.key_pem, "site-b").unwrap();
    assert_eq!(read(again.csr_pem.as_bytes()).unwrap(), requested);
}

#[test]
fn bad_names_are_refused_when_made() {
    for (name, why) in [
        ("", "is empty"),
        ("../site", "file name"),
        ("a/b", "file name"),
        (" site", "space"),
        ("site\n", "control"),
    ] {
        let error = make(name).unwrap_err().to_string();
        assert!(error.contains(why), "{name:?}: {error}");
    }
    let long = "a".repeat(65);
    assert!(make(&long).unwrap_err().to_string().contains("64 bytes"));
    make(&"a".repeat(64)).unwrap();
}

#[test]
fn the_sink_role_is_refused() {
    let csr = custom("site-b", |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    let reason = refusal(&csr);
    assert!(
        reason.contains("asks for the sink role (serverAuth)"),
        "{reason}"
    );
    // clientAuth alone is what an agent gets: accepted.
    let csr = custom("site-b", |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    });
    assert_eq!(read(csr.as_bytes()).unwrap().name, "site-b");
}

#[test]
fn other_usages_are_refused() {
    let csr = custom("site-b", |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    });
    assert!(refusal(&csr).contains("other than clientAuth"));
    let csr = custom("site-b", |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    });
    let reason = refusal(&csr);
    assert!(reason.contains("asks for key usage"), "{reason}");
}

#[test]
fn extra_names_are_refused() {
    let csr = custom("site-b", |p| {
        p.subject_alt_names = vec![
            SanType::DnsName("site-b".try_into().unwrap()),
            SanType::DnsName("sink.example.com".try_into().unwrap()),
        ];
    });
    let reason = refusal(&csr);
    assert!(
        reason.contains("names other than its common name") && reason.contains("sink.example.com"),
        "{reason}"
    );
    let csr = custom("site-b", |p| {
        p.subject_alt_names = vec![SanType::IpAddress("192.0.2.1".parse().unwrap())];
    });
    assert!(refusal(&csr).contains("192.0.2.1"));
    let csr = custom("site-b", |p| {
        p.distinguished_name
            .push(DnType::OrganizationName, "Example");
    });
    let reason = refusal(&csr);
    assert!(reason.contains("one common name"), "{reason}");
}

#[test]
fn a_ca_is_refused() {
    let csr = custom("site-b", |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    });
    let reason = refusal(&csr);
    assert!(reason.contains("asks to be a CA"), "{reason}");
    // "Not a CA" said explicitly is what the certificate says anyway.
    let csr = custom("site-b", |p| p.is_ca = IsCa::ExplicitNoCa);
    read(csr.as_bytes()).unwrap();
}

#[test]
fn other_extensions_are_refused() {
    let csr = custom("site-b", |p| {
        // A private OID, non-critical.
        let extension =
            CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
        p.custom_extensions = vec![extension];
    });
    let reason = refusal(&csr);
    assert!(reason.contains("extension 1.3.6.1.4.1.99999.1"), "{reason}");
}

#[test]
fn a_request_altered_after_signing_is_refused() {
    let made = make("site-b").unwrap();
    let der = CertificateSigningRequestDer::from_pem_slice(made.csr_pem.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    // The name's last letter, inside the signed part: "site-b" becomes "site-c".
    let at = bytes.windows(6).position(|w| w == b"site-b").unwrap() + 5;
    bytes[at] = b'c';
    match read(&bytes) {
        Err(Error::Refused(reason)) => {
            assert!(reason.contains("signature does not verify"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // And garbage is not a request at all.
    let error = read(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    assert!(matches!(error, Err(Error::Malformed(_))), "{error:?}");
    assert!(matches!(
        read(b"\x30\x03\x02\x01\x00"),
        Err(Error::Malformed(_))
    ));
}

#[test]
fn other_key_types_are_accepted_when_tls_verifies_them() {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let csr = with_key(&key.serialize_pem(), "site-e").unwrap();
    assert_eq!(read(csr.csr_pem.as_bytes()).unwrap().name, "site-e");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = with_key(&key.serialize_pem(), "site-p").unwrap();
    read(csr.csr_pem.as_bytes()).unwrap();
}

#[test]
fn a_signed_request_is_an_agent_certificate_for_its_name_and_key() {
    let ca = Ca::generate("root", 30).unwrap();
    let made = make("site-b").unwrap();
    let signed = ca
        .sign_request(made.csr_pem.as_bytes(), Validity::Days(10))
        .unwrap();
    assert_eq!(signed.chain_pem, signed.cert_pem, "a root's leaf: no chain");
    let info = CertInfo::from_pem(&signed.cert_pem).unwrap();
    assert_eq!(info.common_name.as_deref(), Some("site-b"));
    assert_eq!(info.subject_alt_names, vec!["DNS:site-b"]);
    assert_eq!(info.extended_key_usages, vec!["clientAuth"]);
    assert!(!info.is_ca);
    assert_eq!(
        (signed.serial.as_str(), signed.name.as_str()),
        (info.serial.as_str(), "site-b")
    );
    let days = (signed.not_after - OffsetDateTime::now_utc()).whole_days();
    assert!((9..=10).contains(&days), "{days}");
    // The key made at the site is the certificate's.
    Identity::from_pem(&signed.cert_pem, &made.key_pem, "cert", "key").unwrap();

    // A window, capped by the CA's own expiry.
    let now = OffsetDateTime::now_utc();
    let short = ca
        .sign_request(
            made.csr_pem.as_bytes(),
            Validity::Between {
                not_before: now,
                not_after: now + Duration::seconds(60),
            },
        )
        .unwrap();
    assert!((short.not_after - now).whole_seconds() <= 60);
    let long = ca
        .sign_request(made.csr_pem.as_bytes(), Validity::Days(3650))
        .unwrap();
    assert!(
        long.not_after <= ca.constraints().unwrap().1,
        "not past the CA"
    );
    let error = ca
        .sign_request(
            made.csr_pem.as_bytes(),
            Validity::Between {
                not_before: now - Duration::hours(2),
                not_after: now - Duration::hours(1),
            },
        )
        .unwrap_err();
    assert!(matches!(error, Error::Validity(_)), "{error}");
}

#[test]
fn chains_through_an_issuing_ca_are_accepted_with_only_the_root_as_ca() {
    let root = Ca::generate("root", 30).unwrap();
    let issuer = Ca::generate_issuer(&root, "issuer", 30).unwrap();
    let anchors = TrustAnchors::from_pem(root.cert_pem(), "ca.pem").unwrap();
    let alpn: &[&[u8]] = &[b"test"];

    // An agent from a request, a sink issued directly: both by the issuing CA, as chains.
    let made = make("site-b").unwrap();
    let agent = issuer
        .sign_request(made.csr_pem.as_bytes(), Validity::Days(1))
        .unwrap();
    assert_eq!(agent.chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
    let agent =
        Identity::from_pem(&agent.chain_pem, &made.key_pem, "agent.pem", "agent.key").unwrap();
    let mut sink = Leaf::new(Role::Sink, "localhost", 1);
    sink.ips.push("127.0.0.1".parse().unwrap());
    let sink = issuer.issue(&sink).unwrap();
    let sink_chain = issuer.leaf_chain(&sink.cert_pem);
    let sink = Identity::from_pem(&sink_chain, &sink.key_pem, "sink.pem", "sink.key").unwrap();

    let client = client_config(&anchors, &agent, alpn).unwrap();
    let server = server_config(&anchors, &sink, alpn).unwrap();
    handshake(client, server, "localhost").unwrap();

    // Without the issuing CA in the chain, neither end can build the path.
    let lone = issuer
        .sign_request(made.csr_pem.as_bytes(), Validity::Days(1))
        .unwrap();
    let lone = Identity::from_pem(&lone.cert_pem, &made.key_pem, "a", "k").unwrap();
    let client = client_config(&anchors, &lone, alpn).unwrap();
    let server = server_config(&anchors, &sink, alpn).unwrap();
    let error = handshake(client, server, "localhost")
        .unwrap_err()
        .to_string();
    assert!(error.contains("UnknownIssuer"), "{error}");
}
