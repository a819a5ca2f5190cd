//! What people expect of a Unix tool beyond its commands: `make install`
//! (binary, man pages, shell completions), and `asiffs SOURCE MOUNTPOINT`
//! as the helper form mount(8) runs. The mount itself through mount(8) and
//! fstab is integration/mount_fstab.sh.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const COMMANDS: [&str; 11] = [
    "check", "compact", "convert", "create", "info", "map", "mount", "resize", "serve", "stats",
    "umount",
];

/// Every file under `dir`, relative to it, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn make(target: &str, destdir: &Path) -> std::process::Output {
    Command::new("make")
        .args(["-s", "-C", env!("CARGO_MANIFEST_DIR"), target])
        .arg(format!("ASIFFS={}", env!("CARGO_BIN_EXE_asiffs")))
        .arg(format!("DESTDIR={}", destdir.display()))
        .arg("PREFIX=/usr/local")
        .output()
        .expect("running make")
}

/// Renders a man page as text, as `man -l` shows it.
fn man(page: &Path) -> String {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "200")
        .output()
        .expect("running man");
    assert!(out.status.success(), "man -l {}: {out:?}", page.display());
    String::from_utf8(out.stdout).unwrap()
}

/// What bash's completion offers after `words`, the last being completed.
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let prog = format!(
        "source {}; COMP_WORDS=({}); COMP_CWORD={}; _asiffs asiffs {} {}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words.join(" "),
        words.len() - 1,
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let out = Command::new("bash").arg("-c").arg(prog).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut v: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    v.sort();
    v
}

#[test]
fn make_install_and_uninstall() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path();
    let out = make("install", dest);
    assert!(out.status.success(), "make install: {out:?}");
    let mut want: Vec<String> = vec![
        "usr/local/bin/asiffs".into(),
        "usr/local/share/bash-completion/completions/asiffs".into(),
        "usr/local/share/fish/vendor_completions.d/asiffs.fish".into(),
        "usr/local/share/man/man1/asiffs.1".into(),
        "usr/local/share/zsh/site-functions/_asiffs".into(),
    ];
    want.extend(COMMANDS.map(|c| format!("usr/local/share/man/man1/asiffs-{c}.1")));
    want.sort();
    assert_eq!(files_under(dest), want);

    let usr = dest.join("usr/local");
    assert!(
        fs::read(usr.join("bin/asiffs")).unwrap()
            == fs::read(env!("CARGO_BIN_EXE_asiffs")).unwrap(),
        "the installed binary is the one built"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| fs::metadata(usr.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("bin/asiffs"), 0o755);
    assert_eq!(mode("share/man/man1/asiffs.1"), 0o644);

    // The pages render; the top one lists every command and the helper form.
    let man1 = usr.join("share/man/man1");
    let top = man(&man1.join("asiffs.1"));
    assert!(
        top.contains("asiffs - Apple Sparse Image Format (ASIF) disk images on Linux"),
        "{top}"
    );
    for c in COMMANDS {
        assert!(top.contains(&format!("asiffs-{c}(1)")), "{c} in\n{top}");
    }
    assert!(
        top.contains("without a command, is `asiffs mount`"),
        "{top}"
    );
    let mount = man(&man1.join("asiffs-mount.1"));
    assert!(
        mount.contains(
            "asiffs-mount - Present a directory of disk images as raw files through FUSE"
        ),
        "{mount}"
    );
    assert!(mount.contains("-o <OPTS>"), "{mount}");

    // Bash completes the commands and their options.
    let bash = usr.join("share/bash-completion/completions/asiffs");
    assert_eq!(bash_complete(&bash, &["asiffs", "m"]), ["map", "mount"]);
    assert_eq!(
        bash_complete(&bash, &["asiffs", "mount", "--di"]),
        ["--direct-io", "--dispatch"]
    );
    let zsh = fs::read_to_string(usr.join("share/zsh/site-functions/_asiffs")).unwrap();
    assert!(zsh.starts_with("#compdef asiffs\n"), "{zsh}");
    let fish = fs::read_to_string(usr.join("share/fish/vendor_completions.d/asiffs.fish")).unwrap();
    for c in COMMANDS {
        assert!(fish.contains(&format!("-a \"{c}\"")), "{c} in\n{fish}");
    }

    let out = make("uninstall", dest);
    assert!(out.status.success(), "make uninstall: {out:?}");
    assert_eq!(files_under(dest), Vec::<String>::new());
}

#[test]
fn completions_for_every_shell() {
    for (shell, start) in [
        ("bash", "_asiffs() {"),
        ("zsh", "#compdef asiffs"),
        ("fish", "# Print an optspec"),
        ("elvish", "\nuse builtin;"),
        (
            "powershell",
            "\nusing namespace System.Management.Automation",
        ),
    ] {
        let r = run(["completions", shell]);
        assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{shell}: {r:?}");
        assert!(r.stdout.starts_with(start), "{shell}: {}", r.stdout);
        assert!(r.stdout.contains("umount"), "{shell}");
    }
    let r = run(["completions", "tcsh"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .starts_with("error: invalid value 'tcsh' for '<SHELL>'"),
        "{r:?}"
    );
}

#[test]
fn manpages_writes_one_page_per_command() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("new/man1");
    let r = run(["manpages", s(&dir)]);
    assert_eq!((r.code, r.stdout.as_str(), r.stderr.as_str()), (0, "", ""));
    let mut want: Vec<String> = COMMANDS.map(|c| format!("asiffs-{c}.1")).into();
    want.push("asiffs.1".into());
    want.sort();
    assert_eq!(files_under(&dir), want);
    let page = fs::read_to_string(dir.join("asiffs-convert.1")).unwrap();
    assert!(page.starts_with(".ie \\n(.g .ds Aq \\(aq"), "roff: {page}");
    assert!(page.contains(".TH asiffs-convert 1"), "{page}");

    // A place that cannot be a directory is one error line.
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    let r = run(["manpages", s(&file.join("x"))]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr,
        format!(
            "asiffs: {}/x: Not a directory (os error 20)\n",
            file.display()
        )
    );
}

/// `asiffs SOURCE MOUNTPOINT` is `asiffs mount SOURCE MOUNTPOINT`; a word
/// that is no path still gets clap's hint for a mistyped command.
#[test]
fn no_command_means_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let missing: PathBuf = tmp.path().join("missing");
    let r = run([s(&src), s(&missing), "-o", "nofail,x-systemd.automount"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr,
        format!(
            "asiffs: mountpoint {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
    // A missing source named by path is still a mount.
    let r = run(["/nonexistent/src", s(&missing)]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            1,
            "asiffs: source /nonexistent/src: No such file or directory (os error 2)\n"
        )
    );
    let r = run(["infoo", "x.asif"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .starts_with("error: unrecognized subcommand 'infoo'")
            && r.stderr.contains("a similar subcommand exists: 'info'"),
        "{r:?}"
    );
    // One word alone is never taken for a mount.
    let r = run([s(&src)]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.starts_with("error: unrecognized subcommand"),
        "{r:?}"
    );
}
