//! The fixtures these tests use, from the test-support crate.
#![allow(unused_imports)]

pub use test_support::gguf::tiny_gguf;
pub use test_support::http::*;
