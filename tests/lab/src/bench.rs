//! What the benches share: the release `hello` beside them, and their arguments.

/// `target/release/examples/hello`, beside the bench binary's `target/release/deps`.
pub fn hello_path() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/release");
    dir.join("examples").join("hello")
}

/// The value after `--name` on the command line, parsed, or `default`.
pub fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
