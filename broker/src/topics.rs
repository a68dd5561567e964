//! The one table of topic translations and permissions.
//!
//! Devices and modules speak IoT Hub topics (`devices/{d}/...`, `$iothub/...`). Those are
//! per connection: two devices both subscribe to `$iothub/twin/res/#` and must never see each
//! other's answers. So what an identity subscribes to is never a router subscription: its
//! filter is checked against the table below and names a [`Delivery`] kind, and the hub
//! writes those deliveries to that one connection (its mailbox and durable queues).
//!
//! | client filter (prefix)                     | delivery kind    | who     |
//! |--------------------------------------------|------------------|---------|
//! | `devices/{d}/messages/devicebound/…`       | `Own` (C2D)      | device  |
//! | `devices/{d}/modules/{m}/inputs/…`         | `Own` (inputs)   | module  |
//! | `$iothub/twin/res/…`                       | `TwinResponse`   | both    |
//! | `$iothub/twin/PATCH/properties/desired/…`  | `DesiredPatch`   | both    |
//! | `$iothub/methods/POST/…`                   | `MethodRequest`  | both    |
//! | `$fleethub/twin/desired/…` (retained)      | `DesiredState`   | both    |
//! | `$fleethub/events/{d}/{m or ~}/{bag}`      | router `fh/ev/{d}/{m or ~}` | service |
//!
//! Only telemetry passes through the embedded router, for service connections
//! (`monitor-events`): published on `devices/{d}/messages/events/{bag}` (or the module form)
//! it goes to `fh/ev/{d}/{m or ~}` with the bag rewritten by the hub (connection ids,
//! enqueued time) and carried in the payload [`envelope`], so the router sees a bounded set
//! of topics (it caches each and scans every filter per new one). Ids are percent-encoded
//! there so `+`, `#` and `%` in an id never act as wildcards. Anything not in this table is
//! refused.

use bytes::{BufMut, Bytes, BytesMut};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

use crate::identity::IdentityKey;

/// Escaped in ids placed in internal topics: MQTT wildcards, the level separator and `%`.
const ID_ESCAPE: &AsciiSet = &CONTROLS.add(b'%').add(b'+').add(b'#').add(b'/');

/// Marks "no module" in telemetry topics; `~` is not a valid id character.
pub const NO_MODULE: &str = "~";
/// Internal prefix of all telemetry.
pub const EVENTS_PREFIX: &str = "fh/ev/";
/// Client-facing prefix of telemetry for service connections (`monitor-events`).
pub const SERVICE_EVENTS_PREFIX: &str = "$fleethub/events/";
/// The filter that reads the events endpoint through a consumer group.
pub const EVENTS_ALL: &str = "$fleethub/events/#";
/// The consumer group [`EVENTS_ALL`] alone reads (the events endpoint's `$Default`).
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";
/// Every router topic starts here; the router keeps one catch-all filter on it.
pub const INTERNAL_ROOT_FILTER: &str = "fh/#";

/// Who is on the other end of a connection, as established by authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A registered device or module, authenticated by its SAS token.
    Identity(IdentityKey),
    /// An operator tool authenticated by the admin token: may read all telemetry.
    Service,
}

