//! The crate's public surface, checked in: `public-api.txt` lists `lib.rs`'s public
//! modules and re-exports and, module by module, every `pub` item, its `pub` methods
//! and its `pub` fields, as written in the sources. A change to the public surface
//! changes that file, so it shows in review.
//!
//! After an intended change: `INTRACOM_BLESS=1 cargo test --test public_api`, then
//! commit `public-api.txt` with the change (and say in CHANGELOG.md what a user of the
//! crate must change).
//!
//! The listing reads the sources, not the compiled crate: it is the same with every
//! feature set, and an item behind a feature is listed with its `#[cfg]` line. Private
//! modules (`mod x;`) are listed too, since what they hold is public where a public
//! module re-exports it (`Intracom` from `bus`); `pub(crate)` items are not.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const LISTING: &str = "public-api.txt";

#[test]
fn the_public_surface_is_the_checked_in_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let listing = listing(&root.join("src"));
    let path = root.join(LISTING);
    if std::env::var_os("INTRACOM_BLESS").is_some_and(|v| v != "0") {
        std::fs::write(&path, &listing).expect("write public-api.txt");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != listing {
        let diff = line_diff(&checked_in, &listing);
        panic!(
            "the public surface differs from {LISTING} (- checked in, + now):\n{diff}\n\
             if the change is intended: INTRACOM_BLESS=1 cargo test --test public_api, \
             commit {LISTING}, and note in CHANGELOG.md what users must change"
        );
    }
}

#[test]
fn the_listing_sees_items_methods_fields_and_re_exports() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let listing = listing(&root.join("src"));
    for expected in [
        "intracom: pub use error::{Error, PayloadError, Result};",
        "intracom::error: pub enum Error",
        "intracom::error: impl Error: pub fn is_retryable(&self) -> bool",
        "intracom::medium::mongo: pub struct Counters",
        "intracom::medium::mongo: pub struct Counters: pub fallbacks: u64,",
    ] {
        assert!(
            listing.lines().any(|line| line == expected),
            "`{expected}` not in the listing:\n{listing}"
        );
    }
    assert!(
        !listing.contains("pub(crate)"),
        "crate-private items are not public surface"
    );
}

/// The listing of the crate whose sources are in `src`.
fn listing(src: &Path) -> String {
    let mut out = String::new();
    module(&src.join("lib.rs"), "intracom", &mut out);
    out
}

/// Lists the module in `file` under `path`, then its public submodules.
fn module(file: &Path, path: &str, out: &mut String) {
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    let mut children = Vec::new();
    // The item the indented lines belong to: the last `impl`, `pub struct`, `pub enum`
    // or `pub trait` opened at the start of a line, until its closing `}`.
    let mut owner: Option<String> = None;
    let mut pending_cfg: Option<String> = None;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent == 0 {
            if line.starts_with("#[cfg(test)]") || line.starts_with("#[cfg(doctest)]") {
                // A test module or item: not public surface. Skipped to its end.
                let item = lines.next().unwrap_or_default();
                if !item.trim_end().ends_with(';') {
                    for rest in lines.by_ref() {
                        if rest == "}" {
                            break;
                        }
                    }
                }
                pending_cfg = None;
                continue;
            }
            if line.starts_with("#[cfg(") {
                pending_cfg = Some(line.to_string());
                continue;
            }
            if line.starts_with('#') || line.starts_with("//") || line.is_empty() {
                continue;
            }
            if line.starts_with('}') {
                owner = None;
                continue;
            }
            let opens = ["impl", "unsafe impl", "pub struct", "pub enum", "pub trait"]
                .iter()
                .any(|start| line.starts_with(start));
            if !line.starts_with("pub ") && !opens {
                if let Some(name) = line
                    .strip_prefix("mod ")
                    .and_then(|rest| rest.trim_end().strip_suffix(';'))
                {
                    // A private module: its `pub` items are surface where they are
                    // re-exported (`Intracom` from `bus`), so they are listed too.
                    if let Some(cfg) = pending_cfg.take() {
                        writeln!(out, "{path}: {cfg}").unwrap();
                    }
                    writeln!(out, "{path}: mod {name};").unwrap();
                    children.push(name.to_string());
                }
                owner = None;
                pending_cfg = None;
                continue;
            }
            let sig = signature(line, &mut lines, false);
            if line.starts_with("pub ") {
                if let Some(cfg) = pending_cfg.take() {
                    writeln!(out, "{path}: {cfg}").unwrap();
                }
                writeln!(out, "{path}: {sig}").unwrap();
                if let Some(name) = sig
                    .strip_prefix("pub mod ")
                    .and_then(|rest| rest.strip_suffix(';'))
                {
                    children.push(name.to_string());
                }
            }
            pending_cfg = None;
            owner = (opens && !sig.ends_with(';')).then_some(sig);
            continue;
        }
        let Some(owner) = &owner else { continue };
        if trimmed.starts_with("#[") && !trimmed.trim_end().ends_with(']') {
            // An attribute over several lines (`#[error(…)]`): skipped to its end.
            for rest in lines.by_ref() {
                if rest.trim_end().ends_with(']') {
                    break;
                }
            }
            continue;
        }
        if trimmed.starts_with("//") || trimmed.starts_with('#') || trimmed.starts_with('}') {
            continue;
        }
        let in_enum = owner.starts_with("pub enum");
        let in_trait = owner.starts_with("pub trait");
        let listed = if trimmed.starts_with("pub ") {
            // A public method or field (not `pub(crate)`, not `pub(super)`).
            indent == 4
        } else if in_enum {
            // A variant, or a variant's field.
            indent == 4 || indent == 8
        } else if in_trait {
            // A method, an associated type or constant.
            indent == 4
                && ["fn ", "async fn ", "type ", "const "]
                    .iter()
                    .any(|start| trimmed.starts_with(start))
        } else {
            false
        };
        if listed {
            let is_fn = trimmed.contains("fn ");
            let sig = signature(trimmed, &mut lines, !is_fn);
            writeln!(out, "{path}: {owner}: {}{sig}", "  ".repeat(indent / 4 - 1)).unwrap();
        }
    }
    for child in children {
        let file = child_file(file, &child);
        module(&file, &format!("{path}::{child}"), out);
    }
}

