//! A small hand-made SVG chart builder for the HTML report: line series and bars over
//! a linear or logarithmic x axis, a zero-based y axis with round ticks, and the
//! accessible parts (`role="img"`, `<title>`, `<desc>`). No dependency, no script.

use std::fmt::Write as _;

/// Width of every chart, in SVG units.
pub const WIDTH: f64 = 720.0;
/// Height of every chart.
pub const HEIGHT: f64 = 280.0;
/// Left edge of the plot area (room for the y tick labels).
pub const LEFT: f64 = 64.0;
/// Right edge of the plot area.
pub const RIGHT: f64 = WIDTH - 16.0;
/// Top edge of the plot area (room for the legend).
pub const TOP: f64 = 36.0;
/// Bottom edge of the plot area (room for the x tick labels and axis label).
pub const BOTTOM: f64 = HEIGHT - 44.0;

/// Series colours, distinguishable for the common colour-vision deficiencies
/// (Okabe-Ito).
const PALETTE: [&str; 7] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000",
];

/// Escapes text for HTML and SVG content and double-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// How the x axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Evenly.
    Linear,
    /// By powers of ten (values must be positive; others are left out).
    Log,
}

/// What a series draws.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A line through `(x, y)` points, in order.
    Line(Vec<(f64, f64)>),
    /// One bar per `(x_low, x_high, y)` range.
    Bars(Vec<(f64, f64, f64)>),
}

impl Shape {
    fn is_empty(&self) -> bool {
        match self {
            Shape::Line(p) => p.is_empty(),
            Shape::Bars(b) => b.is_empty(),
        }
    }

    fn xs(&self) -> Vec<f64> {
        match self {
            Shape::Line(p) => p.iter().map(|p| p.0).collect(),
            Shape::Bars(b) => b.iter().flat_map(|b| [b.0, b.1]).collect(),
        }
    }

    fn ys(&self) -> Vec<f64> {
        match self {
            Shape::Line(p) => p.iter().map(|p| p.1).collect(),
            Shape::Bars(b) => b.iter().map(|b| b.2).collect(),
        }
    }
}

/// One named series of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// What to draw.
    pub shape: Shape,
}

/// A chart, rendered by [`Chart::render`].
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// `id` of the `<svg>` element (also prefixes the ids of its title and desc).
    pub id: String,
    /// Extra attributes of the `<svg>` element (`data-…`), escaped on output.
    pub attrs: Vec<(String, String)>,
    /// Short title (the SVG `<title>`).
    pub title: String,
    /// Longer description (the SVG `<desc>`) for screen readers.
    pub desc: String,
    /// x axis label, with its unit.
    pub x_label: String,
    /// y axis label, with its unit.
    pub y_label: String,
    /// How x values map.
    pub x_scale: Scale,
    /// The series, drawn in order.
    pub series: Vec<Series>,
}

/// The value ranges of a chart and their mapping to the plot area.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frame {
    /// Smallest x shown.
    pub x_min: f64,
    /// Largest x shown.
    pub x_max: f64,
    /// Largest y shown (y starts at 0).
    pub y_max: f64,
    /// How x maps.
    pub scale: Scale,
}

impl Frame {
    /// The frame that shows every finite value of `series`.
    pub fn fit(scale: Scale, series: &[Series]) -> Frame {
        let usable = |x: &f64| x.is_finite() && (scale == Scale::Linear || *x > 0.0);
        let xs: Vec<f64> = series
            .iter()
            .flat_map(|s| s.shape.xs())
            .filter(usable)
            .collect();
        let y_top = series
            .iter()
            .flat_map(|s| s.shape.ys())
            .filter(|y| y.is_finite())
            .fold(0.0_f64, f64::max);
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (x_min, x_max) = match scale {
            _ if xs.is_empty() => match scale {
                Scale::Linear => (0.0, 1.0),
                Scale::Log => (1.0, 10.0),
            },
            Scale::Linear if hi > lo => (lo, hi),
            Scale::Linear => (lo - 0.5, hi + 0.5),
            Scale::Log => {
                let (a, b) = (nice_floor(lo), nice_ceiling(hi));
                (a, if b > a { b } else { nice_ceiling(a * 1.5) })
            }
        };
        Frame {
            x_min,
            x_max,
            y_max: nice_ceiling(y_top),
            scale,
        }
    }

