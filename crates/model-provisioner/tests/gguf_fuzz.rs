//! The GGUF reader against hostile headers: depth and size limits, and a
//! randomized test that mutates a realistic header thousands of times (plus
//! the default model's real header when it is in the workspace cache) and
//! checks that reading never panics, never overflows the stack and never
//! allocates what a header merely claims. The seed is printed
//! (`LLORCH_FUZZ_SEED` replays it).

use model_provisioner::gguf::{parse_header, GgufError};
use rand::{Rng, SeedableRng};

fn s(v: &mut Vec<u8>, x: &str) {
    v.extend_from_slice(&(x.len() as u64).to_le_bytes());
    v.extend_from_slice(x.as_bytes());
}

/// A header with every value type, string and integer arrays, and tensors.
fn realistic() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"GGUF");
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&3u64.to_le_bytes()); // tensors
    v.extend_from_slice(&8u64.to_le_bytes()); // kvs
    s(&mut v, "general.architecture");
    v.extend_from_slice(&8u32.to_le_bytes());
    s(&mut v, "llama");
    s(&mut v, "llama.context_length");
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&4096u32.to_le_bytes());
    s(&mut v, "general.file_type");
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&3u32.to_le_bytes());
    s(&mut v, "llama.rope.freq_base");
    v.extend_from_slice(&6u32.to_le_bytes());
    v.extend_from_slice(&10000f32.to_le_bytes());
    s(&mut v, "general.quantized");
    v.extend_from_slice(&7u32.to_le_bytes());
    v.push(1);
    s(&mut v, "tokenizer.ggml.tokens");
    v.extend_from_slice(&9u32.to_le_bytes());
    v.extend_from_slice(&8u32.to_le_bytes());
    v.extend_from_slice(&64u64.to_le_bytes());
    for i in 0..64 {
        s(&mut v, &format!("tok{i}"));
    }
    s(&mut v, "tokenizer.ggml.token_type");
    v.extend_from_slice(&9u32.to_le_bytes());
    v.extend_from_slice(&5u32.to_le_bytes());
    v.extend_from_slice(&64u64.to_le_bytes());
    for i in 0..64i32 {
        v.extend_from_slice(&(i % 3).to_le_bytes());
    }
    s(&mut v, "general.size");
    v.extend_from_slice(&10u32.to_le_bytes());
    v.extend_from_slice(&123456789u64.to_le_bytes());
    for (name, dims) in [
        ("tok_embd", vec![576u64, 49152]),
        ("norm", vec![576]),
        ("out", vec![576, 49152]),
    ] {
        s(&mut v, name);
        v.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
    }
    v
}

fn corrupt(r: Result<model_provisioner::gguf::GgufHeader, GgufError>) -> String {
    match r {
        Err(GgufError::Corrupt { why, .. }) => why,
        other => panic!("not refused as corrupt: {other:?}"),
    }
}

#[test]
fn the_realistic_header_parses() {
    let h = parse_header(&realistic(), "t").unwrap();
    assert_eq!(h.arch(), Some("llama"));
    assert_eq!(h.ctx_max(), Some(4096));
    assert_eq!(h.tensor_count, 3);
    assert_eq!(h.n_params, 576 * 49152 * 2 + 576);
}

#[test]
fn deep_nesting_and_huge_counts_are_corrupt_not_a_crash() {
    // 100 000 nested arrays (1.2 MB): a recursive reader without a limit
    // overflows its stack here.
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    s(&mut v, "deep");
    v.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..100_000 {
        v.extend_from_slice(&9u32.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
    }
    assert!(corrupt(parse_header(&v, "t")).contains("nested"));

    let head = |tensors: u64, kvs: u64| {
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&tensors.to_le_bytes());
        v.extend_from_slice(&kvs.to_le_bytes());
        v
    };
    assert!(corrupt(parse_header(&head(0, u64::MAX), "t")).contains("key/value count"));
    assert!(corrupt(parse_header(&head(u64::MAX, 0), "t")).contains("tensor count"));
    // A string that claims 16 MB but has 3 bytes: no 16 MB allocation, just an error.
    let mut v = head(0, 1);
    v.extend_from_slice(&(1u64 << 24).to_le_bytes());
    v.extend_from_slice(b"abc");
    assert!(corrupt(parse_header(&v, "t")).contains("truncated string"));
    let mut v = head(0, 1);
    v.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(corrupt(parse_header(&v, "t")).contains("string"));
    // An array claiming 2^64 entries.
    let mut v = head(0, 1);
    s(&mut v, "a");
    v.extend_from_slice(&9u32.to_le_bytes());
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(corrupt(parse_header(&v, "t")).contains("array"));
    // A tensor with 2^32-1 dimensions.
    let mut v = head(1, 0);
    s(&mut v, "t");
    v.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(corrupt(parse_header(&v, "t")).contains("dimensions"));
}

#[test]
fn thousands_of_mutated_headers_never_panic() {
    let seed: u64 = std::env::var("LLORCH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("gguf fuzz seed {seed}");
    let mut seeds = vec![realistic()];
    // The default model's real header, when a test run already fetched it.
    let root = test_support::workspace_root();
    if let Ok(rd) = fs_err::read_dir(root.join("cache/models-v1/blobs")) {
        for e in rd.flatten().take(1) {
            use std::io::Read;
            let mut b = Vec::new();
            if let Ok(f) = fs_err::File::open(e.path()) {
                let _ = f.take(4 << 20).read_to_end(&mut b);
                seeds.push(b);
            }
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let interesting: [u64; 8] = [0, 1, 9, 255, 1 << 24, 1 << 32, u64::MAX / 2, u64::MAX];
    let mut outcomes = [0usize; 2];
    for n in 0..5000 {
        let mut v = seeds[n % seeds.len()].clone();
        let edits = rng.random_range(1..8);
        for _ in 0..edits {
            if v.len() < 8 {
                break;
            }
            let len = v.len().min(64 * 1024);
            match rng.random_range(0..5) {
                0 => {
                    let i = rng.random_range(0..len);
                    v[i] ^= 1 << rng.random_range(0..8);
                }
                1 => {
                    let i = rng.random_range(0..len.saturating_sub(8).max(1));
                    let x = interesting[rng.random_range(0..interesting.len())];
                    let end = (i + 8).min(v.len());
                    v[i..end].copy_from_slice(&x.to_le_bytes()[..end - i]);
                }
                2 => {
                    let i = rng.random_range(0..len);
                    let x = rng.random_range(0..13u32);
                    let end = (i + 4).min(v.len());
                    v[i..end].copy_from_slice(&x.to_le_bytes()[..end - i]);
                }
                3 => v.truncate(rng.random_range(0..=len)),
                _ => {
                    let i = rng.random_range(0..=len.min(v.len()));
                    let mut nest = Vec::new();
                    for _ in 0..rng.random_range(1..200) {
                        nest.extend_from_slice(&9u32.to_le_bytes());
                        nest.extend_from_slice(&1u64.to_le_bytes());
                    }
                    v.splice(i..i, nest);
                }
            }
        }
        match std::panic::catch_unwind(|| parse_header(&v, "fuzz")) {
            Ok(Ok(_)) => outcomes[0] += 1,
            Ok(Err(_)) => outcomes[1] += 1,
            Err(_) => panic!("the reader panicked on mutation {n} (seed {seed})"),
        }
    }
    eprintln!("parsed {}, refused {}", outcomes[0], outcomes[1]);
    assert!(outcomes[1] > 0);
}
