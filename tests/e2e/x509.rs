//! X.509 self-signed device authentication over MQTT/TLS: a device registered with its
//! certificate's thumbprint connects with that certificate as its TLS client certificate
//! (username as with SAS, no password) and works like any device; the wrong certificate, no
//! certificate, or a SAS token for it are refused, and SAS devices are untouched.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use rumqttc::{MqttOptions, QoS, Transport};
use serde_json::json;

use crate::harness::{cli, Client, Hub};

/// A self-signed certificate and its key, and the certificate's SHA-1 and SHA-256
/// thumbprints.
pub(crate) struct DeviceCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
    pub sha1: String,
    pub sha256: String,
    /// Intermediate certificates presented after it (DER).
    pub chain: Vec<Vec<u8>>,
}

pub(crate) fn self_signed(device: &str) -> DeviceCert {
    let c = rcgen::generate_simple_self_signed(vec![device.to_string()]).unwrap();
    let der = c.cert.der().to_vec();
    let (sha1, sha256) = fleethub::x509::thumbprints(&der);
    DeviceCert {
        cert_pem: c.cert.pem(),
        key_pem: c.key_pair.serialize_pem(),
        der,
        sha1,
        sha256,
        chain: Vec::new(),
    }
}

/// A CA (or intermediate) that signs device certificates in tests.
pub(crate) struct TestCa {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
}

fn ca_params(cn: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

pub(crate) fn test_ca(cn: &str) -> TestCa {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = ca_params(cn).self_signed(&key).unwrap();
    TestCa { cert, key }
}

impl TestCa {
    /// An intermediate CA signed by this one.
    pub(crate) fn intermediate(&self, cn: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = ca_params(cn)
            .signed_by(&key, &self.cert, &self.key)
            .unwrap();
        TestCa { cert, key }
    }

    /// A leaf certificate with common name `cn`, signed by this CA; `chain` is appended to
    /// its PEM and DER list (intermediates the device presents).
    pub(crate) fn leaf(&self, cn: &str, chain: &[&TestCa]) -> DeviceCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let der = cert.der().to_vec();
        let (sha1, sha256) = fleethub::x509::thumbprints(&der);
        let mut pem = cert.pem();
        let mut extra = Vec::new();
        for c in chain {
            pem.push_str(&c.cert.pem());
            extra.push(c.cert.der().to_vec());
        }
        DeviceCert {
            cert_pem: pem,
            key_pem: key.serialize_pem(),
            der,
            sha1,
            sha256,
            chain: extra,
        }
    }
}