/// What a client's PUBLISH is, once its topic has been checked against its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Telemetry (device events or module output); `bag` is the raw property bag.
    Telemetry { bag: &'a str },
    /// `$iothub/twin/GET/?$rid=..`
    TwinGet { query: &'a str },
    /// `$iothub/twin/PATCH/properties/reported/?$rid=..`
    TwinReportedPatch { query: &'a str },
    /// `$iothub/methods/res/{status}/?$rid=..`
    MethodResponse { status: &'a str, query: &'a str },
    /// Not this client's to publish to.
    Denied,
}

/// Kinds of hub-to-client delivery an identity can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// C2D for a device, inputs for a module.
    Own,
    TwinResponse,
    DesiredPatch,
    MethodRequest,
    /// The full desired document, retained: fleethub's native topic.
    DesiredState,
}

const DELIVERIES: [Delivery; 5] = [
    Delivery::Own,
    Delivery::TwinResponse,
    Delivery::DesiredPatch,
    Delivery::MethodRequest,
    Delivery::DesiredState,
];

pub fn encode_id(id: &str) -> String {
    utf8_percent_encode(id, ID_ESCAPE).to_string()
}

/// The client topic prefix of a delivery kind for `identity`.
pub fn client_prefix(identity: &IdentityKey, delivery: Delivery) -> String {
    match (delivery, &identity.module) {
        (Delivery::Own, None) => format!("devices/{}/messages/devicebound/", identity.device),
        (Delivery::Own, Some(m)) => format!("devices/{}/modules/{m}/inputs/", identity.device),
        (Delivery::TwinResponse, _) => "$iothub/twin/res/".into(),
        (Delivery::DesiredPatch, _) => "$iothub/twin/PATCH/properties/desired/".into(),
        (Delivery::MethodRequest, _) => "$iothub/methods/POST/".into(),
        (Delivery::DesiredState, _) => "$fleethub/twin/desired/".into(),
    }
}

/// The router topic telemetry from `identity` is published on.
pub fn telemetry_topic(identity: &IdentityKey) -> String {
    let module = identity
        .module
        .as_ref()
        .map(|m| encode_id(m.as_str()))
        .unwrap_or_else(|| NO_MODULE.to_string());
    format!(
        "{EVENTS_PREFIX}{}/{module}",
        encode_id(identity.device.as_str())
    )
}

/// `{d}/{m or ~}`, the id levels of an event's topic (encoded as the router's are).
pub fn telemetry_ids(device: &str, module: Option<&str>) -> String {
    let module = module
        .map(encode_id)
        .unwrap_or_else(|| NO_MODULE.to_string());
    format!("{}/{module}", encode_id(device))
}

/// The inverse of [`telemetry_ids`] at the start of `ids` (`{d}/{m or ~}[/rest]`): the
/// device, the module, and whatever follows them.
pub fn split_telemetry_ids(ids: &str) -> Option<(String, Option<String>, &str)> {
    let mut parts = ids.splitn(3, '/');
    let device = percent_decode_str(parts.next()?)
        .decode_utf8()
        .ok()?
        .into_owned();
    let module = parts.next()?;
    let module =
        (module != NO_MODULE).then(|| percent_decode_str(module).decode_utf8_lossy().into_owned());
    Some((device, module, parts.next().unwrap_or("")))
}

/// `true` when the topic level `segment` names `id` (raw or percent-encoded).
fn names(segment: &str, id: &str) -> bool {
    segment == id
        || percent_decode_str(segment)
            .decode_utf8()
            .is_ok_and(|s| s == id)
}

/// Strips `devices/{d}/` (and `modules/{m}/` for a module) off a client topic.
fn strip_identity<'a>(topic: &'a str, identity: &IdentityKey) -> Option<&'a str> {
    let rest = topic.strip_prefix("devices/")?;
    let (d, rest) = rest.split_once('/')?;
    if !names(d, identity.device.as_str()) {
        return None;
    }
    match &identity.module {
        None => Some(rest),
        Some(m) => {
            let rest = rest.strip_prefix("modules/")?;
            let (seg, rest) = rest.split_once('/')?;
            names(seg, m.as_str()).then_some(rest)
        }
    }
}

/// Rewrites `devices/{encoded d}/...` to the raw id so prefixes compare exactly.
fn normalise_own(topic: &str, identity: &IdentityKey) -> Option<String> {
    let rest = strip_identity(topic, identity)?;
    Some(match &identity.module {
        None => format!("devices/{}/{rest}", identity.device),
        Some(m) => format!("devices/{}/modules/{m}/{rest}", identity.device),
    })
}

/// Classifies a client PUBLISH topic.
pub fn classify_publish<'a>(principal: &Principal, topic: &'a str) -> Inbound<'a> {
    let Principal::Identity(identity) = principal else {
        return Inbound::Denied;
    };
    if let Some(rest) = topic.strip_prefix("$iothub/") {
        if let Some(query) = rest.strip_prefix("twin/GET/") {
            return Inbound::TwinGet { query };
        }
        if let Some(query) = rest.strip_prefix("twin/PATCH/properties/reported/") {
            return Inbound::TwinReportedPatch { query };
        }
        if let Some(rest) = rest.strip_prefix("methods/res/") {
            if let Some((status, query)) = rest.split_once('/') {
                return Inbound::MethodResponse { status, query };
            }
        }
        return Inbound::Denied;
    }
    match strip_identity(topic, identity) {
        Some("messages/events") => Inbound::Telemetry { bag: "" },
        Some(rest) => match rest.strip_prefix("messages/events/") {
            Some(bag) => Inbound::Telemetry { bag },
            None => Inbound::Denied,
        },
        None => Inbound::Denied,
    }
}

/// A client filter accepted for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedFilter {
    /// The filter as the client wrote it (normalised), checked again on every delivery so a
    /// narrow filter only gets what it asked for.
    pub client: String,
    pub target: Target,
}

