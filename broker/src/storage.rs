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
