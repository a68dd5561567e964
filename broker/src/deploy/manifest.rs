//! Deployment content as IoT Edge and IoT Hub users write it, parsed once into what it sets.
//!
//! ```json
//! {"content": {"modulesContent": {
//!     "$edgeAgent": {"properties.desired": {...}},
//!     "$edgeHub":   {"properties.desired.routes.upstream": "FROM /messages/* INTO $upstream"},
//!     "filter":     {"properties.desired": {"threshold": 25}}}}}
//! {"content": {"deviceContent": {"properties.desired.telemetryInterval": 5}}}
//! ```
//!
//! `properties.desired` replaces a twin's deployment-owned desired properties with the object
//! given; `properties.desired.<path>` sets one value (what layered deployments use). Every
//! error names the JSON path it is about.

use serde_json::{Map, Value};

use crate::identity::ModuleId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {message}")]
pub struct ManifestError {
    pub path: String,
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError {
        path: path.into(),
        message: message.into(),
    }
}

/// Which twin an entry writes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Device,
    Module(String),
}

impl Target {
    pub fn label(&self) -> &str {
        match self {
            Target::Device => "",
            Target::Module(m) => m,
        }
    }
}

/// One thing content sets.
#[derive(Debug, Clone, PartialEq)]
pub enum Set {
    /// `properties.desired`: these top-level keys.
    All(Map<String, Value>),
    /// `properties.desired.a.b`: one value at a path.
    Path(Vec<String>, Value),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub entries: Vec<(Target, Set)>,
}

impl Content {
    /// Parses `{"content": {...}}` or the inner object.
    pub fn parse(v: &Value) -> Result<Content, ManifestError> {
        let (inner, base) = match v.get("content") {
            Some(c) => (c, "content"),
            None => (v, ""),
        };
        let at = |k: &str| {
            if base.is_empty() {
                k.to_string()
            } else {
                format!("{base}.{k}")
            }
        };
        let Value::Object(obj) = inner else {
            return Err(err(
                if base.is_empty() { "(top)" } else { base },
                "expected an object with modulesContent or deviceContent",
            ));
        };
        if let Some(k) = obj
            .keys()
            .find(|k| *k != "modulesContent" && *k != "deviceContent")
        {
            return Err(err(
                at(k),
                "unknown key (expected modulesContent or deviceContent)",
            ));
        }
        let mut entries = Vec::new();
        match (obj.get("modulesContent"), obj.get("deviceContent")) {
            (Some(_), Some(_)) => {
                return Err(err(
                    if base.is_empty() { "(top)" } else { base },
                    "give modulesContent or deviceContent, not both",
                ))
            }
            (None, None) => {
                return Err(err(
                    if base.is_empty() { "(top)" } else { base },
                    "expected modulesContent or deviceContent",
                ))
            }
            (Some(Value::Object(modules)), None) => {
                if modules.is_empty() {
                    return Err(err(at("modulesContent"), "names no module"));
                }
                for (module, sets) in modules {
                    let path = at(&format!("modulesContent.{module}"));
                    ModuleId::new(module).map_err(|e| err(&path, e.to_string()))?;
                    for set in parse_sets(sets, &path)? {
                        entries.push((Target::Module(module.clone()), set));
                    }
                }
            }
            (None, Some(device)) => {
                for set in parse_sets(device, &at("deviceContent"))? {
                    entries.push((Target::Device, set));
                }
            }
            (Some(_), None) => return Err(err(at("modulesContent"), "expected an object")),
        }
        Ok(Content { entries })
    }

    /// The twins this content writes.
    pub fn targets(&self) -> Vec<Target> {
        let mut t: Vec<Target> = self.entries.iter().map(|(t, _)| t.clone()).collect();
        t.sort();
        t.dedup();
        t
    }
}

