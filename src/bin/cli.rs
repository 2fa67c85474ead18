//! `perceptual-loss`: compare images with the perceptual and TV losses.
//!
//! ```text
//! perceptual-loss compare A B [options]
//! ```
//! A and B are two images, or two folders whose images are matched by file
//! name (an image in one folder only is reported as a failed pair). Prints
//! each pair's perceptual loss (or style loss, or LPIPS distance) and the
//! TV loss of each side, then their means over the pairs that worked, as a
//! table, JSON or CSV.

use indicatif::{ProgressBar, ProgressStyle};
use perceptual_loss::images::load_rgb;
use perceptual_loss::{
    seeded_safetensors, Criterion, DType, Device, Error, InputNorm, Lpips, LpipsConfig,
    PerceptualConfig, PerceptualLoss, Result, Shape, Tap, TensorRef, TvConfig, TvLoss, TvVariant,
    Vgg, VggArch, WeightsSource,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: perceptual-loss compare A B [options]

A and B are two images (PNG or JPEG) or two folders of images matched by name.

options:
  --weights PATH        VGG weights, safetensors with torchvision names
                        (write them with scripts/export_vgg.py)
  --seeded-weights      deterministic stand-in weights instead (demos only)
  --metric NAME         perceptual (default), style (Gram matrices of the
                        layers) or lpips (LPIPS v0.1, VGG16, images as [0, 1])
  --arch vgg16|vgg19    network (default vgg16)
  --layers L1,L2,...    tapped layers by name or index (default relu1_2,relu2_2,relu3_3,relu4_3)
  --criterion mse|mae   feature (or Gram) distance (default mse)
  --norm NORM           input normalisation: none (default), imagenet,
                        imagenet_from_pm1 or from_pm1
  --tv VARIANT          article|l1|l2_squared|l2|isotropic (default article)
  --device cpu|cuda|cuda:N   (default: CUDA device 0 when usable, else the CPU)
  --dtype f32|f16|bf16  compute dtype on CUDA (default f32)
  --format table|json|csv   (default table)";

struct Options {
    a: PathBuf,
    b: PathBuf,
    metric: String,
    weights: Option<PathBuf>,
    seeded: bool,
    arch: VggArch,
    layers: Option<Vec<Tap>>,
    criterion: Criterion,
    norm: InputNorm,
    tv: TvVariant,
    device: Option<String>,
    dtype: DType,
    format: String,
}

fn usage(msg: &str) -> Error {
    Error::InvalidArgument(format!("{msg}\n\n{USAGE}"))
}

fn parse(args: &[String]) -> Result<Options> {
    let mut positional = Vec::new();
    let mut o = Options {
        a: PathBuf::new(),
        b: PathBuf::new(),
        metric: "perceptual".into(),
        weights: None,
        seeded: false,
        arch: VggArch::Vgg16,
        layers: None,
        criterion: Criterion::Mse,
        norm: InputNorm::None,
        tv: TvVariant::Article,
        device: None,
        dtype: DType::F32,
        format: "table".into(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--weights" => o.weights = Some(value("--weights")?.into()),
            "--metric" => {
                o.metric = value("--metric")?;
                if !["perceptual", "style", "lpips"].contains(&o.metric.as_str()) {
                    return Err(usage(&format!("unknown --metric {}", o.metric)));
                }
            }
            "--seeded-weights" => o.seeded = true,
            "--arch" => {
                o.arch = match value("--arch")?.as_str() {
                    "vgg16" => VggArch::Vgg16,
                    "vgg19" => VggArch::Vgg19,
                    v => return Err(usage(&format!("unknown --arch {v}"))),
                }
            }
            "--layers" => {
                let list = value("--layers")?;
                o.layers = Some(
                    list.split(',')
                        .map(|t| {
                            t.trim()
                                .parse::<usize>()
                                .map_or(Tap::from(t.trim()), Tap::Index)
                        })
                        .collect(),
                );
            }
            "--criterion" => {
                o.criterion = match value("--criterion")?.as_str() {
                    "mse" => Criterion::Mse,
                    "mae" => Criterion::Mae,
                    v => return Err(usage(&format!("unknown --criterion {v}"))),
                }
            }
            "--norm" => {
                o.norm = match value("--norm")?.as_str() {
                    "none" => InputNorm::None,
                    "imagenet" => InputNorm::Imagenet,
                    "imagenet_from_pm1" => InputNorm::ImagenetFromPm1,
                    "from_pm1" => InputNorm::FromPm1,
                    v => return Err(usage(&format!("unknown --norm {v}"))),
                }
            }
            "--tv" => {
                o.tv = match value("--tv")?.as_str() {
                    "article" => TvVariant::Article,
                    "l1" => TvVariant::L1,
                    "l2_squared" => TvVariant::L2Squared,
                    "l2" => TvVariant::L2,
                    "isotropic" => TvVariant::Isotropic,
                    v => return Err(usage(&format!("unknown --tv {v}"))),
                }
            }
            "--device" => o.device = Some(value("--device")?),
            "--dtype" => {
                o.dtype = match value("--dtype")?.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    v => return Err(usage(&format!("unknown --dtype {v}"))),
                }
            }
            "--format" => {
                o.format = value("--format")?;
                if !["table", "json", "csv"].contains(&o.format.as_str()) {
                    return Err(usage(&format!("unknown --format {}", o.format)));
                }
            }
            flag if flag.starts_with("--") => return Err(usage(&format!("unknown option {flag}"))),
            path => positional.push(PathBuf::from(path)),
        }
    }
    let [a, b] = <[PathBuf; 2]>::try_from(positional)
        .map_err(|_| usage("compare takes two paths, A and B"))?;
    let given = |flag: &str| args.iter().any(|a| a == flag);
    if o.metric == "lpips" {
        if let Some(flag) = ["--layers", "--criterion", "--norm"]
            .into_iter()
            .find(|f| given(f))
        {
            return Err(usage(&format!(
                "{flag} does not apply to --metric lpips (its layers, distance and scaling are fixed)"
            )));
        }
        if o.arch != VggArch::Vgg16 {
            return Err(usage("--metric lpips runs VGG16"));
        }
    }
    (o.a, o.b) = (a, b);
    if o.weights.is_none() && !o.seeded {
        return Err(usage(
            "no VGG weights: pass --weights PATH (export them with scripts/export_vgg.py) or --seeded-weights for a demo",
        ));
    }
    Ok(o)
}

