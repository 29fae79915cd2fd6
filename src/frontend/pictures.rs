//! The status board's pictures, drawn by the gateway as plain SVG: a map of the
//! region with each member at its `location` from the region file, coloured by its
//! state as this gateway sees it, and each member's last hour of sub-queries
//! (latency p50/p99 and queries per minute).
//!
//! No map tiles, fonts or scripts come from anywhere else, so the board works on a
//! network with no way out. The SVG carries no script, style sheet or link (only
//! presentation attributes, which the board's Content-Security-Policy allows and its
//! allow-list keeps), and every piece of text in it goes through [`esc`]: names come
//! from the region file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::ops::history::{MINUTES, MinuteStats};

/// How a member looks from this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// This gateway itself.
    This,
    /// Its last sub-query was answered (or refused by its rules, which is an
    /// answer too) and its breaker is closed.
    Up,
    /// Its breaker is probing, or its last answer was stale or it was busy.
    Degraded,
    /// Its breaker is open, or its last sub-query failed.
    Down,
    /// Not asked anything yet.
    Unknown,
    /// A client-only member: it runs no gateway to ask.
    NoGateway,
}

impl Seen {
    /// What the board and the JSON call it.
    pub fn word(self) -> &'static str {
        match self {
            Seen::This => "this gateway",
            Seen::Up => "up",
            Seen::Degraded => "degraded",
            Seen::Down => "down",
            Seen::Unknown => "not asked yet",
            Seen::NoGateway => "no gateway",
        }
    }

    /// Its colour on the map (the board's badge colours).
    fn colour(self) -> &'static str {
        match self {
            Seen::This => "#2563eb",
            Seen::Up => "#16a34a",
            Seen::Degraded => "#d97706",
            Seen::Down => "#dc2626",
            Seen::Unknown => "#9ca3af",
            Seen::NoGateway => "#ffffff",
        }
    }
}

/// A member's state as this gateway sees it, from its breaker (`closed`, `open`,
/// `probing`, `local` or `none`) and the state of its last sub-query.
pub fn seen(local: bool, has_gateway: bool, breaker: &str, last_state: Option<&str>) -> Seen {
    if local {
        return Seen::This;
    }
    if !has_gateway {
        return Seen::NoGateway;
    }
    match (breaker, last_state) {
        ("open", _) => Seen::Down,
        ("probing", _) => Seen::Degraded,
        (_, None) => Seen::Unknown,
        (_, Some("ok" | "cached" | "denied" | "cancelled")) => Seen::Up,
        (_, Some("stale" | "busy")) => Seen::Degraded,
        (_, Some(_)) => Seen::Down,
    }
}

/// A member on the map.
#[derive(Debug, Clone)]
pub struct Place {
    /// Member name.
    pub name: String,
    /// `city`, `county` or `office`.
    pub kind: String,
    /// Longitude, degrees.
    pub lon: f64,
    /// Latitude, degrees.
    pub lat: f64,
    /// How this gateway sees it.
    pub seen: Seen,
    /// One line for the tooltip (last state and latency).
    pub detail: String,
}

/// Text made safe for SVG content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Characters XML 1.0 does not allow would make the whole picture fail to
            // parse.
            c if ((c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r'))
                || matches!(c, '\u{FFFE}' | '\u{FFFF}') =>
            {
                out.push('\u{FFFD}')
            }
            c => out.push(c),
        }
    }
    out
}

const FONT: &str = "font-family=\"system-ui, sans-serif\"";
const MAP_W: f64 = 640.0;
const MAP_H: f64 = 440.0;
const MARGIN: f64 = 48.0;

/// A length on a 1-2-5 scale close to `x` (from below).
fn nice(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    let m = x / p;
    p * if m >= 5.0 {
        5.0
    } else if m >= 2.0 {
        2.0
    } else {
        1.0
    }
}

/// The smallest length on a 1-2-5 scale at or above `x`.
fn nice_above(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| p * m)
        .find(|v| *v >= x)
        .unwrap_or(p * 10.0)
}

