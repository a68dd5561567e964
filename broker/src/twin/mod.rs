//! Device and module twins: the document rules ([`doc`]), durable storage with group commit
//! ([`store`]), and the JSON views the API and devices get ([`view`]).

pub mod doc;
pub mod node;
pub mod store;
pub mod view;

pub use doc::{PatchError, Twin};
pub use store::{Applied, TwinError, TwinOp, TwinStore};
