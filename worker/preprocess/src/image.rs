//! Image preprocessing as transformers' slow `Qwen2VLImageProcessor` does it: decode, RGB (RGBA
//! onto white), `smart_resize`, PIL's bicubic resampling, rescale, normalise, patch flattening.

use std::path::Path;

use image::{DynamicImage, RgbImage};

use crate::config::ImageConfig;
use crate::error::{PreprocessError, Result};

/// Largest side ratio `smart_resize` accepts (transformers' limit).
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// Reads and decodes an image file (format from its content; PNG, JPEG or WebP).
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| PreprocessError::Io { path: path.to_path_buf(), source })?;
    decode_image_named(&bytes, &path.display().to_string())
}

/// Decodes an encoded image held in memory.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    decode_image_named(bytes, "<memory>")
}

fn decode_image_named(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let decode_err = |message: String| PreprocessError::ImageDecode { source_name: name.to_owned(), message };
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(decode_err("unrecognised image format".into()));
    }
    let img = reader.decode().map_err(|e| decode_err(e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(PreprocessError::EmptyImage { height: img.height() as usize, width: img.width() as usize });
    }
    Ok(to_rgb(img))
}

/// RGB conversion as qwen-vl-utils' `to_rgb`: images with alpha are pasted onto white using
/// alpha as the mask (PIL `paste(mask=alpha)`, its exact 8-bit rounding); others convert.
pub fn to_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (src, dst) in rgba.pixels().zip(out.pixels_mut()) {
        let a = u32::from(src[3]);
        for c in 0..3 {
            // PIL Paste.c: BLEND(mask, out, in) = DIV255(out*(255-mask) + in*mask), with
            // DIV255(v) = ((v + 128) >> 8 + (v + 128)) >> 8, an exact rounded division by 255.
            let v = 255 * (255 - a) + u32::from(src[c]) * a;
            let t = v + 128;
            dst[c] = (((t >> 8) + t) >> 8) as u8;
        }
    }
    out
}

/// Python's `round` on floats: ties go to the even neighbour (`round(2.5) == 2`).
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// Target (height, width) for an image: multiples of `factor`, pixel count within
/// [`min_pixels`, `max_pixels`], aspect ratio kept as well as possible. Same float operations as
/// transformers' `smart_resize`, so the result is identical, including halves rounding to even.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(PreprocessError::EmptyImage { height, width });
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        return Err(PreprocessError::AspectRatio { height, width, ratio });
    }
    let mut h_bar = py_round(h / f) * f;
    let mut w_bar = py_round(w / f) * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

// ------------------------------------------------------------------------------------------
// PIL's resampling (libImaging/Resample.c), 8 bits per channel: a separable two-pass filter
// with coefficients normalised per output pixel, quantised to fixed point, and the
// intermediate (horizontal) result rounded to u8. Reproducing it exactly gives bit-identical
// pixels to `PIL.Image.resize(..., Image.BICUBIC)`.

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's bicubic kernel (a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, number of taps, fixed-point coefficients.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    // Downscaling widens the kernel by the scale: this is PIL's antialiasing.
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, then clamps.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut kk[xx * ksize..(xx + 1) * ksize];
        for (x, slot) in row.iter_mut().enumerate().take(n) {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            // normalize_coeffs_8bpc: round half away from zero into 2^22 fixed point
            let scaled = v * f64::from(1u32 << PRECISION_BITS);
            *slot = if v < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, kk }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image to `out_w` x `out_h` with PIL's bicubic filter. An image already at the
/// target size is returned unchanged (PIL returns a copy), and a pass whose axis does not
/// change is skipped, as in PIL. Like Pillow (>= 11), the pass with the smaller intermediate
/// image goes first: vertical first exactly when `in_w·out_h < out_w·in_h` (the order changes
/// the rounded intermediate, so it must match to be bit-identical).
pub fn resize_bicubic_pil(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let data: Vec<u8> = img.as_raw().clone();
    let (data, w, h) = if in_w * out_h < out_w * in_h {
        let (d, w, h) = vertical_pass(data, in_w, in_h, out_h);
        horizontal_pass(d, w, h, out_w)
    } else {
        let (d, w, h) = horizontal_pass(data, in_w, in_h, out_w);
        vertical_pass(d, w, h, out_h)
    };
    RgbImage::from_raw(w as u32, h as u32, data).expect("buffer length matches dimensions by construction")
}

