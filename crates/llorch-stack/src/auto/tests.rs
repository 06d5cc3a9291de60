//! `auto`'s rule against hostile sizes and recorded tables.

use super::*;
use llorch_profile::{Auto, Mode};

pub(crate) fn gpu(budget_mib: u64) -> Device {
    Device {
        name: "cuda-sm90-81559MiB".into(),
        cuda: true,
        budget_mib,
        cores: 16,
        mps: true,
    }
}

fn batched(slots: Option<u32>, replicas: Option<u32>) -> Concurrency {
    Concurrency {
        mode: Mode::Batched,
        slots: slots.unwrap_or(1),
        replicas: replicas.unwrap_or(1),
        auto: Auto {
            slots: slots.is_none(),
            replicas: replicas.is_none(),
        },
        ..Default::default()
    }
}

const M: ModelNeeds = ModelNeeds {
    file_mib: 2100,
    kv_mib_per_slot: 88.0,
};

/// A table of rows at 64 clients: (slots, engines, tok/s, fairness).
pub(crate) fn table(rows: &[(u32, u32, f64, f64)]) -> TuneTable {
    let at64: Vec<_> = rows.iter().map(|&(s, k, t, f)| (s, k, 64, t, f)).collect();
    table_at(&at64)
}

/// A table of (slots, engines, clients, tok/s, fairness).
pub(crate) fn table_at(rows: &[(u32, u32, u32, f64, f64)]) -> TuneTable {
    TuneTable::new(
        "f".repeat(64).as_str(),
        "m".repeat(64).as_str(),
        &gpu(0),
        256,
        rows.iter()
            .map(
                |&(slots, replicas, clients, tok_per_s, fairness)| crate::auto_table::TuneRow {
                    slots,
                    replicas,
                    args: Vec::new(),
                    clients,
                    tok_per_s,
                    ttft_ms_p99: 100.0,
                    fairness,
                },
            )
            .collect(),
    )
}

#[test]
fn without_a_table_one_engine_gets_the_slots_that_fit() {
    let c = choose(&batched(None, None), &gpu(70_000), &M, None, &[]).unwrap();
    assert_eq!((c.slots, c.replicas), (MAX_AUTO_SLOTS, 1));
    // 2100 + 768 + s × 88 ≤ 4000: s = 12.
    let c = choose(&batched(None, None), &gpu(4000), &M, None, &[]).unwrap();
    assert_eq!((c.slots, c.replicas), (12, 1));
    let cpu = Device {
        name: "cpu-2c".into(),
        cuda: false,
        budget_mib: 16_000,
        cores: 2,
        mps: false,
    };
    let c = choose(&batched(None, None), &cpu, &M, None, &[]).unwrap();
    assert_eq!((c.slots, c.replicas), (2, 1));
    // A fixed count is kept; the other fits around it.
    let c = choose(&batched(None, Some(2)), &gpu(8000), &M, None, &[]).unwrap();
    assert_eq!(c.replicas, 2);
    assert!(2.0 * engine_mib(&gpu(8000), &M, c.slots) <= 8000.0);
}

#[test]
fn available_memory_is_read_from_meminfo_strictly() {
    let m = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
    assert_eq!(mem_available_kib(m), Some(20_000_000));
    for bad in [
        "MemTotal: 1 kB\n",
        "MemAvailable: lots kB\n",
        "MemAvailable: 5\n",
    ] {
        assert_eq!(mem_available_kib(bad), None, "{bad}");
    }
    let d = measure_device(false, &[], &llorch_io::gpu::GpuProbe::default()).unwrap();
    assert!(!d.cuda && d.budget_mib > 0 && d.cores >= 1, "{d:?}");
    assert!(d.name.starts_with("cpu-"));
}

#[test]
fn hostile_sizes_are_refused_with_the_numbers() {
    for (budget, m) in [
        (0, M),
        (2000, M),
        (
            70_000,
            ModelNeeds {
                file_mib: 100,
                kv_mib_per_slot: 1e12,
            },
        ),
    ] {
        let e = choose(&batched(None, None), &gpu(budget), &m, None, &[]).unwrap_err();
        assert!(matches!(e, AutoError::NoRoom { .. }), "{e}");
        assert!(e.to_string().contains("MiB"), "{e}");
    }
    let e = choose(&batched(Some(256), Some(64)), &gpu(70_000), &M, None, &[]).unwrap_err();
    assert!(matches!(e, AutoError::FixedDoesNotFit { .. }), "{e}");
}

#[test]
fn a_table_chooses_the_best_fair_configuration_that_fits() {
    let t = table(&[
        (64, 1, 4000.0, 1.0),
        (16, 4, 10_500.0, 0.95),
        (8, 8, 9000.0, 0.99),
        (32, 2, 12_000.0, 0.5),
    ]);
    let c = choose(&batched(None, None), &gpu(70_000), &M, Some(&t), &[]).unwrap();
    assert_eq!((c.slots, c.replicas), (16, 4), "{}", c.why);
    assert!(
        c.why.contains("64 clients 10500 tok/s (1.00 of the best)"),
        "{}",
        c.why
    );
    // Four engines do not fit 10 GB: the best that does.
    let c = choose(&batched(None, None), &gpu(10_000), &M, Some(&t), &[]).unwrap();
    assert_eq!((c.slots, c.replicas), (64, 1), "{}", c.why);
    // A fixed count restricts the rows.
    let c = choose(&batched(None, Some(8)), &gpu(70_000), &M, Some(&t), &[]).unwrap();
    assert_eq!((c.slots, c.replicas), (8, 8));
}

