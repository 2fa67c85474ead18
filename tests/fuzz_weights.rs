//! A seeded, time-bounded mutation test of the weights loader: byte flips,
//! truncations, header lengths, and edits of the JSON header (offsets,
//! shapes, dtypes, duplicate names, non-UTF-8 bytes, wrong types). Every
//! mutated file must load or give an error value with a message, the same
//! one when loaded again; never a panic, a crash or an abort. The cases run
//! in child processes, in batches (a crash fails the batch, and the child's
//! last line names the case), each batch bounded in time.
//!
//! `PERCEPTUAL_LOSS_FUZZ_SECONDS` sets each batch's time in seconds (default 2) and
//! `PERCEPTUAL_LOSS_FUZZ_SEED` the first seed; `fuzz/` has a cargo-fuzz
//! target for longer, coverage-guided runs.

mod common;

use common::{assert_child_ok, in_child_with, is_child, Rng};
use perceptual_loss::{
    seeded_safetensors, DType, Device, Error, Vgg, VggArch, VggOptions, WeightsSource,
};
use std::time::{Duration, Instant};

/// Batches, each in its own child process.
const BATCHES: u64 = 4;

/// A valid file to mutate: VGG16's weights to relu2_2 only (a prefix file:
/// about 1 MB, so a case loads in about a millisecond).
fn base() -> Vec<u8> {
    let full = seeded_safetensors(VggArch::Vgg16, 11).unwrap();
    let n = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&full[8..8 + n]).unwrap();
    let data = &full[8 + n..];
    header.retain(|name, _| {
        name.split('.')
            .nth(1)
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i <= 7)
    });
    // Repack the kept tensors' bytes one after another.
    let mut names: Vec<String> = header.keys().cloned().collect();
    names.sort_by_key(|k| header[k]["data_offsets"][0].as_u64());
    let mut packed = Vec::new();
    for name in names {
        let offsets = &header[&name]["data_offsets"];
        let (b, e) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        let start = packed.len();
        packed.extend_from_slice(&data[b..e]);
        header[&name]["data_offsets"] = serde_json::json!([start, packed.len()]);
    }
    join(&serde_json::to_string(&header).unwrap(), &packed)
}

fn join(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

fn header_len(file: &[u8]) -> usize {
    u64::from_le_bytes(file[..8].try_into().unwrap()) as usize
}

/// A value to put where a number, a string or a list was.
fn odd_value(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    let choices = [
        json!(0),
        json!(-1),
        json!(u64::MAX),
        json!(1u64 << 62),
        json!(3.5),
        json!("F32"),
        json!("I8"),
        json!("F64"),
        json!(""),
        json!(null),
        json!([]),
        json!([0]),
        json!([0, 0, 0]),
        json!([1u64 << 40, 1u64 << 41]),
        json!({"dtype": "F32"}),
        json!([64, 3, 3, 3]),
        json!([u64::MAX, 2]),
    ];
    choices[rng.next_u64() as usize % choices.len()].clone()
}

/// One mutated file from `base`, chosen by `seed`.
fn mutate(base: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut file = base.to_vec();
    let n = header_len(base);
    let pick = |rng: &mut Rng, len: usize| (rng.next_u64() % len.max(1) as u64) as usize;
    match rng.next_u64() % 9 {
        // Byte flips, mostly in the header.
        0 | 1 => {
            for _ in 0..1 + rng.next_u64() % 8 {
                let at = if rng.next_u64().is_multiple_of(4) {
                    pick(&mut rng, file.len())
                } else {
                    pick(&mut rng, 8 + n)
                };
                file[at] ^= 1 << (rng.next_u64() % 8);
            }
        }
        // Truncation anywhere.
        2 => file.truncate(pick(&mut rng, file.len())),
        // The header length: off by a little, or anything.
        3 => {
            let len = match rng.next_u64() % 3 {
                0 => (n as i64 + (rng.next_u64() % 17) as i64 - 8).max(0) as u64,
                1 => rng.next_u64(),
                _ => file.len() as u64 - 8,
            };
            file[..8].copy_from_slice(&len.to_le_bytes());
        }
        // A field of a tensor given an odd value, or removed.
        4 | 5 => {
            let mut header: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&base[8..8 + n]).unwrap();
            let names: Vec<String> = header.keys().cloned().collect();
            let name = &names[pick(&mut rng, names.len())];
            let field = ["dtype", "shape", "data_offsets"][pick(&mut rng, 3)];
            match rng.next_u64() % 4 {
                0 => {
                    header[name].as_object_mut().unwrap().remove(field);
                }
                1 => header[name] = odd_value(&mut rng),
                _ => header[name][field] = odd_value(&mut rng),
            }
            file = join(&serde_json::to_string(&header).unwrap(), &base[8 + n..]);
        }
        // Another tensor's offsets.
        6 => {
            let mut header: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&base[8..8 + n]).unwrap();
            let names: Vec<String> = header.keys().cloned().collect();
            let (a, b) = (
                &names[pick(&mut rng, names.len())],
                &names[pick(&mut rng, names.len())],
            );
            let offsets = header[b]["data_offsets"].clone();
            header[a]["data_offsets"] = offsets;
            file = join(&serde_json::to_string(&header).unwrap(), &base[8 + n..]);
        }
        // A name given twice, or a tensor removed.
        7 => {
            let text = std::str::from_utf8(&base[8..8 + n]).unwrap();
            let header: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(text).unwrap();
            let names: Vec<&String> = header.keys().collect();
            let name = names[pick(&mut rng, names.len())];
            let edited = if rng.next_u64().is_multiple_of(2) {
                let entry = format!("{}:{},", serde_json::to_string(name).unwrap(), header[name]);
                text.replacen('{', &format!("{{{entry}"), 1)
            } else {
                let mut h = header.clone();
                h.remove(name);
                serde_json::to_string(&h).unwrap()
            };
            file = join(&edited, &base[8 + n..]);
        }
        // Bytes that are not UTF-8, or not JSON, inside the header.
        _ => {
            let at = 8 + pick(&mut rng, n);
            file[at] = [0xff, 0xc3, 0x80, b'"', b'}', 0][pick(&mut rng, 6)];
        }
    }
    file
}

