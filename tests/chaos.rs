//! About a minute of chaos (see `tests/lab/src/chaos.rs`): SIGKILLs at random moments to
//! deployers, old instances, wrappers and their servers, while iptables-nft churns the
//! same chains and clients load both services. `CHAOS_SECS` and `CHAOS_SEED` change the
//! length and replay a run; `cargo bench --bench chaos` runs longer and prints rates.

use lab::require_root;

#[test]
fn a_minute_of_sigkills_and_churn_keeps_every_invariant_and_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let secs = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chaos: {secs} s, CHAOS_SEED={seed}");
    let s = lab::chaos::run(secs, seed);
    eprintln!(
        "chaos: {} steps, {} deploys, {} SIGKILLs (deployer {}, old instance {}, new wrapper {}, serving wrapper {}, its server {}), iptables-nft churned the chains {} times; {} requests, {} failed, {} of them during the {} (step, port) windows whose port had a live instance before and after",
        s.steps,
        s.deploys,
        s.kills,
        s.kills_by[0],
        s.kills_by[1],
        s.kills_by[2],
        s.kills_by[3],
        s.kills_by[4],
        s.churn,
        s.requests,
        s.failed,
        s.failed_while_served,
        s.served_steps
    );
    eprintln!("chaos: those by step kind: {:?}", s.served_failures_by_step);
    assert!(
        s.violations.is_empty(),
        "CHAOS_SEED={seed}: {:#?}",
        s.violations
    );
    assert!(s.kills >= 5 && s.deploys >= 5, "too little happened: {s:?}");
}
