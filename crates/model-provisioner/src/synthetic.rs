//! Synthetic models: `synthetic:llama?embd=2048&layers=22&ff=5632&heads=32&kv_heads=4&seed=0`
//! writes a deterministic random-weight llama GGUF (F16 matrices, F32 norms)
//! with a real tokenizer copied from the vocab-only GGUF that ships in the
//! llama.cpp tree (`models/ggml-vocab-llama-spm.gguf`). It measures an engine
//! on new hardware without downloading weights; its output is noise.
//!
//! Same parameters → same bytes → same digest (no timestamps, fixed PRNG).
//!
//! The output rows of byte-fallback, control, unknown and unused tokens are
//! zero, so greedy decoding never picks them: the text is always valid UTF-8
//! (llama-server's output parser rejects stray partial UTF-8 bytes, which a
//! random model would otherwise produce) and generation is never cut short by
//! an end-of-sequence token.

use crate::error::ModelError;
use crate::model_ref::ModelRef;
use llorch_io::digest::HashingWriter;
use llorch_io::paths::Layout;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bumped whenever the bytes for given parameters would change.
pub const GENERATOR_VERSION: u32 = 2;
pub const VOCAB_FILE: &str = "models/ggml-vocab-llama-spm.gguf";
const ALIGN: u64 = 32;

#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub embd: u64,
    pub layers: u64,
    pub ff: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub ctx: u64,
    pub seed: u64,
}

/// A synthetic model ref whose parameters do not make a model.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("synthetic parameter {key}={value} is not a number")]
    NotNumber { key: String, value: String },
    #[error(
        "unknown synthetic parameter `{0}` (known: embd, layers, ff, heads, kv_heads, ctx, seed)"
    )]
    Unknown(String),
    #[error("synthetic parameter {name}={value} is out of range (at most {max})")]
    OutOfRange {
        name: &'static str,
        value: u64,
        max: u64,
    },
    #[error("synthetic parameter `{0}` is required and must be > 0")]
    Required(&'static str),
    #[error("embd must be a multiple of heads, and heads a multiple of kv_heads")]
    Heads,
    #[error("embd and ff must be multiples of 32")]
    NotMultipleOf32,
}

impl Shape {
    pub fn from_params(params: &[(String, String)]) -> Result<Shape, ShapeError> {
        let mut s = Shape {
            embd: 0,
            layers: 0,
            ff: 0,
            heads: 0,
            kv_heads: 0,
            ctx: 2048,
            seed: 0,
        };
        for (k, v) in params {
            let n: u64 = v.parse().map_err(|_| ShapeError::NotNumber {
                key: k.clone(),
                value: v.clone(),
            })?;
            match k.as_str() {
                "embd" => s.embd = n,
                "layers" => s.layers = n,
                "ff" => s.ff = n,
                "heads" => s.heads = n,
                "kv_heads" => s.kv_heads = n,
                "ctx" => s.ctx = n,
                "seed" => s.seed = n,
                other => return Err(ShapeError::Unknown(other.into())),
            }
        }
        for (name, v, max) in [
            ("embd", s.embd, 1u64 << 16),
            ("layers", s.layers, 1 << 10),
            ("ff", s.ff, 1 << 18),
            ("heads", s.heads, 1 << 10),
            ("kv_heads", s.kv_heads, 1 << 10),
            ("ctx", s.ctx, 1 << 24),
        ] {
            if v > max {
                return Err(ShapeError::OutOfRange {
                    name,
                    value: v,
                    max,
                });
            }
        }
        if s.kv_heads == 0 {
            s.kv_heads = s.heads;
        }
        for (name, v) in [
            ("embd", s.embd),
            ("layers", s.layers),
            ("ff", s.ff),
            ("heads", s.heads),
        ] {
            if v == 0 {
                return Err(ShapeError::Required(name));
            }
        }
        if !s.embd.is_multiple_of(s.heads) || !s.heads.is_multiple_of(s.kv_heads) {
            return Err(ShapeError::Heads);
        }
        if !s.embd.is_multiple_of(32) || !s.ff.is_multiple_of(32) {
            return Err(ShapeError::NotMultipleOf32);
        }
        Ok(s)
    }