fn device(spec: Option<&str>) -> Result<Device> {
    match spec {
        None => Ok(Device::best()),
        Some("cpu") => Ok(Device::cpu()),
        Some("cuda") => Device::cuda(0),
        Some(s) => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::cuda(n),
            None => Err(usage(&format!("unknown --device {s}"))),
        },
    }
}

/// Two images to compare under one name.
struct Pair {
    name: String,
    a: PathBuf,
    b: PathBuf,
}

/// The pairs to compare: A and B themselves, or one per image name in
/// either folder.
fn pairs(a: &Path, b: &Path) -> Result<Vec<Pair>> {
    // Checked first so that a typo reads as a missing path, not as a
    // file/folder mismatch or a missing counterpart.
    must_exist(a)?;
    must_exist(b)?;
    match (a.is_dir(), b.is_dir()) {
        (false, false) => Ok(vec![Pair {
            name: a
                .file_name()
                .map_or("a".into(), |n| n.to_string_lossy().into_owned()),
            a: a.into(),
            b: b.into(),
        }]),
        (true, true) => folder_pairs(a, b),
        _ => Err(usage("A and B must both be files or both be folders")),
    }
}

fn must_exist(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Io(format!(
            "{}: no such file or folder",
            path.display()
        ))),
        Err(e) => Err(Error::Io(format!("{}: {e}", path.display()))),
    }
}

/// Names from both folders, so that an image missing on either side is
/// reported as a failed pair instead of being left out.
fn folder_pairs(a: &Path, b: &Path) -> Result<Vec<Pair>> {
    let mut names = image_names(a)?;
    names.extend(image_names(b)?);
    if names.is_empty() {
        return Err(Error::Io(format!(
            "no PNG or JPEG images in {} or {}",
            a.display(),
            b.display()
        )));
    }
    Ok(names
        .into_iter()
        .map(|name| Pair {
            a: a.join(&name),
            b: b.join(&name),
            name,
        })
        .collect())
}

