//! One test list for every sink driver (module inputs, `$upstream`), as the queue has one for
//! both its implementations: what is routed while the consumer is away waits in the sink's
//! queue and arrives in order once it is back, acknowledged entries leave the queue and count
//! as delivered, and a queued backlog survives a hub restart. A new sink kind adds a
//! [`Kind`] variant and its fixture arms, and every test here runs for it.

use std::time::Duration;

use reqwest::Method;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::harness::{free_port, start_bare_broker, temp_dir, Client, Hub, Proxy};

#[derive(Debug, Clone, Copy)]
enum Kind {
    ModuleInput,
    Upstream,
}

/// Runs a test body once per sink kind.
macro_rules! for_each_sink {
    ($($name:ident),* $(,)?) => {
        mod module_input {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::ModuleInput).await;
            })*
        }
        mod upstream {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Upstream).await;
            })*
        }
    };
}

for_each_sink!(
    what_is_routed_while_the_consumer_is_away_arrives_in_order,
    acknowledged_entries_leave_the_queue_and_count_as_delivered,
    a_queued_backlog_survives_a_hub_restart,
);

/// A hub routing device `dev`'s telemetry to one sink whose consumer is away.
struct Fixture {
    kind: Kind,
    hub: Hub,
    device_key: String,
    /// Module inputs: the module's key.
    module_key: String,
    /// Upstream: the proxy the bridge connects through (blocked while the consumer is away)
    /// and the bare broker's port behind it.
    proxy: Option<Proxy>,
    broker_port: u16,
}

/// What receives from the sink.
enum Consumer {
    Module(Client),
    /// The watcher on the upstream broker (kept so its subscription lives) and its events.
    Upstream {
        _watcher: AsyncClient,
        events: Box<rumqttc::EventLoop>,
    },
}

impl Fixture {
    async fn start(kind: Kind, name: &str) -> Fixture {
        let dir = temp_dir(name);
        let (route, proxy, broker_port) = match kind {
            Kind::ModuleInput => (
                r#"FROM /messages/* INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")"#
                    .to_string(),
                None,
                0,
            ),
            Kind::Upstream => {
                let broker_port = free_port();
                let proxy_port = free_port();
                let proxy = Proxy::start(
                    &format!("127.0.0.1:{proxy_port}"),
                    format!("127.0.0.1:{broker_port}").parse().unwrap(),
                )
                .await;
                proxy.block(true);
                (
                    "FROM /messages/* INTO $upstream".to_string(),
                    Some((proxy, proxy_port)),
                    broker_port,
                )
            }
        };
        let mut toml = format!("[hub]\nid = \"edge\"\n[routes]\nsink = \"{route}\"\n");
        if let Some((_, port)) = &proxy {
            toml.push_str(&format!(
                "[upstream]\nenabled = true\naddress = \"127.0.0.1:{port}\"\n"
            ));
        }
        let config = dir.join("hub.toml");
        std::fs::write(&config, toml).unwrap();
        let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
        let device_key = hub.create_device("dev").await;
        let module_key = match kind {
            Kind::ModuleInput => hub.create_module("edge", "sink").await,
            Kind::Upstream => String::new(),
        };
        Fixture {
            kind,
            hub,
            device_key,
            module_key,
            proxy: proxy.map(|(p, _)| p),
            broker_port,
        }
    }

