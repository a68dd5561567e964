//! The twin document and its rules: JSON merge patches (RFC 7386, `null` deletes), per-leaf
//! `$metadata` with last-updated times, `$version` per section, and patch validation that names
//! the offending path.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::node::Node;

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

/// One section (desired or reported) with its version, its properties and their metadata
/// (one compact tree, see [`Node`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredSection", into = "StoredSection")]
pub struct Section {
    /// The properties; the root's own stamp is the section's `$lastUpdated`.
    tree: Node,
    /// IoT Hub's `$version`: 1 for a new twin, +1 per patch.
    pub version: u64,
    /// Paths (key by key) that were in the document once and are not now, so a device that
    /// was away can be sent `null` for each ([`Section::resume_patch`]): a device that
    /// applies merge patches then ends equal to the document whatever it saw before.
    pub removed: Vec<Vec<String>>,
}

/// A section as stored: the document and IoT Hub's `$metadata` as JSON, the same format
/// whatever shape the section has in memory.
#[derive(Serialize, Deserialize)]
struct StoredSection {
    data: Map<String, Value>,
    #[serde(default = "first_version")]
    version: u64,
    meta: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    removed: Vec<Vec<String>>,
}

impl From<StoredSection> for Section {
    fn from(s: StoredSection) -> Section {
        Section {
            tree: Node::from_parts(&s.data, Some(&s.meta)),
            version: s.version,
            removed: s.removed,
        }
    }
}

impl From<Section> for StoredSection {
    fn from(s: Section) -> StoredSection {
        StoredSection {
            data: s.tree.to_map(),
            version: s.version,
            meta: s.tree.meta_json(),
            removed: s.removed,
        }
    }
}

fn first_version() -> u64 {
    1
}

impl Default for Section {
    fn default() -> Self {
        Section {
            tree: Node::default(),
            version: first_version(),
            removed: Vec::new(),
        }
    }
}

impl Section {
    /// The document as JSON (built on each call: keep the result when reading it twice).
    pub fn data(&self) -> Map<String, Value> {
        self.tree.to_map()
    }

    /// Top-level property `k` as JSON.
    pub fn get(&self, k: &str) -> Option<Value> {
        self.tree.get(k).map(Node::to_value)
    }

    pub fn contains_key(&self, k: &str) -> bool {
        self.tree.get(k).is_some()
    }

    /// The properties with their metadata, for reading in place (queries, metadata).
    pub fn tree(&self) -> &Node {
        &self.tree
    }

    /// IoT Hub's `$metadata` for this section.
    pub fn metadata(&self) -> Map<String, Value> {
        self.tree.meta_json()
    }

    /// Applies a validated merge patch; the version goes up by one even if nothing changed.
    /// Returns the RFC 7386 patch that takes the previous document to the new one (`null`
    /// for every removed key): what a device must apply to stay equal.
    pub fn apply(
        &mut self,
        patch: &Map<String, Value>,
        now: &str,
        with_versions: bool,
    ) -> Map<String, Value> {
        let before = self.data();
        self.apply_from(before, patch, now, with_versions)
    }

