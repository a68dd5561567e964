//! How twins look from outside, and how queries see them without building JSON per twin.

use serde_json::{json, Value};

use fleethub_router::condition::{walk, Resolve, Segment};

use super::doc::Twin;
use crate::identity::IdentityKey;

/// What a device's `$iothub/twin/GET` returns.
pub fn device_json(twin: &Twin) -> Value {
    json!({
        "desired": twin.desired.with_version(),
        "reported": twin.reported.with_version(),
    })
}

/// A twin with what queries read beside it (its identity and device group), gathered once
/// however many conditions look at it: the hub's `subject` builds it.
pub struct Subject {
    pub key: IdentityKey,
    pub twin: std::sync::Arc<Twin>,
    /// The device's group as `Product/Group`.
    pub device_group: Option<String>,
}

impl Subject {
    pub fn view(&self) -> QueryView<'_> {
        QueryView {
            key: &self.key,
            twin: &self.twin,
            device_group: self.device_group.as_deref(),
        }
    }
}

/// Resolves query paths against a twin in place.
pub struct QueryView<'a> {
    pub key: &'a IdentityKey,
    pub twin: &'a Twin,
    /// The device's group as `Product/Group`, queried as `deviceGroup`.
    pub device_group: Option<&'a str>,
}

impl Resolve for QueryView<'_> {
    fn resolve(&self, path: &[Segment]) -> Option<Value> {
        let Some(Segment::Key(first)) = path.first() else {
            return None;
        };
        match first.as_str() {
            "deviceId" if path.len() == 1 => Some(json!(self.key.device.as_str())),
            "moduleId" if path.len() == 1 => self.key.module.as_ref().map(|m| json!(m.as_str())),
            "version" if path.len() == 1 => Some(json!(self.twin.version)),
            "etag" if path.len() == 1 => Some(json!(self.twin.etag)),
            "deviceGroup" if path.len() == 1 => self.device_group.map(|g| json!(g)),
            "tags" => walk_map(&self.twin.tags, &path[1..]),
            "properties" => {
                let Some(Segment::Key(section)) = path.get(1) else {
                    return None;
                };
                let section = match section.as_str() {
                    "desired" => &self.twin.desired,
                    "reported" => &self.twin.reported,
                    _ => return None,
                };
                match path.get(2) {
                    Some(Segment::Key(k)) if k == "$version" && path.len() == 3 => {
                        Some(json!(section.version))
                    }
                    _ => section.tree().resolve(&path[2..]),
                }
            }
            _ => None,
        }
    }
}

fn walk_map(map: &serde_json::Map<String, Value>, path: &[Segment]) -> Option<Value> {
    match path.split_first() {
        None => Some(Value::Object(map.clone())),
        Some((Segment::Key(k), rest)) => walk(map.get(k)?, rest).cloned(),
        Some((Segment::Index(_), _)) => None,
    }
}
