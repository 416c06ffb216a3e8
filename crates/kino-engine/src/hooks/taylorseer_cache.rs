//! TaylorSeer, mirroring diffusers 0.42.1 `hooks/taylorseer_cache.py`.
//!
//! Each hooked module (Kino hooks the attention modules `blocks.N.attn1` / `blocks.N.attn2`)
//! keeps, per cache context, the Taylor factors of its output over the denoising steps (divided
//! differences, in f32). On a compute step it runs and updates them; on the other steps its output
//! is predicted as Σ factor_k · offset^k / k! (or, for `skip_predict_identifiers`, zeros).

use candle_core::{DType, Tensor};
use regex::Regex;

use crate::{Error, Result};

/// diffusers `TaylorSeerCacheConfig` (Taylor factors in f32; `use_lite_mode` targets modules
/// Wan's transformer does not have in that form and is not offered).
#[derive(Debug, Clone, PartialEq)]
pub struct TaylorSeerCacheConfig {
    /// Steps between full computations (default 5).
    pub cache_interval: usize,
    /// Steps before this one always compute (default 3).
    pub disable_cache_before_step: usize,
    /// Steps from this one on always compute (default none).
    pub disable_cache_after_step: Option<usize>,
    /// Highest order of the Taylor expansion (default 1).
    pub max_order: usize,
    /// `re.fullmatch` patterns of modules that predict zeros instead of running.
    pub skip_predict_identifiers: Option<Vec<String>>,
    /// `re.fullmatch` patterns of modules whose output is predicted. diffusers' default
    /// (`^blocks.*attn`, …) matches no module of Wan's transformer.
    pub cache_identifiers: Option<Vec<String>>,
}

impl Default for TaylorSeerCacheConfig {
    fn default() -> Self {
        Self {
            cache_interval: 5,
            disable_cache_before_step: 3,
            disable_cache_after_step: None,
            max_order: 1,
            skip_predict_identifiers: None,
            cache_identifiers: None,
        }
    }
}

/// diffusers' `_TRANSFORMER_BLOCK_IDENTIFIERS`, used when no identifier is given.
pub const DEFAULT_CACHE_IDENTIFIERS: [&str; 4] = [
    "^blocks.*attn",
    "^transformer_blocks.*attn",
    "^single_transformer_blocks.*attn",
    "^temporal_transformer_blocks.*attn",
];

/// The pattern that selects Wan's attention modules.
pub const WAN_ATTENTION_IDENTIFIER: &str = r"^blocks\.\d+\.attn[12]$";

/// Which attention module of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attn {
    Attn1,
    Attn2,
}

/// How a hooked module behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `cache_identifiers`: Taylor prediction.
    Predict,
    /// `skip_predict_identifiers` ("inactive"): zeros of the recorded shape.
    Zeros,
}

/// The names of `WanTransformer3DModel.named_modules()` (for `layers` blocks and, with image
/// tokens, the added projections), as the patterns are matched against them.
fn module_names(layers: usize, added_kv: bool) -> Vec<String> {
    let mut names: Vec<String> = [
        "",
        "rope",
        "patch_embedding",
        "condition_embedder",
        "condition_embedder.timesteps_proj",
        "condition_embedder.time_embedder",
        "condition_embedder.time_embedder.linear_1",
        "condition_embedder.time_embedder.act",
        "condition_embedder.time_embedder.linear_2",
        "condition_embedder.act_fn",
        "condition_embedder.time_proj",
        "condition_embedder.text_embedder",
        "condition_embedder.text_embedder.linear_1",
        "condition_embedder.text_embedder.act_1",
        "condition_embedder.text_embedder.linear_2",
        "blocks",
        "norm_out",
        "proj_out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..layers {
        let b = format!("blocks.{i}");
        names.push(b.clone());
        for m in [
            "norm1",
            "norm2",
            "norm3",
            "ffn",
            "ffn.net",
            "ffn.net.0",
            "ffn.net.0.proj",
        ] {
            names.push(format!("{b}.{m}"));
        }
        names.push(format!("{b}.ffn.net.1"));
        names.push(format!("{b}.ffn.net.2"));
        for a in ["attn1", "attn2"] {
            names.push(format!("{b}.{a}"));
            for m in [
                "to_q", "to_k", "to_v", "to_out", "to_out.0", "to_out.1", "norm_q", "norm_k",
            ] {
                names.push(format!("{b}.{a}.{m}"));
            }
            if a == "attn2" && added_kv {
                for m in ["add_k_proj", "add_v_proj", "norm_added_k"] {
                    names.push(format!("{b}.{a}.{m}"));
                }
            }
        }
    }
    names
}

fn compile(patterns: &[String], key: &str) -> Result<Vec<Regex>> {
    patterns
        .iter()
        .map(|p| {
            Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                Error::InvalidRequest(format!("taylorseer: {key} `{p}` is not a valid regex: {e}"))
            })
        })
        .collect()
}

