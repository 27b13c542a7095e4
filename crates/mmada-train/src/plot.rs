//! Training curves and sample grids as PNG files, from a run directory's `metrics.jsonl`
//! (`mmada-train plot RUN_DIR`, also run at the end of every training run).
//!
//! * [`read_metrics`] reads the JSONL rows (one per optimizer step, as the trainers write
//!   them); rows of a step logged twice (a run resumed from an earlier checkpoint) keep the
//!   last one.
//! * [`panels`] picks the curves: for SFT `loss` (with the per-task `step_loss_*`), `eval_loss`,
//!   `lr` and `grad_norm`; for UniGRPO (rows with a `reward`) `reward`, every
//!   `rewards/…/mean`, `kl`, `clip_ratio/*`, `completions/mean_length`, `loss`,
//!   `learning_rate` and `grad_norm`. A metric without a finite value is left out.
//! * [`render_panels`] draws them with `plotters` into a grid ([`PANEL_W`] × [`PANEL_H`]
//!   pixels per panel, [`COLUMNS`] columns), text in DejaVu Sans (embedded, so no system
//!   font is needed), and writes the PNG atomically (temp + rename).
//! * [`image_grid`] tiles PNG samples (text-to-image outputs) into one PNG.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use serde_json::Value;

use crate::error::TrainError;

/// Width of one panel, pixels.
pub const PANEL_W: u32 = 480;
/// Height of one panel, pixels.
pub const PANEL_H: u32 = 320;
/// Panels per row of the grid.
pub const COLUMNS: u32 = 2;
/// The curves' PNG, inside `RUN_DIR/plots/`.
pub const METRICS_PNG: &str = "metrics.png";
/// The samples' grid PNG, inside `RUN_DIR/plots/`.
pub const SAMPLES_PNG: &str = "samples.png";

/// One curve: `(step, value)` points in step order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The metrics.jsonl key (`loss`, `rewards/math_correctness/mean`, …).
    pub key: String,
    /// `(step, value)`, finite values only, ascending steps.
    pub points: Vec<(f64, f64)>,
}

/// One chart of the grid: a title and its curves.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Chart caption.
    pub title: String,
    /// Its curves (at least one with a point).
    pub series: Vec<Series>,
}

/// What [`plot_run`] wrote.
#[derive(Debug, Clone, Default)]
pub struct PlotFiles {
    /// `plots/metrics.png` (none when metrics.jsonl has no plottable value).
    pub metrics: Option<PathBuf>,
    /// `plots/samples.png` (none without PNG samples).
    pub samples: Option<PathBuf>,
    /// The panels drawn in `metrics`.
    pub panels: Vec<Panel>,
}

/// Reads `metrics.jsonl`: one JSON object per line with a numeric `step`; for a step logged
/// more than once (a resumed run re-logs the steps after its checkpoint) the last row wins.
/// Rows come back in ascending step order.
///
/// # Errors
/// [`TrainError::Io`] for an unreadable file; [`TrainError::Other`] naming the file and line
/// of a malformed row.
pub fn read_metrics(path: &Path) -> Result<Vec<Value>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let mut by_step = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(line).map_err(|e| {
            TrainError::Other(format!(
                "{}:{}: not a JSON object ({e}); metrics.jsonl holds one JSON object per line",
                path.display(),
                i + 1
            ))
        })?;
        let Some(step) = row.get("step").and_then(Value::as_u64) else {
            return Err(TrainError::Other(format!(
                "{}:{}: no numeric `step` field",
                path.display(),
                i + 1
            )));
        };
        by_step.insert(step, row);
    }
    Ok(by_step.into_values().collect())
}

/// The finite values of `key` over the rows, as `(step, value)`.
pub fn series(rows: &[Value], key: &str) -> Series {
    let points = rows
        .iter()
        .filter_map(|r| {
            let step = r.get("step")?.as_f64()?;
            let v = r.get(key)?.as_f64()?;
            v.is_finite().then_some((step, v))
        })
        .collect();
    Series {
        key: key.to_string(),
        points,
    }
}

