//! `device-sim bench-query`: twin queries through the hub's API over a large fleet. N devices
//! are registered and tagged through the API of a hub in its own process, then each query is
//! timed end to end (HTTP request to last byte of JSON): the full scan that returns every
//! matching twin at once (what `POST /twins/query` did before paging), `COUNT()`, `GROUP BY`,
//! and the same full scan read in pages of 1,000 with continuation tokens (first page, and
//! all pages).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::targets::{self, Sizing};

#[derive(Args, Debug)]
pub struct QueryBenchArgs {
    /// Devices registered and tagged
    #[arg(long, default_value_t = 100_000)]
    twins: usize,
    /// Times each query runs (the median is reported)
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
    /// Run this fleethub binary instead of this build's (to measure an older version in the
    /// same run: queries it does not support are reported as such)
    #[arg(long)]
    fleethub: Option<std::path::PathBuf>,
}

/// A hub process started from a binary, ended (and its data removed) on drop.
struct Spawned {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(bin: &std::path::Path) -> Result<(Spawned, std::path::PathBuf)> {
    let dir = std::env::temp_dir().join(format!("fh-querybench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&dir)?;
    let child = std::process::Command::new(bin)
        .arg("--data-dir")
        .arg(&data)
        .args([
            "serve",
            "--mqtt",
            "127.0.0.1:0",
            "--mqtts",
            "off",
            "--api",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let spawned = Spawned { child, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("endpoints.json").exists() {
        if Instant::now() > deadline {
            bail!("{} did not start", bin.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    Ok((spawned, data))
}

const WHERE: &str = "WHERE tags.location.region = 'US' AND tags.fw >= 2";

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

pub fn run(args: QueryBenchArgs) -> Result<()> {
    if args.twins == 0 || args.rounds == 0 {
        bail!("--twins and --rounds must be at least 1");
    }
    let sizing = Sizing {
        segment_bytes: 1024 * 1024,
        segment_count: 2,
    };
    let (target, spawned, data) = match &args.fleethub {
        Some(bin) => {
            let (spawned, data) = spawn(bin)?;
            (None, Some(spawned), data)
        }
        None => {
            let target = targets::fleethub_with(0, 0, sizing, false)?;
            let data = target.data_dir();
            (Some(target), None, data)
        }
    };
    let token = std::fs::read_to_string(data.join("admin-token"))?
        .trim()
        .to_string();
    let endpoints: fleethub::hub::Endpoints =
        serde_json::from_str(&std::fs::read_to_string(data.join("endpoints.json"))?)?;
    let api = format!("http://{}", endpoints.api);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;

    eprintln!("registering and tagging {} devices", args.twins);
    let started = Instant::now();
    rt.block_on(async {
        let regions = ["US", "EU", "APAC"];
        let permits = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::with_capacity(args.twins);
        for i in 0..args.twins {
            let (http, api, token, permits) =
                (http.clone(), api.clone(), token.clone(), permits.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let id = format!("dev-{i:06}");
                let created = http
                    .post(format!("{api}/devices"))
                    .bearer_auth(&token)
                    .json(&json!({ "deviceId": id }))
                    .send()
                    .await?;
                if !created.status().is_success() {
                    bail!("creating {id}: {}", created.status());
                }
                let tags =
                    json!({ "tags": { "location": { "region": regions[i % 3] }, "fw": i % 5 } });
                let patched = http
                    .patch(format!("{api}/twins/{id}"))
                    .bearer_auth(&token)
                    .json(&tags)
                    .send()
                    .await?;
                if !patched.status().is_success() {
                    bail!("tagging {id}: {}", patched.status());
                }
                Ok::<_, anyhow::Error>(())
            }));
            if (i + 1) % 10_000 == 0 {
                eprintln!("  {} queued", i + 1);
            }
        }
        for t in tasks {
            t.await??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    eprintln!("  done in {:.1} s", started.elapsed().as_secs_f64());

    // One request: (seconds, rows, continuation token).
    let query = |q: String, page: Option<usize>, from: Option<String>| {
        let (http, api, token) = (http.clone(), api.clone(), token.clone());
        async move {
            let mut body = json!({ "query": q });
            if let Some(n) = page {
                body["pageSize"] = json!(n);
            }
            if let Some(t) = from {
                body["continuationToken"] = json!(t);
            }
            let t0 = Instant::now();
            let resp = http
                .post(format!("{api}/twins/query"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await?;
            let status = resp.status();
            let v: Value = resp.json().await?;
            let secs = t0.elapsed().as_secs_f64();
            if !status.is_success() {
                bail!("{q}: {status} {v}");
            }
            let rows = v["items"].as_array().map_or(0, |a| a.len());
            let next = v["continuationToken"].as_str().map(str::to_string);
            Ok::<_, anyhow::Error>((secs, rows, next, v))
        }
    };
    let mut results = Vec::new();
    // The median time and row count; `None` when this hub does not support the query.
    let mut time = |name: &str, q: String| -> Option<(f64, usize)> {
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..args.rounds {
            match rt.block_on(query(q.clone(), None, None)) {
                Ok((s, n, _, _)) => {
                    times.push(s);
                    rows = n;
                }
                Err(e) => {
                    eprintln!("  {name}: not supported ({e})");
                    results.push(json!({ "query": name, "text": q, "unsupported": true }));
                    return None;
                }
            }
        }
        let m = median(times);
        results.push(json!({ "query": name, "text": q, "seconds": m, "rows": rows }));
        Some((m, rows))
    };
    let Some((full, full_rows)) = time(
        "full scan, every match at once",
        format!("SELECT * FROM devices {WHERE}"),
    ) else {
        bail!("the full scan failed");
    };
    time(
        "COUNT()",
        format!("SELECT COUNT() AS n FROM devices {WHERE}"),
    );
    if let Some((_, groups)) = time(
        "GROUP BY region",
        "SELECT tags.location.region AS region, COUNT() AS n FROM devices WHERE IS_DEFINED(tags.location.region) GROUP BY tags.location.region".into(),
    ) {
        if groups != 3 {
            bail!("GROUP BY gave {groups} rows, not 3");
        }
    }
    time(
        "GROUP BY region, fw",
        "SELECT tags.location.region AS region, tags.fw AS fw, COUNT() AS n FROM devices GROUP BY tags.location.region, tags.fw".into(),
    );
    // Paged: first page alone, then every page (when the hub pages at all).
    let mut firsts = Vec::new();
    let mut alls = Vec::new();
    let mut pages = 0;
    let paging = rt
        .block_on(query(
            format!("SELECT * FROM devices {WHERE}"),
            Some(1000),
            None,
        ))
        .is_ok_and(|(_, n, next, _)| n == 1000 && next.is_some());
    let rounds = if paging { args.rounds } else { 0 };
    for _ in 0..rounds {
        let t0 = Instant::now();
        let (first, mut rows, mut next, _) = rt.block_on(query(
            format!("SELECT * FROM devices {WHERE}"),
            Some(1000),
            None,
        ))?;
        firsts.push(first);
        pages = 1;
        while let Some(t) = next.take() {
            let (_, n, more, _) = rt.block_on(query(
                format!("SELECT * FROM devices {WHERE}"),
                Some(1000),
                Some(t),
            ))?;
            rows += n;
            pages += 1;
            next = more;
        }
        alls.push(t0.elapsed().as_secs_f64());
        if rows != full_rows {
            bail!("paging read {rows} rows, the full scan {full_rows}");
        }
    }
    let (first, all) = if paging {
        let (first, all) = (median(firsts), median(alls));
        results
            .push(json!({ "query": "paged: first page of 1000", "seconds": first, "rows": 1000 }));
        results.push(json!({ "query": format!("paged: all {pages} pages"), "seconds": all, "rows": full_rows }));
        (first, all)
    } else {
        eprintln!("  paging: not supported");
        results.push(json!({ "query": "paged", "unsupported": true }));
        (f64::NAN, f64::NAN)
    };
    let rss = target.as_ref().and_then(|t| t.rss_bytes());
    drop(target);
    drop(spawned);

    if args.json {
        println!(
            "{}",
            json!({ "twins": args.twins, "rounds": args.rounds, "results": results, "hubRssBytes": rss })
        );
        return Ok(());
    }
    println!(
        "{} twins, median of {} rounds, through POST /twins/query (HTTP round trip)",
        args.twins, args.rounds
    );
    println!("{:<40} {:>10} {:>8}", "query", "ms", "rows");
    for r in &results {
        let name = r["query"].as_str().unwrap_or_default();
        match r["seconds"].as_f64() {
            Some(s) => println!("{name:<40} {:>10.1} {:>8}", s * 1000.0, r["rows"]),
            None => println!("{name:<40} {:>10} {:>8}", "unsupported", "-"),
        }
    }
    println!(
        "first page / full scan: {:.3}; all pages / full scan: {:.2}",
        first / full,
        all / full
    );
    Ok(())
}
