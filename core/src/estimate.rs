//! Input token counts before a call, for the worst-case reservation.
//!
//! OpenAI models are counted with tiktoken following OpenAI's cookbook ("How to count tokens
//! with tiktoken"), and agree with OpenAI's own `tiktoken` package on the corpus in
//! `tests/python/token_corpus.json`:
//! - messages (`num_tokens_from_messages`): 3 tokens per message, +1 per `name`, +3 to prime
//!   the reply; every string field of a message (`role`, `content`, `name`, `tool_call_id`…)
//!   counts its tokens. Beyond the recipe: a multi-part `content` counts the text of its text
//!   parts, and a non-string field (an assistant's `tool_calls`) counts the tokens of its
//!   compact JSON text.
//! - function definitions (`num_tokens_for_tools`, for `tools` and the older `functions`):
//!   per function `func_init` + the tokens of `name:description`; if it has parameters,
//!   `prop_init` once, then per top-level property `prop_key` + the tokens of
//!   `key:type:description` (and for an enum `enum_init` + per value `enum_item` + its
//!   tokens); `func_end` once after all of them. A trailing `.` of a description is dropped.
//!   The constants are the cookbook's for gpt-4o (o200k) and gpt-4/gpt-3.5 (cl100k). Like the
//!   cookbook, nested properties and `required` are not counted.
//!
//! Parts the recipe does not cover are bounded from above: an image part counts its worst
//! case (the recipe alone: gpt-4o's 1445 tokens at `high`/`auto` detail, 85 + 170 × 8 tiles,
//! and 85 at `low`; the reservation bound: the model's own formula, see [`crate::vision`]), a
//! tool that is not a function counts the tokens of its JSON text. Parts whose tokens are not
//! in the request (files, audio) count nothing here: the proxy admits them only under the
//! project's per-call ceiling, which is reserved in full.
//!
//! Models without an exact tokenizer (`approximate`) count UTF-8 bytes instead, an upper
//! bound for byte-pair encodings (every token covers at least one byte), and the project's
//! `estimate_margin_bps` is added on top. Their function definitions count the bytes of
//! their whole JSON text, since an open model's chat template often pastes the schema as it
//! is, plus the cookbook's cl100k overheads.
//!
//! ## Bounds before the count
//!
//! Counting exactly costs time: tiktoken on a 16 MB body takes seconds of CPU. Every count
//! here can instead be *bounded* in time linear in the text ([`Counter::at_most`],
//! [`Counter::at_least`]): the same walk over the request, with each text's tokens replaced
//! by a bound computed from its length. For a byte-pair encoding (tiktoken's
//! `encode_ordinary`, which never produces special tokens):
//! - every token is a non-empty byte string and the tokens of a text concatenate to it, so
//!   a text of `b` UTF-8 bytes has **at most `b` tokens**;
//! - no token is longer than the longest entry of the vocabulary (`L` bytes, read from the
//!   vocabulary itself: [`longest_token`]), so it has **at least `⌈b / L⌉` tokens**.
//!
//! Every total here is a sum of text counts with non-negative coefficients plus constants
//! (the cookbook's overheads, image figures, counts of token arrays), or a `max` of such
//! sums, so a bound on each text is a bound on the total, in the same direction. Models
//! without an exact tokenizer count bytes in every mode (their exact count *is* the bytes).

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::pricing::Tokenizer;
use crate::vision::{self, Detail};

pub const TOKENS_PER_MESSAGE: i64 = 3;
pub const TOKENS_PER_NAME: i64 = 1;
pub const REPLY_PRIMING: i64 = 3;
pub const IMAGE_HIGH_DETAIL_MAX: i64 = 1445;
pub const IMAGE_LOW_DETAIL: i64 = 85;

/// The fixed costs of function definitions in the cookbook's `num_tokens_for_tools`.
#[derive(Debug, Clone, Copy)]
struct ToolOverheads {
    /// Before each function.
    func_init: i64,
    /// Once per function that has properties.
    prop_init: i64,
    /// Before each property.
    prop_key: i64,
    /// Once per property with an `enum` (negative: the enum replaces part of the line).
    enum_init: i64,
    /// Before each enum value.
    enum_item: i64,
    /// Once after all functions.
    func_end: i64,
}

/// gpt-4o and gpt-4o-mini (o200k_base).
const O200K_TOOL_OVERHEADS: ToolOverheads =
    ToolOverheads { func_init: 7, prop_init: 3, prop_key: 3, enum_init: -3, enum_item: 3, func_end: 12 };
