//! The twin document and its rules: JSON merge patches (RFC 7386, `null` deletes), per-leaf
//! `$metadata` with last-updated times, `$version` per section, and patch validation that names
//! the offending path.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Deepest nesting a patch may have (the patch object itself is level 1).
pub const MAX_DEPTH: usize = 10;
/// Largest patch accepted, serialised.
pub const MAX_PATCH_BYTES: usize = 32 * 1024;

/// Why a patch was refused; the message names the JSON path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("patch is not valid JSON: {0}")]
    NotJson(String),
    #[error("{section}: a patch must be a JSON object, found {found}")]
    NotObject {
        section: String,
        found: &'static str,
    },
    #[error("{path}: nesting deeper than {MAX_DEPTH} levels")]
    TooDeep { path: String },
    #[error("{section}: patch is {size} bytes; at most {MAX_PATCH_BYTES} are allowed")]
    TooLarge { section: String, size: usize },
    #[error("{path}: property names must not {rule}")]
    BadName { path: String, rule: &'static str },
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks a patch for `section` (e.g. `properties.reported`) and returns it as a map.
pub fn validate(section: &str, patch: Value) -> Result<Map<String, Value>, PatchError> {
    let size = serde_json::to_vec(&patch)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    let Value::Object(map) = patch else {
        return Err(PatchError::NotObject {
            section: section.to_string(),
            found: kind(&patch),
        });
    };
    if size > MAX_PATCH_BYTES {
        return Err(PatchError::TooLarge {
            section: section.to_string(),
            size,
        });
    }
    check_names(section, &map, 1)?;
    Ok(map)
}

fn check_names(path: &str, map: &Map<String, Value>, depth: usize) -> Result<(), PatchError> {
    if depth > MAX_DEPTH {
        return Err(PatchError::TooDeep {
            path: path.to_string(),
        });
    }
    for (k, v) in map {
        let here = format!("{path}.{k}");
        let rule = if k.is_empty() {
            Some("be empty")
        } else if k.starts_with('$') {
            Some("start with '$'")
        } else if k.contains('.') {
            Some("contain '.'")
        } else if k.contains(' ') {
            Some("contain spaces")
        } else if k.chars().any(|c| c.is_control()) {
            Some("contain control characters")
        } else {
            None
        };
        if let Some(rule) = rule {
            return Err(PatchError::BadName { path: here, rule });
        }
        if let Value::Object(child) = v {
            check_names(&here, child, depth + 1)?;
        }
    }
    Ok(())
}

/// One section (desired or reported) with its version and metadata tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Section {
    pub data: Map<String, Value>,
    pub version: u64,
    pub meta: Map<String, Value>,
}

impl Section {
    /// Applies a validated merge patch; the version goes up by one even if nothing changed.
    pub fn apply(&mut self, patch: &Map<String, Value>, now: &str, with_versions: bool) {
        self.version += 1;
        let version = with_versions.then_some(self.version);
        merge(&mut self.data, &mut self.meta, patch, now, version);
        self.meta.insert("$lastUpdated".into(), json!(now));
        if let Some(v) = version {
            self.meta.insert("$lastUpdatedVersion".into(), json!(v));
        }
    }

    /// `{...data, "$version": v}`: what devices see.
    pub fn with_version(&self) -> Value {
        let mut m = self.data.clone();
        m.insert("$version".into(), json!(self.version));
        Value::Object(m)
    }

    /// `{...data, "$metadata": {...}, "$version": v}`: what the API shows.
    pub fn full(&self) -> Value {
        let mut m = self.data.clone();
        m.insert("$metadata".into(), Value::Object(self.meta.clone()));
        m.insert("$version".into(), json!(self.version));
        Value::Object(m)
    }
}

/// RFC 7386 merge of `patch` into `target`, keeping `meta` in the same shape: leaves get
/// `{"$lastUpdated", ["$lastUpdatedVersion"]}`, objects get `$lastUpdated`.
pub fn merge(
    target: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    now: &str,
    version: Option<u64>,
) {
    let stamp = |m: &mut Map<String, Value>| {
        m.insert("$lastUpdated".into(), json!(now));
        if let Some(v) = version {
            m.insert("$lastUpdatedVersion".into(), json!(v));
        }
    };
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
                meta.remove(k);
            }
            Value::Object(child_patch) => {
                if !matches!(target.get(k), Some(Value::Object(_))) {
                    target.insert(k.clone(), Value::Object(Map::new()));
                    meta.insert(k.clone(), Value::Object(Map::new()));
                }
                if !matches!(meta.get(k), Some(Value::Object(_))) {
                    meta.insert(k.clone(), Value::Object(Map::new()));
                }
                if let (Some(Value::Object(t)), Some(Value::Object(m))) =
                    (target.get_mut(k), meta.get_mut(k))
                {
                    merge(t, m, child_patch, now, version);
                    stamp(m);
                }
            }
            leaf => {
                target.insert(k.clone(), leaf.clone());
                let mut m = Map::new();
                stamp(&mut m);
                meta.insert(k.clone(), Value::Object(m));
            }
        }
    }
}

/// A device or module twin as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Twin {
    pub tags: Map<String, Value>,
    pub desired: Section,
    pub reported: Section,
    /// Changes with every write, for `If-Match`.
    pub etag: String,
    /// Goes up with every write to any part.
    pub version: u64,
}

