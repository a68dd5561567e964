//! The message model and the IoT Hub MQTT property bag.
//!
//! Devices put a message's properties in the topic, after `messages/events/`, as a
//! url-encoded `k=v&k2=v2` bag. Keys starting with `$.` are system properties (`$.ct` content
//! type, `$.ce` content encoding, `$.mid` message id, `$.cid` correlation id, `$.on` output
//! name, ...); all others are application properties. The hub parses the bag once at the edge
//! into [`Message`], and writes the same format back out when it delivers a message.

use bytes::Bytes;

/// Printable ASCII characters escaped when writing a bag: the bag's own separators, MQTT
/// wildcards, and what would need quoting in a URL. Control characters and every byte of a
/// non-ASCII character are escaped as well.
const BAG_SPECIALS: &[u8] = b" \"#%&+/=?<>`{}";

/// Which bytes [`push_escaped`] writes as `%XX`, as a table: a bag is written for every
/// message the hub queues, and a table lookup per byte with whole unescaped runs copied at once
/// is several times faster than the `percent-encoding` crate's iterator (router bench `bag`).
const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = b < 0x20 || b >= 0x7f;
        b += 1;
    }
    let mut i = 0;
    while i < BAG_SPECIALS.len() {
        table[BAG_SPECIALS[i] as usize] = true;
        i += 1;
    }
    table
};

/// The property bag could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PropertyBagError {
    #[error("property bag entry {index}: {what} is not valid UTF-8 after percent-decoding")]
    NotUtf8 { index: usize, what: &'static str },
    #[error("property bag entry {index}: empty property name")]
    EmptyName { index: usize },
    #[error("property bag has {count} properties, at most {max} are allowed")]
    TooMany { count: usize, max: usize },
}

/// At most this many properties per message (IoT Hub allows 81 application properties plus
/// the system ones); more is refused rather than stored.
pub const MAX_PROPERTIES: usize = 128;

/// System properties the hub knows by name. Connection ids and the enqueued time are set by
/// the hub from the authenticated connection, never taken from what a device sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemProperties {
    /// `$.ct`, e.g. `application/json`.
    pub content_type: Option<String>,
    /// `$.ce`, e.g. `utf-8`.
    pub content_encoding: Option<String>,
    /// `$.mid`
    pub message_id: Option<String>,
    /// `$.cid`
    pub correlation_id: Option<String>,
    /// `$.on`: the module output a module published on.
    pub output_name: Option<String>,
    /// `$.to`
    pub to: Option<String>,
    /// `$.uid`
    pub user_id: Option<String>,
    /// `$.exp`: absolute expiry time as the sender wrote it.
    pub expiry: Option<String>,
    /// `$.cdid`: the authenticated device that sent the message.
    pub connection_device_id: Option<String>,
    /// `$.cmid`: the authenticated module that sent the message.
    pub connection_module_id: Option<String>,
    /// `iothub-enqueuedtime`: when the hub accepted the message, RFC 3339.
    pub enqueued_time: Option<String>,
}

/// Name of the enqueued-time property in a bag (as IoT Hub annotates messages).
pub const ENQUEUED_TIME: &str = "iothub-enqueuedtime";

impl SystemProperties {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        Some(match key {
            "$.ct" => &mut self.content_type,
            "$.ce" => &mut self.content_encoding,
            "$.mid" => &mut self.message_id,
            "$.cid" => &mut self.correlation_id,
            "$.on" => &mut self.output_name,
            "$.to" => &mut self.to,
            "$.uid" => &mut self.user_id,
            "$.exp" => &mut self.expiry,
            "$.cdid" => &mut self.connection_device_id,
            "$.cmid" => &mut self.connection_module_id,
            ENQUEUED_TIME => &mut self.enqueued_time,
            _ => return None,
        })
    }

    fn entries(&self) -> [(&'static str, &Option<String>); 11] {
        [
            ("$.ct", &self.content_type),
            ("$.ce", &self.content_encoding),
            ("$.mid", &self.message_id),
            ("$.cid", &self.correlation_id),
            ("$.on", &self.output_name),
            ("$.to", &self.to),
            ("$.uid", &self.user_id),
            ("$.exp", &self.expiry),
            ("$.cdid", &self.connection_device_id),
            ("$.cmid", &self.connection_module_id),
            (ENQUEUED_TIME, &self.enqueued_time),
        ]
    }

    /// Every system property that is set, by its bag name.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.entries()
            .into_iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }
}

