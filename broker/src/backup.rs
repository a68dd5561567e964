//! Online backups: a copy of the running hub's data directory that a hub can start on.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data_dir::{ADMIN_TOKEN_FILE, QUEUES_FILE, STORE_FILE};

/// What a backup wrote.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupReport {
    pub dir: PathBuf,
    /// Rows copied per table of the main store.
    pub tables: std::collections::BTreeMap<String, u64>,
    /// Store-and-forward entries copied.
    pub queued_entries: u64,
    /// Entries of the events endpoint's log.
    #[serde(default)]
    pub events_entries: u64,
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
        events_entries: 0,
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
    // The events endpoint's log after the checkpoints: a checkpoint in the copy never
    // points past what the copy holds.
    report.events_entries = hub
        .events
        .log()
        .backup(&dest.join(crate::data_dir::EVENTS_DIR))
        .map_err(|e| BackupError::Queues(e.to_string()))?;

    // Files beside the stores: the admin token, generated TLS files, image contents (written
    // before their rows, so every image the snapshot names is there).
    let data = &hub.config.data_dir;
    let token = data.join(ADMIN_TOKEN_FILE);
    if token.exists() {
        std::fs::copy(&token, dest.join(ADMIN_TOKEN_FILE)).map_err(io("copying", &token))?;
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
