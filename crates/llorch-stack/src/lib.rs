//! Composition of the other crates, used by `cargo xtask serve`, `haiku`,
//! `bench` and the `orchestratord` wiring:
//!
//! * [`prepare`](mod@prepare): build + fetch + flags (everything but the process);
//! * [`provision`](mod@provision): a detached engine per pool, idempotent, under the pool lock;
//! * [`stack`]: a [`Stack`], pools (loaded at start or on demand, unloaded when idle;
//!   a pool's detached engine attached to) behind one orchestrator, in one process:
//!   the one composition shape, one profile being a stack of one pool;
//! * [`link`]: how each engine is linked to the orchestrator (supervised, attached, managed);
//! * [`mps`]: a pool's own NVIDIA MPS control daemon (`server.mps: own`).
//!
//! Which commands supervise and which start detached: `provision` and `engine up`
//! start detached (the engine outlives the command until `engine down`);
//! `serve`, `engine up --foreground`, `haiku` and `bench` supervise (the engine
//! is restarted when it crashes or hangs and dies with the command).

pub mod auto;
pub mod auto_table;
pub mod link;
pub mod mps;
pub mod prepare;
pub mod provision;
pub mod stack;

pub use link::{engine_info, ManagedLink, ProvisionedLink};
pub use prepare::{prepare, Prepared, ProvisionError};
pub use provision::{provision, ProvisionOutcome};
pub use stack::{start_pools, start_stack, PoolsOptions, Stack, StackError};