/// Loads `file` and says how it went, as text to compare between loads.
fn outcome(file: &[u8]) -> String {
    let options = VggOptions {
        compute: DType::F32,
        ..Default::default()
    };
    match Vgg::load_with(&Device::cpu(), WeightsSource::Bytes(file), options) {
        Ok(vgg) => format!("loaded to module {}", vgg.depth()),
        Err(e) => {
            assert!(
                matches!(e, Error::InvalidWeights(_) | Error::OutOfMemory(_)),
                "an unexpected kind of error: {e}"
            );
            assert!(
                e.to_string().len() > 20,
                "a message that says something: {e}"
            );
            e.to_string()
        }
    }
}

fn seconds() -> u64 {
    std::env::var("PERCEPTUAL_LOSS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
}

fn first_seed() -> u64 {
    std::env::var("PERCEPTUAL_LOSS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// One batch (in a child): cases from its seed on until its time is up.
#[test]
fn fuzz_batch() {
    let Ok(batch) = std::env::var("PERCEPTUAL_LOSS_FUZZ_BATCH") else {
        return; // only in a child started by the test below
    };
    assert!(is_child("fuzz_batch"));
    let batch: u64 = batch.parse().unwrap();
    let base = base();
    assert!(
        outcome(&base).starts_with("loaded to module 9"),
        "the base file loads"
    );
    let deadline = Instant::now() + Duration::from_secs(seconds());
    let (mut cases, mut loaded) = (0u64, 0u64);
    let mut seed = first_seed() + batch * 1_000_000;
    while Instant::now() < deadline {
        // Unbuffered, so that after a crash the parent shows the case.
        eprintln!("case seed {seed}");
        let file = mutate(&base, seed);
        let first = std::panic::catch_unwind(|| outcome(&file))
            .unwrap_or_else(|_| panic!("seed {seed}: the loader panicked"));
        assert_eq!(
            outcome(&file),
            first,
            "seed {seed}: another outcome the second time"
        );
        loaded += first.starts_with("loaded") as u64;
        cases += 1;
        seed += 1;
    }
    // On a line of its own (the harness prints the test's name before it).
    println!("\nfuzz-result {batch} {cases} {loaded}");
}

#[test]
fn the_weights_loader_survives_mutated_files() {
    let mut total = 0;
    for batch in 0..BATCHES {
        let batch_var = batch.to_string();
        let out = in_child_with(
            "fuzz_batch",
            None,
            &[("PERCEPTUAL_LOSS_FUZZ_BATCH", &batch_var)],
        );
        let last_case = String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .find(|l| l.starts_with("case seed"))
            .unwrap_or("no case")
            .to_string();
        assert_child_ok(&out, &format!("fuzz batch {batch} (last: {last_case})"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let result = text.lines().find_map(|l| l.strip_prefix("fuzz-result "));
        let counts: Vec<u64> = result
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if let [_, cases, loaded] = counts[..] {
            println!("batch {batch}: {cases} mutated files, {loaded} of them loaded");
            total += cases;
        }
    }
    assert!(total >= 200 * BATCHES, "only {total} cases ran");
}

/// The mutations reach every kind of check (a test of the fuzzer itself):
/// a sample of cases gives many distinct messages and some loads.
#[test]
fn the_mutations_reach_many_checks() {
    let base = base();
    let mut messages = std::collections::BTreeSet::new();
    let mut loaded = 0;
    for seed in 0..300 {
        let o = outcome(&mutate(&base, seed));
        loaded += o.starts_with("loaded") as u32;
        // The message without its numbers: its kind.
        messages.insert(
            o.chars()
                .filter(|c| !c.is_ascii_digit())
                .collect::<String>(),
        );
    }
    assert!(
        messages.len() >= 25,
        "{} kinds: {messages:#?}",
        messages.len()
    );
    assert!(loaded > 0);
}
