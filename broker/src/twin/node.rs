//! A twin section's properties and their `$metadata` in one compact tree.
//!
//! Why not serde_json maps: a `Map` is a B-tree whose first node takes about 630 bytes
//! however few keys it holds, and the metadata was a second tree beside it. A twin with a
//! handful of properties (a deployment's object and a device's status report) took about
//! 3 KB, and a deployment to 10,000 devices grew the hub by 25 MB for twins alone. Here an
//! object is a vector of its children sorted by name, each node carries its own
//! `$lastUpdated`, and the JSON forms (the document and IoT Hub's `$metadata`) are built
//! when asked for. Queries walk the tree in place and copy only the value they read.

use std::sync::Arc;

use fleethub_router::condition::{walk, Segment};
use serde_json::{json, Map, Value};

/// One property (or the section's root): its value and when it was last written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Node {
    /// `$lastUpdated`: one allocation shared by everything a write stamped.
    pub updated: Option<Arc<str>>,
    /// `$lastUpdatedVersion` (desired sections only).
    pub version: Option<u64>,
    body: Body,
}

#[derive(Debug, Clone, PartialEq)]
enum Body {
    /// A scalar or an array: twin documents replace arrays whole, so they are leaves.
    Leaf(Value),
    /// The children, sorted by name.
    Object(Vec<(Box<str>, Node)>),
}

impl Default for Body {
    fn default() -> Self {
        Body::Object(Vec::new())
    }
}

impl Node {
    /// An object node from its JSON form and its `$metadata` (as stored, or as an earlier
    /// version stored it). Metadata that does not fit the shape (left by hand in a store) is
    /// dropped.
    pub fn from_parts(data: &Map<String, Value>, meta: Option<&Map<String, Value>>) -> Node {
        let mut node = Node::stamped_from(meta);
        let mut children: Vec<(Box<str>, Node)> = data
            .iter()
            .map(|(k, v)| {
                let child_meta = meta.and_then(|m| m.get(k)).and_then(Value::as_object);
                let child = match v {
                    Value::Object(child) => Node::from_parts(child, child_meta),
                    leaf => Node {
                        body: Body::Leaf(leaf.clone()),
                        ..Node::stamped_from(child_meta)
                    },
                };
                (Box::from(k.as_str()), child)
            })
            .collect();
        children.sort_by(|a, b| a.0.cmp(&b.0));
        node.body = Body::Object(children);
        node
    }

    fn stamped_from(meta: Option<&Map<String, Value>>) -> Node {
        Node {
            updated: meta
                .and_then(|m| m.get("$lastUpdated"))
                .and_then(Value::as_str)
                .map(Arc::from),
            version: meta
                .and_then(|m| m.get("$lastUpdatedVersion"))
                .and_then(Value::as_u64),
            body: Body::default(),
        }
    }

    fn children(&self) -> &[(Box<str>, Node)] {
        match &self.body {
            Body::Object(children) => children,
            Body::Leaf(_) => &[],
        }
    }

    fn position(&self, k: &str) -> Result<usize, usize> {
        self.children()
            .binary_search_by(|(name, _)| (**name).cmp(k))
    }

    /// Child `k` of an object.
    pub fn get(&self, k: &str) -> Option<&Node> {
        self.position(k).ok().map(|i| &self.children()[i].1)
    }

    /// The node at `path`, if every step exists.
    pub fn lookup(&self, path: &[String]) -> Option<&Node> {
        path.iter().try_fold(self, |node, k| node.get(k))
    }

    /// An object with no children (a leaf is not empty).
    pub fn is_empty(&self) -> bool {
        matches!(&self.body, Body::Object(children) if children.is_empty())
    }

    /// A leaf's value, borrowed (`None` for an object).
    pub fn as_leaf(&self) -> Option<&Value> {
        match &self.body {
            Body::Leaf(v) => Some(v),
            Body::Object(_) => None,
        }
    }

    pub fn is_object(&self) -> bool {
        matches!(self.body, Body::Object(_))
    }

    /// Child `k`, created (an empty object without metadata) when missing; a leaf asked for
    /// a child becomes an empty object first.
    fn child_mut(&mut self, k: &str) -> &mut Node {
        if !self.is_object() {
            *self = Node::default();
        }
        let i = match self.position(k) {
            Ok(i) => i,
            Err(i) => {
                if let Body::Object(children) = &mut self.body {
                    children.insert(i, (Box::from(k), Node::default()));
                }
                i
            }
        };
        match &mut self.body {
            Body::Object(children) => &mut children[i].1,
            // Made an object above.
            Body::Leaf(_) => unreachable!("child_mut on a leaf"),
        }
    }

    /// Removes child `k` (and everything below it).
    pub fn remove(&mut self, k: &str) {
        if let (Ok(i), Body::Object(children)) = (self.position(k), &mut self.body) {
            children.remove(i);
        }
    }

    pub fn stamp(&mut self, now: &Arc<str>, version: Option<u64>) {
        self.updated = Some(now.clone());
        if version.is_some() {
            self.version = version;
        }
    }

