//! Value types every crate names, checked when they are parsed and free of
//! I/O, so a crate that only reads configuration (`llorch-profile`) needs
//! neither the network stack nor an OCI client: pool ids and their replicas'
//! run ids ([`PoolId`]), `oci://` references ([`OciRef`]), sha256 hex
//! digests and excerpts of hostile text for error messages. Each is named by
//! one path only: `llorch_types::Name` (the modules are private).

mod oci_ref;
mod pool;

pub use oci_ref::{BadOciRef, OciRef};
pub use pool::{BadPoolId, PoolId, MAX_REPLICA};

/// True for a 64-character lowercase hex string.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// At most `n` characters of `s`, with an ellipsis when cut (for error messages).
pub fn excerpt(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        out.push('…');
    }
    out.escape_debug().to_string()
}