/// gpt-4 and gpt-3.5-turbo (cl100k_base).
const CL100K_TOOL_OVERHEADS: ToolOverheads =
    ToolOverheads { func_init: 10, prop_init: 3, prop_key: 3, enum_init: -3, enum_item: 3, func_end: 12 };

impl ToolOverheads {
    /// The cookbook's constants for an encoding; approximate counts take cl100k's, the larger.
    fn of(tokenizer: Tokenizer) -> Self {
        match tokenizer {
            Tokenizer::O200kBase => O200K_TOOL_OVERHEADS,
            Tokenizer::Cl100kBase | Tokenizer::Approximate => CL100K_TOOL_OVERHEADS,
        }
    }
}

fn bpe(tokenizer: Tokenizer) -> Option<&'static CoreBPE> {
    match tokenizer {
        Tokenizer::O200kBase => Some(tiktoken_rs::o200k_base_singleton()),
        Tokenizer::Cl100kBase => Some(tiktoken_rs::cl100k_base_singleton()),
        Tokenizer::Approximate => None,
    }
}

/// The byte length of the longest token of `tokenizer`'s vocabulary (special tokens
/// included, which can only make it longer), read once from the vocabulary; 1 for byte counts.
pub fn longest_token(tokenizer: Tokenizer) -> usize {
    static O200K: OnceLock<usize> = OnceLock::new();
    static CL100K: OnceLock<usize> = OnceLock::new();
    let (cell, bpe) = match (tokenizer, bpe(tokenizer)) {
        (Tokenizer::O200kBase, Some(bpe)) => (&O200K, bpe),
        (Tokenizer::Cl100kBase, Some(bpe)) => (&CL100K, bpe),
        _ => return 1,
    };
    *cell.get_or_init(|| {
        // Ranks are dense from 0; a few past the last one cost nothing and miss nothing.
        (0..=VOCABULARY_RANKS).filter_map(|rank| bpe.decode_bytes(&[rank]).ok()).map(|t| t.len()).max().unwrap_or(1)
    })
}

/// Loads what counting needs (the vocabularies, their longest tokens), which takes a while
/// (a second in a debug build): called once at start, off the async threads, so that no
/// request waits for it.
pub fn load_tokenizers() {
    for tokenizer in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
        longest_token(tokenizer);
    }
}

/// Above the largest rank of every vocabulary here (o200k_base's specials end below 200,020).
const VOCABULARY_RANKS: u32 = 201_000;

/// What [`Counter::text`] gives for a text: its tokens, or a bound on them computed from its
/// length alone (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Exact,
    AtMost,
    AtLeast,
}

/// How the counts of this module count each text: with `tokenizer`, exactly or bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub tokenizer: Tokenizer,
    pub bound: Bound,
}

impl Counter {
    pub fn exact(tokenizer: Tokenizer) -> Self {
        Self { tokenizer, bound: Bound::Exact }
    }

    /// At least the exact count, in time linear in the text.
    pub fn at_most(tokenizer: Tokenizer) -> Self {
        Self { tokenizer, bound: Bound::AtMost }
    }

    /// At most the exact count, in time linear in the text.
    pub fn at_least(tokenizer: Tokenizer) -> Self {
        Self { tokenizer, bound: Bound::AtLeast }
    }

    /// Tokens of a plain text (special-token text counts as ordinary text), or their bound.
    pub fn text(self, text: &str) -> i64 {
        let bytes = text.len();
        let tokens = match (bpe(self.tokenizer), self.bound) {
            (None, _) => bytes,
            (Some(bpe), Bound::Exact) => bpe.encode_ordinary(text).len(),
            (Some(_), Bound::AtMost) => bytes,
            (Some(_), Bound::AtLeast) => bytes.div_ceil(longest_token(self.tokenizer)),
        };
        tokens as i64
    }
}

impl From<Tokenizer> for Counter {
    fn from(tokenizer: Tokenizer) -> Self {
        Counter::exact(tokenizer)
    }
}

/// Tokens of a plain text (special-token text counts as ordinary text).
pub fn count_text(tokenizer: Tokenizer, text: &str) -> i64 {
    Counter::exact(tokenizer).text(text)
}

/// Adds `margin_bps` basis points to an approximate count (exact counts are unchanged).
pub fn with_margin(tokenizer: Tokenizer, tokens: i64, margin_bps: i64) -> i64 {
    match tokenizer {
        Tokenizer::Approximate => tokens + (tokens * margin_bps.max(0) + 9_999) / 10_000,
        _ => tokens,
    }
}