/// Every key of the rows that starts with `prefix` and ends with `suffix`, sorted.
fn keys_like(rows: &[Value], prefix: &str, suffix: &str) -> Vec<String> {
    let mut keys: Vec<String> = rows
        .iter()
        .filter_map(Value::as_object)
        .flat_map(|o| o.keys())
        .filter(|k| k.starts_with(prefix) && k.ends_with(suffix))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The panels of a run's rows: UniGRPO's when a row has `reward`, else SFT's (see the module
/// docs). Panels and curves without a finite value are left out.
pub fn panels(rows: &[Value]) -> Vec<Panel> {
    let of = |keys: Vec<String>| -> Vec<Series> { keys.iter().map(|k| series(rows, k)).collect() };
    let one = |key: &str| vec![series(rows, key)];
    let grpo = rows.iter().any(|r| r.get("reward").is_some());
    let spec: Vec<(&str, Vec<Series>)> = if grpo {
        vec![
            ("reward", one("reward")),
            (
                "rewards per function",
                of(keys_like(rows, "rewards/", "/mean")),
            ),
            ("KL to the reference", one("kl")),
            ("clip ratio", of(keys_like(rows, "clip_ratio/", ""))),
            ("completion length (tokens)", one("completions/mean_length")),
            ("loss", one("loss")),
            ("learning rate", one("learning_rate")),
            ("grad norm", one("grad_norm")),
        ]
    } else {
        let mut loss = one("loss");
        // the per-task losses, unless one task's curve is the total itself
        let tasks: Vec<Series> = of(keys_like(rows, "step_loss_", ""))
            .into_iter()
            .filter(|s| s.points != loss[0].points)
            .collect();
        loss.extend(tasks);
        vec![
            ("train loss", loss),
            ("eval loss", one("eval_loss")),
            ("learning rate", one("lr")),
            ("grad norm", one("grad_norm")),
        ]
    };
    spec.into_iter()
        .filter_map(|(title, series)| {
            let series: Vec<Series> = series
                .into_iter()
                .filter(|s| !s.points.is_empty())
                .collect();
            (!series.is_empty()).then(|| Panel {
                title: title.to_string(),
                series,
            })
        })
        .collect()
}

/// The size of the grid PNG for `n` panels: `COLUMNS · PANEL_W` × `rows · PANEL_H`.
pub fn grid_size(n: usize) -> (u32, u32) {
    let rows = (n as u32).div_ceil(COLUMNS).max(1);
    (COLUMNS * PANEL_W, rows * PANEL_H)
}

fn register_font() {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        // DejaVu Sans from the `dejavu` crate: a valid TrueType file, so this cannot fail
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn draw_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Other(format!("drawing the plot: {e}"))
}

/// `[lo, hi]` padded by 5 % of the span (a flat curve by 5 % of |v|, or 1 at 0).
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    let pad = if span > 0.0 {
        0.05 * span
    } else if lo != 0.0 {
        0.05 * lo.abs()
    } else {
        1.0
    };
    (lo - pad, hi + pad)
}

/// Axis numbers: scientific for small or large magnitudes (learning rates), else 4
/// significant digits; below 1e-12 (the rounding error of a zero tick, `-1.39e-17`) `0`.
fn tick(v: &f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        return "0".into();
    }
    if !(1e-2..1e5).contains(&a) {
        format!("{v:.2e}")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" { "0".into() } else { s.into() }
    }
}

/// Draws `panels` into an RGB buffer of [`grid_size`], the chart of panel `i` at row
/// `i / COLUMNS`, column `i % COLUMNS`, each curve in `Palette99` colour `j`.
///
/// # Errors
/// [`TrainError::Other`] when plotters fails to draw.
pub fn draw_panels(panels: &[Panel]) -> Result<image::RgbImage, TrainError> {
    register_font();
    let (w, h) = grid_size(panels.len());
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let rows = h / PANEL_H;
        let areas = root.split_evenly((rows as usize, COLUMNS as usize));
        for (area, panel) in areas.iter().zip(panels) {
            let pts = panel.series.iter().flat_map(|s| s.points.iter());
            let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
            for &(x, y) in pts {
                (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            }
            if x1 <= x0 {
                (x0, x1) = (x0 - 1.0, x1 + 1.0);
            }
            let (y0, y1) = padded(y0, y1);
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 18))
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(draw_err)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .x_labels(6)
                .y_labels(6)
                .label_style(("sans-serif", 12))
                .y_label_formatter(&tick)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw()
                .map_err(draw_err)?;
            for (j, s) in panel.series.iter().enumerate() {
                let colour = Palette99::pick(j).to_rgba();
                let style = ShapeStyle::from(&colour).stroke_width(2);
                let drawn = if s.points.len() == 1 {
                    chart
                        .draw_series(s.points.iter().map(|p| Circle::new(*p, 3, style.filled())))
                        .map_err(draw_err)?
                } else {
                    chart
                        .draw_series(LineSeries::new(s.points.iter().copied(), style))
                        .map_err(draw_err)?
                };
                drawn.label(s.key.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            }
            if panel.series.len() > 1 {
                chart
                    .configure_series_labels()
                    .label_font(("sans-serif", 11))
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()
                    .map_err(draw_err)?;
            }
        }
        root.present().map_err(draw_err)?;
    }
    Ok(image::RgbImage::from_raw(w, h, buf).expect("buffer of w·h·3 bytes"))
}

