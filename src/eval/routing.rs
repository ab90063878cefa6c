//! Routing analysis: per layer, the fraction of a domain's tokens that use each expert and the
//! mean router probability of each, as a table and as an SVG heatmap of the probabilities.

use crate::ensure;
use crate::error::Result;
use crate::model::runner::Runner;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct RoutingStats {
    pub domain: String,
    /// `[layer][expert]`: fraction of tokens with the expert among their top-k.
    pub fraction: Vec<Vec<f64>>,
    /// `[layer][expert]`: mean router probability (softmax over all experts, bias included).
    pub weight: Vec<Vec<f64>>,
    pub tokens: usize,
}

/// Route every token of `windows` (rows of ids) on `runner`'s device and count expert use per
/// layer.
pub fn analyze(runner: Runner<'_>, domain: &str, windows: &[Vec<u32>]) -> Result<RoutingStats> {
    let mut counts: Vec<Vec<usize>> = Vec::new();
    let mut psum: Vec<Vec<f64>> = Vec::new();
    let mut tokens = 0;
    for w in windows {
        let layers = runner.routing(w, 1, w.len())?;
        ensure!(
            !layers.is_empty(),
            "routing analysis needs a mixture-of-experts model"
        );
        if counts.is_empty() {
            counts = layers.iter().map(|r| vec![0; r.experts]).collect();
            psum = layers.iter().map(|r| vec![0.0; r.experts]).collect();
        }
        for (li, r) in layers.iter().enumerate() {
            for &ex in &r.topk {
                counts[li][ex as usize] += 1;
            }
            for row in r.probs.chunks(r.experts) {
                for (acc, p) in psum[li].iter_mut().zip(row) {
                    *acc += *p as f64;
                }
            }
        }
        tokens += w.len();
    }
    let weight = psum
        .iter()
        .map(|c| c.iter().map(|&x| x / tokens.max(1) as f64).collect())
        .collect();
    let fraction = counts
        .iter()
        .map(|c| c.iter().map(|&x| x as f64 / tokens.max(1) as f64).collect())
        .collect();
    Ok(RoutingStats {
        domain: domain.into(),
        fraction,
        weight,
        tokens,
    })
}

pub fn markdown(stats: &[RoutingStats], experts: &[String]) -> String {
    let mut s = String::from("| domain | layer |");
    for x in experts {
        s.push_str(&format!(" {x} |"));
    }
    s.push_str("\n|---|---:|");
    for _ in experts {
        s.push_str("---:|");
    }
    s.push('\n');
    for st in stats {
        for (l, (row, wrow)) in st.fraction.iter().zip(&st.weight).enumerate() {
            s.push_str(&format!("| {} | {l} |", st.domain));
            for (f, w) in row.iter().zip(wrow) {
                s.push_str(&format!(" {f:.2} ({w:.2}) |"));
            }
            s.push('\n');
        }
    }
    s
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG heatmap of the mean router probabilities: one block of rows per domain (a row per
/// layer), one column per expert; cell
/// colour from white (0) to dark blue (1), value printed in the cell.
pub fn heatmap_svg(stats: &[RoutingStats], experts: &[String], title: &str) -> String {
    let (cw, ch, left, top) = (78.0, 22.0, 150.0, 70.0);
    let rows: usize =
        stats.iter().map(|s| s.fraction.len()).sum::<usize>() + stats.len().saturating_sub(1);
    let width = left + cw * experts.len() as f64 + 20.0;
    let height = top + ch * rows as f64 + 20.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"20\" font-size=\"14\" text-anchor=\"middle\">{}</text>\n",
        width / 2.0,
        escape(title)
    );
    for (i, x) in experts.iter().enumerate() {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            left + cw * (i as f64 + 0.5),
            top - 8.0,
            escape(x)
        ));
    }
    let mut y = top;
    for st in stats {
        for (l, row) in st.weight.iter().enumerate() {
            s.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} L{l}</text>\n",
                left - 6.0,
                y + ch * 0.7,
                escape(&st.domain)
            ));
            for (i, f) in row.iter().enumerate() {
                let f = f.clamp(0.0, 1.0);
                let (r, g, b) = (255.0 - 215.0 * f, 255.0 - 175.0 * f, 255.0 - 95.0 * f);
                s.push_str(&format!(
                    "<rect x=\"{}\" y=\"{y}\" width=\"{cw}\" height=\"{ch}\" fill=\"rgb({:.0},{:.0},{:.0})\" stroke=\"#ddd\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{}\">{:.2}</text>\n",
                    left + cw * i as f64,
                    r,
                    g,
                    b,
                    left + cw * (i as f64 + 0.5),
                    y + ch * 0.7,
                    if f > 0.55 { "white" } else { "black" },
                    f
                ));
            }
            y += ch;
        }
        y += ch;
    }
    s.push_str("</svg>\n");
    s
}
