//! The module graph of the `fleethub` crate, read from its sources: imports point one way (no
//! circle between top-level modules), and the hub, the API and the MQTT front end name nothing
//! of `deploy` (deployments hear of changes through the hub's `ChangeObserver`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its code names as `crate::x` (comments skipped).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("broker/src") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a module name")
            .to_string();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut uses = BTreeSet::new();
        for file in rust_files(&path) {
            let text = std::fs::read_to_string(&file).expect("source");
            for line in text.lines() {
                let code = line.split("//").next().unwrap_or("");
                for (i, _) in code.match_indices("crate::") {
                    let rest = &code[i + "crate::".len()..];
                    let module: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !module.is_empty() && module != name {
                        uses.insert(module);
                    }
                }
            }
        }
        graph.insert(name, uses);
    }
    graph
}

fn rust_files(path: &Path) -> Vec<std::path::PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).expect("dir") {
        files.extend(rust_files(&entry.expect("entry").path()));
    }
    files
}

/// A path `from` -> ... -> `to`, if there is one.
fn path(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    to: &str,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    for next in graph.get(from).into_iter().flatten() {
        if next == to {
            return Some(vec![from.to_string(), to.to_string()]);
        }
        if seen.insert(next.clone()) {
            if let Some(mut rest) = path(graph, next, to, seen) {
                rest.insert(0, from.to_string());
                return Some(rest);
            }
        }
    }
    None
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let graph = graph();
    assert!(
        graph.contains_key("hub") && graph.contains_key("deploy"),
        "{graph:?}"
    );
    for module in graph.keys() {
        if let Some(circle) = path(&graph, module, module, &mut BTreeSet::new()) {
            panic!("import circle: {}", circle.join(" -> "));
        }
    }
}

#[test]
fn hub_api_and_mqtt_name_nothing_in_deploy() {
    let graph = graph();
    for module in ["hub", "api", "mqtt", "sinks", "twin"] {
        assert!(
            !graph[module].contains("deploy"),
            "{module} names deploy: {:?}",
            graph[module]
        );
    }
}