/// Tokens of a value: a string's text, nothing for null, anything else its compact JSON text.
fn count_value(counter: Counter, value: &Value) -> i64 {
    match value {
        Value::String(s) => counter.text(s),
        Value::Null => 0,
        other => counter.text(&other.to_string()),
    }
}

fn count_content(counter: Counter, model: Option<&str>, content: &Value) -> i64 {
    match content {
        Value::Array(parts) => parts.iter().map(|p| count_part(counter, model, p)).sum(),
        other => count_value(counter, other),
    }
}

/// An image part's tokens: by `model`'s own formula when it is given (the reservation bound),
/// else gpt-4o's worst case (the cookbook recipe's figure).
fn image_tokens(model: Option<&str>, part: &Value) -> i64 {
    let image = part.get("image_url");
    let detail = image.and_then(|i| i.get("detail")).or_else(|| part.get("detail")).and_then(Value::as_str);
    let Some(model) = model else {
        return if detail == Some("low") { IMAGE_LOW_DETAIL } else { IMAGE_HIGH_DETAIL_MAX };
    };
    let url = image.and_then(|i| i.get("url").or(Some(i))).and_then(Value::as_str);
    let size = url.and_then(vision::data_url_prefix).as_deref().and_then(vision::image_size);
    vision::openai_image_tokens(model, Detail::parse(detail), size)
}

fn count_part(counter: Counter, model: Option<&str>, part: &Value) -> i64 {
    match part.get("type").and_then(Value::as_str) {
        Some("text") | Some("input_text") | Some("output_text") => {
            counter.text(part.get("text").and_then(Value::as_str).unwrap_or(""))
        }
        Some("image_url") | Some("input_image") | Some("image") => image_tokens(model, part),
        Some("file") | Some("input_file") | Some("input_audio") => 0,
        _ => counter.text(&part.to_string()),
    }
}

/// The cookbook's `num_tokens_from_messages`, without the reply priming.
fn count_message(counter: Counter, model: Option<&str>, message: &Value) -> i64 {
    let Some(fields) = message.as_object() else {
        return TOKENS_PER_MESSAGE + count_value(counter, message);
    };
    let mut total = TOKENS_PER_MESSAGE;
    for (key, value) in fields {
        total += match key.as_str() {
            "content" => count_content(counter, model, value),
            _ => count_value(counter, value),
        };
        if key == "name" {
            total += TOKENS_PER_NAME;
        }
    }
    total
}

/// A description as the cookbook renders it: one trailing `.` dropped.
fn description(definition: &Value) -> &str {
    let text = definition.get("description").and_then(Value::as_str).unwrap_or("");
    text.strip_suffix('.').unwrap_or(text)
}

/// A JSON value inside a rendered line: strings as they are, null as nothing, anything else
/// as its JSON text.
fn inline_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// One function definition (`name`, `description`, `parameters`) as the cookbook counts it.
fn count_function(counter: Counter, overheads: ToolOverheads, function: &Value) -> i64 {
    let name = function.get("name").and_then(Value::as_str).unwrap_or("");
    let mut total = overheads.func_init + counter.text(&format!("{name}:{}", description(function)));
    let properties = function.pointer("/parameters/properties").and_then(Value::as_object);
    let Some(properties) = properties.filter(|p| !p.is_empty()) else {
        return total;
    };
    total += overheads.prop_init;
    for (key, property) in properties {
        total += overheads.prop_key;
        if let Some(values) = property.get("enum") {
            total += overheads.enum_init;
            for value in values.as_array().into_iter().flatten() {
                total += overheads.enum_item + counter.text(&inline_text(value));
            }
        }
        let kind = property.get("type").map(inline_text).unwrap_or_default();
        total += counter.text(&format!("{key}:{kind}:{}", description(property)));
    }
    total
}

/// Function definitions of a request (`tools`, and `functions` of the older API), following
/// the cookbook's `num_tokens_for_tools`.
fn count_tools(counter: Counter, request: &Value) -> i64 {
    let tools = request.get("tools").and_then(Value::as_array).into_iter().flatten();
    let functions = request.get("functions").and_then(Value::as_array).into_iter().flatten();
    // Each definition, with the function inside it when it is one.
    let definitions = tools
        .map(|tool| (tool, tool.get("function").filter(|_| tool["type"] == "function")))
        .chain(functions.map(|function| (function, Some(function))));
    let overheads = ToolOverheads::of(counter.tokenizer);
    let mut total = 0;
    let mut any = false;
    for (definition, function) in definitions {
        any = true;
        total += match (counter.tokenizer, function) {
            (Tokenizer::Approximate, _) => overheads.func_init + count_value(counter, definition),
            (_, Some(function)) => count_function(counter, overheads, function),
            (_, None) => overheads.func_init + count_value(counter, definition),
        };
    }
    if any { total + overheads.func_end } else { 0 }
}