fn parse_sets(v: &Value, path: &str) -> Result<Vec<Set>, ManifestError> {
    let Value::Object(obj) = v else {
        return Err(err(
            path,
            "expected an object of properties.desired entries",
        ));
    };
    if obj.is_empty() {
        return Err(err(path, "sets nothing"));
    }
    let mut sets = Vec::new();
    for (k, value) in obj {
        let here = format!("{path}.{k}");
        if k == "properties.desired" {
            let Value::Object(m) = value else {
                return Err(err(here, "expected an object"));
            };
            let checked = crate::twin::doc::validate(&here, Value::Object(m.clone()))
                .map_err(|e| err(&here, e.to_string()))?;
            sets.push(Set::All(checked));
        } else if let Some(rest) = k.strip_prefix("properties.desired.") {
            let parts: Vec<String> = rest.split('.').map(str::to_string).collect();
            if parts.iter().any(|p| p.is_empty() || p.starts_with('$')) {
                return Err(err(here, "a path part is empty or starts with '$'"));
            }
            let mut wrapped = value.clone();
            for p in parts.iter().rev() {
                let mut m = Map::new();
                m.insert(p.clone(), wrapped);
                wrapped = Value::Object(m);
            }
            crate::twin::doc::validate(&here, wrapped).map_err(|e| err(&here, e.to_string()))?;
            sets.push(Set::Path(parts, value.clone()));
        } else {
            return Err(err(
                here,
                "expected \"properties.desired\" or \"properties.desired.<path>\"",
            ));
        }
    }
    Ok(sets)
}

/// Applies sets in order onto a map of deployment-owned desired properties.
pub fn apply(map: &mut Map<String, Value>, set: &Set) {
    match set {
        Set::All(all) => {
            for (k, v) in all {
                map.insert(k.clone(), v.clone());
            }
        }
        Set::Path(parts, value) => {
            let Some((last, parents)) = parts.split_last() else {
                return;
            };
            let mut here = map;
            for p in parents {
                let slot = here
                    .entry(p.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                let Value::Object(next) = slot else { return };
                here = next;
            }
            here.insert(last.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn modules_and_device_content() {
        let c = Content::parse(&json!({"content": {"modulesContent": {
            "$edgeAgent": {"properties.desired": {"schemaVersion": "1.1", "modules": {}}},
            "$edgeHub": {"properties.desired.routes.up": "FROM /messages/* INTO $upstream"}
        }}}))
        .unwrap();
        assert_eq!(
            c.targets(),
            vec![
                Target::Module("$edgeAgent".into()),
                Target::Module("$edgeHub".into())
            ]
        );
        let mut m = Map::new();
        for (_, s) in &c.entries {
            apply(&mut m, s);
        }
        assert_eq!(m["routes"]["up"], "FROM /messages/* INTO $upstream");
        assert_eq!(m["schemaVersion"], "1.1");

        let d = Content::parse(&json!({"deviceContent": {"properties.desired.fw.version": "2"}}))
            .unwrap();
        assert_eq!(d.targets(), vec![Target::Device]);
    }

    #[test]
    fn errors_name_the_path() {
        let cases = [
            (
                json!({"content": {"modulesContent": {"m": {"propertiesdesired": {}}}}}),
                "content.modulesContent.m.propertiesdesired",
            ),
            (
                json!({"content": {"modulesContent": {"bad/id": {"properties.desired": {}}}}}),
                "content.modulesContent.bad/id",
            ),
            (
                json!({"content": {"deviceContent": {"properties.desired": {"$x": 1}}}}),
                "content.deviceContent.properties.desired",
            ),
            (
                json!({"content": {"modulesContent": {}, "deviceContent": {}}}),
                "content",
            ),
            (
                json!({"content": {"moduleContent": {}}}),
                "content.moduleContent",
            ),
            (
                json!({"content": {"deviceContent": {"properties.desired..x": 1}}}),
                "content.deviceContent.properties.desired..x",
            ),
            (json!([1]), "(top)"),
        ];
        for (v, path) in cases {
            let e = Content::parse(&v).unwrap_err();
            assert!(e.path.starts_with(path), "{v}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_json_parses_or_is_refused(s in "\\PC{0,120}") {
            if let Ok(v) = serde_json::from_str::<Value>(&s) {
                let _ = Content::parse(&v);
            }
        }
    }
}
