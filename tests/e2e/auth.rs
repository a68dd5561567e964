//! CONNECT authentication: SAS tokens over plain MQTT and TLS, refusals for bad, expired,
//! unknown and disabled identities, and the service (admin token) connection.

use std::time::Duration;

use reqwest::Method;
use rumqttc::ConnectReturnCode;
use serde_json::json;

use crate::harness::{unix_now, Client, Hub};

#[tokio::test]
async fn good_token_connects_over_plain_and_tls() {
    let hub = Hub::start("auth-good").await;
    let key = hub.create_device("dev1").await;
    let token = hub.sas("dev1", &key);
    Client::connect(hub.options("dev1", &token))
        .await
        .expect("plain MQTT");
    Client::connect(hub.tls_options("dev1", &token))
        .await
        .expect("TLS with the generated CA");
    // The secondary key works too.
    let (_, rec) = hub.api(Method::GET, "/devices/dev1", None).await;
    let secondary = rec["authentication"]["symmetricKey"]["secondaryKey"]
        .as_str()
        .unwrap();
    Client::connect(hub.options("dev1", &hub.sas("dev1", secondary)))
        .await
        .expect("secondary key");
    assert!(
        hub.metric("fleethub_connection_attempts_total{result=\"accepted\"}")
            .await
            >= 3.0
    );
}

#[tokio::test]
async fn bad_credentials_are_refused_not_authorized() {
    let hub = Hub::start("auth-bad").await;
    let key = hub.create_device("dev1").await;
    let other_key = hub.create_device("dev2").await;

    // Signed with another device's key.
    let wrong = hub.sas("dev1", &other_key);
    assert_eq!(
        Client::connect(hub.options("dev1", &wrong)).await.err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    // A valid token for dev2 presented by client id dev1.
    let dev2_token = hub.sas("dev2", &other_key);
    assert_eq!(
        Client::connect(hub.options("dev1", &dev2_token))
            .await
            .err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    // Garbage password.
    assert_eq!(
        Client::connect(hub.options("dev1", "not a token"))
            .await
            .err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    // Expired token.
    let resource = fleethub::sas::resource_for(
        &hub.hostname,
        &fleethub::identity::IdentityKey::parse("dev1").unwrap(),
    );
    let expired = fleethub::sas::generate(&resource, &key, unix_now() - 10).unwrap();
    assert_eq!(
        Client::connect(hub.options("dev1", &expired)).await.err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    // Unknown device.
    let ghost = hub.sas("ghost", &key);
    assert_eq!(
        Client::connect(hub.options("ghost", &ghost)).await.err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    // Username naming another device.
    let mut o = hub.options("dev1", &hub.sas("dev1", &key));
    o.set_credentials(hub.username("dev2"), hub.sas("dev1", &key));
    assert_eq!(
        Client::connect(o).await.err(),
        Some(ConnectReturnCode::NotAuthorized)
    );

    assert_eq!(
        hub.metric("fleethub_connection_attempts_total{result=\"expired_token\"}")
            .await,
        1.0
    );
    assert_eq!(
        hub.metric("fleethub_connection_attempts_total{result=\"unknown_identity\"}")
            .await,
        1.0
    );
    assert_eq!(
        hub.metric("fleethub_connection_attempts_total{result=\"accepted\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn disabled_device_is_refused_and_disabling_disconnects() {
    let hub = Hub::start("auth-disabled").await;
    let key = hub.create_device("dev1").await;
    let mut live = hub.device("dev1", &key).await;
    let (status, body) = hub
        .api(
            Method::PATCH,
            "/devices/dev1",
            Some(json!({ "status": "disabled" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        live.disconnected(Duration::from_secs(5)).await.is_some(),
        "live connection closed on disable"
    );
    assert_eq!(
        Client::connect(hub.options("dev1", &hub.sas("dev1", &key)))
            .await
            .err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    let (status, _) = hub
        .api(
            Method::PATCH,
            "/devices/dev1",
            Some(json!({ "status": "enabled" })),
        )
        .await;
    assert_eq!(status, 200);
    hub.device("dev1", &key).await;
}

#[tokio::test]
async fn modules_authenticate_with_their_own_keys() {
    let hub = Hub::start("auth-module").await;
    let dkey = hub.create_device("dev1").await;
    let mkey = hub.create_module("dev1", "filter").await;
    hub.device("dev1/filter", &mkey).await;
    // The device's key does not open the module.
    assert_eq!(
        Client::connect(hub.options("dev1/filter", &hub.sas("dev1/filter", &dkey)))
            .await
            .err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    // A module token does not open the device.
    let resource = fleethub::sas::resource_for(
        &hub.hostname,
        &fleethub::identity::IdentityKey::parse("dev1/filter").unwrap(),
    );
    let module_token = fleethub::sas::generate(&resource, &mkey, unix_now() + 60).unwrap();
    assert_eq!(
        Client::connect(hub.options("dev1", &module_token))
            .await
            .err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
}

#[tokio::test]
async fn second_connection_with_same_id_takes_over() {
    let hub = Hub::start("auth-takeover").await;
    let key = hub.create_device("dev1").await;
    let mut first = hub.device("dev1", &key).await;
    let _second = hub.device("dev1", &key).await;
    assert!(first.disconnected(Duration::from_secs(5)).await.is_some());
    let (_, rec) = hub.api(Method::GET, "/devices/dev1", None).await;
    assert_eq!(rec["connectionState"], "Connected");
}

#[tokio::test]
async fn service_connection_needs_the_admin_token() {
    let hub = Hub::start("auth-service").await;
    let addr = hub.endpoints.mqtt.unwrap();
    let mut o = rumqttc::MqttOptions::new("ops", addr.ip().to_string(), addr.port());
    o.set_credentials("$service", "wrong");
    assert_eq!(
        Client::connect(o).await.err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    hub.monitor().await;
}
