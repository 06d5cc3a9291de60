//! GGUF header reader: magic, version, key/values and tensor infos, never
//! the tensor data. Enough to tell the engine side what a model is.

use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path} is not a GGUF model file (magic bytes {magic:?}, expected \"GGUF\"); llama.cpp only loads GGUF: convert it with llama.cpp's convert_hf_to_gguf.py")]
    NotGguf { path: String, magic: String },
    #[error("{path}: unsupported GGUF version {version} (1 is obsolete; re-convert the model)")]
    Version { path: String, version: u32 },
    #[error("{path}: corrupt GGUF header: {why}")]
    Corrupt { path: String, why: String },
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// Arrays are summarized (type and length), not kept.
    Array {
        array_len: u64,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct GgufHeader {
    pub version: u32,
    pub tensor_count: u64,
    pub kv: BTreeMap<String, Value>,
    pub n_params: u64,
}

impl GgufHeader {
    pub fn str(&self, k: &str) -> Option<&str> {
        match self.kv.get(k) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
    pub fn uint(&self, k: &str) -> Option<u64> {
        match self.kv.get(k) {
            Some(Value::UInt(u)) => Some(*u),
            Some(Value::Int(i)) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }
    pub fn arch(&self) -> Option<&str> {
        self.str("general.architecture")
    }
    pub fn ctx_max(&self) -> Option<u64> {
        self.uint(&format!("{}.context_length", self.arch()?))
    }
    pub fn quant(&self) -> Option<String> {
        self.uint("general.file_type").map(file_type_name)
    }
}

/// llama.cpp's `llama_ftype` names.
pub fn file_type_name(t: u64) -> String {
    match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4",
        _ => return format!("ftype-{t}"),
    }
    .to_string()
}

/// Limits that no real model comes near (llama.cpp: at most 4 dimensions;
/// the largest vocabularies have a few hundred thousand entries), so a
/// hostile header fails fast with "corrupt GGUF header" instead of a stack
/// overflow, a huge allocation or a loop over 2^64 entries.
const MAX_KVS: u64 = 1 << 16;
const MAX_TENSORS: u64 = 1 << 20;
const MAX_DIMS: u32 = 8;
const MAX_ARRAY_LEN: u64 = 1 << 26;
const MAX_STRING: u64 = 1 << 24;
/// An array may hold arrays, which may not hold arrays.
const MAX_ARRAY_DEPTH: u32 = 2;

struct R<T: Read> {
    r: T,
    path: String,
}

impl<T: Read> R<T> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| GgufError::Corrupt {
            path: self.path.clone(),
            why: format!("truncated ({e})"),
        })?;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn corrupt(&self, why: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.clone(),
            why,
        }
    }
    fn count(&mut self, what: &str, max: u64) -> Result<u64, GgufError> {
        let n = self.u64()?;
        if n > max {
            return Err(self.corrupt(format!("{what} {n} (at most {max})")));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.count("string of bytes", MAX_STRING)?;
        // Read what is there, never allocate what the header merely claims.
        let mut b = Vec::new();
        (&mut self.r)
            .take(n)
            .read_to_end(&mut b)
            .map_err(|e| self.corrupt(format!("unreadable string ({e})")))?;
        if b.len() as u64 != n {
            return Err(self.corrupt(format!("truncated string ({} of {n} bytes)", b.len())));
        }
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn value(&mut self, ty: u32) -> Result<Value, GgufError> {
        self.value_at(ty, 0)
    }
    fn value_at(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::UInt(self.bytes::<1>()?[0] as u64),
            1 => Value::Int(self.bytes::<1>()?[0] as i8 as i64),
            2 => Value::UInt(u16::from_le_bytes(self.bytes()?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => Value::UInt(self.u32()? as u64),
            5 => Value::Int(i32::from_le_bytes(self.bytes()?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(
                        self.corrupt(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"))
                    );
                }
                let inner = self.u32()?;
                let n = self.count("array of entries", MAX_ARRAY_LEN)?;
                for _ in 0..n {
                    self.value_at(inner, depth + 1)?;
                }
                Value::Array { array_len: n }
            }
            10 => Value::UInt(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.bytes()?)),
            12 => Value::Float(f64::from_le_bytes(self.bytes()?)),
            t => {
                return Err(GgufError::Corrupt {
                    path: self.path.clone(),
                    why: format!("unknown value type {t}"),
                })
            }
        })
    }
}

/// Read the header of the GGUF file at `path`.
pub fn read_header(path: &Path) -> Result<GgufHeader, GgufError> {
    let p = path.display().to_string();
    let f = fs_err::File::open(path).map_err(|e| GgufError::Corrupt {
        path: p.clone(),
        why: e.to_string(),
    })?;
    parse(BufReader::with_capacity(1 << 16, f), p)
}

/// Parse a GGUF header from bytes (`name` labels errors).
pub fn parse_header(bytes: &[u8], name: &str) -> Result<GgufHeader, GgufError> {
    parse(bytes, name.to_string())
}

fn parse(reader: impl Read, p: String) -> Result<GgufHeader, GgufError> {
    let mut r = R {
        r: reader,
        path: p.clone(),
    };
    let magic = r.bytes::<4>().map_err(|_| GgufError::NotGguf {
        path: p.clone(),
        magic: "<file shorter than 4 bytes>".into(),
    })?;
    if &magic != b"GGUF" {
        return Err(GgufError::NotGguf {
            path: p,
            magic: String::from_utf8_lossy(&magic).into_owned(),
        });
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version { path: p, version });
    }
    let tensor_count = r.count("tensor count", MAX_TENSORS)?;
    let kv_count = r.count("key/value count", MAX_KVS)?;
    let mut kv = BTreeMap::new();
    for _ in 0..kv_count {
        let k = r.string()?;
        let ty = r.u32()?;
        let v = r.value(ty)?;
        kv.insert(k, v);
    }
    let mut n_params: u64 = 0;
    for _ in 0..tensor_count {
        let _name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > MAX_DIMS {
            return Err(r.corrupt(format!(
                "tensor with {n_dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let mut n: u64 = 1;
        for _ in 0..n_dims {
            n = n.saturating_mul(r.u64()?);
        }
        let _ty = r.u32()?;
        let _off = r.u64()?;
        n_params = n_params.saturating_add(n);
    }
    Ok(GgufHeader {
        version,
        tensor_count,
        kv,
        n_params,
    })
}

/// Key/values of a GGUF file as raw bytes (key, value type, encoded value),
/// for copying a tokenizer into another file.
pub fn read_raw_kvs(path: &Path) -> Result<Vec<(String, u32, Vec<u8>)>, GgufError> {
    struct Tee<T: Read> {
        inner: T,
        rec: Vec<u8>,
    }
    impl<T: Read> Read for Tee<T> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.rec.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }
    let p = path.display().to_string();
    let f = fs_err::File::open(path).map_err(|e| GgufError::Corrupt {
        path: p.clone(),
        why: e.to_string(),
    })?;
    let mut r = R {
        r: Tee {
            inner: BufReader::new(f),
            rec: Vec::new(),
        },
        path: p.clone(),
    };
    if &r.bytes::<4>()? != b"GGUF" {
        return Err(GgufError::NotGguf {
            path: p,
            magic: "?".into(),
        });
    }
    let _version = r.u32()?;
    let _tensors = r.u64()?;
    let kv_count = r.count("key/value count", MAX_KVS)?;
    let mut out = Vec::new();
    for _ in 0..kv_count {
        let k = r.string()?;
        let ty = r.u32()?;
        r.r.rec.clear();
        r.value(ty)?;
        out.push((k, ty, std::mem::take(&mut r.r.rec)));
    }
    Ok(out)
}
