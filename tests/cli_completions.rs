//! `ringfeed completions SHELL` and `ringfeed man`: the scripts and pages are generated from
//! the flag definitions, load in their shell, and complete real subcommands and flags.

use std::process::Command;

fn ringfeed(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(args)
        .output()
        .expect("running ringfeed");
    assert!(
        out.status.success(),
        "ringfeed {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// What bash's completion function offers for the words typed so far (the last is the one
/// being completed).
fn bash_complete(script: &std::path::Path, words: &[&str]) -> Vec<String> {
    let line = words.join(" ");
    let program = format!(
        "source {script}; COMP_WORDS=({line}); COMP_CWORD={cword}; COMP_LINE='{line}'; \
         COMP_POINT=${{#COMP_LINE}}; _ringfeed ringfeed '{current}' '{previous}'; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script = script.display(),
        cword = words.len() - 1,
        current = words[words.len() - 1],
        previous = words[words.len() - 2],
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &program])
        .output()
        .expect("running bash");
    assert!(
        out.status.success(),
        "bash failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_completion_script_completes_subcommands_and_flags() {
    let script = ringfeed(&["completions", "bash"]);
    assert!(script.contains("_ringfeed()"), "{script}");
    assert!(script.contains("complete -F _ringfeed"), "{script}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ringfeed.bash");
    std::fs::write(&path, &script).unwrap();

    let subcommands = bash_complete(&path, &["ringfeed", "p"]);
    for expected in ["peek", "pack"] {
        assert!(subcommands.iter().any(|w| w == expected), "{subcommands:?}");
    }
    assert!(!subcommands.iter().any(|w| w == "serve"), "{subcommands:?}");
    let flags = bash_complete(&path, &["ringfeed", "serve", "--met"]);
    assert_eq!(flags, ["--metrics"]);
    let peek_flags = bash_complete(&path, &["ringfeed", "peek", "--cla"]);
    assert_eq!(peek_flags, ["--classes"]);
}

#[test]
fn zsh_and_fish_scripts_name_every_subcommand() {
    let zsh = ringfeed(&["completions", "zsh"]);
    let fish = ringfeed(&["completions", "fish"]);
    assert!(zsh.starts_with("#compdef ringfeed"), "{zsh}");
    assert!(fish.contains("complete -c ringfeed"), "{fish}");
    for sub in [
        "serve",
        "bench",
        "index",
        "consume",
        "stat",
        "peek",
        "pack",
        "completions",
        "man",
    ] {
        assert!(zsh.contains(&format!("'{sub}:")), "zsh lacks {sub}");
        assert!(fish.contains(&format!("-a \"{sub}\"")), "fish lacks {sub}");
    }
}

#[test]
fn unknown_shell_is_refused_with_the_choices() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bash") && stderr.contains("fish"),
        "{stderr}"
    );
}

#[test]
fn man_page_documents_the_command_and_each_subcommand() {
    let page = ringfeed(&["man"]);
    assert!(page.starts_with(".ie"), "{}", &page[..page.len().min(200)]);
    assert!(page.contains(".TH ringfeed 1"), "{page}");
    assert!(page.contains("serve"), "{page}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    ringfeed(&["man", "--dir", out.to_str().unwrap()]);
    for name in ["ringfeed.1", "ringfeed-serve.1", "ringfeed-peek.1"] {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        assert!(text.contains(".TH"), "{name}: {text}");
    }
    let serve = std::fs::read_to_string(out.join("ringfeed-serve.1")).unwrap();
    assert!(serve.contains("metrics"), "{serve}");
}
