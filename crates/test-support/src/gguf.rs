//! Small valid GGUF files: a header that `model_provisioner::gguf` and the
//! store accept, padded to any size.

/// A valid GGUF v3 (arch llama, context 4096, F16, no tensors) padded to
/// `size` bytes with a pattern that `salt` changes (so two salts give two
/// digests).
pub fn tiny_gguf(size: usize, salt: u8) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"GGUF");
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes()); // tensors
    v.extend_from_slice(&3u64.to_le_bytes()); // kvs
    let s = |v: &mut Vec<u8>, x: &str| {
        v.extend_from_slice(&(x.len() as u64).to_le_bytes());
        v.extend_from_slice(x.as_bytes());
    };
    s(&mut v, "general.architecture");
    v.extend_from_slice(&8u32.to_le_bytes());
    s(&mut v, "llama");
    s(&mut v, "llama.context_length");
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&4096u32.to_le_bytes());
    s(&mut v, "general.file_type");
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    let mut i = 0u32;
    while v.len() < size {
        v.push((i.wrapping_mul(2654435761) >> 24) as u8 ^ salt);
        i += 1;
    }
    v
}
