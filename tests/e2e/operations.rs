//! Running the hub as a service: logs for machines (plain text without colour when not on a
//! terminal, JSON lines on request).

use crate::harness::{temp_dir, Hub};

fn logs_of(hub: &Hub) -> String {
    std::fs::read_dir(&hub.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("hub-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn redirected_logs_are_plain_and_json_logs_are_one_object_per_line() {
    // The harness sends the hub's output to a file: no terminal, so no colour codes.
    let hub = Hub::start("logs-text").await;
    hub.create_device("d1").await;
    let text = logs_of(&hub);
    assert!(text.contains("fleethub listening"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in a redirected log:\n{text}"
    );
    drop(hub);

    let hub = Hub::start_with(temp_dir("logs-json"), &["--log-format", "json"]).await;
    hub.create_device("d1").await;
    let json = logs_of(&hub);
    let mut listening = None;
    for line in json.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["target"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
        if v["fields"]["message"] == "fleethub listening" {
            listening = Some(v);
        }
    }
    let listening = listening.expect("the listening line");
    assert_eq!(listening["level"], "INFO");
    assert!(
        listening["fields"]["api"].is_string(),
        "fields carried: {listening}"
    );
}
