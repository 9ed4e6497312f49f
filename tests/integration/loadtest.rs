//! The load-test harness against the service in-process: a real HTTP server on a free
//! loopback port over the memory store, driven through the harness's library API.
//! The HTML report (`--report`) is checked for well-formedness, one chart set per
//! endpoint, and figures equal to the `--json` summary of the same run.

use std::sync::Arc;

use clap::Parser;
use resource_plane::adapters::memory::MemoryStore;
use resource_plane::loadtest::report::endpoint_id;
use resource_plane::loadtest::{self, LoadtestArgs};

use crate::support;

#[actix_web::test]
async fn the_shadow_scenario_keeps_every_invariant() {
    shadow_scenario("round-robin").await;
}

/// PROCURE by node pool: one request per attempt, the service picks; the harness's
/// invariant checker (one holder at a time per name) still holds.
#[actix_web::test]
async fn the_shadow_scenario_by_pool_keeps_every_invariant() {
    let report = shadow_scenario("pool").await;
    assert!(report.endpoint("list").is_none(), "{}", report.render());
}

/// Runs the shadow scenario with `--pick pick` and checks what every pick mode promises.
async fn shadow_scenario(pick: &str) -> loadtest::Report {
    let svc = support::service(support::config(), Arc::new(MemoryStore::new())).await;
    let (url, handle) = support::serve_api(svc.state.clone());

    // Fewer deployables than workflows, so PROCUREs collide and get FAILED + delay.
    let args = LoadtestArgs::try_parse_from([
        "loadtest",
        "--url",
        url.as_str(),
        "--scenario",
        "shadow",
        "--workflows",
        "16",
        "--deployables",
        "8",
        "--iterations",
        "300",
        "--duration",
        "120s",
        "--max-retry-delay-ms",
        "5",
        "--pick",
        pick,
        "--no-progress",
    ])
    .unwrap_or_else(|e| panic!("arguments: {e}"));
    let report = loadtest::run(args)
        .await
        .unwrap_or_else(|e| panic!("the harness could not run: {e}"));
    handle.stop(true).await;

    let text = report.render();
    assert!(report.passed(), "{text}");
    assert_eq!(report.invariants.violations, 0, "{text}");
    assert_eq!(report.invariants.server_errors, 0, "{text}");
    assert_eq!(report.cycles, 300, "{text}");
    assert_eq!(report.invariants.procured, 300, "{text}");
    assert_eq!(report.invariants.released, 300, "{text}");
    assert!(report.throughput > 0.0, "{text}");
    assert!(report.cycles_per_sec > 0.0, "{text}");
    let procure = report
        .endpoint("procure")
        .unwrap_or_else(|| panic!("no procure row: {text}"));
    assert_eq!(procure.ok, 300, "{text}");
    assert!(procure.ops_per_sec > 0.0 && procure.p99_ms > 0.0, "{text}");
    for row in ["min-pod-count", "release"] {
        let r = report
            .endpoint(row)
            .unwrap_or_else(|| panic!("no {row} row: {text}"));
        assert_eq!((r.count, r.ok), (300, 300), "{text}");
        assert!(r.errors.is_empty(), "{text}");
    }
    let registered = report.setup.iter().map(|r| r.ok).sum::<u64>();
    assert_eq!(registered, 8, "{text}");
    report
}

/// The service in-process on a free loopback port: its base URL and the server handle.
async fn start_service() -> (String, actix_web::dev::ServerHandle) {
    let svc = support::service(support::config(), Arc::new(MemoryStore::new())).await;
    support::serve_api(svc.state.clone())
}

