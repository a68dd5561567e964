//! What the device-sim tests share: a real hub in the test process (ephemeral ports, a temp
//! data directory removed on drop) and `device-sim` runs against it.
// Each test file uses a part of this.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A hub in this test process, stopped and its data removed on drop.
pub struct Hub {
    pub dir: PathBuf,
    pub api: String,
    pub token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hub {
    pub fn start(config_toml: &str) -> Hub {
        let dir = std::env::temp_dir().join(format!(
            "device-sim-run-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hub.toml"), config_toml).unwrap();
        Hub::start_in(dir, "127.0.0.1:0", "127.0.0.1:0")
    }

    /// Starts (or restarts) a hub on `dir`'s data and config, listening where told.
    pub fn start_in(dir: PathBuf, mqtt: &str, api: &str) -> Hub {
        let config_path = dir.join("hub.toml");
        let _ = std::fs::remove_file(dir.join("data/endpoints.json"));
        let overrides = fleethub::config::Overrides {
            data_dir: Some(dir.join("data")),
            mqtt: Some(mqtt.into()),
            mqtts: Some("off".into()),
            wss: None,
            api: Some(api.into()),
        };
        let config = fleethub::Config::load(Some(&config_path), &overrides).expect("config");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(fleethub::run(config, async {
                let _ = rx.await;
            }))
            .expect("hub ran");
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let endpoints: Value = loop {
            if let Some(v) = std::fs::read_to_string(dir.join("data/endpoints.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
            {
                break v;
            }
            assert!(Instant::now() < deadline, "hub did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        let token = std::fs::read_to_string(dir.join("data/admin-token"))
            .unwrap()
            .trim()
            .to_string();
        Hub {
            api: format!("http://{}", endpoints["api"].as_str().unwrap()),
            dir,
            token,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Stops the hub, keeping its data, and starts it again on the same addresses.
    pub fn restart_after(mut self, down: Duration) -> Hub {
        let endpoints: Value = serde_json::from_str(
            &std::fs::read_to_string(self.data_dir().join("endpoints.json")).unwrap(),
        )
        .unwrap();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::thread::sleep(down);
        let dir = std::mem::take(&mut self.dir);
        Hub::start_in(
            dir,
            endpoints["mqtt"].as_str().unwrap(),
            endpoints["api"].as_str().unwrap(),
        )
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let client = reqwest::blocking::Client::new();
        let mut req = client
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().expect("API call");
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(Value::Null))
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn scenario(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("scenario.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn device_sim(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start device-sim")
}

/// `device-sim run` of `scenario` against the hub whose data directory is `data_dir` (its
/// API address and admin token are read from there), with a JSON summary.
pub fn run_scenario(scenario: &Path, data_dir: &Path, extra: &[&str]) -> std::process::Child {
    let mut args = vec![
        "run",
        "--scenario",
        scenario.to_str().unwrap(),
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    device_sim(&args)
}

pub fn summary(child: std::process::Child) -> Value {
    let out = child.wait_with_output().expect("device-sim finished");
    assert!(
        out.status.success(),
        "device-sim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "summary is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits until the hub reports `id` connected; otherwise ends device-sim and shows its log.
pub fn wait_connected(hub: &Hub, id: &str, sim: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = hub.call(reqwest::Method::GET, &format!("/devices/{id}"), None);
        if status == 200 && v["connectionState"] == "Connected" {
            return;
        }
        if Instant::now() > deadline || sim.try_wait().ok().flatten().is_some() {
            let _ = sim.kill();
            let mut log = String::new();
            if let Some(mut e) = sim.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut log);
            }
            panic!("{id} never connected: {v}\ndevice-sim: {log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
