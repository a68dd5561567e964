//! What every durable store shares: redb and JSON failures become its error type's
//! `Store(String)` variant, so callers handle one "the store failed" case, with the reason;
//! and group commit, where one writer thread takes what is waiting as one batch.

/// `impl From<…> for $t` for redb's errors and `serde_json::Error`, each mapped to
/// `$t::Store(message)`; more error types may be listed after the type.
macro_rules! store_errors {
    ($t:ident $(, $extra:ty)*) => {
        $crate::storage::store_errors!(@each $t;
            redb::DatabaseError, redb::TransactionError, redb::TableError,
            redb::StorageError, redb::CommitError, serde_json::Error $(, $extra)*);
    };
    (@each $t:ident; $($e:ty),*) => {$(
        impl From<$e> for $t {
            fn from(e: $e) -> Self {
                $t::Store(e.to_string())
            }
        }
    )*};
}
pub(crate) use store_errors;

/// Waits for the next job and takes up to `max` in all, everything already waiting: the
/// batch a group-committing writer applies in one transaction. `None` once every sender is
/// gone.
pub(crate) fn next_batch<T>(rx: &std::sync::mpsc::Receiver<T>, max: usize) -> Option<Vec<T>> {
    let mut batch = vec![rx.recv().ok()?];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// The main store (`fleethub.redb`, shared by registry, twins, fleet, images, C2D, sessions
/// and deployments) with a free-space floor on writes. redb treats a failed write (ENOSPC)
/// as fatal for the open database: every later transaction fails until it is re-opened, so
/// one write on a full disk would lock devices out of their twins until a restart. Below
/// the floor a write is refused before redb sees it, with a message that says why, and the
/// store works again by itself once there is room. Everything else is redb's (`Deref`).
pub struct Store {
    db: redb::Database,
    dir: std::path::PathBuf,
    floor: std::sync::atomic::AtomicU64,
    refused: std::sync::OnceLock<prometheus::IntCounter>,
}

/// The start of every refusal's message, so the edges (API 507, MQTT twin 503) can tell a
/// full disk from a broken store.
pub const DISK_FULL: &str = "the disk holding the data directory is full";

impl Store {
    pub fn new(db: redb::Database, dir: &std::path::Path) -> Store {
        Store {
            db,
            dir: dir.to_path_buf(),
            floor: std::sync::atomic::AtomicU64::new(0),
            refused: std::sync::OnceLock::new(),
        }
    }

    /// Creates or opens a store at `path` with no floor (tests and tools).
    pub fn create(path: &std::path::Path) -> Result<Store, redb::DatabaseError> {
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        Ok(Store::new(redb::Database::create(path)?, dir))
    }

    /// Writes are refused while fewer than `bytes` are free (0: never).
    pub fn set_floor(&self, bytes: u64) {
        self.floor
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where refusals are counted (`fleethub_store_writes_refused_total`).
    pub fn count_refusals_in(&self, counter: prometheus::IntCounter) {
        let _ = self.refused.set(counter);
    }

    /// A write transaction, unless the disk is below the floor: then an I/O error of kind
    /// `StorageFull` whose message starts with [`DISK_FULL`], and redb is not touched.
    // redb's own error type, so every store's `?` is unchanged.
    #[allow(clippy::result_large_err)]
    pub fn begin_write(&self) -> Result<redb::WriteTransaction, redb::TransactionError> {
        let floor = self.floor.load(std::sync::atomic::Ordering::Relaxed);
        if floor > 0 {
            if let Some(free) = fleethub_router::queue::free_bytes(&self.dir) {
                if free < floor {
                    if let Some(c) = self.refused.get() {
                        c.inc();
                    }
                    return Err(redb::TransactionError::Storage(redb::StorageError::Io(
                        std::io::Error::new(
                            std::io::ErrorKind::StorageFull,
                            format!("{DISK_FULL}: {free} bytes free, below the floor of {floor} (half of [store_and_forward] min_free_bytes); writes are refused until there is room"),
                        ),
                    )));
                }
            }
        }
        self.db.begin_write()
    }
}

impl std::ops::Deref for Store {
    type Target = redb::Database;

    fn deref(&self) -> &redb::Database {
        &self.db
    }
}

/// Whether a store error's message says the disk is full: refused at the floor, ENOSPC from
/// the file system, or redb refusing after such a failure.
pub fn is_disk_full(message: &str) -> bool {
    message.contains(DISK_FULL)
        || message.contains("No space left on device")
        || message.contains("Previous I/O error")
}

/// What a store's error type converts from, so [`JsonTable`] can answer in it.
pub(crate) trait StoreErrors:
    From<redb::DatabaseError>
    + From<redb::TransactionError>
    + From<redb::TableError>
    + From<redb::StorageError>
    + From<redb::CommitError>
    + From<serde_json::Error>
{
}

impl<E> StoreErrors for E where
    E: From<redb::DatabaseError>
        + From<redb::TransactionError>
        + From<redb::TableError>
        + From<redb::StorageError>
        + From<redb::CommitError>
        + From<serde_json::Error>
{
}

/// A redb table of JSON values under string keys: how the registry, fleet, images,
/// deployments and sessions keep their records. Opening creates the table, so a new data
/// directory and an old one read the same way.
pub(crate) struct JsonTable<V> {
    def: redb::TableDefinition<'static, &'static str, &'static [u8]>,
    _value: std::marker::PhantomData<fn() -> V>,
}

impl<V: serde::Serialize + serde::de::DeserializeOwned> JsonTable<V> {
    pub(crate) const fn new(name: &'static str) -> Self {
        JsonTable {
            def: redb::TableDefinition::new(name),
            _value: std::marker::PhantomData,
        }
    }

    /// The raw table, for a writer that handles a batch of many rows in one open table.
    pub(crate) fn raw(&self) -> redb::TableDefinition<'static, &'static str, &'static [u8]> {
        self.def
    }

    /// Creates the table if it is missing and reads every row, in key order.
    pub(crate) fn load<E: StoreErrors>(&self, db: &redb::Database) -> Result<Vec<(String, V)>, E> {
        use redb::ReadableTable;
        let tx = db.begin_write()?;
        tx.open_table(self.def)?;
        tx.commit()?;
        let tx = db.begin_read()?;
        let table = tx.open_table(self.def)?;
        let mut rows = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            rows.push((k.value().to_string(), serde_json::from_slice(v.value())?));
        }
        Ok(rows)
    }

    /// One row, read now.
    pub(crate) fn get<E: StoreErrors>(
        &self,
        db: &redb::Database,
        key: &str,
    ) -> Result<Option<V>, E> {
        let tx = db.begin_read()?;
        let table = tx.open_table(self.def)?;
        let found = table.get(key)?;
        Ok(match found {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }

    /// Writes one row inside `tx` (the caller commits, so several rows commit as one).
    pub(crate) fn put<E: StoreErrors>(
        &self,
        tx: &redb::WriteTransaction,
        key: &str,
        value: &V,
    ) -> Result<(), E> {
        tx.open_table(self.def)?
            .insert(key, serde_json::to_vec(value)?.as_slice())?;
        Ok(())
    }

    /// Removes one row inside `tx`.
    pub(crate) fn remove<E: StoreErrors>(
        &self,
        tx: &redb::WriteTransaction,
        key: &str,
    ) -> Result<(), E> {
        tx.open_table(self.def)?.remove(key)?;
        Ok(())
    }
}
