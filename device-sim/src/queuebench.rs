//! `device-sim bench-queue`: the durable store-and-forward queue on this machine's disk.
//!
//! 1. fsync probe: appending 200-byte records to a file and syncing after each batch, as fast
//!    as possible: the disk's own limit, the baseline the queue's ingest is compared to.
//! 2. Durable ingest: many concurrent appenders, each waiting for its message to be committed
//!    (as a connection waits before its PUBACK); the writer group-commits.
//! 3. Drain: one consumer reading in priority order and removing what it "delivered".
//! 4. Memory: the process's resident size with a million messages queued.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use clap::Args;
use fleethub_router::queue::{DiskQueue, Limits, NewEntry, Queue};
use serde_json::json;

#[derive(Args, Debug)]
pub struct QueueBenchArgs {
    /// Messages to ingest and drain
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Concurrent appenders (connections)
    #[arg(long, default_value_t = 200)]
    appenders: usize,
    /// Messages queued for the memory measurement (0 to skip)
    #[arg(long, default_value_t = 1_000_000)]
    memory_messages: usize,
    /// Body size in bytes
    #[arg(long, default_value_t = 200)]
    body: usize,
    /// Directory for the files (default: a temp directory)
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|p| p * 4096)
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn entry(body: &Bytes, seq: usize) -> NewEntry {
    NewEntry {
        sink: "$upstream".into(),
        priority: (seq % 3) as u8,
        ttl_ms: 3_600_000,
        bag: format!("$.cdid=device-{:04}&seq={seq}", seq % 1000),
        body: body.clone(),
    }
}

/// fsyncs per second when each batch of `batch` records is synced.
fn fsync_probe(dir: &std::path::Path, body: usize, batch: usize) -> Result<(f64, f64)> {
    let path = dir.join("fsync-probe.bin");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    let record = vec![b'x'; body + 40];
    let start = Instant::now();
    let mut syncs = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        for _ in 0..batch {
            f.write_all(&record)?;
        }
        f.sync_data()?;
        syncs += 1;
    }
    let per_s = syncs as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok((per_s, per_s * batch as f64))
}

pub fn run(args: QueueBenchArgs) -> Result<()> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("device-sim-queue-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let body = Bytes::from(vec![b'x'; args.body]);

    let (fsync_1, _) = fsync_probe(&dir, args.body, 1)?;
    let (fsync_100, msgs_100) = fsync_probe(&dir, args.body, 100)?;

    let path = dir.join("queue.redb");
    let _ = std::fs::remove_file(&path);
    let queue = Arc::new(DiskQueue::open(&path, Limits::default())?);

    // Durable ingest: every appender awaits its own commit, like a connection before PUBACK.
    let per = args.messages / args.appenders.max(1);
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for a in 0..args.appenders {
            let (q, body) = (queue.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..per {
                    q.append(vec![entry(&body, a * per + i)], now_ms())
                        .await
                        .expect("append");
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let ingest_s = start.elapsed().as_secs_f64();
    let ingested = per * args.appenders;

    // Drain: read in delivery order, remove what was "delivered".
    let start = Instant::now();
    let mut drained = 0usize;
    let none = fleethub_router::queue::KeySet::default();
    loop {
        let p = queue.peek("$upstream", &none, 1000, now_ms())?;
        if p.entries.is_empty() {
            break;
        }
        drained += p.entries.len();
        queue.remove(p.entries.into_iter().map(|e| e.key).collect());
        rt.block_on(queue.append(Vec::new(), 0))?; // wait for the removal to be committed
    }
    let drain_s = start.elapsed().as_secs_f64();
    drop(queue);

    // Memory with a million queued messages.
    let mut memory = None;
    if args.memory_messages > 0 {
        let path = dir.join("queue-memory.redb");
        let _ = std::fs::remove_file(&path);
        let before = rss_bytes();
        let queue = Arc::new(DiskQueue::open(&path, Limits::default())?);
        rt.block_on(async {
            let mut tasks = Vec::new();
            let per = args.memory_messages / 50;
            for a in 0..50 {
                let (q, body) = (queue.clone(), body.clone());
                tasks.push(tokio::spawn(async move {
                    for chunk in 0..per / 100 {
                        let batch = (0..100)
                            .map(|i| entry(&body, a * per + chunk * 100 + i))
                            .collect();
                        q.append(batch, now_ms()).await.expect("append");
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
        let after = rss_bytes();
        let depth: u64 = queue.stats().iter().map(|s| s.depth).sum();
        let file = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        drop(queue);
        // And after a restart: counters are rebuilt by a scan, data stays on disk.
        let reopen_before = rss_bytes();
        let start = Instant::now();
        let queue = DiskQueue::open(&path, Limits::default())?;
        let reopen_s = start.elapsed().as_secs_f64();
        let reopen_after = rss_bytes();
        let reopened: u64 = queue.stats().iter().map(|s| s.depth).sum();
        drop(queue);
        memory = Some(json!({
            "queued": depth,
            "rss_before_mib": before as f64 / 1048576.0,
            "rss_after_mib": after as f64 / 1048576.0,
            "store_file_mib": file as f64 / 1048576.0,
            "reopen_s": reopen_s,
            "reopen_rss_growth_mib": reopen_after.saturating_sub(reopen_before) as f64 / 1048576.0,
            "reopened_depth": reopened,
        }));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let v = json!({
        "body_bytes": args.body,
        "fsync_probe": { "fsyncs_per_s_batch_1": fsync_1, "fsyncs_per_s_batch_100": fsync_100, "messages_per_s_batch_100": msgs_100 },
        "ingest": { "messages": ingested, "appenders": args.appenders, "seconds": ingest_s, "messages_per_s": ingested as f64 / ingest_s },
        "drain": { "messages": drained, "seconds": drain_s, "messages_per_s": drained as f64 / drain_s },
        "memory": memory,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("fsync probe ({} B records): {:.0} fsyncs/s one record per sync; {:.0} fsyncs/s = {:.0} records/s at 100 per sync",
            args.body, fsync_1, fsync_100, msgs_100);
        println!(
            "durable ingest: {} messages from {} concurrent appenders in {:.2} s = {:.0} msg/s",
            ingested,
            args.appenders,
            ingest_s,
            ingested as f64 / ingest_s
        );
        println!(
            "drain: {} messages in {:.2} s = {:.0} msg/s",
            drained,
            drain_s,
            drained as f64 / drain_s
        );
        if let Some(m) = &v["memory"].as_object() {
            println!(
                "memory: {} queued; RSS {:.0} MiB -> {:.0} MiB; store file {:.0} MiB; reopen {:.2} s, RSS +{:.0} MiB",
                m["queued"], m["rss_before_mib"].as_f64().unwrap_or(0.0), m["rss_after_mib"].as_f64().unwrap_or(0.0),
                m["store_file_mib"].as_f64().unwrap_or(0.0), m["reopen_s"].as_f64().unwrap_or(0.0), m["reopen_rss_growth_mib"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
