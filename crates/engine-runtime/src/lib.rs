//! Run one llama-server: the deterministic flag profile, ports, spawn,
//! readiness, typed run files with process identity, the pool lock, stop,
//! and a supervisor that restarts a crashed or hung engine.
//!
//! * [`lifecycle`]: flags, environment policy, spawn, readiness, run files, stop.
//! * [`supervisor`]: one thread owns the child; restart with backoff; give up for good.

pub mod lifecycle;
pub mod supervisor;

pub use lifecycle::{EngineError, PreparedEngine, RunPaths};
pub use supervisor::{EngineState, RestartPolicy, StateHandle, Supervisor};
