//! Products and device groups over the API and CLI: default groups, naming rules, case-
//! insensitive uniqueness, a fixed GUID, device membership and moves, deletion refused while
//! devices depend on it, and all of it surviving `kill -9`.

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{cli, Hub};

fn names(groups: &Value) -> Vec<String> {
    groups
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_product_gets_its_default_groups_and_names_are_checked() {
    let hub = Hub::start("fleet-products").await;
    let (s, p) = hub
        .api(
            Method::POST,
            "/products",
            Some(json!({ "name": "Coffee Maker", "description": "espresso line" })),
        )
        .await;
    assert_eq!(s, 201, "{p}");
    let id = p["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a GUID: {id}");
    let mut groups = names(&p["groups"]);
    groups.sort();
    assert_eq!(
        groups,
        [
            "Development",
            "Field Test",
            "Field Test OS Evaluation",
            "Production",
            "Production OS Evaluation"
        ]
    );
    let by_name = |n: &str| {
        p["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_name("Development")["applicationUpdates"], false);
    assert_eq!(by_name("Production")["applicationUpdates"], true);
    assert_eq!(by_name("Production")["osFeed"], "Retail");
    assert_eq!(by_name("Field Test OS Evaluation")["osFeed"], "RetailEval");

    // Naming rules, each refused with the reason.
    for (name, needle) in [
        ("Coffee-Maker", "character 7"),
        (&"x".repeat(51) as &str, "at most 50"),
        ("   ", "must not be empty"),
    ] {
        let (s, b) = hub
            .api(Method::POST, "/products", Some(json!({ "name": name })))
            .await;
        assert_eq!(s, 400, "{name}: {b}");
        assert!(b["message"].as_str().unwrap().contains(needle), "{b}");
    }
    let (s, b) = hub
        .api(
            Method::POST,
            "/products",
            Some(json!({ "name": "coffee MAKER" })),
        )
        .await;
    assert_eq!(s, 409, "product names are unique, case-insensitively: {b}");
    let (s, b) = hub
        .api(
            Method::POST,
            "/products/Coffee%20Maker/groups",
            Some(json!({ "name": "field test" })),
        )
        .await;
    assert_eq!(s, 409, "group names are unique within a product: {b}");
    let (s, b) = hub
        .api(Method::POST, "/products", Some(json!({ "nam": "x" })))
        .await;
    assert_eq!(s, 400);
    assert!(b["message"].as_str().unwrap().contains("nam"), "{b}");

    // --no-default-groups, and the same group name in another product.
    let (ok, out, err) = cli(
        &hub,
        &[
            "product",
            "create",
            "Toaster",
            "--no-default-groups",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["groups"], json!([]));
    let (ok, out, err) = cli(
        &hub,
        &[
            "device-group",
            "create",
            "Toaster/Field Test",
            "--application-updates",
            "off",
            "--os-feed",
            "retail-eval",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let g: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(g["applicationUpdates"], false);
    assert_eq!(g["osFeed"], "RetailEval");
    assert_eq!(g["product"], "Toaster");

    // Renaming keeps the GUID; the description is editable.
    let (ok, out, err) = cli(
        &hub,
        &[
            "product",
            "update",
            "coffee maker",
            "--new-name",
            "Coffee Maker Pro",
            "--description",
            "v2",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let renamed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(renamed["id"], id.as_str());
    assert_eq!(renamed["description"], "v2");
    let (s, by_id) = hub.api(Method::GET, &format!("/products/{id}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(by_id["name"], "Coffee Maker Pro");

    let (ok, out, _) = cli(&hub, &["product", "list"]);
    assert!(ok);
    assert!(
        out.contains("Coffee Maker Pro") && out.contains("Toaster"),
        "{out}"
    );

    // A group update changes only what was given.
    let (ok, out, err) = cli(
        &hub,
        &[
            "device-group",
            "update",
            "Toaster/Field Test",
            "--description",
            "bench units",
            "--application-updates",
            "on",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let g: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(g["description"], "bench units");
    assert_eq!(g["applicationUpdates"], true);
    assert_eq!(g["osFeed"], "RetailEval", "not given: kept");
    assert_eq!(g["name"], "Field Test", "not given: kept");
}

#[tokio::test]
async fn devices_are_in_exactly_one_group_and_deletion_waits_for_them() {
    let mut hub = Hub::start("fleet-members").await;
    hub.api(Method::POST, "/products", Some(json!({ "name": "Sensor" })))
        .await;
    hub.api(
        Method::POST,
        "/products",
        Some(json!({ "name": "Gateway" })),
    )
    .await;
    hub.create_device("s1").await;
    hub.create_device("s2").await;

    let (ok, out, err) = cli(
        &hub,
        &[
            "device",
            "update",
            "s1",
            "--device-group",
            "Sensor/Field Test",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("deviceGroup:      Sensor/Field Test"), "{out}");
    let (s, d) = hub
        .api(
            Method::PATCH,
            "/devices/s2",
            Some(json!({ "deviceGroup": "sensor/production" })),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["deviceGroup"], "Sensor/Production");

    // Unknown groups and malformed paths are refused; the device keeps its group.
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/devices/s1",
            Some(json!({ "deviceGroup": "Sensor/Nope", "status": "disabled" })),
        )
        .await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/devices/s1",
            Some(json!({ "deviceGroup": "no slash" })),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("Product/Group"),
        "{b}"
    );
    let (_, d) = hub.api(Method::GET, "/devices/s1", None).await;
    assert_eq!(d["deviceGroup"], "Sensor/Field Test");
    assert_eq!(
        d["status"], "enabled",
        "nothing of a refused update applies"
    );

    // A group lists its devices; counts add up.
    let (_, g) = hub
        .api(Method::GET, "/products/Sensor/groups/Field%20Test", None)
        .await;
    assert_eq!(g["deviceIds"], json!(["s1"]));
    assert_eq!(g["devices"], 1);

    // Deleting what devices depend on is refused with the reason.
    let (s, b) = hub.api(Method::DELETE, "/products/Sensor", None).await;
    assert_eq!(s, 409, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("2 device(s)"),
        "{b}"
    );
    let (ok, _, err) = cli(&hub, &["device-group", "delete", "Sensor/Field Test"]);
    assert!(!ok);
    assert!(err.contains("still has 1 device(s)"), "{err}");

    // Moving a device leaves its old group: it is in exactly one.
    let (ok, _, err) = cli(
        &hub,
        &[
            "device",
            "update",
            "s1",
            "--device-group",
            "Gateway/Development",
        ],
    );
    assert!(ok, "{err}");
    let (_, g) = hub
        .api(Method::GET, "/products/Sensor/groups/Field%20Test", None)
        .await;
    assert_eq!(g["deviceIds"], json!([]));
    let (ok, _, err) = cli(&hub, &["device-group", "delete", "Sensor/Field Test"]);
    assert!(ok, "{err}");

    // All of it survives kill -9.
    hub.kill9();
    let hub = hub.restart().await;
    let (_, d) = hub.api(Method::GET, "/devices/s1", None).await;
    assert_eq!(d["deviceGroup"], "Gateway/Development");
    let (_, p) = hub.api(Method::GET, "/products/Sensor", None).await;
    assert_eq!(names(&p["groups"]).len(), 4, "{p}");
    let (ok, out, err) = cli(&hub, &["device-group", "list", "--product", "Gateway"]);
    assert!(ok, "{err}");
    assert!(out.contains("Development"), "{out}");

    // With its devices gone elsewhere, the product can go.
    hub.api(
        Method::PATCH,
        "/devices/s2",
        Some(json!({ "deviceGroup": "Gateway/Production" })),
    )
    .await;
    let (s, b) = hub.api(Method::DELETE, "/products/Sensor", None).await;
    assert_eq!(s, 204, "{b}");
    let (s, _) = hub.api(Method::GET, "/products/Sensor", None).await;
    assert_eq!(s, 404);
    let (_, all) = hub.api(Method::GET, "/device-groups", None).await;
    assert!(all["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|g| g["product"] == "Gateway"));
}
