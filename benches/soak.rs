//! Soak (see `tests/soak/mod.rs`): resident memory and open descriptors of long-lived
//! watchers and of a process that commits 1,000 times, after 100 and after 1,000.
//! `cargo bench --features cli --bench soak [-- --commits N]` as root.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "soak bench: skipped under `cargo test`; run `cargo bench --features cli --bench soak`"
        );
        return;
    }
    let total = lab::bench::arg(&args, "--commits", 1000usize);
    let s = lab::soak::run(100, total);
    println!("## soak: {total} commits of another service in the same chains\n");
    println!("{}", lab::soak::table(&s));
}
