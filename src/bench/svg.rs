//! The chart of `dynkv bench compare`, written as SVG text by hand (no plotting crate): three
//! bar panels side by side — throughput, p99 latency, and the stale fraction of reads in the
//! shortest gap bucket — one bar per configuration, each labelled with its value.

use super::report::CompareReport;
use std::fmt::Write as _;

const PANEL_WIDTH: f64 = 300.0;
const PANEL_HEIGHT: f64 = 220.0;
const MARGIN: f64 = 40.0;
const TITLE_HEIGHT: f64 = 40.0;
const COLOURS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
];

/// Escapes text for an XML text node or attribute.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            other => escaped.push(other),
        }
    }
    escaped
}

struct Panel {
    title: String,
    values: Vec<f64>,
    format: fn(f64) -> String,
}

pub fn compare_chart(report: &CompareReport) -> String {
    let labels: Vec<String> = report.configs.iter().map(|c| c.label.clone()).collect();
    let first_bucket = report
        .configs
        .first()
        .and_then(|config| config.staleness.first())
        .map(|bucket| bucket.bucket.clone())
        .unwrap_or_default();
    let panels = [
        Panel {
            title: "throughput (ops/s)".into(),
            values: report
                .configs
                .iter()
                .map(|c| c.result.throughput_ops_per_sec)
                .collect(),
            format: |value| format!("{value:.0}"),
        },
        Panel {
            title: "p99 latency (ms)".into(),
            values: report
                .configs
                .iter()
                .map(|c| c.result.latency_ms.as_ref().map_or(0.0, |l| l.p99))
                .collect(),
            format: |value| format!("{value:.2}"),
        },
        Panel {
            title: format!("stale reads, gap {first_bucket} (%)"),
            values: report
                .configs
                .iter()
                .map(|c| {
                    c.staleness
                        .first()
                        .and_then(|bucket| bucket.stale_fraction)
                        .unwrap_or(0.0)
                        * 100.0
                })
                .collect(),
            format: |value| format!("{value:.1}"),
        },
    ];
    let width = MARGIN + panels.len() as f64 * (PANEL_WIDTH + MARGIN);
    let height = TITLE_HEIGHT + PANEL_HEIGHT + 3.0 * MARGIN;
    let mut svg = String::new();
    let _ = writeln!(svg, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN}" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(&format!(
            "dynkv bench compare: workload {}, {} workers, {}-byte values",
            report.settings.workload, report.settings.workers, report.settings.value_bytes
        ))
    );
    for (index, panel) in panels.iter().enumerate() {
        let left = MARGIN + index as f64 * (PANEL_WIDTH + MARGIN);
        let top = TITLE_HEIGHT + MARGIN;
        let bottom = top + PANEL_HEIGHT;
        let _ = writeln!(svg, r#"<g class="panel">"#);
        let _ = writeln!(
            svg,
            r#"<text x="{left:.1}" y="{:.1}" font-weight="bold">{}</text>"#,
            top - 12.0,
            escape(&panel.title)
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{left:.1}" y1="{bottom:.1}" x2="{:.1}" y2="{bottom:.1}" stroke="#333"/>"##,
            left + PANEL_WIDTH
        );
        let max = panel.values.iter().cloned().fold(0.0f64, f64::max);
        let slot = PANEL_WIDTH / panel.values.len().max(1) as f64;
        for (bar, value) in panel.values.iter().enumerate() {
            let bar_height = if max > 0.0 {
                value / max * (PANEL_HEIGHT - 20.0)
            } else {
                0.0
            };
            let x = left + bar as f64 * slot + slot * 0.15;
            let bar_width = slot * 0.7;
            let y = bottom - bar_height;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{bar_width:.1}" height="{bar_height:.1}" fill="{}"/>"#,
                COLOURS[bar % COLOURS.len()]
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x + bar_width / 2.0,
                y - 4.0,
                escape(&(panel.format)(*value))
            );
            // "W=quorum/R=quorum" on two lines, so neighbouring labels do not overlap.
            let label = labels.get(bar).map(String::as_str).unwrap_or("");
            let _ = write!(svg, r#"<text text-anchor="middle">"#);
            for (line, part) in label.split('/').enumerate() {
                let _ = write!(
                    svg,
                    r#"<tspan x="{:.1}" y="{:.1}">{}</tspan>"#,
                    x + bar_width / 2.0,
                    bottom + 16.0 + 14.0 * line as f64,
                    escape(part)
                );
            }
            let _ = writeln!(svg, "</text>");
        }
        let _ = writeln!(svg, "</g>");
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{ConfigReport, PhaseReport, Recorder, RunSettings};
    use crate::bench::staleness::StalenessTally;
    use crate::bench::workload::Operation;
    use std::time::Duration;

    /// A small XML well-formedness check: balanced, properly nested tags, quoted attributes,
    /// no stray `<` or unescaped `&` in text. Returns the element names in document order.
    fn check_well_formed(document: &str) -> Result<Vec<String>, String> {
        let mut stack: Vec<String> = Vec::new();
        let mut elements = Vec::new();
        let mut rest = document;
        while let Some(start) = rest.find('<') {
            check_text(&rest[..start])?;
            let end = rest[start..].find('>').ok_or("unterminated tag")? + start;
            let tag = &rest[start + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') {
                if !tag.ends_with('?') {
                    return Err(format!("bad declaration <{tag}>"));
                }
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                match stack.pop() {
                    Some(open) if open == name.trim() => continue,
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name: String = body.chars().take_while(|c| !c.is_whitespace()).collect();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(format!("bad element name in <{tag}>"));
            }
            if !body.matches('"').count().is_multiple_of(2) || body.contains('<') {
                return Err(format!("bad attributes in <{tag}>"));
            }
            if stack.is_empty() && !elements.is_empty() {
                return Err("more than one root element".into());
            }
            elements.push(name.clone());
            if !self_closing {
                stack.push(name);
            }
        }
        check_text(rest)?;
        if !stack.is_empty() {
            return Err(format!("unclosed elements {stack:?}"));
        }
        Ok(elements)
    }

    fn check_text(text: &str) -> Result<(), String> {
        for (index, _) in text.match_indices('&') {
            let entity = &text[index..];
            if !["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                .iter()
                .any(|known| entity.starts_with(known))
            {
                return Err(format!("unescaped & in {text:?}"));
            }
        }
        Ok(())
    }

    fn report() -> CompareReport {
        let mut recorder = Recorder::new();
        recorder.record(Operation::Read, Duration::from_millis(2));
        let mut tally = StalenessTally::default();
        tally.record(10, true);
        tally.record(20, false);
        let config = |label: &str| ConfigReport {
            label: label.into(),
            w: "one".into(),
            r: "all".into(),
            result: PhaseReport::new(&recorder, Duration::from_secs(1)),
            fraction_of_ceiling: Some(0.5),
            staleness: tally.buckets(),
        };
        CompareReport {
            settings: RunSettings {
                workload: "A".into(),
                key_distribution: "uniform".into(),
                records: 1,
                value_bytes: 100,
                workers: 1,
                r: "-".into(),
                w: "-".into(),
                duration_secs: Some(1.0),
                operations: None,
                seed: 1,
                nodes: vec![],
            },
            ceiling: None,
            configs: vec![config("W=1/R=3"), config("W=<&>/R=\"x\"")],
        }
    }

    #[test]
    fn chart_is_well_formed_svg_with_a_bar_per_config_and_panel() {
        let svg = compare_chart(&report());
        let elements = check_well_formed(&svg).unwrap_or_else(|error| panic!("{error}\n{svg}"));
        assert_eq!(elements[0], "svg");
        assert!(svg.contains(r#"xmlns="http://www.w3.org/2000/svg""#));
        assert_eq!(elements.iter().filter(|e| *e == "g").count(), 3);
        // A background plus one bar per configuration in each of the three panels.
        assert_eq!(elements.iter().filter(|e| *e == "rect").count(), 1 + 3 * 2);
        assert!(
            svg.contains(">W=&lt;&amp;&gt;</tspan>") && svg.contains(">R=&quot;x&quot;</tspan>")
        );
        assert!(svg.contains("50.0"), "stale percent label:\n{svg}");
    }

    #[test]
    fn the_checker_rejects_broken_documents() {
        assert!(check_well_formed("<svg><g></svg>").is_err());
        assert!(check_well_formed("<svg>a & b</svg>").is_err());
        assert!(check_well_formed(r#"<svg x="1></svg>"#).is_err());
        assert!(check_well_formed("<svg/><svg/>").is_err());
    }

    #[test]
    fn an_empty_comparison_still_renders() {
        let mut report = report();
        report.configs.clear();
        assert!(check_well_formed(&compare_chart(&report)).is_ok());
    }
}
