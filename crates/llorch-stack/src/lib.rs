//! Composition of the other crates, used by `cargo xtask serve`, `haiku`,
//! `bench` and the `orchestratord` wiring:
//!
//! * [`prepare`](mod@prepare): build + fetch + flags (everything but the process);
//! * [`provision`](mod@provision): a detached engine per pool, idempotent, under the pool lock;
//! * [`pools`]: a [`Stack`]: pools (loaded at start or on demand, unloaded when idle;
//!   a pool's detached engine attached to) behind one orchestrator, in one process;
//! * [`stack`]: how an engine is linked to the orchestrator, and one profile as a stack of one pool.
//!
//! Which commands supervise and which start detached: `provision` and `engine up`
//! start detached (the engine outlives the command until `engine down`);
//! `serve`, `engine up --foreground`, `haiku` and `bench` supervise (the engine
//! is restarted when it crashes or hangs and dies with the command).

pub mod pools;
pub mod prepare;
pub mod provision;
pub mod stack;

pub use pools::{start_pools, ManagedLink, PoolsOptions, Stack};
pub use prepare::{prepare, Prepared, ProvisionError};
pub use provision::{provision, ProvisionOutcome};
pub use stack::{engine_info, start_stack, ProvisionedLink, StackError, SupervisorLink};