/// One message as the hub sees it, whatever topic it came in on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The payload, untouched.
    pub body: Bytes,
    /// Application properties in the order the sender wrote them; `None` for one sent
    /// without a value (a bag key with no `=`), which the SDKs read back as null.
    pub properties: Vec<(String, Option<String>)>,
    pub system: SystemProperties,
}

impl Message {
    /// Parses a property bag (`k=v&k2=v2`, url-encoded) into a message with `body`.
    ///
    /// A leading `?` and empty entries are tolerated (SDKs differ); a key without `=` is a
    /// property without a value (null). Unknown `$.` keys are kept as application properties.
    pub fn from_bag(bag: &str, body: Bytes) -> Result<Message, PropertyBagError> {
        let mut message = Message {
            body,
            ..Message::default()
        };
        let bag = bag.strip_prefix('?').unwrap_or(bag);
        let entries = || bag.split('&').filter(|e| !e.is_empty());
        // Counted before anything is decoded, so an oversized bag costs no allocation.
        let count = entries().count();
        if count > MAX_PROPERTIES {
            return Err(PropertyBagError::TooMany {
                count,
                max: MAX_PROPERTIES,
            });
        }
        for (index, entry) in entries().enumerate() {
            let (raw_key, raw_value) = match entry.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (entry, None),
            };
            let key = decode(raw_key).ok_or(PropertyBagError::NotUtf8 {
                index,
                what: "name",
            })?;
            let value = match raw_value {
                Some(v) => Some(decode(v).ok_or(PropertyBagError::NotUtf8 {
                    index,
                    what: "value",
                })?),
                None => None,
            };
            if key.is_empty() {
                return Err(PropertyBagError::EmptyName { index });
            }
            let value = value.map(|v| v.into_owned());
            match message.system.slot(&key) {
                Some(slot) => *slot = Some(value.unwrap_or_default()),
                None => message.properties.push((key.into_owned(), value)),
            }
        }
        Ok(message)
    }

    /// Writes the properties back as a bag: system properties first, then application ones.
    pub fn to_bag(&self) -> String {
        let entries = || {
            let system = self.system.iter().map(|(k, v)| (k as &str, Some(v)));
            let app = self
                .properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_deref()));
            system.chain(app)
        };
        // Sized for the common case of little to escape, so the string grows at most once.
        let plain: usize = entries()
            .map(|(k, v)| k.len() + v.map_or(0, |v| v.len() + 1) + 1)
            .sum();
        let mut out = String::with_capacity(plain + plain / 8);
        for (key, value) in entries() {
            if !out.is_empty() {
                out.push('&');
            }
            push_escaped(&mut out, key);
            if let Some(value) = value {
                out.push('=');
                push_escaped(&mut out, value);
            }
        }
        out
    }

    /// The application property `name`, if present with a value.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Appends `s` with every byte [`ESCAPED`] names written as `%XX` (upper-case hex, as the
/// SDKs and the `percent-encoding` crate write it).
fn push_escaped(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if ESCAPED[b as usize] {
            // Unescaped bytes are ASCII, so a non-empty run starts and ends on char boundaries.
            if run < i {
                out.push_str(&s[run..i]);
            }
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
            run = i + 1;
        }
    }
    if run < bytes.len() {
        out.push_str(&s[run..]);
    }
}