/// What a filter subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An identity's own deliveries of one kind, written by the hub to its connection.
    Delivery(Delivery),
    /// Telemetry for a service connection: this filter in the embedded router (the live
    /// view: what arrives while it is connected, at the router's pace, never kept).
    Router(String),
    /// The events endpoint read through this consumer group (durable, checkpointed):
    /// `$fleethub/events/#` reads `$Default`, `$share/{group}/$fleethub/events/#` a group.
    ConsumerGroup(String),
}

impl MappedFilter {
    /// Whether the filter asks for deliveries of `kind`.
    pub fn delivers(&self, kind: Delivery) -> bool {
        self.target == Target::Delivery(kind)
    }

    /// The embedded router's filter, for service connections.
    pub fn router_filter(&self) -> Option<&str> {
        match &self.target {
            Target::Router(f) => Some(f),
            Target::Delivery(_) | Target::ConsumerGroup(_) => None,
        }
    }
}

/// Maps a client SUBSCRIBE filter, or `None` when it is not the client's to subscribe to.
pub fn map_filter(principal: &Principal, filter: &str) -> Option<MappedFilter> {
    match principal {
        Principal::Service => {
            // The whole endpoint through a consumer group (MQTT 5's shared-subscription
            // form names the group; plain `#` is `$Default`).
            let group = match filter.strip_prefix("$share/") {
                Some(rest) => {
                    let (group, filter) = rest.split_once('/')?;
                    if filter != EVENTS_ALL || group.is_empty() {
                        return None;
                    }
                    Some(group)
                }
                None if filter == EVENTS_ALL => Some(DEFAULT_CONSUMER_GROUP),
                None => None,
            };
            if let Some(group) = group {
                return Some(MappedFilter {
                    client: filter.to_string(),
                    target: Target::ConsumerGroup(group.to_string()),
                });
            }
            let rest = filter.strip_prefix(SERVICE_EVENTS_PREFIX)?;
            // Only the device and module levels exist in the router; the bag level is
            // filtered on delivery.
            let mut levels = Vec::new();
            for level in rest.split('/').take(2) {
                levels.push(level);
                if level == "#" {
                    break;
                }
            }
            Some(MappedFilter {
                client: filter.to_string(),
                target: Target::Router(format!("{EVENTS_PREFIX}{}", levels.join("/"))),
            })
        }
        Principal::Identity(identity) => {
            let normalised = normalise_own(filter, identity);
            let filter = normalised.as_deref().unwrap_or(filter);
            DELIVERIES.into_iter().find_map(|delivery| {
                filter
                    .starts_with(client_prefix(identity, delivery).as_str())
                    .then(|| MappedFilter {
                        client: filter.to_string(),
                        target: Target::Delivery(delivery),
                    })
            })
        }
    }
}

/// The client topic of telemetry on router `topic` whose envelope carried the property bag
/// `suffix`: `$fleethub/events/{d}/{m or ~}/{bag}`; `None` for anything else.
pub fn service_client_topic(topic: &str, suffix: &str) -> Option<String> {
    topic
        .strip_prefix(EVENTS_PREFIX)
        .map(|ids| format!("{SERVICE_EVENTS_PREFIX}{ids}/{suffix}"))
}

/// MQTT topic filter matching (`+` one level, `#` the rest, including the parent level).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The payload of an internal publish: the variable end of the client topic, then the body.
/// Layout: u16 big-endian suffix length, suffix bytes (UTF-8), body.
pub mod envelope {
    use super::*;

    /// Longest suffix an envelope carries (an MQTT topic is at most 65535 bytes).
    pub const MAX_SUFFIX: usize = u16::MAX as usize;

    /// `None` when the suffix is too long to carry.
    pub fn pack(suffix: &str, body: &[u8]) -> Option<Bytes> {
        let len = u16::try_from(suffix.len()).ok()?;
        let mut b = BytesMut::with_capacity(2 + suffix.len() + body.len());
        b.put_u16(len);
        b.put_slice(suffix.as_bytes());
        b.put_slice(body);
        Some(b.freeze())
    }

