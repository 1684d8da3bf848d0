//! Headless Chromium driven by Playwright from a Node script in `tests/browser/`: what the
//! browser tests need outside Cargo, and starting a driver script.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `tests/browser/`: the driver scripts and their `node_modules`.
pub fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Everything a browser test needs outside Cargo, or a panic saying how to install what is missing.
pub fn chromium_or_fail() -> PathBuf {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let mut missing = Vec::new();
    if !chromium.exists() {
        missing.push(format!(
            "Chromium at {} (apt-get install -y chromium, or set CHROMIUM=/path/to/chromium)",
            chromium.display()
        ));
    }
    let node = Command::new("node").arg("--version").output();
    if !node.as_ref().is_ok_and(|o| o.status.success()) {
        missing.push("node, 18 or newer (apt-get install -y nodejs npm)".into());
    }
    let dir = browser_dir();
    for file in [
        "node_modules/playwright-core/package.json",
        "node_modules/td-js-sdk/dist/td.min.js",
    ] {
        if !dir.join(file).exists() {
            missing.push(format!(
                "{} (npm ci --prefix tests/browser)",
                dir.join(file).display()
            ));
        }
    }
    let openssl = Command::new("openssl").arg("version").output();
    if !openssl.as_ref().is_ok_and(|o| o.status.success()) {
        missing.push("openssl (apt-get install -y openssl)".into());
    }
    assert!(
        missing.is_empty(),
        "the browser test cannot run; missing:\n  {}",
        missing.join("\n  ")
    );
    chromium
}

/// Starts `node <script> <args>` in `tests/browser/` with `CHROMIUM` set, in its own process
/// group (so a timeout can kill the driver and its browser whole: `kill(-pid)`), stdout and
/// stderr piped.
pub fn spawn_node(chromium: &Path, script: &str, args: &[&str], stdin: Stdio) -> Child {
    let dir = browser_dir();
    Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .current_dir(&dir)
        .env("CHROMIUM", chromium)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn node")
}
