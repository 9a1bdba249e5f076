//! The picture of a run: the offered load (left axis) and the desired and serving backends
//! (right axis) over time, as a hand-written SVG (a few elements, no dependency).

use std::fmt::Write as _;

use super::timeline::Sample;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 890.0;
const TOP: f64 = 100.0;
const BOTTOM: f64 = 420.0;

const LOAD_COLOUR: &str = "#4c78a8";
const DESIRED_COLOUR: &str = "#f58518";
const DECISION_COLOUR: &str = "#7f7f7f";
const SERVING_COLOUR: &str = "#54a24b";
const FAILURE_COLOUR: &str = "#d62728";

/// The series drawn against the right axis: (legend, colour, dashes, width, value).
type Series = (
    &'static str,
    &'static str,
    &'static str,
    f64,
    fn(&Sample) -> Option<u32>,
);

const BACKEND_SERIES: [Series; 3] = [
    (
        "desired backends (the balancer's signal)",
        DESIRED_COLOUR,
        "6 4",
        2.0,
        |s| s.balancer_desired,
    ),
    (
        "the scaler's decision (HPA)",
        DECISION_COLOUR,
        "2 3",
        1.5,
        |s| Some(s.decision),
    ),
    (
        "backends serving (healthy in the balancer)",
        SERVING_COLOUR,
        "",
        3.0,
        |s| Some(s.serving),
    ),
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document of `samples`, titled `title`. The two vertical axes share their grid:
/// one backend on the right is `target_per_backend` new connections/s on the left, so
/// wherever the load's line runs above the serving backends' steps, the backends are over
/// their target.
pub fn render(samples: &[Sample], title: &str, target_per_backend: f64) -> String {
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let t_max = (t_max / 10.0).ceil() * 10.0;
    let peak_load = samples.iter().map(|s| s.offered).fold(0.0, f64::max);
    let backends_max = samples
        .iter()
        .flat_map(|s| [s.serving, s.decision, s.balancer_desired.unwrap_or(0)])
        .chain([(peak_load / target_per_backend).ceil() as u32])
        .max()
        .unwrap_or(0)
        + 1;
    let load_max = f64::from(backends_max) * target_per_backend;
    let x = |t: f64| LEFT + (RIGHT - LEFT) * t / t_max;
    let y_load = |v: f64| BOTTOM - (BOTTOM - TOP) * v / load_max;
    let y_backends = |v: u32| BOTTOM - (BOTTOM - TOP) * f64::from(v) / f64::from(backends_max);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    axes(
        &mut svg,
        t_max,
        load_max,
        backends_max,
        x,
        y_load,
        y_backends,
    );

    // The load, a point a second.
    let points: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.1},{:.1}", x(s.t), y_load(s.offered)))
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline fill="none" stroke="{LOAD_COLOUR}" stroke-width="2" points="{}"/>"#,
        points.join(" ")
    );
    // The backend counts, as steps.
    for (_, colour, dashes, width, value) in BACKEND_SERIES {
        let mut points = Vec::new();
        let mut last: Option<f64> = None;
        for s in samples {
            let Some(v) = value(s) else { continue };
            let y = y_backends(v);
            if let Some(previous) = last {
                points.push(format!("{:.1},{previous:.1}", x(s.t)));
            }
            points.push(format!("{:.1},{y:.1}", x(s.t)));
            last = Some(y);
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="{width}" stroke-dasharray="{dashes}" points="{}"/>"#,
            points.join(" ")
        );
    }
    // Failures, where they happened.
    let mut failures = 0;
    for s in samples {
        if s.failures > failures {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{BOTTOM}" r="5" fill="{FAILURE_COLOUR}"><title>{} failed by {:.0}s</title></circle>"#,
                x(s.t),
                s.failures,
                s.t
            );
            failures = s.failures;
        }
    }
    legend(&mut svg);
    svg.push_str("</svg>\n");
    svg
}