/// The PNG and JPEG file names in `dir`, sorted.
fn image_names(dir: &Path) -> Result<BTreeSet<String>> {
    let is_image = |p: &Path| {
        p.is_file()
            && p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
    };
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::Io(format!("cannot list {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_image(p))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect())
}

struct Row {
    name: String,
    result: Result<[f64; 3]>, // the metric, tv(a), tv(b)
}

/// What the first column measures.
enum Metric {
    /// A perceptual loss, or one of style terms alone.
    Loss(PerceptualLoss),
    Lpips(Lpips),
}

impl Metric {
    fn value(&self, a: &TensorRef<'_>, b: &TensorRef<'_>) -> Result<f64> {
        Ok(match self {
            Metric::Loss(l) => l.value(a, b)?,
            Metric::Lpips(l) => l.value(a, b)?,
        } as f64)
    }
}

fn compare_pair(
    device: &Device,
    metric: &Metric,
    tv: &TvLoss,
    a: &Path,
    b: &Path,
) -> Result<[f64; 3]> {
    // In folder mode an image may be in one folder only.
    for (there, missing) in [(a, b), (b, a)] {
        if !missing.exists() {
            return Err(Error::Io(format!(
                "{} has no counterpart {}",
                there.display(),
                missing.display()
            )));
        }
    }
    let (sa, va) = load_rgb(a)?;
    let (sb, vb) = load_rgb(b)?;
    if sa != sb {
        return Err(Error::InvalidShape(format!(
            "sizes differ: {} is {}x{}, {} is {}x{}",
            a.display(),
            sa.w,
            sa.h,
            b.display(),
            sb.w,
            sb.h
        )));
    }
    let s: Shape = sa;
    match device.cuda_stream() {
        None => {
            let (ta, tb) = (TensorRef::host(&va, s)?, TensorRef::host(&vb, s)?);
            Ok([
                metric.value(&ta, &tb)?,
                tv.value(device, &ta)? as f64,
                tv.value(device, &tb)? as f64,
            ])
        }
        Some(st) => {
            let err = |e: perceptual_loss::cudarc::driver::DriverError| Error::Cuda(e.to_string());
            let (da, db) = (
                st.clone_htod(&va).map_err(err)?,
                st.clone_htod(&vb).map_err(err)?,
            );
            let (ta, tb) = (TensorRef::cuda(&da, s)?, TensorRef::cuda(&db, s)?);
            Ok([
                metric.value(&ta, &tb)?,
                tv.value(device, &ta)? as f64,
                tv.value(device, &tb)? as f64,
            ])
        }
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out + "\""
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The mean of the pairs that worked, and how many they are: failed pairs
/// are left out of it, so the count says what it stands for.
struct Mean {
    pairs: usize,
    values: [f64; 3],
}

impl Mean {
    fn of(rows: &[Row]) -> Option<Mean> {
        let ok: Vec<&[f64; 3]> = rows.iter().filter_map(|r| r.result.as_ref().ok()).collect();
        (!ok.is_empty()).then(|| Mean {
            pairs: ok.len(),
            values: std::array::from_fn(|k| ok.iter().map(|v| v[k]).sum::<f64>() / ok.len() as f64),
        })
    }

    /// The summary row's name in the table and the CSV.
    fn label(&self) -> String {
        let plural = if self.pairs == 1 { "" } else { "s" };
        format!("mean over {} pair{plural}", self.pairs)
    }
}

/// Prints the rows in `format`, the first value under `metric`'s name.
fn print(rows: &[Row], format: &str, metric: &str) {
    let mean = Mean::of(rows);
    match format {
        "json" => print_json(rows, mean.as_ref(), metric),
        "csv" => print_csv(rows, mean.as_ref(), metric),
        _ => print_table(rows, mean.as_ref(), metric),
    }
}

fn print_json(rows: &[Row], mean: Option<&Mean>, metric: &str) {
    let items: Vec<String> = rows
        .iter()
        .map(|r| match &r.result {
            Ok(v) => format!(
                "{{\"name\": {}, \"{metric}\": {}, \"tv_a\": {}, \"tv_b\": {}}}",
                json_string(&r.name),
                v[0],
                v[1],
                v[2]
            ),
            Err(e) => format!(
                "{{\"name\": {}, \"error\": {}}}",
                json_string(&r.name),
                json_string(&e.to_string())
            ),
        })
        .collect();
    let mean = mean.map_or("null".into(), |m| {
        format!(
            "{{\"pairs\": {}, \"{metric}\": {}, \"tv_a\": {}, \"tv_b\": {}}}",
            m.pairs, m.values[0], m.values[1], m.values[2]
        )
    });
    println!("{{\"pairs\": [{}], \"mean\": {mean}}}", items.join(", "));
}

fn print_csv(rows: &[Row], mean: Option<&Mean>, metric: &str) {
    println!("name,{metric},tv_a,tv_b,error");
    for r in rows {
        match &r.result {
            Ok(v) => println!("{},{},{},{},", csv_field(&r.name), v[0], v[1], v[2]),
            Err(e) => println!("{},,,,{}", csv_field(&r.name), csv_field(&e.to_string())),
        }
    }
    if let Some(m) = mean {
        let [p, ta, tb] = m.values;
        println!("{},{p},{ta},{tb},", m.label());
    }
}

fn print_table(rows: &[Row], mean: Option<&Mean>, metric: &str) {
    let label = mean.map(Mean::label);
    let width = rows
        .iter()
        .map(|r| r.name.len())
        .chain(label.as_ref().map(String::len))
        .chain([4])
        .max()
        .unwrap_or(4);
    println!(
        "{:width$}  {:>12}  {:>12}  {:>12}",
        "pair", metric, "tv(A)", "tv(B)"
    );
    for r in rows {
        match &r.result {
            Ok(v) => println!(
                "{:width$}  {:>12.6}  {:>12.6}  {:>12.6}",
                r.name, v[0], v[1], v[2]
            ),
            Err(e) => println!("{:width$}  error: {e}", r.name),
        }
    }
    if let (Some(m), Some(label)) = (mean, label) {
        let [p, ta, tb] = m.values;
        println!("{label:width$}  {p:>12.6}  {ta:>12.6}  {tb:>12.6}");
    }
}

fn run(args: &[String]) -> Result<bool> {
    match args.first().map(String::as_str) {
        Some("compare") => {}
        None => return Err(usage("no command given")),
        Some(other) => return Err(usage(&format!("unknown command {other}"))),
    }
    let o = parse(&args[1..])?;
    let device = device(o.device.as_deref())?;
    // Before the weights load, so that a mistyped path is reported at once.
    let pairs = pairs(&o.a, &o.b)?;
    let seeded;
    let source = match &o.weights {
        Some(p) => WeightsSource::Path(p),
        None => {
            seeded = seeded_safetensors(o.arch, 0)?;
            WeightsSource::Bytes(&seeded)
        }
    };
    let vgg = Vgg::load(&device, source, o.arch, o.dtype)?;
    // The figures are f32 ones then: say so rather than let them pass for
    // half-precision results (the Python binding warns the same way).
    if vgg.compute_dtype() != o.dtype {
        eprintln!(
            "warning: --dtype {} applies on CUDA; the CPU backend computes in float32",
            o.dtype.name()
        );
    }
    let default_taps = PerceptualConfig::default().taps;
    let layers = o.layers.unwrap_or(default_taps);
    let metric = match o.metric.as_str() {
        "lpips" => Metric::Lpips(Lpips::new(
            vgg,
            &LpipsConfig {
                normalize: true, // images load as [0, 1]
                ..Default::default()
            },
        )?),
        "style" => Metric::Loss(PerceptualLoss::new(
            vgg,
            &PerceptualConfig {
                taps: vec![],
                style_taps: layers,
                style_criterion: o.criterion,
                input_norm: o.norm,
                ..Default::default()
            },
        )?),
        _ => Metric::Loss(PerceptualLoss::new(
            vgg,
            &PerceptualConfig {
                taps: layers,
                criterion: o.criterion,
                input_norm: o.norm,
                ..Default::default()
            },
        )?),
    };
    let tv = TvLoss::new(TvConfig::new(o.tv))?;
    let bar = if pairs.len() > 1 {
        let bar = ProgressBar::new(pairs.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let rows: Vec<Row> = pairs
        .into_iter()
        .map(|Pair { name, a, b }| {
            bar.set_message(name.clone());
            let result = compare_pair(&device, &metric, &tv, &a, &b);
            bar.inc(1);
            Row { name, result }
        })
        .collect();
    bar.finish_and_clear();
    print(&rows, &o.format, &o.metric);
    Ok(rows.iter().all(|r| r.result.is_ok()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("perceptual-loss: {e}");
            ExitCode::from(2)
        }
    }
}
