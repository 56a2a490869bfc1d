//! What an image costs in input tokens, by each provider's own formula for the model, bounded
//! from above: an image whose size Tollgate cannot read (a URL, a file id, a format it does
//! not parse) counts as the largest image the provider accepts at its detail, and a model
//! whose figures Tollgate does not know counts the largest figures it knows (fail closed).
//!
//! OpenAI (platform.openai.com/docs/guides/images-vision, "Calculating costs"; the figures
//! per model as OpenAI's pricing calculator and the community's billing measurements confirm
//! them, e.g. community.openai.com/t/1262691 and /t/1344040):
//! - *tile* models: `low` detail costs the base figure; `high`/`auto` fit the image in
//!   2048×2048, scale its shortest side down to 768, and add the tile figure per 512-px tile
//!   (at most 8 tiles: 768×2048). Base/tile: gpt-4o, gpt-4.1, gpt-4.5, gpt-4-turbo 85/170;
//!   **gpt-4o-mini 2833/5667**; o1, o1-pro, o3 75/150; gpt-5 70/140; computer-use 65/129.
//! - *patch* models: 32-px patches, at most 1536 (larger images are scaled down to fit),
//!   times a multiplier; `detail` has no effect. gpt-4.1-mini and gpt-5-mini 1.62,
//!   gpt-4.1-nano and gpt-5-nano 2.46, o4-mini 1.72 (the larger of the documented and the
//!   measured multiplier where they differ).
//!
//! Anthropic (docs.anthropic.com, "Vision": tokens ≈ width × height / 750; images beyond
//! 1568 px on an edge or ~1.15 megapixels are scaled down, so one image costs at most
//! ~1,600 tokens; the high-resolution models, Opus 4.7 onwards, accept up to 2576 px and cap
//! near 4,784 tokens). Tollgate counts the larger of `w × h / 750` and one token per 28-px
//! patch, capped by the model's ceiling; the shipped Claude models take 1,600, any other
//! 4,784.

use base64::Engine;

/// `a / b` rounded up, for non-negative `a` and positive `b`.
fn div_ceil(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// An image's detail level as OpenAI's requests name it (`auto` and anything unknown bill
/// like `high`, the dearer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    Low,
    High,
}

impl Detail {
    pub fn parse(detail: Option<&str>) -> Self {
        if detail == Some("low") { Detail::Low } else { Detail::High }
    }
}

#[derive(Debug, Clone, Copy)]
enum OpenAiVision {
    Tiles {
        base: i64,
        tile: i64,
    },
    /// Tokens per patch, in hundredths.
    Patches {
        multiplier_pct: i64,
    },
}

/// High detail: fit in 2048×2048, shortest side to 768, 512-px tiles: at most 2 × 4.
const MAX_TILES: i64 = 8;
const MAX_PATCHES: i64 = 1536;

/// The OpenAI models whose figures are documented (base names; dated snapshots use them).
fn openai_vision(model: &str) -> Option<OpenAiVision> {
    let base = crate::pricing::base_model(model).unwrap_or(model);
    let tiles = |base, tile| Some(OpenAiVision::Tiles { base, tile });
    let patches = |multiplier_pct| Some(OpenAiVision::Patches { multiplier_pct });
    match base {
        "gpt-4o" | "chatgpt-4o-latest" | "gpt-4.1" | "gpt-4.5-preview" | "gpt-4-turbo" => tiles(85, 170),
        "gpt-4o-mini" => tiles(2833, 5667),
        "o1" | "o1-pro" | "o3" | "o3-pro" => tiles(75, 150),
        "gpt-5" | "gpt-5-chat-latest" => tiles(70, 140),
        "computer-use-preview" => tiles(65, 129),
        "gpt-4.1-mini" | "gpt-5-mini" => patches(162),
        "gpt-4.1-nano" | "gpt-5-nano" => patches(246),
        "o4-mini" => patches(172),
        _ => None,
    }
}

/// Every figure Tollgate knows, for models it does not: the dearest of them.
const OPENAI_UNKNOWN_MODEL: [OpenAiVision; 2] =
    [OpenAiVision::Tiles { base: 2833, tile: 5667 }, OpenAiVision::Patches { multiplier_pct: 246 }];