/// The signature that starts at `first`, on one line: up to its body (`{`, dropped) or
/// its end (`;`); a field or a variant (`field`) also ends at `,`. A constant's value
/// is left out.
fn signature<'a>(first: &str, lines: &mut impl Iterator<Item = &'a str>, field: bool) -> String {
    let first = first.trim();
    if first.starts_with("pub const ") || first.starts_with("pub static ") {
        if let Some((head, _)) = first.split_once(" = ") {
            return format!("{head};");
        }
    }
    let mut sig = first.to_string();
    let is_use = sig.starts_with("pub use ");
    let ended = |s: &str| {
        if is_use {
            s.ends_with(';')
        } else {
            s.ends_with('{') || s.ends_with(';') || (field && s.ends_with(','))
        }
    };
    while !ended(&sig) {
        match lines.next() {
            Some(next) => {
                let next = next.trim();
                if next.starts_with("//") {
                    continue;
                }
                let glued = sig.ends_with('(')
                    || sig.ends_with('<')
                    || sig.ends_with('{') && is_use
                    || next.starts_with(')')
                    || next.starts_with('}') && is_use;
                if !glued {
                    sig.push(' ');
                }
                sig.push_str(next);
            }
            None => break,
        }
    }
    let sig = sig.strip_suffix('{').unwrap_or(&sig).trim_end();
    sig.replace(",)", ")")
        .replace(",}", "}")
        .replace(", )", ")")
}

/// The file of submodule `child` of the module in `file`.
fn child_file(file: &Path, child: &str) -> PathBuf {
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let dir = file.parent().expect("a module file has a directory");
    let dir = if stem == "lib" || stem == "mod" {
        dir.to_path_buf()
    } else {
        dir.join(stem)
    };
    let flat = dir.join(format!("{child}.rs"));
    if flat.exists() {
        flat
    } else {
        dir.join(child).join("mod.rs")
    }
}

/// The lines only in `old` (`-`) and only in `new` (`+`).
fn line_diff(old: &str, new: &str) -> String {
    let old_lines: std::collections::BTreeSet<&str> = old.lines().collect();
    let new_lines: std::collections::BTreeSet<&str> = new.lines().collect();
    let mut out = String::new();
    for line in old_lines.difference(&new_lines) {
        writeln!(out, "- {line}").unwrap();
    }
    for line in new_lines.difference(&old_lines) {
        writeln!(out, "+ {line}").unwrap();
    }
    out
}