/// MQTT/TLS options trusting the hub's CA, presenting `cert` (if any) as client certificate.
pub(crate) fn options(
    hub: &Hub,
    device: &str,
    password: &str,
    cert: Option<&DeviceCert>,
) -> MqttOptions {
    let addr = hub.endpoints.mqtts.expect("MQTTS enabled");
    let mut o = MqttOptions::new(device, "localhost", addr.port());
    o.set_credentials(hub.username(device), password);
    o.set_keep_alive(Duration::from_secs(30));
    let ca = std::fs::read(hub.data_dir().join("tls/ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match cert {
        Some(c) => {
            let certs = std::iter::once(&c.der)
                .chain(&c.chain)
                .map(|d| rustls::pki_types::CertificateDer::from(d.clone()))
                .collect();
            let key = rustls_pemfile::private_key(&mut c.key_pem.as_bytes())
                .unwrap()
                .unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    o.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
    ));
    o
}

#[tokio::test]
async fn self_signed_certificates_authenticate_by_thumbprint() {
    let mut hub = Hub::start("x509-self-signed").await;
    let good = self_signed("x1");
    let other = self_signed("x1");
    // Registered by the CLI with the SHA-1 thumbprint (lower case, with colons, as tools print
    // it); the SHA-256 one as secondary through the API later.
    let colons: String = good
        .sha1
        .to_lowercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let (ok, out, err) = cli(
        &hub,
        &[
            "--output",
            "json",
            "device",
            "create",
            "x1",
            "--auth",
            "x509-thumbprint",
            "--primary-thumbprint",
            &colons,
        ],
    );
    assert!(ok, "{err}");
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["authentication"]["type"], "selfSigned", "{view}");
    // A thumbprint that is not one is refused with the field named.
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices",
            Some(json!({"deviceId": "bad", "authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "xyz"}}})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("primaryThumbprint"),
        "{b}"
    );

    // The certificate, no password: connected; telemetry, C2D and the twin work.
    let mut d = Client::connect(options(&hub, "x1", "", Some(&good)))
        .await
        .expect("the registered certificate connects");
    d.subscribe_many(&["devices/x1/messages/devicebound/#", "$iothub/twin/res/#"])
        .await;
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/x1/messages",
            Some(json!({"body": "to x1"})),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let p = d.next_publish(Duration::from_secs(5)).await.expect("C2D");
    assert_eq!(&p.payload[..], b"to x1");
    let r = d
        .request(
            "$iothub/twin/PATCH/properties/reported/?$rid=1",
            br#"{"auth":"x509"}"#,
            "$iothub/twin/res/",
        )
        .await;
    assert!(r.topic.starts_with("$iothub/twin/res/204/"), "{}", r.topic);
    d.client
        .publish("devices/x1/messages/events/", QoS::AtLeastOnce, false, "hi")
        .await
        .unwrap();
    drop(d);

    // Another certificate, no certificate, and a SAS token are refused.
    for (what, o) in [
        ("another certificate", options(&hub, "x1", "", Some(&other))),
        ("no certificate", options(&hub, "x1", "", None)),
    ] {
        assert!(Client::connect(o).await.is_err(), "{what} must be refused");
    }
    let (_, rec) = hub.api(Method::GET, "/devices/x1", None).await;
    let key = rec["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        Client::connect(options(&hub, "x1", &hub.sas("x1", &key), None))
            .await
            .is_err(),
        "a selfSigned device does not take SAS tokens"
    );

    // The second certificate registered as secondary (SHA-256) works too: rollover.
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/devices/x1",
            Some(json!({"authentication": {"x509Thumbprint": {"primaryThumbprint": good.sha1, "secondaryThumbprint": other.sha256}}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(Client::connect(options(&hub, "x1", "", Some(&other)))
        .await
        .is_ok());
    assert!(Client::connect(options(&hub, "x1", "", Some(&good)))
        .await
        .is_ok());

    // SAS devices on the same listener are untouched, with or without a certificate.
    let skey = hub.create_device("s1").await;
    assert!(
        Client::connect(options(&hub, "s1", &hub.sas("s1", &skey), None))
            .await
            .is_ok()
    );
    assert!(
        Client::connect(options(&hub, "s1", &hub.sas("s1", &skey), Some(&good)))
            .await
            .is_ok()
    );
    let refused = hub
        .metric("fleethub_connection_attempts_total{result=\"not_authorized\"}")
        .await;
    assert_eq!(refused, 3.0);

    // Sessions apply to certificate devices too: a persistent session outlives kill -9.
    let mut o = options(&hub, "x1", "", Some(&good));
    o.set_clean_session(false);
    let (mut d, _) = Client::connect_session(o).await.unwrap();
    d.subscribe_many(&["devices/x1/messages/devicebound/#"])
        .await;
    drop(d);
    hub = hub.restart().await;
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/x1/messages",
            Some(json!({"body": "after restart"})),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let mut o = options(&hub, "x1", "", Some(&good));
    o.set_clean_session(false);
    let (mut d, present) = Client::connect_session(o).await.unwrap();
    assert!(present, "session-present 1 after the restart");
    let p = d
        .next_publish(Duration::from_secs(5))
        .await
        .expect("C2D with no new SUBSCRIBE");
    assert_eq!(&p.payload[..], b"after restart");
}

#[tokio::test]
async fn ca_signed_certificates_chain_to_a_verified_ca() {
    let hub = Hub::start("x509-ca").await;
    let dir = hub.data_dir().join("..");
    let root = test_ca("Fleet Root CA");
    let ca_pem = dir.join("root.pem");
    std::fs::write(&ca_pem, root.cert.pem()).unwrap();
    let (ok, out, err) = cli(
        &hub,
        &[
            "--output",
            "json",
            "ca",
            "add",
            "fleet-root",
            "--cert",
            ca_pem.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let added: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(added["isVerified"], false);
    let code = added["verificationCode"].as_str().unwrap().to_string();
    // A certificate that is not a CA is refused.
    let (s, b) = hub
        .api(
            Method::POST,
            "/certificates",
            Some(json!({"name": "leafy", "certificate": self_signed("x").cert_pem})),
        )
        .await;
    assert_eq!(s, 400, "{b}");

    let (ok, _, err) = cli(&hub, &["device", "create", "c1", "--auth", "x509-ca"]);
    assert!(ok, "{err}");
    let device = root.leaf("c1", &[]);
    // Not yet verified: refused.
    assert!(
        Client::connect(options(&hub, "c1", "", Some(&device)))
            .await
            .is_err(),
        "a CA not verified authenticates nobody"
    );

    // Proof of possession: the wrong common name, or another CA's signature, is refused.
    let verify = |pem: String| {
        let path = dir.join("verify.pem");
        std::fs::write(&path, pem).unwrap();
        cli(
            &hub,
            &[
                "--output",
                "json",
                "ca",
                "verify",
                "fleet-root",
                "--cert",
                path.to_str().unwrap(),
            ],
        )
    };
    let (ok, _, err) = verify(root.leaf("not-the-code", &[]).cert_pem);
    assert!(!ok && err.contains("verification code"), "{err}");
    let (ok, _, err) = verify(test_ca("Impostor").leaf(&code, &[]).cert_pem);
    assert!(!ok && err.contains("not signed by this CA"), "{err}");
    let (ok, out, err) = verify(root.leaf(&code, &[]).cert_pem);
    assert!(ok, "{err}");
    let verified: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(verified["isVerified"], true);

    // Verified: the device's certificate connects; so does one through an intermediate the
    // device presents. Another CA's, another common name's, or none are refused.
    let mut d = Client::connect(options(&hub, "c1", "", Some(&device)))
        .await
        .expect("a certificate of the verified CA");
    d.subscribe_many(&["devices/c1/messages/devicebound/#"])
        .await;
    let (s, _) = hub
        .api(
            Method::POST,
            "/devices/c1/messages",
            Some(json!({"body": "ca"})),
        )
        .await;
    assert_eq!(s, 202);
    assert_eq!(
        &d.next_publish(Duration::from_secs(5))
            .await
            .expect("C2D")
            .payload[..],
        b"ca"
    );
    drop(d);
    let intermediate = root.intermediate("Plant Intermediate");
    let through = intermediate.leaf("c1", &[&intermediate]);
    assert!(Client::connect(options(&hub, "c1", "", Some(&through)))
        .await
        .is_ok());
    let impostor = test_ca("Impostor").leaf("c1", &[]);
    let other_name = root.leaf("c2", &[]);
    let no_chain = intermediate.leaf("c1", &[]);
    for (what, cert) in [
        ("another CA", Some(&impostor)),
        ("another common name", Some(&other_name)),
        ("an intermediate not presented", Some(&no_chain)),
        ("no certificate", None),
    ] {
        assert!(
            Client::connect(options(&hub, "c1", "", cert))
                .await
                .is_err(),
            "{what} must be refused"
        );
    }
    let (ok, out, _) = cli(&hub, &["--output", "json", "ca", "list"]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["items"][0]["name"], "fleet-root");
    // Deleting the CA ends what it authenticated.
    let (ok, _, err) = cli(&hub, &["ca", "delete", "fleet-root"]);
    assert!(ok, "{err}");
    assert!(Client::connect(options(&hub, "c1", "", Some(&device)))
        .await
        .is_err());
}
