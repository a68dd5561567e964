//! What every durable store's error type shares: redb and JSON failures become its
//! `Store(String)` variant, so callers handle one "the store failed" case, with the reason.

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
