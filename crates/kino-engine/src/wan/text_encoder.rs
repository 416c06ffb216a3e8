//! Wan's prompt encoding: a port of `WanPipeline._get_t5_prompt_embeds` and of `prompt_clean`
//! (with `basic_clean`, `whitespace_clean`) from diffusers' `pipelines/wan/pipeline_wan.py`.
//!
//! A prompt is cleaned, tokenized with the model's `tokenizer/tokenizer.json` (for Wan the umt5-xxl
//! SentencePiece Unigram tokenizer, for the bundled kino-shapes model a WordLevel one, which
//! transformers 5 loads as `TokenizersBackend`, file as written; `</s>` appended by its
//! post-processor, padded with `<pad>` to `max_sequence_length` and truncated to it; parity with
//! the reference for kino-shapes is checked by `tests/kino_shapes.rs`), run through the
//! [`UMT5EncoderModel`] with its
//! attention mask, and each embedding is cut to its real length and zero-padded back to
//! `max_sequence_length`, giving `prompt_embeds` [B, max_sequence_length, D].
//!
//! Differences from the reference, all deliberate:
//! - `ftfy.fix_text` (which diffusers applies only when the `ftfy` package is installed) has no
//!   Rust port: mojibake is not repaired. Our fixtures are made without ftfy.
//! - `html.unescape` is ported exactly (numeric references with Python's replacement rules,
//!   the longest-prefix rule for named references without `;`), but knows the HTML 4 entities,
//!   `&apos;`, `&Tab;`, `&NewLine;` and every entity HTML5 allows without `;` (367 names), not
//!   all 2231 HTML5 names: a rarer named reference (`&NotSubset;`) is left as written.
//! - The encoder runs only over the longest prompt's tokens, not all `max_sequence_length`: the
//!   padding is masked out of every attention and cut off afterwards, so the result is the same
//!   (up to float summation order) for far less work.
//! - transformers 5 rebuilds a T5 tokenizer's pre-tokenizer (WhitespaceSplit + Metaspace) instead
//!   of reading it from tokenizer.json; we use tokenizer.json as written. After `prompt_clean`
//!   (single spaces only) both give the same tokens.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::umt5::UMT5EncoderModel;
use crate::{Error, Result};

/// The prompt length Wan pads and truncates to (`max_sequence_length` of `WanPipeline.__call__`).
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// diffusers' `prompt_clean`: `html.unescape` twice, strip, collapse whitespace runs to one
/// space, strip (without ftfy; see the module doc).
pub fn prompt_clean(text: &str) -> String {
    // basic_clean
    let text = html_unescape(&html_unescape(text));
    let text = text.trim_matches(py_isspace);
    // whitespace_clean: `regex`'s `\s+` (Unicode White_Space, as `char::is_whitespace`) → " ".
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.push(c);
            in_space = false;
        }
    }
    out.trim_matches(py_isspace).to_string()
}

