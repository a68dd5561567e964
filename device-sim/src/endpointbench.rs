//! `device-sim bench-endpoints`: how fast fleethub's custom endpoints write into a real NATS
//! JetStream and a real PostgreSQL, beside each server's own floor: a plain client doing the
//! same writes (JetStream: publishes with the same headers, 256 awaiting acknowledgement;
//! PostgreSQL: multi-row INSERTs of 500 rows with the same columns).
//!
//! Both servers run in temp directories on free ports (`nats-server -js`; a cluster made by
//! `initdb` and run by `pg_ctl`, as the `postgres` user when run as root). For fleethub the
//! clock runs from the first publish of N devices to the moment the stream or the table holds
//! every message (the hub acknowledges on its own durable queue; the endpoint drains it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::json;

use crate::targets;

#[derive(Args, Debug)]
pub struct EndpointBenchArgs {
    /// Publishing devices
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Messages each device publishes
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn temp(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "device-sim-{name}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A server process, killed (and its directory removed) on drop.
struct Server {
    child: Option<Child>,
    dir: PathBuf,
    stop: Option<Command>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.stop.take() {
            let _ = c.output();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn nats(port: u16) -> Result<Server> {
    let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("nats-server is not installed (apt-get install nats-server)")?;
    let dir = temp("nats")?;
    let child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_port(port)?;
    Ok(Server {
        child: Some(child),
        dir,
        stop: None,
    })
}

fn as_postgres(bin: &Path) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn postgres(port: u16) -> Result<Server> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt-get install postgresql)")?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .find(|p| p.join("initdb").exists())
        .context("no initdb under /usr/lib/postgresql")?;
    let dir = temp("pg")?;
    let _ = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir)
        .status();
    let data = dir.join("data");
    let out = as_postgres(&bin.join("initdb"))
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data)
        .output()?;
    if !out.status.success() {
        bail!("initdb: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Durable as a database is by default (fsync on): the hub's queue is too.
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1",
        dir.display()
    );
    let out = as_postgres(&bin.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .args(["-o", &options, "-l"])
        .arg(dir.join("log"))
        .args(["-w", "start"])
        .output()?;
    if !out.status.success() {
        bail!("pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut stop = as_postgres(&bin.join("pg_ctl"));
    stop.arg("-D")
        .arg(&data)
        .args(["-m", "immediate", "-w", "stop"]);
    Ok(Server {
        child: None,
        dir,
        stop: Some(stop),
    })
}

fn pg_url(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
}

const BODY: &str = "{\"temperature\":21.5,\"humidity\":48,\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}";

/// A plain client's JetStream publishes: the same subject shape, headers and body.
async fn nats_floor(url: &str, n: usize) -> Result<f64> {
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "FLOOR".into(),
        subjects: vec!["floor.>".into()],
        ..Default::default()
    })
    .await?;
    let start = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("floor:{i}").as_str());
        headers.insert("iothub-connection-device-id", "dev0");
        headers.insert("iothub-enqueuedtime", "2026-11-29T00:00:00.000Z");
        headers.insert("content-type", "application/json");
        headers.insert("seq", i.to_string().as_str());
        let ack = js
            .publish_with_headers("floor.fleethub.dev0.~", headers, BODY.into())
            .await?;
        pending.push_back(ack);
        if pending.len() >= 256 {
            if let Some(a) = pending.pop_front() {
                a.await?;
            }
        }
    }
    for a in pending {
        a.await?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// A plain client's PostgreSQL writes: multi-row INSERTs of 500 with the endpoint's columns.
async fn pg_floor(url: &str, n: usize) -> Result<f64> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    // The endpoint's own table and statement: the same writes.
    client
        .batch_execute(&fleethub::sinks::postgres::create_table("floor"))
        .await?;
    let body: serde_json::Value = serde_json::from_str(BODY)?;
    let now = std::time::SystemTime::now();
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let rows = (n - i).min(500);
        let ids: Vec<String> = (i..i + rows).map(|k| format!("floor:{k}")).collect();
        let props: Vec<serde_json::Value> = (i..i + rows)
            .map(|k| json!({ "seq": k.to_string() }))
            .collect();
        let system = json!({
            "iothub-connection-device-id": "dev0",
            "iothub-enqueuedtime": "2026-11-29T00:00:00.000Z",
            "content-type": "application/json",
        });
        let device = Some("dev0".to_string());
        let module: Option<String> = None;
        let bytes: Option<Vec<u8>> = None;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        for r in 0..rows {
            params.extend([
                &ids[r] as &(dyn tokio_postgres::types::ToSql + Sync),
                &now,
                &device,
                &module,
                &props[r],
                &system,
                &body,
                &bytes,
            ]);
        }
        let sql = fleethub::sinks::postgres::insert("floor", rows);
        client.execute(sql.as_str(), &params).await?;
        i += rows;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// fleethub: devices publish at QoS 1 into a route to the endpoint; done when `count` says
/// the endpoint holds every message.
async fn through_hub<F, Fut>(target: &targets::Target, per_device: usize, count: F) -> Result<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let devices = target.devices.len();
    let total = (devices * per_device) as u64;
    let acked = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..devices {
        let (options, topic) = target.device_options(i);
        let (client, mut events) = AsyncClient::new(options, 10);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("device {i}: {e}"),
                Err(_) => bail!("device {i}: no CONNACK"),
            }
        }
        let a = acked.clone();
        let poller = tokio::spawn(async move {
            while let Ok(e) = events.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = e {
                    a.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        clients.push((client, topic, poller));
    }
    let start = Instant::now();
    let mut publishers = Vec::new();
    for (client, topic, _) in &clients {
        let (client, topic) = (client.clone(), topic.clone());
        publishers.push(tokio::spawn(async move {
            for k in 0..per_device {
                let t = format!("{topic}$.ct=application%2Fjson&$.ce=utf-8&seq={k}");
                if client
                    .publish(t, QoS::AtLeastOnce, false, BODY)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    for p in publishers {
        let _ = p.await;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if count().await >= total {
            break;
        }
        if Instant::now() > deadline {
            bail!("the endpoint did not get every message in time");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    for (client, _, poller) in clients {
        let _ = client.disconnect().await;
        poller.abort();
    }
    Ok(rate)
}

async fn stream_count(url: &str, stream: &str) -> u64 {
    let Ok(client) = async_nats::connect(url).await else {
        return 0;
    };
    let js = async_nats::jetstream::new(client);
    let Ok(mut s) = js.get_stream(stream).await else {
        return 0;
    };
    s.info().await.map(|i| i.state.messages).unwrap_or(0)
}

async fn table_count(url: &str, table: &str) -> u64 {
    let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
        return 0;
    };
    tokio::spawn(connection);
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map(|r| r.get::<_, i64>(0) as u64)
        .unwrap_or(0)
}

pub fn run(args: EndpointBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let n = args.devices * args.messages;
    let sizing = targets::Sizing {
        segment_bytes: 32 << 20,
        segment_count: 4,
    };
    let nats_port = free_port()?;
    let _nats = nats(nats_port)?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let pg_port = free_port()?;
    let _pg = postgres(pg_port)?;
    let pg = pg_url(pg_port);

    eprintln!("plain clients: {n} JetStream publishes, {n} PostgreSQL rows …");
    let nats_plain = rt.block_on(nats_floor(&nats_url, n))?;
    let pg_plain = rt.block_on(pg_floor(&pg, n))?;

    let config = format!(
        "[routes]\nlake = \"FROM /messages/* INTO Endpoint(\\\"lake\\\")\"\n\n\
         [endpoints.lake]\nkind = \"jetstream\"\nurl = \"{nats_url}\"\nstream = \"TELEMETRY\"\n\
         subject = \"telemetry.{{hub}}.{{device}}.{{module}}\"\n"
    );
    eprintln!("fleethub into JetStream …");
    let hub = targets::fleethub_configured(args.devices, sizing, &config)?;
    let nats_hub = rt.block_on(through_hub(&hub, args.messages, || {
        stream_count(&nats_url, "TELEMETRY")
    }))?;
    drop(hub);

    let config = format!(
        "[routes]\ndb = \"FROM /messages/* INTO Endpoint(\\\"db\\\")\"\n\n\
         [endpoints.db]\nkind = \"postgres\"\nurl = \"{pg}\"\ntable = \"telemetry\"\n"
    );
    eprintln!("fleethub into PostgreSQL …");
    let hub = targets::fleethub_configured(args.devices, sizing, &config)?;
    let pg_hub = rt.block_on(through_hub(&hub, args.messages, || {
        table_count(&pg, "telemetry")
    }))?;
    drop(hub);

    let out = json!({
        "devices": args.devices,
        "messages_per_device": args.messages,
        "jetstream": { "plain_client_per_s": nats_plain, "fleethub_per_s": nats_hub,
                       "ratio": nats_hub / nats_plain },
        "postgres": { "plain_client_per_s": pg_plain, "fleethub_per_s": pg_hub,
                      "ratio": pg_hub / pg_plain },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{n} messages ({} devices x {})",
            args.devices, args.messages
        );
        println!(
            "{:<12} {:>16} {:>16} {:>8}",
            "endpoint", "plain client/s", "fleethub/s", "ratio"
        );
        println!(
            "{:<12} {:>16.0} {:>16.0} {:>8.2}",
            "jetstream",
            nats_plain,
            nats_hub,
            nats_hub / nats_plain
        );
        println!(
            "{:<12} {:>16.0} {:>16.0} {:>8.2}",
            "postgres",
            pg_plain,
            pg_hub,
            pg_hub / pg_plain
        );
    }
    Ok(())
}
