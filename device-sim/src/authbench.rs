//! `device-sim bench-auth`: connections per second through the TLS listener by credential
//! kind, in one run against one hub: a SAS token, a self-signed X.509 certificate registered
//! by thumbprint, and a certificate of a verified CA (the device id as common name). Each
//! connection is a TCP connect, the TLS handshake (with a client certificate for X.509), MQTT
//! CONNECT and CONNACK, then a disconnect; `--concurrency` of them at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Transport};
use serde_json::json;

#[derive(Args, Debug)]
pub struct AuthBenchArgs {
    /// Connections per credential kind
    #[arg(long, default_value_t = 2_000)]
    connections: usize,
    /// Connections in flight at once
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// The fleethub binary [default: the one beside this device-sim]
    #[arg(long)]
    fleethub: Option<std::path::PathBuf>,
}

struct Hub {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Credentials for one device.
#[derive(Clone)]
enum Credential {
    Sas(String),
    Cert(Vec<u8>, String),
}

fn tls_options(
    ca: &[u8],
    mqtts: std::net::SocketAddr,
    id: &str,
    cred: &Credential,
) -> Result<MqttOptions> {
    let mut o = MqttOptions::new(id, "localhost", mqtts.port());
    let user = format!("localhost/{id}/?api-version=2021-04-12");
    let password = match cred {
        Credential::Sas(token) => token.clone(),
        Credential::Cert(..) => String::new(),
    };
    o.set_credentials(user, password);
    o.set_keep_alive(Duration::from_secs(60));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match cred {
        Credential::Sas(_) => builder.with_no_client_auth(),
        Credential::Cert(der, key_pem) => {
            let key =
                rustls_pemfile::private_key(&mut key_pem.as_bytes())?.context("a private key")?;
            builder.with_client_auth_cert(vec![der.clone().into()], key)?
        }
    };
    o.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
    ));
    Ok(o)
}

/// Connects, waits for the CONNACK, disconnects.
async fn connect_once(o: MqttOptions) -> Result<()> {
    let (client, mut events) = AsyncClient::new(o, 10);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await?? {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if ack.code != rumqttc::ConnectReturnCode::Success {
                    bail!("refused: {:?}", ack.code);
                }
                let _ = client.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
                return Ok(());
            }
            _ => continue,
        }
    }
}

pub fn run(args: AuthBenchArgs) -> Result<()> {
    let bin = match args.fleethub {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("fleethub"),
    };
    let dir = std::env::temp_dir().join(format!("fh-authbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("data");
    let child = std::process::Command::new(&bin)
        .arg("--data-dir")
        .arg(&data)
        .args([
            "serve",
            "--mqtt",
            "off",
            "--mqtts",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let hub = Hub { child, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("endpoints.json").exists() {
        if Instant::now() > deadline {
            bail!("the hub did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let endpoints: fleethub::hub::Endpoints =
        serde_json::from_str(&std::fs::read_to_string(data.join("endpoints.json"))?)?;
    let mqtts = endpoints.mqtts.context("no MQTTS listener")?;
    let token = std::fs::read_to_string(data.join("admin-token"))?
        .trim()
        .to_string();
    let ca = std::fs::read(data.join("tls/ca.pem"))?;
    let api = fleethub::client::ApiClient::new(&format!("http://{}", endpoints.api), &token);
    let http = reqwest::Client::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // One device per kind, connected over and over (each connection takes over the last).
    let kinds: Vec<(&str, String, Credential)> = rt.block_on(async {
        let sas_view = api
            .create_device(&fleethub::api::wire::CreateDevice {
                device_id: "bench-sas".into(),
                ..Default::default()
            })
            .await?;
        let key = sas_view.identity.authentication.symmetric_key.primary_key;
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 3600;
        let id = fleethub::identity::IdentityKey::parse("bench-sas")?;
        let sas = fleethub::sas::generate(&fleethub::sas::resource_for("localhost", &id), &key, expiry)?;

        let own = rcgen::generate_simple_self_signed(vec!["bench-self".to_string()])?;
        let der = own.cert.der().to_vec();
        let thumb = fleethub::x509::thumbprints(&der).1;
        let post = |body: serde_json::Value, path: &'static str| {
            let (http, token) = (http.clone(), token.clone());
            let url = format!("http://{}{path}", endpoints.api);
            async move {
                let r = http.post(url).bearer_auth(token).json(&body).send().await?;
                if !r.status().is_success() {
                    bail!("{path}: {}", r.status());
                }
                Ok::<serde_json::Value, anyhow::Error>(r.json().await?)
            }
        };
        post(
            json!({"deviceId": "bench-self", "authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumb}}}),
            "/devices",
        )
        .await?;

        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bench CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let added = post(json!({"name": "bench", "certificate": ca_cert.pem()}), "/certificates").await?;
        let code = added["verificationCode"].as_str().context("a verification code")?;
        let leaf = |cn: &str| -> Result<(Vec<u8>, String)> {
            let key = rcgen::KeyPair::generate()?;
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            let c = p.signed_by(&key, &ca_cert, &ca_key)?;
            Ok((c.der().to_vec(), key.serialize_pem()))
        };
        let proof = {
            let key = rcgen::KeyPair::generate()?;
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
            p.distinguished_name.push(rcgen::DnType::CommonName, code);
            p.signed_by(&key, &ca_cert, &ca_key)?.pem()
        };
        post(json!({"certificate": proof}), "/certificates/bench/verify").await?;
        post(
            json!({"deviceId": "bench-ca", "authentication": {"type": "certificateAuthority"}}),
            "/devices",
        )
        .await?;
        let (ca_der, ca_key_pem) = leaf("bench-ca")?;
        Ok::<_, anyhow::Error>(vec![
            ("SAS token", "bench-sas".to_string(), Credential::Sas(sas)),
            (
                "X.509 self-signed (thumbprint)",
                "bench-self".to_string(),
                Credential::Cert(der, own.key_pair.serialize_pem()),
            ),
            (
                "X.509 CA-signed (verified CA)",
                "bench-ca".to_string(),
                Credential::Cert(ca_der, ca_key_pem),
            ),
        ])
    })?;

    println!(
        "{} connections per kind, {} at a time: TCP + TLS handshake + CONNECT/CONNACK + disconnect",
        args.connections, args.concurrency
    );
    println!(
        "{:<34} {:>12} {:>10}",
        "credential", "connects/s", "seconds"
    );
    for (name, id, cred) in kinds {
        // Distinct client ids per lane would be other identities; one identity per kind is
        // what is measured, so lanes connect as the same device one after another in turn.
        let started = Instant::now();
        let result: Result<()> = rt.block_on(async {
            let permits = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
            let mut tasks = Vec::with_capacity(args.connections);
            for _ in 0..args.connections {
                let o = tls_options(&ca, mqtts, &id, &cred)?;
                let permit = permits.clone().acquire_owned().await?;
                tasks.push(tokio::spawn(async move {
                    let r = connect_once(o).await;
                    drop(permit);
                    r
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok(())
        });
        result.with_context(|| name.to_string())?;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{name:<34} {:>12.0} {secs:>10.2}",
            args.connections as f64 / secs
        );
    }
    drop(hub);
    Ok(())
}