    /// Horizontal position of `x` in the plot area.
    pub fn x(&self, x: f64) -> f64 {
        let t = match self.scale {
            Scale::Linear => (x - self.x_min) / (self.x_max - self.x_min),
            Scale::Log => {
                (x.log10() - self.x_min.log10()) / (self.x_max.log10() - self.x_min.log10())
            }
        };
        LEFT + t.clamp(0.0, 1.0) * (RIGHT - LEFT)
    }

    /// Vertical position of `y` in the plot area (SVG y grows downwards).
    pub fn y(&self, y: f64) -> f64 {
        BOTTOM - (y / self.y_max).clamp(0.0, 1.0) * (BOTTOM - TOP)
    }

    /// Tick values of the x axis.
    pub fn x_ticks(&self) -> Vec<f64> {
        match self.scale {
            Scale::Linear => ticks(self.x_min, self.x_max),
            Scale::Log => {
                // 1, 2 and 5 times each power of ten in the range.
                let mut out = Vec::new();
                let mut p = 10f64.powf(self.x_min.log10().floor());
                while p <= self.x_max && out.len() < 64 {
                    for m in [1.0, 2.0, 5.0] {
                        let v = m * p;
                        if v >= self.x_min * (1.0 - 1e-9) && v <= self.x_max * (1.0 + 1e-9) {
                            out.push(v);
                        }
                    }
                    p *= 10.0;
                }
                out
            }
        }
    }

    /// Tick values of the y axis.
    pub fn y_ticks(&self) -> Vec<f64> {
        ticks(0.0, self.y_max)
    }
}

/// The round value (1, 2 or 5 times a power of ten) at or above `v`; 1 for nothing.
pub fn nice_ceiling(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v * (1.0 - 1e-12))
        .unwrap_or(10.0 * p)
}

/// The round value (1, 2 or 5 times a power of ten) at or below `v` (`v` > 0).
pub fn nice_floor(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [5.0, 2.0, 1.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c <= v * (1.0 + 1e-12))
        .unwrap_or(p)
}

/// Round tick values from `lo` to `hi`, about five of them.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return vec![lo];
    }
    let raw = span / 5.0;
    let p = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p);
    let first = (lo / step).ceil();
    (0..64)
        .map(|i| (first + i as f64) * step)
        .take_while(|v| *v <= hi + step * 1e-9)
        .collect()
}

/// A tick label: no trailing zeros, no exponent for everyday magnitudes.
pub fn label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let s = if v.abs() >= 1000.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

impl Chart {
    /// The frame the chart is drawn in.
    pub fn frame(&self) -> Frame {
        Frame::fit(self.x_scale, &self.series)
    }

