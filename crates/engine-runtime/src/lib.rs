//! Run one llama-server: the deterministic flag profile, ports, spawn,
//! readiness, typed run files with process identity, the pool lock, stop,
//! and a supervisor that restarts a crashed or hung engine.
//!
//! * [`lifecycle`]: spawn, readiness, run files, stop (re-exports the two below).
//! * [`flags`]: the deterministic flag profile, `extra_args` and environment allow-lists, [`PreparedEngine`].
//! * [`run_state`]: a pool's run files and lock, who keeps it, stale files.
//! * [`supervisor`]: one thread owns the child; restart with backoff; give up for good.

pub mod flags;
pub mod lifecycle;
pub mod run_state;
pub mod sandbox;
pub mod supervisor;

pub use flags::PreparedEngine;
pub use lifecycle::EngineError;
pub use run_state::RunPaths;
pub use supervisor::{EngineState, RestartPolicy, StateHandle, Supervisor};