/// The frame, the time axis, the load's axis (left) and the backends' axis (right).
fn axes(
    svg: &mut String,
    t_max: f64,
    load_max: f64,
    backends_max: u32,
    x: impl Fn(f64) -> f64,
    y_load: impl Fn(f64) -> f64,
    y_backends: impl Fn(u32) -> f64,
) {
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        RIGHT - LEFT,
        BOTTOM - TOP
    );
    let step = if t_max > 150.0 { 30.0 } else { 10.0 };
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{BOTTOM}" x2="{0:.1}" y2="{1}" stroke="#333"/><text x="{0:.1}" y="{2}" text-anchor="middle">{3}</text>"##,
            x(t),
            BOTTOM + 5.0,
            BOTTOM + 19.0,
            t
        );
        t += step;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">time (s)</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 38.0
    );
    for i in 0..=backends_max {
        let v = load_max * f64::from(i) / f64::from(backends_max);
        let _ = writeln!(
            svg,
            r##"<line x1="{0}" y1="{1:.1}" x2="{LEFT}" y2="{1:.1}" stroke="#333"/><line x1="{LEFT}" y1="{1:.1}" x2="{RIGHT}" y2="{1:.1}" stroke="#eee"/><text x="{2}" y="{3:.1}" text-anchor="end" fill="{LOAD_COLOUR}">{v}</text>"##,
            LEFT - 5.0,
            y_load(v),
            LEFT - 8.0,
            y_load(v) + 4.0
        );
    }
    for v in 0..=backends_max {
        let _ = writeln!(
            svg,
            r##"<line x1="{RIGHT}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#333"/><text x="{2}" y="{3:.1}" fill="{SERVING_COLOUR}">{v}</text>"##,
            y_backends(v),
            RIGHT + 5.0,
            RIGHT + 8.0,
            y_backends(v) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text transform="translate(18 {0}) rotate(-90)" text-anchor="middle" fill="{LOAD_COLOUR}">offered load (new connections/s)</text>"#,
        (TOP + BOTTOM) / 2.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate({0} {1}) rotate(90)" text-anchor="middle" fill="{SERVING_COLOUR}">backends</text>"#,
        WIDTH - 30.0,
        (TOP + BOTTOM) / 2.0
    );
}

fn legend(svg: &mut String) {
    let mut entries = vec![("offered load (new connections/s)", LOAD_COLOUR, "", 2.0)];
    entries.extend(
        BACKEND_SERIES
            .iter()
            .map(|(name, colour, dashes, width, _)| (*name, *colour, *dashes, *width)),
    );
    for (i, (name, colour, dashes, width)) in entries.into_iter().enumerate() {
        let (column, row) = (i % 2, i / 2);
        let x = LEFT + 410.0 * column as f64;
        let y = 44.0 + 18.0 * row as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}" stroke-width="{width}" stroke-dasharray="{dashes}"/><text x="{}" y="{}">{}</text>"#,
            x + 28.0,
            x + 34.0,
            y + 4.0,
            escape(name)
        );
    }
    let _ = writeln!(
        svg,
        r#"<circle cx="{}" cy="{}" r="5" fill="{FAILURE_COLOUR}"/><text x="{}" y="{}">failed requests</text>"#,
        LEFT + 14.0,
        44.0 + 18.0 * 2.0,
        LEFT + 34.0,
        44.0 + 18.0 * 2.0 + 4.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that every element opened is closed, in order; returns the element names.
    fn elements(svg: &str) -> Vec<String> {
        let mut open: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        for tag in svg.split('<').skip(1) {
            let tag = tag.split('>').next().expect("a closed tag");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    open.pop().as_deref(),
                    Some(name),
                    "</{name}> closes nothing"
                );
                continue;
            }
            let name = tag.split_whitespace().next().unwrap().trim_end_matches('/');
            seen.push(name.to_owned());
            if !tag.ends_with('/') {
                open.push(name.to_owned());
            }
        }
        assert!(open.is_empty(), "left open: {open:?}");
        seen
    }

    #[test]
    fn the_picture_has_its_series_axes_and_legend() {
        let samples: Vec<Sample> = (0..=40u32)
            .map(|t| Sample {
                t: f64::from(t),
                offered: 5.0 + f64::from(t.min(40 - t)) * 4.0,
                balancer_desired: Some(1 + t.min(40 - t) / 5),
                decision: 1 + t.min(40 - t) / 5,
                serving: 1 + t.min(40 - t).saturating_sub(2) / 5,
                failures: u64::from(t >= 30),
                ..Sample::default()
            })
            .collect();
        let svg = render(&samples, "demo <short> & co", 20.0);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.ends_with("</svg>\n"));
        let elements = elements(&svg);
        // The load and three step series; one failure marker in the plot, one in the legend.
        assert_eq!(elements.iter().filter(|e| *e == "polyline").count(), 4);
        assert_eq!(elements.iter().filter(|e| *e == "circle").count(), 2);
        assert!(svg.contains("demo &lt;short&gt; &amp; co"));
        for label in [
            "offered load (new connections/s)",
            "desired backends (the balancer's signal)",
            "the scaler's decision (HPA)",
            "backends serving (healthy in the balancer)",
            "time (s)",
            ">40<",
            // 6 backends on the right (5 at most, and one more), 6 x 20/s on the left.
            ">6<",
            ">120<",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        // Every point inside the picture.
        for points in svg.split("points=\"").skip(1) {
            for point in points.split('"').next().unwrap().split_whitespace() {
                let (px, py) = point.split_once(',').unwrap();
                let (px, py): (f64, f64) = (px.parse().unwrap(), py.parse().unwrap());
                assert!(
                    (LEFT..=RIGHT).contains(&px) && (TOP..=BOTTOM).contains(&py),
                    "{point}"
                );
            }
        }
    }
}
