//! The HTML report of a load-test run (`--report FILE`): one self-contained file (no
//! script, no external font, style sheet or image) with the run's summary table (the
//! same figures as `--json`), per endpoint throughput and p50/p90/p99 latency over time
//! and the latency distribution, errors by status over time, the invariant verdict, the
//! parameters and the machine. Every chart is an inline SVG with a title, a description
//! and the numbers behind it in a `<details>` table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::loadtest::stats::{Distribution, EndpointSummary};
use crate::loadtest::svg::{escape, Chart, Scale, Series, Shape};
use crate::loadtest::timeline::EndpointSeries;
use crate::loadtest::{LoadtestArgs, Report};

/// Ranges of the latency distribution chart.
pub const HISTOGRAM_BINS: usize = 40;

/// Everything a report is made of.
pub struct Input<'a> {
    /// The run's result (what `--json` prints).
    pub report: &'a Report,
    /// The options of the run.
    pub args: &'a LoadtestArgs,
    /// Width of one time bucket.
    pub width_secs: f64,
    /// Measured-phase figures per endpoint over time.
    pub series: Vec<EndpointSeries>,
    /// Measured-phase latency distribution per endpoint.
    pub distributions: Vec<Distribution>,
    /// Where the harness ran.
    pub machine: Machine,
}

/// The machine the harness ran on.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// CPUs available to the process.
    pub cores: usize,
    /// `/proc/loadavg`'s 1, 5 and 15 minute averages at the end of the run.
    pub load_average: Option<String>,
    /// The kernel release.
    pub kernel: Option<String>,
    /// Operating system and architecture.
    pub platform: String,
}

