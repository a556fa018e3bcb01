//! Shard specifications → the sorted list of shard files.
//!
//! A spec is a path, a glob (`data/*.tar`), a brace range (`shard-{000000..000127}.tar`, zero
//! padding kept) or a brace list (`{train,extra}/*.tar`); braces nest and combine with globs.
//! Relative specs resolve against a base directory. The union of all specs is sorted and
//! deduplicated; a spec that matches nothing, or names a file that does not exist, is an error
//! that names it.

use std::path::{Path, PathBuf};

use super::error::SourceError;

/// Most paths one spec may expand to before globbing; guards against `{0..99999999999}`.
pub const MAX_EXPANSION: usize = 1_000_000;

/// Expands `specs` (relative ones against `base_dir`) into the sorted, deduplicated shard list.
pub fn expand_shards(specs: &[String], base_dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let mut shards = Vec::new();
    for spec in specs {
        if super::remote::is_remote(spec) {
            return Err(SourceError::BadShardSpec {
                spec: spec.clone(),
                reason: "s3:// objects are read through a configuration's [source] \
                         (serve, stat, peek), not as local files"
                    .to_owned(),
            });
        }
        let patterns = expand_braces(spec).map_err(|reason| SourceError::BadShardSpec {
            spec: spec.clone(),
            reason,
        })?;
        let before = shards.len();
        for pattern in patterns {
            let path = base_dir.join(&pattern);
            if is_glob(&pattern) {
                // The base directory is a literal path: escape its own `[`, `*`, `?`.
                let text = if Path::new(&pattern).is_absolute() || base_dir.as_os_str().is_empty() {
                    pattern.clone()
                } else {
                    let base = base_dir.to_str().ok_or_else(|| SourceError::BadShardSpec {
                        spec: spec.clone(),
                        reason: "the base directory is not valid UTF-8".to_owned(),
                    })?;
                    format!("{}/{pattern}", glob::Pattern::escape(base))
                };
                let matches = glob::glob(&text).map_err(|e| SourceError::BadShardSpec {
                    spec: spec.clone(),
                    reason: e.to_string(),
                })?;
                for entry in matches {
                    let found = entry.map_err(|e| SourceError::Io {
                        path: e.path().to_path_buf(),
                        source: std::io::Error::new(e.error().kind(), e.error().to_string()),
                    })?;
                    if found.is_file() {
                        shards.push(found);
                    }
                }
            } else if path.is_file() {
                shards.push(path);
            } else {
                return Err(SourceError::ShardMissing {
                    spec: spec.clone(),
                    path,
                });
            }
        }
        if shards.len() == before {
            return Err(SourceError::NoMatch { spec: spec.clone() });
        }
    }
    shards.sort();
    shards.dedup();
    Ok(shards)
}

fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Expands brace expressions: `{a,b}` lists and `{N..M}` integer ranges (ascending or
/// descending; when either end has a leading zero, every number is padded to the wider end's
/// width, as bash does). A brace pair with neither `,` nor `..` stays literal.
pub fn expand_braces(spec: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    expand_into(spec, &mut out)?;
    Ok(out)
}

fn expand_into(spec: &str, out: &mut Vec<String>) -> Result<(), String> {
    let Some((open, close)) = first_brace_pair(spec)? else {
        push_bounded(out, spec.to_owned())?;
        return Ok(());
    };
    let (head, body, tail) = (&spec[..open], &spec[open + 1..close], &spec[close + 1..]);
    let alternatives = if let Some(range) = parse_range(body)? {
        range
    } else {
        let parts = split_top_level(body);
        if parts.len() < 2 {
            // Literal braces: keep them and expand whatever follows.
            let mut rest = Vec::new();
            expand_into(tail, &mut rest)?;
            for r in rest {
                push_bounded(out, format!("{head}{{{body}}}{r}"))?;
            }
            return Ok(());
        }
        parts.into_iter().map(str::to_owned).collect()
    };
    for alt in alternatives {
        expand_into(&format!("{head}{alt}{tail}"), out)?;
    }
    Ok(())
}

fn push_bounded(out: &mut Vec<String>, s: String) -> Result<(), String> {
    if out.len() >= MAX_EXPANSION {
        return Err(format!("expands to more than {MAX_EXPANSION} paths"));
    }
    out.push(s);
    Ok(())
}

/// Finds the first `{` and its matching `}`; an unmatched `{` is an error.
fn first_brace_pair(spec: &str) -> Result<Option<(usize, usize)>, String> {
    let Some(open) = spec.find('{') else {
        return Ok(None);
    };
    let mut depth = 0usize;
    for (i, c) in spec[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some((open, open + i)));
                }
            }
            _ => {}
        }
    }
    Err(format!("unmatched '{{' at byte {open}"))
}