    /// RFC 7386 merge of `patch` into this object, stamping every node it writes: leaves
    /// get `$lastUpdated` (and `$lastUpdatedVersion`), objects on the way too. An object
    /// written over a leaf starts with fresh metadata; `null` removes.
    pub fn merge(&mut self, patch: &Map<String, Value>, now: &Arc<str>, version: Option<u64>) {
        for (k, v) in patch {
            match v {
                Value::Null => self.remove(k),
                Value::Object(child_patch) => {
                    let child = self.child_mut(k);
                    if !child.is_object() {
                        *child = Node::default();
                    }
                    child.merge(child_patch, now, version);
                    child.stamp(now, version);
                }
                leaf => {
                    let child = self.child_mut(k);
                    *child = Node {
                        body: Body::Leaf(leaf.clone()),
                        ..Node::default()
                    };
                    child.stamp(now, version);
                }
            }
        }
        // Vectors grow by doubling; a twin is written rarely and read often, so it keeps
        // only what it holds.
        if let Body::Object(children) = &mut self.body {
            children.shrink_to_fit();
        }
    }

    /// The JSON value (an object's children as a map, sorted by name like the B-tree maps
    /// it replaces).
    pub fn to_value(&self) -> Value {
        match &self.body {
            Body::Leaf(v) => v.clone(),
            Body::Object(_) => Value::Object(self.to_map()),
        }
    }

    /// An object's children as a JSON map (empty for a leaf).
    pub fn to_map(&self) -> Map<String, Value> {
        self.children()
            .iter()
            .map(|(k, child)| (k.to_string(), child.to_value()))
            .collect()
    }

    /// As IoT Hub shows `$metadata`: `{"$lastUpdated": .., "$lastUpdatedVersion": ..,
    /// child: {..}}`.
    pub fn meta_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if let Some(t) = &self.updated {
            m.insert("$lastUpdated".into(), Value::String(t.to_string()));
        }
        if let Some(v) = self.version {
            m.insert("$lastUpdatedVersion".into(), json!(v));
        }
        for (k, child) in self.children() {
            m.insert(k.to_string(), Value::Object(child.meta_json()));
        }
        m
    }

    /// What a query path reads from this node, copied: the tree is walked in place down to
    /// the node, and below a leaf (into an array) the JSON itself.
    pub fn resolve(&self, path: &[Segment]) -> Option<Value> {
        match (&self.body, path.split_first()) {
            (_, None) => Some(self.to_value()),
            (Body::Leaf(v), Some(_)) => walk(v, path).cloned(),
            (Body::Object(_), Some((Segment::Key(k), rest))) => self.get(k)?.resolve(rest),
            (Body::Object(_), Some((Segment::Index(_), _))) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn round_trips_its_json_forms() {
        let data = obj(json!({"b": [1, 2], "a": {"y": "s", "x": null}}));
        let meta = obj(json!({
            "$lastUpdated": "t1",
            "a": {"$lastUpdated": "t1", "$lastUpdatedVersion": 3, "y": {"$lastUpdated": "t0"}},
            "b": {"$lastUpdated": 7},
        }));
        let node = Node::from_parts(&data, Some(&meta));
        assert_eq!(node.to_map(), data);
        assert_eq!(
            Value::Object(node.meta_json()),
            // The malformed time is dropped, a child without metadata shows an empty one.
            json!({
                "$lastUpdated": "t1",
                "a": {"$lastUpdated": "t1", "$lastUpdatedVersion": 3,
                      "x": {}, "y": {"$lastUpdated": "t0"}},
                "b": {},
            })
        );
    }

    #[test]
    fn queries_read_in_place_and_into_arrays() {
        let node = Node::from_parts(&obj(json!({"a": {"list": [10, {"k": 2}]}})), None);
        let key = |k: &str| Segment::Key(k.to_string());
        assert_eq!(
            node.resolve(&[key("a")]),
            Some(json!({"list": [10, {"k": 2}]}))
        );
        assert_eq!(
            node.resolve(&[key("a"), key("list"), Segment::Index(1), key("k")]),
            Some(json!(2))
        );
        assert_eq!(node.resolve(&[key("a"), Segment::Index(0)]), None);
        assert_eq!(node.resolve(&[key("missing")]), None);
    }

    #[test]
    fn an_object_over_a_leaf_starts_fresh_and_keeps_only_what_it_holds() {
        let mut node = Node::default();
        let now: Arc<str> = Arc::from("t1");
        node.merge(&obj(json!({"a": 1, "b": 2, "c": 3})), &now, Some(2));
        node.merge(&obj(json!({"a": {"x": true}, "b": null})), &now, Some(3));
        assert_eq!(
            Value::Object(node.to_map()),
            json!({"a": {"x": true}, "c": 3})
        );
        assert_eq!(node.get("a").and_then(|a| a.version), Some(3));
        assert_eq!(node.get("c").and_then(|c| c.version), Some(2));
        let Body::Object(children) = &node.body else {
            panic!("root is an object")
        };
        assert_eq!(children.capacity(), 2);
    }
}
