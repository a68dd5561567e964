//! Direct methods: calls waiting for a device's `$iothub/methods/res/{status}/?$rid=` reply.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::identity::IdentityKey;

/// A device's answer: its status code and JSON payload (a string if it was not JSON).
#[derive(Debug, Clone)]
pub struct MethodReply {
    pub status: i64,
    pub payload: Value,
}

#[derive(Default)]
pub struct Methods {
    next_rid: AtomicU64,
    pending: DashMap<(IdentityKey, String), oneshot::Sender<MethodReply>>,
}

impl Methods {
    /// Registers a call; returns its request id and where the reply will arrive.
    pub fn register(&self, key: &IdentityKey) -> (String, oneshot::Receiver<MethodReply>) {
        let rid = format!("{:x}", self.next_rid.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = oneshot::channel();
        self.pending.insert((key.clone(), rid.clone()), tx);
        (rid, rx)
    }

    pub fn forget(&self, key: &IdentityKey, rid: &str) {
        self.pending.remove(&(key.clone(), rid.to_string()));
    }

    /// Delivers a device's reply; `false` when no call waits for it (late or unknown rid).
    pub fn complete(&self, key: &IdentityKey, rid: &str, reply: MethodReply) -> bool {
        match self.pending.remove(&(key.clone(), rid.to_string())) {
            Some((_, tx)) => tx.send(reply).is_ok(),
            None => false,
        }
    }
}

/// The value of `$rid` in an IoT Hub topic query (`?$rid=1&$version=2`).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.trim_start_matches('?').split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        assert_eq!(query_param("?$rid=12", "$rid"), Some("12"));
        assert_eq!(query_param("?$version=3&$rid=ab", "$rid"), Some("ab"));
        assert_eq!(query_param("", "$rid"), None);
    }

    #[test]
    fn replies_reach_their_caller_once() {
        let m = Methods::default();
        let key = IdentityKey::parse("d").unwrap();
        let (rid, mut rx) = m.register(&key);
        let other = IdentityKey::parse("e").unwrap();
        assert!(!m.complete(
            &other,
            &rid,
            MethodReply {
                status: 200,
                payload: Value::Null
            }
        ));
        assert!(m.complete(
            &key,
            &rid,
            MethodReply {
                status: 200,
                payload: Value::Null
            }
        ));
        assert_eq!(rx.try_recv().unwrap().status, 200);
        assert!(!m.complete(
            &key,
            &rid,
            MethodReply {
                status: 200,
                payload: Value::Null
            }
        ));
    }
}
