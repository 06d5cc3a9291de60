//! How a pool serves many clients at once: exact replicas, or one batched
//! engine. Keys of a profile's `server` section and of a stack file's pool
//! (the stack's value wins).
//!
//! * `mode: exact` (default): every engine has one slot and no continuous
//!   batching, so the same request gives the same bytes whatever the load.
//!   Concurrency comes from `replicas: K` (K single-slot engines of the same
//!   build, model and flags), which pay off one per device.
//! * `mode: batched` with `slots: N`: one engine with N parallel slots,
//!   continuous batching and prompt-cache reuse. Faster on one device, but
//!   the same request can give different text under different load.
//! * `affinity: prefix` sends requests whose prompts share a prefix to the
//!   same replica while its load stays within a bound.
//! * `slots: auto` and `replicas: auto` (batched pools) are chosen when the
//!   pool starts, from the memory the device has, the model and its KV cache
//!   per slot, and what `bench tune` measured (`llorch_stack::auto`).

use serde::{Deserialize, Serialize};

/// Most parallel slots of one batched engine.
pub const MAX_SLOTS: u32 = 256;
/// Most replicas of one pool (their run ids are `<pool>.r1` … `<pool>.r63`).
pub const MAX_REPLICAS: u32 = llorch_types::MAX_REPLICA as u32 + 1;

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One slot per engine: byte-identical results whatever the load.
    #[default]
    Exact,
    /// N slots with continuous batching: results depend on load.
    Batched,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "exact" => Ok(Mode::Exact),
            "batched" => Ok(Mode::Batched),
            _ => Err("expected `exact` or `batched`".into()),
        }
    }
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exact => "exact",
            Mode::Batched => "batched",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    /// The replica with the fewest queued + running tasks.
    #[default]
    None,
    /// Requests sharing a prompt prefix go to one replica (consistent hashing with bounded load).
    Prefix,
}

impl std::str::FromStr for Affinity {
    type Err = String;
    fn from_str(s: &str) -> Result<Affinity, String> {
        match s {
            "none" => Ok(Affinity::None),
            "prefix" => Ok(Affinity::Prefix),
            _ => Err("expected `none` or `prefix`".into()),
        }
    }
}

impl Affinity {
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Prefix => "prefix",
        }
    }
}

/// A count as written: a number, or `auto` (chosen when the pool starts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    Fixed(u32),
    Auto,
}

