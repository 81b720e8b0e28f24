//! What `status` and `check` print: tables for people, JSON for scripts.

use std::time::{SystemTime, UNIX_EPOCH};
use switcheroo::check::Finding;
use switcheroo::{Instance, Rule};

/// Lines of cells, each column as wide as its widest cell, two spaces apart.
fn columns(rows: &[Vec<String>]) -> String {
    let mut widths = vec![0; rows.first().map_or(0, Vec::len)];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// `2026-12-01T20:14:03Z`: a UTC time, to the second.
pub fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The instances, one line each.
pub fn instance_table(instances: &[Instance]) -> String {
    let mut rows = vec![[
        "NAMESPACE",
        "PID",
        "ROLE",
        "SINCE",
        "PORTS",
        "CONNECTIONS",
        "PROCESSES",
    ]
    .map(str::to_owned)
    .to_vec()];
    for i in instances {
        let ports: Vec<String> = i
            .mappings
            .iter()
            .map(|m| format!("{}->{}", m.public, m.internal))
            .collect();
        let processes: Vec<String> = i
            .processes
            .iter()
            .map(|p| format!("{} ({})", p.program, p.pid))
            .collect();
        rows.push(vec![
            i.namespace.clone(),
            i.pid.to_string(),
            i.standing.to_string(),
            i.since.map_or("-".to_owned(), utc),
            if ports.is_empty() {
                "-".into()
            } else {
                ports.join(",")
            },
            i.connections.to_string(),
            if processes.is_empty() {
                "-".into()
            } else {
                processes.join(",")
            },
        ]);
    }
    columns(&rows)
}

/// The rules, one line each, as the kernel holds them.
pub fn rule_table(rules: &[Rule]) -> String {
    let mut rows = vec![[
        "NAMESPACE",
        "FAMILY",
        "CHAIN",
        "PROTO",
        "PORT",
        "INTERNAL",
        "PID",
        "ROLE",
    ]
    .map(str::to_owned)
    .to_vec()];
    for r in rules {
        rows.push(vec![
            r.namespace.clone(),
            r.family.to_string(),
            r.chain.to_string(),
            r.protocol.to_string(),
            r.public_port.to_string(),
            r.internal_port.to_string(),
            r.pid.to_string(),
            r.role_name(),
        ]);
    }
    columns(&rows)
}

/// `{"instances": [...], "rules": [...]}`.
pub fn status_json(instances: &[Instance], rules: &[Rule]) -> String {
    let instances: Vec<String> = instances
        .iter()
        .map(|i| {
            let mappings: Vec<String> = i
                .mappings
                .iter()
                .map(|m| {
                    format!(
                        "{{\"protocol\":\"{}\",\"port\":{},\"internal_port\":{}}}",
                        m.public.protocol, m.public.number, m.internal
                    )
                })
                .collect();
            let processes: Vec<String> = i
                .processes
                .iter()
                .map(|p| format!("{{\"pid\":{},\"program\":{}}}", p.pid, json_string(&p.program)))
                .collect();
            format!(
                "{{\"namespace\":{},\"pid\":{},\"role\":\"{}\",\"since\":{},\"ports\":[{}],\"connections\":{{\"tcp\":{},\"udp\":{}}},\"processes\":[{}]}}",
                json_string(&i.namespace),
                i.pid,
                i.standing,
                i.since.map_or("null".to_owned(), |t| json_string(&utc(t))),
                mappings.join(","),
                i.connections.tcp,
                i.connections.udp,
                processes.join(","),
            )
        })
        .collect();
    let rules: Vec<String> = rules
        .iter()
        .map(|r| {
            format!(
                "{{\"namespace\":{},\"family\":\"{}\",\"chain\":\"{}\",\"handle\":{},\"protocol\":\"{}\",\"port\":{},\"internal_port\":{},\"pid\":{},\"start\":{},\"alive\":{},\"role\":{}{}}}",
                json_string(&r.namespace),
                r.family,
                r.chain,
                r.handle.get(),
                r.protocol,
                r.public_port,
                r.internal_port,
                r.pid,
                r.start.map_or("null".to_owned(), |s| s.to_string()),
                r.alive,
                json_string(&if r.alive { r.role.to_string() } else { "dead".to_owned() }),
                r.weight.map_or(String::new(), |w| format!(",\"weight\":{w}")),
            )
        })
        .collect();
    format!(
        "{{\"instances\":[{}],\"rules\":[{}]}}\n",
        instances.join(","),
        rules.join(",")
    )
}

/// What `check` prints for people.
pub fn findings_text(findings: &[Finding], blockers: usize) -> String {
    let mut text = String::new();
    for f in findings {
        text.push_str(&format!("{:<8} {:<9} {}\n", f.level, f.topic, f.what));
        if let Some(fix) = &f.fix {
            text.push_str(&format!("{:<8} {:<9} fix:  {fix}\n", "", ""));
        }
        if let Some(keep) = &f.keep {
            text.push_str(&format!("{:<8} {:<9} keep: {keep}\n", "", ""));
        }
    }
    text.push_str(&match blockers {
        0 => "nothing blocks a deploy\n".to_owned(),
        n => format!("{n} blocker(s): fix them before the first deploy\n"),
    });
    text
}

/// `{"findings": [...], "blockers": N}`.
pub fn findings_json(findings: &[Finding], blockers: usize) -> String {
    let items: Vec<String> = findings
        .iter()
        .map(|f| {
            format!(
                "{{\"level\":\"{}\",\"topic\":\"{}\",\"what\":{},\"fix\":{},\"keep\":{}}}",
                f.level.to_string().to_lowercase(),
                f.topic,
                json_string(&f.what),
                f.fix.as_deref().map_or("null".to_owned(), json_string),
                f.keep.as_deref().map_or("null".to_owned(), json_string)
            )
        })
        .collect();
    format!(
        "{{\"findings\":[{}],\"blockers\":{blockers}}}\n",
        items.join(",")
    )
}

pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn json_is_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(status_json(&[], &[]), "{\"instances\":[],\"rules\":[]}\n");
    }

    #[test]
    fn times_are_utc_to_the_second() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_764_620_043);
        assert_eq!(utc(t), "2025-12-01T20:14:03Z");
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["A".to_owned(), "BB".to_owned()],
            vec!["ccc".to_owned(), "d".to_owned()],
        ];
        assert_eq!(columns(&rows), "A    BB\nccc  d\n");
    }
}