/// Decodes without allocating when nothing is escaped; a system property's name is only
/// looked up, so it is never copied.
/// Decodes as `percent-encoding` does: `%` and two hex digits is a byte, any other `%` stays.
fn decode(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    let bytes = raw.as_bytes();
    let Some(first) = bytes.iter().position(|&b| b == b'%') else {
        return Some(std::borrow::Cow::Borrowed(raw));
    };
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    let mut i = first;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8(out).ok().map(std::borrow::Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_system_and_application_properties() {
        let m = Message::from_bag(
            "$.ct=application%2Fjson&$.ce=utf-8&temp%20unit=C&alert=true",
            Bytes::from_static(b"{}"),
        )
        .unwrap();
        assert_eq!(m.system.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.system.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(m.property("temp unit"), Some("C"));
        assert_eq!(m.property("alert"), Some("true"));
    }

    #[test]
    fn tolerates_empty_bag_leading_question_mark_and_bare_keys() {
        assert_eq!(
            Message::from_bag("", Bytes::new())
                .unwrap()
                .properties
                .len(),
            0
        );
        let m = Message::from_bag("?a=1&&flag&empty=", Bytes::new()).unwrap();
        assert_eq!(
            m.properties,
            vec![
                ("a".into(), Some("1".into())),
                ("flag".into(), None),
                ("empty".into(), Some(String::new()))
            ]
        );
        // A property without a value goes back out as it came: a key without '='.
        assert_eq!(m.to_bag(), "a=1&flag&empty=");
    }

    #[test]
    fn rejects_bad_encoding_with_position() {
        let err = Message::from_bag("a=1&b=%FF", Bytes::new()).unwrap_err();
        assert_eq!(
            err,
            PropertyBagError::NotUtf8 {
                index: 1,
                what: "value"
            }
        );
        let err = Message::from_bag("=x", Bytes::new()).unwrap_err();
        assert_eq!(err, PropertyBagError::EmptyName { index: 0 });
    }

    #[test]
    fn rejects_too_many_properties() {
        let bag: Vec<String> = (0..=MAX_PROPERTIES).map(|i| format!("k{i}=v")).collect();
        assert!(matches!(
            Message::from_bag(&bag.join("&"), Bytes::new()),
            Err(PropertyBagError::TooMany { .. })
        ));
    }

    #[test]
    fn bag_escapes_wildcards_and_separators() {
        let m = Message {
            properties: vec![("a&b".into(), Some("x=y/#+".into()))],
            ..Message::default()
        };
        let bag = m.to_bag();
        assert!(!bag.contains('#') && !bag.contains('+') && !bag.contains('/'));
        assert_eq!(Message::from_bag(&bag, Bytes::new()).unwrap(), m);
    }

    proptest! {
        #[test]
        fn bag_round_trips(
            props in proptest::collection::vec(("[^$].{0,12}", proptest::option::of(".{0,12}")), 0..8),
            ct in proptest::option::of(".{0,10}"),
            mid in proptest::option::of(".{0,10}"),
        ) {
            let m = Message {
                body: Bytes::new(),
                properties: props,
                system: SystemProperties { content_type: ct, message_id: mid, ..Default::default() },
            };
            prop_assert_eq!(Message::from_bag(&m.to_bag(), Bytes::new()).unwrap(), m);
        }

        /// The table-driven escaping writes exactly what the `percent-encoding` crate wrote
        /// with the set it replaced, so stored bags and what subscribers read are unchanged.
        #[test]
        fn escaping_matches_the_percent_encoding_crate(s in "\\PC{0,40}|[ -~\\x00-\\x1f\\x7f]{0,40}") {
            use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
            const OLD_SET: &AsciiSet = &CONTROLS
                .add(b' ').add(b'"').add(b'#').add(b'%').add(b'&').add(b'+').add(b'/')
                .add(b'=').add(b'?').add(b'<').add(b'>').add(b'`').add(b'{').add(b'}');
            let mut ours = String::new();
            push_escaped(&mut ours, &s);
            prop_assert_eq!(ours, utf8_percent_encode(&s, OLD_SET).to_string());
        }

        /// Decoding agrees with the `percent-encoding` crate it replaced, valid escapes, stray
        /// `%`s, truncated escapes and invalid UTF-8 alike.
        #[test]
        fn decoding_matches_the_percent_encoding_crate(s in "(%[0-9a-fA-FgG]{0,2}|\\PC|[a-z]){0,20}") {
            let theirs = percent_encoding::percent_decode_str(&s).decode_utf8().ok();
            prop_assert_eq!(decode(&s), theirs);
        }

        #[test]
        fn parser_never_panics(bag in ".{0,200}") {
            let _ = Message::from_bag(&bag, Bytes::new());
        }
    }
}
