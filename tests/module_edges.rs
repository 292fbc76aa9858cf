//! The module graph stays the one DESIGN.md draws: every `crate::<module>` a file under
//! `src/<module>/` names must be an edge the table allows, so the graph stays acyclic as
//! features land. Comments and doc lines are not edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules it may use (DESIGN.md, "Modules").
/// Differences from the table, on purpose: `config` is usable everywhere (it is the leaf
/// every module reads); `appservice` uses `matrix` (a user query registers the agent on
/// the spot) and `net` (error bodies, token digests); `ops` uses `router` (the explain
/// seam of the admin API), `net`, and `inbox` (the seam through which the inbox hands
/// management commands to `ops`, which answers them; the inbox never names `ops`).
const ALLOWED: &[(&str, &[&str])] = &[
    ("config", &[]),
    ("net", &[]),
    ("render", &[]),
    ("store", &["config"]),
    ("matrix", &["config", "net"]),
    ("llm", &["config", "net"]),
    ("router", &["config"]),
    (
        "agents",
        &["store", "llm", "matrix", "render", "net", "config"],
    ),
    ("collab", &["agents", "store", "matrix", "config"]),
    (
        "inbox",
        &[
            "router", "agents", "collab", "bridges", "store", "matrix", "config",
        ],
    ),
    ("appservice", &["store", "config", "matrix", "net"]),
    ("bridges", &["matrix", "store", "render", "net", "config"]),
    (
        "ops",
        &[
            "agents", "collab", "inbox", "store", "matrix", "config", "router", "net",
        ],
    ),
    (
        "cli",
        &[
            "config",
            "store",
            "net",
            "matrix",
            "router",
            "ops",
            "server",
            "appservice",
            "bridges",
        ],
    ),
    (
        "server",
        &[
            "config",
            "store",
            "net",
            "render",
            "matrix",
            "llm",
            "router",
            "agents",
            "collab",
            "inbox",
            "appservice",
            "bridges",
            "ops",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`None` for lib.rs and main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// Every `crate::<name>` in the code of `text` (not in comments).
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
            rest = after;
        }
    }
    found
}

#[test]
fn every_edge_between_top_level_modules_is_one_the_design_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, uses)| (*m, uses.iter().copied().collect()))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut wrong = Vec::new();
    for module in &modules {
        assert!(
            allowed.contains_key(module.as_str()),
            "src/{module} is not in the module table: add it to DESIGN.md and ALLOWED"
        );
    }
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for target in crate_paths(&text) {
            if target == module || !modules.contains(&target) {
                continue; // itself, or a crate-root item such as `unix_ms`
            }
            if !allowed[module.as_str()].contains(target.as_str()) {
                wrong.push(format!(
                    "{} uses crate::{target} ({module} → {target} is not in the table)",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "module edges the design does not allow:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_edge_reader_sees_code_and_skips_comments() {
    let text = "use crate::store::Store;\n/// see [`crate::router`]\nlet x = crate::net::error_chain(&e); // crate::ops\n";
    let found: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(found, ["net", "store"]);
}