    /// The sink's queue name.
    fn queue(&self) -> &'static str {
        match self.kind {
            Kind::ModuleInput => "/modules/sink/inputs/in",
            Kind::Upstream => "$upstream",
        }
    }

    /// Publishes messages `from..to` (property `seq`) at QoS 1 and waits for every PUBACK:
    /// each is stored in the sink's queue.
    async fn publish(&self, from: usize, to: usize) {
        let mut d = self.hub.device("dev", &self.device_key).await;
        for seq in from..to {
            d.client
                .publish(
                    format!("devices/dev/messages/events/seq={seq}"),
                    QoS::AtLeastOnce,
                    false,
                    seq.to_string(),
                )
                .await
                .unwrap();
        }
        let mut acked = 0;
        while acked < to - from {
            match d.next(Duration::from_secs(10)).await {
                Some(crate::harness::Seen::PubAck(_)) => acked += 1,
                Some(_) => {}
                None => panic!("{acked} of {} acknowledged", to - from),
            }
        }
    }

    /// The consumer comes back.
    async fn consumer(&mut self) -> Consumer {
        match self.kind {
            Kind::ModuleInput => {
                let mut m = self.hub.device("edge/sink", &self.module_key).await;
                m.subscribe_many(&["devices/edge/modules/sink/inputs/#"])
                    .await;
                Consumer::Module(m)
            }
            Kind::Upstream => {
                start_bare_broker(self.broker_port);
                let o = MqttOptions::new("upstream-watcher", "127.0.0.1", self.broker_port);
                let (watcher, mut events) = AsyncClient::new(o, 100);
                watcher
                    .subscribe("devices/edge/messages/events/#", QoS::AtLeastOnce)
                    .await
                    .unwrap();
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                        Ok(Ok(_)) => {}
                        other => panic!("watcher did not subscribe: {other:?}"),
                    }
                }
                if let Some(p) = &self.proxy {
                    p.block(false);
                }
                Consumer::Upstream {
                    _watcher: watcher,
                    events: Box::new(events),
                }
            }
        }
    }

    async fn queue_depth(&self) -> u64 {
        let (_, queues) = self.hub.api(Method::GET, "/queues", None).await;
        queues["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["sink"] == self.queue())
            .and_then(|q| q["depth"].as_u64())
            .unwrap_or(0)
    }
}

impl Consumer {
    /// The `seq` of the next message the sink delivers, if one comes within `within`.
    async fn next_seq(&mut self, within: Duration) -> Option<usize> {
        let topic = match self {
            Consumer::Module(m) => m.next_publish(within).await?.topic,
            Consumer::Upstream { events, .. } => {
                let deadline = tokio::time::Instant::now() + within;
                loop {
                    match tokio::time::timeout_at(deadline, events.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => break p.topic,
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) | Err(_) => return None,
                    }
                }
            }
        };
        let bag = topic.rsplit_once('/').map(|(_, b)| b)?;
        let m = fleethub_router::Message::from_bag(bag, bytes::Bytes::new()).ok()?;
        m.property("seq")?.parse().ok()
    }

    /// Every `seq` delivered until `n` arrived (or nothing came for 10 s).
    async fn take(&mut self, n: usize) -> Vec<usize> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.next_seq(Duration::from_secs(10)).await {
                Some(seq) => got.push(seq),
                None => break,
            }
        }
        got
    }
}

async fn what_is_routed_while_the_consumer_is_away_arrives_in_order(kind: Kind) {
    let mut f = Fixture::start(kind, "sink-order").await;
    f.publish(0, 50).await;
    assert_eq!(f.queue_depth().await, 50, "{kind:?}: queued while away");
    let mut c = f.consumer().await;
    let got = c.take(50).await;
    assert_eq!(got, (0..50).collect::<Vec<_>>(), "{kind:?}");
    // And what comes while it is there flows straight through.
    f.publish(50, 60).await;
    assert_eq!(c.take(10).await, (50..60).collect::<Vec<_>>(), "{kind:?}");
}

async fn acknowledged_entries_leave_the_queue_and_count_as_delivered(kind: Kind) {
    let mut f = Fixture::start(kind, "sink-acked").await;
    f.publish(0, 30).await;
    let mut c = f.consumer().await;
    assert_eq!(c.take(30).await.len(), 30, "{kind:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while f.queue_depth().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{kind:?}: entries stayed queued after their acknowledgement"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = f
        .hub
        .metric(&format!(
            "fleethub_sink_messages_total{{result=\"delivered\",sink=\"{}\"}}",
            f.queue()
        ))
        .await;
    assert_eq!(delivered, 30.0, "{kind:?}");
}

async fn a_queued_backlog_survives_a_hub_restart(kind: Kind) {
    let mut f = Fixture::start(kind, "sink-restart").await;
    f.publish(0, 40).await;
    f.hub = f.hub.restart().await;
    assert_eq!(f.queue_depth().await, 40, "{kind:?}");
    let mut c = f.consumer().await;
    let mut got = c.take(40).await;
    got.sort();
    got.dedup();
    assert_eq!(got, (0..40).collect::<Vec<_>>(), "{kind:?}");
}