    /// The `<svg>` element.
    pub fn render(&self) -> String {
        let f = self.frame();
        let id = escape(&self.id);
        let mut out = String::new();
        let _ = write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" id="{id}" role="img" aria-labelledby="{id}-title {id}-desc" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="11""#
        );
        for (k, v) in &self.attrs {
            let _ = write!(out, r#" {}="{}""#, escape(k), escape(v));
        }
        let _ = write!(
            out,
            r#"><title id="{id}-title">{}</title><desc id="{id}-desc">{}</desc>"#,
            escape(&self.title),
            escape(&self.desc)
        );
        self.axes(&f, &mut out);
        if self.series.iter().all(|s| s.shape.is_empty()) {
            let _ = write!(
                out,
                r##"<text class="empty" x="{}" y="{}" text-anchor="middle" fill="#555">no data</text>"##,
                (LEFT + RIGHT) / 2.0,
                (TOP + BOTTOM) / 2.0
            );
        }
        for (i, s) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let _ = write!(
                out,
                r#"<g class="series" data-series="{}">"#,
                escape(&s.name)
            );
            match &s.shape {
                Shape::Line(points) => line(&f, points, colour, &mut out),
                Shape::Bars(bars) => {
                    for &(a, b, y) in bars {
                        // An empty range draws nothing (its count is in the data table).
                        if !(a.is_finite() && b.is_finite() && y.is_finite() && y > 0.0) {
                            continue;
                        }
                        let (x0, x1) = (f.x(a), f.x(b));
                        let top = f.y(y);
                        let _ = write!(
                            out,
                            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}" stroke="white" stroke-width="0.5"/>"#,
                            x0,
                            top,
                            (x1 - x0).max(0.5),
                            BOTTOM - top
                        );
                    }
                }
            }
            out.push_str("</g>");
            // Legend across the top, one entry per series.
            let lx = LEFT + 150.0 * i as f64;
            let _ = write!(
                out,
                r#"<rect x="{lx:.1}" y="12" width="12" height="12" fill="{colour}"/><text x="{:.1}" y="22">{}</text>"#,
                lx + 16.0,
                escape(&s.name)
            );
        }
        out.push_str("</svg>");
        out
    }

    fn axes(&self, f: &Frame, out: &mut String) {
        out.push_str(r##"<g class="axes" stroke="#333">"##);
        let _ = write!(
            out,
            r#"<line class="x-axis" x1="{LEFT}" y1="{BOTTOM}" x2="{RIGHT}" y2="{BOTTOM}"/><line class="y-axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{BOTTOM}"/>"#
        );
        out.push_str("</g>");
        for v in f.y_ticks() {
            let y = f.y(v);
            let _ = write!(
                out,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{RIGHT}" y2="{y:.1}" stroke="#ddd"/><text class="y-tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT - 6.0,
                y + 4.0,
                label(v)
            );
        }
        for v in f.x_ticks() {
            let x = f.x(v);
            let _ = write!(
                out,
                r##"<line x1="{x:.1}" y1="{BOTTOM}" x2="{x:.1}" y2="{:.1}" stroke="#333"/><text class="x-tick" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                BOTTOM + 4.0,
                BOTTOM + 16.0,
                label(v)
            );
        }
        let _ = write!(
            out,
            r#"<text class="x-label" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text class="y-label" transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (LEFT + RIGHT) / 2.0,
            HEIGHT - 8.0,
            escape(&self.x_label),
            (TOP + BOTTOM) / 2.0,
            escape(&self.y_label)
        );
    }
}