/// The etag of a twin nothing was ever written to: fixed, so `If-Match` works from the
/// first read.
pub const INITIAL_ETAG: &str = "AAAAAAAAAAE";

impl Twin {
    pub fn new() -> Twin {
        Twin {
            etag: INITIAL_ETAG.to_string(),
            version: 1,
            ..Twin::default()
        }
    }

    pub fn touch(&mut self) {
        self.version += 1;
        self.etag = new_etag();
    }

    /// Tags merge like properties (null deletes) but carry no metadata.
    pub fn patch_tags(&mut self, patch: &Map<String, Value>) {
        let mut scratch = Map::new();
        merge(&mut self.tags, &mut scratch, patch, "", None);
    }
}

pub fn new_etag() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(rand::random::<u64>().to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn merge_follows_rfc_7386() {
        // The RFC's own example.
        let mut target = obj(
            json!({"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"}, "tags": ["example", "sample"], "content": "This will be unchanged"}),
        );
        let patch = obj(
            json!({"title": "Hello!", "phoneNumber": "+01-123-456-7890", "author": {"familyName": null}, "tags": ["example"]}),
        );
        let mut meta = Map::new();
        merge(&mut target, &mut meta, &patch, "t", None);
        assert_eq!(
            Value::Object(target),
            json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"], "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"})
        );
    }

    #[test]
    fn sections_version_and_stamp_metadata() {
        let mut s = Section::default();
        s.apply(&obj(json!({"a": {"b": 1}, "c": 2})), "t1", true);
        s.apply(&obj(json!({"c": null})), "t2", true);
        assert_eq!(s.version, 2);
        assert_eq!(s.with_version(), json!({"a": {"b": 1}, "$version": 2}));
        assert_eq!(
            s.meta["a"]["b"],
            json!({"$lastUpdated": "t1", "$lastUpdatedVersion": 1})
        );
        assert_eq!(s.meta["$lastUpdated"], json!("t2"));
        assert!(s.meta.get("c").is_none());
        // An empty patch still counts as applied.
        s.apply(&Map::new(), "t3", true);
        assert_eq!(s.version, 3);
        // Replacing an object by a leaf and back keeps metadata in the same shape.
        s.apply(&obj(json!({"a": 5})), "t4", true);
        s.apply(&obj(json!({"a": {"x": true}})), "t5", true);
        assert_eq!(s.data["a"], json!({"x": true}));
        assert_eq!(s.meta["a"]["x"]["$lastUpdated"], json!("t5"));
    }

    #[test]
    fn validation_names_the_path() {
        let err = |v: Value| validate("properties.reported", v).unwrap_err().to_string();
        assert_eq!(
            err(json!([1])),
            "properties.reported: a patch must be a JSON object, found an array"
        );
        assert_eq!(
            err(json!({"a": {"$b": 1}})),
            "properties.reported.a.$b: property names must not start with '$'"
        );
        assert_eq!(
            err(json!({"a.b": 1})),
            "properties.reported.a.b: property names must not contain '.'"
        );
        assert_eq!(
            err(json!({"a b": 1})),
            "properties.reported.a b: property names must not contain spaces"
        );
        let mut deep = json!(1);
        for _ in 0..10 {
            deep = json!({ "k": deep });
        }
        assert!(
            validate("properties.reported", deep.clone()).is_ok(),
            "10 levels are fine"
        );
        assert!(err(json!({ "k": deep })).contains("nesting deeper than 10"));
        let big = json!({ "k": "x".repeat(MAX_PATCH_BYTES) });
        assert!(err(big).contains("at most 32768"));
    }

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-100i64..100).prop_map(|n| json!(n)),
            "[a-c]{0,3}".prop_map(Value::String)
        ]
    }

    fn json_obj() -> impl Strategy<Value = Value> {
        json_leaf().prop_recursive(3, 24, 4, |inner| {
            proptest::collection::btree_map("[a-d]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        })
    }

    fn strip_nulls(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), strip_nulls(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    proptest! {
        /// Merging `p` into anything twice is the same as once (idempotence), and the result
        /// never stores a null.
        #[test]
        fn merge_is_idempotent_and_drops_nulls(t in json_obj(), p in json_obj()) {
            // Stored documents never hold nulls: they are only ever built by merging.
            let (Value::Object(t), Value::Object(p)) = (strip_nulls(&t), p) else { return Ok(()) };
            let mut once = t.clone();
            merge(&mut once, &mut Map::new(), &p, "n", None);
            let mut twice = once.clone();
            merge(&mut twice, &mut Map::new(), &p, "n", None);
            prop_assert_eq!(&once, &twice);
            prop_assert_eq!(Value::Object(once.clone()), strip_nulls(&Value::Object(once)));
        }

        /// Every key of a patch that is not null is present afterwards with the patch's value
        /// (for leaves).
        #[test]
        fn merge_sets_leaves(t in json_obj(), p in json_obj()) {
            let (Value::Object(t), Value::Object(p)) = (t, p) else { return Ok(()) };
            let mut out = t;
            merge(&mut out, &mut Map::new(), &p, "n", None);
            for (k, v) in &p {
                match v {
                    Value::Null => prop_assert!(!out.contains_key(k)),
                    Value::Object(_) => prop_assert!(out[k].is_object()),
                    leaf => prop_assert_eq!(&out[k], leaf),
                }
            }
        }

        #[test]
        fn validate_never_panics(v in json_obj()) {
            let _ = validate("properties.desired", v);
        }
    }
}
