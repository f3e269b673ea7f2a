//! Tokenizers: GPT-2's BPE (embedded in `tiktoken-rs`, works offline) and a byte-level one for tiny models.

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

/// Which tokenizer a corpus was prepared with. Stored in the shard index, so training always decodes with
/// the tokenizer that encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// GPT-2's byte-pair encoding: 50,257 tokens, end-of-text 50256.
    Gpt2,
    /// One token per byte: vocabulary 256, end-of-text is byte 0 (NUL), which text never contains.
    Byte,
}

impl TokenizerKind {
    /// The name the CLI and the index use: `gpt2` or `byte`.
    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::Gpt2 => "gpt2",
            TokenizerKind::Byte => "byte",
        }
    }
}

/// A tokenizer ready to encode and decode.
pub struct Tokenizer {
    kind: TokenizerKind,
    bpe: Option<&'static CoreBPE>,
}

/// Why a document could not be tokenized. `data prepare` turns it into [`super::DataError::NotText`] naming the
/// file and line (or, with `--skip-bad`, skips the document and lists it in the index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The byte tokenizer reserves byte 0 for end-of-text; a NUL in the input means it is not text.
    ContainsNul { byte_offset: usize },
}

impl Tokenizer {
    pub fn new(kind: TokenizerKind) -> Self {
        let bpe = match kind {
            TokenizerKind::Gpt2 => Some(tiktoken_rs::r50k_base_singleton()),
            TokenizerKind::Byte => None,
        };
        Tokenizer { kind, bpe }
    }

    /// Number of distinct token ids.
    pub fn vocab_size(&self) -> u32 {
        match self.kind {
            TokenizerKind::Gpt2 => 50_257,
            TokenizerKind::Byte => 256,
        }
    }

    /// The id placed between documents.
    pub fn eot(&self) -> u32 {
        match self.kind {
            TokenizerKind::Gpt2 => 50_256,
            TokenizerKind::Byte => 0,
        }
    }

    /// Tokens of one document, without the end-of-text separator. Special-token text such as
    /// `<|endoftext|>` inside a document is encoded as ordinary text, never as the separator.
    ///
    /// # Errors
    /// [`EncodeError::ContainsNul`] for the byte tokenizer when the text holds a NUL.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EncodeError> {
        match self.bpe {
            Some(bpe) => Ok(bpe.encode_ordinary(text)),
            None => match text.bytes().position(|b| b == 0) {
                Some(byte_offset) => Err(EncodeError::ContainsNul { byte_offset }),
                None => Ok(text.bytes().map(u32::from).collect()),
            },
        }
    }

    /// Text for `tokens`; bytes that do not form UTF-8 are replaced, and end-of-text becomes `<|endoftext|>`.
    pub fn decode(&self, tokens: &[u32]) -> String {
        match self.bpe {
            Some(bpe) => {
                let bytes: Vec<u8> = tokens
                    .iter()
                    .flat_map(|&t| bpe.decode_bytes(&[t]).unwrap_or_else(|_| "\u{FFFD}".as_bytes().to_vec()))
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            None => {
                let mut out = Vec::with_capacity(tokens.len());
                for &t in tokens {
                    if t == 0 {
                        out.extend_from_slice(b"<|endoftext|>");
                    } else {
                        out.push(t.min(255) as u8);
                    }
                }
                String::from_utf8_lossy(&out).into_owned()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_encodes_hello_world_as_openai_does() {
        let t = Tokenizer::new(TokenizerKind::Gpt2);
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(t.eot(), 50256);
    }

    #[test]
    fn both_tokenizers_round_trip_unicode_text() {
        let text = "Tessera — keeps training. 日本語, émoji 🚀, tabs\tand\nnewlines.";
        for kind in [TokenizerKind::Gpt2, TokenizerKind::Byte] {
            let t = Tokenizer::new(kind);
            let ids = t.encode(text).unwrap();
            assert!(ids.iter().all(|&i| i < t.vocab_size()));
            assert_eq!(t.decode(&ids), text, "{kind:?}");
        }
    }

    #[test]
    fn endoftext_inside_a_document_is_not_the_separator() {
        let t = Tokenizer::new(TokenizerKind::Gpt2);
        assert!(!t.encode("a <|endoftext|> b").unwrap().contains(&50256));
    }

    #[test]
    fn byte_tokenizer_rejects_nul() {
        let t = Tokenizer::new(TokenizerKind::Byte);
        assert_eq!(t.encode("ab\0c"), Err(EncodeError::ContainsNul { byte_offset: 2 }));
    }
}
