//! MQTT over WebSockets at the wire: the upgrade the SDKs make (TLS, `/$iothub/websocket`,
//! subprotocol `mqtt` in any case), then an ordinary MQTT CONNECT in binary frames; what is
//! not that upgrade is refused and counted. (`interop.rs` and `interop_sessions.rs` run the
//! unmodified Python SDK with `websockets=True`.)

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{temp_dir, Hub};

async fn tls(hub: &Hub) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let ca = std::fs::read(hub.data_dir().join("tls/ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(hub.endpoints.wss.expect("WSS enabled"))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

fn request(
    path: &str,
    protocol: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut r = format!("wss://localhost{path}")
        .into_client_request()
        .unwrap();
    if let Some(p) = protocol {
        r.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    r
}

/// An MQTT 3.1.1 CONNECT with a username and password, clean session 1.
fn connect_packet(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let field = |s: &str| {
        let mut v = (s.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    };
    let mut body = field("MQTT");
    body.extend([4, 0xC2, 0, 60]);
    body.extend(field(client_id));
    body.extend(field(user));
    body.extend(field(password));
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

#[tokio::test]
async fn mqtt_over_websockets_connects_and_bad_upgrades_are_refused() {
    let dir = temp_dir("wss");
    let hub = Hub::start_with(dir, &["--wss", "127.0.0.1:0"]).await;
    let key = hub.create_device("ws1").await;

    // Upper-case MQTT is accepted, and the answer names the protocol as offered.
    let (mut ws, response) = tokio_tungstenite::client_async(
        request("/$iothub/websocket", Some("MQTT")),
        tls(&hub).await,
    )
    .await
    .expect("upgrade");
    assert_eq!(response.headers()["Sec-WebSocket-Protocol"], "MQTT");
    let connect = connect_packet("ws1", &hub.username("ws1"), &hub.sas("ws1", &key));
    // A packet split over two frames is one packet.
    let (a, b) = connect.split_at(7);
    ws.send(Message::Binary(a.to_vec().into())).await.unwrap();
    ws.send(Message::Binary(b.to_vec().into())).await.unwrap();
    let connack = loop {
        match ws.next().await.expect("an answer").expect("a frame") {
            Message::Binary(b) => break b,
            _ => continue,
        }
    };
    assert_eq!(&connack[..], &[0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    // PINGREQ / PINGRESP.
    ws.send(Message::Binary(vec![0xC0, 0x00].into()))
        .await
        .unwrap();
    let pong = loop {
        match ws.next().await.expect("an answer").expect("a frame") {
            Message::Binary(b) => break b,
            _ => continue,
        }
    };
    assert_eq!(&pong[..], &[0xD0, 0x00]);
    assert_eq!(
        hub.metric("fleethub_connections").await,
        1.0,
        "counted as a connection like any other"
    );
    // A text frame is not MQTT: the connection ends.
    ws.send(Message::Text("hello".into())).await.unwrap();
    let ended = loop {
        match ws.next().await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break true,
            Some(Ok(_)) => continue,
        }
    };
    assert!(ended);

    // The wrong path and a missing subprotocol are refused with HTTP statuses, and counted.
    let err = tokio_tungstenite::client_async(request("/mqtt", Some("mqtt")), tls(&hub).await)
        .await
        .expect_err("wrong path");
    assert!(err.to_string().contains("404"), "{err}");
    let err = tokio_tungstenite::client_async(request("/$iothub/websocket", None), tls(&hub).await)
        .await
        .expect_err("no subprotocol");
    assert!(err.to_string().contains("400"), "{err}");
    let refused = hub
        .metric("fleethub_connection_attempts_total{result=\"websocket_error\"}")
        .await;
    assert_eq!(refused, 2.0);
}
