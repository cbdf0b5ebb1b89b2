//! `loss.png` carries text: tick values, axis labels, a title and a legend,
//! drawn with the font compiled into the binary, so a process that can find
//! no system font at all still draws them.
use std::path::{Path, PathBuf};
use std::process::Command;

use plotters::prelude::*;

/// Set in the re-executed test process: render `metrics` (first path) into
/// the PNG (second path) and exit.
const CHILD: &str = "LLMFT_PLOT_TEST_CHILD";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llmft-plot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A run's metrics.jsonl as the trainer writes it: 300 steps of a falling
/// loss with warmup + cosine lr, an eval every 50 steps.
fn write_metrics(path: &Path) {
    let mut text = String::new();
    for step in 1..=300u64 {
        let t = step as f64;
        let lr = if step <= 20 {
            2e-4 * t / 20.0
        } else {
            1e-4 * (1.0 + (std::f64::consts::PI * (t - 20.0) / 280.0).cos())
        };
        let loss = 0.6 + 2.0 * (-t / 60.0).exp() + 0.05 * (t * 0.7).sin();
        text.push_str(&format!(
            "{{\"step\":{step},\"loss\":{loss},\"lr\":{lr},\"grad_norm\":1.0,\"tokens\":512,\"tokens_per_s\":1000.0,\"skipped\":false}}\n"
        ));
        if step % 50 == 0 {
            text.push_str(&format!(
                "{{\"step\":{step},\"eval_loss\":{},\"eval_perplexity\":3.0,\"eval_tokens\":100}}\n",
                loss + 0.1
            ));
        }
    }
    std::fs::write(path, text).unwrap();
}

/// RGB pixels of a PNG.
fn decode(png: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let dec = png::Decoder::new(std::fs::File::open(png).unwrap());
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let ch = info.color_type.samples();
    let px = buf[..info.buffer_size()]
        .chunks(ch)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, px)
}

/// Dark (text-coloured) pixels in the rectangle [x0, x1) × [y0, y1).
fn dark(img: &(u32, u32, Vec<[u8; 3]>), x0: u32, x1: u32, y0: u32, y1: u32) -> usize {
    let (w, _, px) = img;
    let mut n = 0;
    for y in y0..y1 {
        for x in x0..x1 {
            let p = px[(y * w + x) as usize];
            if p.iter().all(|&c| c < 110) {
                n += 1;
            }
        }
    }
    n
}

/// Text in each margin of a `PLOT_SIZE` picture: (title, left ticks and
/// label, bottom ticks and label, right ticks and label).
fn margins(img: &(u32, u32, Vec<[u8; 3]>)) -> [usize; 4] {
    let (w, h, _) = *img;
    // Layout of `loss_curve`: margin 14, caption on top, x labels 48 px,
    // left labels 64 px, right labels 74 px; the axis lines and their tick
    // marks sit at the inner edge, so each region stops 8 px short of it.
    [
        dark(img, 0, w, 0, 40),
        dark(img, 0, 14 + 64 - 8, 60, h - 70),
        dark(img, 90, w - 100, h - 14 - 48 + 8, h),
        dark(img, w - 14 - 74 + 8, w, 60, h - 70),
    ]
}

#[test]
fn plot_has_text_without_any_system_font() {
    if let Ok(paths) = std::env::var(CHILD) {
        let (m, png) = paths.split_once('\n').unwrap();
        llmft_trainer::loss_curve(Path::new(m), Path::new(png), "Llama-3.1-8B · qlora").unwrap();
        return;
    }
    let dir = scratch("fonts");
    let metrics = dir.join("metrics.jsonl");
    write_metrics(&metrics);
    let png = dir.join("loss.png");
    // The same test binary, alone in an environment where fontconfig and
    // every font folder point nowhere.
    let empty = dir.join("no-fonts");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "plot_has_text_without_any_system_font",
            "--test-threads=1",
        ])
        .env_clear()
        .env(CHILD, format!("{}\n{}", metrics.display(), png.display()))
        .env("HOME", &empty)
        .env("FONTCONFIG_FILE", empty.join("fonts.conf"))
        .env("FONTCONFIG_PATH", &empty)
        .env("XDG_DATA_HOME", &empty)
        .env("XDG_DATA_DIRS", &empty)
        .env("XDG_CONFIG_HOME", &empty)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let img = decode(&png);
    assert_eq!((img.0, img.1), llmft_trainer::PLOT_SIZE);
    let [title, left, bottom, right] = margins(&img);
    println!("dark pixels: title {title}, left {left}, bottom {bottom}, right {right}");
    // A 22 px title, 8 tick values with the axis name, 10 step values with
    // "step": hundreds of glyph pixels each.
    assert!(title > 300, "title: {title}");
    assert!(left > 300, "left axis: {left}");
    assert!(bottom > 300, "bottom axis: {bottom}");
    assert!(right > 300, "right (learning rate) axis: {right}");
    // The legend: its three labels are dark text in the upper right of
    // the plotting area.
    let legend = dark(&img, img.0 / 2, img.0 - 100, 45, 150);
    assert!(legend > 200, "legend: {legend}");

    // The same layout drawn with no text at all leaves those margins blank,
    // so the counts above come from the text.
    let bare = dir.join("bare.png");
    {
        let root = BitMapBackend::new(&bare, llmft_trainer::PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).unwrap();
        let mut chart = ChartBuilder::on(&root)
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .right_y_label_area_size(74)
            .build_cartesian_2d(0.0..300.0, 0.5..3.0)
            .unwrap();
        chart
            .configure_mesh()
            .disable_x_axis()
            .disable_y_axis()
            .draw()
            .unwrap();
        chart
            .draw_series(LineSeries::new(
                (1..300).map(|s| (s as f64, 0.6 + 2.0 * (-(s as f64) / 60.0).exp())),
                BLUE.stroke_width(2),
            ))
            .unwrap();
        root.present().unwrap();
    }
    let bare = decode(&bare);
    let blank = margins(&bare);
    assert_eq!(blank, [0, 0, 0, 0], "a plot with no text has blank margins");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn metrics_without_losses_write_no_picture() {
    let dir = scratch("empty");
    let metrics = dir.join("metrics.jsonl");
    std::fs::write(&metrics, "{\"step\":1,\"eval_loss\":1.0}\nnot json\n").unwrap();
    let png = dir.join("loss.png");
    let e = llmft_trainer::loss_curve(&metrics, &png, "t").unwrap_err();
    assert!(e.to_string().contains("no losses to plot"), "{e}");
    assert!(!png.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