/// Writes `img` as a PNG at `out`, atomically (a temp file in the same folder, renamed).
fn save_png(img: &image::RgbImage, out: &Path) -> Result<(), TrainError> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    let tmp = out.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| TrainError::io(out, e))
}

/// Draws `panels` ([`draw_panels`]) and writes the PNG to `out`. Returns its size.
///
/// # Errors
/// Drawing or I/O errors naming the file.
pub fn render_panels(panels: &[Panel], out: &Path) -> Result<(u32, u32), TrainError> {
    let img = draw_panels(panels)?;
    save_png(&img, out)?;
    Ok(img.dimensions())
}

/// Tiles the PNG/JPEG images `paths` (sorted as given) into a grid of `columns` columns,
/// each cell the size of the largest image, 4 px white gutters; writes the PNG to `out`.
/// Returns its size.
///
/// # Errors
/// [`TrainError::Io`] naming an image that does not decode, or the output.
pub fn image_grid(paths: &[PathBuf], columns: u32, out: &Path) -> Result<(u32, u32), TrainError> {
    const GUTTER: u32 = 4;
    let imgs = paths
        .iter()
        .map(|p| {
            image::open(p)
                .map(|i| i.to_rgb8())
                .map_err(|e| TrainError::io(p, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let columns = columns.max(1).min(imgs.len().max(1) as u32);
    let rows = (imgs.len() as u32).div_ceil(columns).max(1);
    let cw = imgs.iter().map(|i| i.width()).max().unwrap_or(1);
    let ch = imgs.iter().map(|i| i.height()).max().unwrap_or(1);
    let (w, h) = (
        columns * cw + (columns + 1) * GUTTER,
        rows * ch + (rows + 1) * GUTTER,
    );
    let mut grid = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (k, img) in imgs.iter().enumerate() {
        let (r, c) = (k as u32 / columns, k as u32 % columns);
        let (x, y) = (GUTTER + c * (cw + GUTTER), GUTTER + r * (ch + GUTTER));
        image::imageops::replace(&mut grid, img, i64::from(x), i64::from(y));
    }
    save_png(&grid, out)?;
    Ok((w, h))
}

/// The files under `dir` whose extension is one of `exts` (any case), sorted by path; with
/// `recurse`, in sub-folders too (unreadable sub-folders are skipped).
fn image_files(dir: &Path, recurse: bool, exts: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if recurse {
                out.extend(image_files(&p, true, exts).unwrap_or_default());
            }
        } else if p
            .extension()
            .is_some_and(|x| exts.iter().any(|e| x.eq_ignore_ascii_case(e)))
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Plots a run directory into `RUN_DIR/plots/`: [`METRICS_PNG`] from `metrics.jsonl`, and
/// [`SAMPLES_PNG`] from the PNGs under `RUN_DIR/samples/` (at most the last 64), or under
/// `images` when given.
///
/// # Errors
/// [`TrainError`] naming a missing run directory, a malformed metrics row or an image.
pub fn plot_run(run_dir: &Path, images: Option<&Path>) -> Result<PlotFiles, TrainError> {
    if !run_dir.is_dir() {
        return Err(TrainError::Other(format!(
            "{}: not a run directory (expected runs/<name> with metrics.jsonl)",
            run_dir.display()
        )));
    }
    let plots = run_dir.join("plots");
    let mut files = PlotFiles::default();
    let metrics = run_dir.join("metrics.jsonl");
    if metrics.is_file() {
        files.panels = panels(&read_metrics(&metrics)?);
        if !files.panels.is_empty() {
            let out = plots.join(METRICS_PNG);
            render_panels(&files.panels, &out)?;
            files.metrics = Some(out);
        }
    }
    let mut pngs = match images {
        Some(d) => image_files(d, false, &["png", "jpg"]).map_err(|e| TrainError::io(d, e))?,
        // RUN_DIR/samples/**/*.png; none when the run wrote no samples
        None => image_files(&run_dir.join("samples"), true, &["png"]).unwrap_or_default(),
    };
    if pngs.len() > 64 {
        pngs.drain(..pngs.len() - 64);
    }
    if !pngs.is_empty() {
        let out = plots.join(SAMPLES_PNG);
        image_grid(&pngs, 8, &out)?;
        files.samples = Some(out);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str) -> Vec<Value> {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("metrics.jsonl");
        std::fs::write(&p, text).unwrap();
        read_metrics(&p).unwrap()
    }

    #[test]
    fn sft_panels_take_the_logged_values_and_the_last_row_of_a_step() {
        let r = rows(concat!(
            "{\"step\":1,\"loss\":4.0,\"lr\":0.001,\"grad_norm\":2.0}\n",
            "{\"step\":2,\"loss\":3.0,\"lr\":0.002,\"grad_norm\":null,\"step_loss_lm\":2.5}\n",
            "{\"step\":3,\"loss\":9.0,\"lr\":0.003,\"eval_loss\":2.75}\n",
            // resumed from step 2: step 3 logged again
            "{\"step\":3,\"loss\":2.0,\"lr\":0.003,\"eval_loss\":2.5}\n",
        ));
        let p = panels(&r);
        let titles: Vec<&str> = p.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            ["train loss", "eval loss", "learning rate", "grad norm"]
        );
        assert_eq!(p[0].series[0].points, [(1.0, 4.0), (2.0, 3.0), (3.0, 2.0)]);
        assert_eq!(
            p[0].series.len(),
            2,
            "step_loss_lm differs from loss: drawn"
        );
        assert_eq!(p[0].series[1].key, "step_loss_lm");
        assert_eq!(p[0].series[1].points, [(2.0, 2.5)]);
        assert_eq!(p[1].series[0].points, [(3.0, 2.5)]);
        // a null (NaN) gradient norm is left out
        assert_eq!(p[3].series[0].points, [(1.0, 2.0)]);
    }

    #[test]
    fn grpo_panels_have_one_curve_per_reward_function() {
        let r = rows(concat!(
            "{\"step\":1,\"reward\":0.5,\"rewards/a/mean\":0.25,\"rewards/b/mean\":1.0,\"kl\":0.0,",
            "\"clip_ratio/low_mean\":0.0,\"clip_ratio/high_mean\":0.1,\"completions/mean_length\":7}\n",
            "{\"step\":2,\"reward\":0.75,\"rewards/a/mean\":0.5,\"rewards/b/mean\":1.0,\"kl\":0.01}\n",
        ));
        let p = panels(&r);
        let titles: Vec<&str> = p.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "reward",
                "rewards per function",
                "KL to the reference",
                "clip ratio",
                "completion length (tokens)"
            ]
        );
        let keys: Vec<&str> = p[1].series.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["rewards/a/mean", "rewards/b/mean"]);
        assert_eq!(p[0].series[0].points, [(1.0, 0.5), (2.0, 0.75)]);
    }

    #[test]
    fn malformed_rows_name_the_line() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("metrics.jsonl");
        std::fs::write(&p, "{\"step\":1,\"loss\":1}\n{\"loss\":2}\n").unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2") && e.contains("step"), "{e}");
        std::fs::write(&p, "{\"step\":1}\nnot json\n").unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2"), "{e}");
    }

    /// The curve is drawn where its values put it: a rising line has its colour in the
    /// panel's lower left and upper right, a falling one the other way round.
    #[test]
    fn curves_are_drawn_from_the_values() {
        let panel = |pts: Vec<(f64, f64)>| Panel {
            title: "t".into(),
            series: vec![Series {
                key: "loss".into(),
                points: pts,
            }],
        };
        let colour = Palette99::pick(0).to_rgba();
        let is_curve = |p: &image::Rgb<u8>| p.0 == [colour.0, colour.1, colour.2];
        // the fraction of curve pixels in the left/right halves of the upper half of the plot
        let upper = |img: &image::RgbImage| {
            let (mut left, mut right) = (0u32, 0u32);
            for (x, y, p) in img.enumerate_pixels() {
                if y < PANEL_H / 2 && x < PANEL_W && is_curve(p) {
                    if x < PANEL_W / 2 {
                        left += 1
                    } else {
                        right += 1
                    }
                }
            }
            (left, right)
        };
        let up = draw_panels(&[panel((0..50).map(|i| (i as f64, i as f64)).collect())]).unwrap();
        let down =
            draw_panels(&[panel((0..50).map(|i| (i as f64, -(i as f64))).collect())]).unwrap();
        assert_eq!(up.dimensions(), (COLUMNS * PANEL_W, PANEL_H));
        let (l, r) = upper(&up);
        assert!(
            r > 20 && l < r / 4,
            "rising: upper-left {l}, upper-right {r}"
        );
        let (l, r) = upper(&down);
        assert!(
            l > 20 && r < l / 4,
            "falling: upper-left {l}, upper-right {r}"
        );
        assert_eq!(grid_size(5), (COLUMNS * PANEL_W, 3 * PANEL_H));
    }

    #[test]
    fn a_single_task_loss_is_not_drawn_twice_and_ticks_read_well() {
        let r = rows("{\"step\":1,\"loss\":4.0,\"step_loss_lm\":4.0}\n");
        assert_eq!(panels(&r)[0].series.len(), 1);
        assert_eq!(tick(&3.0e-3), "3.00e-3");
        assert_eq!(tick(&2.5), "2.5");
        assert_eq!(tick(&0.0), "0");
        assert_eq!(tick(&-1.39e-17), "0");
        assert_eq!(tick(&120.0), "120");
        assert_eq!(padded(3e-3, 3e-3), (3e-3 - 1.5e-4, 3e-3 + 1.5e-4));
    }
}
