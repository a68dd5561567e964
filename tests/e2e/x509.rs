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
    }
}

/// MQTT/TLS options trusting the hub's CA, presenting `cert` (if any) as client certificate.
fn options(hub: &Hub, device: &str, password: &str, cert: Option<&DeviceCert>) -> MqttOptions {
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
            let certs = vec![rustls::pki_types::CertificateDer::from(c.der.clone())];
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