impl std::str::FromStr for Count {
    type Err = String;
    fn from_str(s: &str) -> Result<Count, String> {
        match s {
            "auto" => Ok(Count::Auto),
            n => n
                .parse::<u32>()
                .map(Count::Fixed)
                .map_err(|_| "expected a positive number or `auto`".into()),
        }
    }
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Count::Fixed(n) => write!(f, "{n}"),
            Count::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for Count {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Count::Fixed(n) => s.serialize_u32(*n),
            Count::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a positive number or `auto`")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Count, E> {
                u32::try_from(v)
                    .map(Count::Fixed)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Count, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is negative: a positive number or `auto`")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Count, E> {
                match v {
                    "auto" => Ok(Count::Auto),
                    _ => Err(E::custom(format!(
                        "`{}`: a positive number or `auto`",
                        llorch_types::excerpt(v, 32)
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Which counts are still to be chosen when the pool starts (`auto`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Auto {
    pub slots: bool,
    pub replicas: bool,
}

impl Auto {
    pub fn any(self) -> bool {
        self.slots || self.replicas
    }
}

/// The resolved concurrency of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Concurrency {
    pub mode: Mode,
    /// Parallel slots of each engine (1 in exact mode; 1 until chosen when `auto.slots`).
    pub slots: u32,
    /// Engines of the pool (1 until chosen when `auto.replicas`).
    pub replicas: u32,
    pub affinity: Affinity,
    /// Counts written as `auto`, chosen when the pool starts.
    pub auto: Auto,
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            mode: Mode::Exact,
            slots: 1,
            replicas: 1,
            affinity: Affinity::None,
            auto: Auto::default(),
        }
    }
}

impl Concurrency {
    /// The keys that give this concurrency again (`auto` where it was).
    pub fn keys(self) -> ConcurrencyKeys {
        let count = |auto: bool, n: u32| if auto { Count::Auto } else { Count::Fixed(n) };
        ConcurrencyKeys {
            mode: Some(self.mode),
            slots: Some(count(self.auto.slots, self.slots)),
            replicas: Some(count(self.auto.replicas, self.replicas)),
            affinity: Some(self.affinity),
        }
    }
}

/// The four keys as written (a profile's `server`, or a stack file's pool).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConcurrencyKeys {
    pub mode: Option<Mode>,
    pub slots: Option<Count>,
    pub replicas: Option<Count>,
    pub affinity: Option<Affinity>,
}

impl ConcurrencyKeys {
    /// `self`'s values where given, else `under`'s.
    pub fn over(self, under: ConcurrencyKeys) -> ConcurrencyKeys {
        ConcurrencyKeys {
            mode: self.mode.or(under.mode),
            slots: self.slots.or(under.slots),
            replicas: self.replicas.or(under.replicas),
            affinity: self.affinity.or(under.affinity),
        }
    }

    /// Check and resolve; an error names the key (`slots`, `replicas`, …) and says why.
    pub fn resolve(self) -> Result<Concurrency, (&'static str, String)> {
        let mode = self.mode.unwrap_or_default();
        let mut auto = Auto::default();
        let slots = match (mode, self.slots) {
            (Mode::Exact, None | Some(Count::Fixed(1))) => 1,
            (Mode::Exact, Some(Count::Auto)) => {
                return Err((
                    "slots",
                    "slots: auto needs mode: batched (an exact engine has one slot)".into(),
                ))
            }
            (Mode::Exact, Some(Count::Fixed(n))) => {
                return Err((
                    "slots",
                    format!("slots is {n} but mode is exact (one slot per engine, so results never depend on load); set mode: batched for {n} slots in one engine, or replicas: {n} for exact concurrency"),
                ))
            }
            (Mode::Batched, None) => {
                return Err((
                    "slots",
                    "mode: batched needs slots: N (parallel sequences in the one engine, e.g. 4) or slots: auto"
                        .into(),
                ))
            }
            (Mode::Batched, Some(Count::Auto)) => {
                auto.slots = true;
                1
            }
            (Mode::Batched, Some(Count::Fixed(n))) if (1..=MAX_SLOTS).contains(&n) => n,
            (Mode::Batched, Some(Count::Fixed(n))) => {
                return Err((
                    "slots",
                    format!("slots is {n}; it must be from 1 to {MAX_SLOTS}"),
                ))
            }
        };
        let replicas = match self.replicas {
            None => 1,
            Some(Count::Auto) if mode == Mode::Batched => {
                auto.replicas = true;
                1
            }
            Some(Count::Auto) => {
                return Err((
                    "replicas",
                    "replicas: auto needs mode: batched (exact replicas pay off one per device: name how many)".into(),
                ))
            }
            Some(Count::Fixed(k)) if (1..=MAX_REPLICAS).contains(&k) => k,
            Some(Count::Fixed(k)) => {
                return Err((
                    "replicas",
                    format!("replicas is {k}; it must be from 1 to {MAX_REPLICAS}"),
                ))
            }
        };
        Ok(Concurrency {
            mode,
            slots,
            replicas,
            affinity: self.affinity.unwrap_or_default(),
            auto,
        })
    }
}

/// What stacking replicas on one device costs, measured (shown as a warning).
pub const STACKED_REPLICAS_COST: &str = "measured on one H200, four single-slot engines sharing the GPU gave 451 tokens/s in aggregate against 653 for one engine alone";

#[cfg(test)]
mod tests {
    use super::*;
    use Count::{Auto as A, Fixed as F};

    #[test]
    fn defaults_are_one_exact_slot_and_bad_values_name_their_key() {
        assert_eq!(
            ConcurrencyKeys::default().resolve().unwrap(),
            Concurrency::default()
        );
        let k = |mode, slots, replicas| ConcurrencyKeys {
            mode,
            slots,
            replicas,
            affinity: None,
        };
        let b = k(Some(Mode::Batched), Some(F(4)), None).resolve().unwrap();
        assert_eq!((b.mode, b.slots, b.replicas), (Mode::Batched, 4, 1));
        for (keys, key) in [
            (k(None, Some(F(4)), None), "slots"),
            (k(Some(Mode::Batched), None, None), "slots"),
            (k(Some(Mode::Batched), Some(F(0)), None), "slots"),
            (
                k(Some(Mode::Batched), Some(F(MAX_SLOTS + 1)), None),
                "slots",
            ),
            (k(None, None, Some(F(0))), "replicas"),
            (k(None, None, Some(F(MAX_REPLICAS + 1))), "replicas"),
            (k(None, Some(A), None), "slots"),
            (k(None, None, Some(A)), "replicas"),
        ] {
            assert_eq!(keys.resolve().unwrap_err().0, key, "{keys:?}");
        }
        // The stack's value wins over the profile's.
        let stack = k(None, None, Some(F(2)));
        let profile = k(Some(Mode::Batched), Some(F(8)), Some(F(4)));
        let r = stack.over(profile).resolve().unwrap();
        assert_eq!((r.mode, r.slots, r.replicas), (Mode::Batched, 8, 2));
        // `auto` is kept to be chosen at start, and survives a round trip.
        let a = k(Some(Mode::Batched), Some(A), Some(A)).resolve().unwrap();
        assert_eq!(
            a.auto,
            super::Auto {
                slots: true,
                replicas: true
            }
        );
        assert_eq!(a.keys().resolve().unwrap(), a);
    }

    #[test]
    fn counts_read_as_numbers_or_auto_and_nothing_else() {
        let read = |y: &str| serde_saphyr::from_str::<Count>(y);
        assert_eq!(read("4").unwrap(), F(4));
        assert_eq!(read("auto").unwrap(), A);
        for bad in ["-1", "\"4\"", "Auto", "4294967296", "1.5", "[]"] {
            assert!(read(bad).is_err(), "{bad}");
        }
        assert_eq!("auto".parse::<Count>().unwrap(), A);
        assert!("-3".parse::<Count>().is_err());
    }
}