#[test]
fn a_table_chooses_the_configuration_nearest_the_best_at_every_client_count() {
    // As measured on an H100 (docs/gpu.md): four 16-slot engines lead at
    // 64 clients but not at 16; two 32-slot engines are near both.
    let t = table_at(&[
        (64, 1, 16, 3567.0, 0.99),
        (64, 1, 64, 3580.0, 0.98),
        (16, 4, 16, 3813.0, 0.99),
        (16, 4, 64, 10_650.0, 0.99),
        (32, 2, 16, 4350.0, 0.98),
        (32, 2, 64, 10_100.0, 0.97),
        (8, 2, 16, 4400.0, 0.99),
        // Two 8-slot engines queue 48 of 64 clients: unfair, never chosen.
        (8, 2, 64, 4500.0, 0.3),
    ]);
    let c = choose(&batched(None, None), &gpu(70_000), &M, Some(&t), &[]).unwrap();
    assert_eq!((c.slots, c.replicas), (32, 2), "{}", c.why);
    assert!(
        c.why.contains("16 clients 4350 tok/s (0.99 of the best)"),
        "{}",
        c.why
    );
    // Fixed at four engines: the best of those.
    let c = choose(&batched(None, Some(4)), &gpu(70_000), &M, Some(&t), &[]).unwrap();
    assert_eq!((c.slots, c.replicas), (16, 4));
    // No configuration fair at every count: the rule without a table, saying so.
    let t = table_at(&[(8, 1, 16, 3000.0, 0.99), (64, 1, 64, 3500.0, 0.5)]);
    let c = choose(&batched(None, None), &gpu(70_000), &M, Some(&t), &[]).unwrap();
    assert_eq!((c.slots, c.replicas), (MAX_AUTO_SLOTS, 1), "{}", c.why);
    // Ties go to more tokens/s at the largest count, then fewer engines; the
    // order of rows does not matter.
    let rows = [
        (16, 4, 16, 4000.0, 0.99),
        (16, 4, 64, 10_000.0, 0.99),
        (32, 2, 16, 4000.0, 0.99),
        (32, 2, 64, 10_000.0, 0.99),
        (8, 8, 16, 2000.0, 0.99),
        (8, 8, 64, 10_001.0, 0.99),
    ];
    let mut rev = rows;
    rev.reverse();
    let a = choose(
        &batched(None, None),
        &gpu(70_000),
        &M,
        Some(&table_at(&rows)),
        &[],
    )
    .unwrap();
    let b = choose(
        &batched(None, None),
        &gpu(70_000),
        &M,
        Some(&table_at(&rev)),
        &[],
    )
    .unwrap();
    assert_eq!((a.slots, a.replicas), (b.slots, b.replicas));
    assert_eq!((a.slots, a.replicas), (32, 2), "fewer engines: {}", a.why);
}

#[test]
fn a_table_row_measured_with_flags_is_chosen_with_them_unless_the_profile_sets_them() {
    let with = |args: &[&str], tok: f64| crate::auto_table::TuneRow {
        slots: 32,
        replicas: 4,
        args: args.iter().map(|a| a.to_string()).collect(),
        clients: 64,
        tok_per_s: tok,
        ttft_ms_p99: 100.0,
        fairness: 0.99,
    };
    let t = TuneTable::new(
        &"f".repeat(64),
        &"m".repeat(64),
        &gpu(0),
        256,
        vec![
            with(&[], 9000.0),
            with(&["--kv-unified"], 9500.0),
            // Within the noise of the profile's own flags: not worth a flag.
            with(&["--batch-size", "2048", "--ubatch-size", "2048"], 9100.0),
            with(&["--flash-attn", "off"], 4000.0),
        ],
    );
    let c = choose(&batched(None, None), &gpu(70_000), &M, Some(&t), &[]).unwrap();
    assert_eq!(c.args, ["--kv-unified"], "{}", c.why);
    assert!(c.why.contains("flags `unified-kv`"), "{}", c.why);
    // The profile sets the flag itself (any spelling): not auto's to choose.
    for own in [["-kvu"], ["--kv-unified"]] {
        let own: Vec<String> = own.iter().map(|a| a.to_string()).collect();
        let c = choose(&batched(None, None), &gpu(70_000), &M, Some(&t), &own).unwrap();
        assert!(c.args.is_empty(), "{}", c.why);
    }
    let own = vec!["-fa".to_string(), "on".to_string()];
    let c = choose(&batched(None, None), &gpu(70_000), &M, Some(&t), &own).unwrap();
    assert_eq!(c.args, ["--kv-unified"]);
    // Without the clear winner, the small gain of larger batches is noise.
    let own = vec!["--kv-unified".to_string()];
    let c = choose(&batched(None, None), &gpu(70_000), &M, Some(&t), &own).unwrap();
    assert!(c.args.is_empty(), "{}", c.why);
    // A row with flags no variant names is out of range: the table is refused.
    let mut bad = t.clone();
    bad.rows[0].args = vec!["--model".into(), "/etc/passwd".into()];
    let bad = TuneTable::new(&bad.fingerprint, &bad.model_digest, &gpu(0), 256, bad.rows);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.json");
    crate::auto_table::write_table(&p, &bad).unwrap();
    let (t, w) = crate::auto_table::read_table(&p, &"f".repeat(64), &"m".repeat(64), &gpu(0));
    assert!(t.is_none() && w.unwrap().contains("out of range"));
}