/// PIL's ResampleHorizontal_8bpc on packed RGB rows; a no-op when the width does not change.
fn horizontal_pass(data: Vec<u8>, in_w: usize, h: usize, out_w: usize) -> (Vec<u8>, usize, usize) {
    if out_w == in_w {
        return (data, in_w, h);
    }
    let c = precompute_coeffs(in_w, out_w);
    let mut out = vec![0u8; out_w * h * 3];
    for y in 0..h {
        let src = &data[y * in_w * 3..(y + 1) * in_w * 3];
        let dst = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.kk[xx * c.ksize..xx * c.ksize + n];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &src[(xmin + x) * 3..(xmin + x) * 3 + 3];
                for ch in 0..3 {
                    ss[ch] += i32::from(p[ch]) * kx;
                }
            }
            for ch in 0..3 {
                dst[xx * 3 + ch] = clip8(ss[ch]);
            }
        }
    }
    (out, out_w, h)
}

/// PIL's ResampleVertical_8bpc; a no-op when the height does not change.
fn vertical_pass(data: Vec<u8>, w: usize, in_h: usize, out_h: usize) -> (Vec<u8>, usize, usize) {
    if out_h == in_h {
        return (data, w, in_h);
    }
    let c = precompute_coeffs(in_h, out_h);
    let stride = w * 3;
    let mut out = vec![0u8; stride * out_h];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.kk[yy * c.ksize..yy * c.ksize + n];
        let dst = &mut out[yy * stride..(yy + 1) * stride];
        for (i, d) in dst.iter_mut().enumerate() {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                ss += i32::from(data[(ymin + y) * stride + i]) * ky;
            }
            *d = clip8(ss);
        }
    }
    (out, w, out_h)
}

/// One image's processor output.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// Row-major [num_patches, patch_dim] (patch_dim = 3·temporal·patch², 1176 for Qwen).
    pub pixel_values: Vec<f32>,
    /// (t, h, w) in patches: [1, H/14, W/14] for an image.
    pub grid_thw: [usize; 3],
    pub patch_dim: usize,
}

impl ProcessedImage {
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Image-pad tokens this image expands to: t·h·w / merge².
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size)
    }
}

/// The full image pipeline on a decoded RGB image.
pub fn preprocess_image(img: &RgbImage, cfg: &ImageConfig) -> Result<ProcessedImage> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    let (rh, rw) = if cfg.do_resize {
        smart_resize(h, w, cfg.factor(), cfg.min_pixels, cfg.max_pixels)?
    } else {
        (h, w)
    };
    let f = cfg.factor();
    if rh % f != 0 || rw % f != 0 {
        // only reachable with do_resize=false: the patch grid needs whole merge units
        return Err(PreprocessError::Config {
            path: "preprocessor_config.json".into(),
            message: format!("do_resize is false but the image {h}x{w} is not a multiple of {f}"),
        });
    }
    // Guard the allocation: an image decoding to a huge canvas with do_resize=false.
    let limit = cfg.max_pixels.max(28 * 28 * 16384);
    if rh.saturating_mul(rw) > limit {
        return Err(PreprocessError::ImageTooLarge { height: h, width: w, pixels: rh * rw, limit });
    }
    let resized;
    let img = if (rh, rw) == (h, w) {
        img
    } else {
        resized = resize_bicubic_pil(img, rw, rh);
        &resized
    };
    // rescale (float64 product, rounded to f32, as transformers) then normalise in f32
    let mut plane = vec![0f32; 3 * rh * rw]; // channel-first [3, rh, rw]
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            let mut v = if cfg.do_rescale { (f64::from(p[c]) * cfg.rescale_factor) as f32 } else { f32::from(p[c]) };
            if cfg.do_normalize {
                v = (v - cfg.image_mean[c]) / cfg.image_std[c];
            }
            plane[c * rh * rw + i] = v;
        }
    }
    let (ps, tp, m) = (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size);
    let (gh, gw) = (rh / ps, rw / ps);
    let patch_dim = cfg.patch_dim();
    let mut out = vec![0f32; gh * gw * patch_dim];
    // transformers: [gt, tp, c, gh/m, m, ps, gw/m, m, ps] transposed to
    // (gt, gh/m, gw/m, m, m, c, tp, ps, ps); a single image is repeated over the tp frames.
    let mut row = 0;
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for rh_in in 0..m {
                for rw_in in 0..m {
                    let (py, px) = ((bh * m + rh_in) * ps, (bw * m + rw_in) * ps);
                    let dst = &mut out[row * patch_dim..(row + 1) * patch_dim];
                    let mut j = 0;
                    for c in 0..3 {
                        for _t in 0..tp {
                            for y in 0..ps {
                                let src = c * rh * rw + (py + y) * rw + px;
                                dst[j..j + ps].copy_from_slice(&plane[src..src + ps]);
                                j += ps;
                            }
                        }
                    }
                    row += 1;
                }
            }
        }
    }
    Ok(ProcessedImage { pixel_values: out, grid_thw: [1, gh, gw], patch_dim })
}
