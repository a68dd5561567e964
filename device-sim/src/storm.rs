//! `device-sim bench-sessions`: a reconnect storm. N devices connect as the Azure IoT SDKs do
//! (clean session 0, the SDK's four subscriptions), the hub is killed (`kill -9`) and started
//! again on the same data directory and address, and every device reconnects by itself without
//! subscribing again. Measured: how long until every device has its session back (CONNACK
//! session-present 1), and then how long a desired push (one deployment to every device) takes
//! to reach all of them over the resumed subscriptions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::json;

use crate::targets::{self, Sizing};

#[derive(Args, Debug)]
pub struct SessionBenchArgs {
    /// Devices (each its own connection with a persistent session)
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

/// What the fleet has seen, counted across all device tasks.
#[derive(Default)]
struct Seen {
    subscribed: AtomicU64,
    /// CONNACKs with session-present 1 after the restart, and the last one's time.
    resumed: AtomicU64,
    resumed_last_us: AtomicU64,
    /// Reconnects that found no session (session-present 0): sessions lost.
    fresh: AtomicU64,
    desired: AtomicU64,
    desired_last_us: AtomicU64,
    errors: AtomicU64,
}

pub fn run(args: SessionBenchArgs) -> Result<()> {
    let sizing = Sizing {
        segment_bytes: 1024 * 1024,
        segment_count: 2,
    };
    let max_connections = args.devices + 16;
    let mut target = targets::fleethub_with(0, args.devices, sizing, false)?;
    let token = std::fs::read_to_string(target.data_dir().join("admin-token"))?
        .trim()
        .to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let seen = Arc::new(Seen::default());
    // Microseconds since this instant, for the devices' timestamps.
    let epoch = Instant::now();
    let restarted_at = Arc::new(AtomicU64::new(u64::MAX));

    eprintln!("connecting {} devices with clean session 0", args.devices);
    let mut tasks = Vec::with_capacity(args.devices);
    let permits = Arc::new(tokio::sync::Semaphore::new(200));
    for i in 0..args.devices {
        let mut options = target.held_options(i);
        options.set_clean_session(false);
        options.set_keep_alive(Duration::from_secs(60));
        let filters = target.held_filters(i);
        let (seen, restarted_at, permits) = (seen.clone(), restarted_at.clone(), permits.clone());
        tasks.push(rt.spawn(async move {
            let permit = permits.acquire_owned().await;
            let (client, mut events) = AsyncClient::new(options, 10);
            let mut subscribed = false;
            let mut permit = permit.ok();
            let mut failures = 0u32;
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        failures = 0;
                        if !subscribed {
                            let filters = filters.iter().map(|f| {
                                rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)
                            });
                            if client.subscribe_many(filters).await.is_err() {
                                seen.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        } else if restarted_at.load(Ordering::Relaxed) != u64::MAX {
                            let now = epoch.elapsed().as_micros() as u64;
                            if ack.session_present {
                                seen.resumed.fetch_add(1, Ordering::Relaxed);
                                seen.resumed_last_us.fetch_max(now, Ordering::Relaxed);
                            } else {
                                seen.fresh.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) if !subscribed => {
                        subscribed = true;
                        permit.take();
                        seen.subscribed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p)))
                        if p.topic
                            .starts_with("$iothub/twin/PATCH/properties/desired/")
                            && p.payload.windows(7).any(|w| w == b"stormId") =>
                    {
                        let now = epoch.elapsed().as_micros() as u64;
                        seen.desired.fetch_add(1, Ordering::Relaxed);
                        seen.desired_last_us.fetch_max(now, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        // As a device: back off with jitter, then the next poll reconnects
                        // (clean session 0, no new SUBSCRIBE).
                        failures = (failures + 1).min(5);
                        let base = 100u64 << failures;
                        let jitter = rand::random::<u64>() % base;
                        tokio::time::sleep(Duration::from_millis(base + jitter)).await;
                    }
                }
            }
        }));
    }
    wait_until("every device subscribed", Duration::from_secs(300), || {
        seen.subscribed.load(Ordering::Relaxed) as usize >= args.devices
    })?;
    let rss_before = target.rss_bytes().unwrap_or(0);

    eprintln!("kill -9 and restart");
    let killed = Instant::now();
    restarted_at.store(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
    let api = target.crash_and_restart(max_connections, sizing)?;
    let listening_s = killed.elapsed().as_secs_f64();
    wait_until("every session resumed", Duration::from_secs(300), || {
        (seen.resumed.load(Ordering::Relaxed) + seen.fresh.load(Ordering::Relaxed)) as usize
            >= args.devices
    })?;
    let killed_us = restarted_at.load(Ordering::Relaxed);
    let resumed_s = seen
        .resumed_last_us
        .load(Ordering::Relaxed)
        .saturating_sub(killed_us) as f64
        / 1e6;

    eprintln!("desired push to every device");
    let pushed_us = epoch.elapsed().as_micros() as u64;
    let body = json!({
        "id": "storm", "targetCondition": "*", "priority": 1,
        "content": { "deviceContent": { "properties.desired.stormId": 1 } },
    });
    let spec: fleethub::deploy::wire::DeploymentSpec = serde_json::from_value(body)?;
    let client = fleethub::client::ApiClient::new(&format!("http://{api}"), &token);
    rt.block_on(client.create_deployment(&spec))
        .context("creating the deployment")?;
    let reached = wait_until(
        "the push reached every device",
        Duration::from_secs(120),
        || seen.desired.load(Ordering::Relaxed) as usize >= args.devices,
    );
    let desired_s = seen
        .desired_last_us
        .load(Ordering::Relaxed)
        .saturating_sub(pushed_us) as f64
        / 1e6;
    let rss_after = target.rss_bytes().unwrap_or(0);
    for t in tasks {
        t.abort();
    }
    let summary = json!({
        "devices": args.devices,
        "restart": "kill -9",
        "hub_listening_s": listening_s,
        "all_sessions_back_s": resumed_s,
        "resumed": seen.resumed.load(Ordering::Relaxed),
        "sessions_lost": seen.fresh.load(Ordering::Relaxed),
        "push_reached_all_s": desired_s,
        "desired_received": seen.desired.load(Ordering::Relaxed),
        "hub_rss_before_bytes": rss_before,
        "hub_rss_after_bytes": rss_after,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!("devices               {}", args.devices);
        println!("restart               kill -9, hub listening again after {listening_s:.2} s");
        println!(
            "sessions back         {} of {} (lost {}), the last {resumed_s:.2} s after the kill",
            summary["resumed"], args.devices, summary["sessions_lost"]
        );
        println!(
            "desired push          reached {} of {} in {desired_s:.2} s",
            summary["desired_received"], args.devices
        );
        println!(
            "hub RSS               {:.1} MiB before, {:.1} MiB after",
            rss_before as f64 / 1048576.0,
            rss_after as f64 / 1048576.0
        );
    }
    reached.context("not every device got the push")?;
    Ok(())
}

fn wait_until(what: &str, limit: Duration, done: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
