//! edgeHub conformance over the wire: a sample of the conformance table's categories
//! (`router/tests/conformance/edgehub.tsv`) as an IoT Edge deployment would install them in
//! `$edgeHub` routes, driven by real MQTT publishes: each route has its own module input, and
//! exactly the inputs edgeHub would deliver to receive each message.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use rumqttc::QoS;
use serde_json::json;

use crate::harness::Hub;

fn into(input: &str) -> String {
    format!("BrokeredEndpoint(\"/modules/sink/inputs/{input}\")")
}

#[tokio::test]
async fn edgehub_routes_behave_as_in_edgehub_over_mqtt() {
    let hub = Hub::start("conformance").await;
    let dk = hub.create_device("d1").await;
    let pk = hub.create_module("fleethub", "producer").await;
    let sk = hub.create_module("fleethub", "sink").await;
    let routes = json!({
        // Application properties in any case; `$body` keyword in any case.
        "case": format!("FROM /messages WHERE KEY1 = 'value1' AND $BODY.s = 'x' INTO {}", into("case")),
        // A bag key without '=' is a property without a value: null, and defined.
        "null": format!("FROM /messages/* WHERE is_null(flag) AND is_defined(flag) INTO {}", into("null")),
        // An application property named $messageId wins; {$messageId} is the system one.
        "dollar": format!("FROM /messages/* WHERE $messageId = 'app' AND {{$messageId}} = 'sys' INTO {}", into("dollar")),
        // ?? and || and hex and infinity.
        "operators": format!("FROM /messages/* WHERE (missing ?? key1) || '!' = 'value1!' AND 0x10 = 16 AND exp(4000) = 3/0 INTO {}", into("operators")),
        // $body values of different types order bool < number < string.
        "order": format!("FROM /messages/* WHERE $body.n < $body.s AND $body.b < $body.n INTO {}", into("order")),
        // A source is a prefix: /messages/modules takes every hub module's output.
        "modules": format!("FROM /messages/modules INTO {}", into("modules")),
        // SELECT * is allowed; NOT binds tighter than '=' (NOT $body.b is false, = false).
        "select": format!("SELECT * FROM /messages/* WHERE NOT $body.b = false INTO {}", into("select")),
        // A condition that ends null is false, never delivered.
        "never": format!("FROM /messages/* WHERE null AND true INTO {}", into("never")),
        "twin": format!("FROM /twinChangeNotifications WHERE twin_change_includes(properties.reported.fw) INTO {}", into("twin")),
    });
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/fleethub/modules/$edgeHub",
            Some(json!({"properties": {"desired": {"schemaVersion": "1.1", "routes": routes}}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    // A wrongly typed condition is refused when installed, with the types.
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/fleethub/modules/$edgeHub",
            Some(json!({"properties": {"desired": {"routes": {
                "typo": format!("FROM /messages/* WHERE length(12.34) = 'hello' INTO {}", into("x"))
            }}}})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("found (number)"),
        "{b}"
    );

    let mut sink = hub.device("fleethub/sink", &sk).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let mut d1 = hub.device("d1", &dk).await;
    d1.subscribe_many(&["$iothub/twin/res/#"]).await;
    d1.client
        .publish(
            "devices/d1/messages/events/key1=value1&flag&%24messageId=app&%24.mid=sys&%24.ct=application%2Fjson&%24.ce=utf-8",
            QoS::AtLeastOnce,
            false,
            r#"{"n": 1, "s": "x", "b": true}"#,
        )
        .await
        .unwrap();
    let producer = hub.device("fleethub/producer", &pk).await;
    producer
        .client
        .publish(
            "devices/fleethub/modules/producer/messages/events/%24.on=out1",
            QoS::AtLeastOnce,
            false,
            "opaque",
        )
        .await
        .unwrap();
    d1.request(
        "$iothub/twin/PATCH/properties/reported/?$rid=1",
        br#"{"fw": 3}"#,
        "$iothub/twin/res/",
    )
    .await;

    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while let Some(p) = sink.next_publish(Duration::from_secs(2)).await {
        let input = p.topic.split('/').nth(5).unwrap_or_default().to_string();
        let from = if p.payload.as_ref() == b"opaque" {
            "producer"
        } else if String::from_utf8_lossy(&p.payload).contains("\"reported\"") {
            "twin"
        } else {
            "d1"
        };
        got.entry(input).or_default().push(from.into());
    }
    let want: BTreeMap<String, Vec<String>> = [
        ("case", vec!["d1"]),
        ("dollar", vec!["d1"]),
        ("modules", vec!["producer"]),
        ("null", vec!["d1"]),
        ("operators", vec!["d1"]),
        ("order", vec!["d1"]),
        ("select", vec!["d1"]),
        ("twin", vec!["twin"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(got, want);
}
