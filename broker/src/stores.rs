//! Opening the hub's durable stores, and checking them offline (`fleethub store check`).
//!
//! A damaged store stops the hub at start with an error that names the file, what is in it
//! and what to do next; never a panic with a backtrace (redb asserts on some damaged files,
//! a truncated one among them, so a panic while opening counts as damage too). The
//! store-and-forward store is the exception that keeps the hub starting: it is moved aside
//! and started empty, and `GET /queues` says where it went.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::Database;
use serde::Serialize;

use crate::c2d::C2dStore;
use crate::hub::Stores;
use crate::registry::Registry;
use crate::twin::TwinStore;

pub const STORE_FILE: &str = "fleethub.redb";
pub const QUEUES_FILE: &str = "queues.redb";
/// redb's page cache for the main store. Every store keeps what it serves in memory
/// (registry, twins, sessions), so the cache only has to hold what writes touch: redb's 1 GiB
/// default grew with every commit (about 1 KiB per connected device with a session).
const STORE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// A store that cannot be used, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} ({what}) cannot be used: {detail}. The hub did not start and changed nothing. \
     Next: `fleethub store check --data-dir {}` tells which stores are damaged; start from a \
     backup (`fleethub backup` makes one), or move the file aside to start without what it held.",
    path.display(),
    data_dir.display()
)]
pub struct StoreError {
    pub path: PathBuf,
    pub data_dir: PathBuf,
    pub what: &'static str,
    pub detail: String,
}

/// Runs `f`, turning a panic into an error with its message, without printing it: at this
/// boundary a panic inside the store library is one more kind of damage.
pub fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(f);
    std::panic::set_hook(previous);
    result.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the store library panicked".into())
    })
}

fn open_database(path: &Path) -> Result<Database, String> {
    let path = path.to_path_buf();
    match quietly(move || {
        redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(&path)
    }) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            Err("it is open in another process (a hub running on this data directory)".into())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("damaged ({panic})")),
    }
}

/// Every store of the main file, opened and loaded.
pub struct Opened {
    pub stores: Stores,
    pub deploy: crate::deploy::Engine,
}

/// Opens the main store and loads every store in it.
pub fn open(data_dir: &Path) -> Result<Opened, StoreError> {
    let path = data_dir.join(STORE_FILE);
    let damaged = |what: &'static str, detail: String| StoreError {
        path: path.clone(),
        data_dir: data_dir.to_path_buf(),
        what,
        detail,
    };
    let db = Arc::new(
        open_database(&path).map_err(|d| damaged("registry, twins, fleet, deployments", d))?,
    );
    let stores = Stores {
        db: db.clone(),
        registry: Registry::open(db.clone())
            .map_err(|e| damaged("device registry", e.to_string()))?,
        fleet: crate::fleet::Fleet::open(db.clone())
            .map_err(|e| damaged("products and device groups", e.to_string()))?,
        images: crate::images::Images::open(db.clone(), &data_dir.join("images"))
            .map_err(|e| damaged("images", e.to_string()))?,
        twins: TwinStore::open(db.clone()).map_err(|e| damaged("twins", e.to_string()))?,
        c2d: C2dStore::open(db.clone())
            .map_err(|e| damaged("cloud-to-device messages", e.to_string()))?,
        sessions: crate::session::SessionStore::open(db.clone())
            .map_err(|e| damaged("persistent sessions", e.to_string()))?,
    };
    let deploy =
        crate::deploy::Engine::open(db).map_err(|e| damaged("deployments", e.to_string()))?;
    Ok(Opened { stores, deploy })
}

/// One store's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    pub file: PathBuf,
    pub store: &'static str,
    pub ok: bool,
    /// Rows read, or what is wrong.
    pub detail: String,
}

/// Checks every store offline: each file's integrity (page checksums, redb's own check),
/// then every row of every store read back. Changes nothing.
pub fn check(data_dir: &Path) -> Vec<Checked> {
    let mut out = Vec::new();
    let main = data_dir.join(STORE_FILE);
    let verdict = |file: &Path, store: &'static str, r: Result<String, String>| Checked {
        file: file.to_path_buf(),
        store,
        ok: r.is_ok(),
        detail: r.unwrap_or_else(|e| e),
    };
    if !main.exists() {
        out.push(verdict(&main, "main store", Err("missing".into())));
    } else {
        match open_database(&main).and_then(integrity) {
            Err(e) => out.push(verdict(&main, "main store", Err(e))),
            Ok(db) => {
                out.push(verdict(&main, "main store", Ok("pages intact".into())));
                let db = Arc::new(db);
                let count = |n: usize| Ok(format!("{n} rows"));
                out.push(verdict(
                    &main,
                    "device registry",
                    Registry::open(db.clone())
                        .map_err(|e| e.to_string())
                        .and_then(|r| count(r.identities().len())),
                ));
                out.push(verdict(
                    &main,
                    "products and device groups",
                    crate::fleet::Fleet::open(db.clone())
                        .map_err(|e| e.to_string())
                        .and_then(|f| count(f.products().len())),
                ));
                out.push(verdict(
                    &main,
                    "images",
                    crate::images::Images::open(db.clone(), &data_dir.join("images"))
                        .map_err(|e| e.to_string())
                        .and_then(|i| count(i.list().len())),
                ));
                out.push(verdict(
                    &main,
                    "twins",
                    TwinStore::open(db.clone())
                        .map(|_| "readable".to_string())
                        .map_err(|e| e.to_string()),
                ));
                out.push(verdict(
                    &main,
                    "cloud-to-device messages",
                    C2dStore::open(db.clone())
                        .map(|_| "readable".to_string())
                        .map_err(|e| e.to_string()),
                ));
                out.push(verdict(
                    &main,
                    "persistent sessions",
                    crate::session::SessionStore::open(db.clone())
                        .map_err(|e| e.to_string())
                        .and_then(|s| count(s.len())),
                ));
                out.push(verdict(
                    &main,
                    "deployments",
                    crate::deploy::Engine::open(db)
                        .map_err(|e| e.to_string())
                        .and_then(|d| count(d.targeted.all().len())),
                ));
            }
        }
    }
    let queues = data_dir.join(QUEUES_FILE);
    if queues.exists() {
        let r = open_database(&queues)
            .and_then(integrity)
            .map(|_| "pages intact".to_string());
        out.push(verdict(&queues, "store-and-forward queues", r));
    }
    out
}