/// Which modules the patterns hook, as `(block, attention) → mode`, for a transformer of
/// `layers` blocks. Every matched module must be an attention module (the ones Kino can cache);
/// a pattern set that matches nothing is an error (it would cache nothing).
pub(crate) fn resolve(
    cfg: &TaylorSeerCacheConfig,
    layers: usize,
    added_kv: bool,
) -> Result<Vec<((usize, Attn), Mode)>> {
    let inactive = compile(
        cfg.skip_predict_identifiers.as_deref().unwrap_or(&[]),
        "skip_predict_identifiers",
    )?;
    let active = match &cfg.cache_identifiers {
        Some(p) if !p.is_empty() => compile(p, "cache_identifiers")?,
        _ => compile(
            &DEFAULT_CACHE_IDENTIFIERS.map(String::from),
            "cache_identifiers",
        )?,
    };
    let mut hooked = Vec::new();
    for name in module_names(layers, added_kv) {
        let is_inactive = inactive.iter().any(|r| r.is_match(&name));
        let is_active = active.iter().any(|r| r.is_match(&name));
        if !(is_inactive || is_active) {
            continue;
        }
        let target = name.strip_prefix("blocks.").and_then(|rest| {
            let (i, m) = rest.split_once('.')?;
            let i: usize = i.parse().ok()?;
            match m {
                "attn1" => Some((i, Attn::Attn1)),
                "attn2" => Some((i, Attn::Attn2)),
                _ => None,
            }
        });
        let Some(target) = target else {
            return Err(Error::InvalidRequest(format!(
                "taylorseer: the identifiers match `{name}`, which Kino does not cache; Kino \
                 caches the attention modules blocks.N.attn1 and blocks.N.attn2 (e.g. \
                 cache_identifiers={WAN_ATTENTION_IDENTIFIER})"
            )));
        };
        let mode = if is_inactive {
            Mode::Zeros
        } else {
            Mode::Predict
        };
        hooked.push((target, mode));
    }
    if hooked.is_empty() {
        let which = if cfg
            .cache_identifiers
            .as_ref()
            .is_some_and(|p| !p.is_empty())
        {
            "cache_identifiers match no module"
        } else {
            "diffusers' default cache_identifiers match no module of Wan's transformer"
        };
        return Err(Error::InvalidRequest(format!(
            "taylorseer: {which}, so nothing would be cached; try \
             cache_identifiers={WAN_ATTENTION_IDENTIFIER}"
        )));
    }
    Ok(hooked)
}

/// `_measure_should_compute` for the step after `current_step += 1`: warm-up, every
/// `cache_interval` steps after it (Python's non-negative modulo), or cool-down.
pub(crate) fn should_compute(cfg: &TaylorSeerCacheConfig, step: i64) -> bool {
    let before = cfg.disable_cache_before_step as i64;
    let warmup = step < before;
    let interval = (step - before - 1).rem_euclid(cfg.cache_interval as i64) == 0;
    let cooldown = cfg
        .disable_cache_after_step
        .is_some_and(|a| step >= a as i64);
    warmup || interval || cooldown
}

/// `TaylorSeerState`: one per hooked module and cache context.
#[derive(Debug)]
pub(crate) struct TaylorState {
    pub current_step: i64,
    pub last_update_step: Option<i64>,
    /// Orders 0..; f32.
    pub factors: Vec<Tensor>,
    pub shape: Option<(Vec<usize>, DType)>,
}

impl Default for TaylorState {
    fn default() -> Self {
        Self {
            current_step: -1,
            last_update_step: None,
            factors: Vec::new(),
            shape: None,
        }
    }
}

impl TaylorState {
    /// `update`: divided differences over the steps since the last update, limited by the
    /// orders already stored.
    pub fn update(&mut self, output: &Tensor, max_order: usize, mode: Mode) -> Result<()> {
        self.shape = Some((output.dims().to_vec(), output.dtype()));
        if mode == Mode::Predict {
            let features = output.to_dtype(DType::F32)?;
            let mut new = vec![features];
            if let Some(last) = self.last_update_step {
                let delta = self.current_step - last;
                let d = Tensor::new(delta as f32, output.device())?;
                for j in 0..max_order {
                    match self.factors.get(j) {
                        Some(prev) if prev.dims() == new[j].dims() => {
                            let next = (&new[j] - prev)?.broadcast_div(&d)?;
                            new.push(next);
                        }
                        _ => break,
                    }
                }
            }
            self.factors = new;
        }
        self.last_update_step = Some(self.current_step);
        Ok(())
    }

