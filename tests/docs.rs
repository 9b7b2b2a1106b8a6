//! The README and the guide (docs/) against the code: the configuration reference
//! against the table of keys, every `properties` block through the config parser, the
//! capability matrix against the media, relative links, which pages' Rust blocks are
//! compiled, and no reference to documents a reader does not have.
//!
//! `INTRACOM_BLESS=1 cargo test --test docs` rewrites the generated table of the
//! configuration reference from `intracom::config::KEYS`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use intracom::config::KEYS;
use intracom::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CONFIG_PAGE: &str = "docs/src/reference/configuration.md";
const KEYS_BEGIN: &str =
    "<!-- keys:begin (generated from intracom::config::KEYS by tests/docs.rs) -->";
const KEYS_END: &str = "<!-- keys:end -->";

/// README.md and every page of the guide, as (path relative to the root, text).
fn pages() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| x == "md") {
                out.push(path);
            }
        }
    }
    let root = Path::new(ROOT);
    let mut paths = vec![root.join("README.md")];
    walk(&root.join("docs/src"), &mut paths);
    paths
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (
                p.strip_prefix(root).expect("under the root").to_path_buf(),
                text,
            )
        })
        .collect()
}

/// The fenced blocks of a Markdown text: (info string, body, line of the fence).
fn fences(text: &str) -> Vec<(String, String, usize)> {
    let mut out = Vec::new();
    let mut open: Option<(String, String, usize)> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    open = Some((info.trim().to_string(), String::new(), n + 1));
                }
            }
            Some((_, body, _)) => {
                if trimmed.starts_with("```") {
                    out.push(open.take().expect("open fence"));
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    assert!(open.is_none(), "a fence is not closed");
    out
}

/// Markdown text without its fenced blocks and inline code spans (links there are not links).
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

fn render_default(default: &str) -> String {
    match default {
        "" => "empty".to_string(),
        d if d.starts_with('(') => {
            let text = d.trim_start_matches('(').trim_end_matches(')');
            // `<host>` would be read as an HTML tag.
            if text.contains('<') {
                format!("`{text}`")
            } else {
                text.to_string()
            }
        }
        d => format!("`{d}`"),
    }
}

fn keys_table() -> String {
    let mut out = String::from(
        "| key | default | environment variable | meaning |\n| --- | --- | --- | --- |\n",
    );
    for key in KEYS {
        out.push_str(&format!(
            "| `{}` | {} | `{}` | {} |\n",
            key.name,
            render_default(key.default),
            key.env(),
            key.doc
        ));
    }
    out
}

#[test]
fn the_configuration_reference_lists_every_key_of_the_table() {
    let path = Path::new(ROOT).join(CONFIG_PAGE);
    let text = fs::read_to_string(&path).expect("the configuration reference");
    let (Some(begin), Some(end)) = (text.find(KEYS_BEGIN), text.find(KEYS_END)) else {
        panic!("{CONFIG_PAGE}: the markers {KEYS_BEGIN:?} and {KEYS_END:?} are missing");
    };
    let body_start = begin + KEYS_BEGIN.len() + 1;
    let current = &text[body_start..end];
    let wanted = keys_table();
    if current != wanted {
        if std::env::var_os("INTRACOM_BLESS").is_some() {
            let updated = format!("{}{}{}", &text[..body_start], wanted, &text[end..]);
            fs::write(&path, updated).expect("write the configuration reference");
            return;
        }
        panic!(
            "{CONFIG_PAGE} is not the table of intracom::config::KEYS; \
             rewrite it with `INTRACOM_BLESS=1 cargo test --test docs`.\nwanted:\n{wanted}\nfound:\n{current}"
        );
    }
    for key in KEYS {
        assert!(
            current.contains(&format!("`{}`", key.env())),
            "{}",
            key.name
        );
        assert!(
            !key.doc.is_empty(),
            "{} has no meaning in the table",
            key.name
        );
    }
}

#[test]
fn every_properties_block_loads_through_the_config_parser() {
    let mut blocks = 0;
    for (path, text) in pages() {
        for (info, body, line) in fences(&text) {
            if info != "properties" {
                continue;
            }
            blocks += 1;
            if let Err(e) = Config::from_properties(&body) {
                panic!(
                    "{}:{line}: the properties block does not load: {e}",
                    path.display()
                );
            }
            for entry in body
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                assert!(
                    entry.starts_with("common.intracom."),
                    "{}:{line}: `{entry}` is not an intracom key (the parser would ignore it)",
                    path.display()
                );
            }
        }
    }
    assert!(blocks >= 5, "only {blocks} properties blocks found");
}

