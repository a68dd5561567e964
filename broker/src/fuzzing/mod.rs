//! A small mutation fuzzer on stable Rust for every parser that takes outside input, and the
//! targets it runs.
//!
//! `fleethub fuzz` (and `device-sim fuzz` for scenario files) mutates seed inputs (bit flips,
//! byte changes, insertions, deletions, repeats, splices, tokens of each language) and runs
//! each through its parser, catching any panic. A panicking input is written to
//! `fuzz/crashes/{target}/` and the run fails; the regression test replays every file of
//! `fuzz/corpus/{target}/` and `fuzz/crashes/{target}/` through its target, so a crash once
//! found stays fixed. There is no coverage feedback (that needs nightly instrumentation); the
//! seeds and dictionaries are what steer it into each grammar.

mod targets;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use targets::targets;

/// One parser under test.
pub struct Target {
    pub name: &'static str,
    /// Runs the input through the parser; must not panic.
    pub run: fn(&[u8]),
    /// Well-formed inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens of the input's language, spliced into inputs.
    pub dictionary: &'static [&'static str],
}

/// What a fuzzing run found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub inputs: u64,
    /// Inputs that panicked (as saved).
    pub crashes: Vec<(PathBuf, String)>,
    pub seconds: f64,
}

/// xorshift64*: fast, and a run is reproduced from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// A mutated copy of `input`: one to four changes.
pub fn mutate(input: &[u8], others: &[Vec<u8>], dictionary: &[&str], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                out.insert(i, rng.next_u64() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                out.drain(i..i + n);
            }
            4 if len > 0 => {
                // Repeat a stretch: nesting, long lists, length fields that lie.
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let piece = out[i..i + n].to_vec();
                let times = 1 + rng.below(64);
                for _ in 0..times {
                    out.splice(i..i, piece.iter().copied());
                }
            }
            5 if !dictionary.is_empty() => {
                let token = dictionary[rng.below(dictionary.len())].as_bytes();
                let i = rng.below(len + 1);
                out.splice(i..i, token.iter().copied());
            }
            6 if !others.is_empty() => {
                let other = &others[rng.below(others.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            7 if len > 0 => out.truncate(rng.below(len)),
            8 if len >= 4 => {
                // An interesting integer where a length or number may be.
                let i = rng.below(len - 3);
                let v: u32 = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, u32::MAX][rng.below(8)];
                out[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            _ => {}
        }
        if out.len() > 64 * 1024 {
            out.truncate(64 * 1024);
        }
    }
    out
}

/// Files of `dir`, as inputs.
pub fn read_dir(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect();
    out.sort();
    out
}

/// Runs `input` through `target`; the panic's message if it panicked. The panic hook is
/// expected to be silenced by the caller for the whole run.
pub fn run_one(target: &Target, input: &[u8]) -> Option<String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (target.run)(input)))
        .err()
        .map(|p| {
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into())
        })
}

/// Fuzzes `target` for `inputs` inputs from its seeds and `fuzz_dir/corpus/{name}`; panicking
/// inputs are saved under `fuzz_dir/crashes/{name}`. `progress` is called now and then with
/// the inputs run so far.
pub fn fuzz(
    target: &Target,
    inputs: u64,
    seed: u64,
    fuzz_dir: &Path,
    mut progress: impl FnMut(u64),
) -> Outcome {
    let started = Instant::now();
    let mut pool: Vec<Vec<u8>> = (target.seeds)();
    pool.extend(
        read_dir(&fuzz_dir.join("corpus").join(target.name))
            .into_iter()
            .map(|(_, b)| b),
    );
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng::new(seed);
    let mut outcome = Outcome::default();
    for n in 0..inputs {
        let base = &pool[rng.below(pool.len())];
        let input = mutate(base, &pool, target.dictionary, &mut rng);
        if let Some(message) = run_one(target, &input) {
            let dir = fuzz_dir.join("crashes").join(target.name);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("crash-{:016x}", rng.next_u64()));
            let _ = std::fs::write(&path, &input);
            outcome.crashes.push((path, message));
            if outcome.crashes.len() >= 20 {
                outcome.inputs = n + 1;
                break;
            }
        }
        // Now and then an input joins the pool, so mutations build on mutations.
        if rng.below(64) == 0 && input.len() < 4096 {
            if pool.len() < 4096 {
                pool.push(input);
            } else {
                let i = rng.below(pool.len());
                pool[i] = input;
            }
        }
        if n % 100_000 == 0 {
            progress(n);
        }
        outcome.inputs = n + 1;
    }
    std::panic::set_hook(previous);
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome
}

/// The `fuzz/` directory of the workspace.
pub fn workspace_fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every saved corpus input and every crash ever found runs through its target without
    /// a panic: a crash, once fixed, stays fixed.
    #[test]
    fn corpora_and_crashes_replay_without_a_panic() {
        let dir = workspace_fuzz_dir();
        let mut ran = 0;
        for target in targets() {
            for sub in ["corpus", "crashes"] {
                for (path, input) in read_dir(&dir.join(sub).join(target.name)) {
                    if let Some(message) = run_one(&target, &input) {
                        panic!("{} panics on {}: {message}", target.name, path.display());
                    }
                    ran += 1;
                }
            }
            for seed in (target.seeds)() {
                assert!(
                    run_one(&target, &seed).is_none(),
                    "{}: a seed panics",
                    target.name
                );
            }
        }
        assert!(ran > 0, "the corpora are in fuzz/corpus");
    }

    /// A short run of every target, as part of the test suite (the long runs are
    /// `fleethub fuzz`).
    #[test]
    fn a_short_run_of_every_target_finds_nothing() {
        let scratch =
            std::env::temp_dir().join(format!("fleethub-fuzz-{:x}", rand::random::<u64>()));
        for target in targets() {
            let outcome = fuzz(&target, 5_000, 7, &scratch, |_| {});
            assert!(
                outcome.crashes.is_empty(),
                "{}: {:?}",
                target.name,
                outcome.crashes
            );
        }
        let _ = std::fs::remove_dir_all(&scratch);
    }

    #[test]
    fn mutation_is_reproducible_from_the_seed() {
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| mutate(b"FROM /messages/* INTO $upstream", &[], &["AND"], &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }
}
