//! The parsers that take outside input, each as a fuzz target with seeds and a dictionary.

use serde_json::{json, Value};

use super::Target;
use crate::identity::IdentityKey;
use crate::topics::Principal;

/// Every target of the `fleethub` crate (device-sim adds scenario files).
pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "mqtt_packet",
            run: |b| crate::mqtt::read_raw(b),
            seeds: mqtt_seeds,
            dictionary: &[],
        },
        Target {
            name: "topic",
            run: topic,
            seeds: || {
                [
                    "devices/d1/messages/events/a=1&$.ct=application%2Fjson",
                    "devices/d1/modules/m1/messages/events/$.on=out1",
                    "$iothub/twin/GET/?$rid=1",
                    "$iothub/twin/PATCH/properties/reported/?$rid=2",
                    "$iothub/methods/res/200/?$rid=3",
                    "devices/d1/messages/devicebound/#",
                    "$fleethub/events/+/+/#",
                ]
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect()
            },
            dictionary: &[
                "/", "#", "+", "$iothub/", "devices/", "?$rid=", "%", "&", "=",
            ],
        },
        Target {
            name: "property_bag",
            run: |b| {
                let text = String::from_utf8_lossy(b);
                if let Ok(m) = fleethub_router::Message::from_bag(&text, bytes::Bytes::new()) {
                    let _ = fleethub_router::Message::from_bag(&m.to_bag(), bytes::Bytes::new());
                }
            },
            seeds: || {
                vec![
                    b"a=1&b=two%20words&$.mid=m1&$.ct=application%2Fjson&$.ce=utf-8".to_vec(),
                    b"$.cdid=d&$.cmid=m&$.on=out&iothub-creation-time-utc=2026".to_vec(),
                ]
            },
            dictionary: &["&", "=", "%", "%2", "$.", "$.ct", "$.ce", "$.mid"],
        },
        Target {
            name: "sas_token",
            run: |b| {
                let text = String::from_utf8_lossy(b);
                if let Ok(t) = crate::sas::SasToken::parse(&text) {
                    let _ = t.verify("h/devices/d", "a2V5", 0);
                }
            },
            seeds: || {
                vec![b"SharedAccessSignature sr=h%2Fdevices%2Fd&sig=abc%3D&se=1800000000".to_vec()]
            },
            dictionary: &["sr=", "sig=", "se=", "skn=", "&", "%2F", "%3D", " "],
        },
        Target {
            name: "condition",
            run: condition,
            seeds: || {
                [
                    "tags.env = 'prod' AND properties.reported.fw.version >= 2",
                    "NOT (a IN [1, 2, 'x']) OR IS_DEFINED(b.c[0]) AND LOWER(d) = 'x'",
                    "SELECT deviceId, tags.site FROM devices.modules WHERE x.y <> null",
                    "SELECT COUNT() AS n FROM devices",
                    "FROM /messages/modules/m/outputs/* WHERE $body.t > 1 INTO BrokeredEndpoint(\"/modules/s/inputs/i\")",
                    "FROM /twinChangeNotifications INTO $upstream",
                ]
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect()
            },
            dictionary: &[
                "(",
                ")",
                "[",
                "]",
                "NOT ",
                " AND ",
                " OR ",
                "-",
                "+",
                "*",
                "'",
                "\"",
                "$body.",
                "IS_DEFINED(",
                "ABS(",
                ",",
                " IN ",
                " = ",
                "SELECT ",
                " FROM ",
                " WHERE ",
                " INTO ",
                "$upstream",
            ],
        },
        Target {
            name: "twin_patch",
            run: twin_patch,
            seeds: || {
                vec![
                    br#"{"fw":{"version":"1.2","channel":null},"interval":30,"list":[1,2,{"a":true}]}"#
                        .to_vec(),
                    br#"{"$version":3,"x":{"$metadata":1}}"#.to_vec(),
                ]
            },
            dictionary: &[
                "{", "}", "[", "]", "\"", ":", ",", "null", "\"$", "1e308", "-0",
            ],
        },
        Target {
            name: "manifest",
            run: manifest,
            seeds: || {
                vec![
                    serde_json::to_vec(&json!({ "content": { "modulesContent": {
                        "$edgeAgent": { "properties.desired": { "schemaVersion": "1.1" } },
                        "$edgeHub": { "properties.desired.routes.up": "FROM /messages/* INTO $upstream" },
                        "m": { "properties.desired.x": { "y": 1 } }
                    } } }))
                    .unwrap_or_default(),
                    serde_json::to_vec(&json!({
                        "id": "d1", "targetCondition": "tags.a = 1", "priority": 3,
                        "content": { "content": { "deviceContent": { "properties.desired.fw": "2" } } },
                        "metrics": { "queries": { "ok": "SELECT deviceId FROM devices WHERE properties.reported.ok = true" } },
                        "rollout": { "phases": [10, 100], "successThreshold": 90, "failureThreshold": 10 }
                    }))
                    .unwrap_or_default(),
                ]
            },
            dictionary: &[
                "properties.desired",
                ".",
                "\"",
                "{",
                "}",
                "modulesContent",
                "deviceContent",
            ],
        },
    ]
}

