//! A custom endpoint into PostgreSQL with a real server (a temp cluster made by `initdb` and
//! run by `pg_ctl` on a free port): routed messages become rows with their ids, properties
//! (JSONB) and body (JSONB when JSON); with the server stopped mid-stream they wait in the
//! hub's queue, and once it is back every acknowledged message is a row, none twice. Skipped
//! loudly without PostgreSQL outside CI; under CI (`.ci/run` installs it) it must run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{settled_count, temp_dir, Hub};

/// The directory with `initdb` and `pg_ctl`.
pub fn pg_bin() -> Option<PathBuf> {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .find(|p| p.join("initdb").exists());
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("PostgreSQL must be installed under CI (.ci/run installs it)");
        }
        eprintln!("SKIPPED: PostgreSQL is not installed (apt-get install postgresql)");
    }
    found
}

/// PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user.
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

/// A cluster in a temp directory; stopped (immediately) on drop.
pub struct Pg {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Pg {
    pub fn init(bin: &Path) -> Pg {
        let dir = temp_dir("pg");
        // The cluster's files belong to the user that runs it.
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let out = as_postgres(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(dir.join("data"))
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Pg {
            bin: bin.to_path_buf(),
            dir,
            port,
        };
        pg.start();
        pg
    }

    pub fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &options, "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "start"])
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop(&self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }

    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn count(url: &str) -> i64 {
    let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
        return 0;
    };
    tokio::spawn(connection);
    client
        .query_one("SELECT count(*) FROM telemetry", &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
}

async fn wait_for_rows(url: &str, want: i64) -> i64 {
    settled_count(want as u64, || async { count(url).await as u64 }).await as i64
}

#[tokio::test]
async fn routed_messages_become_rows_and_survive_the_database_going_away() {
    let Some(bin) = pg_bin() else { return };
    let pg = Pg::init(&bin);
    let dir = temp_dir("postgres");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            r#"[routes]
db = "FROM /messages/* WHERE site = 'lab' INTO Endpoint(\"db\")"

[endpoints.db]
kind = "postgres"
url = "{}"
table = "telemetry"
"#,
            pg.url()
        ),
    )
    .unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let key = hub.create_device("meter-1").await;
    let mut dev = hub.device("meter-1", &key).await;

    dev.publish_numbered("meter-1", 0, 1_000).await;
    assert_eq!(wait_for_rows(&pg.url(), 1_000).await, 1_000);
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT device_id, module_id, properties->>'site', properties->>'seq', \
             system_properties->>'iothub-connection-device-id', (body_json->>'n')::int, \
             body IS NULL, id FROM telemetry WHERE properties->>'seq' = '7'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("meter-1"));
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("lab"));
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("7"));
    assert_eq!(row.get::<_, Option<String>>(4).as_deref(), Some("meter-1"));
    assert_eq!(row.get::<_, Option<i32>>(5), Some(7));
    assert!(row.get::<_, bool>(6), "a JSON body is stored as JSONB only");
    assert!(row.get::<_, String>(7).starts_with("fleethub:"));
    drop(client);

    // The database stops mid-stream: the hub still acknowledges (the queue keeps them).
    pg.stop();
    dev.publish_numbered("meter-1", 1_000, 1_000).await;
    let depth = "fleethub_queue_depth{sink=\"$endpoint/db\"}";
    assert!(hub.metric(depth).await > 0.0, "waiting in the queue");
    pg.start();
    assert_eq!(
        wait_for_rows(&pg.url(), 2_000).await,
        2_000,
        "none lost, none twice"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while hub.metric(depth).await > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(hub.metric(depth).await, 0.0, "the queue drained");
}
