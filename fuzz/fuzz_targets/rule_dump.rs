//! The parser of NEWRULE messages (dumps and echoes) on arbitrary bytes: it must not panic,
//! and a rule it accepts as ours must carry a usable redirect.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(rule) = switcheroo_sys::parse_rule_message(data) {
        if let Some(r) = rule.redirect {
            assert!(r.public_port != 0 && r.to_port != 0);
            assert!(r.comment.len() <= switcheroo_sys::COMMENT_MAX);
        }
    }
});