    /// Replaces each top-level key of `keys` whole (a deployment's keys: nothing of an
    /// earlier value lingers; `null` removes it). Returns the patch as [`Section::apply`].
    pub fn replace_keys(&mut self, keys: &Map<String, Value>, now: &str) -> Map<String, Value> {
        let before = self.data();
        for k in keys.keys() {
            self.tree.remove(k);
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
        let now: Arc<str> = Arc::from(now);
        self.tree.merge(patch, &now, version);
        self.tree.stamp(&now, version);
        let change = diff(&before, &self.data());
        if !with_versions {
            // Only desired sections are sent to devices; reported ones need no memory.
            return change;
        }
        self.track_removals(&before, &change, &mut Vec::new());
        let tree = &self.tree;
        self.removed.retain(|path| tree.lookup(path).is_none());
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
        let mut patch = self.data();
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
        self.version <= 1 && self.tree.is_empty()
    }

    /// `{...data, "$version": v}`: what devices see.
    pub fn with_version(&self) -> Value {
        let mut m = self.data();
        m.insert("$version".into(), json!(self.version));
        Value::Object(m)
    }

    /// `{...data, "$metadata": {...}, "$version": v}`: what the API shows.
    pub fn full(&self) -> Value {
        let mut m = self.data();
        m.insert("$metadata".into(), Value::Object(self.metadata()));
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

/// RFC 7386 merge of `patch` into `target`, with no metadata (tags, previews).
pub fn merge_plain(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(child_patch) => {
                if !matches!(target.get(k), Some(Value::Object(_))) {
                    target.insert(k.clone(), Value::Object(Map::new()));
                }
                if let Some(Value::Object(t)) = target.get_mut(k) {
                    merge_plain(t, child_patch);
                }
            }
            leaf => {
                target.insert(k.clone(), leaf.clone());
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
        merge_plain(&mut self.tags, patch);
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
        let mut tree = Node::from_parts(&target, None);
        tree.merge(&patch, &Arc::from("t"), None);
        merge_plain(&mut target, &patch);
        assert_eq!(tree.to_map(), target);
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
        let meta = Value::Object(s.metadata());
        assert_eq!(
            meta["a"]["b"],
            json!({"$lastUpdated": "t1", "$lastUpdatedVersion": 2})
        );
        assert_eq!(meta["$lastUpdated"], json!("t2"));
        assert!(meta.get("c").is_none());
        // An empty patch still counts as applied.
        s.apply(&Map::new(), "t3", true);
        assert_eq!(s.version, 4);
        // Replacing an object by a leaf and back keeps metadata in the same shape.
        s.apply(&obj(json!({"a": 5})), "t4", true);
        s.apply(&obj(json!({"a": {"x": true}})), "t5", true);
        assert_eq!(s.data()["a"], json!({"x": true}));
        assert_eq!(s.metadata()["a"]["x"]["$lastUpdated"], json!("t5"));
    }

    /// Metadata is kept compact in memory but stored and shown as the same JSON as before
    /// (IoT Hub's `$metadata`): a section written by an earlier version reads back equal.
    #[test]
    fn metadata_reads_and_writes_the_stored_json() {
        let stored = json!({
            "data": {"a": {"b": 1}, "c": "x"},
            "version": 4,
            "meta": {
                "$lastUpdated": "t3",
                "$lastUpdatedVersion": 4,
                "a": {"$lastUpdated": "t1", "$lastUpdatedVersion": 2,
                      "b": {"$lastUpdated": "t1", "$lastUpdatedVersion": 2}},
                "c": {"$lastUpdated": "t3", "$lastUpdatedVersion": 4}
            }
        });
        let s: Section = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(serde_json::to_value(&s).unwrap(), stored);
        assert_eq!(Value::Object(s.metadata()), stored["meta"]);
        assert_eq!(
            s.tree()
                .lookup(&["a".to_string(), "b".to_string()])
                .and_then(|b| b.version),
            Some(2)
        );
        // A write stamps one shared time on everything it touched.
        let mut s = s;
        s.apply(&obj(json!({"a": {"d": true}})), "t9", true);
        let meta = Value::Object(s.metadata());
        assert_eq!(meta["a"]["d"]["$lastUpdated"], json!("t9"));
        assert_eq!(meta["a"]["b"]["$lastUpdated"], json!("t1"));
        assert_eq!(meta["a"]["$lastUpdatedVersion"], json!(5));
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
        let mut staged = s2.data();
        staged.remove("cws");
        merge_plain(&mut staged, &replace);
        assert_eq!(
            Value::Object(diff(&s2.data(), &staged)),
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
            merge_plain(&mut once, &p);
            let mut twice = once.clone();
            merge_plain(&mut twice, &p);
            prop_assert_eq!(&once, &twice);
            prop_assert_eq!(Value::Object(once.clone()), strip_nulls(&Value::Object(once)));
        }

        /// Every key of a patch that is not null is present afterwards with the patch's value
        /// (for leaves).
        #[test]
        fn merge_sets_leaves(t in json_obj(), p in json_obj()) {
            let (Value::Object(t), Value::Object(p)) = (t, p) else { return Ok(()) };
            let mut out = t;
            merge_plain(&mut out, &p);
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
            merge_plain(&mut out, &diff(&a, &b));
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
                merge_plain(&mut live, &change);
                prop_assert_eq!(&live, &section.data());
                if i + 1 == seen {
                    away = Some(live.clone());
                }
            }
            let mut device = away.unwrap_or_default();
            let Value::Object(mut resume) = section.resume_patch() else { unreachable!() };
            resume.remove("$version");
            merge_plain(&mut device, &resume);
            prop_assert_eq!(device, section.data());
            // And it reads back from its stored form equal, metadata and all.
            let stored = serde_json::to_value(&section).unwrap();
            let back: Section = serde_json::from_value(stored).unwrap();
            prop_assert_eq!(back, section);
        }

        /// The compact tree merges exactly as the JSON rules do on a plain map.
        #[test]
        fn the_tree_merges_like_a_json_map(t in json_obj(), p in json_obj()) {
            let (Value::Object(t), Value::Object(p)) = (strip_nulls(&t), p) else { return Ok(()) };
            let mut tree = Node::from_parts(&t, None);
            tree.merge(&p, &Arc::from("n"), Some(2));
            let mut plain = t;
            merge_plain(&mut plain, &p);
            prop_assert_eq!(tree.to_map(), plain);
        }

        #[test]
        fn validate_never_panics(v in json_obj()) {
            let _ = validate("properties.desired", v);
        }
    }
}
