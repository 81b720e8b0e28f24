//! The rule comment parser on arbitrary strings: no panic, and whatever parses prints back
//! as the same comment.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(id) = switcheroo::Identity::parse(s) {
            assert_eq!(id.to_string(), s);
        }
    }
});