/// Input tokens of an OpenAI chat request (`messages`, `tools`/`functions`), as the
/// cookbook counts them.
pub fn chat_input_tokens(counter: impl Into<Counter>, request: &Value) -> i64 {
    let counter = counter.into();
    messages_tokens(counter, None, request) + count_tools(counter, request)
}

/// What a reservation holds for a chat request's input to `model`: [`chat_input_tokens`],
/// except that images count by the model's own formula, and function definitions count at
/// least the tokens of their whole JSON text. The cookbook's recipe skips nested properties,
/// `required` and array `items`, so on a deep schema it counts less than the provider bills;
/// the JSON text covers all of it.
pub fn chat_input_bound(counter: impl Into<Counter>, model: &str, request: &Value) -> i64 {
    let counter = counter.into();
    let tools = request.get("tools").and_then(Value::as_array).into_iter().flatten();
    let functions = request.get("functions").and_then(Value::as_array).into_iter().flatten();
    let overheads = ToolOverheads::of(counter.tokenizer);
    let mut json_text = 0;
    let mut any = false;
    for definition in tools.chain(functions) {
        any = true;
        json_text += overheads.func_init + count_value(counter, definition);
    }
    let json_text = if any { json_text + overheads.func_end } else { 0 };
    messages_tokens(counter, Some(model), request) + count_tools(counter, request).max(json_text)
}

