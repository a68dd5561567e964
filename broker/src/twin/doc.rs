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

/// Removed paths a section remembers (oldest dropped first): enough for any realistic
/// desired document, bounded so a churning one cannot grow its twin without limit.
pub const MAX_REMOVED_PATHS: usize = 256;

/// One section (desired or reported) with its version and metadata tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Section {
    pub data: Map<String, Value>,
    /// IoT Hub's `$version`: 1 for a new twin, +1 per patch.
    #[serde(default = "first_version")]
    pub version: u64,
    pub meta: Map<String, Value>,
    /// Paths (key by key) that were in the document once and are not now, so a device that
    /// was away can be sent `null` for each ([`Section::resume_patch`]): a device that
    /// applies merge patches then ends equal to the document whatever it saw before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Vec<String>>,
}

fn first_version() -> u64 {
    1
}

impl Default for Section {
    fn default() -> Self {
        Section {
            data: Map::new(),
            version: first_version(),
            meta: Map::new(),
            removed: Vec::new(),
        }
    }
}

impl Section {
    /// Applies a validated merge patch; the version goes up by one even if nothing changed.
    /// Returns the RFC 7386 patch that takes the previous document to the new one (`null`
    /// for every removed key): what a device must apply to stay equal.
    pub fn apply(
        &mut self,
        patch: &Map<String, Value>,
        now: &str,
        with_versions: bool,
    ) -> Map<String, Value> {
        let before = self.data.clone();
        self.apply_from(before, patch, now, with_versions)
    }

    /// Replaces each top-level key of `keys` whole (a deployment's keys: nothing of an
    /// earlier value lingers; `null` removes it). Returns the patch as [`Section::apply`].
    pub fn replace_keys(&mut self, keys: &Map<String, Value>, now: &str) -> Map<String, Value> {
        let before = self.data.clone();
        for k in keys.keys() {
            self.data.remove(k);
            self.meta.remove(k);
        }
        self.apply_from(before, keys, now, true)
    }

    fn apply_from(
        &mut self,
        before: Map<String, Value>,
        patch: &Map<String, Value>,
        now: &str,
        with_versions: bool,
    ) -> Map<String, Value> {
        self.version += 1;
        let version = with_versions.then_some(self.version);
        merge(&mut self.data, &mut self.meta, patch, now, version);
        self.meta.insert("$lastUpdated".into(), json!(now));
        if let Some(v) = version {
            self.meta.insert("$lastUpdatedVersion".into(), json!(v));
        }
        let change = diff(&before, &self.data);
        if !with_versions {
            // Only desired sections are sent to devices; reported ones need no memory.
            return change;
        }
        self.track_removals(&before, &change, &mut Vec::new());
        let data = &self.data;
        self.removed.retain(|path| lookup(data, path).is_none());
        if self.removed.len() > MAX_REMOVED_PATHS {
            let excess = self.removed.len() - MAX_REMOVED_PATHS;
            self.removed.drain(..excess);
        }
        change
    }

    /// Remembers every path that `change` (the diff from `before`) removes: the paths it
    /// sets to `null` and everything that was below them or below an object it replaced by
    /// a leaf, so a later value at the same path cannot hide an old key under it.
    fn track_removals(
        &mut self,
        before: &Map<String, Value>,
        change: &Map<String, Value>,
        at: &mut Vec<String>,
    ) {
        for (k, v) in change {
            at.push(k.clone());
            let old = before.get(k);
            match (v, old) {
                (Value::Null, _) => {
                    self.remember(at);
                    if let Some(Value::Object(old)) = old {
                        self.remember_below(old, at);
                    }
                }
                (Value::Object(child), Some(Value::Object(old))) => {
                    self.track_removals(old, child, at)
                }
                (_, Some(Value::Object(old))) => self.remember_below(old, at),
                _ => {}
            }
            at.pop();
        }
    }

    fn remember(&mut self, path: &[String]) {
        if !self.removed.iter().any(|p| p == path) {
            self.removed.push(path.to_vec());
        }
    }

    fn remember_below(&mut self, old: &Map<String, Value>, at: &mut Vec<String>) {
        for (k, v) in old {
            at.push(k.clone());
            self.remember(at);
            if let Value::Object(child) = v {
                self.remember_below(child, at);
            }
            at.pop();
        }
    }

    /// The patch for a device whose copy of this section is unknown (a resumed session):
    /// the whole document, plus `null` at every remembered removed path it lacks, with
    /// `$version`. Applied as a merge patch to any document the device may hold after
    /// earlier patches, it gives exactly this one.
    pub fn resume_patch(&self) -> Value {
        let mut patch = self.data.clone();
        for path in &self.removed {
            let mut node = &mut patch;
            for (i, seg) in path.iter().enumerate() {
                let last = i + 1 == path.len();
                if !node.contains_key(seg) {
                    node.insert(seg.clone(), Value::Null);
                    break;
                }
                if last {
                    break;
                }
                match node.get_mut(seg) {
                    Some(Value::Object(child)) => node = child,
                    // A leaf (or an earlier null) replaces whatever was below it.
                    _ => break,
                }
            }
        }
        patch.insert("$version".into(), json!(self.version));
        Value::Object(patch)
    }