fn integrity(mut db: Database) -> Result<Database, String> {
    match quietly(std::panic::AssertUnwindSafe(|| db.check_integrity())) {
        Ok(Ok(true)) => Ok(db),
        Ok(Ok(false)) => Err("damaged: redb repaired pages it could not verify".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("damaged ({panic})")),
    }
}

/// What a backup wrote.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupReport {
    pub dir: PathBuf,
    /// Rows copied per table of the main store.
    pub tables: std::collections::BTreeMap<String, u64>,
    /// Store-and-forward entries copied.
    pub queued_entries: u64,
    /// Other files copied (admin token, TLS files, images).
    pub files: u64,
}

/// Why a backup could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}: the backup directory must not exist yet, or be empty")]
    NotEmpty(PathBuf),
    #[error("{what} {path}: {message}")]
    Io {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("main store: {0}")]
    Store(String),
    #[error("table {0} has a layout the backup does not know; nothing was written for it")]
    UnknownTable(String),
    #[error("store-and-forward queues: {0}")]
    Queues(String),
}

crate::storage::store_errors!(BackupError);

/// Makes a copy of the running hub's data directory in `dest` that a hub can start on: the
/// main store copied table by table inside one read transaction (a consistent snapshot taken
/// while writes go on), every queued entry (see `DiskQueue::backup`), the admin token, the
/// TLS files and the images. What was acknowledged before the backup began is in it.
pub fn backup(hub: &crate::hub::Hub, dest: &Path) -> Result<BackupReport, BackupError> {
    use redb::{ReadableTable, TableDefinition, TableHandle};
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| BackupError::Io {
            what,
            path,
            message: e.to_string(),
        }
    };
    if dest.exists()
        && std::fs::read_dir(dest)
            .map_err(io("reading", dest))?
            .next()
            .is_some()
    {
        return Err(BackupError::NotEmpty(dest.to_path_buf()));
    }
    crate::data_dir::secure(dest).map_err(io("creating", dest))?;
    let mut report = BackupReport {
        dir: dest.to_path_buf(),
        tables: Default::default(),
        queued_entries: 0,
        files: 0,
    };

    // The main store: one snapshot, every table.
    let copy_path = dest.join(STORE_FILE);
    let copy = redb::Builder::new().create(&copy_path)?;
    let read = hub.db.begin_read()?;
    let write = copy.begin_write()?;
    for handle in read
        .list_tables()
        .map_err(|e| BackupError::Store(e.to_string()))?
    {
        let name = handle.name().to_string();
        let by_name: TableDefinition<&str, &[u8]> = TableDefinition::new(&name);
        let by_pair: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new(&name);
        let mut rows = 0u64;
        if let Ok(table) = read.open_table(by_name) {
            let mut out = write.open_table(by_name)?;
            for row in table.iter()? {
                let (k, v) = row?;
                out.insert(k.value(), v.value())?;
                rows += 1;
            }
        } else if let Ok(table) = read.open_table(by_pair) {
            let mut out = write.open_table(by_pair)?;
            for row in table.iter()? {
                let (k, v) = row?;
                out.insert(k.value(), v.value())?;
                rows += 1;
            }
        } else {
            return Err(BackupError::UnknownTable(name));
        }
        report.tables.insert(name, rows);
    }
    write.commit()?;
    drop(read);

    report.queued_entries = hub
        .queues
        .backup(&dest.join(QUEUES_FILE))
        .map_err(|e| BackupError::Queues(e.to_string()))?;

    // Files beside the stores: the admin token, generated TLS files, image contents (written
    // before their rows, so every image the snapshot names is there).
    let data = &hub.config.data_dir;
    let token = data.join(crate::server::ADMIN_TOKEN_FILE);
    if token.exists() {
        std::fs::copy(&token, dest.join(crate::server::ADMIN_TOKEN_FILE))
            .map_err(io("copying", &token))?;
        report.files += 1;
    }
    for sub in ["tls", "images"] {
        let from = data.join(sub);
        if !from.is_dir() {
            continue;
        }
        let to = dest.join(sub);
        std::fs::create_dir_all(&to).map_err(io("creating", &to))?;
        for entry in std::fs::read_dir(&from).map_err(io("reading", &from))? {
            let path = entry.map_err(io("reading", &from))?.path();
            if path.is_file() && path.extension().is_none_or(|x| x != "tmp") {
                let target = to.join(path.file_name().unwrap_or_default());
                std::fs::copy(&path, &target).map_err(io("copying", &path))?;
                report.files += 1;
            }
        }
    }
    Ok(report)
}
