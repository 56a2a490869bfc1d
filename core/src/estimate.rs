//! Input token counts before a call, for the worst-case reservation.
//!
//! OpenAI models are counted exactly with tiktoken following OpenAI's chat recipe: 3 tokens
//! per message, +1 per `name`, +3 to prime the reply; every string field of a message
//! counts its tokens. Parts the recipe does not cover are bounded from above: an image part
//! counts its worst case (1445 tokens at `high`/`auto` detail: 85 + 170 × 8 tiles; 85 at `low`),
//! tool definitions count the tokens of their JSON text plus a fixed overhead.
//!
//! Models without an exact tokenizer (`approximate`) count UTF-8 bytes instead, an upper
//! bound for byte-pair encodings (every token covers at least one byte), and the project's
//! `estimate_margin_bps` is added on top.

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::pricing::Tokenizer;

pub const TOKENS_PER_MESSAGE: i64 = 3;
pub const TOKENS_PER_NAME: i64 = 1;
pub const REPLY_PRIMING: i64 = 3;
pub const IMAGE_HIGH_DETAIL_MAX: i64 = 1445;
pub const IMAGE_LOW_DETAIL: i64 = 85;
pub const TOOLS_OVERHEAD: i64 = 12;
pub const PER_TOOL_OVERHEAD: i64 = 8;

fn bpe(tokenizer: Tokenizer) -> Option<&'static CoreBPE> {
    match tokenizer {
        Tokenizer::O200kBase => Some(tiktoken_rs::o200k_base_singleton()),
        Tokenizer::Cl100kBase => Some(tiktoken_rs::cl100k_base_singleton()),
        Tokenizer::Approximate => None,
    }
}

/// Tokens of a plain text (special-token text counts as ordinary text).
pub fn count_text(tokenizer: Tokenizer, text: &str) -> i64 {
    match bpe(tokenizer) {
        Some(bpe) => bpe.encode_ordinary(text).len() as i64,
        None => text.len() as i64,
    }
}

/// Adds `margin_bps` basis points to an approximate count (exact counts are unchanged).
pub fn with_margin(tokenizer: Tokenizer, tokens: i64, margin_bps: i64) -> i64 {
    match tokenizer {
        Tokenizer::Approximate => tokens + (tokens * margin_bps.max(0) + 9_999) / 10_000,
        _ => tokens,
    }
}

fn count_content(tokenizer: Tokenizer, content: &Value) -> i64 {
    match content {
        Value::String(s) => count_text(tokenizer, s),
        Value::Array(parts) => parts.iter().map(|p| count_part(tokenizer, p)).sum(),
        Value::Null => 0,
        other => count_text(tokenizer, &other.to_string()),
    }
}

fn count_part(tokenizer: Tokenizer, part: &Value) -> i64 {
    match part.get("type").and_then(Value::as_str) {
        Some("text") | Some("input_text") | Some("output_text") => {
            count_text(tokenizer, part.get("text").and_then(Value::as_str).unwrap_or(""))
        }
        Some("image_url") | Some("input_image") | Some("image") => {
            let detail = part
                .get("image_url")
                .and_then(|i| i.get("detail"))
                .or_else(|| part.get("detail"))
                .and_then(Value::as_str)
                .unwrap_or("auto");
            if detail == "low" { IMAGE_LOW_DETAIL } else { IMAGE_HIGH_DETAIL_MAX }
        }
        _ => count_text(tokenizer, &part.to_string()),
    }
}

/// Input tokens of an OpenAI chat request (`messages`, `tools`/`functions`).
pub fn chat_input_tokens(tokenizer: Tokenizer, request: &Value) -> i64 {
    let mut total = 0;
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        for message in messages {
            total += TOKENS_PER_MESSAGE;
            let Some(fields) = message.as_object() else {
                total += count_text(tokenizer, &message.to_string());
                continue;
            };
            for (key, value) in fields {
                total += match key.as_str() {
                    "content" => count_content(tokenizer, value),
                    _ => match value {
                        Value::String(s) => count_text(tokenizer, s),
                        Value::Null => 0,
                        other => count_text(tokenizer, &other.to_string()),
                    },
                };
                if key == "name" {
                    total += TOKENS_PER_NAME;
                }
            }
        }
    }
    total += REPLY_PRIMING;
    for key in ["tools", "functions"] {
        if let Some(tools) = request.get(key).and_then(Value::as_array).filter(|t| !t.is_empty()) {
            total += TOOLS_OVERHEAD + tools.len() as i64 * PER_TOOL_OVERHEAD;
            total += tools.iter().map(|t| count_text(tokenizer, &t.to_string())).sum::<i64>();
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn follows_the_cookbook_recipe() {
        // Two messages: 3 + ("system" + "You are terse.") + 3 + ("user" + "Hello!") + 3 priming.
        let request = json!({"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello!"}
        ]});
        let t = Tokenizer::O200kBase;
        let expected = 3
            + count_text(t, "system")
            + count_text(t, "You are terse.")
            + 3
            + count_text(t, "user")
            + count_text(t, "Hello!")
            + 3;
        assert_eq!(chat_input_tokens(t, &request), expected);
        let named = json!({"messages": [{"role": "user", "name": "ada", "content": "Hi"}]});
        assert_eq!(
            chat_input_tokens(t, &named),
            3 + count_text(t, "user") + count_text(t, "ada") + 1 + count_text(t, "Hi") + 3
        );
    }

    #[test]
    fn approximate_counts_bound_from_above() {
        let request = json!({"messages": [{"role": "user", "content": "héllo wörld"}]});
        let exact = chat_input_tokens(Tokenizer::O200kBase, &request);
        let approx = chat_input_tokens(Tokenizer::Approximate, &request);
        assert!(approx >= exact, "{approx} < {exact}");
        assert_eq!(with_margin(Tokenizer::Approximate, 100, 2_000), 120);
        assert_eq!(with_margin(Tokenizer::O200kBase, 100, 2_000), 100);
    }

    #[test]
    fn images_count_their_worst_case() {
        let request = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        ]}]});
        let t = Tokenizer::O200kBase;
        let text = count_text(t, "What is this?");
        assert_eq!(chat_input_tokens(t, &request), 3 + count_text(t, "user") + text + 85 + 1445 + 3);
    }
}