fn messages_tokens(counter: Counter, model: Option<&str>, request: &Value) -> i64 {
    let messages = request.get("messages").and_then(Value::as_array).into_iter().flatten();
    messages.map(|m| count_message(counter, model, m)).sum::<i64>() + REPLY_PRIMING
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_reservation_bound_covers_nested_schemas() {
        let nested = json!({"type": "object", "properties": {"address": {"type": "object", "properties": {
            "street": {"type": "string", "description": "Street and number of the delivery address"},
            "city": {"type": "string"}, "zip": {"type": "string"}}, "required": ["street", "city"]}}});
        let request = json!({"messages": [{"role": "user", "content": "Ship it"}],
            "tools": [{"type": "function", "function": {"name": "ship", "description": "Ship an order", "parameters": nested}}]});
        let t = Tokenizer::O200kBase;
        let recipe = chat_input_tokens(t, &request);
        let bound = chat_input_bound(t, "gpt-4o", &request);
        assert!(bound > recipe, "{bound} <= {recipe}: nested properties were not held");
        let plain = json!({"messages": [{"role": "user", "content": "Hello"}]});
        assert_eq!(chat_input_bound(t, "gpt-4o", &plain), chat_input_tokens(t, &plain));
    }

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
        // The reservation counts the model's own figures: gpt-4o-mini's tiles are far dearer.
        let mini = 3 + count_text(t, "user") + text + 2833 + (2833 + 5667 * 8) + 3;
        assert_eq!(chat_input_bound(t, "gpt-4o-mini", &request), mini);
    }

    /// The cookbook's tools example, whose counts it checked against the OpenAI API:
    /// 101 prompt tokens on gpt-4o and gpt-4o-mini, 105 on gpt-4 and gpt-3.5-turbo.
    fn cookbook_weather_request() -> Value {
        json!({
            "messages": [
                {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
                {"role": "user", "content": "What's the weather like in San Francisco?"}
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_current_weather",
                "description": "Get the current weather in a given location",
                "parameters": {"type": "object", "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}
                }, "required": ["location"]}
            }}]
        })
    }

    #[test]
    fn tools_match_the_counts_the_cookbook_checked_against_the_api() {
        let request = cookbook_weather_request();
        assert_eq!(chat_input_tokens(Tokenizer::O200kBase, &request), 101);
        assert_eq!(chat_input_tokens(Tokenizer::Cl100kBase, &request), 105);
    }

    #[test]
    fn legacy_functions_count_like_tools() {
        let tools = cookbook_weather_request();
        let mut functions = tools.clone();
        functions["functions"] = json!([tools["tools"][0]["function"]]);
        functions.as_object_mut().unwrap().remove("tools");
        assert_eq!(chat_input_tokens(Tokenizer::O200kBase, &functions), 101);
    }

    #[test]
    fn approximate_tools_count_their_whole_json_text() {
        let request = cookbook_weather_request();
        let tool = &request["tools"][0];
        let messages = json!({"messages": request["messages"]});
        let t = Tokenizer::Approximate;
        assert_eq!(
            chat_input_tokens(t, &request),
            chat_input_tokens(t, &messages) + 10 + tool.to_string().len() as i64 + 12
        );
        assert!(chat_input_tokens(t, &request) > chat_input_tokens(Tokenizer::Cl100kBase, &request));
    }

    #[test]
    fn bounds_bracket_the_exact_count() {
        let mut requests = vec![cookbook_weather_request()];
        let texts = [
            "Hello!",
            "héllo wörld, 你好世界 🦀🦀🦀",
            "                                                        indented",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "=================================================================================",
            "",
        ];
        for text in texts {
            requests.push(json!({"messages": [{"role": "user", "name": "ada", "content": text},
                {"role": "assistant", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": "https://x"}}],
                 "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": text}}]}]}));
        }
        for tokenizer in [Tokenizer::O200kBase, Tokenizer::Cl100kBase, Tokenizer::Approximate] {
            for request in &requests {
                let exact = chat_input_bound(Counter::exact(tokenizer), "gpt-4o", request);
                let most = chat_input_bound(Counter::at_most(tokenizer), "gpt-4o", request);
                let least = chat_input_bound(Counter::at_least(tokenizer), "gpt-4o", request);
                assert!(
                    least <= exact && exact <= most,
                    "{tokenizer:?}: {least} <= {exact} <= {most} fails for {request}"
                );
            }
        }
        // Byte counts are their own bounds.
        let text = "héllo wörld";
        assert_eq!(Counter::at_least(Tokenizer::Approximate).text(text), count_text(Tokenizer::Approximate, text));
    }

    #[test]
    fn the_longest_token_is_read_from_the_vocabulary() {
        for tokenizer in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
            let longest = longest_token(tokenizer);
            assert!((16..=1024).contains(&longest), "{tokenizer:?}: {longest}");
            // A text made of one long token repeated: the lower bound holds on it.
            let spaces = " ".repeat(10_000);
            assert!(Counter::at_least(tokenizer).text(&spaces) <= count_text(tokenizer, &spaces));
        }
        assert_eq!(longest_token(Tokenizer::Approximate), 1);
    }

    /// What the proxy's inline threshold rests on (`src/routes/proxy/offload.rs`): the exact
    /// count of prose at several sizes, beside a round trip through Tokio's blocking pool.
    /// `cargo test -p tollgate-core --release --lib counting_costs -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn counting_costs() {
        let prose = "The committee reviewed the quarterly figures and found them sound. ";
        let t = Tokenizer::O200kBase;
        count_text(t, prose); // loads the vocabulary
        let time = |f: &dyn Fn()| {
            let runs = 200;
            let started = std::time::Instant::now();
            for _ in 0..runs {
                f();
            }
            started.elapsed() / runs
        };
        // Prose, and random lower-case words (no piece in the vocabulary: every one merged).
        let mut seed = 7u64;
        let mut random = String::new();
        while random.len() < 1 << 20 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let letter = (b'a' + (seed >> 33) as u8 % 26) as char;
            random.push(if (seed >> 20).is_multiple_of(40) { ' ' } else { letter });
        }
        for size in [1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20] {
            let text = prose.repeat(size / prose.len() + 1);
            let words = &random[..size];
            let started = std::time::Instant::now();
            count_text(t, words);
            println!("{:>5} KB of random words: exact {:?}", size >> 10, started.elapsed());
            let exact = time(&|| {
                count_text(t, &text);
            });
            let bound = time(&|| {
                Counter::at_least(t).text(&text);
            });
            println!("{:>5} KB: exact {exact:?}, bound {bound:?}", size >> 10);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let hop = runtime.block_on(async {
            let runs = 2_000;
            let started = std::time::Instant::now();
            for _ in 0..runs {
                tokio::task::spawn_blocking(|| 1).await.unwrap();
            }
            started.elapsed() / runs
        });
        println!("a round trip through the blocking pool: {hop:?}");
        let started = std::time::Instant::now();
        let longest = (longest_token(Tokenizer::O200kBase), longest_token(Tokenizer::Cl100kBase));
        println!("longest tokens (o200k, cl100k): {longest:?} bytes, read in {:?}", started.elapsed());
    }
}
