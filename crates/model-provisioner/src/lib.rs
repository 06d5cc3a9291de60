//! Model provisioning: refs → resumable, verified downloads → the
//! content-addressed store, GGUF metadata, provenance and eviction.

pub mod error;
pub mod gc;
pub mod gguf;
pub mod model_ref;
pub mod provenance;
pub mod registry;
pub mod sources;
pub mod store;
pub mod synthetic;

pub use gc::GcReport;
pub use model_ref::ModelRef;
pub use store::{FetchOptions, FetchOutcome, ModelMetadata, ModelStore};
