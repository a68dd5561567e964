//! The API's contract: every request and response body.
//!
//! The handlers deserialize requests and serialize responses with these types, and
//! [`crate::client::ApiClient`] (used by the CLI, device-sim and the end-to-end tests) does
//! the opposite with the same types, so the two sides cannot drift apart. Field names are
//! IoT Hub's (camelCase). Twin content and deployment content stay JSON values: they are the
//! user's data.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::identity::{DeviceId, ModuleId};

pub use super::backup::BackupRequest;
pub use crate::backup::BackupReport;
pub use crate::cluster::{ClusterStatus, NodeView, PostgresHealth};
pub use crate::fleet::{DeviceGroup, GroupUpdate, OsFeed, Product};
pub use crate::hub::Endpoints;
pub use crate::images::{Image, ImageKind};
pub use crate::registry::{
    AuthenticationInput, Capabilities, ConnectionState, IdentityUpdate, IdentityView, Status,
    SymmetricKeyInput,
};

/// An error answer: `{"error": kind, "message": ...}`, with every route error for a refused
/// route set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<RouteErrorView>,
    /// IoT Hub's numeric code where it has one (404103: device not online).
    #[serde(rename = "errorCode", default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteErrorView {
    pub name: String,
    /// Where the route came from: `config` or `$edgeHub`.
    pub source: String,
    pub message: String,
    pub column: Option<usize>,
}

// ---------------------------------------------------------------------------------------
// The hub

/// `GET /hub`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubInfo {
    pub id: String,
    pub hostname: String,
    pub version: String,
    pub endpoints: Option<Endpoints>,
    pub devices: usize,
    pub connections: i64,
}

// ---------------------------------------------------------------------------------------
// Identities

/// `POST /devices`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateDevice {
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthenticationInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
}

/// `POST /devices/{d}/modules`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateModule {
    pub module_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthenticationInput>,
}

/// `?limit=&after=` of a listing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PageQuery {
    pub limit: Option<usize>,
    pub after: Option<String>,
}

/// A page of a listing; `next` is the `after` of the following page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// `{"items": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Items<T> {
    pub items: Vec<T>,
}

// ---------------------------------------------------------------------------------------
// Twins

/// `PATCH /twins/...`: tags and desired properties (reported ones are the device's).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwinPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinPatchProperties>,
    /// Read-only fields a client may echo back from a GET; ignored.
    #[serde(rename = "deviceId", default, skip_serializing)]
    pub _device_id: Option<Value>,
    #[serde(rename = "moduleId", default, skip_serializing)]
    pub _module_id: Option<Value>,
    #[serde(rename = "etag", default, skip_serializing)]
    pub _etag: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwinPatchProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Value>,
    /// Present only to be refused with a clear message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Value>,
}

/// A twin as the API shows it (IoT Hub's shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinView {
    pub device_id: DeviceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<ModuleId>,
    pub etag: String,
    pub version: u64,
    pub tags: Map<String, Value>,
    pub properties: TwinProperties,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionState>,
    #[serde(default)]
    pub last_activity_time: Option<String>,
    /// A device's group as `Product/Group` (what `WHERE deviceGroup = …` matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_group: Option<String>,
}

/// Both sections with their `$version` and `$metadata`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TwinProperties {
    pub desired: Value,
    pub reported: Value,
}

/// `PATCH /enrollmentGroups/{id}`, `PATCH /enrollments/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetProvisioningStatus {
    pub provisioning_status: String,
}

/// `POST /certificates`: a CA certificate (PEM) under a name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddCertificate {
    pub name: String,
    pub certificate: String,
}

/// `POST /certificates/{name}/verify`: the proof-of-possession certificate (PEM), signed by
/// the CA with the verification code as its common name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyCertificate {
    pub certificate: String,
}

/// `POST /twins/query`. Paging as IoT Hub's query API does it: at most `pageSize` rows
/// (also the `x-ms-max-item-count` header), then the next page with the `continuationToken`
/// the previous one returned (also the `x-ms-continuation` header). Without a page size,
/// every row at once.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TwinQuery {
    pub query: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuation_token: Option<String>,
}

/// A page of query rows; `continuationToken` fetches the next one (absent on the last).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryPage {
    pub items: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuation_token: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Direct methods and cloud-to-device messages

/// `POST /devices/{d}[/modules/{m}]/methods`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MethodCall {
    pub method_name: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_in_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_in_seconds: Option<u64>,
}

/// The device's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResult {
    pub status: i64,
    pub payload: Value,
}

/// `POST /devices/{d}/messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct C2dMessage {
    /// A string is sent as its UTF-8 bytes; any other JSON value as its JSON text.
    pub body: Value,
    #[serde(default)]
    pub properties: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Time to live; default one hour, at most two days (IoT Hub's maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// A queued C2D message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct C2dQueued {
    pub message_id: String,
    pub enqueued_time: String,
    pub expiry_time_utc: String,
}

// ---------------------------------------------------------------------------------------
// Routes and queues

/// `GET /routes`: the table in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTableView {
    pub routes: Vec<RouteView>,
    pub default_time_to_live_secs: u64,
    pub upstream: UpstreamView,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteView {
    pub name: String,
    pub route: String,
    pub priority: u8,
    pub time_to_live_secs: u64,
    /// `config` or `$edgeHub`.
    pub source: String,
    pub sink: String,
    /// Why nothing can be delivered to the sink (its messages are dropped and counted), for
    /// a route that sends to `$upstream` while `[upstream]` is not enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undeliverable: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamView {
    pub enabled: bool,
    pub connected: bool,
}

/// `POST /routes/check`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCheck {
    pub route: String,
}

/// The verdict: a valid route's parts, or the error and its column (HTTP 400).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteCheckResult {
    pub valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
}

/// `GET /queues`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueList {
    pub items: Vec<QueueView>,
    pub limits: QueueLimits,
    /// Messages refused (not acknowledged) because the store was full.
    pub refused: u64,
    /// Where a damaged store was moved aside at start, if it was.
    pub recovered_from: Option<String>,
    /// Log records found unreadable at start (each counted as dropped, reason `corrupt`).
    #[serde(default)]
    pub corrupt_records: u64,
    /// Where the damaged log files were kept.
    #[serde(default)]
    pub damaged_logs: Vec<String>,
}

/// One sink's queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    pub sink: String,
    pub depth: u64,
    pub bytes: u64,
    pub oldest_age_seconds: Option<f64>,
    pub dropped: Dropped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dropped {
    pub expired: u64,
    pub quota: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueLimits {
    pub max_bytes: u64,
    pub max_sink_bytes: u64,
    pub when_full: String,
}

// ---------------------------------------------------------------------------------------
// Products, device groups, images

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateProduct {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Skip the five default groups.
    #[serde(default)]
    pub no_default_groups: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateProduct {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A product with its groups.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProductView {
    #[serde(flatten)]
    pub product: Product,
    pub groups: Vec<GroupView>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateGroup {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_updates: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_feed: Option<OsFeed>,
}

/// A device group with its product's name and how many devices it has (and, for one group,
/// which).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    #[serde(flatten)]
    pub group: DeviceGroup,
    pub product: String,
    pub devices: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_ids: Option<Vec<String>>,
}

/// `POST /images?name=&version=&kind=` (the body is the image).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AddImage {
    pub name: Option<String>,
    pub version: Option<String>,
    pub kind: Option<String>,
}
