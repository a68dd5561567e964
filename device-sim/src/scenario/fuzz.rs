//! Scenario files as a fuzz target (`device-sim fuzz`): read, checked whole into a plan, and
//! the telemetry body template rendered, on any bytes.

use fleethub::fuzzing::Target;

use super::{Overrides, Scenario};

pub fn target() -> Target {
    Target {
        name: "scenario",
        run: |b| {
            let text = String::from_utf8_lossy(b);
            if let Ok(s) = toml::from_str::<Scenario>(&text) {
                let _ = s.plan(&Overrides::default());
            }
        },
        seeds: || {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/scenarios");
            let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter_map(|e| std::fs::read(e.path()).ok())
                        .collect()
                })
                .unwrap_or_default();
            seeds.sort();
            seeds
        },
        dictionary: &[
            "[telemetry]\n",
            "[fleet]\n",
            "[upstream]\n",
            "rate = ",
            "duration = ",
            "\"",
            "{{",
            "}}",
            "{{seq}}",
            "{{rand ",
            "/s",
            "/min",
            "s\"",
            "\n",
            " = ",
            "[[",
            "]]",
        ],
    }
}

#[cfg(test)]
mod tests {
    use fleethub::fuzzing::{fuzz, read_dir, run_one, workspace_fuzz_dir};

    /// The scenario corpus and every crash ever found replay without a panic, and a short
    /// run finds none.
    #[test]
    fn scenario_files_never_panic_the_reader() {
        let t = super::target();
        let dir = workspace_fuzz_dir();
        let mut ran = 0;
        for sub in ["corpus", "crashes"] {
            for (path, input) in read_dir(&dir.join(sub).join(t.name)) {
                assert!(run_one(&t, &input).is_none(), "{} panics", path.display());
                ran += 1;
            }
        }
        assert!(ran > 0, "fuzz/corpus/scenario holds the shipped scenarios");
        let scratch =
            std::env::temp_dir().join(format!("device-sim-fuzz-{:x}", rand::random::<u64>()));
        let outcome = fuzz(&t, 3_000, 11, &scratch, |_| {});
        assert!(outcome.crashes.is_empty(), "{:?}", outcome.crashes);
        let _ = std::fs::remove_dir_all(&scratch);
    }
}
