//! Image pipeline: smart_resize against a table produced by transformers' own `smart_resize`,
//! PIL-exact resampling and pixel values against the committed processor fixtures, and errors
//! on bad images.

mod common;

use common::{fixtures, max_abs_diff, read_json, read_npy};
use image::{Rgb, RgbImage, Rgba, RgbaImage};
use onevision_preprocess::{
    decode_image, load_image, preprocess_image, resize_bicubic_pil, smart_resize, ImageConfig, PreprocessError,
};

const MIN: usize = 3136;
const MAX: usize = 12_845_056;

type ResizeRow = ((usize, usize, usize, usize), (usize, usize));

/// (h, w, min_pixels, max_pixels) → (h', w'), every row printed by
/// `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize` (transformers 4.57.6).
const SMART_RESIZE_TABLE: &[ResizeRow] = &[
    ((480, 640, MIN, MAX), (476, 644)), // the documented example: grid [1,34,46]
    ((70, 100, MIN, MAX), (56, 112)),   // 70/28 = 2.5 rounds to even 2
    ((42, 98, MIN, MAX), (56, 112)),    // 1.5 -> 2 and 3.5 -> 4: halves to even both ways
    ((126, 154, MIN, MAX), (112, 168)), // 4.5 -> 4, 5.5 -> 6
    ((14, 14, MIN, MAX), (56, 56)),     // min_pixels branch (ceil)
    ((1, 200, MIN, MAX), (28, 812)),    // ratio exactly 200 is allowed
    ((200, 1, MIN, MAX), (812, 28)),
    ((56, 84, MIN, MAX), (56, 84)), // already a multiple of 28
    ((150, 200, MIN, 12544), (84, 112)), // max_pixels branch (floor)
    ((20, 30, MIN, 12544), (56, 84)),
    ((4000, 3000, MIN, MAX), (4004, 2996)),
    ((10000, 10000, MIN, MAX), (3556, 3556)),
    ((98, 70, MIN, MAX), (112, 56)),
    ((294, 378, MIN, MAX), (280, 392)),
    ((3, 5, MIN, MAX), (56, 84)),
    ((1080, 1920, MIN, MAX), (1092, 1932)),
    ((2048, 2048, MIN, 1_003_520), (980, 980)),
    ((100, 20000, MIN, MAX), (112, 19992)),
];

#[test]
fn smart_resize_matches_transformers_table() {
    for &((h, w, lo, hi), want) in SMART_RESIZE_TABLE {
        let got = smart_resize(h, w, 28, lo, hi).unwrap();
        assert_eq!(got, want, "smart_resize({h}, {w}, 28, {lo}, {hi})");
    }
}

#[test]
fn smart_resize_rejects_extreme_aspect_ratio_and_empty_sides() {
    match smart_resize(100, 20001, 28, MIN, MAX) {
        Err(PreprocessError::AspectRatio { height: 100, width: 20001, ratio }) => assert!(ratio > 200.0),
        other => panic!("expected AspectRatio error, got {other:?}"),
    }
    assert!(matches!(smart_resize(1, 201, 28, MIN, MAX), Err(PreprocessError::AspectRatio { .. })));
    assert!(matches!(smart_resize(0, 10, 28, MIN, MAX), Err(PreprocessError::EmptyImage { .. })));
}

#[test]
fn documented_640x480_example_gives_1564_patches_and_391_tokens() {
    let img = RgbImage::from_fn(640, 480, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8]));
    let out = preprocess_image(&img, &ImageConfig::default()).unwrap();
    assert_eq!(out.grid_thw, [1, 34, 46]);
    assert_eq!(out.num_patches(), 1564);
    assert_eq!(out.patch_dim, 1176);
    assert_eq!(out.pixel_values.len(), 1564 * 1176);
    assert_eq!(out.num_tokens(2), 391);
}

fn preprocess_cfg() -> ImageConfig {
    let dir = fixtures().join("preprocess");
    ImageConfig::from_dir(&dir).unwrap()
}

