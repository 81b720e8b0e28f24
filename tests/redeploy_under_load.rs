//! Zero dropped connections: `hello` redeployed 20 times while client threads keep
//! requesting, over new connections and over keep-alive connections, on IPv4 and IPv6.
//! Every request must be answered with a complete 200: none refused, reset or cut short.

use lab::{require_root, Netns};
use std::time::{Duration, Instant};

const DEPLOYS: usize = 20;

#[test]
fn twenty_redeploys_under_load_drop_nothing() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut current = ns.hello(&[]);
    let started = Instant::now();
    let (stats, pids) = ns.enter(|| {
        let loads: Vec<lab::load::Load> = ["127.0.0.1:8080", "[::1]:8080"]
            .iter()
            .map(|t| {
                let mut plan = lab::load::Plan::new(t.parse().unwrap());
                plan.close_clients = 2;
                plan.keepalive_clients = 1;
                lab::load::Load::start(&plan)
            })
            .collect();
        let mut pids = vec![current.pid];
        let mut old = Vec::new();
        for _ in 0..DEPLOYS {
            std::thread::sleep(Duration::from_millis(300));
            let next = ns.hello(&[]);
            pids.push(next.pid);
            old.push(std::mem::replace(&mut current, next));
        }
        std::thread::sleep(Duration::from_millis(300));
        let stats: Vec<_> = loads.into_iter().map(lab::load::Load::stop).collect();
        for mut h in old {
            let status = h
                .wait_exit(Duration::from_secs(20))
                .expect("old instance exits");
            assert!(
                status.success(),
                "pid {} exited with {status}: {:?}",
                h.pid,
                h.log
            );
        }
        (stats, pids)
    });
    let lab::load::Totals {
        ok,
        failed,
        samples,
        answered,
        ..
    } = lab::load::Totals::of(&stats);
    eprintln!(
        "{DEPLOYS} deploys in {:?}: {ok} requests answered, {failed} failed",
        started.elapsed()
    );
    assert_eq!(failed, 0, "failed requests: {samples:?}");
    assert!(ok > 1000, "the load ran: {ok} requests");
    // New connections reached every instance in turn.
    for pid in &pids[1..] {
        assert!(answered.contains(pid), "instance {pid} never answered");
    }
    assert!(current.terminate().expect("last exits").success());
}
