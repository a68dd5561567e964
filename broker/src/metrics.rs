//! Prometheus metrics, served at `/metrics`. Names follow Prometheus conventions:
//! `fleethub_` prefix, counters end in `_total`, sizes in bytes.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// Connections past CONNACK, now.
    pub connections: IntGauge,
    /// CONNECT attempts by `result` (accepted, not_authorized, bad_request, ...).
    pub connection_attempts: IntCounterVec,
    /// Refused publishes and subscriptions by `action`.
    pub authorization_denials: IntCounterVec,
    pub telemetry_messages: IntCounter,
    pub telemetry_bytes: IntCounter,
    /// Connections closed for a protocol violation, by `reason`.
    pub protocol_errors: IntCounterVec,
    /// Twin reads (device GET and API) by `result`.
    pub twin_reads: IntCounterVec,
    /// Twin patches by `section` (reported, desired, tags) and `result`.
    pub twin_patches: IntCounterVec,
    /// Desired patches published to devices and modules.
    pub desired_pushes: IntCounter,
    /// API connections closed at once because `[api] max_connections` were open.
    pub api_connections_refused: IntCounter,
    /// MQTT sockets closed at once because `[mqtt] max_pending_connections` had not finished CONNECT.
    pub mqtt_pending_refused: IntCounter,
    /// Routes in force whose sink cannot deliver (their messages are dropped and counted).
    pub routes_undeliverable: IntGauge,
    /// Deployment twin writes refused because they would leave an invalid route set.
    pub deployment_writes_refused: IntCounter,
    /// Direct messages dropped because a connection's backlog was full.
    pub direct_dropped: IntCounter,
    /// Connections closed because their SAS token expired.
    pub token_expirations: IntCounter,
    /// Persistent sessions resumed at CONNECT (session present).
    pub sessions_resumed: IntCounter,
    /// Persistent sessions removed after idling past `session_expiry_secs`.
    pub sessions_expired: IntCounter,
    /// Persistent sessions stored now, refreshed on every scrape.
    pub sessions: IntGauge,
    /// Direct method calls by `result` (ok, offline, timeout, error).
    pub method_calls: IntCounterVec,
    /// C2D messages by `event` (queued, delivered, expired).
    pub c2d_messages: IntCounterVec,
    /// Messages a route matched, by `route`.
    pub route_matched: IntCounterVec,
    /// Route conditions that did not evaluate to a boolean (undefined), by `route`.
    pub route_condition_errors: IntCounterVec,
    /// Routed messages by `sink` and `result` (delivered, dropped).
    pub sink_messages: IntCounterVec,
    /// 1 while the upstream bridge is connected.
    pub upstream_connected: IntGauge,
    /// Routed messages not stored because the quota refused them (not acknowledged).
    pub queue_refused: IntCounter,
    /// Provisioning (DPS) registrations by result.
    pub provisioning: IntCounterVec,
    /// Telemetry the fallback route sent to the events endpoint.
    pub events_fallback: IntCounter,
    pub live_view_dropped: IntCounter,
    pub router_links_opened: IntCounter,
    /// Events handed to consumer groups' readers, by group.
    pub events_delivered: IntCounterVec,
    events_lag_messages: prometheus::IntGaugeVec,
    events_lag_seconds: prometheus::GaugeVec,
    /// Main-store writes refused because the disk is below its free-space floor.
    pub store_writes_refused: IntCounter,
    /// Per targeted deployment and state, refreshed by the rollout ticker.
    deployment_devices: prometheus::IntGaugeVec,
    /// Per sink, refreshed on every scrape from the queues.
    queue_depth: prometheus::IntGaugeVec,
    queue_bytes: prometheus::IntGaugeVec,
    queue_oldest_age: prometheus::GaugeVec,
    queue_dropped: IntCounterVec,
    /// Drop counts already exported, to add only the difference to the counter.
    queue_dropped_seen: std::sync::Mutex<std::collections::HashMap<(String, &'static str), u64>>,
    /// Resident set size, refreshed on every scrape.
    resident_memory: IntGauge,
    /// 1 while this node leads the cluster (set by the server as leadership changes).
    pub cluster_leader: IntGauge,
    cpu_seconds: prometheus::Counter,
    cpu_seen: std::sync::Mutex<f64>,
    /// Every metric family's name and labels, series or not (dashboards are checked
    /// against it).
    families: Vec<(String, Vec<String>)>,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::for_node(None)
    }

    /// A cluster node's metrics: every series carries `node="NAME"`, so one Prometheus
    /// scraping every node tells them apart. A single hub's series carry no such label.
    pub fn for_node(node: Option<&str>) -> Metrics {
        let labels = node.map(|n| std::iter::once(("node".to_string(), n.to_string())).collect());
        let registry = Registry::new_custom(None, labels).expect("a valid constant label");
        let connections = IntGauge::new(
            "fleethub_connections",
            "MQTT connections currently open (after CONNACK)",
        )
        .expect("valid metric");
        let connection_attempts = IntCounterVec::new(
            Opts::new(
                "fleethub_connection_attempts_total",
                "MQTT CONNECT attempts by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let provisioning = IntCounterVec::new(
            Opts::new(
                "fleethub_provisioning_registrations_total",
                "Device provisioning registrations by result: assigned, not_authorized, disabled, failed",
            ),
            &["result"],
        )
        .expect("valid metric");
        let authorization_denials = IntCounterVec::new(
            Opts::new(
                "fleethub_authorization_denials_total",
                "Publishes and subscriptions refused because the topic is not the client's",
            ),
            &["action"],
        )
        .expect("valid metric");
        let telemetry_messages = IntCounter::new(
            "fleethub_telemetry_messages_total",
            "Telemetry messages received from devices and modules",
        )
        .expect("valid metric");
        let telemetry_bytes = IntCounter::new(
            "fleethub_telemetry_bytes_total",
            "Telemetry body bytes received from devices and modules",
        )
        .expect("valid metric");
        let protocol_errors = IntCounterVec::new(
            Opts::new(
                "fleethub_protocol_errors_total",
                "Connections closed for a malformed or forbidden packet, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let twin_reads = IntCounterVec::new(
            Opts::new("fleethub_twin_reads_total", "Twin reads by result"),
            &["result"],
        )
        .expect("valid metric");
        let twin_patches = IntCounterVec::new(
            Opts::new(
                "fleethub_twin_patches_total",
                "Twin patches by section and result",
            ),
            &["section", "result"],
        )
        .expect("valid metric");
        let direct_dropped = IntCounter::new(
            "fleethub_direct_dropped_total",
            "Twin answers, desired patches and method requests dropped because the connection was not reading",
        )
        .expect("valid metric");
        let token_expirations = IntCounter::new(
            "fleethub_token_expirations_total",
            "Connections closed because their SAS token expired",
        )
        .expect("valid metric");
        let sessions_resumed = IntCounter::new(
            "fleethub_sessions_resumed_total",
            "Persistent MQTT sessions resumed at CONNECT (session present)",
        )
        .expect("valid metric");
        let sessions_expired = IntCounter::new(
            "fleethub_sessions_expired_total",
            "Persistent MQTT sessions removed after idling past the session expiry",
        )
        .expect("valid metric");
        let sessions = IntGauge::new("fleethub_sessions", "Persistent MQTT sessions stored")
            .expect("valid metric");
        let api_connections_refused = IntCounter::new(
            "fleethub_api_connections_refused_total",
            "API connections closed as they arrived because [api] max_connections were open",
        )
        .expect("valid metric");
        let mqtt_pending_refused = IntCounter::new(
            "fleethub_mqtt_pending_refused_total",
            "MQTT sockets closed as they arrived because [mqtt] max_pending_connections had not finished CONNECT",
        )
        .expect("valid metric");
        let routes_undeliverable = IntGauge::new(
            "fleethub_routes_undeliverable",
            "Routes in force whose sink cannot deliver ($upstream not enabled, no such module id); their messages are dropped and counted",
        )
        .expect("valid metric");
        let deployment_writes_refused = IntCounter::new(
            "fleethub_deployment_writes_refused_total",
            "Deployment twin writes refused because they would leave the hub's route set invalid",
        )
        .expect("valid metric");
        let desired_pushes = IntCounter::new(
            "fleethub_desired_pushes_total",
            "Desired-property patches published to devices and modules",
        )
        .expect("valid metric");
        let method_calls = IntCounterVec::new(
            Opts::new(
                "fleethub_method_calls_total",
                "Direct method calls by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let c2d_messages = IntCounterVec::new(
            Opts::new(
                "fleethub_c2d_messages_total",
                "Cloud-to-device messages by event",
            ),
            &["event"],
        )
        .expect("valid metric");
        let route_matched = IntCounterVec::new(
            Opts::new(
                "fleethub_route_matched_total",
                "Messages a route matched, by route",
            ),
            &["route"],
        )
        .expect("valid metric");
        let route_condition_errors = IntCounterVec::new(
            Opts::new(
                "fleethub_route_condition_errors_total",
                "Route conditions that evaluated to undefined or a non-boolean, by route",
            ),
            &["route"],
        )
        .expect("valid metric");
        let sink_messages = IntCounterVec::new(
            Opts::new(
                "fleethub_sink_messages_total",
                "Routed messages by sink and result",
            ),
            &["sink", "result"],
        )
        .expect("valid metric");
        let upstream_connected = IntGauge::new(
            "fleethub_upstream_connected",
            "1 while the upstream bridge is connected",
        )
        .expect("valid metric");
        let store_writes_refused = IntCounter::new(
            "fleethub_store_writes_refused_total",
            "Writes to the main store (twins, registry, C2D, sessions, fleet) refused because the disk is below its free-space floor",
        )
        .expect("valid metric");
        let queue_refused = IntCounter::new(
            "fleethub_queue_refused_total",
            "Routed messages refused by the store-and-forward quota (their publish was not acknowledged)",
        )
        .expect("valid metric");
        let events_fallback = IntCounter::new(
            "fleethub_events_fallback_total",
            "Telemetry that matched no route and went to the events endpoint (the fallback route)",
        )
        .expect("valid metric");
        let live_view_dropped = IntCounter::new(
            "fleethub_live_view_dropped_total",
            "Telemetry not shown on the live view because its watchers fell too far behind (the events endpoint and routes have it)",
        )
        .expect("valid metric");
        let router_links_opened = IntCounter::new(
            "fleethub_router_links_opened_total",
            "Links opened into the embedded router: one for the live view, one per service connection that subscribes through it",
        )
        .expect("valid metric");
        let events_delivered = IntCounterVec::new(
            Opts::new(
                "fleethub_events_delivered_total",
                "Events handed to a consumer group's readers (again after a reader left unacknowledged)",
            ),
            &["group"],
        )
        .expect("valid metric");
        let deployment_devices = prometheus::IntGaugeVec::new(
            Opts::new(
                "fleethub_deployment_devices",
                "Devices of a targeted deployment by state: targeted, applied, succeeded, failed (IoT Hub's system metrics)",
            ),
            &["deployment", "state"],
        )
        .expect("valid metric");
        let events_lag_messages = prometheus::IntGaugeVec::new(
            Opts::new(
                "fleethub_events_consumer_lag_messages",
                "Retained events after a consumer group's checkpoint",
            ),
            &["group"],
        )
        .expect("valid metric");
        let events_lag_seconds = prometheus::GaugeVec::new(
            Opts::new(
                "fleethub_events_consumer_lag_seconds",
                "Age of the oldest retained event after a consumer group's checkpoint",
            ),
            &["group"],
        )
        .expect("valid metric");
        let queue_depth = prometheus::IntGaugeVec::new(
            Opts::new(
                "fleethub_queue_depth",
                "Messages waiting in a sink's store-and-forward queue",
            ),
            &["sink"],
        )
        .expect("valid metric");
        let queue_bytes = prometheus::IntGaugeVec::new(
            Opts::new(
                "fleethub_queue_bytes",
                "Bytes waiting in a sink's store-and-forward queue",
            ),
            &["sink"],
        )
        .expect("valid metric");
        let queue_oldest_age = prometheus::GaugeVec::new(
            Opts::new(
                "fleethub_queue_oldest_age_seconds",
                "Age of the oldest message in a sink's queue",
            ),
            &["sink"],
        )
        .expect("valid metric");
        let queue_dropped = IntCounterVec::new(
            Opts::new(
                "fleethub_queue_dropped_total",
                "Queued messages dropped undelivered, by sink and reason (expired, quota, corrupt: unreadable log records found at start, sink \"(unreadable)\")",
            ),
            &["sink", "reason"],
        )
        .expect("valid metric");
        let resident_memory = IntGauge::new(
            "fleethub_process_resident_memory_bytes",
            "Resident memory of the hub process",
        )
        .expect("valid metric");
        let cpu_seconds = prometheus::Counter::new(
            "fleethub_process_cpu_seconds_total",
            "CPU time the hub process has used (user and system), in seconds",
        )
        .expect("valid metric");
        let cluster_leader = IntGauge::new(
            "fleethub_cluster_leader",
            "1 while this node is the cluster's leader and runs its singleton work (a single hub always is)",
        )
        .expect("valid metric");
        let mut families = Vec::new();
        for c in [
            Box::new(cpu_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cluster_leader.clone()),
            Box::new(connections.clone()),
            Box::new(connection_attempts.clone()),
            Box::new(authorization_denials.clone()),
            Box::new(telemetry_messages.clone()),
            Box::new(telemetry_bytes.clone()),
            Box::new(protocol_errors.clone()),
            Box::new(twin_reads.clone()),
            Box::new(twin_patches.clone()),
            Box::new(desired_pushes.clone()),
            Box::new(deployment_writes_refused.clone()),
            Box::new(routes_undeliverable.clone()),
            Box::new(api_connections_refused.clone()),
            Box::new(mqtt_pending_refused.clone()),
            Box::new(direct_dropped.clone()),
            Box::new(token_expirations.clone()),
            Box::new(sessions_resumed.clone()),
            Box::new(sessions_expired.clone()),
            Box::new(sessions.clone()),
            Box::new(method_calls.clone()),
            Box::new(c2d_messages.clone()),
            Box::new(route_matched.clone()),
            Box::new(route_condition_errors.clone()),
            Box::new(sink_messages.clone()),
            Box::new(upstream_connected.clone()),
            Box::new(queue_refused.clone()),
            Box::new(provisioning.clone()),
            Box::new(events_fallback.clone()),
            Box::new(live_view_dropped.clone()),
            Box::new(router_links_opened.clone()),
            Box::new(events_delivered.clone()),
            Box::new(events_lag_messages.clone()),
            Box::new(deployment_devices.clone()),
            Box::new(events_lag_seconds.clone()),
            Box::new(store_writes_refused.clone()),
            Box::new(queue_depth.clone()),
            Box::new(queue_bytes.clone()),
            Box::new(queue_oldest_age.clone()),
            Box::new(queue_dropped.clone()),
            Box::new(resident_memory.clone()),
        ] {
            families.extend(
                c.desc()
                    .iter()
                    .map(|d| (d.fq_name.clone(), d.variable_labels.clone())),
            );
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            families,
            cluster_leader,
            connections,
            connection_attempts,
            authorization_denials,
            telemetry_messages,
            telemetry_bytes,
            protocol_errors,
            twin_reads,
            twin_patches,
            desired_pushes,
            deployment_writes_refused,
            routes_undeliverable,
            api_connections_refused,
            mqtt_pending_refused,
            direct_dropped,
            token_expirations,
            sessions_resumed,
            sessions_expired,
            sessions,
            method_calls,
            c2d_messages,
            route_matched,
            route_condition_errors,
            sink_messages,
            upstream_connected,
            queue_refused,
            provisioning,
            events_fallback,
            live_view_dropped,
            router_links_opened,
            events_delivered,
            events_lag_messages,
            deployment_devices,
            events_lag_seconds,
            store_writes_refused,
            queue_depth,
            queue_bytes,
            queue_oldest_age,
            queue_dropped,
            queue_dropped_seen: Default::default(),
            resident_memory,
            cpu_seconds,
            cpu_seen: std::sync::Mutex::new(0.0),
        }
    }

    /// Updates the queue gauges and drop counters from the queues' own counters.
    /// Log records found unreadable at start: each may have held an acknowledged message.
    pub fn corrupt_records(&self, n: u64) {
        self.queue_dropped
            .with_label_values(&["(unreadable)", "corrupt"])
            .inc_by(n);
    }

    pub fn observe_queues(&self, stats: &[fleethub_router::queue::SinkStats], now_ms: u64) {
        let mut seen = self
            .queue_dropped_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for s in stats {
            self.queue_depth
                .with_label_values(&[&s.sink])
                .set(s.depth as i64);
            self.queue_bytes
                .with_label_values(&[&s.sink])
                .set(s.bytes as i64);
            let age = s
                .oldest_ms
                .map(|t| now_ms.saturating_sub(t) as f64 / 1000.0)
                .unwrap_or(0.0);
            self.queue_oldest_age.with_label_values(&[&s.sink]).set(age);
            for (reason, total) in [("expired", s.dropped_expired), ("quota", s.dropped_quota)] {
                let last = seen.entry((s.sink.clone(), reason)).or_insert(0);
                if total > *last {
                    self.queue_dropped
                        .with_label_values(&[&s.sink, reason])
                        .inc_by(total - *last);
                    *last = total;
                }
            }
        }
    }

    /// Sets the consumer groups' lag gauges; groups gone since are removed.
    pub fn observe_groups(&self, groups: &[crate::events::GroupView]) {
        self.events_lag_messages.reset();
        self.events_lag_seconds.reset();
        for g in groups {
            self.events_lag_messages
                .with_label_values(&[&g.name])
                .set(g.lag_messages as i64);
            self.events_lag_seconds
                .with_label_values(&[&g.name])
                .set(g.lag_seconds);
        }
    }

    /// Every metric family the hub exports (name, label names), whether it has series yet
    /// or not.
    pub fn families(&self) -> &[(String, Vec<String>)] {
        &self.families
    }

    /// Sets the deployment gauges to `counts` (deployment, [targeted, applied, succeeded,
    /// failed]); deployments not in it disappear.
    pub fn observe_deployments(&self, counts: &[(String, [u64; 4])]) {
        self.deployment_devices.reset();
        for (id, c) in counts {
            for (state, n) in ["targeted", "applied", "succeeded", "failed"].iter().zip(c) {
                self.deployment_devices
                    .with_label_values(&[id.as_str(), state])
                    .set(*n as i64);
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        if let Some(rss) = resident_bytes() {
            self.resident_memory.set(rss as i64);
        }
        if let (Some(cpu), Ok(mut seen)) = (cpu_seconds(), self.cpu_seen.lock()) {
            if cpu > *seen {
                self.cpu_seconds.inc_by(cpu - *seen);
                *seen = cpu;
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// User plus system CPU time from /proc (Linux, 100 ticks a second); `None` elsewhere.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// RSS from /proc (Linux); `None` elsewhere.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every query of the Grafana dashboard shipped in `config/grafana/`.
    fn dashboard_queries() -> Vec<String> {
        let text = include_str!("../../config/grafana/fleethub.json");
        let dashboard: serde_json::Value = serde_json::from_str(text).expect("dashboard is JSON");
        fn walk(panels: &serde_json::Value, out: &mut Vec<String>) {
            for p in panels.as_array().into_iter().flatten() {
                for t in p["targets"].as_array().into_iter().flatten() {
                    out.push(t["expr"].as_str().expect("every target has an expr").into());
                }
                walk(&p["panels"], out);
            }
        }
        let mut out = Vec::new();
        walk(&dashboard["panels"], &mut out);
        for v in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(q) = v["query"]["query"].as_str() {
                out.push(q.into());
            }
        }
        out
    }

    fn metric_names(expr: &str) -> Vec<&str> {
        let mut names = Vec::new();
        let mut rest = expr;
        while let Some(i) = rest.find("fleethub_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.push(&tail[..end]);
            rest = &tail[end..];
        }
        names
    }

    /// Names the dashboard's queries use and the labels they group by must be what the hub
    /// exports (a renamed metric or label would leave a panel silently empty); rates are
    /// taken of counters only; and the panels the issue asks for are there.
    #[test]
    fn every_dashboard_query_names_metrics_and_labels_the_hub_exports() {
        let m = Metrics::new();
        let families: std::collections::HashMap<&str, &Vec<String>> =
            m.families().iter().map(|(n, l)| (n.as_str(), l)).collect();
        let queries = dashboard_queries();
        assert!(queries.len() > 20, "{} queries", queries.len());
        let mut used = std::collections::HashSet::new();
        for q in &queries {
            let names = metric_names(q);
            assert!(!names.is_empty(), "{q}: names no fleethub metric");
            for name in &names {
                let labels = families
                    .get(name)
                    .unwrap_or_else(|| panic!("{q}: the hub exports no {name}"));
                used.insert(name.to_string());
                // Label matchers right after the name.
                let after = &q[q.find(name).unwrap_or(0) + name.len()..];
                if let Some(body) = after.strip_prefix('{').and_then(|a| a.split_once('}')) {
                    for matcher in body.0.split(',') {
                        let label = matcher.split(['=', '!', '~']).next().unwrap_or("").trim();
                        assert!(
                            label == "instance" || labels.iter().any(|l| l == label),
                            "{q}: {name} has no label {label} (it has {labels:?})"
                        );
                    }
                }
            }
            // `by (a, b)`: every grouping label is on the metrics aggregated.
            let mut rest = q.as_str();
            while let Some(i) = rest.find("by (") {
                let inner = &rest[i + 4..];
                let (group, tail) = inner.split_once(')').expect("closed by (…)");
                for label in group.split(',').map(str::trim) {
                    assert!(
                        label == "instance"
                            || names.iter().all(|n| families[n].iter().any(|l| l == label)),
                        "{q}: grouped by {label}, which {names:?} do not all have"
                    );
                }
                rest = tail;
            }
            // rate() and increase() of counters only.
            for f in ["rate(", "increase("] {
                for (i, _) in q.match_indices(f) {
                    let arg = &q[i + f.len()..];
                    let name = metric_names(arg).into_iter().next().unwrap_or("");
                    assert!(
                        arg.starts_with(name) && name.ends_with("_total"),
                        "{q}: {f}…) of {name}, not a counter"
                    );
                }
            }
        }
        for wanted in [
            "fleethub_telemetry_messages_total",
            "fleethub_sink_messages_total",
            "fleethub_connections",
            "fleethub_queue_depth",
            "fleethub_queue_oldest_age_seconds",
            "fleethub_queue_dropped_total",
            "fleethub_route_matched_total",
            "fleethub_deployment_devices",
        ] {
            assert!(
                used.contains(wanted),
                "the dashboard has no panel on {wanted}"
            );
        }
    }

    #[test]
    fn deployment_gauges_follow_the_deployments() {
        let m = Metrics::new();
        m.observe_deployments(&[("fw".into(), [10, 8, 6, 1])]);
        let text = m.render();
        assert!(
            text.contains(r#"fleethub_deployment_devices{deployment="fw",state="succeeded"} 6"#),
            "{text}"
        );
        m.observe_deployments(&[]);
        assert!(
            !m.render().contains(r#"deployment="fw""#),
            "a deleted deployment goes"
        );
    }
}