    pub fn n_params(&self, vocab: u64) -> u64 {
        let kv = self.embd / self.heads * self.kv_heads;
        let per_layer = 2 * self.embd
            + 2 * self.embd * self.embd
            + 2 * self.embd * kv
            + 3 * self.embd * self.ff;
        2 * vocab * self.embd + self.embd + self.layers * per_layer
    }
}

/// Find the vocabulary file in a fetched llama.cpp tree under `cache/src-v1/`.
pub fn find_vocab(layout: &Layout) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LLORCH_SYNTHETIC_VOCAB") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = fs_err::read_dir(layout.bucket(llorch_io::paths::Bucket::Src))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .map(|d| d.join(VOCAB_FILE))
        .find(|p| p.is_file())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// f32 → IEEE half bits (round to nearest; values here are small and normal or zero).
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    if exp <= 0 {
        return sign;
    }
    if exp >= 31 {
        return sign | 0x7c00;
    }
    let mant = b & 0x7f_ffff;
    let mut h = sign as u32 | ((exp as u32) << 10) | (mant >> 13);
    if mant & 0x1000 != 0 {
        h += 1;
    }
    h as u16
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

enum Kv {
    Str(&'static str, String),
    U32(&'static str, u32),
    F32(&'static str, f32),
}

/// Write the synthetic model for `mref` to `out`; returns (sha256, size).
pub fn write(
    mref: &ModelRef,
    layout: &Layout,
    out: &Path,
    say: &dyn Fn(&str),
) -> Result<(String, u64), ModelError> {
    let ModelRef::Synthetic { params, .. } = mref else {
        return Err(ModelError::Synthetic {
            reference: mref.to_string(),
            why: "not a synthetic ref".into(),
        });
    };
    let shape = Shape::from_params(params).map_err(|e| ModelError::Synthetic {
        reference: mref.to_string(),
        why: e.to_string(),
    })?;
    let vocab_path = find_vocab(layout).ok_or_else(|| {
        ModelError::Synthetic {
            reference: mref.to_string(),
            why: format!(
                "needs the tokenizer in {VOCAB_FILE} of a llama.cpp tree, and none is in {}\n  hint: run `cargo xtask engine build` (or build from a source bundle) first, or set LLORCH_SYNTHETIC_VOCAB",
                layout.bucket(llorch_io::paths::Bucket::Src).display()
            ),
        }
    })?;
    let tok_kvs: Vec<(String, u32, Vec<u8>)> = crate::gguf::read_raw_kvs(&vocab_path)?
        .into_iter()
        .filter(|(k, _, _)| k.starts_with("tokenizer."))
        .collect();
    // Token types (llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    let token_types: Vec<i32> = tok_kvs
        .iter()
        .find(|(k, _, _)| k == "tokenizer.ggml.token_type")
        .map(|(_, _, raw)| parse_i32_array(raw))
        .unwrap_or_default();
    let vocab = crate::gguf::read_header(&vocab_path)?
        .kv
        .get("tokenizer.ggml.tokens")
        .and_then(|v| match v {
            crate::gguf::Value::Array { array_len } => Some(*array_len),
            _ => None,
        })
        .ok_or_else(|| ModelError::Synthetic {
            reference: mref.to_string(),
            why: format!("{}: no tokenizer.ggml.tokens", vocab_path.display()),
        })?;
    say(&format!(
        "writing synthetic llama model: {} parameters, vocab {vocab} from {}",
        shape.n_params(vocab),
        vocab_path.display()
    ));

    let tensors = tensor_list(&shape, vocab);
    let name = format!(
        "synthetic-llama-e{}-l{}-f{}-h{}-kv{}-s{}",
        shape.embd, shape.layers, shape.ff, shape.heads, shape.kv_heads, shape.seed
    );
    let kvs = vec![
        Kv::Str("general.architecture", "llama".into()),
        Kv::Str("general.name", name),
        Kv::U32("general.file_type", 1),
        Kv::U32("general.alignment", ALIGN as u32),
        Kv::U32("llama.context_length", shape.ctx as u32),
        Kv::U32("llama.embedding_length", shape.embd as u32),
        Kv::U32("llama.block_count", shape.layers as u32),
        Kv::U32("llama.feed_forward_length", shape.ff as u32),
        Kv::U32("llama.attention.head_count", shape.heads as u32),
        Kv::U32("llama.attention.head_count_kv", shape.kv_heads as u32),
        Kv::U32(
            "llama.rope.dimension_count",
            (shape.embd / shape.heads) as u32,
        ),
        Kv::U32("llama.vocab_size", vocab as u32),
        Kv::F32("llama.attention.layer_norm_rms_epsilon", 1e-5),
        Kv::F32("llama.rope.freq_base", 10000.0),
    ];
    let io = llorch_io::io;
    if let Some(p) = out.parent() {
        fs_err::create_dir_all(p).map_err(io("create downloads dir"))?;
    }
    let f = fs_err::File::create(out).map_err(io("create synthetic model"))?;
    let mut w = HashingWriter::new(std::io::BufWriter::with_capacity(4 << 20, f));
    write_gguf(&mut w, &kvs, &tok_kvs, &tensors)
        .and_then(|()| write_tensor_data(&mut w, &tensors, &token_types, shape.seed))
        .map_err(io("write synthetic model"))?;
    let size = w.written;
    let (bw, digest) = w.finish();
    bw.into_inner()
        .map_err(|e| llorch_io::IoError::new("flush synthetic model", e.into_error()))?
        .sync_all()
        .map_err(io("sync synthetic model"))?;
    Ok((digest, size))
}

/// The tensors of a llama model of this shape: (name, dims, f16?), in file order.
fn tensor_list(shape: &Shape, vocab: u64) -> Vec<(String, Vec<u64>, bool)> {
    let kv_dim = shape.embd / shape.heads * shape.kv_heads;
    // (name, dims, is_f16)
    let mut tensors: Vec<(String, Vec<u64>, bool)> =
        vec![("token_embd.weight".into(), vec![shape.embd, vocab], true)];
    for i in 0..shape.layers {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        tensors.push((b("attn_norm"), vec![shape.embd], false));
        tensors.push((b("attn_q"), vec![shape.embd, shape.embd], true));
        tensors.push((b("attn_k"), vec![shape.embd, kv_dim], true));
        tensors.push((b("attn_v"), vec![shape.embd, kv_dim], true));
        tensors.push((b("attn_output"), vec![shape.embd, shape.embd], true));
        tensors.push((b("ffn_norm"), vec![shape.embd], false));
        tensors.push((b("ffn_gate"), vec![shape.embd, shape.ff], true));
        tensors.push((b("ffn_down"), vec![shape.ff, shape.embd], true));
        tensors.push((b("ffn_up"), vec![shape.embd, shape.ff], true));
    }
    tensors.push(("output_norm.weight".into(), vec![shape.embd], false));
    tensors.push(("output.weight".into(), vec![shape.embd, vocab], true));

    tensors
}

/// GGUF v3's header: magic, version, counts, the model's and the
/// tokenizer's key-values, each tensor's info with its aligned offset.
fn write_gguf<W: std::io::Write>(
    w: &mut HashingWriter<W>,
    kvs: &[Kv],
    tok_kvs: &[(String, u32, Vec<u8>)],
    tensors: &[(String, Vec<u64>, bool)],
) -> std::io::Result<()> {
    w.write_all(b"GGUF")?;
    w.write_all(&3u32.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    w.write_all(&((kvs.len() + tok_kvs.len()) as u64).to_le_bytes())?;
    for kv in kvs {
        match kv {
            Kv::Str(k, v) => {
                put_str(w, k)?;
                w.write_all(&8u32.to_le_bytes())?;
                put_str(w, v)?;
            }
            Kv::U32(k, v) => {
                put_str(w, k)?;
                w.write_all(&4u32.to_le_bytes())?;
                w.write_all(&v.to_le_bytes())?;
            }
            Kv::F32(k, v) => {
                put_str(w, k)?;
                w.write_all(&6u32.to_le_bytes())?;
                w.write_all(&v.to_le_bytes())?;
            }
        }
    }
    for (k, ty, raw) in tok_kvs {
        put_str(w, k)?;
        w.write_all(&ty.to_le_bytes())?;
        w.write_all(raw)?;
    }
    let mut offset = 0u64;
    for (name, dims, f16) in tensors {
        put_str(w, name)?;
        w.write_all(&(dims.len() as u32).to_le_bytes())?;
        for d in dims {
            w.write_all(&d.to_le_bytes())?;
        }
        w.write_all(&(if *f16 { 1u32 } else { 0u32 }).to_le_bytes())?;
        w.write_all(&offset.to_le_bytes())?;
        let bytes = dims.iter().product::<u64>() * if *f16 { 2 } else { 4 };
        offset += bytes.div_ceil(ALIGN) * ALIGN;
    }
    Ok(())
}

/// The tensors' data after the header, each padded to [`ALIGN`]: f16
/// weights uniform in ±0.04 from a seeded generator (the output rows of
/// non-text tokens silenced), f32 norms of 1.
fn write_tensor_data<W: std::io::Write>(
    w: &mut HashingWriter<W>,
    tensors: &[(String, Vec<u64>, bool)],
    token_types: &[i32],
    seed: u64,
) -> std::io::Result<()> {
    let pad = |w: &mut HashingWriter<_>| -> std::io::Result<()> {
        let rem = w.written % ALIGN;
        if rem != 0 {
            w.write_all(&vec![0u8; (ALIGN - rem) as usize])?;
        }
        Ok(())
    };
    pad(w)?;
    let mut rng = Rng(seed ^ 0x6c6c_6f72_6368_0001);
    let mut chunk: Vec<u8> = Vec::with_capacity(1 << 20);
    for (name, dims, f16) in tensors {
        let n = dims.iter().product::<u64>();
        if name == "output.weight" {
            // One row of `embd` values per token; silenced rows for non-text tokens.
            for tok in 0..dims[1] {
                let silent = matches!(token_types.get(tok as usize), Some(2 | 3 | 5 | 6));
                chunk.clear();
                for _ in 0..dims[0] {
                    let r = rng.next();
                    let u = ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                    let v = if silent { 0.0 } else { u * 0.04 };
                    chunk.extend_from_slice(&f16_bits(v).to_le_bytes());
                }
                w.write_all(&chunk)?;
            }
        } else if *f16 {
            // Uniform in ±0.04: small enough to keep activations finite through many layers.
            let mut left = n;
            while left > 0 {
                chunk.clear();
                let take = left.min(1 << 18);
                for _ in 0..take {
                    let r = rng.next();
                    let u = ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                    chunk.extend_from_slice(&f16_bits(u * 0.04).to_le_bytes());
                }
                w.write_all(&chunk)?;
                left -= take;
            }
        } else {
            for _ in 0..n {
                w.write_all(&1.0f32.to_le_bytes())?;
            }
        }
        pad(w)?;
    }
    Ok(())
}

/// A raw GGUF array value of i32 (inner type 5) → its elements.
fn parse_i32_array(raw: &[u8]) -> Vec<i32> {
    if raw.len() < 12 || u32::from_le_bytes(raw[0..4].try_into().unwrap()) != 5 {
        return Vec::new();
    }
    let n = u64::from_le_bytes(raw[4..12].try_into().unwrap()) as usize;
    raw[12..]
        .chunks_exact(4)
        .take(n)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversion() {
        assert_eq!(f16_bits(1.0), 0x3c00);
        assert_eq!(f16_bits(-2.0), 0xc000);
        assert_eq!(f16_bits(0.0), 0);
        assert_eq!(f16_bits(0.5), 0x3800);
    }

    #[test]
    fn shape_validation() {
        let p = |s: &str| -> Vec<(String, String)> {
            s.split('&')
                .map(|kv| {
                    let (a, b) = kv.split_once('=').unwrap();
                    (a.into(), b.into())
                })
                .collect()
        };
        assert!(Shape::from_params(&p("embd=64&layers=2&ff=128&heads=4")).is_ok());
        assert!(Shape::from_params(&p("embd=64&layers=2&ff=128")).is_err());
        assert!(Shape::from_params(&p("embd=65&layers=2&ff=128&heads=5")).is_err());
        assert!(Shape::from_params(&p("embd=64&layers=2&ff=128&heads=4&bogus=1")).is_err());
        // Numbers that would overflow the parameter count are refused, not a panic.
        for bad in [
            "embd=4294967296&layers=1&ff=32&heads=1",
            "embd=64&layers=18446744073709551615&ff=128&heads=4",
            "embd=64&layers=2&ff=128&heads=4&ctx=18446744073709551615",
        ] {
            let e = Shape::from_params(&p(bad)).unwrap_err();
            assert!(matches!(e, ShapeError::OutOfRange { .. }), "{bad}: {e}");
        }
        let big = Shape::from_params(&p("embd=65536&layers=1024&ff=262144&heads=1024")).unwrap();
        assert!(big.n_params(1 << 20) > 0);
    }
}