/// Python's `str.isspace` (what `str.strip()` removes): Unicode White_Space plus U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `html.unescape`: replaces every match of
/// `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)` as `_replace_charref` does.
fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '&' {
            if let Some((end, rep)) = charref_at(&chars, i + 1) {
                out.push_str(&rep);
                i = end;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// The character reference starting at `chars[j]` (just after `&`): its end and replacement.
fn charref_at(chars: &[char], j: usize) -> Option<(usize, String)> {
    let n = chars.len();
    let run = |from: usize, ok: &dyn Fn(char) -> bool, max: usize| {
        let mut k = from;
        while k < n && k - from < max && ok(chars[k]) {
            k += 1;
        }
        k
    };
    let semicolon = |k: usize| if k < n && chars[k] == ';' { k + 1 } else { k };
    if j >= n {
        return None;
    }
    if chars[j] == '#' {
        let k = run(j + 1, &|c| c.is_ascii_digit(), usize::MAX);
        if k > j + 1 {
            let num = parse_codepoint(&chars[j + 1..k], 10);
            return Some((semicolon(k), numeric_charref(num)));
        }
        if j + 1 < n && (chars[j + 1] == 'x' || chars[j + 1] == 'X') {
            let k = run(j + 2, &|c| c.is_ascii_hexdigit(), usize::MAX);
            if k > j + 2 {
                let num = parse_codepoint(&chars[j + 2..k], 16);
                return Some((semicolon(k), numeric_charref(num)));
            }
        }
        return None;
    }
    let k = run(
        j,
        &|c| !matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';'),
        32,
    );
    if k == j {
        return None;
    }
    let end = semicolon(k);
    let name: String = chars[j..end].iter().collect();
    if let Some(c) = named_entity(&name) {
        return Some((end, c.to_string()));
    }
    // The longest prefix that is an entity (only the no-`;` legacy names can match here).
    let name_chars = &chars[j..end];
    for x in (2..name_chars.len()).rev() {
        let prefix: String = name_chars[..x].iter().collect();
        if let Some(c) = named_entity(&prefix) {
            let rest: String = name_chars[x..].iter().collect();
            return Some((end, format!("{c}{rest}")));
        }
    }
    Some((end, format!("&{name}")))
}

/// Digits to a number, saturating above the Unicode range (Python's ints do not overflow).
fn parse_codepoint(digits: &[char], radix: u32) -> u32 {
    let mut v: u32 = 0;
    for d in digits {
        let x = d.to_digit(radix).unwrap_or(0);
        v = v.saturating_mul(radix).saturating_add(x);
        if v > 0x10FFFF {
            return 0x110000;
        }
    }
    v
}

/// `_replace_charref` for `&#N;`: Python's `_invalid_charrefs`, surrogates and out-of-range to
/// U+FFFD, `_invalid_codepoints` dropped.
fn numeric_charref(num: u32) -> String {
    const CP1252: [u32; 32] = [
        0x20AC, 0x81, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
        0x2039, 0x0152, 0x8D, 0x017D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013,
        0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D, 0x017E, 0x0178,
    ];
    let replaced = match num {
        0 => Some(0xFFFD),
        0x0D => Some(0x0D),
        0x80..=0x9F => Some(CP1252[(num - 0x80) as usize]),
        _ => None,
    };
    if let Some(c) = replaced.and_then(char::from_u32) {
        return c.to_string();
    }
    if (0xD800..=0xDFFF).contains(&num) || num > 0x10FFFF {
        return '\u{FFFD}'.to_string();
    }
    let invalid = matches!(num, 0x1..=0x8 | 0xB | 0xE..=0x1F | 0x7F..=0x9F | 0xFDD0..=0xFDEF)
        || (num & 0xFFFE) == 0xFFFE;
    if invalid {
        return String::new();
    }
    char::from_u32(num).map(String::from).unwrap_or_default()
}

fn named_entity(name: &str) -> Option<char> {
    HTML_ENTITIES
        .binary_search_by(|(k, _)| (*k).cmp(name))
        .ok()
        .map(|i| HTML_ENTITIES[i].1)
}

/// Tokenizer + UMT5 encoder: `WanPipeline._get_t5_prompt_embeds`.
pub struct WanTextEncoder {
    /// Padding and truncation change per call; the lock keeps `&self` methods.
    tokenizer: Mutex<Tokenizer>,
    pad_id: u32,
    pad_token: String,
    model: UMT5EncoderModel,
}

impl WanTextEncoder {
    /// Loads `tokenizer_dir/tokenizer.json` and the `text_encoder_dir` UMT5 encoder.
    pub fn load(
        tokenizer_dir: &Path,
        text_encoder_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tokenizer = load_tokenizer(tokenizer_dir)?;
        let pad_token = pad_token(tokenizer_dir);
        let pad_id = tokenizer
            .token_to_id(&pad_token)
            .ok_or_else(|| Error::BadFile {
                path: tokenizer_dir.join("tokenizer.json"),
                message: format!("the tokenizer has no padding token `{pad_token}`"),
            })?;
        let model = UMT5EncoderModel::load(text_encoder_dir, dtype, device)?;
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > model.config().vocab_size {
            return Err(Error::BadFile {
                path: tokenizer_dir.join("tokenizer.json"),
                message: format!(
                    "the tokenizer has {vocab} tokens but the text encoder only {}; the tokenizer \
                     and text_encoder folders do not belong together",
                    model.config().vocab_size
                ),
            });
        }
        Ok(Self {
            tokenizer: Mutex::new(tokenizer),
            pad_id,
            pad_token,
            model,
        })
    }

    /// Cleans and tokenizes `prompts` as the pipeline does: `</s>` appended, truncated and padded
    /// to `max_sequence_length`. Returns `input_ids` and `attention_mask`, i64 [B, max_len].
    pub fn tokenize(
        &self,
        prompts: &[String],
        max_sequence_length: usize,
    ) -> Result<(Tensor, Tensor)> {
        if prompts.is_empty() {
            return Err(Error::InvalidRequest("no prompt to encode".into()));
        }
        if max_sequence_length == 0 {
            return Err(Error::InvalidRequest(
                "max_sequence_length must be at least 1 (Wan uses 512)".into(),
            ));
        }
        let cleaned: Vec<String> = prompts.iter().map(|p| prompt_clean(p)).collect();
        let encodings = {
            let mut tok = self
                .tokenizer
                .lock()
                .map_err(|_| Error::Tokenizer("tokenizer lock poisoned".into()))?;
            tok.with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_sequence_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
            tok.with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(max_sequence_length),
                direction: PaddingDirection::Right,
                pad_to_multiple_of: None,
                pad_id: self.pad_id,
                pad_type_id: 0,
                pad_token: self.pad_token.clone(),
            }));
            tok.encode_batch(cleaned, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
        };
        let b = encodings.len();
        let mut ids = Vec::with_capacity(b * max_sequence_length);
        let mut mask = Vec::with_capacity(b * max_sequence_length);
        for e in &encodings {
            if e.get_ids().len() != max_sequence_length {
                return Err(Error::Tokenizer(format!(
                    "expected {max_sequence_length} tokens after padding, got {}",
                    e.get_ids().len()
                )));
            }
            ids.extend(e.get_ids().iter().map(|&x| x as i64));
            mask.extend(e.get_attention_mask().iter().map(|&x| x as i64));
        }
        let dev = self.model.device();
        Ok((
            Tensor::from_vec(ids, (b, max_sequence_length), dev)?,
            Tensor::from_vec(mask, (b, max_sequence_length), dev)?,
        ))
    }

    /// `prompt_embeds` [B, max_sequence_length, D] in the encoder's dtype: each prompt's
    /// `last_hidden_state` over its real tokens, zeros after.
    pub fn encode(&self, prompts: &[String], max_sequence_length: usize) -> Result<Tensor> {
        let (ids, mask) = self.tokenize(prompts, max_sequence_length)?;
        let seq_lens: Vec<usize> = mask
            .sum(1)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|n| n.max(0) as usize)
            .collect();
        // Right padding: tokens past the longest prompt are padding in every row (see module doc).
        let longest = seq_lens.iter().copied().max().unwrap_or(0).max(1);
        let hidden = self
            .model
            .forward(&ids.narrow(1, 0, longest)?, &mask.narrow(1, 0, longest)?)?;
        let d = self.hidden_size();
        let rows = seq_lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let real = hidden.get(i)?.narrow(0, 0, n)?;
                if n == max_sequence_length {
                    return Ok(real);
                }
                let zeros = Tensor::zeros(
                    (max_sequence_length - n, d),
                    hidden.dtype(),
                    hidden.device(),
                )?;
                Tensor::cat(&[&real, &zeros], 0)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// The embedding width D (`d_model`).
    pub fn hidden_size(&self) -> usize {
        self.model.config().d_model
    }

    /// The UMT5 encoder.
    pub fn model(&self) -> &UMT5EncoderModel {
        &self.model
    }
}

fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::MissingFile {
            path,
            hint: "the model's tokenizer/ folder needs tokenizer.json (the umt5-xxl tokenizer); \
                   a folder with only spiece.model is not supported, convert it with transformers \
                   (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
                .into(),
        });
    }
    Tokenizer::from_file(&path).map_err(|e| Error::BadFile {
        path,
        message: format!("not a tokenizers tokenizer.json: {e}"),
    })
}

/// `pad_token` from `tokenizer_config.json` (a string or `{"content": ...}`), else `<pad>`.
fn pad_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            let p = v.get("pad_token")?;
            p.as_str()
                .or_else(|| p.get("content").and_then(|c| c.as_str()))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "<pad>".to_string())
}

/// Named character references known to [`html_unescape`], sorted by name (generated from Python's
/// `html.entities.html5`: the HTML 4 names, `apos`, `Tab`, `NewLine` and all legacy no-`;` names).
#[rustfmt::skip]
const HTML_ENTITIES: &[(&str, char)] = &[
    ("AElig", '\u{c6}'), ("AElig;", '\u{c6}'), ("AMP", '&'), ("AMP;", '&'), ("Aacute", '\u{c1}'),
    ("Aacute;", '\u{c1}'), ("Acirc", '\u{c2}'), ("Acirc;", '\u{c2}'), ("Agrave", '\u{c0}'),
    ("Agrave;", '\u{c0}'), ("Alpha;", '\u{391}'), ("Aring", '\u{c5}'), ("Aring;", '\u{c5}'),
    ("Atilde", '\u{c3}'), ("Atilde;", '\u{c3}'), ("Auml", '\u{c4}'), ("Auml;", '\u{c4}'),
    ("Beta;", '\u{392}'), ("COPY", '\u{a9}'), ("COPY;", '\u{a9}'), ("Ccedil", '\u{c7}'),
    ("Ccedil;", '\u{c7}'), ("Chi;", '\u{3a7}'), ("Dagger;", '\u{2021}'), ("Delta;", '\u{394}'),
    ("ETH", '\u{d0}'), ("ETH;", '\u{d0}'), ("Eacute", '\u{c9}'), ("Eacute;", '\u{c9}'),
    ("Ecirc", '\u{ca}'), ("Ecirc;", '\u{ca}'), ("Egrave", '\u{c8}'), ("Egrave;", '\u{c8}'),
    ("Epsilon;", '\u{395}'), ("Eta;", '\u{397}'), ("Euml", '\u{cb}'), ("Euml;", '\u{cb}'),
    ("GT", '>'), ("GT;", '>'), ("Gamma;", '\u{393}'), ("Iacute", '\u{cd}'), ("Iacute;", '\u{cd}'),
    ("Icirc", '\u{ce}'), ("Icirc;", '\u{ce}'), ("Igrave", '\u{cc}'), ("Igrave;", '\u{cc}'),
    ("Iota;", '\u{399}'), ("Iuml", '\u{cf}'), ("Iuml;", '\u{cf}'), ("Kappa;", '\u{39a}'),
    ("LT", '<'), ("LT;", '<'), ("Lambda;", '\u{39b}'), ("Mu;", '\u{39c}'), ("NewLine;", '\u{a}'),
    ("Ntilde", '\u{d1}'), ("Ntilde;", '\u{d1}'), ("Nu;", '\u{39d}'), ("OElig;", '\u{152}'),
    ("Oacute", '\u{d3}'), ("Oacute;", '\u{d3}'), ("Ocirc", '\u{d4}'), ("Ocirc;", '\u{d4}'),
    ("Ograve", '\u{d2}'), ("Ograve;", '\u{d2}'), ("Omega;", '\u{3a9}'), ("Omicron;", '\u{39f}'),
    ("Oslash", '\u{d8}'), ("Oslash;", '\u{d8}'), ("Otilde", '\u{d5}'), ("Otilde;", '\u{d5}'),
    ("Ouml", '\u{d6}'), ("Ouml;", '\u{d6}'), ("Phi;", '\u{3a6}'), ("Pi;", '\u{3a0}'),
    ("Prime;", '\u{2033}'), ("Psi;", '\u{3a8}'), ("QUOT", '"'), ("QUOT;", '"'), ("REG", '\u{ae}'),
    ("REG;", '\u{ae}'), ("Rho;", '\u{3a1}'), ("Scaron;", '\u{160}'), ("Sigma;", '\u{3a3}'),
    ("THORN", '\u{de}'), ("THORN;", '\u{de}'), ("Tab;", '\u{9}'), ("Tau;", '\u{3a4}'),
    ("Theta;", '\u{398}'), ("Uacute", '\u{da}'), ("Uacute;", '\u{da}'), ("Ucirc", '\u{db}'),
    ("Ucirc;", '\u{db}'), ("Ugrave", '\u{d9}'), ("Ugrave;", '\u{d9}'), ("Upsilon;", '\u{3a5}'),
    ("Uuml", '\u{dc}'), ("Uuml;", '\u{dc}'), ("Xi;", '\u{39e}'), ("Yacute", '\u{dd}'),
    ("Yacute;", '\u{dd}'), ("Yuml;", '\u{178}'), ("Zeta;", '\u{396}'), ("aacute", '\u{e1}'),
    ("aacute;", '\u{e1}'), ("acirc", '\u{e2}'), ("acirc;", '\u{e2}'), ("acute", '\u{b4}'),
    ("acute;", '\u{b4}'), ("aelig", '\u{e6}'), ("aelig;", '\u{e6}'), ("agrave", '\u{e0}'),
    ("agrave;", '\u{e0}'), ("alefsym;", '\u{2135}'), ("alpha;", '\u{3b1}'), ("amp", '&'),
    ("amp;", '&'), ("and;", '\u{2227}'), ("ang;", '\u{2220}'), ("apos;", '\''),
    ("aring", '\u{e5}'), ("aring;", '\u{e5}'), ("asymp;", '\u{2248}'), ("atilde", '\u{e3}'),
    ("atilde;", '\u{e3}'), ("auml", '\u{e4}'), ("auml;", '\u{e4}'), ("bdquo;", '\u{201e}'),
    ("beta;", '\u{3b2}'), ("brvbar", '\u{a6}'), ("brvbar;", '\u{a6}'), ("bull;", '\u{2022}'),
    ("cap;", '\u{2229}'), ("ccedil", '\u{e7}'), ("ccedil;", '\u{e7}'), ("cedil", '\u{b8}'),
    ("cedil;", '\u{b8}'), ("cent", '\u{a2}'), ("cent;", '\u{a2}'), ("chi;", '\u{3c7}'),
    ("circ;", '\u{2c6}'), ("clubs;", '\u{2663}'), ("cong;", '\u{2245}'), ("copy", '\u{a9}'),
    ("copy;", '\u{a9}'), ("crarr;", '\u{21b5}'), ("cup;", '\u{222a}'), ("curren", '\u{a4}'),
    ("curren;", '\u{a4}'), ("dArr;", '\u{21d3}'), ("dagger;", '\u{2020}'), ("darr;", '\u{2193}'),
    ("deg", '\u{b0}'), ("deg;", '\u{b0}'), ("delta;", '\u{3b4}'), ("diams;", '\u{2666}'),
    ("divide", '\u{f7}'), ("divide;", '\u{f7}'), ("eacute", '\u{e9}'), ("eacute;", '\u{e9}'),
    ("ecirc", '\u{ea}'), ("ecirc;", '\u{ea}'), ("egrave", '\u{e8}'), ("egrave;", '\u{e8}'),
    ("empty;", '\u{2205}'), ("emsp;", '\u{2003}'), ("ensp;", '\u{2002}'), ("epsilon;", '\u{3b5}'),
    ("equiv;", '\u{2261}'), ("eta;", '\u{3b7}'), ("eth", '\u{f0}'), ("eth;", '\u{f0}'),
    ("euml", '\u{eb}'), ("euml;", '\u{eb}'), ("euro;", '\u{20ac}'), ("exist;", '\u{2203}'),
    ("fnof;", '\u{192}'), ("forall;", '\u{2200}'), ("frac12", '\u{bd}'), ("frac12;", '\u{bd}'),
    ("frac14", '\u{bc}'), ("frac14;", '\u{bc}'), ("frac34", '\u{be}'), ("frac34;", '\u{be}'),
    ("frasl;", '\u{2044}'), ("gamma;", '\u{3b3}'), ("ge;", '\u{2265}'), ("gt", '>'), ("gt;", '>'),
    ("hArr;", '\u{21d4}'), ("harr;", '\u{2194}'), ("hearts;", '\u{2665}'),
    ("hellip;", '\u{2026}'), ("iacute", '\u{ed}'), ("iacute;", '\u{ed}'), ("icirc", '\u{ee}'),
    ("icirc;", '\u{ee}'), ("iexcl", '\u{a1}'), ("iexcl;", '\u{a1}'), ("igrave", '\u{ec}'),
    ("igrave;", '\u{ec}'), ("image;", '\u{2111}'), ("infin;", '\u{221e}'), ("int;", '\u{222b}'),
    ("iota;", '\u{3b9}'), ("iquest", '\u{bf}'), ("iquest;", '\u{bf}'), ("isin;", '\u{2208}'),
    ("iuml", '\u{ef}'), ("iuml;", '\u{ef}'), ("kappa;", '\u{3ba}'), ("lArr;", '\u{21d0}'),
    ("lambda;", '\u{3bb}'), ("lang;", '\u{27e8}'), ("laquo", '\u{ab}'), ("laquo;", '\u{ab}'),
    ("larr;", '\u{2190}'), ("lceil;", '\u{2308}'), ("ldquo;", '\u{201c}'), ("le;", '\u{2264}'),
    ("lfloor;", '\u{230a}'), ("lowast;", '\u{2217}'), ("loz;", '\u{25ca}'), ("lrm;", '\u{200e}'),
    ("lsaquo;", '\u{2039}'), ("lsquo;", '\u{2018}'), ("lt", '<'), ("lt;", '<'),
    ("macr", '\u{af}'), ("macr;", '\u{af}'), ("mdash;", '\u{2014}'), ("micro", '\u{b5}'),
    ("micro;", '\u{b5}'), ("middot", '\u{b7}'), ("middot;", '\u{b7}'), ("minus;", '\u{2212}'),
    ("mu;", '\u{3bc}'), ("nabla;", '\u{2207}'), ("nbsp", '\u{a0}'), ("nbsp;", '\u{a0}'),
    ("ndash;", '\u{2013}'), ("ne;", '\u{2260}'), ("ni;", '\u{220b}'), ("not", '\u{ac}'),
    ("not;", '\u{ac}'), ("notin;", '\u{2209}'), ("nsub;", '\u{2284}'), ("ntilde", '\u{f1}'),
    ("ntilde;", '\u{f1}'), ("nu;", '\u{3bd}'), ("oacute", '\u{f3}'), ("oacute;", '\u{f3}'),
    ("ocirc", '\u{f4}'), ("ocirc;", '\u{f4}'), ("oelig;", '\u{153}'), ("ograve", '\u{f2}'),
    ("ograve;", '\u{f2}'), ("oline;", '\u{203e}'), ("omega;", '\u{3c9}'), ("omicron;", '\u{3bf}'),
    ("oplus;", '\u{2295}'), ("or;", '\u{2228}'), ("ordf", '\u{aa}'), ("ordf;", '\u{aa}'),
    ("ordm", '\u{ba}'), ("ordm;", '\u{ba}'), ("oslash", '\u{f8}'), ("oslash;", '\u{f8}'),
    ("otilde", '\u{f5}'), ("otilde;", '\u{f5}'), ("otimes;", '\u{2297}'), ("ouml", '\u{f6}'),
    ("ouml;", '\u{f6}'), ("para", '\u{b6}'), ("para;", '\u{b6}'), ("part;", '\u{2202}'),
    ("permil;", '\u{2030}'), ("perp;", '\u{22a5}'), ("phi;", '\u{3c6}'), ("pi;", '\u{3c0}'),
    ("piv;", '\u{3d6}'), ("plusmn", '\u{b1}'), ("plusmn;", '\u{b1}'), ("pound", '\u{a3}'),
    ("pound;", '\u{a3}'), ("prime;", '\u{2032}'), ("prod;", '\u{220f}'), ("prop;", '\u{221d}'),
    ("psi;", '\u{3c8}'), ("quot", '"'), ("quot;", '"'), ("rArr;", '\u{21d2}'),
    ("radic;", '\u{221a}'), ("rang;", '\u{27e9}'), ("raquo", '\u{bb}'), ("raquo;", '\u{bb}'),
    ("rarr;", '\u{2192}'), ("rceil;", '\u{2309}'), ("rdquo;", '\u{201d}'), ("real;", '\u{211c}'),
    ("reg", '\u{ae}'), ("reg;", '\u{ae}'), ("rfloor;", '\u{230b}'), ("rho;", '\u{3c1}'),
    ("rlm;", '\u{200f}'), ("rsaquo;", '\u{203a}'), ("rsquo;", '\u{2019}'), ("sbquo;", '\u{201a}'),
    ("scaron;", '\u{161}'), ("sdot;", '\u{22c5}'), ("sect", '\u{a7}'), ("sect;", '\u{a7}'),
    ("shy", '\u{ad}'), ("shy;", '\u{ad}'), ("sigma;", '\u{3c3}'), ("sigmaf;", '\u{3c2}'),
    ("sim;", '\u{223c}'), ("spades;", '\u{2660}'), ("sub;", '\u{2282}'), ("sube;", '\u{2286}'),
    ("sum;", '\u{2211}'), ("sup1", '\u{b9}'), ("sup1;", '\u{b9}'), ("sup2", '\u{b2}'),
    ("sup2;", '\u{b2}'), ("sup3", '\u{b3}'), ("sup3;", '\u{b3}'), ("sup;", '\u{2283}'),
    ("supe;", '\u{2287}'), ("szlig", '\u{df}'), ("szlig;", '\u{df}'), ("tau;", '\u{3c4}'),
    ("there4;", '\u{2234}'), ("theta;", '\u{3b8}'), ("thetasym;", '\u{3d1}'),
    ("thinsp;", '\u{2009}'), ("thorn", '\u{fe}'), ("thorn;", '\u{fe}'), ("tilde;", '\u{2dc}'),
    ("times", '\u{d7}'), ("times;", '\u{d7}'), ("trade;", '\u{2122}'), ("uArr;", '\u{21d1}'),
    ("uacute", '\u{fa}'), ("uacute;", '\u{fa}'), ("uarr;", '\u{2191}'), ("ucirc", '\u{fb}'),
    ("ucirc;", '\u{fb}'), ("ugrave", '\u{f9}'), ("ugrave;", '\u{f9}'), ("uml", '\u{a8}'),
    ("uml;", '\u{a8}'), ("upsih;", '\u{3d2}'), ("upsilon;", '\u{3c5}'), ("uuml", '\u{fc}'),
    ("uuml;", '\u{fc}'), ("weierp;", '\u{2118}'), ("xi;", '\u{3be}'), ("yacute", '\u{fd}'),
    ("yacute;", '\u{fd}'), ("yen", '\u{a5}'), ("yen;", '\u{a5}'), ("yuml", '\u{ff}'),
    ("yuml;", '\u{ff}'), ("zeta;", '\u{3b6}'), ("zwj;", '\u{200d}'), ("zwnj;", '\u{200c}'),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixtures_dir, json_strings, rel_error};

    fn case() -> std::path::PathBuf {
        fixtures_dir().join("text-encoder")
    }

    fn run(component: &str) -> Result<serde_json::Value> {
        let v: serde_json::Value = crate::loading::read_json(&case().join("case.json"))?;
        v["runs"]
            .as_array()
            .and_then(|runs| runs.iter().find(|r| r["component"] == component))
            .cloned()
            .ok_or_else(|| Error::InvalidRequest(format!("no {component} run in case.json")))
    }

    fn load_f32() -> Result<WanTextEncoder> {
        WanTextEncoder::load(
            &case().join("tokenizer"),
            &case().join("text_encoder"),
            DType::F32,
            &Device::Cpu,
        )
    }

    #[test]
    fn prompt_clean_matches_diffusers() -> Result<()> {
        let r = run("prompt-clean")?;
        let cases = r["cases"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(cases.len() >= 10);
        for c in cases {
            let (raw, want) = (c[0].as_str().unwrap_or(""), c[1].as_str().unwrap_or(""));
            assert_eq!(prompt_clean(raw), want, "prompt_clean({raw:?})");
        }
        let pe = run("prompt-embeds")?;
        let cleaned: Vec<String> = json_strings(&pe["prompts"])
            .iter()
            .map(|p| prompt_clean(p))
            .collect();
        assert_eq!(cleaned, json_strings(&pe["cleaned"]));
        Ok(())
    }

    #[test]
    fn entity_table_is_sorted() {
        assert!(HTML_ENTITIES.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(named_entity("amp;"), Some('&'));
        assert_eq!(named_entity("hellip;"), Some('…'));
        assert_eq!(named_entity("nope;"), None);
    }

    #[test]
    fn tokenize_matches_transformers() -> Result<()> {
        let enc = load_f32()?;
        let r = run("prompt-embeds")?;
        let max_len = r["max_sequence_length"].as_u64().unwrap_or(0) as usize;
        let expected =
            candle_core::safetensors::load(case().join("prompt_embeds.safetensors"), &Device::Cpu)?;
        let (ids, mask) = enc.tokenize(&json_strings(&r["prompts"]), max_len)?;
        assert_eq!(ids.dtype(), DType::I64);
        assert_eq!(
            ids.to_vec2::<i64>()?,
            expected["input_ids"].to_vec2::<i64>()?,
            "input_ids"
        );
        assert_eq!(
            mask.to_vec2::<i64>()?,
            expected["attention_mask"].to_vec2::<i64>()?,
            "attention_mask"
        );
        Ok(())
    }

    #[test]
    fn prompt_embeds_parity() -> Result<()> {
        let enc = load_f32()?;
        let r = run("prompt-embeds")?;
        let max_len = r["max_sequence_length"].as_u64().unwrap_or(0) as usize;
        let tol = r["tolerance"].as_f64().unwrap_or(0.0);
        let expected =
            candle_core::safetensors::load(case().join("prompt_embeds.safetensors"), &Device::Cpu)?;
        let out = enc.encode(&json_strings(&r["prompts"]), max_len)?;
        let err = rel_error(&out, &expected["prompt_embeds"])?;
        println!("prompt-embeds rel error {err:e}");
        assert!(err <= tol, "rel error {err}");
        // One prompt alone (no padding, so no attention mask) gives its row of the batch.
        for i in [0usize, 3] {
            let one = enc.encode(&json_strings(&r["prompts"])[i..i + 1], max_len)?;
            let want = expected["prompt_embeds"].narrow(0, i, 1)?;
            let err = rel_error(&one, &want)?;
            println!("prompt-embeds prompt {i} alone rel error {err:e}");
            assert!(err <= tol, "prompt {i} alone: rel error {err}");
        }
        // The zero padding is exact.
        let want = expected["prompt_embeds"].to_vec3::<f32>()?;
        let got = out.to_vec3::<f32>()?;
        for (w, g) in want.iter().flatten().zip(got.iter().flatten()) {
            if w.iter().all(|x| *x == 0.0) {
                assert!(g.iter().all(|x| *x == 0.0));
            }
        }
        Ok(())
    }

    #[test]
    fn full_length_agrees_with_short() -> Result<()> {
        let enc = load_f32()?;
        let prompts = vec!["A cat on a windowsill.".to_string(), String::new()];
        let short = enc.encode(&prompts, 32)?;
        let full = enc.encode(&prompts, MAX_SEQUENCE_LENGTH)?;
        assert_eq!(full.dims(), &[2, MAX_SEQUENCE_LENGTH, enc.hidden_size()]);
        let err = rel_error(&full.narrow(1, 0, 32)?, &short)?;
        assert!(err <= 1e-6, "{err}");
        let tail = full.narrow(1, 32, MAX_SEQUENCE_LENGTH - 32)?;
        assert_eq!(tail.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn bad_requests() -> Result<()> {
        let enc = load_f32()?;
        assert!(matches!(enc.encode(&[], 32), Err(Error::InvalidRequest(_))));
        assert!(matches!(
            enc.tokenize(&["a".to_string()], 0),
            Err(Error::InvalidRequest(_))
        ));
        Ok(())
    }

    #[test]
    fn missing_tokenizer_json_is_missing_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("kino-wan-tok-{}", std::process::id()));
        crate::testing::copy_dir(&case().join("tokenizer"), &dir)?;
        std::fs::remove_file(dir.join("tokenizer.json"))
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let r = WanTextEncoder::load(&dir, &case().join("text_encoder"), DType::F32, &Device::Cpu);
        std::fs::remove_dir_all(&dir).ok();
        match r {
            Err(Error::MissingFile { path, .. }) => assert!(path.ends_with("tokenizer.json")),
            Err(e) => panic!("expected MissingFile, got {e}"),
            Ok(_) => panic!("expected MissingFile, got a model"),
        }
        Ok(())
    }

    #[test]
    fn missing_tensor_is_typed() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("kino-wan-te-{}", std::process::id()));
        crate::testing::copy_dir(&case().join("text_encoder"), &dir)?;
        let file = dir.join("model.safetensors");
        let mut ts = candle_core::safetensors::load(&file, &Device::Cpu)?;
        let gone = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight";
        assert!(ts.remove(gone).is_some());
        candle_core::safetensors::save(&ts, &file)?;
        let r = WanTextEncoder::load(&case().join("tokenizer"), &dir, DType::F32, &Device::Cpu);
        std::fs::remove_dir_all(&dir).ok();
        match r {
            Err(Error::MissingTensor { name, .. }) => assert_eq!(name, gone),
            Err(e) => panic!("expected MissingTensor, got {e}"),
            Ok(_) => panic!("expected MissingTensor, got a model"),
        }
        Ok(())
    }
}