    /// `predict`: Σ factor_k · offset^k / k! in the module's dtype (or zeros).
    pub fn predict(&self, mode: Mode) -> Result<Tensor> {
        let (Some(last), Some((shape, dtype))) = (self.last_update_step, &self.shape) else {
            return Err(Error::InvalidRequest(format!(
                "taylorseer: step {} would be predicted before any step was computed; set \
                 disable_cache_before_step to 1 or more",
                self.current_step
            )));
        };
        if mode == Mode::Zeros {
            let dev = self.factors.first().map(|t| t.device().clone());
            let dev = dev.unwrap_or(candle_core::Device::Cpu);
            return Ok(Tensor::zeros(shape.as_slice(), *dtype, &dev)?);
        }
        let offset = (self.current_step - last) as f64;
        let mut out: Option<Tensor> = None;
        let mut factorial = 1.0f64;
        for (order, factor) in self.factors.iter().enumerate() {
            if order > 0 {
                factorial *= order as f64;
            }
            let coeff = offset.powi(order as i32) / factorial;
            let term = factor.to_dtype(*dtype)?.affine(coeff, 0.0)?;
            out = Some(match out {
                None => term,
                Some(o) => (o + term)?,
            });
        }
        out.ok_or_else(|| Error::InvalidRequest("taylorseer: no Taylor factors".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ids(p: &str) -> TaylorSeerCacheConfig {
        TaylorSeerCacheConfig {
            cache_identifiers: Some(vec![p.to_string()]),
            ..Default::default()
        }
    }

    #[test]
    fn compute_steps_follow_the_reference_schedule() {
        // interval 2, before 3: 0,1,2 warm-up, 3 predicted, 4 computed, 5 predicted, …
        let c = TaylorSeerCacheConfig {
            cache_interval: 2,
            ..Default::default()
        };
        let got: Vec<bool> = (0..8).map(|s| should_compute(&c, s)).collect();
        assert_eq!(got, [true, true, true, false, true, false, true, false]);
        // interval 3, before 2, cool-down from 6.
        let c = TaylorSeerCacheConfig {
            cache_interval: 3,
            disable_cache_before_step: 2,
            disable_cache_after_step: Some(6),
            ..Default::default()
        };
        let got: Vec<bool> = (0..8).map(|s| should_compute(&c, s)).collect();
        assert_eq!(got, [true, true, false, true, false, false, true, true]);
    }

    #[test]
    fn identifiers_select_attention_modules_or_say_why_not() {
        let h = resolve(&ids(WAN_ATTENTION_IDENTIFIER), 2, false).unwrap();
        assert_eq!(h.len(), 4);
        assert!(h.iter().all(|(_, m)| *m == Mode::Predict));
        let h = resolve(&ids(r"^blocks\.1\.attn2$"), 2, false).unwrap();
        assert_eq!(h, [((1, Attn::Attn2), Mode::Predict)]);
        let e = resolve(&TaylorSeerCacheConfig::default(), 2, false).unwrap_err();
        assert!(e.to_string().contains("default"), "{e}");
        assert!(e.to_string().contains(WAN_ATTENTION_IDENTIFIER), "{e}");
        let e = resolve(&ids("proj_out"), 2, false).unwrap_err();
        assert!(e.to_string().contains("`proj_out`"), "{e}");
        let e = resolve(&ids("(unclosed"), 2, false).unwrap_err();
        assert!(e.to_string().contains("not a valid regex"), "{e}");
        let c = TaylorSeerCacheConfig {
            skip_predict_identifiers: Some(vec![r"blocks\.0\.attn2".into()]),
            ..ids(r"blocks\.0\.attn1")
        };
        let h = resolve(&c, 1, false).unwrap();
        assert_eq!(
            h,
            [
                ((0, Attn::Attn1), Mode::Predict),
                ((0, Attn::Attn2), Mode::Zeros)
            ]
        );
    }

    #[test]
    fn taylor_prediction_extrapolates_polynomials() {
        // f(s) = s² sampled at 0, 2, 4 with order 2, then predicted at 5 from the divided
        // differences as the reference does.
        let dev = Device::Cpu;
        let mut s = TaylorState::default();
        let f = |x: f32| Tensor::new(&[x * x], &dev).unwrap();
        for step in [0i64, 2, 4] {
            s.current_step = step;
            s.update(&f(step as f32), 2, Mode::Predict).unwrap();
        }
        // factors: 16, (16−4)/2 = 6, (6 − (4−0)/2)/2 = 2.
        let got: Vec<f32> = s
            .factors
            .iter()
            .map(|t| t.to_vec1::<f32>().unwrap()[0])
            .collect();
        assert_eq!(got, [16.0, 6.0, 2.0]);
        s.current_step = 5;
        let p = s.predict(Mode::Predict).unwrap().to_vec1::<f32>().unwrap()[0];
        assert_eq!(p, 16.0 + 6.0 + 2.0 / 2.0);
        let z = s.predict(Mode::Zeros).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(z, [0.0]);
        // Order 1 keeps two factors; nothing stored: a plain-words error.
        let mut s = TaylorState {
            current_step: 0,
            ..Default::default()
        };
        assert!(s
            .predict(Mode::Predict)
            .unwrap_err()
            .to_string()
            .contains("disable_cache_before_step"));
        s.update(&f(1.0), 1, Mode::Predict).unwrap();
        s.current_step = 1;
        s.update(&f(2.0), 1, Mode::Predict).unwrap();
        assert_eq!(s.factors.len(), 2);
    }
}
