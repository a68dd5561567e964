//! The route table in force and message dispatch.
//!
//! Routes come from the config's `[routes]` and from the desired properties of the hub's
//! `$edgeHub` module twin (schema 1.0 string routes, 1.1 route objects with `priority` and
//! `timeToLiveSecs`, and `storeAndForwardConfiguration.timeToLiveSecs`). A new set is built
//! whole and swapped in atomically, so connections and messages in flight never notice; an
//! invalid set is refused with every error and the old table stays.

use std::sync::{Arc, RwLock};

use fleethub_router::context::MessageContext;
use fleethub_router::route::Truth;
use fleethub_router::route::{Origin, RouteError, RouteSpec, RouteTable};
use fleethub_router::Message;
use serde_json::{Map, Value};

/// The module whose twin carries routes.
pub const EDGE_HUB: &str = "$edgeHub";

/// Metric handles of one route, resolved once when its table is installed so the per-message
/// path does no label lookups.
pub struct RouteCounters {
    /// The sink, typed once here. `None` for a module-input sink whose module name is not a
    /// valid module id: nothing can ever connect as it, so its messages are dropped
    /// (counted) rather than queued.
    pub sink: Option<crate::sinks::SinkId>,
    /// The sink's queue name: `$upstream` or `/modules/{m}/inputs/{i}`.
    pub queue: String,
    /// Why nothing can be delivered to the sink (its messages are dropped and counted):
    /// `$upstream` with the bridge not enabled, a module name that is no module id.
    pub undeliverable: Option<String>,
    pub matched: prometheus::IntCounter,
    pub undefined: prometheus::IntCounter,
    pub forwarded: prometheus::IntCounter,
    pub dropped: prometheus::IntCounter,
}

/// A table with its counters, swapped in as one.
struct Installed {
    table: Arc<RouteTable>,
    counters: Vec<Arc<RouteCounters>>,
}

pub struct Routing {
    /// Which sinks can take messages, to flag routes that send to one that cannot.
    sinks: Arc<crate::sinks::Sinks>,
    /// The hub's own `$edgeHub` module twin: its desired properties are routes.
    route_twin: crate::identity::IdentityKey,
    installed: RwLock<Arc<Installed>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// `[routes]` and `[routing] time_to_live_secs` of the configuration in force (a reload
    /// replaces them).
    config: RwLock<(Vec<RouteSpec>, u64)>,
    detect_json: bool,
    /// Serialises $edgeHub updates: validate and swap as one step.
    pub update: tokio::sync::Mutex<()>,
}

/// A route a message matched: where it queues the message (its counters name the sink) and
/// with which priority and time to live.
#[derive(Clone)]
pub struct Delivery {
    pub priority: u8,
    pub ttl_secs: u64,
    pub counters: Arc<RouteCounters>,
}