fn line(f: &Frame, points: &[(f64, f64)], colour: &str, out: &mut String) {
    let usable: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (f.scale == Scale::Linear || *x > 0.0))
        .collect();
    if usable.is_empty() {
        return;
    }
    let coords: Vec<String> = usable
        .iter()
        .map(|(x, y)| format!("{:.1},{:.1}", f.x(*x), f.y(*y)))
        .collect();
    let _ = write!(
        out,
        r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#,
        coords.join(" ")
    );
    // Markers keep a lone point (or a short series) visible.
    if usable.len() <= 60 {
        for (x, y) in usable {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2" fill="{colour}"/>"#,
                f.x(x),
                f.y(y)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(series: Vec<Series>) -> Chart {
        Chart {
            id: "c1".into(),
            attrs: vec![("data-endpoint".into(), "ep0".into())],
            title: "Throughput <procure>".into(),
            desc: "requests & answers".into(),
            x_label: "seconds".into(),
            y_label: "requests/s".into(),
            x_scale: Scale::Linear,
            series,
        }
    }

    #[test]
    fn axes_titles_and_round_ticks_are_drawn() {
        let svg = chart(vec![Series {
            name: "req/s".into(),
            shape: Shape::Line(vec![(0.0, 3.0), (4.0, 87.0)]),
        }])
        .render();
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>"), "{svg}");
        assert!(svg.contains(r#"role="img""#), "{svg}");
        assert!(svg.contains(r#"<title id="c1-title">Throughput &lt;procure&gt;</title>"#));
        assert!(svg.contains(r#"<desc id="c1-desc">requests &amp; answers</desc>"#));
        assert!(svg.contains(r#"aria-labelledby="c1-title c1-desc""#));
        assert!(svg.contains(r#"data-endpoint="ep0""#));
        assert!(svg.contains(r#"class="x-axis""#) && svg.contains(r#"class="y-axis""#));
        // 87 rounds up to 100; ticks every 20.
        for t in ["0", "20", "40", "60", "80", "100"] {
            assert!(svg.contains(&format!(">{t}</text>")), "tick {t}: {svg}");
        }
        assert!(svg.contains(">seconds</text>") && svg.contains(">requests/s</text>"));
        assert!(!svg.contains("no data"));
    }

    #[test]
    fn values_scale_onto_the_plot_area() {
        let c = chart(vec![Series {
            name: "s".into(),
            shape: Shape::Line(vec![(2.0, 0.0), (12.0, 50.0), (22.0, 100.0)]),
        }]);
        let f = c.frame();
        assert_eq!((f.x_min, f.x_max, f.y_max), (2.0, 22.0, 100.0));
        assert_eq!(f.x(2.0), LEFT);
        assert_eq!(f.x(22.0), RIGHT);
        assert_eq!(f.x(12.0), (LEFT + RIGHT) / 2.0);
        assert_eq!(f.y(0.0), BOTTOM);
        assert_eq!(f.y(100.0), TOP);
        let svg = c.render();
        let expected = format!(
            r#"points="{LEFT:.1},{BOTTOM:.1} {:.1},{:.1} {RIGHT:.1},{TOP:.1}""#,
            (LEFT + RIGHT) / 2.0,
            (TOP + BOTTOM) / 2.0
        );
        assert!(svg.contains(&expected), "{expected} in {svg}");
        let log = Frame::fit(
            Scale::Log,
            &[Series {
                name: "h".into(),
                shape: Shape::Bars(vec![(0.3, 2.0, 5.0), (2.0, 40.0, 1.0)]),
            }],
        );
        assert_eq!((log.x_min, log.x_max, log.y_max), (0.2, 50.0, 5.0));
        let ticks = log.x_ticks();
        let want = [0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0];
        assert_eq!(ticks.len(), want.len(), "{ticks:?}");
        assert!(
            ticks.iter().zip(want).all(|(t, w)| (t - w).abs() < 1e-9),
            "{ticks:?}"
        );
        // 1 and 10 are as far apart as 5 and 50.
        assert!(((log.x(10.0) - log.x(1.0)) - (log.x(50.0) - log.x(5.0))).abs() < 1e-9);
        assert_eq!((log.x(0.2), log.x(50.0)), (LEFT, RIGHT));
    }

    #[test]
    fn an_empty_chart_still_has_axes_and_says_so() {
        for series in [
            vec![],
            vec![Series {
                name: "s".into(),
                shape: Shape::Line(vec![]),
            }],
        ] {
            let svg = chart(series).render();
            assert!(svg.contains("no data"), "{svg}");
            assert!(svg.contains(r#"class="x-axis""#), "{svg}");
            assert!(!svg.contains("<polyline"), "{svg}");
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
        // Only zeros: the y axis still has a height.
        let f = chart(vec![Series {
            name: "s".into(),
            shape: Shape::Line(vec![(0.0, 0.0), (1.0, 0.0)]),
        }])
        .frame();
        assert_eq!(f.y_max, 1.0);
    }

    #[test]
    fn round_values_and_labels() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(5.0), 5.0);
        assert_eq!(nice_ceiling(0.013), 0.02);
        assert_eq!(nice_ceiling(1234.0), 2000.0);
        assert_eq!(nice_floor(0.93), 0.5);
        assert_eq!(nice_floor(3.45), 2.0);
        assert_eq!(nice_floor(10.0), 10.0);
        assert_eq!(label(0.25), "0.25");
        assert_eq!(label(20.0), "20");
        assert_eq!(label(1e-4), "0");
        assert_eq!(escape(r#"a<b>&"c'"#), "a&lt;b&gt;&amp;&quot;c&#39;");
    }
}
