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

pub use crate::data_dir::{QUEUES_FILE, STORE_FILE};
/// redb's page cache for the main store. Every store keeps what it serves in memory
/// (registry, twins, sessions), so the cache only has to hold what writes touch: redb's 1 GiB
/// default grew with every commit (about 1 KiB per connected device with a session), and at
/// 32 MiB a deployment to 10,000 devices filled it (15 MB more at its peak than at 8 MiB, with
/// the same twin round trips and deployment times: BENCHMARKS.md, issue 19).
const STORE_CACHE_BYTES: usize = 8 * 1024 * 1024;

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

thread_local! {
    /// Set while this thread runs [`quietly`]: its panics are not printed.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into an error with its message, without printing it: at this
/// boundary a panic inside the store library is one more kind of damage.
///
/// The panic hook is process-wide, so it is wrapped once and told per thread whether to stay
/// quiet; swapping it around each call would race with other threads (a hub embedded in a
/// program that opens stores on several threads could lose the program's own hook for good).
pub fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    static WRAPPED: std::sync::Once = std::sync::Once::new();
    WRAPPED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info)
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(f);
    QUIET.with(|q| q.set(was));
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

/// The format this code writes in the main store. 0: before versions were recorded (the same
/// layout as 1). Each change of what is stored adds a step to [`migrate`] and a fixture under
/// `tests/fixtures/`.
pub const FORMAT: u32 = 1;

/// `format`: the main store's format version, as decimal text (a `&str -> &[u8]` table like
/// the others, so backups copy it).
const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

/// The format version recorded in the main store (0: none recorded).
pub fn format_of(db: &Database) -> Result<u32, String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    match tx.open_table(META) {
        Ok(t) => Ok(t
            .get("format")
            .map_err(|e| e.to_string())?
            .and_then(|v| std::str::from_utf8(v.value()).ok()?.parse::<u32>().ok())
            .unwrap_or(0)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}

/// Brings the main store to [`FORMAT`], each step in one transaction (a crash leaves the
/// previous version whole, and the next start runs the step again); refuses a newer store
/// without touching it.
fn migrate(db: &Database, path: &Path) -> Result<(), String> {
    let found = format_of(db)?;
    if found > FORMAT {
        return Err(format!(
            "written in format {found} by a newer fleethub; this one reads formats up to {FORMAT}. Nothing was changed: run the newer fleethub on it, or restore a backup made with this version"
        ));
    }
    for to in found + 1..=FORMAT {
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        // 0 -> 1: the layout is the same; the version is recorded from now on.
        tx.open_table(META)
            .map_err(|e| e.to_string())?
            .insert("format", to.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        tracing::info!(
            store = %path.display(),
            from = to - 1,
            to,
            "store format migrated (from 0: a new store, or one from before formats were recorded)"
        );
    }
    Ok(())
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
    let db = open_database(&path).map_err(|d| damaged("registry, twins, fleet, deployments", d))?;
    migrate(&db, &path).map_err(|d| damaged("data format", d))?;
    let db = Arc::new(crate::storage::Store::new(db, data_dir));
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
        certificates: crate::certificates::CaStore::open(db.clone())
            .map_err(|e| damaged("CA certificates", e.to_string()))?,
        enrollments: crate::enrollment::Enrollments::open(db.clone())
            .map_err(|e| damaged("provisioning enrollments", e.to_string()))?,
        consumer_groups: crate::events::GroupStore::open(db.clone())
            .map_err(|e| damaged("consumer groups", e.to_string()))?,
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
                let format = format_of(&db).and_then(|f| {
                    if f > FORMAT {
                        Err(format!("format {f} is newer than this binary's {FORMAT}: run a newer fleethub on it"))
                    } else {
                        Ok(format!("pages intact, format {f} (this binary: {FORMAT})"))
                    }
                });
                out.push(verdict(&main, "main store", format));
                let db = Arc::new(crate::storage::Store::new(db, data_dir));
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
                    "CA certificates",
                    crate::certificates::CaStore::open(db.clone())
                        .map_err(|e| e.to_string())
                        .and_then(|c| count(c.list().len())),
                ));
                out.push(verdict(
                    &main,
                    "consumer groups",
                    crate::events::GroupStore::open(db.clone())
                        .and_then(|g| g.load())
                        .map_err(|e| e.to_string())
                        .and_then(|g| count(g.len())),
                ));
                out.push(verdict(
                    &main,
                    "provisioning enrollments",
                    crate::enrollment::Enrollments::open(db.clone())
                        .map_err(|e| e.to_string())
                        .and_then(|e| count(e.len())),
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
        let r = open_database(&queues).and_then(integrity).and_then(|db| {
            fleethub_router::queue::format_of(&db)
                .map(|f| {
                    format!(
                        "pages intact, format {f} (this binary: {})",
                        fleethub_router::queue::FORMAT
                    )
                })
                .map_err(|e| e.to_string())
        });
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