#[actix_web::test]
async fn the_html_report_is_well_formed_and_agrees_with_the_json_summary() {
    let (url, handle) = start_service().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let path = dir.path().join("report.html");
    let path_arg = path.to_string_lossy().into_owned();
    // Fewer deployables than workflows: some PROCUREs are busy, a second endpoint row.
    let args = LoadtestArgs::try_parse_from([
        "loadtest",
        "--url",
        url.as_str(),
        "--workflows",
        "4",
        "--deployables",
        "2",
        // Bound by time, so the run spans more than one one-second bucket.
        "--duration",
        "2s",
        "--max-retry-delay-ms",
        "5",
        "--token",
        "report-test-token-9f3e",
        "--no-progress",
        "--json",
        "--report",
        path_arg.as_str(),
    ])
    .unwrap_or_else(|e| panic!("arguments: {e}"));
    let report = loadtest::run(args)
        .await
        .unwrap_or_else(|e| panic!("the harness could not run: {e}"));
    handle.stop(true).await;
    // What `--json` prints.
    let json = serde_json::to_value(&report).unwrap_or_else(|e| panic!("json: {e}"));
    let html = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read report: {e}"));

    if let Err(e) = check_well_formed(&html) {
        panic!("the report is not well-formed: {e}");
    }
    for external in ["<script", "<link", "src=", "href=", "url(", "@import"] {
        assert!(
            !html.contains(external),
            "the report references {external:?}"
        );
    }
    assert!(
        !html.contains("report-test-token-9f3e"),
        "the token is in the report"
    );

    let endpoints = json["endpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("no endpoints in {json}"));
    assert!(endpoints.len() >= 3, "{json}");
    assert_eq!(
        html.matches("<svg ").count(),
        3 * endpoints.len() + 1,
        "three charts per endpoint and one of errors"
    );
    for (i, e) in endpoints.iter().enumerate() {
        let name = e["endpoint"].as_str().unwrap_or_else(|| panic!("{e}"));
        let id = endpoint_id(i, name);
        for kind in ["throughput", "latency", "histogram"] {
            let n = svg_tags(&html)
                .filter(|t| {
                    t.contains(&format!(r#"data-endpoint="{id}""#))
                        && t.contains(&format!(r#"data-chart="{kind}""#))
                })
                .count();
            assert_eq!(n, 1, "{kind} charts of {id}");
        }
        let row = summary_row(&html, &id);
        for field in ["count", "ok"] {
            let (value, text) = cell(&row, field);
            let want = e[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{field} in {e}"));
            assert_eq!(value.parse::<u64>().ok(), Some(want), "{id} {field}");
            assert_eq!(text, want.to_string(), "{id} {field}");
        }
        for field in ["p50_ms", "p90_ms", "p99_ms", "ops_per_sec"] {
            let (value, text) = cell(&row, field);
            let want = e[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{field} in {e}"));
            assert_eq!(value.parse::<f64>().ok(), Some(want), "{id} {field}");
            if field.ends_with("_ms") {
                assert_eq!(text, format!("{want:.3}"), "{id} {field}");
            }
        }
        // The requests over time add up to the total.
        let over_time: u64 = data_rows(&html, &format!("{id}-throughput"))
            .iter()
            .map(|r| r[1].parse::<u64>().unwrap_or_else(|_| panic!("{r:?}")))
            .sum();
        assert_eq!(Some(over_time), e["count"].as_u64(), "{id} over time");
        // So do the answered ones over the distribution's ranges.
        let answered: u64 = data_rows(&html, &format!("{id}-histogram"))
            .iter()
            .map(|r| r[2].parse::<u64>().unwrap_or_else(|_| panic!("{r:?}")))
            .sum();
        let transport = e["errors"]["transport"].as_u64().unwrap_or(0);
        assert_eq!(
            Some(answered + transport),
            e["count"].as_u64(),
            "{id} distribution"
        );
    }
    let verdict = if report.passed() { "OK" } else { "VIOLATED" };
    assert!(html.contains(&format!("Invariants: <strong>{verdict}</strong>")));
    assert!(html.contains(&format!("<dd>{}</dd>", report.run_id)));
    assert!(html.contains("<dt>cores</dt>") && html.contains("<dt>kernel</dt>"));
}

/// The opening `<svg …>` tags of `html`.
fn svg_tags(html: &str) -> impl Iterator<Item = &str> {
    html.match_indices("<svg ")
        .filter_map(|(i, _)| html[i..].find('>').map(|j| &html[i..i + j]))
}

/// The summary table row of endpoint `id`.
fn summary_row(html: &str, id: &str) -> String {
    let table = &html[html
        .find(r#"<table id="endpoints">"#)
        .unwrap_or_else(|| panic!("no summary table"))..];
    let start = table
        .find(&format!(r#"<tr data-endpoint="{id}">"#))
        .unwrap_or_else(|| panic!("no summary row of {id}"));
    let row = &table[start..];
    row[..row.find("</tr>").unwrap_or(row.len())].to_owned()
}

/// `(data-value, text)` of the cell of `field` in `row`.
fn cell(row: &str, field: &str) -> (String, String) {
    let at = row
        .find(&format!(r#"data-field="{field}" data-value=""#))
        .unwrap_or_else(|| panic!("no {field} in {row}"));
    let rest = &row[at..];
    let value = rest.split('"').nth(3).unwrap_or_default().to_owned();
    let text = &rest[rest.find('>').map_or(0, |i| i + 1)..];
    let text = text[..text.find('<').unwrap_or(text.len())].to_owned();
    (value, text)
}

/// The body rows (cell texts) of the data table that follows the chart `chart_id`.
fn data_rows(html: &str, chart_id: &str) -> Vec<Vec<String>> {
    let start = html
        .find(&format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" id="{chart_id}""#
        ))
        .unwrap_or_else(|| panic!("no chart {chart_id}"));
    let rest = &html[start..];
    let rest = &rest[rest
        .find("<tbody>")
        .unwrap_or_else(|| panic!("no data of {chart_id}"))..];
    let body = &rest[..rest.find("</tbody>").unwrap_or(rest.len())];
    body.split("<tr>")
        .skip(1)
        .map(|r| {
            r.split("<td>")
                .skip(1)
                .map(|c| c[..c.find('<').unwrap_or(c.len())].to_owned())
                .collect()
        })
        .collect()
}

/// A strict well-formedness check: a doctype, then one `html` element; every tag closed
/// in order (the HTML void elements and `/>` excepted); names of letters, digits and
/// `-`; every attribute `name="value"`; no raw `<`, `>` or stray `&` in text or values.
fn check_well_formed(html: &str) -> Result<(), String> {
    const VOID: [&str; 6] = ["meta", "br", "hr", "img", "input", "link"];
    let mut rest = html
        .strip_prefix("<!DOCTYPE html>")
        .ok_or("no <!DOCTYPE html> at the start")?;
    let mut stack: Vec<&str> = Vec::new();
    let mut roots = 0;
    while let Some(lt) = rest.find('<') {
        check_text(&rest[..lt])?;
        if stack.is_empty() && !rest[..lt].trim().is_empty() {
            return Err(format!("text outside <html>: {:?}", &rest[..lt]));
        }
        let len = rest[lt..]
            .find('>')
            .ok_or_else(|| format!("unclosed tag at {:?}", &rest[lt..]))?;
        let tag = &rest[lt + 1..lt + len];
        rest = &rest[lt + len + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            match stack.pop() {
                Some(open) if open == name => {}
                Some(open) => return Err(format!("</{name}> closes <{open}>")),
                None => return Err(format!("</{name}> closes nothing")),
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let (name, attrs) = tag.split_once(char::is_whitespace).unwrap_or((tag, ""));
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("bad tag name {name:?}"));
        }
        if stack.is_empty() {
            roots += 1;
            if name != "html" || roots > 1 {
                return Err(format!("<{name}> at the top level"));
            }
        }
        check_attrs(name, attrs)?;
        if !self_closing && !VOID.contains(&name) {
            stack.push(name);
        }
    }
    check_text(rest)?;
    if !rest.trim().is_empty() {
        return Err(format!("text after </html>: {rest:?}"));
    }
    match (stack.last(), roots) {
        (Some(open), _) => Err(format!("<{open}> is never closed")),
        (None, 1) => Ok(()),
        (None, _) => Err("no <html> element".into()),
    }
}

fn check_attrs(tag: &str, mut attrs: &str) -> Result<(), String> {
    loop {
        attrs = attrs.trim_start();
        if attrs.is_empty() {
            return Ok(());
        }
        let eq = attrs
            .find("=\"")
            .ok_or_else(|| format!("<{tag}>: attribute without a quoted value: {attrs:?}"))?;
        let name = &attrs[..eq];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':')
        {
            return Err(format!("<{tag}>: bad attribute name {name:?}"));
        }
        let value_len = attrs[eq + 2..]
            .find('"')
            .ok_or_else(|| format!("<{tag}>: unterminated value of {name}"))?;
        check_text(&attrs[eq + 2..eq + 2 + value_len])?;
        attrs = &attrs[eq + 2 + value_len + 1..];
        if !(attrs.is_empty() || attrs.starts_with(char::is_whitespace)) {
            return Err(format!("<{tag}>: no space after {name}"));
        }
    }
}

fn check_text(text: &str) -> Result<(), String> {
    if text.contains('<') || text.contains('>') {
        return Err(format!("raw < or > in {text:?}"));
    }
    for (i, _) in text.match_indices('&') {
        let entity = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"]
            .iter()
            .any(|e| text[i..].starts_with(e));
        if !entity {
            return Err(format!("unescaped & in {text:?}"));
        }
    }
    Ok(())
}

#[test]
fn the_well_formedness_check_refuses_broken_html() {
    let ok = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/></head><body><p>a &amp; b</p><svg x=\"1\"><line y=\"2\"/></svg></body></html>\n";
    assert_eq!(check_well_formed(ok), Ok(()));
    for bad in [
        "<html></html>",
        "<!DOCTYPE html><html><p></html>",
        "<!DOCTYPE html><html><p></b></p></html>",
        "<!DOCTYPE html><html><p>a & b</p></html>",
        "<!DOCTYPE html><html><p>a > b</p></html>",
        "<!DOCTYPE html><html><p id=x>a</p></html>",
        "<!DOCTYPE html><html><p id=\"a\"b\">a</p></html>",
        "<!DOCTYPE html><html></html><html></html>",
        "<!DOCTYPE html><html><p>a</p>",
        "<!DOCTYPE html><html></html>tail",
    ] {
        assert!(check_well_formed(bad).is_err(), "accepted {bad:?}");
    }
}