impl Routing {
    /// Builds the table from config routes and the `$edgeHub` desired properties.
    pub fn new(
        route_twin: crate::identity::IdentityKey,
        sinks: Arc<crate::sinks::Sinks>,
        config_routes: Vec<RouteSpec>,
        config_ttl: u64,
        detect_json: bool,
        edge_hub: &Map<String, Value>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Routing, Vec<RouteError>> {
        let routing = Routing {
            sinks,
            route_twin,
            installed: RwLock::new(Arc::new(Installed {
                table: Arc::new(RouteTable::default()),
                counters: Vec::new(),
            })),
            metrics,
            config: RwLock::new((config_routes, config_ttl)),
            detect_json,
            update: tokio::sync::Mutex::new(()),
        };
        let table = routing.build(edge_hub)?;
        routing.swap(table);
        Ok(routing)
    }

    /// The twin whose desired properties are the routes: the one rule "`$edgeHub` desired =
    /// routes" lives here, and every twin writer asks it.
    pub fn route_twin(&self) -> &crate::identity::IdentityKey {
        &self.route_twin
    }

    pub fn is_route_twin(&self, key: &crate::identity::IdentityKey) -> bool {
        *key == self.route_twin
    }

    fn installed(&self) -> Arc<Installed> {
        self.installed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.installed().table.clone()
    }

    /// The table in force, with why each route's sink cannot deliver (if it cannot).
    pub fn table_with_notes(&self) -> (Arc<RouteTable>, Vec<Option<String>>) {
        let installed = self.installed();
        let notes = installed
            .counters
            .iter()
            .map(|c| c.undeliverable.clone())
            .collect();
        (installed.table.clone(), notes)
    }

    /// Builds (without installing) the table for these `$edgeHub` desired properties.
    pub fn build(&self, edge_hub: &Map<String, Value>) -> Result<RouteTable, Vec<RouteError>> {
        let config = self
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Self::build_from(&config.0, config.1, edge_hub)
    }

    fn build_from(
        config_routes: &[RouteSpec],
        config_ttl: u64,
        edge_hub: &Map<String, Value>,
    ) -> Result<RouteTable, Vec<RouteError>> {
        let (twin_routes, twin_ttl) = edge_hub_routes(edge_hub)?;
        let mut specs: Vec<RouteSpec> = config_routes
            .iter()
            .filter(|c| !twin_routes.iter().any(|t| t.name == c.name))
            .cloned()
            .collect();
        specs.extend(twin_routes);
        RouteTable::build(specs, twin_ttl.unwrap_or(config_ttl))
    }

    /// Replaces the configuration's routes (a reload): the new set is built whole with the
    /// `$edgeHub` routes in force and swapped in, or refused with every error and the old
    /// table kept. The caller holds [`Routing::update`] so no twin write interleaves.
    pub fn reload_config(
        &self,
        config_routes: Vec<RouteSpec>,
        config_ttl: u64,
        edge_hub: &Map<String, Value>,
    ) -> Result<usize, Vec<RouteError>> {
        let table = Self::build_from(&config_routes, config_ttl, edge_hub)?;
        let n = table.routes.len();
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = (config_routes, config_ttl);
        self.swap(table);
        Ok(n)
    }

    pub fn swap(&self, table: RouteTable) {
        let m = &self.metrics;
        let counters: Vec<Arc<RouteCounters>> = table
            .routes
            .iter()
            .map(|r| {
                let id = crate::sinks::SinkId::from_route(&r.route.sink);
                // The queue's name, as the sink's driver reads it.
                let sink = match &id {
                    Ok(id) => id.to_string(),
                    Err(_) => r.route.sink.to_string(),
                };
                let undeliverable = match &id {
                    Ok(id) => self.sinks.refusal(id),
                    Err(e) => Some(format!("{e}: no module can connect as it")),
                };
                if let Some(why) = &undeliverable {
                    tracing::warn!(
                        route = %r.spec.name,
                        source = %r.spec.origin,
                        sink = %sink,
                        why,
                        "a route sends to a sink that cannot deliver; its messages are dropped and counted (fleethub_sink_messages_total{{result=\"dropped\"}})"
                    );
                }
                Arc::new(RouteCounters {
                    sink: id.ok(),
                    queue: sink.clone(),
                    undeliverable,
                    matched: m.route_matched.with_label_values(&[&r.spec.name]),
                    undefined: m.route_condition_errors.with_label_values(&[&r.spec.name]),
                    forwarded: m.sink_messages.with_label_values(&[&sink, "forwarded"]),
                    dropped: m.sink_messages.with_label_values(&[&sink, "dropped"]),
                })
            })
            .collect();
        let undeliverable = counters
            .iter()
            .filter(|c| c.undeliverable.is_some())
            .count();
        m.routes_undeliverable.set(undeliverable as i64);
        let installed = Arc::new(Installed {
            table: Arc::new(table),
            counters,
        });
        *self.installed.write().unwrap_or_else(|e| e.into_inner()) = installed;
    }

    /// Every sink `message` goes to under the table in force, one per matching route.
    /// Counts matches and conditions that were not booleans (undefined).
    pub fn route(
        &self,
        message: &Message,
        origin: &Origin<'_>,
        twin_change: bool,
    ) -> Vec<Delivery> {
        let installed = self.installed();
        let table = &installed.table;
        if table.routes.is_empty() {
            return Vec::new();
        }
        let ctx = MessageContext::new(message, self.detect_json, twin_change);
        let mut out = Vec::new();
        for (r, counters) in table.routes.iter().zip(&installed.counters) {
            if !r.route.source.matches(origin) {
                continue;
            }
            if let Some(c) = &r.route.condition {
                match c.evaluate(&ctx) {
                    Truth::True => {}
                    Truth::False => continue,
                    Truth::Undefined => {
                        counters.undefined.inc();
                        continue;
                    }
                }
            }
            counters.matched.inc();
            out.push(Delivery {
                priority: r.spec.priority,
                ttl_secs: r.spec.ttl_secs.unwrap_or(table.default_ttl_secs),
                counters: counters.clone(),
            });
        }
        out
    }
}

/// Reads routes from `$edgeHub` desired properties.
pub fn edge_hub_routes(
    desired: &Map<String, Value>,
) -> Result<(Vec<RouteSpec>, Option<u64>), Vec<RouteError>> {
    let mut errors = Vec::new();
    let mut specs = Vec::new();
    let err = |name: &str, message: String| RouteError {
        name: name.to_string(),
        origin: EDGE_HUB.into(),
        message,
        column: None,
    };
    if let Some(routes) = desired.get("routes") {
        let Value::Object(routes) = routes else {
            return Err(vec![err(
                "routes",
                "properties.desired.routes must be an object".into(),
            )]);
        };
        for (name, v) in routes {
            match v {
                Value::String(text) => specs.push(RouteSpec {
                    name: name.clone(),
                    text: text.clone(),
                    priority: 0,
                    ttl_secs: None,
                    origin: EDGE_HUB.into(),
                }),
                Value::Object(o) => {
                    let Some(text) = o.get("route").and_then(|t| t.as_str()) else {
                        errors.push(err(
                            name,
                            "a route object needs \"route\": \"FROM …\"".into(),
                        ));
                        continue;
                    };
                    let priority = match o.get("priority") {
                        None => 0,
                        Some(p) => match p.as_u64().filter(|p| *p <= 9) {
                            Some(p) => p as u8,
                            None => {
                                errors.push(err(
                                    name,
                                    format!("priority {p} is not an integer 0..9"),
                                ));
                                continue;
                            }
                        },
                    };
                    let ttl = match o.get("timeToLiveSecs") {
                        None => None,
                        Some(t) => match t.as_u64().filter(|t| *t > 0) {
                            Some(t) => Some(t),
                            None => {
                                errors.push(err(
                                    name,
                                    format!("timeToLiveSecs {t} is not a positive integer"),
                                ));
                                continue;
                            }
                        },
                    };
                    specs.push(RouteSpec {
                        name: name.clone(),
                        text: text.to_string(),
                        priority,
                        ttl_secs: ttl,
                        origin: EDGE_HUB.into(),
                    });
                }
                other => errors.push(err(
                    name,
                    format!("a route must be a string or an object, found {other}"),
                )),
            }
        }
    }
    let ttl = match desired
        .get("storeAndForwardConfiguration")
        .and_then(|s| s.get("timeToLiveSecs"))
    {
        None => None,
        Some(t) => match t.as_u64().filter(|t| *t > 0) {
            Some(t) => Some(t),
            None => {
                errors.push(err(
                    "storeAndForwardConfiguration",
                    format!("timeToLiveSecs {t} is not a positive integer"),
                ));
                None
            }
        },
    };
    // Validate route texts too, so every error of the set is reported at once.
    if let Err(route_errors) = RouteTable::build(specs.clone(), 1) {
        errors.extend(route_errors);
    }
    if errors.is_empty() {
        Ok((specs, ttl))
    } else {
        Err(errors)
    }
}

/// The JSON the API and CLI show for the table in force.
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn edge_hub_schemas_1_0_and_1_1() {
        let (specs, ttl) = edge_hub_routes(&obj(json!({
            "schemaVersion": "1.1",
            "routes": {
                "plain": "FROM /* INTO $upstream",
                "rich": {"route": "FROM /messages/* INTO $upstream", "priority": 3, "timeToLiveSecs": 60}
            },
            "storeAndForwardConfiguration": {"timeToLiveSecs": 100}
        })))
        .unwrap();
        assert_eq!(ttl, Some(100));
        let rich = specs.iter().find(|s| s.name == "rich").unwrap();
        assert_eq!((rich.priority, rich.ttl_secs), (3, Some(60)));
    }

