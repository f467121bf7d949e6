//! The SVG figures, written by hand: ASR per round (`asr.svg`) and the
//! strict verdict's heat map (`verdict.svg`).

use std::fmt::Write as _;

use crate::defense::Defense;
use crate::experiment::RoundRecord;
use crate::scenario::Scenario;
use crate::verdict::{ASR_TOLERANCE, LOSS_FACTOR, Verdict, defenses};

const COLORS: [&str; 15] = [
    "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#98df8a", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#d62728", "#17becf", "#aec7e8", "#ffbb78", "#c5b0d5",
];

/// An SVG with one panel per malicious share: ASR per round, one line per
/// defense.
pub fn asr_svg(records: &[RoundRecord]) -> String {
    let mut shares: Vec<(Scenario, u32)> = records
        .iter()
        .map(|r| (r.scenario, r.malicious_percent))
        .collect();
    shares.sort_unstable();
    shares.dedup();
    let mut defenses: Vec<Defense> = records.iter().map(|r| r.defense).collect();
    defenses.sort_unstable();
    defenses.dedup();
    let rounds = records.iter().map(|r| r.round).max().unwrap_or(1).max(1);
    let (pw, ph, margin, legend_w) = (320.0, 240.0, 45.0, 150.0);
    let width = margin + shares.len() as f64 * (pw + margin) + legend_w;
    let height = ph + 2.0 * margin + 10.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, &(scenario, share)) in shares.iter().enumerate() {
        let x0 = margin + i as f64 * (pw + margin);
        let y0 = margin;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}{share} % malicious</text>"#,
            x0 + pw / 2.0,
            y0 - 12.0,
            if scenario == Scenario::Poison {
                String::new()
            } else {
                format!("{}: ", scenario.name())
            }
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
        );
        for tick in 0..=4 {
            let v = tick as f64 / 4.0;
            let y = y0 + ph * (1.0 - v);
            let _ = writeln!(
                svg,
                r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{v:.2}</text>"##,
                x0 + pw,
                x0 - 4.0,
                y + 4.0
            );
        }
        for r in 0..=rounds {
            if rounds <= 12 || r % 2 == 0 {
                let x = x0 + pw * r as f64 / rounds as f64;
                let _ = writeln!(
                    svg,
                    r#"<text x="{x}" y="{}" text-anchor="middle">{r}</text>"#,
                    y0 + ph + 14.0
                );
            }
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">round</text>"#,
            x0 + pw / 2.0,
            y0 + ph + 30.0
        );
        if i == 0 {
            let _ = writeln!(
                svg,
                r#"<text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">attack success rate</text>"#,
                y0 + ph / 2.0,
                y0 + ph / 2.0
            );
        }
        for (d, defense) in defenses.iter().enumerate() {
            let mut points: Vec<(usize, f64)> = records
                .iter()
                .filter(|r| {
                    r.scenario == scenario && r.malicious_percent == share && r.defense == *defense
                })
                .map(|r| (r.round, r.asr))
                .collect();
            points.sort_by_key(|p| p.0);
            if points.is_empty() {
                continue;
            }
            let path: Vec<String> = points
                .iter()
                .map(|(r, a)| {
                    format!(
                        "{:.1},{:.1}",
                        x0 + pw * *r as f64 / rounds as f64,
                        y0 + ph * (1.0 - a.clamp(0.0, 1.0))
                    )
                })
                .collect();
            let dash = if defense.level().is_some() {
                ""
            } else {
                r#" stroke-dasharray="5,3""#
            };
            // Shadow and evidence level often coincide: draw the shadow line
            // wider so it stays visible under the evidence line.
            let width = if *defense == Defense::Shadow {
                4.0
            } else {
                1.6
            };
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="{width}"{dash} points="{}"/>"#,
                COLORS[d % COLORS.len()],
                path.join(" ")
            );
        }
    }
    let lx = margin + shares.len() as f64 * (pw + margin);
    for (d, defense) in defenses.iter().enumerate() {
        let y = margin + 10.0 + d as f64 * 18.0;
        let dash = if defense.level().is_some() {
            ""
        } else {
            r#" stroke-dasharray="5,3""#
        };
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            COLORS[d % COLORS.len()],
            lx + 30.0,
            y + 4.0,
            defense.name()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A heat map (`verdict.svg`): one row per defense, one column per
/// (scenario, share); green holds, red fails, grey n/a; each cell shows the
/// worst ASR − clean and the worst loss / oracle.
pub fn verdict_svg(verdicts: &[Verdict]) -> String {
    let rows = defenses(verdicts);
    let mut columns: Vec<(Scenario, u32)> = Vec::new();
    for v in verdicts {
        if !columns.contains(&(v.scenario, v.percent)) {
            columns.push((v.scenario, v.percent));
        }
    }
    columns.sort_by_key(|&(s, p)| (p, s));
    let (cw, ch, left, top) = (78.0, 34.0, 170.0, 130.0);
    let width = left + columns.len() as f64 * cw + 20.0;
    let height = top + rows.len() as f64 * ch + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="10">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (c, (scenario, percent)) in columns.iter().enumerate() {
        let x = left + c as f64 * cw + cw / 2.0;
        let _ = writeln!(
            svg,
            r#"<text x="{x}" y="{}" transform="rotate(-45 {x} {})" font-size="11">{} @ {percent} %</text>"#,
            top - 8.0,
            top - 8.0,
            scenario
        );
    }
    for (r, defense) in rows.iter().enumerate() {
        let y = top + r as f64 * ch;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end" font-size="11">{}</text>"#,
            left - 6.0,
            y + ch / 2.0 + 4.0,
            defense.name()
        );
        for (c, key) in columns.iter().enumerate() {
            let x = left + c as f64 * cw;
            let cell = verdicts
                .iter()
                .find(|v| v.defense == *defense && (v.scenario, v.percent) == *key);
            let (fill, lines) = match cell {
                Some(v) if v.holds.is_some() => (
                    if v.holds == Some(true) {
                        "#7fc97f"
                    } else {
                        "#f0027f"
                    },
                    [
                        format!("ASR {:+.2}", v.worst_asr_excess),
                        format!("loss ×{:.2}", v.worst_loss_ratio),
                    ],
                ),
                Some(_) => ("#cccccc", ["n/a".to_owned(), String::new()]),
                None => ("#f5f5f5", [String::new(), String::new()]),
            };
            let _ = writeln!(
                svg,
                r##"<rect x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{fill}" stroke="white"/><text x="{}" y="{}" text-anchor="middle">{}</text><text x="{}" y="{}" text-anchor="middle">{}</text>"##,
                x + cw / 2.0,
                y + 14.0,
                lines[0],
                x + cw / 2.0,
                y + 27.0,
                lines[1]
            );
        }
    }
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{}">green holds, red fails (worst over seeds): final ASR ≤ clean + {ASR_TOLERANCE} and benign loss ≤ oracle × {LOSS_FACTOR}</text>"#,
        height - 14.0
    );
    svg.push_str("</svg>\n");
    svg
}
