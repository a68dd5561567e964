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