    /// Nothing was ever written to it (a new twin's section, at version 1).
    pub fn untouched(&self) -> bool {
        self.version <= 1 && self.data.is_empty()
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

/// The RFC 7386 merge patch that turns `from` into `to`: changed and added keys with their
/// new value, objects present in both diffed recursively, `null` for removed keys.
pub fn diff(from: &Map<String, Value>, to: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for (k, old) in from {
        match to.get(k) {
            None => {
                patch.insert(k.clone(), Value::Null);
            }
            Some(Value::Object(new)) => match old {
                Value::Object(old) => {
                    let child = diff(old, new);
                    if !child.is_empty() {
                        patch.insert(k.clone(), Value::Object(child));
                    }
                }
                _ => {
                    patch.insert(k.clone(), Value::Object(new.clone()));
                }
            },
            Some(new) if new != old => {
                patch.insert(k.clone(), new.clone());
            }
            Some(_) => {}
        }
    }
    for (k, new) in to {
        if !from.contains_key(k) {
            patch.insert(k.clone(), new.clone());
        }
    }
    patch
}

/// The value at `path` in `doc`, if every step exists.
fn lookup<'a>(doc: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let v = doc.get(first)?;
    if rest.is_empty() {
        return Some(v);
    }
    match v {
        Value::Object(child) => lookup(child, rest),
        _ => None,
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
        // IoT Hub: a new section is at version 1, the first patch makes it 2.
        assert_eq!(s.version, 3);
        assert_eq!(s.with_version(), json!({"a": {"b": 1}, "$version": 3}));
        assert_eq!(
            s.meta["a"]["b"],
            json!({"$lastUpdated": "t1", "$lastUpdatedVersion": 2})
        );
        assert_eq!(s.meta["$lastUpdated"], json!("t2"));
        assert!(s.meta.get("c").is_none());
        // An empty patch still counts as applied.
        s.apply(&Map::new(), "t3", true);
        assert_eq!(s.version, 4);
        // Replacing an object by a leaf and back keeps metadata in the same shape.
        s.apply(&obj(json!({"a": 5})), "t4", true);
        s.apply(&obj(json!({"a": {"x": true}})), "t5", true);
        assert_eq!(s.data["a"], json!({"x": true}));
        assert_eq!(s.meta["a"]["x"]["$lastUpdated"], json!("t5"));
    }

    #[test]
    fn apply_returns_the_patch_with_deletions() {
        let mut s = Section::default();
        s.apply(
            &obj(json!({"cws": {"temperature": 38, "pressure": 78}})),
            "t",
            true,
        );
        // A deployment replacing the object: the device must be told pressure is gone.
        let mut replace = obj(json!({"cws": null}));
        s.apply(&replace, "t", true);
        replace = obj(json!({"cws": {"temperature": 40}}));
        let mut s2 = Section::default();
        s2.apply(
            &obj(json!({"cws": {"temperature": 38, "pressure": 78}})),
            "t",
            true,
        );
        let mut staged = s2.data.clone();
        staged.remove("cws");
        merge(&mut staged, &mut Map::new(), &replace, "t", None);
        assert_eq!(
            Value::Object(diff(&s2.data, &staged)),
            json!({"cws": {"temperature": 40, "pressure": null}})
        );
        let change = s2.apply(
            &obj(json!({"cws": {"pressure": null, "temperature": 40}})),
            "t",
            true,
        );
        assert_eq!(
            Value::Object(change),
            json!({"cws": {"temperature": 40, "pressure": null}})
        );
        assert_eq!(
            s2.removed,
            vec![vec!["cws".to_string(), "pressure".to_string()]]
        );
        assert_eq!(
            s2.resume_patch(),
            json!({"cws": {"temperature": 40, "pressure": null}, "$version": 3})
        );
        // Adding it back forgets the removal.
        s2.apply(&obj(json!({"cws": {"pressure": 1}})), "t", true);
        assert!(s2.removed.is_empty());
        assert_eq!(s.resume_patch(), json!({"cws": null, "$version": 3}));
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

        /// `diff(a, b)` merged into `a` gives `b` (documents hold no nulls).
        #[test]
        fn diff_is_the_patch_from_a_to_b(a in json_obj(), b in json_obj()) {
            let (Value::Object(a), Value::Object(b)) = (strip_nulls(&a), strip_nulls(&b)) else { return Ok(()) };
            let mut out = a.clone();
            merge(&mut out, &mut Map::new(), &diff(&a, &b), "n", None);
            prop_assert_eq!(out, b);
        }

        /// A device that applied any prefix of the patches a section went through ends equal
        /// to the section after applying its resume patch; one that applied every change
        /// patch as it came is equal already.
        #[test]
        fn resume_patch_brings_any_earlier_copy_up_to_date(
            patches in proptest::collection::vec(json_obj(), 1..6), seen in 0usize..6,
        ) {
            let mut section = Section::default();
            let mut live = Map::new();
            let mut away = None;
            for (i, p) in patches.iter().enumerate() {
                let Value::Object(p) = p else { continue };
                let change = section.apply(p, "n", true);
                merge(&mut live, &mut Map::new(), &change, "n", None);
                prop_assert_eq!(&live, &section.data);
                if i + 1 == seen {
                    away = Some(live.clone());
                }
            }
            let mut device = away.unwrap_or_default();
            let Value::Object(mut resume) = section.resume_patch() else { unreachable!() };
            resume.remove("$version");
            merge(&mut device, &mut Map::new(), &resume, "n", None);
            prop_assert_eq!(device, section.data);
        }

        #[test]
        fn validate_never_panics(v in json_obj()) {
            let _ = validate("properties.desired", v);
        }
    }
}
