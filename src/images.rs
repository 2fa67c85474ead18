//! Reading and writing images as NCHW f32 tensors in [0, 1], for the
//! command-line tool, the demos and quick experiments.

use crate::error::{Error, Result};
use crate::tensor::Shape;
use std::path::Path;

/// Reads a PNG or JPEG as a 1 x 3 x H x W RGB tensor in [0, 1].
pub fn load_rgb(path: &Path) -> Result<(Shape, Vec<f32>)> {
    let img = image::open(path)
        .map_err(|e| Error::Io(format!("cannot read image {}: {e}", path.display())))?;
    let rgb = img.to_rgb32f();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut out = vec![0f32; 3 * h * w];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * h * w + i] = px.0[c];
        }
    }
    Ok((Shape::new(1, 3, h, w), out))
}

/// Writes image `n` of an N x 3 x H x W tensor as an 8-bit PNG, clamping to [0, 1].
pub fn save_png(path: &Path, data: &[f32], shape: Shape, n: usize) -> Result<()> {
    if shape.c != 3 || n >= shape.n || data.len() != shape.numel()? {
        return Err(Error::arg(format!(
            "save_png needs image {n} of an N x 3 x H x W tensor, got {shape}"
        )));
    }
    let (h, w) = (shape.h, shape.w);
    let base = n * 3 * h * w;
    let pixels: Vec<u8> = (0..h * w)
        .flat_map(|i| {
            (0..3).map(move |c| (data[base + c * h * w + i].clamp(0.0, 1.0) * 255.0).round() as u8)
        })
        .collect();
    image::save_buffer(
        path,
        &pixels,
        w as u32,
        h as u32,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Io(format!("cannot write {}: {e}", path.display())))
}
