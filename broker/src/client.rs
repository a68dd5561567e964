//! A typed client of the management API, written against the same body types the handlers
//! use ([`crate::api::wire`], [`crate::deploy::wire`]). The CLI, device-sim and the end-to-end tests talk to the hub through it, so
//! a change of the contract breaks their build instead of their parsing.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::api::wire::*;
use crate::deploy::wire::*;
use crate::identity::IdentityKey;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the hub at {base}: {source}")]
    Unreachable {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// The hub answered with an error.
    #[error("{} ({status})", .body.message)]
    Api { status: StatusCode, body: ErrorBody },
    #[error("unexpected answer from {path} ({status}): {message}")]
    Decode {
        path: String,
        status: StatusCode,
        message: String,
    },
}

impl ClientError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } | ClientError::Decode { status, .. } => Some(*status),
            ClientError::Unreachable { .. } => None,
        }
    }
}

pub type ClientResult<T> = Result<T, ClientError>;

/// Percent-encodes one path segment (ids may hold `#`, `?`, `%`...).
pub fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `/devices/{d}` or `/devices/{d}/modules/{m}`.
pub fn identity_path(key: &IdentityKey) -> String {
    match &key.module {
        None => format!("/devices/{}", segment(key.device.as_str())),
        Some(m) => format!(
            "/devices/{}/modules/{}",
            segment(key.device.as_str()),
            segment(m.as_str())
        ),
    }
}

/// `/twins/{d}` or `/twins/{d}/modules/{m}`.
pub fn twin_path(key: &IdentityKey) -> String {
    match &key.module {
        None => format!("/twins/{}", segment(key.device.as_str())),
        Some(m) => format!(
            "/twins/{}/modules/{}",
            segment(key.device.as_str()),
            segment(m.as_str())
        ),
    }
}

