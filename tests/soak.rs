//! 1,000 commits of another service while a library instance and a `switcheroo run`
//! watch (see `tests/soak/mod.rs`): no process leaks a file descriptor. Memory is printed
//! (and compared in `cargo bench --features cli --bench soak`), not asserted.

use lab::require_root;

#[test]
fn a_thousand_commits_leak_no_descriptor_in_the_watchers_or_the_committer() {
    if !require_root() {
        return;
    }
    let s = lab::soak::run(100, 1000);
    eprintln!("{}", lab::soak::table(&s));
    for (who, early, total) in &s.rows {
        assert_eq!(early.fds, total.fds, "{who} leaks descriptors: {s:?}");
        assert!(early.fds > 0, "{who}: no /proc reading");
    }
}
