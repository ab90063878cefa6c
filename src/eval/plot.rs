//! Line charts as standalone SVG (training loss curves): no plotting dependency, readable in any
//! browser.

use super::routing::escape;

/// One line of a chart.
pub struct Series {
    pub name: String,
    /// (x, y) points in drawing order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
    /// Draw dots at the points instead of a line (sparse series such as validation losses).
    pub dots: bool,
}

/// Tick positions covering `[lo, hi]` with about `n` steps of 1, 2 or 5 times a power of ten.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A tick label without float noise.
fn label(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{}", (v * 1e4).round() / 1e4)
    }
}

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A line chart of `series` with axis ticks and a legend.
pub fn line_chart_svg(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (760.0, 440.0);
    let (left, right, top, bottom) = (70.0, 190.0, 40.0, 50.0);
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let (pw, ph) = (w - left - right, h - top - bottom);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" font-size=\"14\" text-anchor=\"middle\">{}</text>\n",
        left + pw / 2.0,
        escape(title)
    );
    for t in ticks(x0, x1, 6) {
        let x = sx(t);
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#eee\"/>\n<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            top + ph,
            top + ph + 16.0,
            label(t)
        ));
    }
    for t in ticks(y0, y1, 6) {
        let y = sy(t);
        s.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left + pw,
            left - 6.0,
            y + 4.0,
            label(t)
        ));
    }
    s.push_str(&format!(
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n<text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>\n",
        left + pw / 2.0,
        h - 12.0,
        escape(x_label),
        top + ph / 2.0,
        top + ph / 2.0,
        escape(y_label)
    ));
    for (i, se) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let fin: Vec<(f64, f64)> = se
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if se.dots {
            for (x, y) in &fin {
                s.push_str(&format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n",
                    sx(*x),
                    sy(*y)
                ));
            }
        } else if !fin.is_empty() {
            let path: Vec<String> = fin
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            s.push_str(&format!(
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\"/>\n",
                path.join(" ")
            ));
        }
        let ly = top + 14.0 + 18.0 * i as f64;
        let lx = left + pw + 14.0;
        s.push_str(&format!(
            "<rect x=\"{lx}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{c}\"/>\n<text x=\"{}\" y=\"{ly}\">{}</text>\n",
            ly - 5.0,
            lx + 20.0,
            escape(&se.name)
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// `ys` smoothed by an exponential moving average with weight `beta` on the past (debiased,
/// as TensorBoard's smoothing), for noisy per-step losses.
pub fn ema(ys: &[f64], beta: f64) -> Vec<f64> {
    let (mut m, mut out) = (0.0, Vec::with_capacity(ys.len()));
    for (i, y) in ys.iter().enumerate() {
        m = beta * m + (1.0 - beta) * y;
        out.push(m / (1.0 - beta.powi(i as i32 + 1)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(0.3, 5.8, 6), vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        let t = ticks(0.27, 0.46, 6);
        assert!(
            t.len() >= 3 && t.iter().all(|v| (0.27..=0.46).contains(v)),
            "{t:?}"
        );
    }

    #[test]
    fn ema_is_debiased_and_smooths() {
        let s = ema(&[4.0, 4.0, 4.0], 0.9);
        assert!(s.iter().all(|v| (v - 4.0).abs() < 1e-12), "{s:?}");
        let s = ema(&[0.0, 10.0, 0.0, 10.0], 0.5);
        assert!(s[3] > 0.0 && s[3] < 10.0);
    }

    #[test]
    fn chart_draws_every_series_and_escapes_names() {
        let svg = line_chart_svg(
            "t",
            "step",
            "loss",
            &[
                Series {
                    name: "a<b".into(),
                    points: vec![(1.0, 3.0), (2.0, f64::NAN), (3.0, 1.0)],
                    dots: false,
                },
                Series {
                    name: "valid".into(),
                    points: vec![(3.0, 1.5)],
                    dots: true,
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.contains("a&lt;b") && !svg.contains("NaN"));
        // Every drawn point lies inside the plot area (x 70..570, y 40..390).
        let line = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        let pts = line.split('"').nth(1).unwrap();
        for p in pts.split(' ') {
            let (x, y) = p.split_once(',').unwrap();
            let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
            assert!(
                (70.0..=570.0).contains(&x) && (40.0..=390.0).contains(&y),
                "{p}"
            );
        }
        // The first point is the top-left corner (smallest x, largest y), the last bottom-right.
        assert!(
            pts.starts_with("70.0,40.0") && pts.ends_with("570.0,390.0"),
            "{pts}"
        );
    }
}
