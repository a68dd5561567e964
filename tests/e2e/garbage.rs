//! Malformed MQTT from the network: random bytes, a good CONNECT followed by junk, a
//! CONNECT that never finishes. Each closes only its own connection; the hub keeps serving.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{connect_body, packet, Hub};

/// A v3.1.1 CONNECT for `client_id` with username and password.
fn connect_packet(client_id: &str, user: &str, pass: &str) -> Vec<u8> {
    packet(0x10, &connect_body(0b1100_0010, client_id, user, pass))
}

#[tokio::test]
async fn junk_closes_only_that_connection() {
    let hub = Hub::start("garbage").await;
    let key = hub.create_device("dev1").await;
    let addr = hub.endpoints.mqtt.unwrap();

    let mut rounds = tokio::task::JoinSet::new();
    for round in 0..50u32 {
        rounds.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let junk: Vec<u8> = (0..(round * 7 % 200 + 1))
                .map(|_| rand::random::<u8>())
                .collect();
            let _ = s.write_all(&junk).await;
            let _ = s.shutdown().await;
            let mut buf = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
            assert!(closed.is_ok(), "the hub closes a junk connection");
        });
    }

    // Authenticated, then junk after the CONNACK.
    let token = hub.sas("dev1", &key);
    for round in 0..20u32 {
        let (user, token) = (hub.username("dev1"), token.clone());
        rounds.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&connect_packet("dev1", &user, &token))
                .await
                .unwrap();
            let mut ack = [0u8; 4];
            if s.read_exact(&mut ack).await.is_err() {
                return; // taken over by a concurrent round before its CONNACK was read
            }
            assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK accepted");
            let junk: Vec<u8> = (0..(round * 13 % 300 + 1))
                .map(|_| rand::random::<u8>())
                .collect();
            let _ = s.write_all(&junk).await;
            let _ = s.shutdown().await;
            let mut buf = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
            assert!(closed.is_ok(), "the hub closes a junk connection");
        });
    }
    while let Some(r) = rounds.join_next().await {
        r.unwrap();
    }

    // A reserved packet type after CONNACK: the hub closes the connection by itself.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_packet("dev1", &hub.username("dev1"), &token))
        .await
        .unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    s.write_all(&[0x00, 0x00]).await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "closed by the hub, not by us");

    // Half a CONNECT, then silence: dropped by the connect timeout, not held forever.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x10, 50, 0, 4]).await.unwrap();

    // Still serving devices and the API; every closed connection was accounted for.
    let d = hub.device("dev1", &key).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while hub.metric("fleethub_connections").await != 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection gauge did not settle at 1"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(d);
    assert!(
        hub.metric("fleethub_protocol_errors_total{reason=\"malformed\"}")
            .await
            >= 1.0
    );
}