#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ApiClient {
    /// `base` is the API's root URL (`http://127.0.0.1:8080`); `token` the admin token.
    pub fn new(base: &str, token: &str) -> ApiClient {
        ApiClient {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(600))
                .build()
                .unwrap_or_default(),
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The raw answer of a request: status and body (JSON, or the text as a JSON string).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> ClientResult<(StatusCode, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                base: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> ClientResult<T> {
        let body = match body {
            Some(b) => Some(serde_json::to_value(b).map_err(|e| ClientError::Decode {
                path: path.to_string(),
                status: StatusCode::OK,
                message: format!("request body: {e}"),
            })?),
            None => None,
        };
        let (status, value) = self.raw(method, path, body.as_ref()).await?;
        decode(path, status, value)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> ClientResult<T> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    async fn send<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> ClientResult<T> {
        self.call(method, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> ClientResult<()> {
        let (status, value) = self.raw(Method::DELETE, path, None).await?;
        decode::<Value>(path, status, value).map(|_| ())
    }

    // The hub

    pub async fn hub(&self) -> ClientResult<HubInfo> {
        self.get("/hub").await
    }

    /// `GET /cluster`.
    pub async fn cluster(&self) -> ClientResult<ClusterStatus> {
        self.get("/cluster").await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> ClientResult<String> {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                base: self.base.clone(),
                source,
            })?;
        Ok(resp.text().await.unwrap_or_default())
    }

    /// A consistent copy of the hub's data directory in `dir` (on the hub's machine).
    pub async fn backup(&self, dir: &std::path::Path) -> ClientResult<BackupReport> {
        let body = BackupRequest {
            dir: dir.to_path_buf(),
        };
        self.send(Method::POST, "/backup", &body).await
    }

    // Identities

    pub async fn create_device(&self, body: &CreateDevice) -> ClientResult<IdentityView> {
        self.send(Method::POST, "/devices", body).await
    }

    pub async fn create_module(
        &self,
        device: &str,
        body: &CreateModule,
    ) -> ClientResult<IdentityView> {
        let path = format!("/devices/{}/modules", segment(device));
        self.send(Method::POST, &path, body).await
    }

    pub async fn identity(&self, key: &IdentityKey) -> ClientResult<IdentityView> {
        self.get(&identity_path(key)).await
    }

    pub async fn list_devices(
        &self,
        limit: usize,
        after: Option<&str>,
    ) -> ClientResult<Page<IdentityView>> {
        let mut path = format!("/devices?limit={limit}");
        if let Some(a) = after {
            path.push_str(&format!("&after={}", segment(a)));
        }
        self.get(&path).await
    }

    pub async fn list_modules(&self, device: &str) -> ClientResult<Page<IdentityView>> {
        self.get(&format!("/devices/{}/modules", segment(device)))
            .await
    }

    pub async fn update_identity(
        &self,
        key: &IdentityKey,
        update: &IdentityUpdate,
    ) -> ClientResult<IdentityView> {
        self.send(Method::PATCH, &identity_path(key), update).await
    }

    pub async fn delete_identity(&self, key: &IdentityKey) -> ClientResult<()> {
        self.delete(&identity_path(key)).await
    }

    // Twins

    pub async fn twin(&self, key: &IdentityKey) -> ClientResult<TwinView> {
        self.get(&twin_path(key)).await
    }

    /// Patches tags and desired properties, guarded by `if_match` (an etag) when given.
    pub async fn patch_twin(
        &self,
        key: &IdentityKey,
        patch: &TwinPatch,
        if_match: Option<&str>,
    ) -> ClientResult<TwinView> {
        let path = twin_path(key);
        let mut req = self
            .http
            .patch(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(patch);
        if let Some(etag) = if_match {
            req = req.header(reqwest::header::IF_MATCH, format!("\"{etag}\""));
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                base: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        let value = resp.json().await.unwrap_or(Value::Null);
        decode(&path, status, value)
    }

    /// Rows of an IoT Hub query (`SELECT * FROM devices WHERE ...`): twins, projected fields
    /// or a count, as the query asks.
    pub async fn query_twins(&self, query: &str) -> ClientResult<Items<Value>> {
        self.query_twins_paged(query, |_| {}).await
    }

    /// The same, a page of 1,000 rows at a time; `progress` hears the rows so far.
    pub async fn query_twins_paged(
        &self,
        query: &str,
        mut progress: impl FnMut(usize),
    ) -> ClientResult<Items<Value>> {
        let mut items = Vec::new();
        let mut token = None;
        loop {
            let page = self.query_twins_page(query, 1000, token.take()).await?;
            items.extend(page.items);
            progress(items.len());
            match page.continuation_token {
                Some(t) => token = Some(t),
                None => return Ok(Items { items }),
            }
        }
    }

    /// One page of a query's rows, from `continuation_token` (a previous page's) on.
    pub async fn query_twins_page(
        &self,
        query: &str,
        page_size: usize,
        continuation_token: Option<String>,
    ) -> ClientResult<QueryPage> {
        let body = TwinQuery {
            query: query.to_string(),
            page_size: Some(page_size),
            continuation_token,
        };
        self.send(Method::POST, "/twins/query", &body).await
    }

    // Methods and C2D

    pub async fn invoke_method(
        &self,
        key: &IdentityKey,
        call: &MethodCall,
    ) -> ClientResult<MethodResult> {
        let path = format!("{}/methods", identity_path(key));
        self.send(Method::POST, &path, call).await
    }

    pub async fn send_c2d(&self, device: &str, message: &C2dMessage) -> ClientResult<C2dQueued> {
        let path = format!("/devices/{}/messages", segment(device));
        self.send(Method::POST, &path, message).await
    }

    // Routes and queues

    pub async fn routes(&self) -> ClientResult<RouteTableView> {
        self.get("/routes").await
    }

    /// Checks a route expression; an invalid one is an answer too (with its column).
    pub async fn check_route(&self, route: &str) -> ClientResult<RouteCheckResult> {
        let body = serde_json::json!({ "route": route });
        let (status, value) = self.raw(Method::POST, "/routes/check", Some(&body)).await?;
        if status == StatusCode::BAD_REQUEST && value.get("valid").is_some() {
            return decode("/routes/check", StatusCode::OK, value);
        }
        decode("/routes/check", status, value)
    }

    pub async fn queues(&self) -> ClientResult<QueueList> {
        self.get("/queues").await
    }

    // Products, device groups, group deployments

    pub async fn create_product(&self, body: &CreateProduct) -> ClientResult<ProductView> {
        self.send(Method::POST, "/products", body).await
    }

    pub async fn products(&self) -> ClientResult<Items<ProductView>> {
        self.get("/products").await
    }

    pub async fn product(&self, product: &str) -> ClientResult<ProductView> {
        self.get(&format!("/products/{}", segment(product))).await
    }

    pub async fn update_product(
        &self,
        product: &str,
        body: &UpdateProduct,
    ) -> ClientResult<ProductView> {
        let path = format!("/products/{}", segment(product));
        self.send(Method::PATCH, &path, body).await
    }

    // Provisioning enrollments

    fn enrollment_path(kind: crate::enrollment::EnrollmentKind) -> &'static str {
        match kind {
            crate::enrollment::EnrollmentKind::Group => "/enrollmentGroups",
            crate::enrollment::EnrollmentKind::Individual => "/enrollments",
        }
    }

    pub async fn enrollments(
        &self,
        kind: crate::enrollment::EnrollmentKind,
    ) -> ClientResult<Items<crate::enrollment::Enrollment>> {
        self.get(Self::enrollment_path(kind)).await
    }

    pub async fn enrollment(
        &self,
        kind: crate::enrollment::EnrollmentKind,
        id: &str,
    ) -> ClientResult<crate::enrollment::Enrollment> {
        self.get(&format!("{}/{}", Self::enrollment_path(kind), segment(id)))
            .await
    }

    pub async fn create_enrollment(
        &self,
        kind: crate::enrollment::EnrollmentKind,
        body: &crate::enrollment::EnrollmentInput,
    ) -> ClientResult<crate::enrollment::Enrollment> {
        self.send(Method::POST, Self::enrollment_path(kind), body)
            .await
    }

    pub async fn set_enrollment_status(
        &self,
        kind: crate::enrollment::EnrollmentKind,
        id: &str,
        status: &str,
    ) -> ClientResult<crate::enrollment::Enrollment> {
        let body = SetProvisioningStatus {
            provisioning_status: status.to_string(),
        };
        let path = format!("{}/{}", Self::enrollment_path(kind), segment(id));
        self.send(Method::PATCH, &path, &body).await
    }

    pub async fn delete_enrollment(
        &self,
        kind: crate::enrollment::EnrollmentKind,
        id: &str,
    ) -> ClientResult<()> {
        self.delete(&format!("{}/{}", Self::enrollment_path(kind), segment(id)))
            .await
    }

    // The events endpoint's consumer groups

    pub async fn consumer_groups(&self) -> ClientResult<Items<crate::events::GroupView>> {
        self.get("/consumerGroups").await
    }

    pub async fn consumer_group(&self, name: &str) -> ClientResult<crate::events::GroupView> {
        self.get(&format!("/consumerGroups/{}", segment(name)))
            .await
    }

    /// Creates a group starting at `from` (`start`, `end` or an RFC 3339 time).
    pub async fn create_consumer_group(
        &self,
        name: &str,
        from: &str,
    ) -> ClientResult<crate::events::GroupView> {
        let body = serde_json::json!({ "name": name, "from": from });
        self.send(Method::POST, "/consumerGroups", &body).await
    }

    pub async fn delete_consumer_group(&self, name: &str) -> ClientResult<()> {
        self.delete(&format!("/consumerGroups/{}", segment(name)))
            .await
    }

    // CA certificates

    pub async fn certificates(&self) -> ClientResult<Items<crate::certificates::CaCertificate>> {
        self.get("/certificates").await
    }

    pub async fn add_certificate(
        &self,
        name: &str,
        pem: &str,
    ) -> ClientResult<crate::certificates::CaCertificate> {
        let body = AddCertificate {
            name: name.to_string(),
            certificate: pem.to_string(),
        };
        self.send(Method::POST, "/certificates", &body).await
    }

    pub async fn verify_certificate(
        &self,
        name: &str,
        pem: &str,
    ) -> ClientResult<crate::certificates::CaCertificate> {
        let body = VerifyCertificate {
            certificate: pem.to_string(),
        };
        let path = format!("/certificates/{}/verify", segment(name));
        self.send(Method::POST, &path, &body).await
    }

    pub async fn delete_certificate(&self, name: &str) -> ClientResult<()> {
        self.delete(&format!("/certificates/{}", segment(name)))
            .await
    }

    pub async fn delete_product(&self, product: &str) -> ClientResult<()> {
        self.delete(&format!("/products/{}", segment(product)))
            .await
    }

    fn group_path(product: &str, group: &str) -> String {
        format!("/products/{}/groups/{}", segment(product), segment(group))
    }

    pub async fn create_group(&self, product: &str, body: &CreateGroup) -> ClientResult<GroupView> {
        let path = format!("/products/{}/groups", segment(product));
        self.send(Method::POST, &path, body).await
    }

    /// Every group, or one product's.
    pub async fn groups(&self, product: Option<&str>) -> ClientResult<Items<GroupView>> {
        match product {
            Some(p) => self.get(&format!("/products/{}/groups", segment(p))).await,
            None => self.get("/device-groups").await,
        }
    }

    pub async fn group(&self, product: &str, group: &str) -> ClientResult<GroupView> {
        self.get(&Self::group_path(product, group)).await
    }

    pub async fn update_group(
        &self,
        product: &str,
        group: &str,
        body: &GroupUpdate,
    ) -> ClientResult<GroupView> {
        self.send(Method::PATCH, &Self::group_path(product, group), body)
            .await
    }

    pub async fn delete_group(&self, product: &str, group: &str) -> ClientResult<()> {
        self.delete(&Self::group_path(product, group)).await
    }

    pub async fn create_group_deployment(
        &self,
        product: &str,
        group: &str,
        body: &CreateGroupDeployment,
    ) -> ClientResult<GroupDeploymentView> {
        let path = format!("{}/deployments", Self::group_path(product, group));
        self.send(Method::POST, &path, body).await
    }

    pub async fn group_deployments(
        &self,
        product: &str,
        group: &str,
    ) -> ClientResult<Items<GroupDeploymentView>> {
        self.get(&format!("{}/deployments", Self::group_path(product, group)))
            .await
    }

    // Images

    /// Uploads an image; the flag is `true` when the same content was there already.
    pub async fn add_image(
        &self,
        name: &str,
        version: &str,
        kind: &str,
        content: Vec<u8>,
    ) -> ClientResult<(Image, bool)> {
        let path = format!(
            "/images?name={}&version={}&kind={}",
            segment(name),
            segment(version),
            segment(kind)
        );
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(content)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                base: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        let value = resp.json().await.unwrap_or(Value::Null);
        decode(&path, status, value).map(|image| (image, status == StatusCode::OK))
    }

    pub async fn images(&self) -> ClientResult<Items<Image>> {
        self.get("/images").await
    }

    /// An image's content.
    pub async fn image_content(&self, reference: &str) -> ClientResult<Vec<u8>> {
        let path = format!("/images/{}/content", segment(reference));
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                base: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let value = resp.json().await.unwrap_or(Value::Null);
            return decode(&path, status, value);
        }
        let bytes = resp.bytes().await.map_err(|e| ClientError::Decode {
            path: path.clone(),
            status,
            message: e.to_string(),
        })?;
        Ok(bytes.to_vec())
    }

    pub async fn image(&self, reference: &str) -> ClientResult<Image> {
        self.get(&format!("/images/{}", segment(reference))).await
    }

    // Targeted deployments

    pub async fn create_deployment(&self, spec: &DeploymentSpec) -> ClientResult<DeploymentView> {
        self.send(Method::POST, "/deployments", spec).await
    }

    pub async fn deployments(&self) -> ClientResult<Items<DeploymentView>> {
        self.get("/deployments").await
    }

    pub async fn deployment(&self, id: &str) -> ClientResult<DeploymentView> {
        self.get(&format!("/deployments/{}", segment(id))).await
    }

    pub async fn update_deployment(
        &self,
        id: &str,
        update: &DeploymentUpdate,
    ) -> ClientResult<DeploymentView> {
        let path = format!("/deployments/{}", segment(id));
        self.send(Method::PATCH, &path, update).await
    }

    pub async fn delete_deployment(&self, id: &str) -> ClientResult<()> {
        self.delete(&format!("/deployments/{}", segment(id))).await
    }

    pub async fn deployment_metric(&self, id: &str, metric: &str) -> ClientResult<MetricView> {
        self.get(&format!(
            "/deployments/{}/metrics/{}",
            segment(id),
            segment(metric)
        ))
        .await
    }

    /// `pause`, `resume` or `abort` a rollout.
    pub async fn control_deployment(&self, id: &str, action: &str) -> ClientResult<DeploymentView> {
        let path = format!("/deployments/{}/{}", segment(id), segment(action));
        self.call::<(), _>(Method::POST, &path, None).await
    }
}

/// A success answer as `T`, or the error the hub gave.
fn decode<T: DeserializeOwned>(path: &str, status: StatusCode, value: Value) -> ClientResult<T> {
    if !status.is_success() {
        let body =
            serde_json::from_value::<ErrorBody>(value.clone()).unwrap_or_else(|_| ErrorBody {
                error: status.canonical_reason().unwrap_or("error").to_string(),
                message: match &value {
                    Value::String(s) => s.clone(),
                    Value::Null => status.to_string(),
                    v => v.to_string(),
                },
                errors: Vec::new(),
                error_code: None,
            });
        return Err(ClientError::Api { status, body });
    }
    // An empty answer (204) reads as `null`, which `()` and `Value` accept.
    serde_json::from_value(value).map_err(|e| ClientError::Decode {
        path: path.to_string(),
        status,
        message: e.to_string(),
    })
}