/// The region's map. `this` is the gateway drawing it; `unplaced` the members the
/// region file gives no location.
pub fn map_svg(region: &str, this: &str, places: &[Place], unplaced: &[String]) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {MAP_W} {MAP_H}\" \
         width=\"{MAP_W}\" height=\"{MAP_H}\" role=\"img\" data-picture=\"map\" {FONT} font-size=\"12\">\
         <title>{} as {} sees it</title>\
         <rect width=\"{MAP_W}\" height=\"{MAP_H}\" fill=\"#f8fafc\" stroke=\"#e2e8f0\"/>",
        esc(region),
        esc(this)
    );
    if places.is_empty() {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#64748b\">No member has a \
             location in the region file.</text></svg>",
            MAP_W / 2.0,
            MAP_H / 2.0
        );
        return svg;
    }

    // An equirectangular projection scaled by the cosine of the middle latitude: at a
    // region's size it keeps distances and shapes close enough, and needs no library.
    // Latitudes are drawn within ±85° (as web maps do): nearer the poles the cosine
    // scale stops meaning anything, and a region there is drawn at the limit.
    let lat_of = |p: &Place| p.lat.clamp(-85.0, 85.0);
    let (mut lon0, mut lon1, mut lat0, mut lat1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for p in places {
        lon0 = lon0.min(p.lon);
        lon1 = lon1.max(p.lon);
        lat0 = lat0.min(lat_of(p));
        lat1 = lat1.max(lat_of(p));
    }
    // At least half a degree of room around the points, more for a wide region.
    let pad_lon = ((lon1 - lon0) * 0.15).max(0.5);
    let pad_lat = ((lat1 - lat0) * 0.15).max(0.5);
    let (lon0, lon1) = ((lon0 - pad_lon).max(-180.0), (lon1 + pad_lon).min(180.0));
    let (lat0, lat1) = ((lat0 - pad_lat).max(-89.0), (lat1 + pad_lat).min(89.0));
    let k = ((lat0 + lat1) / 2.0).to_radians().cos().max(0.05);
    let (span_x, span_y) = ((lon1 - lon0) * k, lat1 - lat0);
    let scale = ((MAP_W - 2.0 * MARGIN) / span_x).min((MAP_H - 2.0 * MARGIN) / span_y);
    // Centred in the frame.
    let ox = (MAP_W - span_x * scale) / 2.0;
    let oy = (MAP_H - span_y * scale) / 2.0;
    let project = |lon: f64, lat: f64| -> (f64, f64) {
        (ox + (lon - lon0) * k * scale, oy + (lat1 - lat) * scale)
    };

    // Graticule: meridians and parallels on a 1-2-5 step of about a quarter of the span.
    let step = nice(((lon1 - lon0).max(lat1 - lat0)) / 4.0);
    svg.push_str(
        "<g data-layer=\"graticule\" stroke=\"#e2e8f0\" fill=\"#94a3b8\" font-size=\"10\">",
    );
    let mut lon = (lon0 / step).ceil() * step;
    while lon <= lon1 {
        let (x, _) = project(lon, lat0);
        let _ = write!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" stroke=\"none\">{}</text>",
            oy,
            oy + span_y * scale,
            oy + span_y * scale + 12.0,
            degrees(lon, 'E', 'W')
        );
        lon += step;
    }
    let mut lat = (lat0 / step).ceil() * step;
    while lat <= lat1 {
        let (_, y) = project(lon0, lat);
        let _ = write!(
            svg,
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" stroke=\"none\">{}</text>",
            ox,
            ox + span_x * scale,
            ox - 4.0,
            y + 3.0,
            degrees(lat, 'N', 'S')
        );
        lat += step;
    }
    svg.push_str("</g>");

    // Where each member is drawn: at its place, unless another member is already
    // drawn within reach, then on a small ring around it with a leader line back.
    let mut at: Vec<(f64, f64, f64, f64)> = Vec::with_capacity(places.len());
    for p in places {
        let (x, y) = project(p.lon, lat_of(p));
        let mut spot = (x, y);
        'ring: for i in 0..24 {
            let free = at
                .iter()
                .all(|&(_, _, dx, dy)| (dx - spot.0).hypot(dy - spot.1) >= 18.0);
            if free {
                break 'ring;
            }
            let angle =
                std::f64::consts::FRAC_PI_4 * f64::from(i % 8) - std::f64::consts::FRAC_PI_2;
            let radius = 20.0 * f64::from(1 + i / 8);
            spot = (x + radius * angle.cos(), y + radius * angle.sin());
        }
        at.push((x, y, spot.0, spot.1));
    }

    // Links from this gateway to the members it asks, coloured by their state.
    if let Some(me) = places.iter().position(|p| p.seen == Seen::This) {
        let (_, _, mx, my) = at[me];
        svg.push_str("<g data-layer=\"links\" stroke-width=\"1.5\" fill=\"none\">");
        for (p, &(_, _, x, y)) in places.iter().zip(&at) {
            if matches!(p.seen, Seen::This | Seen::NoGateway) {
                continue;
            }
            let dash = if p.seen == Seen::Down {
                " stroke-dasharray=\"5 4\""
            } else {
                ""
            };
            let _ = write!(
                svg,
                "<line data-link=\"{}\" x1=\"{mx:.1}\" y1=\"{my:.1}\" x2=\"{x:.1}\" y2=\"{y:.1}\" \
                 stroke=\"{}\" stroke-opacity=\"0.55\"{dash}/>",
                esc(&p.name),
                p.seen.colour()
            );
        }
        svg.push_str("</g>");
    }

    // Leader lines from the true places of members drawn beside them, under every
    // member's circle.
    svg.push_str("<g data-layer=\"leaders\" stroke=\"#64748b\" fill=\"#64748b\">");
    for (p, &(x0, y0, x, y)) in places.iter().zip(&at) {
        if (x0 - x).hypot(y0 - y) > 0.5 {
            let _ = write!(
                svg,
                "<line data-leader=\"{}\" x1=\"{x0:.1}\" y1=\"{y0:.1}\" x2=\"{x:.1}\" y2=\"{y:.1}\"/>\
                 <circle cx=\"{x0:.1}\" cy=\"{y0:.1}\" r=\"2\" stroke=\"none\"/>",
                esc(&p.name)
            );
        }
    }
    svg.push_str("</g>");

    // Members, then their labels (kept from overlapping one another).
    let mut labels: Vec<(f64, f64, f64)> = Vec::new();
    svg.push_str("<g data-layer=\"members\">");
    for (p, &(_, _, x, y)) in places.iter().zip(&at) {
        let _ = write!(
            svg,
            "<g data-member=\"{}\" data-state=\"{}\"><title>{} ({}): {}{}</title>",
            esc(&p.name),
            esc(p.seen.word()),
            esc(&p.name),
            esc(&p.kind),
            esc(p.seen.word()),
            if p.detail.is_empty() {
                String::new()
            } else {
                format!(", {}", esc(&p.detail))
            }
        );
        let (r, ring) = match p.seen {
            Seen::This => (
                9.0,
                "<circle fill=\"none\" stroke=\"#2563eb\" stroke-width=\"1.5\" r=\"13\"",
            ),
            _ => (7.0, ""),
        };
        if !ring.is_empty() {
            let _ = write!(svg, "{ring} cx=\"{x:.1}\" cy=\"{y:.1}\"/>");
        }
        let (shape_stroke, stroke_w) = match p.seen {
            Seen::NoGateway => ("#475569", 2.0),
            _ => ("#ffffff", 1.5),
        };
        let _ = write!(
            svg,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"{r}\" fill=\"{}\" stroke=\"{shape_stroke}\" \
             stroke-width=\"{stroke_w}\"/>",
            p.seen.colour()
        );
        // The label beside the point: right, left, above or below it, whichever
        // first covers no earlier label and stays in the frame (names are short;
        // 7 px per character is a fair guess at their width).
        let w = 7.0 * p.name.chars().count().max(p.seen.word().len()) as f64;
        let overlaps = |lx: f64, ly: f64, labels: &[(f64, f64, f64)]| {
            labels
                .iter()
                .any(|&(ox, oy, ow)| lx < ox + ow && ox < lx + w && (ly - oy).abs() < 26.0)
        };
        let inside = |lx: f64, ly: f64| {
            lx >= 2.0 && lx + w <= MAP_W - 2.0 && (14.0..=MAP_H - 34.0).contains(&ly)
        };
        let mut candidates = vec![
            (x + r + 5.0, y + 4.0),
            (x - r - 5.0 - w, y + 4.0),
            (x + r, y - r - 16.0),
            (x + r, y + r + 14.0),
        ];
        candidates.extend((2..8).map(|i| (x + r + 5.0, y + 4.0 + 26.0 * f64::from(i))));
        let (lx, ly) = candidates
            .iter()
            .copied()
            .find(|&(lx, ly)| inside(lx, ly) && !overlaps(lx, ly, &labels))
            .unwrap_or(candidates[0]);
        labels.push((lx, ly, w));
        let _ = write!(
            svg,
            "<text x=\"{lx:.1}\" y=\"{ly:.1}\" font-weight=\"600\" fill=\"#0f172a\">{}</text>\
             <text x=\"{lx:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#475569\">{}</text></g>",
            esc(&p.name),
            ly + 12.0,
            esc(p.seen.word())
        );
    }
    svg.push_str("</g>");

    // Scale bar (a degree of latitude is 111.32 km everywhere) and legend.
    let km_per_px = 111.32 / scale;
    let km = nice(km_per_px * 120.0);
    let bar = km / km_per_px;
    let (bx, by) = (MAP_W - MARGIN / 2.0 - bar, MAP_H - 14.0);
    let _ = write!(
        svg,
        "<g data-layer=\"scale\" fill=\"#334155\" font-size=\"10\"><line x1=\"{bx:.1}\" y1=\"{by}\" \
         x2=\"{:.1}\" y2=\"{by}\" stroke=\"#334155\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{}\" \
         text-anchor=\"middle\">{km} km</text></g>",
        bx + bar,
        bx + bar / 2.0,
        by - 4.0
    );
    svg.push_str("<g data-layer=\"legend\" font-size=\"10\" fill=\"#334155\">");
    let mut lx = 10.0;
    for s in [
        Seen::This,
        Seen::Up,
        Seen::Degraded,
        Seen::Down,
        Seen::Unknown,
        Seen::NoGateway,
    ] {
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{}\" r=\"5\" fill=\"{}\" stroke=\"#475569\" stroke-width=\"0.5\"/>\
             <text x=\"{:.1}\" y=\"{}\">{}</text>",
            lx + 5.0,
            MAP_H - 18.0,
            s.colour(),
            lx + 13.0,
            MAP_H - 15.0,
            esc(s.word())
        );
        lx += 22.0 + 5.5 * s.word().len() as f64;
    }
    svg.push_str("</g>");
    if !unplaced.is_empty() {
        let names: Vec<String> = unplaced.iter().map(|n| esc(n)).collect();
        let _ = write!(
            svg,
            "<text data-layer=\"unplaced\" x=\"10\" y=\"18\" font-size=\"11\" fill=\"#64748b\">\
             Not on the map (no location in the region file): {}</text>",
            names.join(", ")
        );
    }
    svg.push_str("</svg>");
    svg
}