fn tiles_tokens(base: i64, tile: i64, detail: Detail, size: Option<(u32, u32)>) -> i64 {
    if detail == Detail::Low {
        return base;
    }
    let tiles = match size {
        None => MAX_TILES,
        Some((w, h)) => {
            let (mut w, mut h) = (f64::from(w.max(1)), f64::from(h.max(1)));
            if w > 2048.0 || h > 2048.0 {
                let ratio = (2048.0 / w).min(2048.0 / h);
                (w, h) = (w * ratio, h * ratio);
            }
            let shortest = w.min(h);
            if shortest > 768.0 {
                let ratio = 768.0 / shortest;
                (w, h) = (w * ratio, h * ratio);
            }
            // Rounding up, so a size on a tile's edge counts the tile.
            let count = |side: f64| (side.ceil() as i64 + 511) / 512;
            (count(w) * count(h)).clamp(1, MAX_TILES)
        }
    };
    base + tile * tiles
}

fn patches_tokens(multiplier_pct: i64, size: Option<(u32, u32)>) -> i64 {
    let patches = match size {
        None => MAX_PATCHES,
        Some((w, h)) => {
            let count = |side: u32| div_ceil(i64::from(side.max(1)), 32);
            (count(w) * count(h)).min(MAX_PATCHES)
        }
    };
    div_ceil(patches * multiplier_pct, 100)
}

fn openai_tokens(vision: OpenAiVision, detail: Detail, size: Option<(u32, u32)>) -> i64 {
    match vision {
        OpenAiVision::Tiles { base, tile } => tiles_tokens(base, tile, detail, size),
        OpenAiVision::Patches { multiplier_pct } => patches_tokens(multiplier_pct, size),
    }
}

/// Input tokens of one image sent to an OpenAI `model`, bounded from above; `size` is the
/// image's width and height when Tollgate could read them.
pub fn openai_image_tokens(model: &str, detail: Detail, size: Option<(u32, u32)>) -> i64 {
    match openai_vision(model) {
        Some(vision) => openai_tokens(vision, detail, size),
        None => OPENAI_UNKNOWN_MODEL.iter().map(|v| openai_tokens(*v, detail, size)).max().unwrap_or(i64::MAX),
    }
}

/// The per-image ceiling of the Claude models Tollgate ships prices for (1568-px edge,
/// ~1.15 megapixels).
pub const ANTHROPIC_IMAGE_CEILING: i64 = 1_600;
/// The per-image ceiling of the high-resolution Claude models (2576-px edge), and of any
/// Claude model Tollgate does not know.
pub const ANTHROPIC_HIGH_RES_IMAGE_CEILING: i64 = 4_784;

/// Input tokens of one image sent to a Claude `model`, bounded from above.
pub fn anthropic_image_tokens(model: &str, size: Option<(u32, u32)>) -> i64 {
    let base = crate::pricing::base_model(model).unwrap_or(model);
    let known = [
        "claude-opus-4-1",
        "claude-opus-4",
        "claude-sonnet-4-5",
        "claude-sonnet-4",
        "claude-3-7-sonnet",
        "claude-haiku-4-5",
        "claude-3-5-haiku",
        "claude-3-5-sonnet",
        "claude-3-opus",
        "claude-3-haiku",
    ];
    let ceiling = if known.contains(&base) { ANTHROPIC_IMAGE_CEILING } else { ANTHROPIC_HIGH_RES_IMAGE_CEILING };
    match size {
        None => ceiling,
        Some((w, h)) => {
            let (w, h) = (i64::from(w.max(1)), i64::from(h.max(1)));
            let by_area = div_ceil(w * h, 750);
            let by_patches = div_ceil(w, 28) * div_ceil(h, 28);
            by_area.max(by_patches).min(ceiling)
        }
    }
}

/// The bytes of a `data:…;base64,…` URL's start (enough for any image header Tollgate reads).
pub fn data_url_prefix(url: &str) -> Option<Vec<u8>> {
    let (_, data) = url.strip_prefix("data:")?.split_once(";base64,")?;
    base64_prefix(data)
}

/// The first bytes (up to 96 KiB) of base64 `data`.
pub fn base64_prefix(data: &str) -> Option<Vec<u8>> {
    let take = data.len().min(128 * 1024) / 4 * 4;
    let chunk = data.get(..take)?.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(chunk).ok()
}