fn mqtt_seeds() -> Vec<Vec<u8>> {
    // CONNECT (clean session 0, username and password), SUBSCRIBE, PUBLISH QoS 1, PINGREQ.
    let mut connect = vec![0x10, 0];
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0000, 0, 60];
    for field in [
        "d1",
        "h/d1/?api-version=2021-04-12",
        "SharedAccessSignature sr=h&sig=x&se=1",
    ] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    connect[1] = body.len() as u8;
    connect.extend(body);
    let topic = b"devices/d1/messages/events/a=1";
    let mut publish = vec![0x32, (2 + topic.len() + 2 + 2) as u8, 0, topic.len() as u8];
    publish.extend_from_slice(topic);
    publish.extend_from_slice(&[0, 7, b'{', b'}']);
    let filter = b"$iothub/twin/res/#";
    let mut subscribe = vec![
        0x82,
        (2 + 2 + filter.len() + 1) as u8,
        0,
        1,
        0,
        filter.len() as u8,
    ];
    subscribe.extend_from_slice(filter);
    subscribe.push(1);
    let mut all = connect.clone();
    all.extend(&subscribe);
    all.extend(&publish);
    all.extend([0xc0, 0]);
    vec![connect, publish, subscribe, all]
}

fn topic(b: &[u8]) {
    let text = String::from_utf8_lossy(b);
    for principal in [
        Principal::Identity(IdentityKey::parse("d1").expect("a valid id")),
        Principal::Identity(IdentityKey::parse("d1/m1").expect("a valid id")),
        Principal::Service,
    ] {
        let _ = crate::topics::classify_publish(&principal, &text);
        if let Some(f) = crate::topics::map_filter(&principal, &text) {
            let _ = crate::topics::filter_matches(&f.client, &text);
        }
    }
    let _ = IdentityKey::parse(&text);
}

fn condition(b: &[u8]) {
    use fleethub_router::condition::query::Query;
    use fleethub_router::condition::Condition;
    let text = String::from_utf8_lossy(b);
    let doc = json!({ "tags": { "env": "prod" }, "a": 1, "b": { "c": [1, 2] }, "d": "X" });
    if let Ok(c) = Condition::parse(&text) {
        let _ = c.matches(&fleethub_router::condition::JsonDoc(&doc));
    }
    if let Ok(q) = Query::parse(&text) {
        let _ = q.matches_with(&fleethub_router::condition::JsonDoc(&doc));
    }
    // Routes are edgeHub's language: parse, type-check, and evaluate against a message with
    // properties, a JSON body, and as a twin change.
    for route in [
        text.to_string(),
        format!("FROM /messages/* WHERE {text} INTO $upstream"),
    ] {
        if let Ok(r) = fleethub_router::route::Route::parse(&route) {
            if let Some(c) = r.condition {
                let message = fuzz_message();
                for twin in [false, true] {
                    let ctx = fleethub_router::context::MessageContext::new(&message, true, twin);
                    let _ = c.evaluate(&ctx);
                }
            }
        }
    }
}

/// A message with the kinds of values route conditions read.
fn fuzz_message() -> fleethub_router::Message {
    fleethub_router::Message {
        body: bytes::Bytes::from_static(
            br#"{"a": 1, "s": "x", "b": true, "n": null, "arr": [1, {"k": 2}], "o": {"p": -1.5}}"#,
        ),
        properties: vec![
            ("key1".into(), Some("value1".into())),
            ("flag".into(), None),
            ("$to".into(), Some("t".into())),
        ],
        system: fleethub_router::SystemProperties {
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            message_id: Some("m".into()),
            ..Default::default()
        },
    }
}

fn twin_patch(b: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(b) else {
        return;
    };
    let Ok(patch) = crate::twin::doc::validate("properties.desired", v) else {
        return;
    };
    let mut section = crate::twin::doc::Section::default();
    let sent = section.apply(&patch, "2026-01-01T00:00:00Z", true);
    let _ = section.resume_patch();
    let _ = section.replace_keys(&sent, "2026-01-01T00:00:01Z");
    let _ = crate::twin::doc::diff(&patch, &section.data());
}

fn manifest(b: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(b) else {
        return;
    };
    let _ = crate::deploy::manifest::Content::parse(&v);
    if let Ok(spec) = serde_json::from_value::<crate::deploy::wire::DeploymentSpec>(v) {
        let _ = crate::deploy::targeted::Compiled::from_spec(spec);
    }
}