/// `121.5°E`, `31°N`.
fn degrees(v: f64, pos: char, neg: char) -> String {
    let text = format!("{:.2}", v.abs());
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}°{}", if v < 0.0 { neg } else { pos })
}

const CHART_W: f64 = 880.0;
const ROW_H: f64 = 96.0;
const TOP: f64 = 40.0;
const PANEL_W: f64 = 330.0;
const LEFT: f64 = 120.0;
const GAP: f64 = 70.0;

/// The last hour of every member in `members` (in that order): latency p50 and
/// p99 on a shared logarithmic scale, and queries per minute on a shared linear one,
/// so members compare at a glance. `now` is seconds since the Unix epoch.
pub fn charts_svg(
    members: &[String],
    series: &BTreeMap<String, Vec<MinuteStats>>,
    now: u64,
) -> String {
    let now_minute = now / 60;
    // (Saturating: a clock that reads the first hour of 1970 draws an empty hour.)
    let first = (now_minute + 1).saturating_sub(MINUTES);
    let height = TOP + ROW_H * members.len().max(1) as f64 + 28.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {CHART_W} {height}\" \
         width=\"{CHART_W}\" height=\"{height}\" role=\"img\" data-picture=\"charts\" {FONT} \
         font-size=\"11\"><title>Sub-queries per member over the last hour</title>\
         <rect width=\"{CHART_W}\" height=\"{height}\" fill=\"#ffffff\"/>"
    );

    // Shared scales: latency from a power of ten under the fastest median to one
    // over the slowest 99th percentile; calls from 0 to a 1-2-5 step over the most.
    let in_window = |m: &&MinuteStats| m.start / 60 >= first && m.start / 60 <= now_minute;
    let all: Vec<&MinuteStats> = members
        .iter()
        .filter_map(|m| series.get(m))
        .flatten()
        .filter(in_window)
        .collect();
    let lo = all.iter().map(|m| m.p50_ms).fold(f64::MAX, f64::min);
    let hi = all.iter().map(|m| m.p99_ms).fold(0.0, f64::max);
    let (lo, hi) = if all.is_empty() {
        (0.1, 1000.0)
    } else {
        let lo = 10f64.powf(lo.max(0.001).log10().floor());
        let hi = 10f64.powf(hi.max(lo * 10.0).log10().ceil());
        (lo, hi.max(lo * 10.0))
    };
    let most = all.iter().map(|m| m.calls).max().unwrap_or(0).max(1) as f64;
    let top_calls = nice_above(most);

    let lat_x = LEFT;
    let qpm_x = LEFT + PANEL_W + GAP;
    let inner_h = ROW_H - 30.0;
    let col_w = PANEL_W / MINUTES as f64;
    let _ = write!(
        svg,
        "<text x=\"{lat_x}\" y=\"16\" font-weight=\"600\" fill=\"#0f172a\">Latency, ms \
         (log scale)</text><text x=\"{lat_x}\" y=\"30\" font-size=\"10\" fill=\"#475569\">\
         <tspan fill=\"#2563eb\">━ p50</tspan>  <tspan fill=\"#9333ea\">┅ p99</tspan> per minute, \
         as this gateway measured each sub-query</text>\
         <text x=\"{qpm_x}\" y=\"16\" font-weight=\"600\" fill=\"#0f172a\">Sub-queries per minute\
         </text><text x=\"{qpm_x}\" y=\"30\" font-size=\"10\" fill=\"#475569\"><tspan \
         fill=\"#64748b\">■ answered</tspan>  <tspan fill=\"#dc2626\">■ not answered fully</tspan>\
         </text>"
    );
    if members.is_empty() {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" fill=\"#64748b\">No member runs a gateway.</text>",
            LEFT,
            TOP + 30.0
        );
    }
    let x_of = |base: f64, minute: u64| base + (minute - first) as f64 * col_w;
    let y_lat = |top: f64, ms: f64| {
        let f = (ms.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10());
        top + inner_h * (1.0 - f.clamp(0.0, 1.0))
    };
    let y_calls = |top: f64, n: f64| top + inner_h * (1.0 - (n / top_calls).min(1.0));
    for (row, name) in members.iter().enumerate() {
        let top = TOP + row as f64 * ROW_H + 8.0;
        let minutes: Vec<&MinuteStats> = series
            .get(name)
            .map(|s| s.iter().filter(in_window).collect())
            .unwrap_or_default();
        let calls: u64 = minutes.iter().map(|m| m.calls).sum();
        let failures: u64 = minutes.iter().map(|m| m.failures).sum();
        let _ = write!(
            svg,
            "<g data-member=\"{}\" data-calls=\"{calls}\" data-failures=\"{failures}\">\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-weight=\"600\" fill=\"#0f172a\">{}</text>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\" fill=\"#475569\">{} in the hour</text>",
            esc(name),
            LEFT - 14.0,
            top + inner_h / 2.0,
            esc(name),
            LEFT - 14.0,
            top + inner_h / 2.0 + 13.0,
            if calls == 1 {
                "1 call".to_string()
            } else {
                format!("{calls} calls")
            }
        );
        // Frames, gridlines and axis labels of both panels.
        for base in [lat_x, qpm_x] {
            let _ = write!(
                svg,
                "<rect x=\"{base}\" y=\"{top:.1}\" width=\"{PANEL_W}\" height=\"{inner_h}\" \
                 fill=\"#f8fafc\" stroke=\"#e2e8f0\"/>"
            );
        }
        let mut tick = lo;
        while tick <= hi * 1.001 {
            let y = y_lat(top, tick);
            let _ = write!(
                svg,
                "<line x1=\"{lat_x}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e2e8f0\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"9\" fill=\"#94a3b8\">{}</text>",
                lat_x + PANEL_W,
                lat_x - 3.0,
                y + 3.0,
                trim_number(tick)
            );
            tick *= 10.0;
        }
        for n in [0.0, top_calls / 2.0, top_calls] {
            let y = y_calls(top, n);
            let _ = write!(
                svg,
                "<line x1=\"{qpm_x}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e2e8f0\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"9\" fill=\"#94a3b8\">{}</text>",
                qpm_x + PANEL_W,
                qpm_x - 3.0,
                y + 3.0,
                trim_number(n)
            );
        }
        if minutes.is_empty() {
            for base in [lat_x, qpm_x] {
                let _ = write!(
                    svg,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#94a3b8\">no \
                     sub-queries in the last hour</text>",
                    base + PANEL_W / 2.0,
                    top + inner_h / 2.0 + 4.0
                );
            }
        }
        // Latency lines, broken where a minute had no calls, with a dot per minute
        // (so that a lone minute shows).
        for (series_name, colour, dash, value) in [
            (
                "p50",
                "#2563eb",
                "",
                (|m: &MinuteStats| m.p50_ms) as fn(&MinuteStats) -> f64,
            ),
            (
                "p99",
                "#9333ea",
                " stroke-dasharray=\"4 3\"",
                |m: &MinuteStats| m.p99_ms,
            ),
        ] {
            let mut d = String::new();
            let mut previous: Option<u64> = None;
            for m in &minutes {
                let minute = m.start / 60;
                let (x, y) = (x_of(lat_x, minute) + col_w / 2.0, y_lat(top, value(m)));
                let pen = if previous == Some(minute.wrapping_sub(1)) {
                    'L'
                } else {
                    'M'
                };
                let _ = write!(d, "{pen}{x:.1} {y:.1}");
                previous = Some(minute);
            }
            let _ = write!(
                svg,
                "<g data-series=\"{series_name}\"><path d=\"{d}\" fill=\"none\" stroke=\"{colour}\" \
                 stroke-width=\"1.5\"{dash}/>"
            );
            for m in &minutes {
                let x = x_of(lat_x, m.start / 60) + col_w / 2.0;
                let _ = write!(
                    svg,
                    "<circle cx=\"{x:.1}\" cy=\"{:.1}\" r=\"1.8\" fill=\"{colour}\"/>",
                    y_lat(top, value(m))
                );
            }
            svg.push_str("</g>");
        }
        // Calls per minute, the failed part on top in red.
        svg.push_str("<g data-series=\"calls\">");
        for m in &minutes {
            let minute = m.start / 60;
            let x = x_of(qpm_x, minute) + 0.5;
            let w = (col_w - 1.0).max(1.0);
            let y_all = y_calls(top, m.calls as f64);
            let y_ok = y_calls(top, (m.calls - m.failures.min(m.calls)) as f64);
            let _ = write!(
                svg,
                "<rect data-start=\"{}\" data-calls=\"{}\" data-failures=\"{}\" x=\"{x:.1}\" \
                 y=\"{y_ok:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"#64748b\">\
                 <title>{} UTC: {} sub-quer{}, {} not answered fully; p50 {} ms, p99 {} ms</title></rect>",
                m.start,
                m.calls,
                m.failures,
                top + inner_h - y_ok,
                clock(m.start),
                m.calls,
                if m.calls == 1 { "y" } else { "ies" },
                m.failures,
                trim_number(m.p50_ms),
                trim_number(m.p99_ms)
            );
            if m.failures > 0 {
                let _ = write!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{y_all:.1}\" width=\"{w:.1}\" height=\"{:.1}\" \
                     fill=\"#dc2626\"/>",
                    y_ok - y_all
                );
            }
        }
        svg.push_str("</g></g>");
    }
    // The time axis under the last row.
    let axis_y = TOP + ROW_H * members.len().max(1) as f64;
    for base in [lat_x, qpm_x] {
        for back in [60u64, 45, 30, 15, 0] {
            let minute = (now_minute + 1).saturating_sub(back.max(1)).max(first);
            let x = if back == 0 {
                base + PANEL_W
            } else {
                x_of(base, minute)
            };
            let label = if back == 0 {
                "now".to_string()
            } else {
                format!("−{back} min")
            };
            let _ = write!(
                svg,
                "<text x=\"{x:.1}\" y=\"{axis_y:.1}\" text-anchor=\"middle\" font-size=\"9\" \
                 fill=\"#64748b\">{label}</text>"
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// `HH:MM` of a Unix time, UTC.
fn clock(secs: u64) -> String {
    format!("{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60)
}

/// A number with at most three significant digits and no trailing zeros.
fn trim_number(v: f64) -> String {
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else if v >= 1.0 {
        2
    } else {
        3
    };
    let text = format!("{v:.digits$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(name: &str, lon: f64, lat: f64, seen: Seen) -> Place {
        Place {
            name: name.into(),
            kind: "city".into(),
            lon,
            lat,
            seen,
            detail: String::new(),
        }
    }

    /// The `cx`/`cy` of the first circle drawn for a member.
    fn centre(svg: &str, member: &str) -> (f64, f64) {
        let start = svg
            .find(&format!("<g data-member=\"{member}\""))
            .unwrap_or_else(|| panic!("{member} is not drawn: {svg}"));
        let group = &svg[start..];
        let group = &group[..group.find("</g>").unwrap()];
        // The last circle of the group is the member's own (a ring may come first).
        let c = &group[group.rfind("<circle").unwrap()..];
        let attr = |name: &str| -> f64 {
            let at = c.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
            c[at..at + c[at..].find('"').unwrap()].parse().unwrap()
        };
        (attr("cx"), attr("cy"))
    }

    #[test]
    fn members_are_placed_by_longitude_and_latitude_and_coloured_by_state() {
        let places = [
            place("shanghai", 121.47, 31.23, Seen::Up),
            place("hangzhou", 120.16, 30.27, Seen::This),
            place("hefei", 117.23, 31.82, Seen::Down),
            place("anji", 119.68, 30.64, Seen::Unknown),
        ];
        let svg = map_svg("yrd", "hangzhou", &places, &["coordination".into()]);
        let (sh, hz, hf, aj) = (
            centre(&svg, "shanghai"),
            centre(&svg, "hangzhou"),
            centre(&svg, "hefei"),
            centre(&svg, "anji"),
        );
        // East is right, north is up.
        assert!(hf.0 < aj.0 && aj.0 < hz.0 && hz.0 < sh.0, "{svg}");
        assert!(hf.1 < sh.1 && sh.1 < aj.1 && aj.1 < hz.1, "{svg}");
        // Equal scales on both axes (after the cosine): Shanghai to Hefei is
        // about 4.24° of longitude and 0.59° of latitude.
        let k = 31.5f64.to_radians().cos();
        let ratio = (sh.0 - hf.0) / (sh.1 - hf.1).abs();
        let want = (121.47 - 117.23) * k / (31.82 - 31.23);
        assert!((ratio / want - 1.0).abs() < 0.02, "{ratio} vs {want}");
        // Everything inside the frame.
        for (x, y) in [sh, hz, hf, aj] {
            assert!((0.0..=MAP_W).contains(&x) && (0.0..=MAP_H).contains(&y));
        }
        assert!(svg.contains("data-member=\"hefei\" data-state=\"down\""));
        assert!(svg.contains("data-member=\"hangzhou\" data-state=\"this gateway\""));
        assert!(
            svg.contains("data-link=\"hefei\""),
            "links from this gateway"
        );
        assert!(!svg.contains("data-link=\"hangzhou\""), "no link to itself");
        assert!(svg.contains("no location in the region file): coordination"));
    }

    #[test]
    fn members_at_one_place_are_drawn_apart_with_a_leader_line() {
        let places = [
            place("shanghai", 121.47, 31.23, Seen::Up),
            place("coordination", 121.47, 31.23, Seen::This),
            place("hefei", 117.23, 31.82, Seen::Up),
        ];
        let svg = map_svg("yrd", "coordination", &places, &[]);
        let (a, b) = (centre(&svg, "shanghai"), centre(&svg, "coordination"));
        assert!((a.0 - b.0).hypot(a.1 - b.1) >= 18.0, "{a:?} {b:?}");
        assert!(
            svg.contains("data-leader=\"coordination\""),
            "the true place is marked"
        );
    }

    #[test]
    fn text_from_the_region_file_cannot_add_markup() {
        let mut p = place("<script>alert(1)</script>", 120.0, 30.0, Seen::Up);
        p.detail = "\"/><image href=x onerror=alert(1)>\u{1}".into();
        let svg = map_svg("r&d", "x", &[p], &["<b>".into()]);
        assert!(!svg.contains("<script"), "{svg}");
        assert!(!svg.contains("<image"), "{svg}");
        assert!(!svg.contains("<b>"), "{svg}");
        assert!(!svg.contains('\u{1}'));
        let odd = map_svg("r", "x", &[place("a\u{FFFF}b", 120.0, 30.0, Seen::Up)], &[]);
        assert!(!odd.contains('\u{FFFF}') && odd.contains("a\u{FFFD}b"));
        assert!(svg.contains("&lt;script&gt;") && svg.contains("r&amp;d"));
    }

    #[test]
    fn regions_near_a_pole_or_at_the_epoch_are_drawn_inside_the_frame() {
        let places = [
            place("north", 10.0, 89.9, Seen::Up),
            place("norther", 12.0, 90.0, Seen::Up),
        ];
        let svg = map_svg("arctic", "x", &places, &[]);
        for m in ["north", "norther"] {
            let (x, y) = centre(&svg, m);
            assert!(
                (0.0..=MAP_W).contains(&x) && (0.0..=MAP_H).contains(&y),
                "{m}: {x} {y}"
            );
        }
        // A clock in the first hour of 1970 draws an empty hour rather than panicking.
        let svg = charts_svg(&["a".to_string()], &BTreeMap::new(), 120);
        assert!(svg.contains("no sub-queries in the last hour"));
    }

    #[test]
    fn states_follow_the_breaker_first_then_the_last_call() {
        assert_eq!(seen(true, true, "local", None), Seen::This);
        assert_eq!(seen(false, false, "none", None), Seen::NoGateway);
        assert_eq!(seen(false, true, "closed", None), Seen::Unknown);
        assert_eq!(seen(false, true, "closed", Some("ok")), Seen::Up);
        assert_eq!(seen(false, true, "closed", Some("denied")), Seen::Up);
        assert_eq!(seen(false, true, "closed", Some("stale")), Seen::Degraded);
        assert_eq!(seen(false, true, "closed", Some("timed_out")), Seen::Down);
        assert_eq!(seen(false, true, "open", Some("ok")), Seen::Down);
        assert_eq!(seen(false, true, "probing", Some("ok")), Seen::Degraded);
    }

    #[test]
    fn charts_show_each_members_minutes_on_shared_scales() {
        let now = 10_000 * 60 + 30;
        let minute = |back: u64, calls: u64, failures: u64, p50: f64, p99: f64| MinuteStats {
            start: (10_000 - back) * 60,
            calls,
            failures,
            p50_ms: p50,
            p99_ms: p99,
        };
        let mut series = BTreeMap::new();
        series.insert(
            "hefei".to_string(),
            vec![
                // Outside the hour: not drawn.
                minute(60, 99, 0, 1.0, 2.0),
                minute(5, 10, 2, 3.0, 40.0),
                minute(4, 20, 0, 2.0, 9.0),
                minute(1, 5, 0, 2.5, 5.0),
            ],
        );
        series.insert("anji".to_string(), vec![minute(0, 40, 0, 0.4, 0.9)]);
        let members = [
            "hefei".to_string(),
            "anji".to_string(),
            "suzhou".to_string(),
        ];
        let svg = charts_svg(&members, &series, now);
        assert!(svg.contains("data-member=\"hefei\" data-calls=\"35\" data-failures=\"2\""));
        assert!(svg.contains("data-member=\"anji\" data-calls=\"40\" data-failures=\"0\""));
        assert!(svg.contains("data-member=\"suzhou\" data-calls=\"0\""));
        assert_eq!(svg.matches("no sub-queries in the last hour").count(), 2);
        assert_eq!(svg.matches("data-start=").count(), 4);
        // The latency line breaks at the missing minutes (two segments for hefei).
        let hefei = &svg[svg.find("data-member=\"hefei\"").unwrap()..];
        let p50 = &hefei[hefei.find("data-series=\"p50\"").unwrap()..];
        let d = &p50[p50.find(" d=\"").unwrap() + 4..];
        let d = &d[..d.find('"').unwrap()];
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert_eq!(d.matches('L').count(), 1, "{d}");
        // Shared latency scale: decades from 0.1 ms (under anji's 0.4) to 100 ms
        // (over hefei's 40).
        assert!(
            svg.contains(">0.1</text>") && svg.contains(">100</text>"),
            "{svg}"
        );
        assert!(!svg.contains(">1000</text>"));
        // The busiest minute (40) sets the calls scale: 0, 25 and 50 on 1-2-5 steps.
        assert!(svg.contains(">50</text>"), "{svg}");
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(trim_number(0.1), "0.1");
        assert_eq!(trim_number(12.34), "12.3");
        assert_eq!(trim_number(250.0), "250");
        assert_eq!(degrees(121.5, 'E', 'W'), "121.5°E");
        assert_eq!(degrees(-30.0, 'N', 'S'), "30°S");
        assert_eq!(nice(130.0), 100.0);
        assert_eq!(nice(0.3), 0.2);
        assert_eq!(nice_above(40.0), 50.0);
        assert_eq!(nice_above(3.0), 5.0);
        assert_eq!(nice_above(1.0), 1.0);
        assert_eq!(clock(10_000 * 60), "22:40");
    }
}