/// Heading anchors as mdBook makes them: lower case, whitespace to `-`, other
/// punctuation dropped (a repeated heading gets `-1`, `-2`…).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        let Some(title) = line.strip_prefix('#').filter(|_| !in_fence) else {
            continue;
        };
        let slug: String = title
            .trim_start_matches('#')
            .trim()
            .chars()
            .filter_map(|c| match c {
                c if c.is_alphanumeric() => Some(c.to_lowercase().next().unwrap_or(c)),
                c if c.is_whitespace() => Some('-'),
                '-' | '_' => Some(c),
                _ => None,
            })
            .collect();
        let mut unique = slug.clone();
        let mut n = 1;
        while !out.insert(unique.clone()) {
            unique = format!("{slug}-{n}");
            n += 1;
        }
    }
    out
}

/// The targets of the inline links `[text](target)` of a Markdown text.
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut out = Vec::new();
    let mut rest = prose.as_str();
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].trim().to_string());
            rest = &rest[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_resolves() {
    let root = Path::new(ROOT);
    let mut checked = 0;
    for (path, text) in pages() {
        let dir = root.join(&path).parent().expect("a parent").to_path_buf();
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if file.is_empty() {
                root.join(&path)
            } else {
                dir.join(file)
            };
            assert!(
                resolved.exists(),
                "{}: link `{target}`: {} does not exist",
                path.display(),
                resolved.display()
            );
            if let (Some(anchor), true) = (anchor, resolved.extension().is_some_and(|x| x == "md"))
            {
                let target_text = fs::read_to_string(&resolved).expect("linked page");
                assert!(
                    anchors(&target_text).contains(anchor),
                    "{}: link `{target}`: no heading makes #{anchor}",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} links found");
}

#[test]
fn every_page_with_rust_blocks_is_compiled_as_a_doctest() {
    let lib = fs::read_to_string(Path::new(ROOT).join("src/lib.rs")).expect("src/lib.rs");
    for (path, text) in pages() {
        let mut rust = false;
        for (info, _, line) in fences(&text) {
            assert!(
                !info.is_empty(),
                "{}:{line}: a fence without a language (rustdoc would compile it as Rust): say `rust`, `sh`, `text`…",
                path.display()
            );
            rust |= info.split(',').any(|i| i.trim() == "rust");
        }
        if rust {
            let include = format!("include_str!(\"../{}\")", path.display());
            assert!(
                lib.contains(&include),
                "{} has Rust blocks: compile them with `#[doc = {include}]` in src/lib.rs's doctests",
                path.display()
            );
        }
    }
}

#[test]
fn the_capability_matrix_is_the_media_s() {
    use intracom::medium::memory::MemoryMedium;
    use intracom::{Capabilities, Medium};
    let text =
        fs::read_to_string(Path::new(ROOT).join("docs/src/media/index.md")).expect("media page");
    let memory = MemoryMedium::new(Default::default()).capabilities();
    // The MongoDB medium keeps the trait's default, every promise (it needs a server to
    // be made; its conformance run on real servers holds it to them).
    let mongodb = Capabilities::ALL;
    #[cfg(feature = "mqtt")]
    let mqtt = Some(intracom::medium::mqtt::CAPABILITIES);
    #[cfg(not(feature = "mqtt"))]
    let mqtt: Option<Capabilities> = None;
    let flags = |c: Capabilities| {
        [
            ("server_stamps", c.server_stamps),
            ("history", c.history),
            ("loss_reports", c.loss_reports),
            ("shared_checkpoints", c.shared_checkpoints),
            ("stored_queue", c.stored_queue),
            ("shared_state", c.shared_state),
        ]
    };
    let yes = |b: bool| if b { "yes" } else { "no" };
    for (i, (name, _)) in flags(memory).iter().enumerate() {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("no row for `{name}`"));
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 5, "{row}");
        assert_eq!(cells[2], yes(flags(memory)[i].1), "memory, {name}");
        assert_eq!(cells[3], yes(flags(mongodb)[i].1), "MongoDB, {name}");
        if let Some(mqtt) = mqtt {
            assert_eq!(cells[4], yes(flags(mqtt)[i].1), "MQTT, {name}");
        }
    }
}

/// Words that point at documents outside the repository, or at its history.
fn outside_reference(line: &str) -> Option<&'static str> {
    let lower = line.to_ascii_lowercase();
    // A word followed by a number, not as a command-line flag (`--seed 42`).
    let followed_by_digit = |word: &str| {
        lower.match_indices(word).any(|(i, w)| {
            !lower[..i].ends_with("--")
                && lower[i + w.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
        })
    };
    if followed_by_digit("seed ") || followed_by_digit("seeds ") {
        return Some("a seed document");
    }
    if lower.contains("the seed's") || lower.contains("seed field") {
        return Some("a seed document");
    }
    if line.contains("DESIGN §") || line.contains("DESIGN.md") || line.contains("MONGODB.md") {
        return Some("a design document");
    }
    if followed_by_digit("issue ") {
        return Some("an issue");
    }
    if lower.contains("this stop") || lower.contains("earlier stop") || lower.contains("last stop")
    {
        return Some("development history");
    }
    None
}

#[test]
fn no_reference_to_documents_outside_the_repository() {
    let mut found = Vec::new();
    for (path, text) in pages() {
        for (n, line) in text.lines().enumerate() {
            if let Some(what) = outside_reference(line) {
                found.push(format!("{}:{}: {what}: {line}", path.display(), n + 1));
            }
        }
    }
    // The rustdoc of the library (the binary's own comments are not published).
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    let mut sources = Vec::new();
    walk(&Path::new(ROOT).join("src"), &mut sources);
    for path in sources {
        let text = fs::read_to_string(&path).expect("source");
        for (n, line) in text.lines().enumerate() {
            let doc = line.trim_start();
            if !(doc.starts_with("//!") || doc.starts_with("///")) {
                continue;
            }
            if let Some(what) = outside_reference(line) {
                found.push(format!("{}:{}: {what}: {line}", path.display(), n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "references a reader cannot follow:\n{}",
        found.join("\n")
    );
}

const PERF_PAGE: &str = "docs/src/performance.md";
const PERF_BEGIN: &str =
    "<!-- bench:begin (generated from docs/data/bench-*.json by tests/docs.rs) -->";
const PERF_END: &str = "<!-- bench:end -->";

/// A measured value with a precision that suits its size.
fn figure(value: &serde_json::Value) -> String {
    let Some(v) = value.as_f64() else {
        return "–".into();
    };
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The tables of the performance page, from the committed `intracom bench --json` runs.
fn bench_tables() -> String {
    let dir = Path::new(ROOT).join("docs/data");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("docs/data")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("bench-") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    let mut out = String::new();
    for path in files {
        let text = fs::read_to_string(&path).expect("bench data");
        let run: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        let text_of = |v: &serde_json::Value| v.as_str().unwrap_or("–").to_string();
        let medium = match run["medium"].as_str() {
            Some("db") => "The MongoDB medium (`db`)".to_string(),
            Some(other) => format!("The {other} medium"),
            None => "?".to_string(),
        };
        out.push_str(&format!(
            "### {medium}: `docs/data/{name}`\n\n- server, as it reports itself: {}\n- machine: {}\n- rounds: {}; the run took {} s\n\n",
            text_of(&run["server"]),
            text_of(&run["machine"]),
            run["rounds"],
            figure(&run["elapsed_s"]),
        ));
        out.push_str("| figure | intracom | raw | intracom vs raw: median [min–max] over the rounds |\n| --- | --- | --- | --- |\n");
        for f in run["figures"].as_array().expect("figures") {
            let unit = text_of(&f["unit"]);
            let c = &f["comparison"];
            let compared = match c["kind"].as_str() {
                Some("difference") => format!(
                    "{:+} {unit} [{} – {}]",
                    c["median"]
                        .as_f64()
                        .map_or(f64::NAN, |v| (v * 1000.0).round() / 1000.0),
                    figure(&c["min"]),
                    figure(&c["max"])
                ),
                _ => format!(
                    "×{} [{} – {}]",
                    figure(&c["median"]),
                    figure(&c["min"]),
                    figure(&c["max"])
                ),
            };
            out.push_str(&format!(
                "| {} | {} {unit} | {} {unit} ({}) | {} |\n",
                text_of(&f["title"]),
                figure(&f["intracom"]["median"]),
                figure(&f["raw"]["median"]),
                text_of(&f["raw"]["label"]),
                compared,
            ));
        }
        out.push('\n');
    }
    out
}

#[test]
fn the_performance_page_is_the_committed_bench_data() {
    let path = Path::new(ROOT).join(PERF_PAGE);
    let text = fs::read_to_string(&path).expect("the performance page");
    let (Some(begin), Some(end)) = (text.find(PERF_BEGIN), text.find(PERF_END)) else {
        panic!("{PERF_PAGE}: the markers {PERF_BEGIN:?} and {PERF_END:?} are missing");
    };
    let body_start = begin + PERF_BEGIN.len() + 1;
    let wanted = bench_tables();
    if text[body_start..end] != wanted {
        if std::env::var_os("INTRACOM_BLESS").is_some() {
            let updated = format!("{}{}{}", &text[..body_start], wanted, &text[end..]);
            fs::write(&path, updated).expect("write the performance page");
            return;
        }
        panic!(
            "{PERF_PAGE} does not show docs/data/bench-*.json; rewrite it with \
             `INTRACOM_BLESS=1 cargo test --test docs`.\nwanted:\n{wanted}"
        );
    }
}

#[test]
fn the_readme_stays_short() {
    let text = fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md");
    let lines = text.lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines: keep it to what a newcomer needs and move the rest to the guide"
    );
    for command in ["cargo run --example quickstart", "scripts/test"] {
        assert!(
            text.contains(command),
            "README.md no longer shows `{command}`"
        );
    }
}
