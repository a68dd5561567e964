//! Image packages over the API and CLI: content-hash ids, immutability, name:latest,
//! download, bad input, and survival of `kill -9`.

use reqwest::Method;
use serde_json::Value;

use crate::harness::{cli, Hub};

async fn upload(hub: &Hub, query: &str, body: &[u8]) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(hub.api_url(&format!("/images?{query}")))
        .bearer_auth(&hub.token)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn images_are_immutable_and_latest_follows_the_highest_version() {
    let mut hub = Hub::start("images").await;
    let dir = hub.data_dir().join("uploads");
    std::fs::create_dir_all(&dir).unwrap();
    let v1 = dir.join("app-1.bin");
    std::fs::write(&v1, b"application one").unwrap();

    let (ok, out, err) = cli(
        &hub,
        &[
            "image",
            "add",
            v1.to_str().unwrap(),
            "--name",
            "blink",
            "--version",
            "1.0.0",
            "--kind",
            "application",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let a: Value = serde_json::from_str(&out).unwrap();
    let id = a["id"].as_str().unwrap().to_string();
    // The id is the SHA-256 of the content.
    let digest = <sha2::Sha256 as sha2::Digest>::digest(b"application one");
    let expected: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(id, expected);
    assert_eq!(a["size"], 15);

    // Re-adding the same content returns the existing image.
    let (s, again) = upload(
        &hub,
        "name=blink&version=1.0.0&kind=application",
        b"application one",
    )
    .await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["id"], id.as_str());
    // A name and version never point at other content.
    let (s, b) = upload(
        &hub,
        "name=blink&version=1.0.0&kind=application",
        b"something else",
    )
    .await;
    assert_eq!(s, 409, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("add a new version"),
        "{b}"
    );
    // Bad input, each with its reason.
    for (query, needle) in [
        ("name=blink&version=1.0&kind=application", "X.Y.Z"),
        ("name=bl:ink&version=1.0.1&kind=application", "character 3"),
        (
            "name=blink&version=1.0.1&kind=firmware",
            "application or board-config",
        ),
        ("version=1.0.1&kind=application", "'name'"),
    ] {
        let (s, b) = upload(&hub, query, b"x").await;
        assert_eq!(s, 400, "{query}: {b}");
        assert!(
            b["message"].as_str().unwrap().contains(needle),
            "{query}: {b}"
        );
    }

    for (version, body) in [("1.10.0", "ten"), ("1.9.0", "nine")] {
        let (s, b) = upload(
            &hub,
            &format!("name=blink&version={version}&kind=application"),
            body.as_bytes(),
        )
        .await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, latest) = hub.api(Method::GET, "/images/blink:latest", None).await;
    assert_eq!(s, 200);
    assert_eq!(latest["version"], "1.10.0", "versions compare numerically");
    let (_, pinned) = hub.api(Method::GET, "/images/blink:1.0.0", None).await;
    assert_eq!(pinned["id"], id.as_str());
    let (s, _) = hub.api(Method::GET, "/images/blink:2.0.0", None).await;
    assert_eq!(s, 404);
    // No update verb: the API has nothing that changes an image.
    let (s, _) = hub.api(Method::PATCH, &format!("/images/{id}"), None).await;
    assert_eq!(s, 405);

    // Survives kill -9, content and all.
    hub.kill9();
    let hub = hub.restart().await;
    let (ok, out, err) = cli(&hub, &["image", "list"]);
    assert!(ok, "{err}");
    assert_eq!(out.matches("blink").count(), 3, "{out}");
    let target = dir.join("downloaded.bin");
    let (ok, _, err) = cli(
        &hub,
        &[
            "image",
            "download",
            "blink:1.0.0",
            "--out",
            target.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"application one");
}