/// Splits a brace body at the commas that are not inside nested braces.
fn split_top_level(body: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
}

/// Parses `N..M` into its padded numbers; `Ok(None)` when the body is not a range.
fn parse_range(body: &str) -> Result<Option<Vec<String>>, String> {
    let Some((a, b)) = body.split_once("..") else {
        return Ok(None);
    };
    let is_num = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !is_num(a) || !is_num(b) {
        return Ok(None);
    }
    let parse = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("range end {s:?} is too large"))
    };
    let (start, end) = (parse(a)?, parse(b)?);
    let padded = (a.len() > 1 && a.starts_with('0')) || (b.len() > 1 && b.starts_with('0'));
    let width = if padded { a.len().max(b.len()) } else { 0 };
    let count = start.abs_diff(end) + 1;
    if count > MAX_EXPANSION as u64 {
        return Err(format!(
            "range {{{body}}} has {count} values (limit {MAX_EXPANSION})"
        ));
    }
    let numbers: Vec<String> = if start <= end {
        (start..=end).map(|n| format!("{n:0width$}")).collect()
    } else {
        (end..=start)
            .rev()
            .map(|n| format!("{n:0width$}"))
            .collect()
    };
    Ok(Some(numbers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_urls_are_not_taken_for_local_paths() {
        // `ringfeed index` expands specs as local files: an s3:// spec must say so, not
        // "matches no file" (or match a local folder named `s3:`).
        let err = expand_shards(&["s3://bucket/shard-{0..3}.tar".to_owned()], Path::new("."))
            .unwrap_err();
        assert!(
            matches!(&err, SourceError::BadShardSpec { spec, .. } if spec.starts_with("s3://")),
            "{err}"
        );
        assert!(err.to_string().contains("[source]"), "{err}");
    }

    #[test]
    fn ranges_keep_zero_padding() {
        assert_eq!(
            expand_braces("data/shard-{000000..000002}.tar").unwrap(),
            [
                "data/shard-000000.tar",
                "data/shard-000001.tar",
                "data/shard-000002.tar"
            ]
        );
        assert_eq!(expand_braces("s{8..10}").unwrap(), ["s8", "s9", "s10"]);
        assert_eq!(expand_braces("s{08..10}").unwrap(), ["s08", "s09", "s10"]);
        assert_eq!(expand_braces("s{3..1}").unwrap(), ["s3", "s2", "s1"]);
    }

    #[test]
    fn lists_nest_and_combine() {
        assert_eq!(
            expand_braces("{a,b}/x.tar").unwrap(),
            ["a/x.tar", "b/x.tar"]
        );
        assert_eq!(
            expand_braces("{a,b{1..2}}-{x,y}").unwrap(),
            ["a-x", "a-y", "b1-x", "b1-y", "b2-x", "b2-y"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        assert_eq!(expand_braces("{}{x,y}").unwrap(), ["{}x", "{}y"]);
        assert_eq!(expand_braces("{single}").unwrap(), ["{single}"]);
    }

    #[test]
    fn bad_braces_are_errors() {
        assert!(expand_braces("shard-{0..3.tar").is_err());
        assert!(expand_braces("{0..99999999999}").is_err());
        assert!(expand_braces("{0..99999999999999999999999}").is_err());
    }

    #[test]
    fn expansion_resolves_sorts_dedups_and_names_missing_specs() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b-001.tar", "b-000.tar", "a.tar", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let specs = vec!["b-{000..001}.tar".to_owned(), "*.tar".to_owned()];
        let shards = expand_shards(&specs, dir.path()).unwrap();
        let names: Vec<_> = shards
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.tar", "b-000.tar", "b-001.tar"]);

        // Glob characters in the base directory are taken literally.
        let odd = dir.path().join("run[1]*");
        std::fs::create_dir(&odd).unwrap();
        std::fs::write(odd.join("x.tar"), b"").unwrap();
        assert_eq!(
            expand_shards(&["*.tar".to_owned()], &odd).unwrap(),
            [odd.join("x.tar")]
        );

        let err = expand_shards(&["*.idx".to_owned()], dir.path()).unwrap_err();
        assert!(
            matches!(&err, SourceError::NoMatch { spec } if spec == "*.idx"),
            "{err}"
        );
        let err = expand_shards(&["b-{000..002}.tar".to_owned()], dir.path()).unwrap_err();
        assert!(
            matches!(&err, SourceError::ShardMissing { path, .. } if path.ends_with("b-002.tar")),
            "{err}"
        );
    }
}