    #[test]
    fn every_error_of_a_set_is_listed() {
        let errors = edge_hub_routes(&obj(json!({
            "routes": {
                "a": "FROM /* INTO nowhere",
                "b": {"route": "FROM /* INTO $upstream", "priority": 12},
                "c": 5,
                "d": "FROM /* INTO $upstream"
            }
        })))
        .unwrap_err();
        let names: Vec<&str> = errors.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names.len(), 3, "{errors:?}");
        assert!(names.contains(&"a") && names.contains(&"b") && names.contains(&"c"));
    }

    #[test]
    fn twin_routes_override_config_routes_of_the_same_name() {
        let config = vec![RouteSpec {
            name: "r".into(),
            text: "FROM /* INTO $upstream".into(),
            priority: 0,
            ttl_secs: None,
            origin: "config".into(),
        }];
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let routing = Routing::new(
            crate::identity::IdentityKey::device(crate::identity::DeviceId::new("hub").unwrap()),
            Arc::new(crate::sinks::Sinks::none()),
            config,
            7200,
            false,
            &Map::new(),
            metrics,
        )
        .unwrap();
        assert_eq!(routing.table().routes[0].spec.origin, "config");
        let table = routing
            .build(&obj(
                json!({"routes": {"r": "FROM /messages/* INTO $upstream"}}),
            ))
            .unwrap();
        routing.swap(table);
        assert_eq!(routing.table().routes.len(), 1);
        assert_eq!(routing.table().routes[0].spec.origin, EDGE_HUB);
    }
}