impl Machine {
    /// Reads the machine's figures; what cannot be read is left out.
    pub fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        Machine {
            cores: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1),
            load_average: read("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
            kernel: read("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()),
            platform: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

/// The element id of the `index`-th endpoint row (`ep0-procure-busy`): unique, and
/// safe in an id whatever the label holds.
pub fn endpoint_id(index: usize, label: &str) -> String {
    let mut slug = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    format!("ep{index}-{}", slug.trim_matches('-'))
}

/// Comma-separated URLs, each through [`redact`].
fn redact_list(urls: &str) -> String {
    urls.split(',').map(redact).collect::<Vec<_>>().join(",")
}

/// A URL with any user name and password taken out, so the report never shows them.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

const STYLE: &str = "
body { font-family: sans-serif; margin: 1rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }
th[scope=row], caption { text-align: left; }
figure { margin: 1rem 0; }
svg { max-width: 100%; height: auto; }
.ok { color: #006b3c; } .violated { color: #b00020; }
dt { font-weight: bold; } dd { margin: 0 0 0.3rem 1rem; }
";

/// Renders the report.
pub fn html(input: &Input<'_>) -> String {
    let r = input.report;
    let mut out = String::new();
    let title = format!(
        "Load test: {} against {}",
        r.scenario.as_str(),
        redact_list(&r.target)
    );
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\
         <title>{}</title><style>{STYLE}</style></head><body><main>\n<h1>{}</h1>\n",
        escape(&title),
        escape(&title)
    );
    let verdict = if r.passed() { "ok" } else { "violated" };
    let _ = writeln!(
        out,
        "<p id=\"verdict\" class=\"{verdict}\">Invariants: <strong>{}</strong>. Run <code>{}</code>: concurrency {}, {:.1} s measured, {} cycles ({:.1}/s), {:.1} successful ops/s.</p>",
        if r.passed() { "OK" } else { "VIOLATED" },
        escape(&r.run_id),
        r.concurrency,
        r.elapsed_secs,
        r.cycles,
        r.cycles_per_sec,
        r.throughput
    );
    summary(
        &mut out,
        "endpoints",
        "Measured requests per endpoint",
        &r.endpoints,
    );
    if !r.setup.is_empty() {
        summary(&mut out, "setup", "Setup requests per endpoint", &r.setup);
    }
    for (i, e) in r.endpoints.iter().enumerate() {
        let id = endpoint_id(i, &e.endpoint);
        let series = input.series.iter().find(|s| s.endpoint == e.endpoint);
        let dist = input
            .distributions
            .iter()
            .find(|d| d.endpoint == e.endpoint);
        endpoint_section(&mut out, &id, e, series, dist, input.width_secs);
    }
    errors_section(&mut out, &input.series);
    invariants_section(&mut out, r);
    if let Some(rpcs) = &r.etcd_rpcs {
        let _ = write!(
            out,
            "<section id=\"etcd-rpcs\"><h2>etcd RPCs per operation</h2><table><caption>{}</caption><thead><tr><th scope=\"col\">step</th><th scope=\"col\">ops</th><th scope=\"col\">Txn</th><th scope=\"col\">Range</th><th scope=\"col\">Txn/op</th><th scope=\"col\">Range/op</th></tr></thead><tbody>",
            escape(&rpcs.attribution)
        );
        for (step, s) in &rpcs.steps {
            let _ = write!(
                out,
                "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                escape(step),
                s.ops,
                s.txn,
                s.range,
                s.txn_per_op,
                s.range_per_op
            );
        }
        out.push_str("</tbody></table></section>\n");
    }
    parameters_section(&mut out, input.args, r);
    machine_section(&mut out, &input.machine);
    out.push_str("</main></body></html>\n");
    out
}

fn summary(out: &mut String, id: &str, caption: &str, rows: &[EndpointSummary]) {
    let _ = write!(
        out,
        "<section id=\"{id}-summary\"><h2>{}</h2><table id=\"{id}\"><caption>{} (latencies in ms)</caption><thead><tr>",
        escape(caption),
        escape(caption)
    );
    for h in [
        "endpoint", "count", "2xx", "ops/s", "mean", "p50", "p90", "p99", "max", "errors",
    ] {
        let _ = write!(out, "<th scope=\"col\">{h}</th>");
    }
    out.push_str("</tr></thead><tbody>\n");
    for (i, e) in rows.iter().enumerate() {
        // The exact value is in `data-value` (the same number `--json` prints); the
        // text is rounded for reading. Latencies are whole microseconds, so three
        // decimals of milliseconds are exact.
        let _ = write!(
            out,
            "<tr data-endpoint=\"{}\"><th scope=\"row\">{}</th>\
             <td data-field=\"count\" data-value=\"{}\">{}</td>\
             <td data-field=\"ok\" data-value=\"{}\">{}</td>\
             <td data-field=\"ops_per_sec\" data-value=\"{}\">{:.1}</td>",
            escape(&endpoint_id(i, &e.endpoint)),
            escape(&e.endpoint),
            e.count,
            e.count,
            e.ok,
            e.ok,
            e.ops_per_sec,
            e.ops_per_sec
        );
        for (field, v) in [
            ("mean_ms", e.mean_ms),
            ("p50_ms", e.p50_ms),
            ("p90_ms", e.p90_ms),
            ("p99_ms", e.p99_ms),
            ("max_ms", e.max_ms),
        ] {
            let _ = write!(
                out,
                "<td data-field=\"{field}\" data-value=\"{v}\">{v:.3}</td>"
            );
        }
        let _ = writeln!(out, "<td>{}</td></tr>", escape(&errors_text(&e.errors)));
    }
    out.push_str("</tbody></table></section>\n");
}

fn errors_text(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "-".into();
    }
    errors
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn endpoint_section(
    out: &mut String,
    id: &str,
    e: &EndpointSummary,
    series: Option<&EndpointSeries>,
    dist: Option<&Distribution>,
    width_secs: f64,
) {
    let name = escape(&e.endpoint);
    let _ = writeln!(
        out,
        "<section id=\"section-{}\" data-endpoint=\"{}\"><h2>Endpoint {name}</h2>",
        escape(id),
        escape(id)
    );
    let points = series.map(|s| s.points.as_slice()).unwrap_or(&[]);
    let mid = |p: &crate::loadtest::timeline::Point| p.start_secs + p.width_secs / 2.0;
    let attrs = |kind: &str| {
        vec![
            ("data-endpoint".to_owned(), id.to_owned()),
            ("data-chart".to_owned(), kind.to_owned()),
        ]
    };
    let throughput = Chart {
        id: format!("{id}-throughput"),
        attrs: attrs("throughput"),
        title: format!("{}: requests per second over time", e.endpoint),
        desc: format!(
            "Requests of {} that ended in each {width_secs} s interval of the measured phase, per second; {} in all.",
            e.endpoint, e.count
        ),
        x_label: "seconds into the measured phase".into(),
        y_label: "requests/s".into(),
        x_scale: Scale::Linear,
        series: vec![Series {
            name: "requests/s".into(),
            shape: Shape::Line(points.iter().map(|p| (mid(p), p.per_sec)).collect()),
        }],
    };
    figure(out, &throughput, |t| {
        t.push_str("<thead><tr><th scope=\"col\">from s</th><th scope=\"col\">requests</th><th scope=\"col\">2xx</th><th scope=\"col\">requests/s</th></tr></thead><tbody>");
        for p in points {
            let _ = write!(
                t,
                "<tr><td>{:.0}</td><td>{}</td><td>{}</td><td>{:.1}</td></tr>",
                p.start_secs, p.count, p.ok, p.per_sec
            );
        }
        t.push_str("</tbody>");
    });
    // Buckets with no answered request have no latency; leave them out of the lines.
    let answered: Vec<_> = points.iter().filter(|p| p.count > 0).collect();
    let line = |q: fn(&crate::loadtest::timeline::Point) -> f64| {
        Shape::Line(answered.iter().map(|p| (mid(p), q(p))).collect())
    };
    let latency = Chart {
        id: format!("{id}-latency"),
        attrs: attrs("latency"),
        title: format!("{}: p50, p90 and p99 latency over time", e.endpoint),
        desc: format!(
            "Latency percentiles of the requests of {} that ended in each {width_secs} s interval; over the whole phase p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms.",
            e.endpoint, e.p50_ms, e.p90_ms, e.p99_ms
        ),
        x_label: "seconds into the measured phase".into(),
        y_label: "latency (ms)".into(),
        x_scale: Scale::Linear,
        series: vec![
            Series {
                name: "p50".into(),
                shape: line(|p| p.p50_ms),
            },
            Series {
                name: "p90".into(),
                shape: line(|p| p.p90_ms),
            },
            Series {
                name: "p99".into(),
                shape: line(|p| p.p99_ms),
            },
        ],
    };
    figure(out, &latency, |t| {
        t.push_str("<thead><tr><th scope=\"col\">from s</th><th scope=\"col\">p50 ms</th><th scope=\"col\">p90 ms</th><th scope=\"col\">p99 ms</th></tr></thead><tbody>");
        for p in &answered {
            let _ = write!(
                t,
                "<tr><td>{:.0}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
                p.start_secs, p.p50_ms, p.p90_ms, p.p99_ms
            );
        }
        t.push_str("</tbody>");
    });
    let bins = dist.map(|d| d.bins.as_slice()).unwrap_or(&[]);
    let histogram = Chart {
        id: format!("{id}-histogram"),
        attrs: attrs("histogram"),
        title: format!("{}: latency distribution", e.endpoint),
        desc: format!(
            "How many answered requests of {} took how long, in ranges evenly spaced on a logarithmic scale from {:.3} ms to {:.3} ms.",
            e.endpoint,
            bins.first().map(|b| b.low_ms).unwrap_or(0.0),
            bins.last().map(|b| b.high_ms).unwrap_or(0.0)
        ),
        x_label: "latency (ms, log scale)".into(),
        y_label: "requests".into(),
        x_scale: Scale::Log,
        series: vec![Series {
            name: "requests".into(),
            shape: Shape::Bars(
                bins.iter()
                    .map(|b| (b.low_ms, b.high_ms, b.count as f64))
                    .collect(),
            ),
        }],
    };
    figure(out, &histogram, |t| {
        t.push_str("<thead><tr><th scope=\"col\">from ms</th><th scope=\"col\">to ms</th><th scope=\"col\">requests</th></tr></thead><tbody>");
        for b in bins {
            let _ = write!(
                t,
                "<tr><td>{:.3}</td><td>{:.3}</td><td>{}</td></tr>",
                b.low_ms, b.high_ms, b.count
            );
        }
        t.push_str("</tbody>");
    });
    out.push_str("</section>\n");
}

/// A chart with its caption and its numbers in a `<details>` table (`rows` writes the
/// table's head and body).
fn figure(out: &mut String, chart: &Chart, rows: impl FnOnce(&mut String)) {
    let _ = write!(
        out,
        "<figure><figcaption>{}</figcaption>{}<details><summary>Data of “{}”</summary><table>",
        escape(&chart.title),
        chart.render(),
        escape(&chart.title)
    );
    rows(out);
    out.push_str("</table></details></figure>\n");
}

fn errors_section(out: &mut String, series: &[EndpointSeries]) {
    // Statuses summed over every endpoint, per bucket.
    let buckets = series.first().map(|s| s.points.len()).unwrap_or(0);
    let mut by_status: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for s in series {
        for (i, p) in s.points.iter().enumerate() {
            for (status, n) in &p.errors {
                by_status
                    .entry(status.as_str())
                    .or_insert_with(|| vec![0; buckets])[i] += n;
            }
        }
    }
    let starts: Vec<(f64, f64)> = series
        .first()
        .map(|s| {
            s.points
                .iter()
                .map(|p| (p.start_secs, p.width_secs))
                .collect()
        })
        .unwrap_or_default();
    let total: u64 = by_status.values().flatten().sum();
    let chart = Chart {
        id: "errors-over-time".into(),
        attrs: vec![("data-chart".into(), "errors".into())],
        title: "Non-2xx answers and transport errors by status over time".into(),
        desc: format!(
            "Answers other than 2xx (by status) and requests with no answer (transport), over all endpoints, per second of each interval; {total} in all."
        ),
        x_label: "seconds into the measured phase".into(),
        y_label: "answers/s".into(),
        x_scale: Scale::Linear,
        series: by_status
            .iter()
            .map(|(status, counts)| Series {
                name: (*status).to_owned(),
                shape: Shape::Line(
                    counts
                        .iter()
                        .zip(&starts)
                        .map(|(n, (s, w))| (s + w / 2.0, *n as f64 / w))
                        .collect(),
                ),
            })
            .collect(),
    };
    out.push_str("<section id=\"errors\"><h2>Errors by status</h2>\n");
    figure(out, &chart, |t| {
        t.push_str("<thead><tr><th scope=\"col\">from s</th>");
        for status in by_status.keys() {
            let _ = write!(t, "<th scope=\"col\">{}</th>", escape(status));
        }
        t.push_str("</tr></thead><tbody>");
        for (i, (start, _)) in starts.iter().enumerate() {
            let _ = write!(t, "<tr><td>{start:.0}</td>");
            for counts in by_status.values() {
                let _ = write!(t, "<td>{}</td>", counts[i]);
            }
            t.push_str("</tr>");
        }
        t.push_str("</tbody>");
    });
    out.push_str("</section>\n");
}

fn invariants_section(out: &mut String, r: &Report) {
    let inv = &r.invariants;
    let _ = write!(
        out,
        "<section id=\"invariants\"><h2>Invariants</h2><table><caption>Invariant checks: {}</caption><tbody>",
        if inv.ok { "every one held" } else { "VIOLATED" }
    );
    for (name, v) in [
        ("violations", inv.violations),
        ("procured", inv.procured),
        ("released", inv.released),
        ("unreleased", inv.unreleased),
        ("instances submitted", inv.instances_submitted),
        ("instances completed", inv.instances_completed),
        ("5xx answers", inv.server_errors),
    ] {
        let _ = write!(out, "<tr><th scope=\"row\">{name}</th><td>{v}</td></tr>");
    }
    out.push_str("</tbody></table>");
    if !inv.messages.is_empty() {
        out.push_str("<ul id=\"violations\">");
        for m in &inv.messages {
            let _ = write!(out, "<li>{}</li>", escape(m));
        }
        out.push_str("</ul>");
    }
    out.push_str("</section>\n");
}

fn parameters_section(out: &mut String, a: &LoadtestArgs, r: &Report) {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let urls: Vec<String> = a.url.iter().map(|u| redact(u)).collect();
    let rows: Vec<(&str, String)> = vec![
        ("scenario", a.scenario.as_str().into()),
        ("target", redact_list(&r.target)),
        ("service URL(s)", urls.join(", ")),
        (
            "API token",
            if a.token.is_some() {
                "given (not shown)"
            } else {
                "none"
            }
            .into(),
        ),
        ("env", a.env.clone()),
        ("workflows", a.workflows.to_string()),
        ("deployables", a.deployable_count().to_string()),
        ("skip register", a.skip_register.to_string()),
        ("duration", format!("{:?}", a.time_limit())),
        ("iterations", opt(a.iterations.map(|n| n.to_string()))),
        ("pick", format!("{:?}", a.pick)),
        ("min pod count", a.min_pod_count.to_string()),
        ("max retry delay ms", a.max_retry_delay_ms.to_string()),
        ("rate", a.rate.to_string()),
        ("think ms", a.think_ms.to_string()),
        ("cpu / memory GB", format!("{} / {}", a.cpu, a.memory_gb)),
        ("dnd ratio", a.dnd_ratio.to_string()),
        ("etcd endpoints", a.etcd_endpoints.join(", ")),
        ("etcd prefix", a.etcd_prefix.clone()),
        ("hot key", a.hot_key.to_string()),
        ("request timeout ms", a.request_timeout_ms.to_string()),
        ("run id", r.run_id.clone()),
    ];
    dl(out, "parameters", "Parameters", &rows);
}

fn machine_section(out: &mut String, m: &Machine) {
    let rows: Vec<(&str, String)> = vec![
        ("cores", m.cores.to_string()),
        (
            "load average (1, 5, 15 min)",
            m.load_average.clone().unwrap_or_else(|| "unknown".into()),
        ),
        (
            "kernel",
            m.kernel.clone().unwrap_or_else(|| "unknown".into()),
        ),
        ("platform", m.platform.clone()),
    ];
    dl(out, "machine", "Machine", &rows);
}

fn dl(out: &mut String, id: &str, heading: &str, rows: &[(&str, String)]) {
    let _ = write!(out, "<section id=\"{id}\"><h2>{heading}</h2><dl>");
    for (k, v) in rows {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(v));
    }
    out.push_str("</dl></section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::loadtest::invariants::InvariantReport;
    use crate::loadtest::stats::{Answer, Recorder};
    use crate::loadtest::timeline::{Pending, Timeline};
    use std::time::Duration;

    const HOSTILE: &str = "<script>alert('x')</script> & \"q\"";

    fn input_with(label: &str, message: &str) -> String {
        let mut rec = Recorder::new();
        rec.record(label, Answer::Status(503), Duration::from_millis(3));
        rec.record(label, Answer::Status(200), Duration::from_millis(7));
        let timeline = Timeline::with_width(Duration::from_secs(1));
        let mut pending = Pending::default();
        timeline.record(
            &mut pending,
            Duration::from_millis(10),
            label,
            Answer::Status(503),
            Duration::from_millis(3),
        );
        timeline.record(
            &mut pending,
            Duration::from_millis(1500),
            label,
            Answer::Status(200),
            Duration::from_millis(7),
        );
        timeline.absorb(&pending);
        let mut args = LoadtestArgs::defaults();
        args.url = vec![format!("http://user:pw@127.0.0.1:1/{HOSTILE}")];
        args.token = Some("tok-secret-1".into());
        let report = Report {
            scenario: crate::loadtest::Scenario::Noop,
            pick: None,
            target: args.url.join(","),
            concurrency: 1,
            run_id: HOSTILE.into(),
            elapsed_secs: 2.0,
            cycles: 2,
            cycles_per_sec: 1.0,
            throughput: 0.5,
            setup: Vec::new(),
            endpoints: rec.summaries(Duration::from_secs(2)),
            invariants: InvariantReport {
                ok: false,
                violations: 1,
                messages: vec![message.into()],
                ..InvariantReport::default()
            },
            etcd_rpcs: None,
        };
        html(&Input {
            report: &report,
            args: &args,
            width_secs: 1.0,
            series: timeline.series(Duration::from_secs(2)),
            distributions: rec.distributions(HISTOGRAM_BINS),
            machine: Machine {
                cores: 2,
                load_average: None,
                kernel: Some(HOSTILE.into()),
                platform: "linux x86_64".into(),
            },
        })
    }

    #[test]
    fn every_string_is_escaped_and_no_secret_is_shown() {
        let page = input_with(HOSTILE, HOSTILE);
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("'x'"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;")
        );
        assert!(
            !page.contains("tok-secret-1") && !page.contains("user:pw"),
            "{page}"
        );
        assert!(page.contains("Invariants: <strong>VIOLATED</strong>"));
        assert!(page.contains("<td>503: 1</td>"), "{page}");
        // Three charts for the endpoint and one of errors, the 503 among its series.
        assert_eq!(page.matches("<svg ").count(), 4);
        assert!(page.contains(r#"data-series="503""#), "{page}");
    }

    #[test]
    fn endpoint_ids_are_unique_and_safe() {
        assert_eq!(endpoint_id(0, "procure"), "ep0-procure");
        assert_eq!(endpoint_id(3, "procure (busy)"), "ep3-procure-busy");
        assert_eq!(endpoint_id(1, "<x> \"y\""), "ep1-x-y");
        assert_eq!(endpoint_id(2, "  "), "ep2-");
    }

    #[test]
    fn credentials_in_urls_are_not_shown() {
        assert_eq!(redact("http://u:secret@h:1/"), "http://h:1/");
        assert_eq!(redact("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(redact("127.0.0.1:2379"), "127.0.0.1:2379");
    }
}
