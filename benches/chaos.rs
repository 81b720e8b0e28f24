//! Chaos for longer (see `tests/lab/src/chaos.rs`), with the rates: failed requests per 1,000
//! deploys and per SIGKILL. `cargo bench --features cli --bench chaos [-- --secs N --seed N]`
//! as root; it makes its own network namespaces.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("chaos bench: skipped under `cargo test`; run `cargo bench --features cli --bench chaos`");
        return;
    }
    let secs = lab::bench::arg(&args, "--secs", 300u64);
    let seed = lab::bench::arg(&args, "--seed", rand::random::<u64>());
    let s = lab::chaos::run(secs, seed);
    println!("## chaos, {secs} s (seed {seed})\n");
    println!("| steps | deploys | SIGKILLs (deployer / old instance / new wrapper / serving wrapper / its server) | churn | requests | failed | failed per 1,000 deploys | failed per SIGKILL | invariant violations |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} ({} / {} / {} / {} / {}) | {} | {} | {} | {:.0} | {:.1} | {} |",
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
        s.failed as f64 * 1000.0 / s.deploys.max(1) as f64,
        s.failed as f64 / s.kills.max(1) as f64,
        s.violations.len()
    );
    println!(
        "\nOf those, {} failed in the {} (step, port) windows whose port had a live instance before and after the step (deploys, and kills of processes that were not serving it): {:.1} per 1,000 such windows.",
        s.failed_while_served,
        s.served_steps,
        s.failed_while_served as f64 * 1000.0 / s.served_steps.max(1) as f64
    );
    for v in &s.violations {
        println!("- {v}");
    }
}