    /// Splits an envelope into (suffix, body); `None` when it is not one.
    pub fn unpack(payload: &Bytes) -> Option<(&str, Bytes)> {
        let len = u16::from_be_bytes([*payload.first()?, *payload.get(1)?]) as usize;
        let suffix = payload.get(2..2 + len)?;
        let suffix = std::str::from_utf8(suffix).ok()?;
        Some((suffix, payload.slice(2 + len..)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(d: &str) -> Principal {
        Principal::Identity(IdentityKey::parse(d).unwrap())
    }

    #[test]
    fn telemetry_ids_split_back_into_what_made_them() {
        for (d, m) in [("d1", None), ("d 1/x", Some("m#1")), ("dev", Some("~x"))] {
            let ids = telemetry_ids(d, m);
            let rest = format!("{ids}/$.cdid=d1");
            let (device, module, bag) = split_telemetry_ids(&rest).unwrap();
            assert_eq!(
                (device.as_str(), module.as_deref(), bag),
                (d, m, "$.cdid=d1")
            );
            let (device, module, bag) = split_telemetry_ids(&ids).unwrap();
            assert_eq!((device.as_str(), module.as_deref(), bag), (d, m, ""));
        }
        assert_eq!(split_telemetry_ids("only-a-device"), None);
    }

    /// Every row of the table: the filter maps to its delivery kind (or router filter), and
    /// the client topic that kind is delivered on matches the filter.
    #[test]
    fn each_pattern_maps_and_matches_what_it_delivers() {
        use Delivery::*;
        let cases = [
            (
                dev("d1"),
                "devices/d1/messages/devicebound/#",
                Own,
                "devices/d1/messages/devicebound/a=1",
            ),
            (
                dev("d1/m1"),
                "devices/d1/modules/m1/inputs/#",
                Own,
                "devices/d1/modules/m1/inputs/in1/x=1",
            ),
            (
                dev("d1"),
                "$iothub/twin/res/#",
                TwinResponse,
                "$iothub/twin/res/200/?$rid=1",
            ),
            (
                dev("d1/m1"),
                "$iothub/twin/res/#",
                TwinResponse,
                "$iothub/twin/res/204/?$rid=2&$version=3",
            ),
            (
                dev("d1"),
                "$iothub/twin/PATCH/properties/desired/#",
                DesiredPatch,
                "$iothub/twin/PATCH/properties/desired/?$version=4",
            ),
            (
                dev("d1"),
                "$iothub/methods/POST/#",
                MethodRequest,
                "$iothub/methods/POST/reboot/?$rid=9",
            ),
            (
                dev("d1"),
                "$fleethub/twin/desired/#",
                DesiredState,
                "$fleethub/twin/desired/?$version=4",
            ),
        ];
        for (principal, filter, kind, client_topic) in cases {
            let mapped = map_filter(&principal, filter).unwrap_or_else(|| panic!("{filter}"));
            assert_eq!(mapped.target, Target::Delivery(kind), "{filter}");
            let Principal::Identity(key) = &principal else {
                unreachable!()
            };
            assert!(
                client_topic.starts_with(&client_prefix(key, kind)),
                "{client_topic}"
            );
            assert!(
                filter_matches(&mapped.client, client_topic),
                "{filter} vs {client_topic}"
            );
        }
        // The live view of telemetry for a service connection goes through the router and
        // back.
        let mapped = map_filter(&Principal::Service, "$fleethub/events/+/#").unwrap();
        assert_eq!(mapped.router_filter(), Some("fh/ev/+/#"));
        let topic = service_client_topic("fh/ev/d1/~", "a=1").unwrap();
        assert_eq!(topic, "$fleethub/events/d1/~/a=1");
        assert!(filter_matches(&mapped.client, &topic));
    }

    /// The whole endpoint is read through a consumer group: `$Default` for the plain
    /// filter, the named one for MQTT 5's shared-subscription form; anything else of that
    /// form is refused.
    #[test]
    fn consumer_group_filters() {
        let group = |f: &str| map_filter(&Principal::Service, f).map(|m| m.target);
        assert_eq!(
            group("$fleethub/events/#"),
            Some(Target::ConsumerGroup("$Default".into()))
        );
        assert_eq!(
            group("$share/analytics/$fleethub/events/#"),
            Some(Target::ConsumerGroup("analytics".into()))
        );
        for refused in [
            "$share//$fleethub/events/#",
            "$share/g/$fleethub/events/d1/#",
            "$share/g",
            "$share/g/devices/#",
        ] {
            assert_eq!(group(refused), None, "{refused}");
        }
        assert!(matches!(
            group("$fleethub/events/d1/#"),
            Some(Target::Router(_))
        ));
    }

    #[test]
    fn service_filters_keep_device_and_module_levels() {
        let m = |f| {
            map_filter(&Principal::Service, f)
                .unwrap()
                .router_filter()
                .unwrap()
                .to_string()
        };
        assert_eq!(m("$fleethub/events/d1/#"), "fh/ev/d1/#");
        assert_eq!(m("$fleethub/events/d1/~/#"), "fh/ev/d1/~");
        assert_eq!(m("$fleethub/events/+/+/a=1"), "fh/ev/+/+");
    }

    #[test]
    fn foreign_and_unknown_filters_are_refused() {
        let d1 = dev("d1");
        for f in [
            "devices/d2/messages/devicebound/#",
            "devices/d1/messages/events/#",
            "devices/+/messages/devicebound/#",
            "#",
            "$iothub/#",
            "$iothub/twin/#",
            "fh/dev/d2/#",
            "fh/#",
            "$fleethub/events/#",
            "devices/d1/modules/m1/inputs/#",
        ] {
            assert_eq!(map_filter(&d1, f), None, "{f}");
        }
        assert_eq!(
            map_filter(&Principal::Service, "devices/d1/messages/devicebound/#"),
            None
        );
    }

    #[test]
    fn only_telemetry_maps_back_from_the_router() {
        assert_eq!(service_client_topic("fh/dev/d1/c2d", "x"), None);
        assert_eq!(service_client_topic("other", "x"), None);
    }

    #[test]
    fn publishes_are_classified_per_identity() {
        let d1 = dev("d1");
        assert_eq!(
            classify_publish(&d1, "devices/d1/messages/events/a=1"),
            Inbound::Telemetry { bag: "a=1" }
        );
        assert_eq!(
            classify_publish(&d1, "devices/d1/messages/events/"),
            Inbound::Telemetry { bag: "" }
        );
        assert_eq!(
            classify_publish(&d1, "devices/d1/messages/events"),
            Inbound::Telemetry { bag: "" }
        );
        assert_eq!(
            classify_publish(&d1, "devices/d2/messages/events/"),
            Inbound::Denied
        );
        assert_eq!(
            classify_publish(&d1, "devices/d1/messages/devicebound/x"),
            Inbound::Denied
        );
        assert_eq!(classify_publish(&d1, "fh/ev/d1/~"), Inbound::Denied);
        assert_eq!(
            classify_publish(&d1, "$iothub/twin/GET/?$rid=1"),
            Inbound::TwinGet { query: "?$rid=1" }
        );
        assert_eq!(
            classify_publish(&d1, "$iothub/twin/PATCH/properties/reported/?$rid=2"),
            Inbound::TwinReportedPatch { query: "?$rid=2" }
        );
        assert_eq!(
            classify_publish(&d1, "$iothub/methods/res/200/?$rid=3"),
            Inbound::MethodResponse {
                status: "200",
                query: "?$rid=3"
            }
        );
        assert_eq!(
            classify_publish(&d1, "$iothub/twin/PATCH/properties/desired/"),
            Inbound::Denied
        );
        let m1 = dev("d1/m1");
        assert_eq!(
            classify_publish(&m1, "devices/d1/modules/m1/messages/events/$.on=out1"),
            Inbound::Telemetry { bag: "$.on=out1" }
        );
        assert_eq!(
            classify_publish(&m1, "devices/d1/messages/events/"),
            Inbound::Denied
        );
        assert_eq!(
            classify_publish(&Principal::Service, "devices/d1/messages/events/"),
            Inbound::Denied
        );
    }

    #[test]
    fn wildcard_characters_in_ids_are_escaped() {
        let k = IdentityKey::parse("a+b#c%d").unwrap();
        assert_eq!(telemetry_topic(&k), "fh/ev/a%2Bb%23c%25d/~");
        let p = Principal::Identity(k);
        assert_eq!(
            classify_publish(&p, "devices/a%2Bb%23c%25d/messages/events/"),
            Inbound::Telemetry { bag: "" }
        );
        assert_eq!(
            map_filter(&p, "devices/a%2Bb%23c%25d/messages/devicebound/#")
                .unwrap()
                .target,
            Target::Delivery(Delivery::Own)
        );
    }

    #[test]
    fn filter_matching_follows_mqtt() {
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("a/b", "a/c"));
        assert!(filter_matches(
            "$iothub/twin/res/#",
            "$iothub/twin/res/200/?$rid=1"
        ));
        assert!(!filter_matches(
            "$iothub/twin/res/204/#",
            "$iothub/twin/res/200/?$rid=1"
        ));
    }

    #[test]
    fn envelope_round_trips_and_rejects_garbage() {
        let p = envelope::pack("200/?$rid=1", b"{}").unwrap();
        assert_eq!(
            envelope::unpack(&p),
            Some(("200/?$rid=1", Bytes::from_static(b"{}")))
        );
        assert_eq!(envelope::unpack(&Bytes::from_static(b"\x00")), None);
        assert_eq!(envelope::unpack(&Bytes::from_static(b"\x00\x09ab")), None);
        assert!(envelope::pack(&"x".repeat(70_000), b"").is_none());
    }
}