/// Width and height of a PNG, GIF or JPEG image from its first bytes; None for anything else.
pub fn image_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let be32 = |at: usize| Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let be16 = |at: usize| Some(u32::from(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?)));
    let le16 = |at: usize| Some(u32::from(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?)));
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(12..16) == Some(b"IHDR") {
        return Some((be32(16)?, be32(20)?));
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return Some((le16(6)?, le16(8)?));
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        // Walk the segments to the first start-of-frame (SOF0…SOF15 but DHT, JPG, DAC).
        let mut at = 2;
        while at + 4 <= bytes.len() {
            if bytes[at] != 0xFF {
                return None;
            }
            let marker = bytes[at + 1];
            if marker == 0xFF {
                at += 1;
                continue;
            }
            let length = be16(at + 2)? as usize;
            if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
                return Some((be16(at + 7)?, be16(at + 5)?));
            }
            at += 2 + length;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_tiles_follow_the_documented_examples() {
        // The guide's examples for gpt-4o: 1024×1024 high is 765, 2048×4096 is 1105, low is 85.
        assert_eq!(openai_image_tokens("gpt-4o", Detail::High, Some((1024, 1024))), 765);
        assert_eq!(openai_image_tokens("gpt-4o-2024-08-06", Detail::High, Some((2048, 4096))), 1105);
        assert_eq!(openai_image_tokens("gpt-4o", Detail::Low, Some((4096, 4096))), 85);
        assert_eq!(openai_image_tokens("gpt-4o", Detail::High, None), 85 + 170 * 8);
        // gpt-4o-mini bills the same tiles at its own, far larger figures.
        assert_eq!(openai_image_tokens("gpt-4o-mini", Detail::High, Some((1024, 1024))), 2833 + 5667 * 4);
        assert_eq!(openai_image_tokens("gpt-4o-mini", Detail::High, None), 2833 + 5667 * 8);
        assert_eq!(openai_image_tokens("gpt-4o-mini", Detail::Low, None), 2833);
    }

    #[test]
    fn openai_patches_cap_at_1536_times_the_multiplier() {
        // gpt-4.1-mini: a 1024×1024 image is 32 × 32 patches; the cap is 1536 × 1.62.
        assert_eq!(openai_image_tokens("gpt-4.1-mini", Detail::Low, Some((1024, 1024))), div_ceil(1024 * 162, 100));
        assert_eq!(openai_image_tokens("gpt-4.1-mini", Detail::High, None), 2489);
        assert_eq!(openai_image_tokens("o4-mini", Detail::High, Some((4000, 1474))), 2642);
    }

    #[test]
    fn unknown_models_count_the_dearest_figures() {
        assert_eq!(openai_image_tokens("my-vision-model", Detail::High, None), 2833 + 5667 * 8);
        assert_eq!(openai_image_tokens("my-vision-model", Detail::Low, None), 3779);
        assert_eq!(anthropic_image_tokens("claude-sonnet-4-20250514", None), ANTHROPIC_IMAGE_CEILING);
        assert_eq!(anthropic_image_tokens("claude-opus-9", None), ANTHROPIC_HIGH_RES_IMAGE_CEILING);
        assert_eq!(anthropic_image_tokens("claude-sonnet-4", Some((1000, 1000))), 1334);
        assert_eq!(anthropic_image_tokens("claude-sonnet-4", Some((4000, 4000))), ANTHROPIC_IMAGE_CEILING);
    }

    #[test]
    fn sizes_are_read_from_png_gif_and_jpeg_headers() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&640u32.to_be_bytes());
        png.extend_from_slice(&480u32.to_be_bytes());
        assert_eq!(image_size(&png), Some((640, 480)));
        assert_eq!(image_size(b"GIF89a\x20\x03\x58\x02"), Some((800, 600)));
        let jpeg = [0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0, 0xFF, 0xC0, 0, 17, 8, 0x01, 0xE0, 0x02, 0x80];
        assert_eq!(image_size(&jpeg), Some((640, 480)));
        assert_eq!(image_size(b"not an image"), None);
        let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
        assert_eq!(data_url_prefix(&url).as_deref().and_then(image_size), Some((640, 480)));
    }
}