/// For every fixture image: our decode equals PIL's decoded RGB (exactly for lossless formats),
/// and the pipeline run on PIL's decoded bytes equals transformers' pixel values.
///
/// Tolerance 1e-6 for every image, resized or not: the resampler reproduces PIL's fixed-point
/// 8-bit algorithm bit for bit, so the u8 pixels are identical and the only float work is the
/// same f64 rescale + f32 normalise transformers does (measured max diff: 0).
#[test]
fn pixel_values_match_transformers_processor() {
    let dir = fixtures().join("preprocess");
    let cfg = preprocess_cfg();
    assert_eq!((cfg.min_pixels, cfg.max_pixels), (3136, 12544));
    let cases = read_json(&dir.join("cases.json"));
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let format = case["format"].as_str().unwrap();
        let want_rgb = read_npy(&dir.join(name).join("decoded_rgb.npy"));
        let (h, w) = (want_rgb.shape[0], want_rgb.shape[1]);
        let pil_rgb = RgbImage::from_raw(w as u32, h as u32, want_rgb.u8()).unwrap();

        let ours = load_image(dir.join(case["image"].as_str().unwrap())).unwrap();
        assert_eq!((ours.height() as usize, ours.width() as usize), (h, w), "{name}: size");
        let max_px = ours.as_raw().iter().zip(pil_rgb.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        if format == "jpeg" {
            // Lossy decoders may differ (IDCT precision, chroma upsampling); libjpeg-turbo vs
            // zune-jpeg at 4:4:4 agree to a few levels. Measured: <= 2.
            assert!(max_px <= 3, "{name}: JPEG decode differs from PIL by {max_px} levels");
        } else {
            assert_eq!(max_px, 0, "{name}: lossless decode (and alpha-onto-white) must equal PIL");
        }

        let want_pv = read_npy(&dir.join(name).join("pixel_values.npy"));
        let want_grid = read_npy(&dir.join(name).join("image_grid_thw.npy")).i64();
        let got = preprocess_image(&pil_rgb, &cfg).unwrap();
        let grid: Vec<i64> = got.grid_thw.iter().map(|&x| x as i64).collect();
        assert_eq!(grid, want_grid, "{name}: grid");
        assert_eq!(want_pv.shape, vec![got.num_patches(), 1176], "{name}: shape");
        let d = max_abs_diff(&got.pixel_values, &want_pv.f32());
        let resized = case["resized_height"] != case["height"] || case["resized_width"] != case["width"];
        let mean = got.pixel_values.iter().zip(want_pv.f32()).map(|(a, b)| (a - b).abs() as f64).sum::<f64>()
            / got.pixel_values.len() as f64;
        // Our resampler ports Pillow's fixed-point bicubic (pass order included), so resized
        // images are bit-identical too: the only difference left is f32 rounding of the
        // normalisation.
        assert!(d <= 1e-6, "{name} (resized: {resized}): pixel values differ by {d} (mean {mean:.3e})");
        assert_eq!(
            got.num_tokens(2),
            case["num_image_tokens"].as_u64().unwrap() as usize,
            "{name}: image tokens"
        );

        // End to end from the file as well. For JPEG a level of decode difference moves a
        // normalised value by 1/255/std <= 0.0151; 3 levels bound it by 0.046.
        let e2e = preprocess_image(&ours, &cfg).unwrap();
        let d = max_abs_diff(&e2e.pixel_values, &want_pv.f32());
        // A JPEG decode difference of a level can move a resampled value by about a level too.
        let tol = if format == "jpeg" { 0.046 } else { 1e-6 };
        assert!(d <= tol, "{name}: end-to-end pixel values differ by {d} (tolerance {tol})");
    }
}

#[test]
fn resize_to_same_size_is_identity_and_constant_images_stay_constant() {
    let img = RgbImage::from_fn(30, 20, |x, y| Rgb([(x * 7) as u8, (y * 11) as u8, 200]));
    assert_eq!(resize_bicubic_pil(&img, 30, 20), img);
    // the kernel is normalised per output pixel, so a flat image stays flat in both directions
    let flat = RgbImage::from_pixel(37, 23, Rgb([17, 128, 250]));
    for (w, h) in [(84, 56), (14, 9), (37, 56), (20, 23)] {
        let out = resize_bicubic_pil(&flat, w, h);
        assert_eq!((out.width(), out.height()), (w as u32, h as u32));
        assert!(out.pixels().all(|p| *p == Rgb([17, 128, 250])), "{w}x{h}");
    }
}

#[test]
fn rgba_is_composited_onto_white() {
    let mut img = RgbaImage::new(4, 1);
    img.put_pixel(0, 0, Rgba([0, 0, 0, 0])); // transparent -> white
    img.put_pixel(1, 0, Rgba([10, 20, 30, 255])); // opaque -> itself
    img.put_pixel(2, 0, Rgba([0, 0, 0, 128])); // half black over white: 255*127/255 = 127
    img.put_pixel(3, 0, Rgba([100, 0, 255, 51]));
    let mut png = Vec::new();
    image::DynamicImage::ImageRgba8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let rgb = decode_image(&png).unwrap();
    assert_eq!(rgb.get_pixel(0, 0), &Rgb([255, 255, 255]));
    assert_eq!(rgb.get_pixel(1, 0), &Rgb([10, 20, 30]));
    assert_eq!(rgb.get_pixel(2, 0), &Rgb([127, 127, 127]));
    // (255*204 + 100*51) / 255 = 224, (255*204) / 255 = 204, 255
    assert_eq!(rgb.get_pixel(3, 0), &Rgb([224, 204, 255]));
}

#[test]
fn corrupt_truncated_and_missing_images_are_typed_errors() {
    assert!(matches!(decode_image(b"definitely not an image"), Err(PreprocessError::ImageDecode { .. })));
    assert!(matches!(decode_image(&[]), Err(PreprocessError::ImageDecode { .. })));
    let good = std::fs::read(fixtures().join("images/a_h56_w84.png")).unwrap();
    let err = decode_image(&good[..good.len() / 2]).unwrap_err();
    assert!(matches!(err, PreprocessError::ImageDecode { .. }), "{err:?}");
    // a PNG signature followed by garbage
    let mut fake = b"\x89PNG\r\n\x1a\n".to_vec();
    fake.extend_from_slice(&[0xAB; 64]);
    assert!(matches!(decode_image(&fake), Err(PreprocessError::ImageDecode { .. })));
    let err = load_image("/nonexistent/dir/x.png").unwrap_err();
    assert!(matches!(err, PreprocessError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/dir/x.png"), "{err}");
}

#[test]
fn extreme_aspect_ratio_image_is_rejected_by_the_pipeline() {
    let img = RgbImage::from_pixel(250, 1, Rgb([1, 2, 3]));
    let err = preprocess_image(&img, &ImageConfig::default()).unwrap_err();
    assert!(matches!(err, PreprocessError::AspectRatio { height: 1, width: 250, .. }), "{err:?}");
    assert!(err.to_string().contains("200"), "{err}");
}
