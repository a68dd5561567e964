//! Twins over MQTT and the API: GET, reported patches (and the 400s for bad ones), desired
//! pushes, the retained desired state across a restart, etags, isolation, module twins.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{cli, json_of, Hub};

const RES: &str = "$iothub/twin/res/";

#[tokio::test]
async fn get_and_reported_patches_over_mqtt() {
    let hub = Hub::start("twin-mqtt").await;
    let key = hub.create_device("dev1").await;
    let mut d = hub.device("dev1", &key).await;
    d.subscribe_many(&["$iothub/twin/res/#"]).await;

    let r = d.request("$iothub/twin/GET/?$rid=1", b"", RES).await;
    assert_eq!(r.topic, "$iothub/twin/res/200/?$rid=1");
    assert_eq!(
        json_of(&r),
        json!({"desired": {"$version": 1}, "reported": {"$version": 1}}),
        "a new twin's sections start at version 1, as IoT Hub's"
    );

    let r = d
        .request(
            "$iothub/twin/PATCH/properties/reported/?$rid=2",
            br#"{"fw": 2, "net": {"rssi": -60, "ssid": "x"}}"#,
            RES,
        )
        .await;
    assert_eq!(r.topic, "$iothub/twin/res/204/?$rid=2&$version=2");
    let r = d
        .request(
            "$iothub/twin/PATCH/properties/reported/?$rid=3",
            br#"{"net": {"ssid": null}}"#,
            RES,
        )
        .await;
    assert_eq!(r.topic, "$iothub/twin/res/204/?$rid=3&$version=3");
    // A patch that changes nothing still succeeds.
    let r = d
        .request("$iothub/twin/PATCH/properties/reported/?$rid=4", b"{}", RES)
        .await;
    assert_eq!(r.topic, "$iothub/twin/res/204/?$rid=4&$version=4");

    let r = d.request("$iothub/twin/GET/?$rid=5", b"", RES).await;
    assert_eq!(
        json_of(&r)["reported"],
        json!({"fw": 2, "net": {"rssi": -60}, "$version": 4})
    );

    let (s, twin) = hub.api(Method::GET, "/twins/dev1", None).await;
    assert_eq!(s, 200);
    assert_eq!(twin["properties"]["reported"]["fw"], 2);
    assert!(twin["properties"]["reported"]["$metadata"]["fw"]["$lastUpdated"].is_string());
    assert!(twin["properties"]["reported"]["$metadata"]["net"]["rssi"]["$lastUpdated"].is_string());
    assert_eq!(twin["connectionState"], "Connected");
    assert_eq!(
        hub.metric("fleethub_twin_patches_total{result=\"ok\",section=\"reported\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn bad_reported_patches_get_400_and_change_nothing() {
    let hub = Hub::start("twin-bad").await;
    let key = hub.create_device("dev1").await;
    let mut d = hub.device("dev1", &key).await;
    d.subscribe_many(&["$iothub/twin/res/#"]).await;
    d.request(
        "$iothub/twin/PATCH/properties/reported/?$rid=0",
        br#"{"ok": 1}"#,
        RES,
    )
    .await;

    let mut deep = json!(1);
    for _ in 0..11 {
        deep = json!({ "k": deep });
    }
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "not valid JSON"),
        (b"[1, 2]".to_vec(), "must be a JSON object"),
        (deep.to_string().into_bytes(), "nesting deeper than 10"),
        (br#"{"$meta": 1}"#.to_vec(), "start with '$'"),
        (
            br#"{"a": {"b.c": 1}}"#.to_vec(),
            "properties.reported.a.b.c",
        ),
        (br#"{"a b": 1}"#.to_vec(), "contain spaces"),
        (
            json!({ "big": "x".repeat(33 * 1024) })
                .to_string()
                .into_bytes(),
            "at most 32768",
        ),
    ];
    for (i, (body, expect)) in cases.into_iter().enumerate() {
        let topic = format!("$iothub/twin/PATCH/properties/reported/?$rid=b{i}");
        let r = d.request(&topic, &body, RES).await;
        assert_eq!(r.topic, format!("$iothub/twin/res/400/?$rid=b{i}"));
        let msg = json_of(&r)["message"].as_str().unwrap().to_string();
        assert!(msg.contains(expect), "{msg} should mention {expect}");
    }
    let r = d.request("$iothub/twin/GET/?$rid=9", b"", RES).await;
    assert_eq!(
        json_of(&r)["reported"],
        json!({"ok": 1, "$version": 2}),
        "unchanged by the bad patches"
    );
}

#[tokio::test]
async fn desired_updates_push_patches_and_retained_state_survives_restart() {
    let hub = Hub::start("twin-desired").await;
    let key = hub.create_device("dev1").await;
    let mut d = hub.device("dev1", &key).await;
    d.subscribe_many(&["$iothub/twin/PATCH/properties/desired/#"])
        .await;

    let (s, _) = hub
        .api(
            Method::PATCH,
            "/twins/dev1",
            Some(json!({"properties": {"desired": {"interval": 30, "mode": {"eco": true}}}})),
        )
        .await;
    assert_eq!(s, 200);
    let p = d
        .next_publish_on(
            "$iothub/twin/PATCH/properties/desired/",
            Duration::from_secs(5),
        )
        .await
        .expect("desired patch");
    assert_eq!(p.topic, "$iothub/twin/PATCH/properties/desired/?$version=2");
    assert_eq!(
        json_of(&p),
        json!({"interval": 30, "mode": {"eco": true}, "$version": 2})
    );

    let (ok, _, err) = cli(
        &hub,
        &[
            "twin",
            "update",
            "dev1",
            "--desired",
            r#"{"mode": null, "interval": 60}"#,
        ],
    );
    assert!(ok, "{err}");
    let p = d
        .next_publish_on(
            "$iothub/twin/PATCH/properties/desired/",
            Duration::from_secs(5),
        )
        .await
        .expect("second patch");
    assert_eq!(
        json_of(&p),
        json!({"mode": null, "interval": 60, "$version": 3})
    );

    // A device subscribing later gets the whole current document at once.
    let mut late = hub.device("dev1", &key).await;
    late.subscribe_many(&["$fleethub/twin/desired/#"]).await;
    let p = late
        .next_publish_on("$fleethub/twin/desired/", Duration::from_secs(5))
        .await
        .expect("retained state");
    assert_eq!(p.topic, "$fleethub/twin/desired/?$version=3");
    assert_eq!(json_of(&p), json!({"interval": 60, "$version": 3}));
    drop((d, late));

    let mut hub = hub;
    hub.kill9();
    let hub = hub.restart().await;
    let mut after = hub.device("dev1", &key).await;
    after.subscribe_many(&["$fleethub/twin/desired/#"]).await;
    let p = after
        .next_publish_on("$fleethub/twin/desired/", Duration::from_secs(5))
        .await
        .expect("retained after restart");
    assert_eq!(json_of(&p), json!({"interval": 60, "$version": 3}));
}

#[tokio::test]
async fn etags_tags_and_read_only_reported() {
    let hub = Hub::start("twin-etag").await;
    hub.create_device("dev1").await;
    let (_, twin) = hub.api(Method::GET, "/twins/dev1", None).await;
    let etag = twin["etag"].as_str().unwrap().to_string();
    let client = reqwest::Client::new();
    let patch = |etag: &str, body: Value| {
        client
            .patch(hub.api_url("/twins/dev1"))
            .bearer_auth(&hub.token)
            .header("If-Match", format!("\"{etag}\""))
            .json(&body)
            .send()
    };
    let r = patch(&etag, json!({"tags": {"location": {"region": "US"}}}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tags"]["location"]["region"], "US");
    assert_ne!(v["etag"], etag);
    let r = patch(&etag, json!({"tags": {"x": 1}})).await.unwrap();
    assert_eq!(r.status(), 412, "stale etag");
    let (_, now) = hub.api(Method::GET, "/twins/dev1", None).await;
    assert!(
        now["tags"].get("x").is_none(),
        "the refused patch changed nothing"
    );

    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/dev1",
            Some(json!({"properties": {"reported": {"fw": 1}}})),
        )
        .await;
    assert_eq!(s, 400);
    assert!(b["message"].as_str().unwrap().contains("device only"));
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/dev1",
            Some(json!({"properties": {"desired": {"$x": 1}}})),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("properties.desired.$x"),
        "{b}"
    );
    let (s, _) = hub.api(Method::GET, "/twins/ghost", None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn devices_never_see_each_others_desired_state() {
    let hub = Hub::start("twin-iso").await;
    let ka = hub.create_device("a").await;
    let kb = hub.create_device("b").await;
    let mut a = hub.device("a", &ka).await;
    let mut b = hub.device("b", &kb).await;
    let filters = [
        "$iothub/twin/PATCH/properties/desired/#",
        "$fleethub/twin/desired/#",
        "$iothub/twin/res/#",
    ];
    a.subscribe_many(&filters).await;
    b.subscribe_many(&filters).await;
    hub.api(
        Method::PATCH,
        "/twins/b",
        Some(json!({"properties": {"desired": {"secret": "b-only"}}})),
    )
    .await;
    let got = b
        .next_publish_on(
            "$iothub/twin/PATCH/properties/desired/",
            Duration::from_secs(5),
        )
        .await;
    assert!(got.is_some());
    b.client
        .publish(
            "$iothub/twin/GET/?$rid=7",
            rumqttc::QoS::AtMostOnce,
            false,
            "",
        )
        .await
        .unwrap();
    assert!(b
        .next_publish_on(RES, Duration::from_secs(5))
        .await
        .is_some());
    assert!(
        a.next_publish(Duration::from_millis(700)).await.is_none(),
        "a saw nothing of b"
    );
}

#[tokio::test]
async fn module_twins_are_their_own() {
    let hub = Hub::start("twin-module").await;
    let dk = hub.create_device("edge").await;
    let mk = hub.create_module("edge", "filter").await;
    let mut m = hub.device("edge/filter", &mk).await;
    let mut d = hub.device("edge", &dk).await;
    m.subscribe_many(&[
        "$iothub/twin/PATCH/properties/desired/#",
        "$iothub/twin/res/#",
    ])
    .await;
    d.subscribe_many(&["$iothub/twin/PATCH/properties/desired/#"])
        .await;
    let (s, _) = hub
        .api(
            Method::PATCH,
            "/twins/edge/modules/filter",
            Some(json!({"properties": {"desired": {"threshold": 5}}})),
        )
        .await;
    assert_eq!(s, 200);
    let p = m
        .next_publish_on(
            "$iothub/twin/PATCH/properties/desired/",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(json_of(&p)["threshold"], 5);
    let r = m
        .request(
            "$iothub/twin/PATCH/properties/reported/?$rid=1",
            br#"{"seen": 5}"#,
            RES,
        )
        .await;
    assert!(r.topic.starts_with("$iothub/twin/res/204/"));
    assert!(
        d.next_publish(Duration::from_millis(500)).await.is_none(),
        "the device does not get its module's patch"
    );
    let (_, twin) = hub
        .api(Method::GET, "/twins/edge/modules/filter", None)
        .await;
    assert_eq!(twin["moduleId"], "filter");
    assert_eq!(twin["properties"]["reported"]["seen"], 5);
    let (_, dtwin) = hub.api(Method::GET, "/twins/edge", None).await;
    assert!(dtwin["properties"]["desired"].get("threshold").is_none());
}

#[tokio::test]
async fn twin_queries_over_tags_reported_and_modules() {
    let hub = Hub::start("twin-query").await;
    for (id, region) in [("us1", "US"), ("us2", "US"), ("eu1", "EU")] {
        hub.create_device(id).await;
        hub.api(
            Method::PATCH,
            &format!("/twins/{id}"),
            Some(json!({"tags": {"location": {"region": region}}})),
        )
        .await;
    }
    hub.create_module("us1", "m").await;
    for (id, fw) in [("us1", 2), ("us2", 1), ("eu1", 3)] {
        let key = {
            let (_, rec) = hub.api(Method::GET, &format!("/devices/{id}"), None).await;
            rec["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let mut d = hub.device(id, &key).await;
        d.subscribe_many(&["$iothub/twin/res/#"]).await;
        d.request(
            "$iothub/twin/PATCH/properties/reported/?$rid=1",
            json!({"fw": fw}).to_string().as_bytes(),
            RES,
        )
        .await;
    }
    let hub = &hub;
    let q = |query: &str| {
        let body = json!({ "query": query });
        async move { hub.api(Method::POST, "/twins/query", Some(body)).await }
    };
    let (s, v) = q(
        "SELECT * FROM devices WHERE tags.location.region = 'US' AND properties.reported.fw >= 2",
    )
    .await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["us1"]);
    let (_, v) =
        q("SELECT COUNT() AS n FROM devices WHERE tags.location.region IN ['US', 'EU']").await;
    assert_eq!(v["items"][0]["n"], 3);
    // us1/m and the hub's own fleethub/$edgeHub.
    let (_, v) = q("SELECT COUNT() AS n FROM devices.modules").await;
    assert_eq!(v["items"][0]["n"], 2);
    let (_, v) = q(
        "SELECT * FROM devices WHERE NOT IS_DEFINED(tags.location) OR properties.reported.fw < 2",
    )
    .await;
    // us2 (fw 1) and the hub's own untagged device.
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let (s, v) = q("SELECT * FROM devices WHERE tags.location.region = ").await;
    assert_eq!(s, 400);
    assert!(v["message"].as_str().unwrap().contains("column 52"), "{v}");

    // GROUP BY with COUNT(), as IoT Hub summarises a fleet; rows in the order of the groups.
    let (s, v) = q("SELECT properties.reported.fw AS fw, COUNT() AS n FROM devices WHERE IS_DEFINED(properties.reported.fw) GROUP BY properties.reported.fw").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["items"],
        json!([{"fw": 1, "n": 1}, {"fw": 2, "n": 1}, {"fw": 3, "n": 1}])
    );
    let (_, v) = q("SELECT tags.location.region AS region, COUNT() AS n FROM devices GROUP BY tags.location.region").await;
    assert_eq!(
        v["items"],
        json!([{"region": "EU", "n": 1}, {"region": "US", "n": 2}, {"region": null, "n": 1}])
    );
    let (s, _) = q("SELECT tags.x, COUNT() FROM devices").await;
    assert_eq!(s, 400, "a field beside COUNT() must be grouped");

    // Paging as IoT Hub's query API does it: a page size, and the token the last page gave
    // (in the body, and in the x-ms-continuation header), until none comes back.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut body = json!({ "query": "SELECT deviceId FROM devices", "pageSize": 3 });
        if let Some(t) = &token {
            body["continuationToken"] = json!(t);
        }
        let (s, v) = hub.api(Method::POST, "/twins/query", Some(body)).await;
        assert_eq!(s, 200, "{v}");
        pages += 1;
        for row in v["items"].as_array().unwrap() {
            seen.push(row["deviceId"].as_str().unwrap().to_string());
        }
        match v["continuationToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 2);
    assert_eq!(
        seen,
        ["eu1", "fleethub", "us1", "us2"],
        "every twin once, in order"
    );
    let http = reqwest::Client::new();
    let resp = http
        .post(hub.api_url("/twins/query"))
        .bearer_auth(&hub.token)
        .header("x-ms-max-item-count", "1")
        .json(&json!({ "query": "SELECT deviceId FROM devices" }))
        .send()
        .await
        .unwrap();
    let header = resp.headers()["x-ms-continuation"]
        .to_str()
        .unwrap()
        .to_string();
    let first: Value = resp.json().await.unwrap();
    assert_eq!(first["items"], json!([{"deviceId": "eu1"}]));
    let second: Value = http
        .post(hub.api_url("/twins/query"))
        .bearer_auth(&hub.token)
        .header("x-ms-max-item-count", "1")
        .header("x-ms-continuation", header)
        .json(&json!({ "query": "SELECT deviceId FROM devices" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["items"], json!([{"deviceId": "fleethub"}]));
    let (s, _) = hub
        .api(
            Method::POST,
            "/twins/query",
            Some(json!({ "query": "SELECT * FROM devices", "continuationToken": "garbage!" })),
        )
        .await;
    assert_eq!(s, 400);

    let (ok, out, err) = cli(
        hub,
        &[
            "--output",
            "json",
            "twin",
            "query",
            "SELECT COUNT() AS n FROM devices WHERE tags.location.region = 'EU'",
        ],
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["items"][0]["n"], 1);
}
