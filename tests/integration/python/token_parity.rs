//! Token-count parity with OpenAI's `tiktoken`: `chat_input_tokens` must give, request by
//! request, what `tests/python/token_counts.py` (the cookbook's recipe run by tiktoken)
//! gives on the corpus `tests/python/token_corpus.json`.

use std::fmt::Write as _;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;
use tollgate_core::estimate::chat_input_tokens;
use tollgate_core::pricing::Tokenizer;

use super::{PythonScript, scripts_dir};
use crate::helpers::{PlainCase, TestResult};
use crate::plain_cases;

pub fn cases() -> Vec<PlainCase> {
    plain_cases![chat_token_counts_equal_tiktoken_on_the_corpus]
}

/// The corpus has requests of every kind the issue names; keep it from shrinking unnoticed.
const MIN_CORPUS_SIZE: usize = 25;

#[derive(Deserialize)]
struct CorpusEntry {
    name: String,
    encoding: String,
    request: Value,
}

#[derive(Deserialize)]
struct TiktokenCount {
    name: String,
    encoding: String,
    tokens: i64,
}

async fn chat_token_counts_equal_tiktoken_on_the_corpus() -> TestResult {
    let corpus_path = scripts_dir().join("token_corpus.json");
    let corpus: Vec<CorpusEntry> = serde_json::from_str(&std::fs::read_to_string(&corpus_path)?)
        .with_context(|| format!("reading {}", corpus_path.display()))?;
    assert!(corpus.len() >= MIN_CORPUS_SIZE, "the corpus has only {} requests", corpus.len());
    let reference =
        PythonScript::new("token_counts.py").arg(&corpus_path).with_offline_tiktoken().await?.run_json().await?;
    let reference: Vec<TiktokenCount> = serde_json::from_value(reference)?;
    assert_eq!(reference.len(), corpus.len(), "token_counts.py skipped requests");

    let mut mismatches = 0;
    let mut table = format!("{:<48} {:<12} {:>9} {:>9} {:>6}\n", "request", "encoding", "tiktoken", "tollgate", "diff");
    for (entry, expected) in corpus.iter().zip(&reference) {
        assert_eq!((&entry.name, &entry.encoding), (&expected.name, &expected.encoding), "corpus order");
        let tokenizer: Tokenizer = serde_json::from_value(Value::String(entry.encoding.clone()))?;
        let ours = chat_input_tokens(tokenizer, &entry.request);
        let diff = ours - expected.tokens;
        if diff != 0 {
            mismatches += 1;
        }
        let mark = if diff == 0 { "" } else { "  <-- differs" };
        writeln!(
            table,
            "{:<48} {:<12} {:>9} {:>9} {:>+6}{mark}",
            entry.name, entry.encoding, expected.tokens, ours, diff
        )?;
    }
    if mismatches > 0 {
        anyhow::bail!("{mismatches} of {} requests counted differently from tiktoken:\n{table}", corpus.len());
    }
    Ok(())
}
